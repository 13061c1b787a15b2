import numpy as np
import pytest
import torch

from ddpm import DiffusionConfig, NoiseSchedule, UNet, ddim_sample, ddpm_sample, predict_eps
from ddpm.samplers import ddim_timesteps


def small_schedule(T=20):
    return NoiseSchedule.from_config(DiffusionConfig(timesteps=T, beta_start=1e-4, beta_end=0.2))


def test_first_ddpm_step_is_the_papers_update_written_out():
    T = 20
    schedule = small_schedule(T)
    shape = (3, 1, 4, 4)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    known_eps = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    steps = []
    ddpm_sample(lambda x, t: known_eps, schedule, shape, x_T=x_T, generator=torch.Generator().manual_seed(7),
                callback=lambda i, index, x, x0: steps.append((index, x.clone())))
    z = torch.randn(shape, generator=torch.Generator().manual_seed(7)).double()  # the first draw inside the loop
    betas = np.linspace(1e-4, 0.2, T)
    a, abar = 1 - betas[-1], np.prod(1 - betas)
    expected = 1 / np.sqrt(a) * (x_T.double() - (1 - a) / np.sqrt(1 - abar) * known_eps.double()) + np.sqrt(betas[-1]) * z
    assert steps[0][0] == T - 1
    torch.testing.assert_close(steps[0][1].double(), expected, atol=1e-5, rtol=1e-5)
    assert [index for index, _ in steps] == list(range(T - 1, -1, -1))  # all T steps, index 0 last


def test_last_ddpm_step_adds_no_noise_and_beta_tilde_variant():
    T = 20
    schedule = small_schedule(T)
    shape = (2, 1, 3, 3)
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    for variance in ("beta", "beta_tilde"):
        xs = []
        ddpm_sample(lambda x, t: eps, schedule, shape, generator=torch.Generator().manual_seed(3), variance=variance,
                    callback=lambda i, index, x, x0: xs.append(x.clone()))
        a0 = 1 - 1e-4
        expected_last = (xs[-2] - (1 - a0) / np.sqrt(1 - a0) * eps) / np.sqrt(a0)
        torch.testing.assert_close(xs[-1], expected_last, atol=1e-5, rtol=1e-5)
    # beta_tilde draws smaller noise than beta on the same z: the two runs differ
    a = ddpm_sample(lambda x, t: eps, schedule, shape, generator=torch.Generator().manual_seed(3))
    b = ddpm_sample(lambda x, t: eps, schedule, shape, generator=torch.Generator().manual_seed(3), variance="beta_tilde")
    assert not torch.allclose(a, b)


def oracle_for(schedule, point):
    """The ideal denoiser of a dataset holding one point: eps = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t)."""
    return lambda x, t: predict_eps(schedule, x, t, point.expand_as(x))


def test_ddim_eta0_and_ddpm_recover_a_single_point_dataset():
    schedule = NoiseSchedule.from_config(DiffusionConfig())
    point = torch.tensor([0.5, -0.25, 0.9, -1.0]).view(1, 1, 2, 2)
    gen = torch.Generator().manual_seed(4)
    out = ddim_sample(oracle_for(schedule, point), schedule, (6, 1, 2, 2), steps=10, eta=0.0, generator=gen)
    torch.testing.assert_close(out, point.expand(6, -1, -1, -1), atol=1e-4, rtol=0)
    out = ddim_sample(oracle_for(schedule, point), schedule, (6, 1, 2, 2), steps=10, eta=1.0, generator=gen)
    torch.testing.assert_close(out, point.expand(6, -1, -1, -1), atol=1e-3, rtol=0)
    out = ddpm_sample(oracle_for(schedule, point), schedule, (6, 1, 2, 2), generator=gen)
    torch.testing.assert_close(out, point.expand(6, -1, -1, -1), atol=1e-3, rtol=0)


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    schedule = small_schedule()
    x_T = torch.randn(2, 1, 3, 3)
    den = lambda x, t: 0.1 * x
    a = ddim_sample(den, schedule, x_T.shape, x_T=x_T, steps=5, generator=torch.Generator().manual_seed(0))
    b = ddim_sample(den, schedule, x_T.shape, x_T=x_T, steps=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    c = ddim_sample(den, schedule, x_T.shape, x_T=x_T, steps=5, eta=1.0, generator=torch.Generator().manual_seed(0))
    d = ddim_sample(den, schedule, x_T.shape, x_T=x_T, steps=5, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(c, d)


def test_ddim_timesteps():
    seq = ddim_timesteps(1000, 50)
    assert len(seq) == 50 and seq[0] == 999 and seq[-1] == 0
    assert all(a > b for a, b in zip(seq, seq[1:]))
    assert ddim_timesteps(10, 10) == list(range(9, -1, -1))
    with pytest.raises(ValueError):
        ddim_timesteps(10, 11)


def test_same_seed_same_images_different_seed_different(tiny_config):
    torch.manual_seed(0)
    model = UNet(tiny_config()).eval()
    schedule = small_schedule(10)
    den = lambda x, t: model(x, t)
    run = lambda seed, fn, **kw: fn(den, schedule, (2, 1, 8, 8), generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(run(5, ddpm_sample), run(5, ddpm_sample))
    assert not torch.equal(run(5, ddpm_sample), run(6, ddpm_sample))
    assert torch.equal(run(5, ddim_sample, steps=4), run(5, ddim_sample, steps=4))
    assert not torch.equal(run(5, ddim_sample, steps=4), run(6, ddim_sample, steps=4))


def test_clip_x0_keeps_predictions_in_range():
    schedule = small_schedule()
    seen = []
    ddpm_sample(lambda x, t: -3 * torch.ones_like(x), schedule, (1, 1, 2, 2), clip_x0=True,
                generator=torch.Generator().manual_seed(0), callback=lambda i, index, x, x0: seen.append(x0.abs().max().item()))
    assert max(seen) <= 1.0
    assert len(seen) == 20
