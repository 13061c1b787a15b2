"""The forward process q(x_t | x_0), the eps <-> x0 conversions and the training objective (Ho et al. 2020)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

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


def drop_labels(
    labels: torch.Tensor, null_class: int, p_uncond: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label by the null class independently with probability p_uncond (Ho & Salimans 2022, Alg. 1).

    Per sample, not per batch: every batch then trains both the conditional and the unconditional model.
    """
    if p_uncond <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device, generator=generator) < p_uncond
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def training_losses(
    model: Callable[..., torch.Tensor],
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    p_uncond: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample eps-prediction MSE || eps - eps_theta(x_t, t[, y]) ||^2 (Ho et al. 2020, eq. 14) and the t used.

    `model(x_t, t, y)` is the UNet; for a conditional model `labels` are given and dropped to the model's
    `null_class` per sample with probability `p_uncond`. Returns (loss per sample [N], t [N]).
    """
    n = x0.shape[0]
    t = sample_timesteps(schedule, n, x0.device, generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t = q_sample(schedule, x0, t, noise)
    if labels is not None:
        labels = drop_labels(labels, model.null_class, p_uncond, generator)
    eps = model(x_t, t, labels)
    per_sample = F.mse_loss(eps.float(), noise.float(), reduction="none").flatten(1).mean(1)
    return per_sample, t


def training_loss(model, schedule, x0, labels=None, *, p_uncond: float = 0.1, generator=None) -> torch.Tensor:
    """The mean of `training_losses`: the scalar to backpropagate."""
    return training_losses(model, schedule, x0, labels, p_uncond=p_uncond, generator=generator)[0].mean()
