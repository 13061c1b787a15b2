"""Samplers: plain functions over any denoiser `eps = denoiser(x_t, t)`.

They know nothing of training or of the network: a conditional or guided model is passed in as a denoiser
(see `guidance.py`). Every random draw goes through the optional `torch.Generator`, so the same seed gives
the same images on the same device. `callback(i, t_index, x_t, x0_pred)` is called after every step, e.g.
to draw the denoising process.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .diffusion import Denoiser, predict_x0
from .schedule import NoiseSchedule

StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def _initial_noise(shape, device, generator, x_T):
    if x_T is not None:
        return x_T.to(device)
    return torch.randn(shape, device=device, generator=generator)


@torch.inference_mode()
def ddpm_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    variance: str = "beta",
    clip_x0: bool = False,
    x_T: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2).

    Default (`clip_x0=False`): exactly the paper's update
        x_{t-1} = 1/sqrt(a_t) * (x_t - (1 - a_t)/sqrt(1 - abar_t) * eps) + sigma_t z,   z ~ N(0, I),
    with sigma_t^2 = beta_t (`variance="beta"`, the paper's choice for x_0 ~ N(0, I) data) or beta_tilde_t
    (`variance="beta_tilde"`, eq. 7). No noise is added at the last step (index 0). It is the default because
    it is the formula the model was trained for and adds no hidden bias. With `clip_x0=True` the predicted
    x0 is clipped to [-1, 1] and the step uses the posterior mean mu_tilde(x_t, x0) of eq. 7 instead: the same
    mean when no clipping happens, and fewer saturated pixels for weak or strongly guided models.
    Returns x_0 in the model's range (about [-1, 1]; not clamped).
    """
    if variance not in ("beta", "beta_tilde"):
        raise ValueError(f"variance must be 'beta' or 'beta_tilde', not {variance!r}")
    device = torch.device(device) if device is not None else schedule.betas.device
    x = _initial_noise(shape, device, generator, x_T)
    n = x.shape[0]
    log_var = (
        torch.log(schedule.betas) if variance == "beta" else schedule.posterior_log_variance_clipped
    )
    indices = range(len(schedule) - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="ddpm", leave=False)
    for i, index in enumerate(indices):
        t = torch.full((n,), index, device=device, dtype=torch.long)
        eps = denoiser(x, t)
        x0 = predict_x0(schedule, x, t, eps)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            mean = schedule.posterior_mean_coef1[index] * x0 + schedule.posterior_mean_coef2[index] * x
        else:
            mean = schedule.sqrt_recip_alphas[index] * (x - schedule.eps_coef[index] * eps)
        if index > 0:
            noise = torch.randn(x.shape, device=device, generator=generator, dtype=x.dtype)
            x = mean + (0.5 * log_var[index]).exp() * noise
        else:
            x = mean
        if callback is not None:
            callback(i, index, x, x0)
    return x


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """`steps` indices spread evenly from T-1 down to 0 (both ends included: the last step reaches x_0)."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"sampling steps must be in 1..{timesteps}, got {steps}")
    if steps == 1:
        return [timesteps - 1]
    raw = torch.linspace(timesteps - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    return list(dict.fromkeys(raw))  # unique, order kept


@torch.inference_mode()
def ddim_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    *,
    steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    clip_x0: bool = False,
    x_T: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) over a subsequence of `steps` timesteps.

        x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
        sigma = eta * sqrt((1 - abar_prev)/(1 - abar_t)) * sqrt(1 - abar_t/abar_prev)      (eq. 16)

    eta=0 is deterministic given x_T; eta=1 matches DDPM's posterior variance. abar_prev = 1 after the last step.
    """
    device = torch.device(device) if device is not None else schedule.betas.device
    x = _initial_noise(shape, device, generator, x_T)
    n = x.shape[0]
    seq = ddim_timesteps(len(schedule), steps)
    abar = schedule.alphas_cumprod
    one = abar.new_ones(())
    pairs = list(zip(seq, seq[1:] + [-1]))
    if progress:
        from tqdm.auto import tqdm

        pairs = tqdm(pairs, desc="ddim", leave=False)
    for i, (index, prev) in enumerate(pairs):
        t = torch.full((n,), index, device=device, dtype=torch.long)
        eps = denoiser(x, t)
        x0 = predict_x0(schedule, x, t, eps)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            # keep x0 and eps consistent with x_t after clipping (as in the DDIM reference implementation)
            eps = (x - abar[index].sqrt() * x0) / (1 - abar[index]).sqrt()
        abar_t = abar[index]
        abar_prev = abar[prev] if prev >= 0 else one
        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
        x = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and prev >= 0:
            x = x + sigma * torch.randn(x.shape, device=device, generator=generator, dtype=x.dtype)
        if callback is not None:
            callback(i, index, x, x0)
    return x
