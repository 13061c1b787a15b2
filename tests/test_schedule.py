import math

import numpy as np
import pytest
import torch

from ddpm import DiffusionConfig, NoiseSchedule


def reference_tables(T=1000, b0=1e-4, b1=0.02):
    """The tables of Ho et al. 2020 recomputed independently in float64 numpy, one loop, no vector tricks."""
    betas = np.array([b0 + (b1 - b0) * i / (T - 1) for i in range(T)], dtype=np.float64)
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        abar.append(prod)
    abar = np.array(abar)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    return {
        "betas": betas,
        "alphas": 1 - betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": np.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - abar),
        "sqrt_recip_alphas": 1 / np.sqrt(1 - betas),
        "eps_coef": (1 - (1 - betas)) / np.sqrt(1 - abar),
        "posterior_variance": betas * (1 - abar_prev) / (1 - abar),
        "posterior_mean_coef1": np.sqrt(abar_prev) * betas / (1 - abar),
        "posterior_mean_coef2": np.sqrt(1 - betas) * (1 - abar_prev) / (1 - abar),
    }


def test_linear_tables_match_float64_recomputation():
    schedule = NoiseSchedule.from_config(DiffusionConfig())
    assert len(schedule) == 1000
    for name, expected in reference_tables().items():
        got = getattr(schedule, name)
        assert got.dtype == torch.float32, name
        np.testing.assert_allclose(got.double().numpy(), expected, rtol=2e-6, atol=1e-12, err_msg=name)
    assert schedule.betas[0].item() == pytest.approx(1e-4) and schedule.betas[-1].item() == pytest.approx(0.02)
    # index 0 is the paper's t=1: its posterior variance is exactly 0 (x_0 is then determined)
    assert schedule.posterior_variance[0].item() == 0.0


def test_cosine_schedule_follows_its_closed_form():
    T, s = 1000, 0.008
    schedule = NoiseSchedule.from_config(DiffusionConfig(beta_schedule="cosine"))
    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for i in (0, 10, 500, 900):  # where beta is not clipped, abar_t = f(t)/f(0) with t = i + 1
        assert schedule.alphas_cumprod[i].item() == pytest.approx(f(i + 1) / f(0), rel=1e-5)
    assert schedule.betas.max().item() == pytest.approx(0.999)  # clipped, as in the paper


def test_tables_follow_to_and_extract_broadcasts():
    schedule = NoiseSchedule.from_config(DiffusionConfig(timesteps=10)).to(torch.float64)
    assert schedule.betas.dtype == torch.float64  # buffers follow .to(), as they follow .to(device)
    t = torch.tensor([0, 9, 3])
    out = schedule.extract("alphas_cumprod", t, ndim=4)
    assert out.shape == (3, 1, 1, 1)
    assert torch.equal(out.flatten(), schedule.alphas_cumprod[t])
    assert "betas" not in schedule.state_dict()  # rebuilt from config, never saved as weights


def test_bad_betas_rejected():
    with pytest.raises(ValueError):
        NoiseSchedule(torch.tensor([0.1, 1.5]))
    from ddpm.config import ConfigError

    with pytest.raises(ConfigError, match="beta_schedule"):
        DiffusionConfig(beta_schedule="quadratic")


@pytest.mark.parametrize("T", [100, 200, 1000, 4000])
def test_linear_betas_scale_with_T_so_x_T_is_pure_noise(T):
    """Unscaled 1e-4..0.02 over T=200 ends at abar_T ~ 0.13: sampling from N(0, I) would start off-distribution."""
    schedule = NoiseSchedule.from_config(DiffusionConfig(timesteps=T))
    abar_T = float(np.prod(1 - np.array([1e-4 * 1000 / T + (0.02 - 1e-4) * 1000 / T * i / (T - 1) for i in range(T)])))
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(abar_T, rel=1e-4)
    assert schedule.alphas_cumprod[-1].item() < 1e-3
    np.testing.assert_allclose(schedule.betas[[0, -1]].double().numpy(), [1e-4 * 1000 / T, 0.02 * 1000 / T], rtol=1e-6)
