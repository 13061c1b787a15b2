"""One round of guided progressive distillation (distill.py runs the rounds): the nested grids, the teacher's
target by DDIM or DPM-Solver++(2S), the x0 the student must predict and its weighted loss (Salimans & Ho 2022,
"Progressive Distillation for Fast Sampling of Diffusion Models", Algorithm 2).

With alpha = sqrt(abar) and sigma = sqrt(1 - abar), z = alpha x + sigma eps, and DDIM's step (Song et al. 2021,
eq. 12 with eta = 0) from index s to index t
    z_t = alpha_t x0(z_s) + sigma_t eps(z_s),     x0(z_s) = (z_s - sigma_s eps(z_s)) / alpha_s,
a round draws z_s on the student's grid, takes two teacher steps s -> m -> t (m: the teacher's grid point between),
and asks the student for the x0 whose one DDIM step s -> t lands on the same z_t (Algorithm 2):
    x~ = (z_t - (sigma_t / sigma_s) z_s) / (alpha_t - (sigma_t / sigma_s) alpha_s),
where the step after the grid's last index goes to the image (alpha = 1, sigma = 0, so x~ = z_t). A round with a
teacher span of 4 (the rounds after the second, by default: distill_settings.TEACHER_SPAN) takes four DDIM steps of
the student two rounds back instead of two of the previous one, and learns the same x~ from where they land. Round
1's teacher (the guided model) takes each of its two steps with DPM-Solver++(2S) instead of DDIM by default
(`teacher_solver`): a second-order step through the log-SNR midpoint, two calls of the guided model instead of one,
whose targets make every student after it closer to the digits (benchmarks/RESULTS.md, "Distillation").
"dpmpp2s-span" is the cheap middle: one 2S step across the student's step through the teacher's grid point, the very
calls of DDIM's two steps combined to second order. Later rounds' teachers are students, which were trained to be
exact under DDIM, so they keep DDIM. The loss is the x-space MSE weighted by the truncated SNR max(alpha_s^2 /
sigma_s^2, 1) (the paper's choice, sec. 4); the 2-step student's second step is drawn three times as often as its
first by default (`final_weight`, DistillationObjective._positions), the paper's draw is uniform. No clipping of the
teacher's x0 and no t off the student's grid: each costs quality (DESIGN.md's traps). The student a round writes is
its last weights (the paper's) or, by default, the mean of its second half (distill.STUDENT_AVERAGE). The teacher's
calls may run in bf16 (`teacher_precision`, distill.TEACHER_PRECISIONS): they make targets, take no gradient, and on
a CPU with native bf16 cost a quarter less of a round-1 step.

Grids (samplers.student_timesteps) are diffusers' "trailing" spacing, round(T k / K) - 1 for k = K..1, uniform in t,
or "logsnr", uniform in log-SNR from lambda(T-1) towards lambda(0) with the image as the end. Both start at T-1 and
nest: the grid of 2K steps holds the grid of K steps at its even points. They differ in where the few steps go: the
2-step student's middle point is t = 499 on the trailing grid and t = 302 on the log-SNR one (linear betas, T = 1000),
and the log-SNR student of 2 calls comes out far nearer the digits (RESULTS.md, "Distillation"; the default where
the schedule allows it, distill.resolve_spacing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .config import ConfigError
from .errors import DdpmError
from .samplers import nearest_indices, student_timesteps
from .schedule import NoiseSchedule

# how round 1's teacher makes the student's target: "dpmpp2s" (each of its two steps by DPM-Solver++(2S): four calls),
# "dpmpp2s-span" (one 2S step across both through the teacher's grid point: DDIM's two calls) or "ddim" (two steps)
TEACHER_SOLVERS = ("dpmpp2s", "dpmpp2s-span", "ddim")

Teacher = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]


# -- the grids and the maths ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """A K-step student's grid: for each position j the teacher's path from the index the student's step starts at
    to the index it ends at (-1: the image), span + 1 indices."""

    path: list[list[int]]

    @property
    def start(self) -> list[int]:
        return [p[0] for p in self.path]

    @property
    def middle(self) -> list[int]:
        """The teacher's index halfway along each step (with a span of 2, the one between)."""
        return [p[len(p) // 2] for p in self.path]

    @property
    def end(self) -> list[int]:
        return [p[-1] for p in self.path]


def nested_grid(schedule: NoiseSchedule, steps: int, spacing: str = "trailing", span: int = 2) -> Grid:
    """The student's `steps`-step grid inside its teacher's `span` * `steps`-step grid, both of `spacing`; `span`
    is 2 (the previous round's student) or 4 (the student two rounds back, whose grid holds this one at every fourth
    point)."""
    teacher = student_timesteps(schedule, span * steps, spacing) + [-1]
    student = student_timesteps(schedule, steps, spacing) + [-1]
    if teacher[::span] != student:  # exact rational arithmetic makes this hold for every T; a guard, not a branch
        raise DdpmError(f"the {steps}-step grid is not inside the {span * steps}-step grid")
    return Grid([teacher[j * span:(j + 1) * span + 1] for j in range(steps)])


def alphas_sigmas(schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha = sqrt(abar), sigma = sqrt(1 - abar) in float64 from the betas, with index -1 (the image) appended as
    alpha = 1, sigma = 0, so that `table[index]` serves every step."""
    abar = torch.cumprod(1.0 - schedule.betas_host, dim=0)
    abar = torch.cat([abar, abar.new_ones(1)])
    return abar.sqrt(), (1.0 - abar).clamp(min=0).sqrt()


def ddim_step(z: torch.Tensor, eps: torch.Tensor, alpha_s, sigma_s, alpha_t, sigma_t) -> torch.Tensor:
    """DDIM (eq. 12, eta = 0) from z at (alpha_s, sigma_s) to (alpha_t, sigma_t), given the prediction eps."""
    x0 = (z - sigma_s * eps) / alpha_s
    return alpha_t * x0 + sigma_t * eps


def check_teacher_solver(solver: str) -> None:
    if solver not in TEACHER_SOLVERS:
        raise ConfigError(f"--teacher-solver {solver}: choose one of {', '.join(TEACHER_SOLVERS)}")


def _log_snr(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma) of every index but the image's (-1, where it is infinite); decreasing."""
    return (alpha[:-1] / sigma[:-1]).log()


def _two_stage(eps_fn, z, s, u, t, alpha, sigma, weight_of_u) -> torch.Tensor:
    """The 2S update shared by both solvers (Lu et al. 2022, Algorithm 1): eps at (z, s), a first-order step to u,
    eps there, then z_t = (sigma_t / sigma_s) z + (alpha_t - alpha_s sigma_t / sigma_s) ((1 - k) D_s + k D_u) with
    k = `weight_of_u` per sample (1/(2r); 0 keeps DDIM's first order). alpha_t (1 - exp(-h)) is written as
    alpha_t - alpha_s sigma_t / sigma_s, which at the image (sigma_t = 0) makes z_t the mixed D itself."""
    shape = (-1,) + (1,) * (z.ndim - 1)

    def coeff(table, index):
        return table[index].to(z.dtype).view(shape)

    a_s, s_s, a_u, s_u, a_t, s_t = (coeff(alpha, s), coeff(sigma, s), coeff(alpha, u), coeff(sigma, u),
                                    coeff(alpha, t), coeff(sigma, t))
    eps_s = eps_fn(z, s).to(z.dtype)
    d_s = (z - s_s * eps_s) / a_s
    z_u = a_u * d_s + s_u * eps_s
    d_u = (z_u - s_u * eps_fn(z_u, u).to(z.dtype)) / a_u
    k = weight_of_u.to(z.dtype).view(shape)
    return (s_t / s_s) * z + (a_t - a_s * s_t / s_s) * ((1 - k) * d_s + k * d_u)


def dpmpp_2s_step(eps_fn, z: torch.Tensor, s: torch.Tensor, t: torch.Tensor, alpha: torch.Tensor,
                  sigma: torch.Tensor) -> torch.Tensor:
    """One DPM-Solver++(2S) step from index s to index t, per sample (Lu et al. 2022, "DPM-Solver++", Algorithm 1
    with r chosen by the grid). With lambda = log(alpha / sigma), h = lambda_t - lambda_s and the data predictions
    D(z, i) = (z - sigma_i eps(z, i)) / alpha_i:
        u   = the index nearest the log-SNR midpoint lambda_s + h / 2, r = (lambda_u - lambda_s) / h,
        z_u = alpha_u D_s + sigma_u eps_s                                        (a first-order step to u)
        z_t = (sigma_t / sigma_s) z - alpha_t (exp(-h) - 1) ((1 - 1/(2r)) D_s + 1/(2r) D(z_u, u)).
    A step to the image (t = -1: sigma = 0, h infinite) or between neighbouring indices is the first-order step
    (DDIM's, eq. 12). `eps_fn(z, index)`: the teacher's prediction; `alpha`, `sigma`: alphas_sigmas' tables, index
    -1 the image. Calls eps_fn twice."""
    lam = _log_snr(alpha, sigma)
    final = t < 0
    lam_s = lam[s]
    lam_t = torch.where(final, lam_s, lam[t.clamp(min=0)])
    u = nearest_indices(lam, 0.5 * (lam_s + lam_t))
    second = ~final & (u < s) & (u > t)
    u = torch.where(second, u, s)  # samples without a midpoint evaluate at s again and keep the first order
    half_over_r = torch.where(second, 0.5 * (lam_t - lam_s) / (lam[u] - lam_s), torch.zeros_like(lam_s))
    return _two_stage(eps_fn, z, s, u, t, alpha, sigma, half_over_r)


def dpmpp_2s_span(eps_fn, z: torch.Tensor, s: torch.Tensor, m: torch.Tensor, t: torch.Tensor, alpha: torch.Tensor,
                  sigma: torch.Tensor) -> torch.Tensor:
    """One DPM-Solver++(2S) step from index s to index t whose intermediate point is the grid point m between them
    (Lu et al. 2022, Algorithm 1 with r = (lambda_m - lambda_s) / h). Its two calls are DDIM's two steps' calls: eps
    at z_s, then at the first-order (DDIM) step's z_m; only their combination differs, second order instead of
    first. A step to the image (t = -1, h infinite) is DDIM's two steps, whose end is D_m, the image predicted at
    m (k = 1)."""
    lam = _log_snr(alpha, sigma)
    final = t < 0
    lam_s = lam[s]
    half_over_r = torch.where(final, torch.ones_like(lam_s), 0.5 * (lam[t.clamp(min=0)] - lam_s) / (lam[m] - lam_s))
    return _two_stage(eps_fn, z, s, m, t, alpha, sigma, half_over_r)


def student_target(z_s: torch.Tensor, z_t: torch.Tensor, alpha_s, sigma_s, alpha_t, sigma_t) -> torch.Tensor:
    """The x0 whose one DDIM step from z_s lands on z_t (Salimans & Ho 2022, Algorithm 2)."""
    ratio = sigma_t / sigma_s
    return (z_t - ratio * z_s) / (alpha_t - ratio * alpha_s)


def truncated_snr_weight(alpha, sigma):
    """max(SNR, 1) with SNR = alpha^2 / sigma^2 (Salimans & Ho 2022, sec. 4: "truncated SNR" weighting)."""
    return torch.clamp(alpha**2 / sigma**2, min=1.0)


class DistillationObjective:
    """The Trainer's loss for one round (training.DenoisingObjective's interface): a student of `steps` steps
    learns `span` steps of `teacher` (eps of (z, t, labels, weight)) on the nested grid of `spacing`, taken with
    `solver` (one of TEACHER_SOLVERS; a span of 4 steps by DDIM), each sample at a weight drawn uniformly from
    `weight_range` (None: a student without a weight input). A 2-step student's step to the image is drawn
    `final_weight` times as often as its first (1: alike, the paper's; _positions). The teacher's calls run in
    `teacher_precision`: "bf16" under autocast, "fp32" with autocast off (whatever the training step's)."""

    draw_names = ("position", "noise", "weight")

    def __init__(self, teacher: Teacher, schedule: NoiseSchedule, steps: int,
                 weight_range: tuple[float, float] | None, solver: str = "ddim", spacing: str = "trailing",
                 final_weight: float = 1.0, teacher_precision: str = "fp32", span: int = 2):
        check_teacher_solver(solver)
        if teacher_precision not in ("bf16", "fp32"):
            raise ConfigError(f"teacher precision {teacher_precision}: bf16 or fp32")
        if span not in (2, 4) or (span != 2 and solver != "ddim"):
            raise ConfigError(f"a teacher span of {span} with {solver}: 2 steps with any solver, or 4 DDIM steps")
        self.teacher, self.schedule, self.steps, self.weight_range = teacher, schedule, steps, weight_range
        self.solver, self.final_weight, self.teacher_precision = solver, final_weight, teacher_precision
        self.grid = nested_grid(schedule, steps, spacing, span)
        alpha, sigma = alphas_sigmas(schedule)
        device = schedule.betas.device
        self.index = {name: torch.tensor(getattr(self.grid, name), device=device)
                      for name in ("start", "middle", "end", "path")}
        self.alpha = alpha.to(device=device, dtype=torch.float32)
        self.sigma = sigma.to(device=device, dtype=torch.float32)

    def draw(self, shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        position = self._positions(shape[0], generator, device)
        noise = torch.randn(shape, device=device, generator=generator)
        uniform = torch.rand(shape[0], device=device, generator=generator)
        lo, hi = self.weight_range or (0.0, 0.0)
        return {"position": position, "noise": noise, "weight": lo + (hi - lo) * uniform}

    def _positions(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """n grid positions: a 2-step student's second step (302 -> the image on the log-SNR grid) `final_weight`
        times as likely as its first; any other student's positions alike. The 2-step student loses its distance to
        the digits in that step alone (its first step, handed to the 4-step student's last two, draws as the 4-step
        student does), while weighting the last step of 8- and 4-step students costs them (benchmarks/RESULTS.md,
        "Distillation", stop 44)."""
        if self.steps != 2 or self.final_weight == 1.0:
            return torch.randint(0, self.steps, (n,), device=device, generator=generator)
        share = self.final_weight / (1.0 + self.final_weight)
        return (torch.rand(n, device=device, generator=generator) < share).long()

    def _coefficients(self, index: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (-1,) + (1,) * (ndim - 1)
        return self.alpha[index].view(shape), self.sigma[index].view(shape)

    def losses(self, net, x0: torch.Tensor, labels: torch.Tensor | None, draws: dict[str, torch.Tensor]):
        start, middle, end, path = (self.index[name][draws["position"]] for name in ("start", "middle", "end", "path"))
        weight = draws["weight"] if self.weight_range is not None else None
        a_s, s_s = self._coefficients(start, x0.ndim)
        a_t, s_t = self._coefficients(end, x0.ndim)
        z_s = a_s * x0 + s_s * draws["noise"].to(x0.dtype)
        bf16 = self.teacher_precision == "bf16"
        with torch.no_grad(), torch.autocast(x0.device.type, dtype=torch.bfloat16 if bf16 else None, enabled=bf16):
            if self.solver == "dpmpp2s":
                def eps(z, index):
                    return self.teacher(z, index, labels, weight).float()

                z_m = dpmpp_2s_step(eps, z_s, start, middle, self.alpha, self.sigma)
                z_t = dpmpp_2s_step(eps, z_m, middle, end, self.alpha, self.sigma)
            elif self.solver == "dpmpp2s-span":
                z_t = dpmpp_2s_span(lambda z, index: self.teacher(z, index, labels, weight).float(), z_s, start,
                                    middle, end, self.alpha, self.sigma)
            else:  # DDIM along the teacher's path: start -> middle -> end, or four steps with a span of 4
                z_t = z_s
                for i in range(path.shape[1] - 1):
                    (a_i, s_i), (a_j, s_j) = (self._coefficients(path[:, k], x0.ndim) for k in (i, i + 1))
                    z_t = ddim_step(z_t, self.teacher(z_t, path[:, i], labels, weight).float(), a_i, s_i, a_j, s_j)
            target = student_target(z_s, z_t, a_s, s_s, a_t, s_t)
        output = net(z_s, start, labels, weight=weight) if weight is not None else net(z_s, start, labels)
        x0_student = predicted_x0(self.schedule.prediction, z_s, output.float(), a_s, s_s)
        per_sample = F.mse_loss(x0_student, target, reduction="none").flatten(1).mean(1)
        return per_sample * truncated_snr_weight(a_s, s_s).flatten(), start


def predicted_x0(prediction: str, z: torch.Tensor, output: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The network's output read as x0: v gives x0 = alpha z - sigma v; eps gives x0 = (z - sigma eps) / alpha."""
    if prediction == "v":
        return alpha * z - sigma * output
    return (z - sigma * output) / alpha
