"""The forward process q(x_t | x_0), the eps <-> x0 conversions and the training objective (Ho et al. 2020)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .modes import eval_mode
from .schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (Ho et al. 2020, eq. 4), one t per sample."""
    return (
        schedule.extract("sqrt_alphas_cumprod", t, x0.ndim) * x0
        + schedule.extract("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * noise
    )


def predict_x0(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Invert eq. 4: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    return (
        schedule.extract("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t
        - schedule.extract("sqrt_recipm1_alphas_cumprod", t, x_t.ndim) * eps
    )


def predict_eps(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Eq. 4 solved for eps: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
    return (x_t - schedule.extract("sqrt_alphas_cumprod", t, x_t.ndim) * x0) / schedule.extract(
        "sqrt_one_minus_alphas_cumprod", t, x_t.ndim
    )


def posterior_mean(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """mu_tilde(x_t, x0) of q(x_{t-1} | x_t, x0)  (Ho et al. 2020, eq. 7)."""
    return (
        schedule.extract("posterior_mean_coef1", t, x_t.ndim) * x0
        + schedule.extract("posterior_mean_coef2", t, x_t.ndim) * x_t
    )


def sample_timesteps(
    schedule: NoiseSchedule, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """t uniform over ALL indices 0..T-1 (Algorithm 1; index 0 is the paper's t=1 and must be trained too)."""
    return torch.randint(0, len(schedule), (batch_size,), device=device, generator=generator)


@dataclass
class TrainingDraws:
    """The random inputs of one training batch: timestep indices, noise, and which labels are dropped.

    Drawn for a whole (global) batch and sliced per rank / micro-batch, so that distributed and accumulated
    training see exactly the numbers a single process with the same global batch would.
    """

    t: torch.Tensor  # int64 [N]
    noise: torch.Tensor  # [N, C, H, W]
    drop: torch.Tensor  # bool [N]: this sample's label becomes the null class (Ho & Salimans 2022, Alg. 1), drawn
    # per sample, not per batch, so every batch trains both the conditional and the unconditional model

    def __getitem__(self, index: slice) -> "TrainingDraws":
        return TrainingDraws(self.t[index], self.noise[index], self.drop[index])


def draw_training_inputs(
    schedule: NoiseSchedule, shape: tuple[int, ...], p_uncond: float = 0.0,
    generator: torch.Generator | None = None, device: torch.device | str | None = None,
) -> TrainingDraws:
    device = device if device is not None else schedule.betas.device
    t = sample_timesteps(schedule, shape[0], device, generator)
    noise = torch.randn(shape, device=device, generator=generator)
    drop = torch.rand(shape[0], device=device, generator=generator) < p_uncond
    return TrainingDraws(t, noise, drop)


def snr(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """SNR_t = abar_t / (1 - abar_t) (Kingma et al. 2021), from the float32 tables."""
    abar = schedule.alphas_cumprod.gather(0, t)
    return abar / (1 - abar)


def min_snr_weight(schedule: NoiseSchedule, t: torch.Tensor, gamma: float, prediction: str = "eps") -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, eq. 7 and its table of targets), per sample.

    The x0 loss weighted by min(SNR, gamma) equals the eps loss weighted by min(SNR, gamma)/SNR and the v loss
    weighted by min(SNR, gamma)/(SNR + 1), since ||eps - eps'||^2 = SNR ||x0 - x0'||^2 and
    ||v - v'||^2 = (SNR + 1) ||x0 - x0'||^2 at fixed x_t."""
    s = snr(schedule, t)
    clipped = s.clamp(max=gamma)
    return clipped / s if prediction == "eps" else clipped / (s + 1)


def prediction_target(
    schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, prediction: str
) -> torch.Tensor:
    """What the network is trained to output: eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)."""
    if prediction == "eps":
        return noise
    return (schedule.extract("sqrt_alphas_cumprod", t, x0.ndim) * noise
            - schedule.extract("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * x0)


def training_losses(
    model: Callable[..., torch.Tensor],
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    p_uncond: float = 0.1,
    generator: torch.Generator | None = None,
    draws: TrainingDraws | None = None,
    null_class: int | None = None,
    prediction: str = "eps",
    snr_gamma: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample MSE between the network's output and its target (Ho et al. 2020, eq. 14 for eps), and the t used.

    `model(x_t, t, y)` is the UNet; for a conditional model `labels` are given and replaced by its null class
    (`null_class`, default `model.null_class`) per sample with probability `p_uncond`. The random inputs come
    from `draws` when given, else are drawn from `generator`. `prediction` is "eps" or "v"; `snr_gamma` turns
    on min-SNR-gamma weighting. Returns (loss per sample [N], t [N]).
    """
    if draws is None:
        draws = draw_training_inputs(schedule, tuple(x0.shape), p_uncond, generator, x0.device)
    noise = draws.noise.to(x0.dtype)
    x_t = q_sample(schedule, x0, draws.t, noise)
    if labels is not None:
        null = model.null_class if null_class is None else null_class
        labels = torch.where(draws.drop, torch.full_like(labels, null), labels)
    output = model(x_t, draws.t, labels)
    target = prediction_target(schedule, x0, draws.t, noise, prediction)
    per_sample = F.mse_loss(output.float(), target.float(), reduction="none").flatten(1).mean(1)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weight(schedule, draws.t, snr_gamma, prediction)
    return per_sample, draws.t


def training_loss(model, schedule, x0, labels=None, *, p_uncond: float = 0.1, generator=None) -> torch.Tensor:
    """The mean of `training_losses`: the scalar to backpropagate."""
    return training_losses(model, schedule, x0, labels, p_uncond=p_uncond, generator=generator)[0].mean()


def eps_from_output(
    schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor, prediction: str = "eps"
) -> torch.Tensor:
    """The network's output as an eps prediction, whatever it was trained to predict.

    v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, sec. 4) and x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
    give eps = sqrt(abar) v + sqrt(1 - abar) x_t. The map is affine in the output with x_t fixed, so guidance
    combines v predictions and eps predictions alike.
    """
    if prediction == "eps":
        return output
    if prediction == "v":
        return (schedule.extract("sqrt_alphas_cumprod", t, x_t.ndim) * output
                + schedule.extract("sqrt_one_minus_alphas_cumprod", t, x_t.ndim) * x_t)
    raise ValueError(f"prediction must be 'eps' or 'v', not {prediction!r}")


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    schedule,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> float:
    """Mean eps-prediction MSE (for a v model: of the eps its v implies, so runs compare in one unit) on fixed
    images, with fixed noise and timesteps: comparable across training steps.

    The noise and the timesteps come from a CPU generator seeded by `seed`, so they are the same at every call
    and on every device; the timesteps are spread evenly over 0..T-1 (then shuffled across images), which
    gives a lower-variance estimate of the average over t than independent draws. Labels are used as given,
    never dropped: for a conditional model this is the conditional objective (pass
    `torch.full_like(labels, model.null_class)` for the unconditional one). The model is run in eval mode and
    left in the mode it was in; the global RNG is not touched.
    """
    n = len(images)
    if n < 1:
        raise ValueError("validation_loss needs at least one image")
    if (labels is None) != (getattr(model, "null_class", None) is None):
        raise ValueError("validation_loss: give labels for a class-conditional model and none for an unconditional one")
    generator = torch.Generator().manual_seed(seed)
    timesteps = (torch.arange(n) * len(schedule) // n)[torch.randperm(n, generator=generator)]
    noise = torch.randn(images.shape, generator=generator)
    device = next(model.parameters()).device
    total = 0.0
    with eval_mode(model):
        for start in range(0, n, batch_size):
            part = slice(start, start + batch_size)
            x0, eps, t = images[part].to(device), noise[part].to(device), timesteps[part].to(device)
            y = labels[part].to(device) if labels is not None else None
            x_t = q_sample(schedule, x0, t, eps)
            predicted = eps_from_output(schedule, x_t, t, model(x_t, t, y), schedule.prediction)
            total += F.mse_loss(predicted.float(), eps.float(), reduction="sum").item() / eps[0].numel()
    return total / n
