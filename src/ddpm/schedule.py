"""Noise schedules and every table derived from them (Ho et al. 2020, section 2 and 3.2).

All tables are computed once in float64 and stored as float32 buffers, so they follow `.to(device)` and the
samplers never recompute them inside their loops.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import DiffusionConfig


def linear_betas(
    timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02, max_beta: float = 0.999
) -> torch.Tensor:
    """beta_1..beta_T spaced linearly (Ho et al. 2020, section 4), float64.

    `beta_start` and `beta_end` are the values for T = 1000; other T scale both by 1000/T (as improved-diffusion
    does), which keeps abar_T = prod(1 - beta) near exp(-sum beta) ~ 4e-5 at every T. Unscaled, T = 200 would end
    at abar_T ~ 0.13: sampling would start from pure noise while training never saw x_T that noisy."""
    scale = 1000 / timesteps
    betas = torch.linspace(beta_start * scale, beta_end * scale, timesteps, dtype=torch.float64)
    return betas.clamp(max=max_beta)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), betas clipped at 0.999."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - abar[1:] / abar[:-1]
    return betas.clamp(max=max_beta)


class NoiseSchedule(nn.Module):
    """The tables of a DDPM forward process, indexed by timestep index 0..T-1 (index i is the paper's t=i+1).

    Buffers (float32, shape [T]):
      betas, alphas = 1 - beta, alphas_cumprod = abar_t, alphas_cumprod_prev = abar_{t-1} (abar_0 = 1),
      sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, sqrt_recip_alphas = 1/sqrt(a_t),
      eps_coef = (1 - a_t)/sqrt(1 - abar_t)                          (the eps factor of Algorithm 2),
      sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod        (x0 = these . [x_t, eps], eq. 4 inverted),
      posterior_variance = beta_tilde_t = (1-abar_{t-1})/(1-abar_t) beta_t              (eq. 7),
      posterior_log_variance_clipped (beta_tilde_0 = 0, so index 0 borrows index 1's value),
      posterior_mean_coef1 = sqrt(abar_{t-1}) beta_t/(1-abar_t),
      posterior_mean_coef2 = sqrt(a_t)(1-abar_{t-1})/(1-abar_t)                       (eq. 7, mu_tilde)
    """

    def __init__(self, betas: torch.Tensor, prediction: str = "eps"):
        super().__init__()
        # What the network paired with this schedule outputs ("eps" or "v"): samplers, guidance and the
        # validation loss read the output through it (diffusion.eps_from_output), so it travels with the tables.
        self.prediction = prediction
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D tensor with every value in (0, 1)")
        self.timesteps = betas.numel()
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        tables = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
            "sqrt_recip_alphas": alphas.rsqrt(),
            "eps_coef": betas / (1.0 - abar).sqrt(),
            "sqrt_recip_alphas_cumprod": abar.rsqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / abar - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": torch.log(
                torch.cat([posterior_variance[1:2], posterior_variance[1:]])
            ),
            "posterior_mean_coef1": abar_prev.sqrt() * betas / (1.0 - abar),
            "posterior_mean_coef2": alphas.sqrt() * (1.0 - abar_prev) / (1.0 - abar),
        }
        for name, table in tables.items():
            # Not persistent: the config rebuilds them exactly; checkpoints hold only learned weights.
            self.register_buffer(name, table.to(torch.float32), persistent=False)
        # The float32 betas as float64 on the host, a plain attribute that `.to(device)` leaves alone: the samplers'
        # float64 coefficients come from it without reading the device (no host sync, so a sampling loop can be
        # captured as a CUDA graph).
        self.betas_host = self.betas.to(torch.float64)

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> "NoiseSchedule":
        if config.beta_schedule == "linear":
            betas = linear_betas(config.timesteps, config.beta_start, config.beta_end)
        else:
            betas = cosine_betas(config.timesteps)
        return cls(betas, config.prediction)

    def __len__(self) -> int:
        return self.timesteps

    def extract(self, name: str, t: torch.Tensor, ndim: int = 4) -> torch.Tensor:
        """Gather table[name] at the int64 indices t, shaped [N, 1, 1, ...] to broadcast over images."""
        table: torch.Tensor = getattr(self, name)
        return table.gather(0, t).reshape(-1, *([1] * (ndim - 1)))
