"""Samplers: plain functions over any denoiser `eps = denoiser(x_t, t)`.

They know nothing of training or of the network: a conditional or guided model is passed in as a denoiser
(see `guidance.py`). Every random draw goes through the optional `torch.Generator`, so the same seed gives
the same images on the same device. `callback(i, t_index, x, x0_pred)` is called after every step with the
step number i, the timestep index the model was evaluated at, the new state and the (processed) x0
prediction, e.g. to draw the denoising process.

All three samplers share the x0 processing of `process_x0`: clipping to [-1, 1] and Imagen's dynamic
thresholding.

Editing (`editing.py`) needs three more things of every sampler, and nothing else: `start_index` starts from a
given state `x_T` at that timestep index, running only the sampler's steps at or below it (None: at T-1, the whole
run); `stop_index` stops at the state of that index of the sampler's sequence and returns it, still noisy (None:
the final image); `state_hook(x, index)` returns the state to go on with after each step, where `index` is the
timestep index the new state sits at (-1: the final image). Inpainting puts the known pixels back there; the
samplers never learn about masks.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, Sequence

import torch

from .config import SAMPLERS, SamplingConfig
from .diffusion import Denoiser, predict_x0
from .errors import DdpmError
from .progress import progress as progress_bar
from .schedule import NoiseSchedule

StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
StateHook = Callable[[torch.Tensor, int], torch.Tensor]


def _steps(seq: list[int], start_index: int | None, stop_index: int | None) -> list[tuple[int, int]]:
    """(index, the next state's index; -1: the final image) of each step of a decreasing index sequence that runs
    from `start_index` (None: the first) to `stop_index` (None: the final image)."""
    pairs = list(zip(seq, seq[1:] + [-1]))
    if start_index is not None:
        if not 0 <= start_index <= seq[0]:
            raise DdpmError(f"start_index must be in 0..{seq[0]}, got {start_index}")
        pairs = [(index, nxt) for index, nxt in pairs if index <= start_index]
    if stop_index is not None:
        if stop_index not in seq[1:] or (start_index is not None and stop_index >= start_index):
            raise DdpmError(f"stop_index {stop_index} must be an index of the sampler's sequence below its start")
        pairs = [(index, nxt) for index, nxt in pairs if nxt >= stop_index]
    return pairs


def _initial_noise(shape, device, generator, x_T):
    if x_T is not None:
        return x_T.to(device)
    return torch.randn(shape, device=device, generator=generator)


def _with_progress(items, desc: str, progress: bool):
    return progress_bar(items, desc=desc, leave=False) if progress else items


# ---------------------------------------------------------------------------------------------------------------
# x0 processing


def dynamic_threshold_x0(x0: torch.Tensor, percentile: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3), per sample.

    s = the `percentile` quantile of |x0| over the sample's pixels, s = max(s, 1), x0 = clamp(x0, -s, s) / s.
    Samples whose x0 already lies (mostly) in [-1, 1] have s = 1 and are only clipped; saturated ones are
    pulled back inside instead of being flattened at +-1.
    """
    if not 0 < percentile <= 1:
        raise DdpmError(f"dynamic_threshold={percentile} must be a percentile in (0, 1], e.g. 0.995")
    # torch.quantile interpolates linearly between order statistics, as np.percentile (Imagen's) does
    s = torch.quantile(x0.abs().flatten(1).float(), percentile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.view(-1, *([1] * (x0.ndim - 1)))
    return torch.minimum(torch.maximum(x0, -s), s) / s


def process_x0(x0: torch.Tensor, clip_x0: bool = False, dynamic_threshold: float | None = None) -> torch.Tensor:
    """The x0 prediction after the optional dynamic thresholding, then clipping to [-1, 1] (a no-op after it)."""
    if dynamic_threshold is not None:
        x0 = dynamic_threshold_x0(x0, dynamic_threshold)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    return x0


def _processes_x0(clip_x0: bool, dynamic_threshold: float | None) -> bool:
    return clip_x0 or dynamic_threshold is not None


# ---------------------------------------------------------------------------------------------------------------
# DDPM


@torch.inference_mode()
def ddpm_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    variance: str = "beta",
    clip_x0: bool = False,
    dynamic_threshold: float | None = None,
    x_T: torch.Tensor | None = None,
    start_index: int | None = None,
    stop_index: int | None = None,
    state_hook: StateHook | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2).

    Default (no x0 processing): exactly the paper's update
        x_{t-1} = 1/sqrt(a_t) * (x_t - (1 - a_t)/sqrt(1 - abar_t) * eps) + sigma_t z,   z ~ N(0, I),
    with sigma_t^2 = beta_t (`variance="beta"`, the paper's choice for x_0 ~ N(0, I) data) or beta_tilde_t
    (`variance="beta_tilde"`, eq. 7). No noise is added at the last step (index 0). It is the default because
    it is the formula the model was trained for and adds no hidden bias. With `clip_x0=True` and/or
    `dynamic_threshold=p` the predicted x0 is processed (`process_x0`) and the step uses the posterior mean
    mu_tilde(x_t, x0) of eq. 7 instead: the same mean when the processing changes nothing, and fewer saturated
    pixels for weak or strongly guided models.
    Returns x_0 in the model's range (about [-1, 1]; not clamped).
    """
    if variance not in ("beta", "beta_tilde"):
        raise DdpmError(f"variance must be 'beta' or 'beta_tilde', not {variance!r}")
    device = torch.device(device) if device is not None else schedule.betas.device
    x = _initial_noise(shape, device, generator, x_T)
    n = x.shape[0]
    log_var = (
        torch.log(schedule.betas) if variance == "beta" else schedule.posterior_log_variance_clipped
    )
    processing = _processes_x0(clip_x0, dynamic_threshold)
    pairs = _steps(list(range(len(schedule) - 1, -1, -1)), start_index, stop_index)
    for i, (index, _) in enumerate(_with_progress(pairs, "ddpm", progress)):
        t = torch.full((n,), index, device=device, dtype=torch.long)
        eps = denoiser(x, t)
        x0 = predict_x0(schedule, x, t, eps)
        if processing:
            x0 = process_x0(x0, clip_x0, dynamic_threshold)
            mean = schedule.posterior_mean_coef1[index] * x0 + schedule.posterior_mean_coef2[index] * x
        else:
            mean = schedule.sqrt_recip_alphas[index] * (x - schedule.eps_coef[index] * eps)
        if index > 0:
            noise = torch.randn(x.shape, device=device, generator=generator, dtype=x.dtype)
            x = mean + (0.5 * log_var[index]).exp() * noise
        else:
            x = mean
        if state_hook is not None:
            x = state_hook(x, index - 1)
        if callback is not None:
            callback(i, index, x, x0)
    return x


# ---------------------------------------------------------------------------------------------------------------
# DDIM


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """`steps` indices spread evenly from T-1 down to 0 (both ends included: the last step reaches x_0)."""
    if not 1 <= steps <= timesteps:
        raise DdpmError(f"sampling steps must be in 1..{timesteps}, got {steps}")
    if steps == 1:
        return [timesteps - 1]
    raw = torch.linspace(timesteps - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    return list(dict.fromkeys(raw))  # unique, order kept


@torch.inference_mode()
def ddim_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    *,
    steps: int = 50,
    eta: float = 0.0,
    timesteps: list[int] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    clip_x0: bool = False,
    dynamic_threshold: float | None = None,
    x_T: torch.Tensor | None = None,
    start_index: int | None = None,
    stop_index: int | None = None,
    state_hook: StateHook | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) over a subsequence of `steps` timesteps.

        x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
        sigma = eta * sqrt((1 - abar_prev)/(1 - abar_t)) * sqrt(1 - abar_t/abar_prev)      (eq. 16)

    eta=0 is deterministic given x_T; eta=1 matches DDPM's posterior variance. abar_prev = 1 after the last step.
    With x0 processing (`clip_x0`, `dynamic_threshold`) eps is recomputed from the processed x0 so the pair
    stays consistent with x_t, as the DDIM reference implementation does after clipping. `timesteps`: the
    decreasing indices to evaluate at instead of `ddim_timesteps(T, steps)` (a distilled student's grid).
    """
    device = torch.device(device) if device is not None else schedule.betas.device
    x = _initial_noise(shape, device, generator, x_T)
    n = x.shape[0]
    pairs = _steps(timesteps or ddim_timesteps(len(schedule), steps), start_index, stop_index)
    abar = schedule.alphas_cumprod
    one = abar.new_ones(())
    processing = _processes_x0(clip_x0, dynamic_threshold)
    for i, (index, prev) in enumerate(_with_progress(pairs, "ddim", progress)):
        t = torch.full((n,), index, device=device, dtype=torch.long)
        eps = denoiser(x, t)
        x0 = predict_x0(schedule, x, t, eps)
        if processing:
            x0 = process_x0(x0, clip_x0, dynamic_threshold)
            eps = (x - abar[index].sqrt() * x0) / (1 - abar[index]).sqrt()
        abar_t = abar[index]
        abar_prev = abar[prev] if prev >= 0 else one
        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
        x = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and prev >= 0:
            x = x + sigma * torch.randn(x.shape, device=device, generator=generator, dtype=x.dtype)
        if state_hook is not None:
            x = state_hook(x, prev)
        if callback is not None:
            callback(i, index, x, x0)
    return x


@torch.inference_mode()
def ddim_invert(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    *,
    steps: int = 50,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM inversion (Song et al. 2021, sec. 5.3; Dhariwal & Nichol 2021, appendix F): eq. 12 with eta = 0 run
    from the image up to index T-1, i.e. the state that `ddim_sample(..., steps=steps, eta=0)` decodes back to
    about the image.

    The image stands for the state at index 0 (its noise level sqrt(1 - abar_0) = 0.01 is below a grey level).
    Each step from index s up to the next index t of the same sequence as `ddim_timesteps` is
        x_t = sqrt(abar_t) x0(x_s, s) + sqrt(1 - abar_t) eps(x_s, s),
    the sampler's step with eps taken at the start of the step (x_t is not known yet): the only approximation,
    which shrinks with the step size and which the round trip's error measures (benchmarks/RESULTS.md). Calls
    the denoiser steps - 1 times; returns x at index T-1.
    """
    seq = ddim_timesteps(len(schedule), steps)[::-1]  # 0, ..., T-1
    abar = schedule.alphas_cumprod
    x = x0
    for index, nxt in _with_progress(list(zip(seq, seq[1:])), "ddim inversion", progress):
        t = torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)
        eps = denoiser(x, t)
        x0_pred = predict_x0(schedule, x, t, eps)
        x = abar[nxt].sqrt() * x0_pred + (1 - abar[nxt]).sqrt() * eps
    return x


# ---------------------------------------------------------------------------------------------------------------
# DPM-Solver++(2M)


def _alphas_cumprod_float64(schedule: NoiseSchedule) -> torch.Tensor:
    """abar in float64 on the CPU, rebuilt from the betas: 1 - abar near index 0 is ~beta_1 ~ 1e-4, which the
    float32 abar table holds to only ~3 digits (1 - 0.9999 in float32); the float32 betas hold it to ~7."""
    return torch.cumprod(1.0 - schedule.betas_host, dim=0)  # the host copy: no device read


def log_snr(schedule: NoiseSchedule) -> torch.Tensor:
    """lambda_t = log(alpha_t / sigma_t) with alpha = sqrt(abar), sigma = sqrt(1 - abar)  (Lu et al. 2022),
    float64 [T]."""
    abar = _alphas_cumprod_float64(schedule)
    return 0.5 * (torch.log(abar) - torch.log1p(-abar))


def trailing_timesteps(timesteps: int, steps: int) -> list[int]:
    """round(T (steps - k) / steps) - 1 for k = 0..steps-1: T-1 first, uniform in t (diffusers' "trailing",
    Lin et al. 2024 table 2). Exact rational arithmetic, ties to even as numpy's round. Distinct because the
    spacing T/steps is >= 1."""
    return [round(Fraction(timesteps * (steps - k), steps)) - 1 for k in range(steps)]


def nearest_indices(lambdas: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """For each of `targets`, the index whose lambda is nearest (ties: the lower index)."""
    return (lambdas[None, :] - targets[:, None]).abs().argmin(dim=1)


STUDENT_SPACINGS = ("trailing", "logsnr")  # the grids a distilled student can be trained on (student_timesteps)


def nested_logsnr_timesteps(schedule: NoiseSchedule, steps: int) -> list[int]:
    """The indices nearest to lambda_j = lambda(T-1) + j (lambda(0) - lambda(T-1)) / steps for j = 0..steps-1:
    uniform in log-SNR, T-1 first, the image after the last. Unlike dpmpp_2m_timesteps' "logsnr" (whose last point
    is index 0 itself) the image is the grid's end, so the grid of 2K steps holds the grid of K steps at its even
    points (the same lambda targets), as progressive distillation needs. One line when two targets share an index
    (too few timesteps for this many steps)."""
    lambdas = log_snr(schedule)
    lo, hi = float(lambdas[-1]), float(lambdas[0])
    targets = lo + (hi - lo) * torch.arange(steps, dtype=torch.float64) / steps
    indices = nearest_indices(lambdas, targets).tolist()
    if any(a <= b for a, b in zip(indices, indices[1:])):
        raise DdpmError(f"the log-SNR grid of {steps} steps needs more than the schedule's {len(lambdas)} timesteps "
                        "(two steps fall on one index); use the trailing spacing")
    return indices


def student_timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "trailing") -> list[int]:
    """The grid a distilled student of `steps` steps draws on (and was trained on, distill_target.nested_grid):
    "trailing" (uniform in t) or "logsnr" (nested_logsnr_timesteps). Both nest: halving the steps keeps every
    other point."""
    if spacing == "trailing":
        return trailing_timesteps(len(schedule), steps)
    if spacing == "logsnr":
        return nested_logsnr_timesteps(schedule, steps)
    raise DdpmError(f"a student's spacing must be one of {', '.join(STUDENT_SPACINGS)}, not {spacing!r}")


def _logsnr_indices(lambdas: torch.Tensor, steps: int) -> list[int]:
    """Indices whose lambda is nearest to `steps` values uniform in lambda from lambda(T-1) to lambda(0).

    Near either end lambda moves by more than one target gap per index, so several targets can share a
    nearest index; they are then pushed apart by the fewest index units (from the low-noise end each index is
    at least one above the next, and from the high-noise end at most T-1-k), which keeps exactly `steps`
    distinct, decreasing indices with T-1 first and 0 last.
    """
    T = lambdas.numel()
    if steps == 1:
        return [T - 1]
    targets = torch.linspace(float(lambdas[-1]), float(lambdas[0]), steps, dtype=torch.float64)
    nearest = nearest_indices(lambdas, targets).tolist()
    indices = list(nearest)
    for k in range(steps - 2, -1, -1):  # from the low-noise end: strictly above the next index
        indices[k] = max(indices[k], indices[k + 1] + 1)
    return [min(index, T - 1 - k) for k, index in enumerate(indices)]  # the min of two decreasing sequences


def dpmpp_2m_timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "trailing") -> list[int]:
    """The `steps` timestep indices DPM-Solver++(2M) evaluates the model at, decreasing, T-1 first.

    After the last of them the solver steps to sigma = 0 (the data). "trailing": uniform in t, the last index
    about T/steps - 1 (as diffusers' timestep_spacing="trailing"); "logsnr": uniform in lambda = log(alpha/sigma)
    between the schedule's ends (Lu et al. 2022's recommended spacing), the last index 0.
    """
    T = len(schedule)
    if not 1 <= steps <= T:
        raise DdpmError(f"sampling steps must be in 1..{T}, got {steps}")
    if spacing == "trailing":
        return trailing_timesteps(T, steps)
    if spacing == "logsnr":
        return _logsnr_indices(log_snr(schedule), steps)
    raise DdpmError(f"spacing must be 'trailing' or 'logsnr', not {spacing!r}")


def _second_order_x0(x0: torch.Tensor, x0_prev: torch.Tensor, h: float, h_prev: float) -> torch.Tensor:
    """D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},  r_i = h_{i-1} / h_i  (Lu et al. 2022, Algorithm 2)."""
    half_inv_r = h / (2.0 * h_prev)
    return (1.0 + half_inv_r) * x0 - half_inv_r * x0_prev


@torch.inference_mode()
def dpmpp_2m_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    *,
    steps: int = 20,
    spacing: str = "trailing",
    clip_x0: bool = False,
    dynamic_threshold: float | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    x_T: torch.Tensor | None = None,
    start_index: int | None = None,
    stop_index: int | None = None,
    state_hook: StateHook | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): a deterministic multistep solver of the
    diffusion ODE in its data-prediction form, over lambda = log(alpha/sigma), alpha = sqrt(abar), sigma = sqrt(1-abar).

    With s the current index, t the next one and h = lambda_t - lambda_s > 0 (eq. 4.5 and Algorithm 2):
        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D,
    where D = x0(x_s) on the first step (first order: DDIM) and on later ones
        D = (1 + 1/(2r)) x0(x_s) - 1/(2r) x0(x_prev),   r = h_prev / h.
    The last step goes to sigma = 0 and is first order, as in diffusers with final_sigmas_type="zero"
    (a second-order one would need r = h_prev / inf): with sigma_t = 0, alpha_t = 1 and e^{-h} = 0 it returns
    the last x0 prediction. One model evaluation per step; `steps` evaluations in all.

    The step coefficients are computed in float64 from the float64 abar (tables of T numbers, so free); the
    tensors themselves stay in the input's dtype (float64 does not exist on MPS and costs a lot on GPUs), which
    only rounds a sum of two or three terms.
    """
    device = torch.device(device) if device is not None else schedule.betas.device
    pairs = _steps(dpmpp_2m_timesteps(schedule, steps, spacing), start_index, stop_index)
    abar = _alphas_cumprod_float64(schedule)
    alpha, sigma = abar.sqrt().tolist(), (1.0 - abar).sqrt().tolist()
    lam = log_snr(schedule).tolist()
    x = _initial_noise(shape, device, generator, x_T)
    n = x.shape[0]
    x0_prev = h_prev = None
    for i, (index, nxt) in enumerate(_with_progress(pairs, "dpm++2m", progress)):
        t = torch.full((n,), index, device=device, dtype=torch.long)
        eps = denoiser(x, t)
        x0 = (x - sigma[index] * eps) / alpha[index]  # eq. 4 inverted
        x0 = process_x0(x0, clip_x0, dynamic_threshold)
        if nxt < 0:
            x = x0  # the first-order step to sigma = 0
        else:
            h = lam[nxt] - lam[index]
            d = x0 if x0_prev is None else _second_order_x0(x0, x0_prev, h, h_prev)
            x = (sigma[nxt] / sigma[index]) * x - (alpha[nxt] * math.expm1(-h)) * d
            x0_prev, h_prev = x0, h
        if state_hook is not None:
            x = state_hook(x, nxt)
        if callback is not None:
            callback(i, index, x, x0)
    return x


# ---------------------------------------------------------------------------------------------------------------
# settings -> sampler


def sampler_timesteps(sampling: SamplingConfig, schedule) -> list[int]:
    """The timestep indices at which `sampling`'s sampler calls the denoiser, once each."""
    steps = sampling.steps_for(len(schedule))
    if sampling.sampler == "ddpm":
        return list(range(len(schedule) - 1, -1, -1))
    if sampling.sampler == "ddim":
        return ddim_timesteps(len(schedule), steps)
    if sampling.sampler == "student":
        return student_timesteps(schedule, steps, sampling.spacing)
    return dpmpp_2m_timesteps(schedule, steps, sampling.spacing)


def run_sampler(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    sampling: SamplingConfig,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
    x_T: torch.Tensor | None = None,
    start_index: int | None = None,
    stop_index: int | None = None,
    state_hook: StateHook | None = None,
) -> torch.Tensor:
    """Run the sampler that `sampling` names with its options: the one dispatch from settings to sampler functions.

    Guidance options (guidance, guidance_rescale, guidance_interval) live in the denoiser (`make_denoiser`);
    eta is DDIM's only; spacing is DPM-Solver++'s and a student's. `x_T`, `start_index`, `stop_index`,
    `state_hook`: see the module's docstring."""
    common = dict(generator=generator, device=device, clip_x0=sampling.clip_x0,
                  dynamic_threshold=sampling.dynamic_threshold, callback=callback, progress=progress, x_T=x_T,
                  start_index=start_index, stop_index=stop_index, state_hook=state_hook)
    steps = sampling.steps_for(len(schedule))
    if sampling.sampler == "ddpm":
        return ddpm_sample(denoiser, schedule, shape, **common)
    if sampling.sampler == "ddim":
        return ddim_sample(denoiser, schedule, shape, steps=steps, eta=sampling.eta, **common)
    if sampling.sampler == "student":  # DDIM on the grid a distilled student was trained for (distill.py)
        return ddim_sample(denoiser, schedule, shape, timesteps=student_timesteps(schedule, steps, sampling.spacing),
                           **common)
    if sampling.sampler == "dpmpp2m":
        return dpmpp_2m_sample(denoiser, schedule, shape, steps=steps, spacing=sampling.spacing, **common)
    raise DdpmError(f"sampler must be one of {SAMPLERS}, not {sampling.sampler!r}")
