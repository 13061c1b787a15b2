import numpy as np
import pytest
import torch

from ddpm import DiffusionConfig, NoiseSchedule, UNet, ddim_sample, ddpm_sample, predict_eps
from ddpm.samplers import ddim_timesteps, dynamic_threshold_x0, process_x0
from sampler_oracles import Recorder, process_by_hand

BETAS = np.linspace(1e-4, 0.2, 20)  # a short schedule written out (independent of linear_betas' T-scaling)
ABAR = np.cumprod(1 - BETAS)


def small_schedule(T=20):
    return NoiseSchedule(torch.linspace(1e-4, 0.2, T, dtype=torch.float64))


def affine_denoiser(x, t):
    """A fixed eps 'model' that depends on x and t, so every step's input matters."""
    pattern = torch.linspace(-1, 1, x[0].numel(), dtype=x.dtype).view(x.shape[1:])
    return -1.5 * x + 0.1 * t.to(x.dtype).view(-1, 1, 1, 1) * pattern


def nth_normal_draw(seed, n, shape):
    """The n-th (from 1) standard normal tensor a sampler draws from a generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        z = torch.randn(shape, generator=gen)
    return z.double().numpy()


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
@pytest.mark.parametrize("step", [0, 7])
def test_ddpm_step_is_the_papers_update_written_out(variance, step):
    """Algorithm 2 with sigma^2 = beta_t or beta_tilde_t = (1 - abar_{t-1})/(1 - abar_t) beta_t (eq. 7).
    Catches a wrong mean coefficient, the wrong variance table (or beta_tilde's index shifted), noise drawn out of
    order."""
    shape = (3, 1, 4, 4)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    record, states = Recorder(affine_denoiser), []
    ddpm_sample(record, small_schedule(), shape, x_T=x_T, variance=variance, generator=torch.Generator().manual_seed(7),
                callback=lambda i, index, x, x0: states.append(x.double().numpy()))
    assert [index for _, index, _ in record.calls] == list(range(19, -1, -1))  # all T steps, index 0 last
    x_t, t, eps = record.calls[step]
    beta, a, abar, abar_prev = BETAS[t], 1 - BETAS[t], ABAR[t], ABAR[t - 1]
    var = beta if variance == "beta" else (1 - abar_prev) / (1 - abar) * beta
    z = nth_normal_draw(7, step + 1, shape)  # one draw per step, none before the first (x_T is given)
    expected = 1 / np.sqrt(a) * (x_t - (1 - a) / np.sqrt(1 - abar) * eps) + np.sqrt(var) * z
    np.testing.assert_allclose(states[step], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clip, percentile", [(True, None), (False, 0.8)])
def test_ddpm_with_processed_x0_steps_to_the_posterior_mean_written_out(clip, percentile):
    """x_{t-1} = mu_tilde(x_t, x0') + sqrt(beta_t) z with x0' the processed x0 (eq. 7). Catches the processing
    skipped, or the eps update used with a processed x0 (the pair would no longer agree with x_t)."""
    shape, step = (2, 1, 3, 3), 12
    record, states, x0s = Recorder(affine_denoiser), [], []
    ddpm_sample(record, small_schedule(), shape, x_T=torch.ones(shape), clip_x0=clip, dynamic_threshold=percentile,
                generator=torch.Generator().manual_seed(3),
                callback=lambda i, index, x, x0: (states.append(x.double().numpy()), x0s.append(x0)))
    x_t, t, eps = record.calls[step]
    beta, abar, abar_prev = BETAS[t], ABAR[t], ABAR[t - 1]
    raw_x0 = (x_t - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
    x0 = process_by_hand(raw_x0, clip, percentile)
    assert not np.allclose(x0, raw_x0)  # the processing changes this step, so the branch is exercised
    mean = np.sqrt(abar_prev) * beta / (1 - abar) * x0 + np.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar) * x_t
    expected = mean + np.sqrt(beta) * nth_normal_draw(3, step + 1, shape)
    np.testing.assert_allclose(states[step], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x0s[step].double().numpy(), x0, rtol=1e-5, atol=1e-6)


def test_last_ddpm_step_adds_no_noise():
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


@pytest.mark.parametrize("clip, percentile", [(False, None), (True, None), (False, 0.8)])
def test_ddim_steps_are_eq12_written_out(clip, percentile):
    """Song et al. 2021 eq. 12 with sigma from eq. 16 (eta = 0.7), at an intermediate step (index 10 -> 5, noise
    added), the step into index 0 (abar_0 < 1, noise added) and the last one (index 0 -> x0, no noise); with
    processing, eps is recomputed from the processed x0. Catches a wrong sigma, a wrong sqrt(1 - abar_prev - sigma^2)
    term, the clip or threshold branch not making eps consistent, a last step that does not end at abar = 1, the step
    into index 0 treated as the step to the image (abar 1, or no noise)."""
    shape, eta = (2, 1, 3, 3), 0.7
    x_T = 2 * torch.randn(shape, generator=torch.Generator().manual_seed(5))
    record, states = Recorder(affine_denoiser), []
    ddim_sample(record, small_schedule(), shape, steps=5, eta=eta, x_T=x_T, clip_x0=clip, dynamic_threshold=percentile,
                generator=torch.Generator().manual_seed(6),
                callback=lambda i, index, x, x0: states.append(x.double().numpy()))
    assert [index for _, index, _ in record.calls] == [19, 14, 10, 5, 0]  # round(linspace(19, 0, 5)), ties to even
    for step, prev in ((2, 5), (3, 0), (4, None)):
        x_t, t, eps = record.calls[step]
        abar = ABAR[t]
        abar_prev = ABAR[prev] if prev is not None else 1.0
        raw_x0 = (x_t - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
        x0 = process_by_hand(raw_x0, clip, percentile)
        if clip or percentile is not None:
            assert not np.allclose(x0, raw_x0)  # the branch is exercised
            eps = (x_t - np.sqrt(abar) * x0) / np.sqrt(1 - abar)
        sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)
        expected = np.sqrt(abar_prev) * x0 + np.sqrt(1 - abar_prev - sigma**2) * eps
        if prev is not None:
            expected = expected + sigma * nth_normal_draw(6, step + 1, shape)  # one draw per earlier step
        np.testing.assert_allclose(states[step], expected, rtol=1e-5, atol=1e-5, err_msg=f"step {step}")


def test_dynamic_threshold_by_hand():
    """Imagen's rule on numbers worked out on paper. Catches a missing max(s, 1), the wrong percentile
    interpolation, a threshold shared by the batch instead of per sample, clamping without dividing by s."""
    x0 = torch.tensor([[0.5, -3.0, 2.0, 1.2], [0.4, -0.5, 0.1, 0.0]]).view(2, 1, 2, 2)
    # sample 1: |x0| sorted 0.5, 1.2, 2, 3; the median interpolates 1.2 and 2 -> s = 1.6
    # sample 2: s = 0.45 < 1 -> s = 1, unchanged
    expected = torch.tensor([[0.5 / 1.6, -1.0, 1.0, 1.2 / 1.6], [0.4, -0.5, 0.1, 0.0]]).view(2, 1, 2, 2)
    torch.testing.assert_close(dynamic_threshold_x0(x0, 0.5), expected)
    torch.testing.assert_close(process_x0(x0, clip_x0=True), x0.clamp(-1, 1))
    torch.testing.assert_close(process_x0(x0, clip_x0=True, dynamic_threshold=0.5), expected)
    with pytest.raises(ValueError, match="dynamic_threshold"):
        dynamic_threshold_x0(x0, 1.5)


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
    def den(x, t):
        return 0.1 * x
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
    def den(x, t):
        return model(x, t)
    def run(seed, fn, **kw):
        return fn(den, schedule, (2, 1, 8, 8), generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(run(5, ddpm_sample), run(5, ddpm_sample))
    assert not torch.equal(run(5, ddpm_sample), run(6, ddpm_sample))
    assert torch.equal(run(5, ddim_sample, steps=4), run(5, ddim_sample, steps=4))
    assert not torch.equal(run(5, ddim_sample, steps=4), run(6, ddim_sample, steps=4))


def test_clip_x0_keeps_predictions_in_range():
    schedule = small_schedule()
    seen = []
    ddpm_sample(lambda x, t: -3 * torch.ones_like(x), schedule, (1, 1, 2, 2), clip_x0=True,
                generator=torch.Generator().manual_seed(0),
                callback=lambda i, index, x, x0: seen.append(x0.abs().max().item()))
    assert max(seen) <= 1.0
    assert len(seen) == 20


def test_dynamic_threshold_percentile_is_numpys_linear_percentile():
    """Catches an off-by-one order statistic or a missing interpolation in the sort-based per-sample quantile."""
    x0 = 3 * torch.randn(3, 2, 7, 11, generator=torch.Generator().manual_seed(8))
    for p in (0.5, 0.9, 0.995, 1.0):
        s = np.maximum(np.percentile(x0.abs().flatten(1).double().numpy(), 100 * p, axis=1), 1.0).reshape(-1, 1, 1, 1)
        expected = np.clip(x0.double().numpy(), -s, s) / s
        np.testing.assert_allclose(dynamic_threshold_x0(x0, p).double().numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampling", [
    dict(sampler="dpmpp2m", steps=4, guide_weight=2.5, guidance=1.0),
    dict(sampler="dpmpp2m", steps=4, spacing="logsnr", guidance=3.0, guidance_interval=(0.2, 0.8),
         guidance_rescale=0.5, dynamic_threshold=0.9),
    dict(sampler="ddim", steps=4, guidance=3.0, clip_x0=True),
    dict(sampler="ddim", steps=4, eta=1.0, guidance=3.0, guide_weight=2.0),
    dict(sampler="ddpm", guidance=3.0, guidance_rescale=0.5),
])
def test_a_sampling_loop_never_reads_the_device(sampling, tiny_config):
    # The bug it catches: a host read inside the loop (.item(), .tolist(), .cpu() of a device tensor, a bool() of
    # one). On a GPU each is a sync, and it makes the loop impossible to capture as a CUDA graph. On the meta
    # device any read raises, so the whole loop, guidance and the guide included, must run there.
    from ddpm import SamplingConfig
    from ddpm.guidance import Guide, make_denoiser
    from ddpm.samplers import run_sampler

    torch.manual_seed(0)
    model, guide = (UNet(tiny_config(num_classes=3)).eval().to("meta") for _ in range(2))
    schedule = NoiseSchedule.from_config(DiffusionConfig(timesteps=100)).to("meta")
    config = SamplingConfig(**sampling)
    labels = torch.tensor([0, 1, 2], device="meta")
    with torch.no_grad():
        denoiser = make_denoiser(model, labels, config, schedule=schedule, guide=Guide(guide, DiffusionConfig(
            timesteps=100)))
        x = run_sampler(denoiser, schedule, (3, 1, 8, 8), config, device="meta")
    assert x.device.type == "meta" and x.shape == (3, 1, 8, 8)
