"""DPM-Solver++(2M): every step against the paper's update written out in float64, a whole run against diffusers,
the exact ODE path of a one-point dataset, and the two timestep spacings."""
import numpy as np
import pytest
import torch

from ddpm import NoiseSchedule, SamplingConfig, predict_eps
from ddpm.samplers import dpmpp_2m_sample, dpmpp_2m_timesteps, run_sampler
from sampler_oracles import Recorder, process_by_hand

T = 1000
BETAS = np.linspace(1e-4, 0.02, T)  # Ho et al.'s linear schedule, written out (independent of linear_betas)
ABAR = np.cumprod(1 - BETAS)


def schedule():
    return NoiseSchedule(torch.from_numpy(BETAS))


def linear_denoiser(x, t):
    """A fixed, deliberately imperfect eps model, affine in x and t: its x0 predictions leave [-1, 1] at high noise."""
    pattern = torch.linspace(-1, 1, x[0].numel(), dtype=x.dtype).view(x.shape[1:])
    return 0.7 * x + 0.4 * (t.to(x.dtype) / T).view(-1, 1, 1, 1) * pattern


@pytest.mark.parametrize("clip, percentile", [(False, None), (True, None), (False, 0.9)])
def test_every_step_is_the_papers_update_written_out(clip, percentile):
    """Catches: a wrong coefficient in the 2M update (r, h, e^{-h} - 1, sigma ratio), a second-order first or last
    step, a wrong final step, x0 processing skipped or applied after the update, wrong trailing indices."""
    steps = 10
    record, states = Recorder(linear_denoiser), []
    x_T = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    out = dpmpp_2m_sample(record, schedule(), x_T.shape, steps=steps, x_T=x_T, clip_x0=clip,
                          dynamic_threshold=percentile,
                          callback=lambda i, index, x, x0: states.append(x.double().numpy()))
    assert [index for _, index, _ in record.calls] == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]

    alpha, sigma = np.sqrt(ABAR), np.sqrt(1 - ABAR)
    lam = np.log(alpha) - np.log(sigma)  # lambda = log(alpha / sigma)
    x0_prev = h_prev = None
    for i, (x_s, s, eps) in enumerate(record.calls):
        x0 = process_by_hand((x_s - sigma[s] * eps) / alpha[s], clip, percentile)
        if i == steps - 1:  # to sigma = 0: first order, x = x0 exactly
            expected = x0
        else:
            t = record.calls[i + 1][1]
            h = lam[t] - lam[s]
            if i == 0:  # DPM-Solver++(1), i.e. DDIM (Lu et al. 2022, eq. 4.5 with D = x0)
                D = x0
            else:  # Algorithm 2: r = h_{i-1}/h_i, D = (1 + 1/(2r)) x0_{i-1} - 1/(2r) x0_{i-2}
                r = h_prev / h
                D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
            expected = sigma[t] / sigma[s] * x_s - alpha[t] * (np.exp(-h) - 1) * D
            x0_prev, h_prev = x0, h
        np.testing.assert_allclose(states[i], expected, rtol=1e-5, atol=1e-5, err_msg=f"step {i}")
    np.testing.assert_allclose(out.double().numpy(), states[-1])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers on numpy 2
@pytest.mark.parametrize("steps", [10, 4])
def test_whole_run_matches_diffusers(steps):
    """Catches any difference from diffusers' DPMSolverMultistepScheduler in timesteps, orders per step (first step,
    lower_order_final), the update or the final step to sigma = 0."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers (the dev extra) is needed for the cross-check")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=BETAS, algorithm_type="dpmsolver++", solver_order=2,
        timestep_spacing="trailing", lower_order_final=True, final_sigmas_type="zero", prediction_type="epsilon",
    )
    scheduler.set_timesteps(steps)
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    x, theirs_t = x_T.clone(), []
    for t in scheduler.timesteps:
        theirs_t.append(int(t))
        x = scheduler.step(linear_denoiser(x, torch.full((3,), int(t))), t, x).prev_sample
    ours_t = []
    ours = dpmpp_2m_sample(linear_denoiser, schedule(), x_T.shape, steps=steps, x_T=x_T,
                           callback=lambda i, index, x, x0: ours_t.append(index))
    assert ours_t == theirs_t
    # measured: max difference ~2e-6 on |x| ~ 7, float32 rounding (diffusers keeps abar and sigmas in float32,
    # we use float64 coefficients)
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spacing", ["trailing", "logsnr"])
def test_one_point_dataset_follows_the_exact_ode_path(spacing):
    """For data = {p} the exact eps is constant along the ODE path, x_t = alpha_t p + sigma_t e, and DPM-Solver++
    is exact on it: every state is on that path and the last one is p. Catches wrong first-order coefficients,
    a wrong x0 conversion, a final step that does not land on sigma = 0."""
    sched = schedule()
    point = torch.tensor([0.5, -0.25, 0.9, -1.0]).view(1, 1, 2, 2)
    def oracle(x, t):
        return predict_eps(sched, x, t, point.expand_as(x))
    x_T = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    states = []
    out = dpmpp_2m_sample(oracle, sched, x_T.shape, steps=10, spacing=spacing, x_T=x_T,
                          callback=lambda i, index, x, x0: states.append((index, x.double())))
    p, first = point.double(), states[0][0]
    e = (x_T.double() - np.sqrt(ABAR[first]) * p) / np.sqrt(1 - ABAR[first])
    for (_, x), (next_index, _) in zip(states, states[1:]):
        on_path = np.sqrt(ABAR[next_index]) * p + np.sqrt(1 - ABAR[next_index]) * e
        torch.testing.assert_close(x, on_path, atol=1e-4, rtol=0)
    torch.testing.assert_close(out, point.expand_as(out), atol=1e-4, rtol=0)


def test_logsnr_spacing_is_nearest_to_uniform_lambda():
    """Catches: targets not uniform in lambda, the wrong end first, a nearest-index search off by one."""
    lam = 0.5 * (np.log(ABAR) - np.log1p(-ABAR))
    targets = np.linspace(lam[-1], lam[0], 10)
    expected = [int(np.argmin(np.abs(lam - v))) for v in targets]
    assert len(set(expected)) == 10  # no collisions at this size: the pure nearest-index rule
    assert dpmpp_2m_timesteps(schedule(), 10, "logsnr") == expected
    assert expected[0] == T - 1 and expected[-1] == 0


def test_logsnr_spacing_keeps_distinct_indices_when_crowded():
    """A short, steep schedule puts several lambda targets nearest to the same index near the ends.
    Catches duplicates (a repeated index gives h = 0 and r = 0/0) and lost steps."""
    sched = NoiseSchedule(torch.linspace(1e-3, 0.3, 20, dtype=torch.float64))
    for steps in (1, 5, 18, 20):
        seq = dpmpp_2m_timesteps(sched, steps, "logsnr")
        assert len(seq) == steps and seq[0] == 19
        assert all(a > b for a, b in zip(seq, seq[1:])) and seq[-1] >= 0
    assert dpmpp_2m_timesteps(sched, 20, "logsnr") == list(range(19, -1, -1))


def test_trailing_spacing_matches_its_formula_and_bad_settings_fail():
    sched = NoiseSchedule(torch.linspace(1e-3, 0.3, 20, dtype=torch.float64))
    assert dpmpp_2m_timesteps(sched, 3) == [19, 12, 6]  # round(20 * (3, 2, 1) / 3) - 1
    assert dpmpp_2m_timesteps(sched, 20) == list(range(19, -1, -1))
    with pytest.raises(ValueError, match="steps"):
        dpmpp_2m_timesteps(sched, 21)
    with pytest.raises(ValueError, match="spacing"):
        dpmpp_2m_timesteps(sched, 5, "karras")


def test_run_sampler_passes_every_option_to_dpmpp2m():
    """Catches run_sampler dropping steps, spacing, clip_x0 or dynamic_threshold on the way to the sampler."""
    sched, shape = schedule(), (2, 1, 3, 3)
    config = SamplingConfig(sampler="dpmpp2m", steps=6, spacing="logsnr", dynamic_threshold=0.8, clip_x0=True)
    seen = []
    out = run_sampler(linear_denoiser, sched, shape, config, generator=torch.Generator().manual_seed(4),
                      callback=lambda i, index, x, x0: seen.append(index))
    assert seen == dpmpp_2m_timesteps(sched, 6, "logsnr")
    direct = dpmpp_2m_sample(linear_denoiser, sched, shape, steps=6, spacing="logsnr", dynamic_threshold=0.8,
                             clip_x0=True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(out, direct)
    plain = dpmpp_2m_sample(linear_denoiser, sched, shape, steps=6, spacing="logsnr",
                            generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(out, plain)  # the options matter for this denoiser, so dropping one is seen
