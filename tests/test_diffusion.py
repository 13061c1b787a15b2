import numpy as np
import pytest
import torch

from ddpm import (
    DiffusionConfig,
    NoiseSchedule,
    draw_training_inputs,
    posterior_mean,
    predict_eps,
    predict_x0,
    q_sample,
    training_losses,
)
from ddpm.diffusion import sample_timesteps


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_config(DiffusionConfig())


def test_q_sample_moments_match_closed_form_by_monte_carlo(schedule):
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.7)
    for index in (0, 250, 999):
        t = torch.full((n,), index)
        x_t = q_sample(schedule, x0, t, torch.randn(x0.shape, generator=gen))
        abar = np.prod(1 - np.linspace(1e-4, 0.02, 1000)[: index + 1])
        se = np.sqrt((1 - abar) / n)
        assert abs(x_t.mean().item() - np.sqrt(abar) * 0.7) < 5 * se
        assert x_t.var().item() == pytest.approx(1 - abar, rel=0.02)


def test_q_sample_is_batched_over_t(schedule):
    x0 = torch.ones(2, 1, 2, 2)
    noise = torch.zeros_like(x0)
    out = q_sample(schedule, x0, torch.tensor([0, 999]), noise)
    assert out[0].mean().item() == pytest.approx(schedule.sqrt_alphas_cumprod[0].item())
    assert out[1].mean().item() == pytest.approx(schedule.sqrt_alphas_cumprod[999].item())


def test_predictions_invert_the_forward_process(schedule):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 4, 4, generator=gen) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 10, 500, 990])
    x_t = q_sample(schedule, x0, t, eps)
    torch.testing.assert_close(predict_x0(schedule, x_t, t, eps), x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(predict_eps(schedule, x_t, t, x0), eps, atol=1e-3, rtol=1e-3)


def test_posterior_mean_identity(schedule):
    """mu_tilde(x_t, x0(x_t, eps)) = 1/sqrt(a_t) (x_t - beta_t/sqrt(1-abar_t) eps)  (Ho et al. eq. 7 + 11), in
    float64."""
    s64 = NoiseSchedule.from_config(DiffusionConfig()).to(torch.float64)  # a copy: the module fixture stays float32
    gen = torch.Generator().manual_seed(2)
    x_t = torch.randn(5, 1, 3, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(x_t.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 2, 100, 500, 999])
    mean = posterior_mean(s64, predict_x0(s64, x_t, t, eps), x_t, t)
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    for i, index in enumerate(t.tolist()):
        eps_coefficient = betas[index] / np.sqrt(1 - abar[index])
        expected = (x_t[i].numpy() - eps_coefficient * eps[i].numpy()) / np.sqrt(1 - betas[index])
        np.testing.assert_allclose(mean[i].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_timesteps_cover_every_index_uniformly(schedule):
    t = sample_timesteps(schedule, 400_000, "cpu", torch.Generator().manual_seed(3))
    counts = torch.bincount(t, minlength=1000)
    assert counts.numel() == 1000 and counts.min() > 0  # index 0 (the paper's t=1) and 999 are trained
    assert counts[0] > 0 and counts[999] > 0
    chi2 = (((counts - 400.0) ** 2) / 400.0).sum().item()
    assert chi2 < 1000 + 5 * np.sqrt(2 * 1000)


class Oracle(torch.nn.Module):
    """Knows x0, so it returns the exact noise; records the labels it was given."""

    null_class = 10

    def __init__(self, schedule, x0):
        super().__init__()
        self.schedule, self.x0, self.seen = schedule, x0, []

    def forward(self, x_t, t, y=None):
        self.seen.append(y)
        return predict_eps(self.schedule, x_t, t, self.x0)


def test_training_loss_is_zero_for_the_true_noise_and_one_for_zero(schedule):
    gen = torch.Generator().manual_seed(5)
    x0 = torch.rand(256, 1, 4, 4, generator=gen) * 2 - 1
    oracle = Oracle(schedule, x0)
    labels = torch.randint(0, 10, (256,), generator=gen)
    loss, t = training_losses(oracle, schedule, x0, labels, p_uncond=0.5, generator=gen)
    assert loss.shape == (256,) and t.shape == (256,)
    assert loss.max().item() < 1e-3
    assert (oracle.seen[-1] == 10).float().mean().item() == pytest.approx(0.5, abs=0.1)

    class Zero(Oracle):
        def forward(self, x_t, t, y=None):
            return torch.zeros_like(x_t)

    loss, _ = training_losses(Zero(schedule, x0), schedule, x0, generator=gen)
    assert loss.mean().item() == pytest.approx(1.0, abs=0.05)  # E[eps^2] = 1


def test_training_drops_each_label_to_the_null_class_at_the_requested_rate(schedule):
    """The path training takes (draws -> training_losses): rate 0.1, not 0.9 (a flipped comparison), per sample."""
    gen = torch.Generator().manual_seed(4)
    batches, size = 500, 64
    x0 = torch.zeros(size, 1, 2, 2)
    oracle = Oracle(schedule, x0)
    labels = torch.randint(0, 10, (size,), generator=gen)
    for _ in range(batches):
        draws = draw_training_inputs(schedule, tuple(x0.shape), 0.1, gen)
        training_losses(oracle, schedule, x0, labels, draws=draws)
        seen = oracle.seen[-1]
        assert torch.equal(seen == 10, draws.drop) and torch.equal(seen[~draws.drop], labels[~draws.drop])
    is_null = torch.stack(oracle.seen) == 10
    assert is_null.float().mean().item() == pytest.approx(0.1, abs=0.006)  # 32,000 draws: 3.5 standard errors
    per_batch = is_null.sum(1)
    assert per_batch.max() < size and per_batch.float().std() > 1  # per sample: counts vary, never the whole batch
    draws = draw_training_inputs(schedule, tuple(x0.shape), 0.0, gen)
    assert not draws.drop.any()
