"""Guided progressive distillation (distill.py): the target, the weighting, the grids, the student's start, one
round's effect, resume, and drawing a student in K calls."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from ddpm.config import DiffusionConfig
from ddpm.distill import (
    DistillationObjective,
    alphas_sigmas,
    ddim_step,
    nested_grid,
    student_from,
    student_target,
    truncated_snr_weight,
)
from ddpm.schedule import NoiseSchedule
from ddpm.unet import UNet


def reference_abar(timesteps: int) -> list[float]:
    """abar_t = prod (1 - beta_s) for the linear schedule, recomputed here in float64 from the paper's numbers."""
    betas = torch.linspace(1e-4 * 1000 / timesteps, 0.02 * 1000 / timesteps, timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).tolist()


def teacher_grid(timesteps: int, steps: int) -> list[int]:
    """round(T k / steps) - 1 for k = steps..1 (ties to even), written out independently of samplers.py."""
    return [round(Fraction(timesteps * k, steps)) - 1 for k in range(steps, 0, -1)]


@pytest.mark.parametrize("timesteps", [1000, 999, 37])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_the_students_grid_is_every_other_point_of_its_teachers(timesteps, steps):
    # bug caught: a student trained between points its teacher never visits (grids that are not nested), or a
    # position whose two teacher steps are not the two between its own points
    grid = nested_grid(timesteps, steps)
    teacher = teacher_grid(timesteps, 2 * steps) + [-1]
    assert grid.start == teacher_grid(timesteps, steps)
    assert grid.start == teacher[0:-1:2] and grid.middle == teacher[1::2] and grid.end == teacher[2::2]
    assert grid.start[0] == timesteps - 1 and grid.end[-1] == -1


def test_one_student_step_equals_two_teacher_ddim_steps_in_float64():
    # bug caught: a wrong target formula (a sign, sigma ratio inverted, alpha and sigma swapped, the image step
    # treated as an ordinary index) -- checked by running DDIM written out here, in float64, on a known teacher
    timesteps = 1000
    schedule = NoiseSchedule.from_config(DiffusionConfig(timesteps=timesteps))
    assert torch.allclose(torch.tensor(reference_abar(timesteps), dtype=torch.float64), torch.cumprod(1 - schedule.betas_host, 0),
                          rtol=1e-6)  # the linear schedule, to float32's precision of its betas
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

    for steps in (1, 2, 4):
        grid = nested_grid(timesteps, steps)
        for s, m, t in zip(grid.start, grid.middle, grid.end):
            z_s = torch.randn(3, 4, dtype=torch.float64, generator=g)
            z_t = ddim(ddim(z_s, s, m), m, t)
            # the library's pieces: the teacher's two steps, then the target
            z_m = ddim_step(z_s, teacher_eps(z_s, s), alpha[s], sigma[s], alpha[m], sigma[m])
            z_t_lib = ddim_step(z_m, teacher_eps(z_m, m), alpha[m], sigma[m], alpha[t], sigma[t])
            assert torch.allclose(z_t_lib, z_t, rtol=0, atol=1e-12)
            x_target = student_target(z_s, z_t_lib, alpha[s], sigma[s], alpha[t], sigma[t])
            # one DDIM step of the student whose x0 is the target, with the eps that x0 implies at z_s
            eps_student = (z_s - abar[s] ** 0.5 * x_target) / (1 - abar[s]) ** 0.5
            one_step = abar[t] ** 0.5 * x_target + (1 - abar[t]) ** 0.5 * eps_student
            assert torch.allclose(one_step, z_t, rtol=0, atol=1e-9), (steps, s, t)


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
    grid = nested_grid(1000, 8)
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
