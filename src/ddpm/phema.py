"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", sec. 3
and appendix C): power-function EMA profiles, and the least-squares rebuild of any profile from stored snapshots.

The maths only: no files, no training. Time is counted in optimizer steps t = 1, 2, ... (the weights after step t
are theta_t).

A power-function EMA of exponent gamma averages theta_1..theta_t with density proportional to tau^gamma on
[0, t] (eq. 2 of the paper). Its width relative to t is sigma_rel (eq. 3):

    sigma_rel = sqrt(gamma + 1) / ((gamma + 2) * sqrt(gamma + 3))

It is tracked step by step as p_t = beta_t p_{t-1} + (1 - beta_t) theta_t with beta_t = (1 - 1/t)^(gamma + 1)
(eq. 4). The weight of theta_tau in p_t then telescopes to (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1), which
is the density (gamma + 1) s^gamma / t^(gamma+1) integrated over s in [tau - 1, tau]: the discrete average is the
continuous profile applied to the weights held piecewise constant over each step, so the continuous inner
products below are exact for it.

A snapshot of the track (gamma_i) taken at step t_i is the profile f_i(s) = (gamma_i + 1) s^gamma_i / t_i^(gamma_i+1)
on [0, t_i]. Any target profile f_r is approximated by a combination sum_i x_i f_i that minimises the squared
L2 distance to f_r (appendix C.3): the normal equations A x = b with A_ij = <f_i, f_j>, b_i = <f_i, f_r>, and
(for m = min(t_i, t_j))

    <f_i, f_j> = (g_i + 1)(g_j + 1) m^(g_i + g_j + 1) / ((g_i + g_j + 1) t_i^(g_i + 1) t_j^(g_j + 1))

(g = gamma).

The rebuilt weights are sum_i x_i snapshot_i.
"""
from __future__ import annotations

import math

import numpy as np

# EDM2's two tracked lengths: the span they measured optima in lies between them and a little beyond
DEFAULT_LENGTHS = (0.05, 0.10)


def sigma_rel_of(gamma: float) -> float:
    """sigma_rel of a power-function profile of exponent gamma (eq. 3)."""
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


def gamma_of(sigma_rel: float) -> float:
    """The exponent gamma >= 0 whose profile has `sigma_rel` (eq. 3 solved for gamma): the largest real root of
    sigma^2 (g + 2)^2 (g + 3) - (g + 1) = 0, a cubic in g. sigma_rel must be in (0, 1/sqrt(12)]: gamma = 0 is the
    uniform average over the whole run, the widest profile that does not weigh early weights more than late ones."""
    if not 0 < sigma_rel <= sigma_rel_of(0.0):
        raise ValueError(f"an EMA length sigma_rel must be in (0, 0.2887], got {sigma_rel}")
    s2 = sigma_rel * sigma_rel
    # s2 (g^3 + 7 g^2 + 16 g + 12) - g - 1
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def beta(step: int, gamma: float) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1) of the step-t update (eq. 4); 0 at t = 1 (the first update copies)."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner(gamma_a: float, t_a: float, gamma_b: float, t_b: float) -> float:
    """<f_a, f_b>: the integral over s of the two power-function profiles' product (the module docstring)."""
    m = min(t_a, t_b)
    # in logs: t^(gamma+1) overflows float64 for long runs and large gamma
    log = (math.log(gamma_a + 1) + math.log(gamma_b + 1) + (gamma_a + gamma_b + 1) * math.log(m)
           - math.log(gamma_a + gamma_b + 1) - (gamma_a + 1) * math.log(t_a) - (gamma_b + 1) * math.log(t_b))
    return math.exp(log)


def fit(snapshots: list[tuple[float, int]], gamma: float, step: int) -> tuple[np.ndarray, float]:
    """(x, error): x minimises ||sum_i x_i f_i - f_r||^2 for the snapshots (gamma_i, t_i) and the target
    (gamma, step), in float64; error is ||sum_i x_i f_i - f_r|| / ||f_r|| (0 = exactly). Snapshots taken after
    `step` cannot help (their profiles reach past it) and get 0. The normal equations are built once for both."""
    usable = [i for i, (_, t) in enumerate(snapshots) if t <= step]
    x = np.zeros(len(snapshots))
    if not usable:
        return x, 1.0
    a = np.array([[profile_inner(*snapshots[i], *snapshots[j]) for j in usable] for i in usable])
    b = np.array([profile_inner(*snapshots[i], gamma, step) for i in usable])
    solution = np.linalg.lstsq(a, b, rcond=None)[0]
    x[usable] = solution
    target = profile_inner(gamma, step, gamma, step)
    squared = solution @ a @ solution - 2 * solution @ b + target
    return x, math.sqrt(max(squared, 0.0) / target)


def solve_coefficients(snapshots: list[tuple[float, int]], gamma: float, step: int) -> np.ndarray:
    """The coefficients of `fit` alone."""
    return fit(snapshots, gamma, step)[0]


def relative_error(snapshots: list[tuple[float, int]], gamma: float, step: int) -> float:
    """How well the snapshots represent the target profile: `fit`'s error alone."""
    return fit(snapshots, gamma, step)[1]
