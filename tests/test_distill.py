"""Guided progressive distillation (distill.py): the target, the weighting, the grids, the student's start, one
round's effect, resume, and drawing a student in K calls."""
from __future__ import annotations

import copy
import importlib
import itertools
import json
from fractions import Fraction

import pytest
import torch

from ddpm.config import DiffusionConfig
from ddpm.distill import distill, student_from
from ddpm.distill_target import (
    DistillationObjective,
    alphas_sigmas,
    ddim_step,
    dpmpp_2s_span,
    dpmpp_2s_step,
    nested_grid,
    student_target,
    truncated_snr_weight,
)
from ddpm.errors import DdpmWarning
from ddpm.samplers import student_timesteps
from ddpm.schedule import NoiseSchedule
from ddpm.unet import UNet


def reference_abar(timesteps: int) -> list[float]:
    """abar_t = prod (1 - beta_s) for the linear schedule, recomputed here in float64 from the paper's numbers."""
    betas = torch.linspace(1e-4 * 1000 / timesteps, 0.02 * 1000 / timesteps, timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).tolist()


def teacher_grid(timesteps: int, steps: int) -> list[int]:
    """round(T k / steps) - 1 for k = steps..1 (ties to even), written out independently of samplers.py."""
    return [round(Fraction(timesteps * k, steps)) - 1 for k in range(steps, 0, -1)]


def schedule_of(timesteps: int = 1000) -> NoiseSchedule:
    return NoiseSchedule.from_config(DiffusionConfig(timesteps=timesteps))


def logsnr_grid(timesteps: int, steps: int) -> list[int]:
    """The indices nearest to K log-SNR values uniform from lambda(T-1) towards lambda(0), the image after them,
    written out here from reference_abar (float64, the paper's betas)."""
    abar = torch.tensor(reference_abar(timesteps), dtype=torch.float64)
    lam = 0.5 * torch.log(abar / (1 - abar))
    lo, hi = lam[-1].item(), lam[0].item()
    return [int((lam - (lo + j * (hi - lo) / steps)).abs().argmin()) for j in range(steps)]


@pytest.mark.parametrize("timesteps", [1000, 999, 37])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_the_students_grid_is_every_other_point_of_its_teachers(timesteps, steps):
    # bug caught: a student trained between points its teacher never visits (grids that are not nested), or a
    # position whose two teacher steps are not the two between its own points
    grid = nested_grid(schedule_of(timesteps), steps)
    teacher = teacher_grid(timesteps, 2 * steps) + [-1]
    assert grid.start == teacher_grid(timesteps, steps)
    assert grid.start == teacher[0:-1:2] and grid.middle == teacher[1::2] and grid.end == teacher[2::2]
    assert grid.start[0] == timesteps - 1 and grid.end[-1] == -1


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16])
def test_the_log_snr_grids_are_uniform_in_log_snr_and_nest(steps):
    # bugs caught: targets spaced by (hi - lo) / (K - 1) (dpmpp2m's logsnr grid, which ends at index 0 and does not
    # nest), a grid not starting at T - 1, or the teacher's points not between the student's
    grid = nested_grid(schedule_of(), steps, "logsnr")
    teacher = logsnr_grid(1000, 2 * steps) + [-1]
    assert grid.start == logsnr_grid(1000, steps)
    assert grid.start == teacher[0:-1:2] and grid.middle == teacher[1::2] and grid.end == teacher[2::2]
    assert grid.start[0] == 999 and len(set(teacher)) == len(teacher)
    if steps == 2:
        assert grid.start == [999, 302]  # the 2-call student's middle: t = 0.3 T, where trailing has 499
    with pytest.raises(Exception, match="two steps fall on one index"):
        nested_grid(schedule_of(37), 8, "logsnr")


def test_spacing_auto_is_the_log_snr_grid_where_it_fits_and_else_trailing():
    # bugs caught: "auto" refusing a short schedule (a model of few timesteps could not be distilled without a flag),
    # or a grid named by hand silently replaced
    from ddpm.config import ConfigError
    from ddpm.distill_settings import resolve_spacing

    assert resolve_spacing("auto", 16, schedule_of()) == "logsnr"
    assert resolve_spacing("auto", 16, schedule_of(37)) == "trailing"
    assert resolve_spacing("trailing", 16, schedule_of()) == "trailing"
    with pytest.raises(ConfigError, match="--spacing logsnr --start-steps 16: the log-SNR grid"):
        resolve_spacing("logsnr", 16, schedule_of(37))


@pytest.mark.parametrize("span", [2, 4])
def test_one_student_step_equals_two_or_four_teacher_ddim_steps_in_float64(span):
    # bugs caught: a wrong target formula (a sign, sigma ratio inverted, alpha and sigma swapped, the image step
    # treated as an ordinary index), a span-4 path that skips or repeats a teacher point -- checked by running DDIM
    # written out here, in float64, on a known teacher, along the teacher's grid of span x steps
    timesteps = 1000
    schedule = NoiseSchedule.from_config(DiffusionConfig(timesteps=timesteps))
    reference = torch.tensor(reference_abar(timesteps), dtype=torch.float64)
    # the linear schedule, to float32's precision of its betas
    assert torch.allclose(reference, torch.cumprod(1 - schedule.betas_host, 0), rtol=1e-6)
    # from here on the betas as the library holds them (float32 numbers), the products and the steps in float64
    abar = torch.cumprod(1 - schedule.betas_host, 0).tolist() + [1.0]  # index -1: the image
    alpha, sigma = alphas_sigmas(schedule)
    assert torch.allclose(alpha**2, torch.tensor(abar, dtype=torch.float64), rtol=0, atol=1e-14)
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(timesteps, dtype=torch.float64, generator=g)

    def teacher_eps(z, t):  # any smooth function of (z, t) will do
        return torch.tanh(weights[t] * z) + 0.1 * t / timesteps

    def ddim(z, s, t):  # Song et al. 2021, eq. 12, eta = 0
        eps = teacher_eps(z, s)
        x0 = (z - (1 - abar[s]) ** 0.5 * eps) / abar[s] ** 0.5
        return abar[t] ** 0.5 * x0 + (1 - abar[t]) ** 0.5 * eps

    for steps, spacing in itertools.product((1, 2, 4), ("trailing", "logsnr")):
        grid = nested_grid(schedule, steps, spacing, span)
        teacher_grid = student_timesteps(schedule, span * steps, spacing) + [-1]
        for j, (s, t, path) in enumerate(zip(grid.start, grid.end, grid.path)):
            z_s = torch.randn(3, 4, dtype=torch.float64, generator=g)
            z_t = z_s
            for k in range(span):  # the teacher's span steps, from its own grid
                z_t = ddim(z_t, teacher_grid[span * j + k], teacher_grid[span * j + k + 1])
            # the library's pieces: the teacher's steps along the grid's path, then the target
            assert path[0] == s and path[-1] == t and len(path) == span + 1
            z_t_lib = z_s
            for a, b in zip(path[:-1], path[1:]):
                z_t_lib = ddim_step(z_t_lib, teacher_eps(z_t_lib, a), alpha[a], sigma[a], alpha[b], sigma[b])
            assert torch.allclose(z_t_lib, z_t, rtol=0, atol=1e-12)
            x_target = student_target(z_s, z_t_lib, alpha[s], sigma[s], alpha[t], sigma[t])
            # one DDIM step of the student whose x0 is the target, with the eps that x0 implies at z_s
            eps_student = (z_s - abar[s] ** 0.5 * x_target) / (1 - abar[s]) ** 0.5
            one_step = abar[t] ** 0.5 * x_target + (1 - abar[t]) ** 0.5 * eps_student
            assert torch.allclose(one_step, z_t, rtol=0, atol=1e-9), (steps, s, t)


GAUSSIAN_STD = 0.5  # the data of the closed-form tests below: N(0, c^2)


def gaussian_teacher(calls: list):
    """The ideal teacher of N(0, c^2) data, eps(z, i) = sigma_i z / v_i with v = alpha^2 c^2 + sigma^2, logging its
    calls; its probability-flow ODE keeps z / sqrt(v) fixed: z_t = z_s sqrt(v_t / v_s)."""
    alpha, sigma = alphas_sigmas(NoiseSchedule.from_config(DiffusionConfig()))
    variance = alpha**2 * GAUSSIAN_STD**2 + sigma**2

    def eps(z, index):
        calls.append((index.clone(), z.clone()))
        return sigma[index].view(-1, 1) * z / variance[index].view(-1, 1)

    return eps, alpha, sigma, variance


def errors_from_the_exact_ode(z, s, t, variance, *landed):
    """Each landing's largest error against the exact z_t, over the samples whose step ends in noise (t >= 0)."""
    to_noise = t >= 0
    exact = z[to_noise] * (variance[t[to_noise]] / variance[s[to_noise]]).sqrt().view(-1, 1)
    return [(x[to_noise] - exact).abs().max(dim=1).values for x in landed]


def test_round_ones_dpm_solver_2s_steps_follow_the_exact_ode_of_gaussian_data():
    # bugs caught: a wrong DPM-Solver++(2S) coefficient (r, the 1/(2r) mix, the exp(-h) factor), a midpoint outside
    # the step, the step to the image not being the image's prediction. The ideal teacher of Gaussian data is known
    # in closed form (gaussian_teacher); a second-order step lands far nearer its ODE than DDIM's first order.
    calls = []
    eps, alpha, sigma, variance = gaussian_teacher(calls)
    grid = nested_grid(schedule_of(), 8)  # round 1's teacher steps: start -> middle -> end on the 16-step grid
    for first, second in ((grid.start, grid.middle), (grid.middle, grid.end)):
        s, t = torch.tensor(first), torch.tensor(second)
        z = torch.randn(len(s), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        solved = dpmpp_2s_step(eps, z, s, t, alpha, sigma)
        assert len(calls) == 2
        ddim = ddim_step(z, eps(z, s), alpha[s].view(-1, 1), sigma[s].view(-1, 1), alpha[t].view(-1, 1),
                         sigma[t].view(-1, 1))
        calls.clear()
        error_2s, error_ddim = errors_from_the_exact_ode(z, s, t, variance, solved, ddim)
        assert (error_2s < error_ddim / 5).all(), (error_2s, error_ddim)
        # the step to the image is the image's prediction at s, as DDIM's
        assert torch.allclose(solved[t < 0], ddim[t < 0], rtol=0, atol=1e-12)


def test_the_span_solver_makes_ddims_two_calls_and_lands_nearer_the_exact_ode_of_gaussian_data():
    # bugs caught: a wrong 2S mix (r from the wrong points, the 1/(2r) factor), the second call not at DDIM's z_m
    # (then it is no longer DDIM's cost and calls), the step to the image not DDIM's two steps
    calls = []
    eps, alpha, sigma, variance = gaussian_teacher(calls)
    grid = nested_grid(schedule_of(), 8)  # round 1: the student's step start -> end, the teacher's grid point between
    s, m, t = torch.tensor(grid.start), torch.tensor(grid.middle), torch.tensor(grid.end)
    z = torch.randn(len(s), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    spanned = dpmpp_2s_span(eps, z, s, m, t, alpha, sigma)
    (first_index, first_z), (second_index, second_z) = calls

    def coefficients(index):
        return alpha[index].view(-1, 1), sigma[index].view(-1, 1)

    z_m = ddim_step(z, eps(z, s), *coefficients(s), *coefficients(m))
    ddim = ddim_step(z_m, eps(z_m, m), *coefficients(m), *coefficients(t))
    assert torch.equal(first_index, s) and torch.equal(first_z, z)
    assert torch.equal(second_index, m) and torch.allclose(second_z, z_m, rtol=0, atol=1e-12)
    error_span, error_ddim = errors_from_the_exact_ode(z, s, t, variance, spanned, ddim)
    assert (error_span < error_ddim / 1.5).all(), (error_span, error_ddim)
    assert torch.allclose(spanned[t < 0], ddim[t < 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver, expected", [("dpmpp2s", ["step", "step"]), ("dpmpp2s-span", ["span"]),
                                              ("ddim", [])])
def test_each_teacher_solver_makes_the_objectives_target(solver, expected, monkeypatch):
    # bug caught: a --teacher-solver choice that the objective ignores (DDIM's target under another name)
    target_module = importlib.import_module("ddpm.distill_target")
    used = []
    for name, function in (("step", target_module.dpmpp_2s_step), ("span", target_module.dpmpp_2s_span)):
        monkeypatch.setattr(target_module, f"dpmpp_2s_{name}",
                            lambda *a, _name=name, _function=function, **k: used.append(_name) or _function(*a, **k))
    schedule = NoiseSchedule.from_config(DiffusionConfig())
    teacher = lambda z, t, y, w: 0.1 * z  # noqa: E731
    objective = DistillationObjective(teacher, schedule, steps=8, weight_range=(1.0, 4.0), solver=solver)
    x0 = torch.zeros(4, 1, 4, 4)
    draws = objective.draw(tuple(x0.shape), torch.Generator().manual_seed(0), torch.device("cpu"))
    objective.losses(lambda z, t, y, weight=None: torch.zeros_like(z), x0, None, draws)
    assert used == expected


@pytest.mark.parametrize("steps, final_weight", [(2, 3.0), (2, 9.0), (2, 1.0), (4, 3.0), (8, 3.0)])
def test_a_two_step_students_step_to_the_image_is_drawn_final_weight_times_as_often(steps, final_weight):
    # bugs caught: the extra weight on the first step, the odds inverted (1/W), the weight reaching the 4- and 8-step
    # students (measured: it costs them), a weight of 1 or another student count that changes the uniform draw (old
    # distillations would no longer resume to the same bits), the generator ignored
    schedule = NoiseSchedule.from_config(DiffusionConfig())
    objective = DistillationObjective(None, schedule, steps, None, final_weight=final_weight)
    n = 40_000

    def positions(seed):
        return objective.draw((n, 1, 1, 1), torch.Generator().manual_seed(seed), torch.device("cpu"))["position"]

    drawn = positions(0)
    if steps == 2:
        p = final_weight / (1 + final_weight)  # the closed form: odds W : 1
        assert abs((drawn == 1).double().mean().item() - p) < 4 * (p * (1 - p) / n) ** 0.5
        assert drawn.min() == 0 and drawn.max() == 1
    if steps != 2 or final_weight == 1.0:
        assert torch.equal(drawn, torch.randint(0, steps, (n,), generator=torch.Generator().manual_seed(0)))
    assert torch.equal(positions(0), drawn) and not torch.equal(positions(1), drawn)


def test_the_loss_is_the_truncated_snr_weighted_x0_error_of_the_students_output(tiny_config):
    # bugs caught: no weighting, SNR not truncated at 1, the weight of the wrong index, the student's v read as x0
    schedule = NoiseSchedule.from_config(DiffusionConfig(prediction="v"))
    teacher = lambda z, t, y, w: torch.zeros_like(z)  # noqa: E731 -- eps = 0: DDIM keeps x0 = z / alpha
    objective = DistillationObjective(teacher, schedule, steps=8, weight_range=(1.0, 4.0))
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    draws = objective.draw(tuple(x0.shape), g, torch.device("cpu"))
    draws["position"] = torch.arange(8)  # SNR from 4e-5 (weight 1) to 83 (index 124)
    v_out = torch.randn(8, 1, 8, 8, generator=g)

    def net(z, t, y, weight=None):
        return v_out

    per_sample, t = objective.losses(net, x0, None, draws)
    abar = reference_abar(1000) + [1.0]
    grid = nested_grid(schedule_of(), 8)
    for i in range(8):
        s, e = grid.start[draws["position"][i]], grid.end[draws["position"][i]]
        a_s, s_s, a_e, s_e = (abar[s] ** 0.5, (1 - abar[s]) ** 0.5, abar[e] ** 0.5, (1 - abar[e]) ** 0.5)
        z = a_s * x0[i].double() + s_s * draws["noise"][i].double()
        z_e = a_e * (z / a_s)  # two DDIM steps with eps = 0 end at alpha_e x0, x0 = z / alpha_s
        target = (z_e - s_e / s_s * z) / (a_e - s_e / s_s * a_s)
        x0_student = a_s * z - s_s * v_out[i].double()
        expected = max(a_s**2 / s_s**2, 1.0) * ((x0_student - target) ** 2).mean()
        assert t[i] == s
        assert per_sample[i].item() == pytest.approx(expected.item(), rel=1e-4)
    assert truncated_snr_weight(torch.tensor(0.1), torch.tensor(0.9)).item() == 1.0



@pytest.mark.parametrize("span", [2, 4])
def test_the_ddim_teachers_calls_are_at_each_grid_point_between_with_each_samples_weight(span):
    # bugs caught: the teacher's second DDIM step called at the start index instead of the grid point between (every
    # later round's teacher steps by DDIM), a span-4 round that takes fewer than its four steps, the sample's weight
    # not reaching the teacher. The target is recomputed from the DDIM steps written out in float64 with a teacher
    # that depends on z, t and the weight.
    schedule = NoiseSchedule.from_config(DiffusionConfig(prediction="v"))

    def teacher_eps(z, t, w):
        return torch.tanh(z) * (1 + t.view(-1, *([1] * (z.ndim - 1))) / 1000) * w.view(-1, *([1] * (z.ndim - 1)))

    objective = DistillationObjective(lambda z, t, y, w: teacher_eps(z, t, w), schedule, steps=4,
                                      weight_range=(1.0, 4.0), solver="ddim", spacing="logsnr", span=span)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(8, 1, 4, 4, generator=g) * 2 - 1
    draws = objective.draw(tuple(x0.shape), g, torch.device("cpu"))
    draws["position"] = torch.arange(8) % 4
    v_out = torch.randn(8, 1, 4, 4, generator=g)
    per_sample, _ = objective.losses(lambda z, t, y, weight=None: v_out, x0, None, draws)
    abar = reference_abar(1000) + [1.0]
    teacher_grid = student_timesteps(schedule_of(), 4 * span, "logsnr") + [-1]
    for i in range(8):
        j = int(draws["position"][i])
        points = teacher_grid[span * j:span * (j + 1) + 1]
        s, e = points[0], points[-1]
        w = draws["weight"][i : i + 1].double()

        def ddim(z, a, b):
            eps = teacher_eps(z[None], torch.tensor([a]), w)[0]
            x = (z - (1 - abar[a]) ** 0.5 * eps) / abar[a] ** 0.5
            return abar[b] ** 0.5 * x + (1 - abar[b]) ** 0.5 * eps

        z = abar[s] ** 0.5 * x0[i].double() + (1 - abar[s]) ** 0.5 * draws["noise"][i].double()
        z_e = z
        for a, b in zip(points[:-1], points[1:]):
            z_e = ddim(z_e, a, b)
        ratio = (1 - abar[e]) ** 0.5 / (1 - abar[s]) ** 0.5
        target = (z_e - ratio * z) / (abar[e] ** 0.5 - ratio * abar[s] ** 0.5)
        x0_student = abar[s] ** 0.5 * z - (1 - abar[s]) ** 0.5 * v_out[i].double()
        expected = max(abar[s] / (1 - abar[s]), 1.0) * ((x0_student - target) ** 2).mean()
        assert per_sample[i].item() == pytest.approx(expected.item(), rel=1e-4), (i, points)


def test_each_samples_weight_is_drawn_uniformly_in_the_range():
    # bugs caught: weights drawn outside the student's range (lo + hi * u: up to lo + hi), a range collapsed to one
    # end, one weight shared by the batch, the generator ignored
    schedule = NoiseSchedule.from_config(DiffusionConfig())
    lo, hi, n = 1.5, 4.0, 40_000
    objective = DistillationObjective(None, schedule, 4, (lo, hi))

    def weights(seed):
        return objective.draw((n, 1, 1, 1), torch.Generator().manual_seed(seed), torch.device("cpu"))["weight"]

    drawn = weights(0).double()
    assert lo <= drawn.min() < lo + 0.01 and hi - 0.01 < drawn.max() <= hi
    assert abs(drawn.mean().item() - (lo + hi) / 2) < 4 * (hi - lo) / (12 * n) ** 0.5  # uniform: sd (hi - lo)/sqrt(12)
    assert abs(drawn.var().item() - (hi - lo) ** 2 / 12) < 0.02
    assert torch.equal(weights(0), weights(0)) and not torch.equal(weights(1), weights(0))
    assert torch.equal(DistillationObjective(None, schedule, 4, None).draw(
        (4, 1, 1, 1), torch.Generator().manual_seed(0), torch.device("cpu"))["weight"], torch.zeros(4))


def test_the_2s_midpoint_is_the_index_nearest_the_log_snr_midpoint_and_neighbours_step_by_ddim():
    # bugs caught: the 2S step's intermediate point chosen halfway in t instead of in log-SNR (still second order,
    # so the exact-ODE test above passes; the targets differ), second order between neighbouring indices (r = 1, no
    # point between: the docstring's first-order step)
    calls = []
    eps, alpha, sigma, variance = gaussian_teacher(calls)
    lam = (alpha[:-1] / sigma[:-1]).log()
    s, t = torch.tensor([999, 871, 722, 302, 109, 6, 400, 1]), torch.tensor([871, 722, 535, 109, 30, 5, 399, 0])
    z = torch.randn(len(s), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    solved = dpmpp_2s_step(eps, z, s, t, alpha, sigma)
    (first_index, _), (second_index, _) = calls
    assert torch.equal(first_index, s)
    for i in range(len(s)):
        a, b = int(s[i]), int(t[i])
        if a - b > 1:  # the index whose log-SNR is nearest the midpoint, strictly between, found by brute force
            middle = 0.5 * (lam[a] + lam[b])
            expected = min(range(b + 1, a), key=lambda k: abs(lam[k].item() - middle.item()))
            assert int(second_index[i]) == expected, (a, b)
        else:  # neighbours: no point between, DDIM's step (and its eps evaluated at s again)
            assert int(second_index[i]) == a
            ddim = ddim_step(z[i : i + 1], eps(z[i : i + 1], s[i : i + 1]), alpha[a], sigma[a], alpha[b], sigma[b])
            assert torch.allclose(solved[i : i + 1], ddim, rtol=0, atol=1e-12), (a, b)


def test_an_untrained_student_is_its_teacher_at_every_weight(tiny_config):
    # bug caught: a weight embedding that is not zero at the start (the student would begin off its teacher)
    torch.manual_seed(0)
    teacher = UNet(tiny_config(num_classes=3)).eval()
    student = student_from(teacher, "guide_weight").eval()
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor([999, 500, 10, 0]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        reference = teacher(x, t, y)
        for weight in (0.0, 1.0, 2.6, 4.0, 100.0):
            out = student(x, t, y, weight=torch.full((4,), weight))
            assert torch.equal(out, reference), weight



@pytest.mark.parametrize("weight_name, expected", [("guide_weight", 3.0), ("guidance", 1.5)])
def test_a_student_is_called_with_the_sampling_weight_it_was_distilled_on(tiny_config, weight_name, expected):
    # bug caught: a student of g drawn at the CFG weight w (or one of w at g): its built-in guidance silently off
    # (the end-to-end tests draw at w = 1 beside g = 2.6, where "closer than the teacher" still holds)
    from ddpm import SamplingConfig, make_denoiser

    torch.manual_seed(0)
    student = student_from(UNet(tiny_config(num_classes=3)).eval(), weight_name).eval()
    seen = []
    student.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["weight"].clone()),
                                      with_kwargs=True)
    schedule = NoiseSchedule.from_config(DiffusionConfig(timesteps=100, prediction="v"))
    denoiser = make_denoiser(student, torch.tensor([0, 1]), SamplingConfig(guidance=1.5, guide_weight=3.0),
                             schedule=schedule)
    with torch.no_grad():
        denoiser(torch.randn(2, 1, 16, 16), torch.tensor([50, 50]))
    assert len(seen) == 1 and torch.equal(seen[0], torch.full((2,), expected))



def test_a_students_sampling_takes_the_steps_and_weights_given_up_to_both_ends_of_its_range():
    # bugs caught: the steps asked for (--sampling-steps, the page's slider) replaced by the student's own, the top
    # of the weight range refused, the student's grid forced on another sampler the user chose
    from ddpm import SamplingConfig
    from ddpm.errors import DdpmError
    from ddpm.students import Student

    student = Student(steps=2, teacher_steps=4, weight="guide_weight", weight_range=(1.0, 4.0), default_weight=2.6,
                      fixed={"guidance": 1.0}, teacher="t", spacing="logsnr")
    plain = SamplingConfig()
    drawn = student.sampling(plain, {})
    assert (drawn.steps, drawn.guide_weight, drawn.guidance, drawn.spacing) == (2, 2.6, 1.0, "logsnr")
    assert student.sampling(plain, {"steps": 4}).steps == 4
    for edge in (1.0, 4.0):
        assert student.sampling(plain, {"guide_weight": edge}).guide_weight == edge
    for outside in (0.99, 4.01):
        with pytest.raises(DdpmError, match="outside the weights"):
            student.sampling(plain, {"guide_weight": outside})
    other = student.sampling(SamplingConfig(sampler="dpmpp2m", spacing="trailing"), {"sampler": "dpmpp2m"})
    assert other.spacing == "trailing"



def test_an_older_distill_json_reads_as_the_settings_it_ran_with():
    # bugs caught: a field an older distill.json lacks read as today's default instead of what that version ran
    # (its --resume refused, or continued on another grid, draw or precision)
    from ddpm.distill_settings import upgrade_record

    old = upgrade_record({"steps": 2})
    assert (old["teacher_solver"], old["spacing"], old["final_weight"]) == ("ddim", "trailing", 1.0)
    assert (old["student_average"], old["teacher_precision"], old["teacher_span"]) == ("last", "fp32", 2)
    assert upgrade_record({"student_ema": [0.0, 0.98]})["student_average"] == ["last", 0.98]


# -- the command, end to end on a tiny run ---------------------------------------------------------------------------
TEACHER_ARGS = ["--conditional", "--steps", "8", "--lr", "1e-2", "--prediction", "v", "--guide-fraction", "0.5",
                "--checkpoint-every", "4", "--ema-warmup", "0", "--ema-lengths", "none", "--val-every", "0"]
DISTILL = ["--batch-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny conditional v-prediction run with its guide snapshot: distilled with g as the student's input."""
    from ddpm.cli import main
    from helpers import TINY_TRAIN_ARGS

    run = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["train", "mnist", "--out", str(run), *TEACHER_ARGS, *TINY_TRAIN_ARGS]) == 0
    return run


def sampled_with(model, schedule, x_T, labels, sampler_steps, guide=None, spacing="trailing", **weights):
    from ddpm.config import SamplingConfig
    from ddpm.pipeline import sample

    sampling = SamplingConfig(sampler="student", steps=sampler_steps, guidance=1.0, guidance_interval=(0.05, 1.0),
                              spacing=spacing, **weights)
    return sample(model, schedule, labels=labels, sampling=sampling, guide=guide, x_T=x_T)


def test_one_round_brings_the_students_k_steps_closer_to_the_teachers_2k_steps(teacher_run, tmp_path):
    # bug caught: a student that learns anything but its teacher's two steps (a wrong target, the wrong teacher
    # weight, t off the grid): it would not come closer to the teacher's 2-step images than 1 teacher step is
    from ddpm.checkpoint import from_pretrained
    from ddpm.cli import main
    from ddpm.sources import open_model

    out = tmp_path / "distilled"
    # round 1 with DDIM's steps, the teacher's own images below (the default, DPM-Solver++(2S), aims past them)
    assert main(["distill", str(teacher_run), "--steps", "1", "--start-steps", "2", "--round-steps", "60",
                 "--lr", "3e-3", "--teacher-solver", "ddim", "--out", str(out), *DISTILL]) == 0
    settings = json.loads((out / "distill.json").read_text())
    assert settings["teacher_solver"] == "ddim" and settings["spacing"] == "logsnr"  # --spacing auto
    student, schedule, _ = from_pretrained(out / "steps_1")
    teacher = open_model(teacher_run)
    assert teacher.guide is not None
    g = torch.Generator().manual_seed(5)
    x_T, labels = torch.randn(20, 1, 8, 8, generator=g), torch.arange(20) % 10
    two = sampled_with(teacher.model, schedule, x_T, labels, 2, teacher.guide, "logsnr", guide_weight=2.6)
    one = sampled_with(teacher.model, schedule, x_T, labels, 1, teacher.guide, "logsnr", guide_weight=2.6)
    drawn = sampled_with(student, schedule, x_T, labels, 1, guide_weight=2.6)
    teachers_own, students = ((one - two) ** 2).mean().item(), ((drawn - two) ** 2).mean().item()
    assert students < 0.7 * teachers_own, (students, teachers_own)


class StopAfter:
    """A stop request that asks to stop (as SIGTERM does) after `steps` optimizer steps."""

    def __init__(self, steps: int):
        self.steps, self.calls, self.time_limit = steps, 0, None

    def code(self, step_seconds, save_seconds):
        import signal

        self.calls += 1
        return int(signal.SIGTERM) if self.calls == self.steps else 0


def test_a_stop_mid_round_and_resume_give_the_uninterrupted_students_bits(teacher_run, tmp_path):
    # bugs caught: a resumed round with another teacher (the round's teacher not reloaded from the previous
    # student's folder), a lost optimizer or noise state, the round counter off by one, rounds of their own
    # lengths (--round-steps 3,2) ended at another step
    from safetensors.torch import load_file


    options = dict(steps=1, start_steps=4, round_steps=[3, 2], batch_size=8, progress=False)
    whole = distill(teacher_run, out=tmp_path / "whole", **options)
    assert [p.name for p in whole.students] == ["steps_2", "steps_1"] and whole.stopped == 0
    assert [json.loads((p / "config.json").read_text())["step"] for p in whole.students] == [3, 5]
    # a round's last step asks no stop (it ends the round anyway), so the third ask is at step 4, one step into
    # round 2: round 1's student (written at step 3) is its teacher on resume
    stopped = distill(teacher_run, out=tmp_path / "cut", stop=StopAfter(3), **options)
    assert stopped.stopped and [p.name for p in stopped.students] == ["steps_2"]
    first_round = (tmp_path / "cut" / "steps_2" / "model.safetensors").stat().st_mtime_ns
    resumed = distill(teacher_run, out=tmp_path / "cut", resume=True, **options)
    assert resumed.stopped == 0
    assert (tmp_path / "cut" / "steps_2" / "model.safetensors").stat().st_mtime_ns == first_round  # not redone
    for name in ("steps_2", "steps_1"):
        a = load_file(str(tmp_path / "whole" / name / "model.safetensors"))
        b = load_file(str(tmp_path / "cut" / name / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_each_round_writes_its_students_average_and_the_next_round_starts_from_it(teacher_run, tmp_path,
                                                                                 monkeypatch):
    # bugs caught: a round that writes its last weights instead of their average (--student-average not reaching the
    # Trainer), an average with the decay's complement, one that starts from anything but the round's first
    # weights, a next round that starts from its last weights instead of the student it learns from, and round 1's
    # decay kept for round 2
    from safetensors.torch import load_file

    distill_module = importlib.import_module("ddpm.distill")  # the module (ddpm.distill is also the function)
    starts, real_fit = [], distill_module.fit

    def recording_fit(trainer, end, monitor, stop):
        starts.append({k: v.detach().clone().double() for k, v in trainer.model.state_dict().items()})
        return real_fit(trainer, end, monitor, stop)

    monkeypatch.setattr(distill_module, "fit", recording_fit)
    decays, out = [0.75, 0.5], tmp_path / "averaged"
    distill(teacher_run, out=out, steps=1, start_steps=4, round_steps=[2, 1], batch_size=8, progress=False,
            student_average=decays, checkpoint_every=1)
    raw = [{k: v.double() for k, v in torch.load(path, weights_only=True)["model"].items()}
           for path in sorted((out / "checkpoints").glob("step_*.pt"))]
    assert len(raw) == 3 and len(starts) == 2  # the raw weights after steps 1, 2 and 3; each round's first weights

    def average(first, later, decay):  # e_0 = the round's first weights, e_k = decay e_(k-1) + (1 - decay) w_k
        result = dict(first)
        for weights in later:
            result = {k: decay * result[k] + (1 - decay) * weights[k] for k in result}
        return result

    def written(name):
        return {k: v.double() for k, v in load_file(str(out / name / "model.safetensors")).items()}

    round_one = average(starts[0], raw[:2], decays[0])
    assert max((written("steps_2")[k] - round_one[k]).abs().max() for k in round_one) < 1e-6
    assert max((raw[1][k] - round_one[k]).abs().max() for k in round_one) > 1e-4  # the average is not the last step
    assert max((starts[1][k] - written("steps_2")[k]).abs().max() for k in round_one) == 0  # round 2 starts there
    round_two = average(starts[1], raw[2:], decays[1])
    assert max((written("steps_1")[k] - round_two[k]).abs().max() for k in round_two) < 1e-6


def test_by_default_each_round_writes_the_mean_of_its_second_half(teacher_run, tmp_path, monkeypatch):
    # bugs caught: the mean weighted 1/k instead of 1/(k + 1) (the warm-up's last copy left out), a warm-up of the
    # wrong length, the count not restarted at a round's start (round 2's mean weighted as if it went on from round
    # 1), or the default not being the mean at all
    from safetensors.torch import load_file

    from ddpm.training import Trainer

    raw, precisions, real_step = [], set(), Trainer.step

    def recording_step(self, *args):
        stats = real_step(self, *args)
        raw.append({k: v.detach().clone().double() for k, v in self.model.state_dict().items()})
        precisions.add((self.objective.teacher_precision, self.amp_dtype))
        return stats

    monkeypatch.setattr(Trainer, "step", recording_step)
    # and (bugs caught) --teacher-precision auto not reaching the rounds' objectives on a CPU with native bf16, or
    # --amp auto leaving the student's training step in fp32 there
    monkeypatch.setattr(importlib.import_module("ddpm.devices"), "cpu_flags", lambda: "flags : avx2 avx512_bf16")
    out = tmp_path / "half"
    distill(teacher_run, out=out, steps=1, start_steps=4, round_steps=[4, 2], batch_size=8, progress=False,
            device="cpu")
    assert json.loads((out / "distill.json").read_text())["student_average"] == "half"
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 6e-4  # and (bug caught) the old 3e-4
    assert len(raw) == 6 and precisions == {("bf16", torch.bfloat16)}  # the raw weights after each of the 4 + 2 steps
    assert json.loads((out / "config.json").read_text())["runtime"]["amp"] == "bf16"  # what --resume reads

    def mean(weights):
        return {k: sum(w[k] for w in weights) / len(weights) for k in weights[0]}

    def gap(name, want):
        got = {k: v.double() for k, v in load_file(str(out / name / "model.safetensors")).items()}
        return max((got[k] - want[k]).abs().max().item() for k in want)

    assert gap("steps_2", mean(raw[1:4])) < 1e-6  # after steps 2, 3 and 4 of 4
    assert gap("steps_2", raw[3]) > 1e-5  # not the last weights
    assert gap("steps_1", mean(raw[4:6])) < 1e-6  # after steps 1 and 2 of round 2


def test_the_teachers_calls_run_in_the_precision_asked_and_the_students_in_the_steps(monkeypatch):
    # bugs caught: --teacher-precision not reaching the teacher's calls, the student's forward (which takes the
    # gradient) put in bf16 with them, fp32 teacher calls left under the training step's bf16 autocast, and auto
    # choosing bf16 on a CPU that only emulates it
    from ddpm.distill_target import DistillationObjective
    from ddpm.schedule import NoiseSchedule

    distill_module = importlib.import_module("ddpm.distill")
    schedule = NoiseSchedule(torch.linspace(1e-4, 0.02, 64, dtype=torch.float64))
    seen = []

    def teacher(z, t, labels, weight):
        seen.append(("teacher", torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
        return torch.zeros_like(z)

    def student(z, t, labels, weight=None):
        seen.append(("student", torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
        return torch.zeros_like(z)

    generator = torch.Generator().manual_seed(0)
    for precision, outer, want in [("bf16", None, torch.bfloat16), ("fp32", torch.bfloat16, None)]:
        objective = DistillationObjective(teacher, schedule, 2, (1.0, 3.0), "ddim", teacher_precision=precision)
        seen.clear()
        with torch.autocast("cpu", dtype=outer or torch.bfloat16, enabled=outer is not None):
            objective.losses(student, torch.zeros(2, 1, 4, 4), None, objective.draw((2, 1, 4, 4), generator,
                                                                                   torch.device("cpu")))
        assert seen == [("teacher", want), ("teacher", want), ("student", outer)], precision
    cpu = torch.device("cpu")
    devices = importlib.import_module("ddpm.devices")
    monkeypatch.setattr(devices, "cpu_flags", lambda: "flags : fpu avx2 avx512f avx512_bf16 sse")
    assert distill_module.resolve_teacher_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(devices, "cpu_flags", lambda: "flags : fpu avx2 avx512f sse")
    assert distill_module.resolve_teacher_precision("auto", cpu) == "fp32"
    assert distill_module.resolve_teacher_precision("bf16", cpu) == "bf16"
    # the student's step: auto is left to the Trainer (fp32 on a CPU) without native bf16, bf16 with it
    assert [distill_module.resolve_student_amp(amp, cpu) for amp in ("auto", "none")] == ["auto", "none"]
    monkeypatch.setattr(devices, "cpu_flags", lambda: "flags : fpu amx_bf16 avx2")
    assert [distill_module.resolve_student_amp(amp, cpu) for amp in ("auto", "none")] == ["bf16", "none"]


def test_round_one_takes_its_teachers_steps_with_dpm_solver_2s_by_default(teacher_run, tmp_path, monkeypatch):
    # bug caught: the recorded --teacher-solver not reaching round 1's objective (DDIM's targets instead), or the
    # later rounds (students, exact under DDIM) taking 2S steps too
    # and (bug caught) the log-SNR grid that --spacing auto records not reaching the objective: its steps start
    # from the 4-step log-SNR grid's points, not the trailing grid's
    target_module = importlib.import_module("ddpm.distill_target")
    used = []
    original = target_module.dpmpp_2s_step
    monkeypatch.setattr(target_module, "dpmpp_2s_step", lambda *a, **k: used.append(a[2].tolist()) or original(*a, **k))
    distill(teacher_run, out=tmp_path / "d", steps=1, start_steps=4, round_steps=[2, 3], batch_size=4,
            progress=False, eval_n=0)
    assert len(used) == 2 * 2  # two teacher steps a sample batch, in round 1's 2 optimizer steps only
    settings = json.loads((tmp_path / "d" / "distill.json").read_text())
    assert settings["teacher_solver"] == "dpmpp2s" and settings["spacing"] == "logsnr"
    starts = set(itertools.chain(*used))
    assert starts <= set(logsnr_grid(1000, 4)) and 999 in starts, starts


def count_calls(monkeypatch):
    calls = []
    original = UNet.forward

    def counted(self, *args, **kwargs):
        calls.append(len(args[0]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(UNet, "forward", counted)
    return calls


@pytest.fixture(scope="module")
def students(teacher_run, tmp_path_factory):
    from ddpm.cli import main

    out = tmp_path_factory.mktemp("students") / "distilled"
    assert main(["distill", str(teacher_run), "--steps", "1", "--start-steps", "4", "--round-steps", "2",
                 "--out", str(out), *DISTILL]) == 0
    return out



def test_each_later_round_learns_from_the_previous_rounds_student_and_checkpoints_at_each_rounds_end(
        teacher_run, tmp_path, monkeypatch):
    # bugs caught: every round taught by the guided model instead of the previous round's student (progressive
    # distillation no longer progressive, every file still looks right), checkpoints by default only at the last
    # round's end (a kill in round 3 restarts from step 0). Round 2's teacher is called on fixed inputs and compared
    # with the 2-step student read back from its folder.
    from ddpm.checkpoint import from_pretrained
    from ddpm.diffusion import eps_from_output

    distill_module = importlib.import_module("ddpm.distill")
    teachers = []
    real = distill_module.DistillationObjective

    def objective(teacher, *args, **kwargs):
        teachers.append(teacher)
        return real(teacher, *args, **kwargs)

    monkeypatch.setattr(distill_module, "DistillationObjective", objective)
    out = tmp_path / "d"
    distill(teacher_run, steps=1, start_steps=4, round_steps=[2, 4], out=out, batch_size=8, progress=False)
    assert len(teachers) == 2
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(3, 1, 16, 16, generator=g), torch.tensor([19, 12, 5])
    labels, weight = torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.6, 4.0])
    student, schedule, _ = from_pretrained(out / "steps_2")
    with torch.no_grad():
        expected = eps_from_output(schedule, z, t, student(z, t, labels, weight=weight), schedule.prediction)
        assert torch.allclose(teachers[1](z, t, labels, weight), expected, atol=1e-5)
        assert not torch.allclose(teachers[0](z, t, labels, weight), expected, atol=1e-3)
    # by default every gcd of the round ends (the default 300, 200, 200: every 100 steps): here 2, 4 and 6
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*.pt")) == ["step_00000002.pt", "step_00000004.pt",
                                                                          "step_00000006.pt"]
    for steps in (2, 1):  # each student records its teacher's steps
        assert json.loads((out / f"steps_{steps}" / "config.json").read_text())["student"]["teacher_steps"] == 2 * steps



@pytest.mark.parametrize("span", [4, 2])
def test_round_three_learns_four_steps_of_the_student_two_rounds_back_by_default(teacher_run, tmp_path, monkeypatch,
                                                                                 span):
    # bugs caught: round 3's teacher the previous round's student under the default span 4 (or the student two rounds
    # back under --teacher-span 2), its target two steps instead of four, round 2 given a span of 4 (its teacher
    # two rounds back would be the guided model), round 3's student not starting from round 2's. The teachers are
    # called on fixed inputs and compared with the students read back from their folders.
    from ddpm.checkpoint import from_pretrained
    from ddpm.diffusion import eps_from_output

    distill_module = importlib.import_module("ddpm.distill")
    rounds, starts = [], []
    real, real_start = distill_module.DistillationObjective, distill_module._start_from

    def objective(teacher, *args, **kwargs):
        made = real(teacher, *args, **kwargs)
        rounds.append(made)
        return made

    monkeypatch.setattr(distill_module, "DistillationObjective", objective)
    monkeypatch.setattr(distill_module, "_start_from",
                        lambda trainer, model: starts.append(copy.deepcopy(model)) or real_start(trainer, model))
    out = tmp_path / "d"
    distill(teacher_run, steps=1, start_steps=8, round_steps=[1, 1, 2], teacher_span=span, out=out, batch_size=4,
            progress=False)
    assert [len(o.grid.path[0]) - 1 for o in rounds] == [2, 2, span]
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(3, 1, 16, 16, generator=g), torch.tensor([19, 12, 5])
    labels, weight = torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.6, 4.0])
    students = {k: from_pretrained(out / f"steps_{k}")[:2] for k in (4, 2)}
    with torch.no_grad():
        def eps(k):
            student, schedule = students[k]
            return eps_from_output(schedule, z, t, student(z, t, labels, weight=weight), schedule.prediction)

        taught, other = (4, 2) if span == 4 else (2, 4)
        assert torch.allclose(rounds[2].teacher(z, t, labels, weight), eps(taught), atol=1e-5)
        assert not torch.allclose(rounds[2].teacher(z, t, labels, weight), eps(other), atol=1e-3)
        assert torch.allclose(rounds[1].teacher(z, t, labels, weight), eps(4), atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(starts[1].state_dict().values(),
                                                 students[2][0].state_dict().values()))
    assert json.loads((out / "steps_1" / "config.json").read_text())["student"]["teacher_steps"] == span
    assert json.loads((out / "distill.json").read_text())["teacher_span"] == span


def test_the_teacher_runs_flip_choice_carries_into_its_distillation(teacher_run, tmp_path):
    # bug caught: the student trained with its data's default flips instead of the teacher run's choice (a teacher
    # trained with --no-hflip on photos of text, or --hflip on digits as here, distilled on other images than it saw)
    import shutil

    run = tmp_path / "run"
    shutil.copytree(teacher_run, run)
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["data"] == "mnist" and not config["train"]["hflip"]  # the digits' default: no flips
    config["train"]["hflip"] = True
    (run / "config.json").write_text(json.dumps(config))
    distill(run, steps=1, start_steps=2, round_steps=1, out=tmp_path / "d", batch_size=4, progress=False)
    assert json.loads((tmp_path / "d" / "config.json").read_text())["train"]["hflip"] is True


def test_a_students_weight_embedding_is_drawn_from_its_seed(tiny_config):
    # bug caught: --seed not reaching the student's new weight embedding (every seed the same start)
    teacher = UNet(tiny_config(num_classes=3))

    def embedding(seed):
        return {k: v for k, v in student_from(teacher, "guidance", seed=seed).state_dict().items()
                if k.startswith("weight_emb.")}

    first, again, other = embedding(1), embedding(1), embedding(2)
    assert first and all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("calls", [2, 1])
def test_ddpm_sample_draws_a_student_in_k_calls_and_names_it(students, tmp_path, monkeypatch, capsys, calls):
    # bugs caught: a student drawn with the 20-step default, guided by a second call, or with its guide loaded
    from ddpm.cli import main

    counted = count_calls(monkeypatch)
    assert main(["sample", str(students / f"steps_{calls}"), "--labels", "0,1,2", "--out", str(tmp_path / "s"),
                 "--quiet"]) == 0
    assert counted == [3] * calls
    out = capsys.readouterr().out
    plural = "" if calls == 1 else "s"
    assert (f"(student, {calls} step{plural} = {calls} call{plural} of a {calls}-call student (g 1-4)" in out
            and "g=2.6" in out)


def test_a_distillations_folder_draws_as_its_student_of_fewest_calls(students, tmp_path, monkeypatch, capsys):
    # bug caught: RUN/distilled (and its model/, the last round's weights without the student's record) drawn as a
    # plain model: 20 DPM-Solver++ steps with classifier-free guidance, of a network that takes the weight as input
    import shutil

    from ddpm.cli import main

    for folder in (students, students / "model"):
        counted = count_calls(monkeypatch)
        assert main(["sample", str(folder), "--labels", "0,1,2", "--out", str(tmp_path / folder.name), "--quiet"]) == 0
        assert counted == [3]  # steps_1, the last round's
        assert "(student, 1 step = 1 call of a 1-call student (g 1-4)" in capsys.readouterr().out
    started = tmp_path / "started"  # a distillation whose first round has not ended
    started.mkdir()
    shutil.copy(students / "distill.json", started / "distill.json")
    assert main(["sample", str(started), "--out", str(tmp_path / "none"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has written no student yet" in err[0] and not (tmp_path / "none").exists()


def test_a_student_draws_on_the_grid_it_was_distilled_on_and_an_older_record_on_the_trailing_one(
        students, tmp_path, monkeypatch):
    # bugs caught: a log-SNR student drawn at t = 499 (the trailing grid) instead of 302 by ddpm sample or the page,
    # the record's spacing lost on the way, or a record written before the choice read as anything but trailing
    import shutil

    from ddpm.cli import main
    from ddpm.serve import draw, load_served_model, page_defaults, request_from_fields

    times = []
    original = UNet.forward
    monkeypatch.setattr(UNet, "forward", lambda self, x, t, *a, **k: times.append(int(t[0])) or original(self, x, t,
                                                                                                          *a, **k))
    assert json.loads((students / "steps_2" / "config.json").read_text())["student"]["spacing"] == "logsnr"
    assert main(["sample", str(students / "steps_2"), "--labels", "0", "--out", str(tmp_path / "s"), "--quiet"]) == 0
    served = load_served_model(students / "steps_2", "cpu")
    draw(served, request_from_fields(served, {**page_defaults(served), "seed": "0", "count": 1}))
    older = tmp_path / "older"
    shutil.copytree(students / "steps_2", older)
    config = json.loads((older / "config.json").read_text())
    del config["student"]["spacing"]
    (older / "config.json").write_text(json.dumps(config))
    assert main(["sample", str(older), "--labels", "0", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert times == [999, 302] * 2 + [999, 499]


def test_the_page_draws_a_student_in_k_calls_within_its_weights(students, monkeypatch):
    # bugs caught: the page sampling a student with its own defaults (20 DPM-Solver++ steps, a guide), or refusing
    # its g because the page has no guide model
    from ddpm.errors import DdpmError
    from ddpm.serve import draw, load_served_model, page_defaults, request_from_fields

    served = load_served_model(students / "steps_2", "cpu")
    defaults = page_defaults(served)
    assert defaults["sampler"] == "student" and defaults["steps"] == 2 and defaults["guide_weight"] == 2.6
    counted = count_calls(monkeypatch)
    draw(served, request_from_fields(served, {**defaults, "seed": "0", "count": 2, "guide_weight": 3.5}))
    assert counted == [2, 2]
    counted.clear()  # the steps slider moved: its steps drawn (off the student's grid, as ddpm sample allows)
    draw(served, request_from_fields(served, {**defaults, "seed": "0", "count": 2, "steps": 4}))
    assert counted == [2] * 4
    with pytest.raises(DdpmError, match="outside the weights"):
        request_from_fields(served, {**defaults, "seed": "0", "guide_weight": 4.5})


def test_the_pages_w_slider_of_a_student_of_g_shows_its_built_in_w_and_cannot_move(students):
    # bugs caught: a live w slider on a student of an autoguided teacher, whose moves the student drops silently (it
    # draws at its teacher's w = 1 whatever the slider says); live interval and rescale sliders, dropped alike
    from ddpm import serve

    app = serve.build_app(None, served=serve.load_served_model(students / "steps_2", "cpu"))
    by_id = {block.elem_id: block for block in app.blocks.values() if getattr(block, "elem_id", None)}
    for elem_id in ("guidance", "edit-guidance"):
        slider = by_id[elem_id]
        assert slider.interactive is False and slider.value == 1.0 and "w 1 is built in" in slider.info, elem_id
    assert by_id["guide-weight"].interactive is not False and (by_id["guide-weight"].minimum,
                                                               by_id["guide-weight"].maximum) == (1, 4)
    # nor does the page offer the options that shape a combination of guided calls, which a student does not make
    assert not any(by_id[elem_id].visible for elem_id in ("interval-lo", "interval-hi", "rescale"))
    assert by_id["threshold"].visible


@pytest.mark.parametrize("argv, expected", [
    (["sample", "{student}", "--guide", "{teacher}"], "takes no --guide"),
    (["sample", "{student}", "--guide-weight", "9"], "outside the weights this student was trained on"),
    (["distill", "{teacher}", "--steps", "3"], "a student takes 1, 2 or 4 steps"),
    (["distill", "{teacher}", "--steps", "8"], "a student takes 1, 2 or 4 steps"),
    (["distill", "{teacher}", "--steps", "4", "--start-steps", "10"], "--start-steps"),
    (["distill", "{teacher}", "--steps", "4", "--round-steps", "100,200,300"], "takes 2 rounds"),
    (["distill", "{empty}"], "does not exist|not a folder|no config.json"),
    (["distill", "{teacher}", "--out", "{students}", "--weight-range", "1", "3"], "holds a distillation of another"),
    (["distill", "{teacher}", "--guide-weight", "5"], "outside --weight-range 1 4"),
    (["distill", "{teacher}", "--spacing", "logsnr", "--start-steps", "64"], "two steps fall on one index"),
    (["distill", "{teacher}", "--final-weight", "0.5"], "must be from 1"),
    (["distill", "{teacher}", "--student-average", "1"], "half .* last .* or an exponential decay"),
    (["distill", "{teacher}", "--student-average", "last,0.9"], "takes 3 rounds"),
    # a distillation is no training run: neither distilled again nor trained on as a diffusion model
    (["distill", "{students}"], "is a distillation's folder, not a training run"),
    (["distill", "{student}", "--data", "mnist"], "is in the distillation .*, not a training run"),
    (["train", "--resume", "{students}"], "holds a distillation, not a training run: continue it with `ddpm distill"),
    (["train", "mnist", "--out", "{students}", "--resume-if-exists"], "holds a distillation, not a training run"),
    # a student of an autoguided teacher has w = 1 built in: --guidance would be dropped silently
    (["sample", "{student}", "--guidance", "3"], "teacher's --guidance 1 built in and takes --guide-weight from 1"),
    (["sample", "{student}", "--ema-length", "0.1"], "is a model folder, with no post-hoc EMA snapshots to average"),
    # a student is guided in its one call: these shape a combination of calls it does not make (both were dropped)
    (["sample", "{student}", "--guidance-interval", "0.3", "0.8"], "--guidance-interval: a distilled student draws"),
    (["sample", "{student}", "--guidance-rescale", "0.7"], "--guidance-rescale: a distilled student draws"),
    # its sampler is DDIM on its own grid: no eta, no other spacing (both were dropped)
    (["sample", "{student}", "--eta", "0.3"], "--eta: the student sampler does not read it"),
    (["sample", "{student}", "--spacing", "trailing"], "--spacing: the student sampler .* the grid it was distilled"),
])
def test_bad_input_is_one_line_and_writes_nothing(argv, expected, students, teacher_run, tmp_path, capsys):
    import re

    from ddpm.cli import main

    before = sorted(p.relative_to(students) for p in students.rglob("*"))
    names = {"student": students / "steps_1", "teacher": teacher_run, "students": students,
             "empty": tmp_path / "nothing"}
    argv = [a.format(**{k: str(v) for k, v in names.items()}) for a in argv]
    assert main([*argv, "--out" if argv[0] == "sample" else "--quiet", *( [str(tmp_path / "o")] if argv[0] ==
                 "sample" else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(expected, err[0]), err
    assert sorted(p.relative_to(students) for p in students.rglob("*")) == before
    assert not (tmp_path / "o").exists() and not (teacher_run / "distilled").exists()


def test_an_unknown_amp_is_one_line_naming_the_flag_before_anything_is_opened(teacher_run, tmp_path):
    # bug caught: the API's amp unchecked until the Trainer's config (a message naming no flag, after the teacher's
    # post-hoc average was opened)
    from ddpm.config import ConfigError

    before = sorted(teacher_run.rglob("*"))
    with pytest.raises(ConfigError, match=r"^--amp fp8: choose one of auto, bf16, fp16, none$"):
        distill(teacher_run, amp="fp8", out=tmp_path / "o", progress=False, device="cpu")
    assert sorted(teacher_run.rglob("*")) == before and not (tmp_path / "o").exists()


def test_round_one_gets_300_steps_and_each_later_round_200_by_default():
    # bugs caught: the default lengths saved as None in distill.json (a resume could not tell what ran), every round
    # at one length, or round 1's length given to the last round
    from ddpm.distill_settings import DistillSettings

    two = DistillSettings({}, None, None, None, start_steps=16, steps=2)
    assert two.round_steps == [300, 200, 200] and two.round_ends == [300, 500, 700]
    assert DistillSettings({}, None, None, None, start_steps=16, steps=1).round_ends == [300, 500, 700, 900]
    assert DistillSettings({}, None, None, None, start_steps=8, steps=4, round_steps=50).round_ends == [50]


@pytest.mark.parametrize("flag, value, expected", [("--round-steps", "100,x", "'100,x' is not a number of steps"),
                                                    ("--student-average", "0,y", "'0,y' is not half, last or a decay")])
def test_round_steps_and_decays_that_are_no_numbers_are_one_line(capsys, flag, value, expected):
    from ddpm.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["distill", "runs/x", flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and expected in err[-1]


def test_ddpm_eval_draws_a_student_at_each_weight_it_is_given(students, tmp_path, monkeypatch):
    # bug caught: the evaluation's sample cache keyed without a student's input weight g, so every g after the first
    # reused the first one's images and reported its scores
    import ddpm.periodic_eval
    from ddpm.cli import main

    monkeypatch.setattr(ddpm.periodic_eval, "CLASSIFIER_STEPS", 30)
    out = tmp_path / "eval"
    assert main(["eval", str(students / "steps_1"), "--guide-weight", "1.5", "3.5", "--n", "8", "--no-fid",
                 "--classifier-steps", "30", "--out", str(out), "--quiet"]) == 0
    rows = json.loads((out / "eval" / "eval.json").read_text())["rows"]
    assert [row["guide_weight"] for row in rows] == [1.5, 3.5]
    assert rows[0]["samples"] != rows[1]["samples"] and all(row["generated_now"] for row in rows)


def test_resume_if_exists_continues_a_finished_distillation_without_training(students, teacher_run, capsys):
    from ddpm.cli import main

    stamp = (students / "steps_1" / "model.safetensors").stat().st_mtime_ns
    assert main(["distill", str(teacher_run), "--steps", "1", "--start-steps", "4", "--round-steps", "2",
                 "--out", str(students), "--resume-if-exists", *DISTILL]) == 0
    assert (students / "steps_1" / "model.safetensors").stat().st_mtime_ns == stamp
    assert "steps_1" in capsys.readouterr().out


def test_ddpm_edit_inpaints_on_the_students_grid(students, tmp_path, monkeypatch, capsys):
    # bug caught: editing a student with the 20-step default sampler (20 calls) or at g = 1 instead of its default
    import numpy as np
    from PIL import Image

    from ddpm.cli import main

    images, mask = tmp_path / "images", tmp_path / "mask.png"
    images.mkdir()
    Image.fromarray(np.full((8, 8), 200, np.uint8), "L").save(images / "a.png")
    Image.fromarray(np.where(np.arange(8)[:, None] < 4, 255, 0).repeat(8, 1).astype(np.uint8), "L").save(mask)
    counted = count_calls(monkeypatch)
    assert main(["edit", str(students / "steps_2"), str(images), "--mask", str(mask), "--labels", "3",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert counted == [1, 1]
    assert "(student, 2 steps, g=2.6, a 2-call student (g 1-4))" in capsys.readouterr().out


def test_every_distill_flag_runs(teacher_run, tmp_path, capsys, monkeypatch):
    # bugs caught: a flag parsed but not passed on (the teacher's w, the student's default g, the data, the seed), a
    # --time-limit that never stops (exit 75), --resume from the command line, and an explicit --teacher-precision
    # bf16 on a CPU that only emulates it (several times slower) without a word
    import json

    from ddpm.cli import main

    small = ["--steps", "1", "--start-steps", "2", "--round-steps", "2", *DISTILL]
    cfg = tmp_path / "cfg"
    assert main(["distill", str(teacher_run), "--guide", "none", "--guidance", "2", "--data", "mnist", "--seed", "3",
                 "--checkpoint-every", "1", "--device", "cpu", "--lr", "1e-3", "--weight-range", "1", "3",
                 "--out", str(cfg), *small]) == 0
    record = json.loads((cfg / "steps_1" / "config.json").read_text())["student"]
    assert record["weight"] == "guidance" and record["default_weight"] == 2.0 and record["weight_range"] == [1, 3]
    assert json.loads((cfg / "config.json").read_text())["train"]["seed"] == 3
    assert json.loads((cfg / "config.json").read_text())["train"]["batch_size"] == 8  # DISTILL's, not the teacher's
    assert len(list((cfg / "checkpoints").glob("step_*.pt"))) == 2  # --checkpoint-every 1: steps 1 and 2
    assert main(["distill", str(teacher_run), "--guide", "none", "--guidance", "2", "--data", "mnist", "--seed", "3",
                 "--weight-range", "1", "3", "--lr", "1e-3", "--out", str(cfg), "--resume", *small]) == 0
    g = tmp_path / "g"
    g_flags = ["--guide-weight", "2.2", "--spacing", "trailing", "--out", str(g), *small]
    monkeypatch.setattr(importlib.import_module("ddpm.devices"), "cpu_flags", lambda: "flags : fpu sse2 avx2 fma")
    with pytest.warns(DdpmWarning) as warned:  # each time, whatever warned before in this process
        assert main(["distill", str(teacher_run), "--final-weight", "2", "--student-average", "0.9",
                     "--teacher-precision", "bf16", "--teacher-span", "2", "--amp", "none", *g_flags]) == 0
    assert [str(w.message) for w in warned if "emulated" in str(w.message)] == [
        "the teacher's calls: bf16 is emulated on this CPU (its flags list neither avx512_bf16 nor amx_bf16): expect "
        "each step to take several times as long as in fp32; --teacher-precision fp32 keeps fp32"]
    assert json.loads((g / "config.json").read_text())["runtime"]["amp"] == "none"
    record = json.loads((g / "steps_1" / "config.json").read_text())["student"]
    assert record["default_weight"] == 2.2 and record["spacing"] == "trailing"
    settings = json.loads((g / "distill.json").read_text())
    assert settings["final_weight"] == 2.0 and settings["student_average"] == 0.9
    assert settings["teacher_precision"] == "bf16" and settings["teacher_span"] == 2
    # as written before the draw, the average, the precision and the span had a choice: uniform (--final-weight 1),
    # the last weights (stop 45 wrote them as --student-ema 0), fp32, 2
    del settings["final_weight"], settings["student_average"], settings["teacher_precision"], settings["teacher_span"]
    (g / "distill.json").write_text(json.dumps({**settings, "student_ema": 0.0}))
    assert main(["distill", str(teacher_run), "--resume-if-exists", *g_flags]) == 2  # the default 3 is another run
    assert main(["distill", str(teacher_run), "--final-weight", "1", "--student-average", "last",
                 "--teacher-precision", "fp32", "--teacher-span", "2", "--resume-if-exists", *g_flags]) == 0
    raw = tmp_path / "raw"  # --no-ema: the teacher is the latest checkpoint's raw weights, and says so
    assert main(["distill", str(teacher_run), "--no-ema", "--out", str(raw), *small]) == 0
    assert json.loads((raw / "distill.json").read_text())["teacher"]["raw_weights"] is True
    assert main(["distill", str(teacher_run), "--out", str(raw), "--resume", *small]) == 2  # another teacher
    capsys.readouterr()
    stopped = tmp_path / "stopped"
    assert main(["distill", str(teacher_run), "--time-limit", "0.01", "--out", str(stopped),
                 "--steps", "1", "--start-steps", "2", "--round-steps", "50", *DISTILL]) == 75
    assert "stopped by the time limit" in capsys.readouterr().err
    assert main(["distill", str(teacher_run), "--ema-length", "0.1", "--out", str(tmp_path / "e"), *small]) == 2
    assert "snapshot" in capsys.readouterr().err and not (tmp_path / "e").exists()


def test_each_rounds_end_is_scored_in_the_log_as_ddpm_eval_scores_the_student(teacher_run, tmp_path, monkeypatch,
                                                                              capsys):
    # The bugs it catches (issue 35: the training log's quality evaluation at the end of each round): a round's end
    # not scored; the student scored as the teacher draws (DPM-Solver++, a guide) instead of its own K calls at its
    # default weight, or with another evaluator than `ddpm eval`'s; and the evaluation on by default for a teacher
    # run that never evaluated (the time budget of a distillation).
    import json

    import ddpm.periodic_eval
    from ddpm.cli import main
    from helpers import logged

    monkeypatch.setattr(ddpm.periodic_eval, "CLASSIFIER_STEPS", 30)
    out = tmp_path / "d"
    assert main(["distill", str(teacher_run), "--steps", "1", "--start-steps", "4", "--round-steps", "2",
                 "--eval-n", "8", "--out", str(out), *DISTILL]) == 0
    assert sorted(logged(out, "eval/steps_2/accuracy")) == [2] and sorted(logged(out, "eval/steps_1/accuracy")) == [4]
    for steps, at in ((2, 2), (1, 4)):
        student = out / f"steps_{steps}"
        assert main(["eval", str(student), "--n", "8", "--no-fid", "--classifier-steps", "30", "--quiet"]) == 0
        (row,) = json.loads((student / "eval" / "eval.json").read_text())["rows"]
        assert row["model_calls"] == steps
        assert logged(out, f"eval/steps_{steps}/classifier_fd")[at] == pytest.approx(row["classifier_fd"], rel=1e-6)
        assert logged(out, f"eval/steps_{steps}/accuracy")[at] == pytest.approx(row["accuracy"])
    capsys.readouterr()
    quiet = tmp_path / "quiet"  # the teacher run never evaluated while training: no evaluation by default
    assert main(["distill", str(teacher_run), "--steps", "2", "--start-steps", "4", "--round-steps", "1",
                 "--out", str(quiet), *DISTILL]) == 0
    assert not logged(quiet, "eval/steps_2/accuracy")
