"""Editing with a trained model: image-to-image, inpainting and interpolation.

Each edit is a start state and/or a hook on each new state, given to the one sampling path (`pipeline.sample`),
so every sampler, labels, classifier-free guidance and autoguidance work as they do for plain sampling and no
second sampler loop exists:
- image-to-image (SDEdit, Meng et al. 2022): noise the image with q(x_t | x_0) to the timestep where the sampler
  has `strength` of its steps left, then run those steps;
- inpainting (the replacement step of RePaint, Lugmayr et al. 2022, eq. 8): after every step the known pixels are
  a fresh draw of q(x_t | x_0) of the image at the new state's timestep, the others are the model's; the last
  state takes the image's known pixels exactly;
- interpolation: between two images through their DDIM inversions (Song et al. 2021, sec. 5.3), or between two
  seeds' noises, always spherically (the noises are near a sphere of radius sqrt(dimensions), a straight line
  between two of them passes inside it, where the model saw no noise in training).

Images are tensors in [-1, 1], [N, C, H, W], as everywhere inside the library; masks are bool [N, 1, H, W] or
[N, C, H, W] with True = regenerate. No file, PIL or CLI here.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

import torch

from .config import SamplingConfig
from .diffusion import q_sample
from .errors import DdpmError
from .guidance import Guide, make_denoiser
from .modes import eval_mode
from .pipeline import batch_generator, guide_module, sample
from .samplers import StepCallback, ddim_invert, sampler_timesteps
from .schedule import NoiseSchedule

# Interpolation goes through DDIM's deterministic inversion; with fewer steps than this its round trip is visibly
# off (benchmarks/RESULTS.md, "Editing"), so it is the default when the settings give no step count.
INVERSION_STEPS = 50


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _labels(labels, n: int, device) -> torch.Tensor | None:
    if labels is None:
        return None
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    if len(labels) == 1:
        labels = labels.expand(n)
    if len(labels) != n:
        raise DdpmError(f"{len(labels)} labels for {n} images: give one label for all, or one per image")
    return labels


def _start_noise(shape, device, generator: torch.Generator | None) -> torch.Tensor:
    """The first draw plain sampling makes (the samplers' x_T), so that an edit that keeps nothing of the image
    draws exactly what `sample` draws with the same generator."""
    return torch.randn(shape, device=device, generator=generator)


def steps_left(sampling: SamplingConfig, schedule: NoiseSchedule, strength: float) -> list[int]:
    """The sampler's timestep indices that image-to-image runs at `strength`: the last round(strength x steps) of
    them (none at 0, all at 1), so that strength means the share of the sampler's steps, as in diffusers (which
    truncates instead: 0.29 x 100 is 28.999... in floats, 28 steps there, 29 here)."""
    if not (0.0 <= strength <= 1.0):
        raise DdpmError(f"strength must be in [0, 1] (0 keeps the image, 1 ignores it), got {strength}")
    seq = sampler_timesteps(sampling, schedule)
    return seq[len(seq) - round(strength * len(seq)):] if strength > 0 else []


@torch.no_grad()
def img2img(model, schedule: NoiseSchedule, images: torch.Tensor, strength: float, *, labels=None,
            sampling: SamplingConfig | None = None, generator: torch.Generator | None = None,
            guide: torch.nn.Module | Guide | None = None, callback: StepCallback | None = None,
            progress: bool = False) -> torch.Tensor:
    """SDEdit: x_t = q(x_t | x_0 = image) at the first of `steps_left(strength)`, then the sampler from there.
    strength 0 returns the images unchanged; strength 1 starts from the noise alone, exactly as `sample` does
    with the same generator."""
    sampling = sampling or SamplingConfig()
    device = _device(model)
    images = images.to(device)
    left = steps_left(sampling, schedule, strength)
    noise = _start_noise(images.shape, device, generator)
    if not left:
        return images.clone()
    full = left[0] == len(schedule) - 1  # every sampler starts at T-1: all steps left, start from the noise alone
    start = None if full else left[0]
    x_T = noise if full else q_sample(schedule, images, torch.full((len(images),), start, device=device), noise)
    return sample(model, schedule, None if labels is not None else len(images),
                  labels=_labels(labels, len(images), device), sampling=sampling, generator=generator, guide=guide,
                  callback=callback, progress=progress, x_T=x_T, start_index=start)


RESAMPLE_JUMP = 5  # sampler steps between RePaint's jumps back in time (its j; 10 of its 250 steps there)


def renoise(x: torch.Tensor, schedule: NoiseSchedule, to_index: int, from_index: int,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """One jump back in time (RePaint, Lugmayr et al. 2022, eq. 1 over several steps): a draw of
    q(x_to | x_from) = N(sqrt(abar_to / abar_from) x_from, (1 - abar_to / abar_from) I) for to_index > from_index."""
    abar = schedule.alphas_cumprod.double()
    ratio = float(abar[to_index] / abar[from_index])
    noise = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
    return math.sqrt(ratio) * x + math.sqrt(1.0 - ratio) * noise


@torch.no_grad()
def inpaint(model, schedule: NoiseSchedule, images: torch.Tensor, masks: torch.Tensor, *, labels=None,
            sampling: SamplingConfig | None = None, generator: torch.Generator | None = None,
            guide: torch.nn.Module | Guide | None = None, callback: StepCallback | None = None,
            progress: bool = False, resample: int = 1) -> torch.Tensor:
    """Regenerate the pixels where `masks` is True, keep the others: after each step the kept pixels are
    q(x_t | x_0 = image) at the new state's timestep (a fresh draw from `generator`), and the result's kept
    pixels are the image's exactly. `resample` R > 1 adds RePaint's resampling: every RESAMPLE_JUMP sampler steps
    the state jumps back to where they started (`renoise`) and runs them again, R times in all (R times the model
    calls), so the model's region can agree with the kept one."""
    sampling = sampling or SamplingConfig()
    device = _device(model)
    images = images.to(device)
    masks = masks.to(device=device, dtype=torch.bool)
    if masks.ndim != 4 or masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:] \
            or masks.shape[1] not in (1, images.shape[1]):
        raise DdpmError(f"masks of shape {tuple(masks.shape)} do not fit images of shape {tuple(images.shape)}: "
                        "give one [N, 1 or C, H, W] mask per image")
    if not 1 <= resample <= 100:
        raise DdpmError(f"resample must be from 1 (no resampling) to 100, got {resample}")
    masks = masks.expand_as(images)

    def keep_known(x: torch.Tensor, index: int) -> torch.Tensor:
        if index < 0:  # the final image: the known pixels exactly
            return torch.where(masks, x, images)
        t = torch.full((len(images),), index, device=device, dtype=torch.long)
        noise = torch.randn(x.shape, device=device, generator=generator, dtype=x.dtype)
        return torch.where(masks, x, q_sample(schedule, images, t, noise))

    x = keep_known(_start_noise(images.shape, device, generator), len(schedule) - 1)
    options = dict(labels=_labels(labels, len(images), device), sampling=sampling, generator=generator, guide=guide,
                   callback=callback, progress=progress, state_hook=keep_known)
    n = None if labels is not None else len(images)
    if resample == 1:
        return sample(model, schedule, n, x_T=x, **options)
    seq = sampler_timesteps(sampling, schedule)
    bounds = seq[::RESAMPLE_JUMP] + ([seq[-1]] if (len(seq) - 1) % RESAMPLE_JUMP else [])
    for start, stop in zip(bounds, bounds[1:]):
        for repeat in range(resample):
            if repeat:  # back to the segment's start, the known pixels drawn anew there
                x = keep_known(renoise(x, schedule, start, stop, generator), start)
            x = sample(model, schedule, n, x_T=x, start_index=start, stop_index=stop, **options)
    return sample(model, schedule, n, x_T=x, start_index=bounds[-1], **options)


def edit_batches(model, schedule: NoiseSchedule, images: torch.Tensor, *, masks: torch.Tensor | None = None,
                 strength: float | None = None, labels: torch.Tensor | None = None,
                 sampling: SamplingConfig | None = None, guide=None, seed: int = 0, batch_size: int = 64,
                 progress: bool = False, resample: int = 1) -> torch.Tensor:
    """`inpaint` (with `masks`) or `img2img` (with `strength`) over many images, batch b drawn with
    `batch_generator(device, seed, b)` as `ddpm sample` draws its batches (so strength 1 draws what it draws);
    the one path of `ddpm edit` and the page. Returns the results on the CPU."""
    if (masks is None) == (strength is None):
        raise DdpmError("give masks (inpainting) or a strength (image-to-image), one of them")
    device = _device(model)
    results = []
    for b, start in enumerate(range(0, len(images), batch_size)):
        part = slice(start, start + batch_size)
        options = dict(labels=None if labels is None else labels[part], sampling=sampling, guide=guide,
                       generator=batch_generator(device, seed, b), progress=progress)
        if masks is not None:
            results.append(inpaint(model, schedule, images[part], masks[part], resample=resample, **options).cpu())
        else:
            results.append(img2img(model, schedule, images[part], strength, **options).cpu())
    return torch.cat(results)


# ---------------------------------------------------------------------------------------------------------------
# interpolation

def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation per sample (Shoemake 1985): sin((1-alpha) theta)/sin(theta) a + sin(alpha theta)/
    sin(theta) b, theta the angle between a and b; a straight line where they are (nearly) parallel. alpha 0
    gives a and alpha 1 gives b exactly (weights 1 and 0)."""
    flat_a, flat_b = a.flatten(1).double(), b.flatten(1).double()
    cos = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1)).clamp(min=1e-30)
    theta = cos.clamp(-1.0, 1.0).acos()
    sin = theta.sin()
    straight = sin < 1e-6
    safe = torch.where(straight, torch.ones_like(sin), sin)
    wa = torch.where(straight, torch.full_like(sin, 1.0 - alpha), ((1.0 - alpha) * theta).sin() / safe)
    wb = torch.where(straight, torch.full_like(sin, alpha), (alpha * theta).sin() / safe)
    shape = (-1,) + (1,) * (a.ndim - 1)
    return (wa.view(shape) * a.double() + wb.view(shape) * b.double()).to(a.dtype)


def _ddim(sampling: SamplingConfig | None) -> SamplingConfig:
    """The settings' guidance with DDIM, eta 0 (the deterministic ODE an inversion can be undone by)."""
    sampling = sampling or SamplingConfig(guidance=1.0)
    return replace(sampling, sampler="ddim", eta=0.0, steps=sampling.steps or INVERSION_STEPS)


@torch.no_grad()
def invert(model, schedule: NoiseSchedule, images: torch.Tensor, *, labels=None,
           sampling: SamplingConfig | None = None, guide: torch.nn.Module | Guide | None = None,
           progress: bool = False) -> torch.Tensor:
    """x_{T-1} from which DDIM (eta 0, the settings' steps and guidance; INVERSION_STEPS when they give none)
    draws about `images` again (`samplers.ddim_invert`)."""
    sampling = _ddim(sampling)
    device = _device(model)
    images = images.to(device)
    labels = _labels(labels, len(images), device)
    networks = [model] + ([guide_module(guide, device)] if guide is not None else [])
    with eval_mode(*networks):
        denoiser = make_denoiser(model, labels, sampling, schedule=schedule, guide=guide)
        return ddim_invert(denoiser, schedule, images, steps=sampling.steps_for(len(schedule)), progress=progress)


def reconstruct(model, schedule: NoiseSchedule, images: torch.Tensor, *, labels=None,
                sampling: SamplingConfig | None = None, guide=None) -> torch.Tensor:
    """DDIM's decoding of the images' own inversion: what interpolation's end frames are."""
    x_T = invert(model, schedule, images, labels=labels, sampling=sampling, guide=guide)
    return sample(model, schedule, None if labels is not None else len(images),
                  labels=_labels(labels, len(images), _device(model)), sampling=_ddim(sampling), guide=guide,
                  x_T=x_T)


def _frame_labels(labels, frames: int, device) -> torch.Tensor | None:
    """One label for every frame, or two (A's, B's): A's for the first half of the frames, B's for the rest."""
    if labels is None:
        return None
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    if len(labels) not in (1, 2):
        raise DdpmError(f"interpolation takes one label for all frames or two (one per end), got {len(labels)}")
    alphas = torch.linspace(0, 1, frames, device=device)
    return labels[-1].expand(frames).clone() if len(labels) == 1 else torch.where(alphas < 0.5, labels[0], labels[1])


def _check_frames(frames: int) -> None:
    if frames < 2:
        raise DdpmError(f"interpolation needs at least 2 frames (the two ends), got {frames}")


def _frames_between(model, schedule, x_a: torch.Tensor, x_b: torch.Tensor, frames: int, labels, sampling, guide,
                    generator, progress) -> torch.Tensor:
    alphas = torch.linspace(0, 1, frames, dtype=torch.float64).tolist()
    alphas[0], alphas[-1] = 0.0, 1.0
    x_T = torch.cat([slerp(x_a, x_b, alpha) for alpha in alphas])
    labels = _frame_labels(labels, frames, x_T.device)
    return sample(model, schedule, None if labels is not None else frames, labels=labels, sampling=sampling,
                  guide=guide, generator=generator, x_T=x_T, progress=progress)


@torch.no_grad()
def interpolate_images(model, schedule: NoiseSchedule, a: torch.Tensor, b: torch.Tensor, frames: int, *,
                       labels: Sequence[int] | torch.Tensor | None = None, sampling: SamplingConfig | None = None,
                       guide=None, progress: bool = False) -> torch.Tensor:
    """`frames` images from A to B ([1, C, H, W] each): both inverted by DDIM, their x_{T-1} interpolated
    spherically, each decoded by DDIM (eta 0; the settings' steps, else INVERSION_STEPS). The end frames are
    `reconstruct(A)` and `reconstruct(B)`. `labels`: one for all, or A's and B's (each half of the frames takes
    its end's)."""
    _check_frames(frames)
    device = _device(model)
    ends = torch.cat([a, b]).to(device)
    end_labels = None if labels is None else _frame_labels(labels, 2, device)
    x_ends = invert(model, schedule, ends, labels=end_labels, sampling=sampling, guide=guide, progress=progress)
    return _frames_between(model, schedule, x_ends[:1], x_ends[1:], frames, labels, _ddim(sampling), guide, None,
                           progress)


@torch.no_grad()
def interpolate_seeds(model, schedule: NoiseSchedule, seed_a: int, seed_b: int, frames: int, *,
                      labels: Sequence[int] | torch.Tensor | None = None, sampling: SamplingConfig | None = None,
                      guide=None, progress: bool = False) -> torch.Tensor:
    """`frames` images between the first image `ddpm sample --seed A` and `--seed B` draw: their noises
    interpolated spherically, each frame drawn with the settings (a stochastic sampler's later draws come from
    seed A's generator). With a deterministic sampler the end frames are those two images."""
    _check_frames(frames)
    device = _device(model)
    c = model.config
    shape = (1, c.in_channels, c.image_size, c.image_size)
    noise_a = _start_noise(shape, device, batch_generator(device, seed_a, 0))
    noise_b = _start_noise(shape, device, batch_generator(device, seed_b, 0))
    return _frames_between(model, schedule, noise_a, noise_b, frames, labels, sampling or SamplingConfig(), guide,
                           batch_generator(device, seed_a, 0), progress)


def round_trip_error(model, schedule: NoiseSchedule, images: torch.Tensor, *, labels=None,
                     sampling: SamplingConfig | None = None, guide=None) -> float:
    """Root-mean-square of reconstruct(images) - images in [-1, 1] units (benchmarks report it against steps)."""
    back = reconstruct(model, schedule, images, labels=labels, sampling=sampling, guide=guide)
    return math.sqrt(float((back.cpu().double() - images.cpu().double()).pow(2).mean()))
