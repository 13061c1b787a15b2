"""What the sampler tests share: a recording denoiser and x0 processing written out with numpy."""
import numpy as np


class Recorder:
    """Wraps a denoiser and keeps every (x_t, t index, eps) it was called with, as float64 numpy arrays."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, []

    def __call__(self, x, t):
        eps = self.denoiser(x, t)
        self.calls.append((x.double().numpy(), int(t[0]), eps.double().numpy()))
        return eps


def process_by_hand(x0, clip, percentile):
    """Clipping and Imagen's dynamic thresholding (Saharia et al. 2022) written out with numpy, per sample."""
    if percentile is not None:
        s = np.percentile(np.abs(x0).reshape(len(x0), -1), percentile * 100, axis=1)  # linear interpolation
        s = np.maximum(s, 1.0).reshape(-1, 1, 1, 1)
        x0 = np.clip(x0, -s, s) / s
    return np.clip(x0, -1, 1) if clip else x0
