"""Guidance as denoiser wrappers: classifier-free guidance (Ho & Salimans 2022) and autoguidance (Karras et al.
2024, "Guiding a Diffusion Model with a Bad Version of Itself"), alone or together.

    eps = eps(x, t, y) + (g - 1) (eps(x, t, y) - eps_guide(x, t, y)) + (w - 1) (eps(x, t, y) - eps(x, t, null))

w is classifier-free guidance's weight of the conditional branch: w = 1 is the plain conditional model, w = 0 the
unconditional one, and w > 1 extrapolates away from the unconditional prediction. The CFG paper writes
eps = (1 + w') eps(x, t, y) - w' eps(x, t, null), so w = 1 + w' (our default w = 3 is the paper's w' = 2).

g is autoguidance's weight: the guide is a weaker version of the same model (smaller, or trained for fewer
steps) that makes the same kind of errors more strongly, and g > 1 extrapolates away from them. At w = 1 the
formula is Karras et al. 2024 (sec. 3) D_g = g D_1 + (1 - g) D_0 = D_0 + g (D_1 - D_0), with D_1 the main model
and D_0 the guide, written on eps (an affine function of the denoised image at fixed x_t, so the weights carry
over unchanged). g = 1 turns it off; both weights together add the two extrapolations.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .config import DiffusionConfig, SamplingConfig
from .diffusion import eps_from_output, predict_x0
from .errors import DdpmError
from .schedule import NoiseSchedule


def default_batched(device: torch.device | str) -> bool:
    """One pass over 2N on accelerators (better occupancy); two passes of N on CPU (faster there:
    benchmarks/RESULTS.md)."""
    return torch.device(device).type != "cpu"


class GuidedDenoiser:
    """A denoiser `eps = f(x_t, t)` for fixed labels: classifier-free guidance (weight w) and/or autoguidance by
    a guide network (weight g), combined as in the module docstring. `model` and `guide` return eps (wrap
    v-predicting networks first, as `make_denoiser` does); both take the same labels (None: unconditional).

    Options (all off by default):
      rescale = phi in [0, 1]: guidance rescale (Lin et al. 2024, eq. 15-16) of the whole guided prediction
        against the main conditional one, see `_rescaled`;
      interval = (lo, hi): guide only at steps whose t-index fraction t/(T-1) lies in [lo, hi], both ends
        included (Kynkäänniemi et al. 2024 limit guidance to a middle range of noise levels); elsewhere w = g = 1.
    Both need `schedule` (the x0 conversion and T).

    Model calls per step: w == g == 1, or a step outside the interval: one main call of N; w == 0 and g == 1: one
    null call of N. Otherwise the main model's conditional (and, if w != 1, null) branch as one call of 2N
    (`batched`) or two of N, plus one guide call of N when g != 1 (on the CPU, of only the samples inside the
    interval when a batch mixes noise levels: `_guide_where_it_counts`). The guide is another network with other
    weights, so it can never share the main model's batch: on accelerators it is one more launch, with no host
    sync. `batched=None` picks by device (`default_batched`). The rescale costs no model call.
    """

    def __init__(self, model, labels: torch.Tensor | None, guidance: float = 1.0, batched: bool | None = None, *,
                 guide=None, guide_weight: float = 1.0, rescale: float = 0.0,
                 interval: tuple[float, float] | None = None, schedule: NoiseSchedule | None = None):
        null_class = getattr(model, "null_class", None)
        if (labels is None) != (null_class is None):
            raise DdpmError("labels must be given for a class-conditional model and only for one")
        if null_class is None and not _is(_weight(guidance), 1.0):
            raise DdpmError("classifier-free guidance needs a class-conditional model (num_classes set)")
        if guide is None and not _is(_weight(guide_weight), 1.0):
            raise DdpmError(f"guide_weight={guide_weight} needs a guide model (autoguidance); give guide=")
        if not 0.0 <= rescale <= 1.0:
            raise DdpmError(f"guidance rescale phi={rescale} must be in [0, 1]")
        if (rescale > 0 or interval is not None) and schedule is None:
            raise DdpmError("guidance rescale and guidance interval need the noise schedule: pass schedule=")
        self.model, self.guide, self.labels = model, guide, labels
        self.null_labels = None if labels is None else torch.full_like(labels, null_class)
        # a number, or a tensor [N] of one weight per sample (distillation's teacher draws each sample at its own)
        self.guidance, self.guide_weight = _weight(guidance), _weight(guide_weight)
        device = labels.device if labels is not None else "cpu"
        self.batched = default_batched(device) if batched is None else batched
        self.rescale = float(rescale)
        self.schedule = schedule
        self.interval = None if interval is None else _checked_interval(interval)
        self._guided_index = None if interval is None else _indices_inside(len(schedule), *self.interval)

    def _inside(self, t: torch.Tensor) -> bool | torch.Tensor:
        """Whether t lies in the guidance interval: on the CPU True or False when all samples agree (always so
        inside the samplers, where one t serves the batch), else a bool tensor [N]; on an accelerator always
        the tensor, so that no step synchronises with the host (there a step outside the interval saves no call)."""
        if self._guided_index is None:
            return True
        self._guided_index = self._guided_index.to(t.device)
        inside = self._guided_index[t]
        if t.device.type != "cpu":
            # deciding on the host would make every sampling step wait for the accelerator: blend on the device
            # instead (all branches run)
            return inside
        if bool(inside.all()):
            return True
        return False if not bool(inside.any()) else inside

    @staticmethod
    def _blend(weight: float, inside: bool | torch.Tensor) -> float | torch.Tensor:
        """`weight` inside the interval, 1 (no guidance) outside: a number, or a float32 tensor [N]."""
        if _is(weight, 1.0) or inside is True:
            return weight
        if inside is False:
            return 1.0
        return torch.where(inside, weight, 1.0).to(torch.float32)

    def weight_at(self, t: torch.Tensor) -> float | torch.Tensor:
        """The classifier-free guidance weight w at timestep indices t (see `_inside` for its type)."""
        return self._blend(self.guidance, self._inside(t))

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inside = self._inside(t)
        w, g = self._blend(self.guidance, inside), self._blend(self.guide_weight, inside)
        if _is(g, 1.0) and _is(w, 1.0):
            return self.model(x, t, self.labels)
        if _is(g, 1.0) and _is(w, 0.0):
            return self.model(x, t, self.null_labels)
        eps_cond, eps_null = self._main_branches(x, t, with_null=not _is(w, 1.0))
        eps = eps_cond
        if eps_null is not None:  # eps_null + w (eps_cond - eps_null) = eps_cond + (w - 1) (eps_cond - eps_null)
            eps = eps_null + _per_sample(w, x) * (eps_cond - eps_null)
        if not _is(g, 1.0):
            # (g - 1) times a difference, not g D_1 + (1 - g) D_0: a guide equal to the main model adds exactly 0
            eps = eps + (_per_sample(g, x) - 1.0) * (eps_cond - self._guide_where_it_counts(x, t, inside, eps_cond))
        if self.rescale > 0:
            eps = self._rescaled(eps, eps_cond, x, t)
        return eps

    def _guide_where_it_counts(self, x: torch.Tensor, t: torch.Tensor, inside, eps_cond: torch.Tensor):
        """The guide's eps. With samples on both sides of the interval (`_inside`'s tensor, on the CPU only) it is
        called on those inside alone, and the others get eps_cond: their g is 1, so their guide term is 0 either way.
        Samplers never mix noise levels in a batch; distillation's round 1 does, and skips a quarter of its guide
        calls this way (benchmarks/RESULTS.md, "Distillation", stop 47)."""
        if not isinstance(inside, torch.Tensor) or x.device.type != "cpu":
            return self.guide(x, t, self.labels)
        rows = inside.nonzero().squeeze(1)
        guided = eps_cond.clone()
        guided[rows] = self.guide(x[rows], t[rows], None if self.labels is None else self.labels[rows]).to(
            guided.dtype)
        return guided

    def _main_branches(self, x: torch.Tensor, t: torch.Tensor, with_null: bool):
        """(eps(x, t, y), eps(x, t, null) or None): one call of 2N when batched, else one or two of N."""
        if not with_null:
            return self.model(x, t, self.labels), None
        if self.batched:
            eps_cond, eps_null = self.model(
                torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.labels, self.null_labels])
            ).chunk(2)
            return eps_cond, eps_null
        return self.model(x, t, self.labels), self.model(x, t, self.null_labels)

    def _rescaled(self, eps: torch.Tensor, eps_cond: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Guidance rescale (Lin et al. 2024, eq. 15-16) done on the x0 predictions:

            x0_rescaled = x0_cfg * std(x0_cond) / std(x0_cfg)                         (eq. 15, per sample)
            x0_final = phi * x0_rescaled + (1 - phi) * x0_cfg                          (eq. 16)

        Why x0 and not eps: the failure it fixes is an over-exposed *image* (guided x0 with too large a
        spread), and x0 = (x_t - sigma eps)/alpha is affine in eps with an x_t-dependent offset, so matching the
        stds of the eps predictions does not match those of the images: at high noise eps_cfg keeps std ~ 1
        while the image it implies is blown up. (CFG itself gives the same result in either space: its weights
        sum to 1.) x0_final = k x0_cfg with k = phi std_cond/std_cfg + 1 - phi, so back in eps:
            eps_final = (x_t - alpha k x0_cfg)/sigma = k eps_cfg + (1 - k) x_t / sigma,
        which avoids the cancellation of x_t - alpha x0 at small sigma. A sample whose guided x0 is constant
        (std 0) is left as it is. With autoguidance x0_cfg is the whole guided prediction (both extrapolations
        inflate the spread alike) and x0_cond stays the main model's conditional one."""
        schedule = self.schedule
        dims = list(range(1, x.ndim))
        std_cond = predict_x0(schedule, x, t, eps_cond).std(dim=dims, keepdim=True)
        std_cfg = predict_x0(schedule, x, t, eps).std(dim=dims, keepdim=True)
        ratio = torch.where(std_cfg > 0, std_cond / std_cfg.clamp(min=torch.finfo(std_cfg.dtype).tiny), 1.0)
        k = self.rescale * ratio + (1.0 - self.rescale)
        sigma = schedule.extract("sqrt_one_minus_alphas_cumprod", t, x.ndim)
        return k * eps + (1.0 - k) * x / sigma


class ClassifierFreeGuidance(GuidedDenoiser):
    """Classifier-free guidance alone: a `GuidedDenoiser` with no guide, for a class-conditional model.

    Model calls per step: w == 1, or a step outside the interval: one conditional call of N; w == 0: one null
    call of N; otherwise one call of 2N (`batched`) or two of N."""

    def __init__(self, model: nn.Module, labels: torch.Tensor, guidance: float = 3.0, batched: bool | None = None, *,
                 rescale: float = 0.0, interval: tuple[float, float] | None = None,
                 schedule: NoiseSchedule | None = None):
        if getattr(model, "null_class", None) is None:
            raise DdpmError("classifier-free guidance needs a class-conditional model (num_classes set)")
        super().__init__(model, labels, guidance, batched, rescale=rescale, interval=interval, schedule=schedule)


def _is(weight: float | torch.Tensor, value: float) -> bool:
    """True only for a plain number equal to `value` (a per-sample tensor is never short-cut: no host sync)."""
    return isinstance(weight, float) and weight == value


def _weight(weight: float | torch.Tensor) -> float | torch.Tensor:
    return weight if isinstance(weight, torch.Tensor) else float(weight)


def _per_sample(weight: float | torch.Tensor, x: torch.Tensor) -> float | torch.Tensor:
    """A number as it is; a per-sample tensor [N] shaped to broadcast over x."""
    if isinstance(weight, torch.Tensor):
        return weight.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return weight


def _checked_interval(interval) -> tuple[float, float]:
    lo, hi = (float(v) for v in interval)
    if not 0.0 <= lo <= hi <= 1.0:
        raise DdpmError(f"guidance interval {interval} must be two fractions 0 <= lo <= hi <= 1")
    return lo, hi


def _indices_inside(timesteps: int, lo: float, hi: float) -> torch.Tensor:
    """bool [T]: whether index i has lo <= i/(T-1) <= hi (computed once, exactly in float64, on the CPU)."""
    span = max(timesteps - 1, 1)
    return torch.tensor([lo <= i / span <= hi for i in range(timesteps)], dtype=torch.bool)


class Guide(NamedTuple):
    """A guide network for autoguidance with the diffusion config it was trained under (what `sources.load_guide`
    returns): its prediction type may differ from the main model's, its noise schedule may not."""

    model: nn.Module
    diffusion: DiffusionConfig

    @property
    def prediction(self) -> str:
        return self.diffusion.prediction


def _as_eps(model, schedule: NoiseSchedule, prediction: str):
    """`model` read as an eps predictor: itself for eps, else a converting wrapper (`diffusion.eps_from_output`)
    that keeps its `null_class`."""
    if prediction == "eps":
        return model

    def net(x, t, y=None):
        return eps_from_output(schedule, x, t, model(x, t, y), prediction)

    net.null_class = getattr(model, "null_class", None)
    return net


def _classes(model) -> str:
    config = getattr(model, "config", None)
    count = config.num_classes if config is not None else getattr(model, "null_class", None)
    return f"num_classes {count}" if count else "no classes (unconditional)"


def _guide_net(guide: nn.Module | Guide, model: nn.Module, schedule: NoiseSchedule):
    """The guide as an eps predictor on the main model's schedule. A plain module is taken to predict what the
    main model predicts; a `Guide` says what it predicts and must have been trained on the same noise levels
    (autoguidance compares the two networks at one x_t and t, which only means the same thing on one schedule)."""
    network, prediction = guide, schedule.prediction
    if isinstance(guide, Guide):
        check_guide_schedule(guide.diffusion, schedule)
        network, prediction = guide.model, guide.prediction
    if getattr(network, "null_class", None) != getattr(model, "null_class", None):
        raise DdpmError(f"the guide has {_classes(network)} but the model has {_classes(model)}; "
                        "a guide must be trained on the same classes")
    return _as_eps(network, schedule, prediction)


def check_guide_schedule(diffusion: DiffusionConfig, schedule: NoiseSchedule, name: str = "the guide") -> None:
    """Raise (one line) unless `diffusion` gives the same betas as `schedule`; the prediction type may differ."""
    betas = NoiseSchedule.from_config(diffusion).betas
    if len(betas) != len(schedule):
        raise DdpmError(f"{name} has {len(betas)} timesteps but the model has {len(schedule)}; "
                        "a guide must be trained on the same noise schedule")
    if not torch.allclose(betas, schedule.betas_host.float(), rtol=1e-5, atol=1e-8):  # no device read
        raise DdpmError(f"{name} has a {diffusion.beta_schedule} schedule whose betas differ from the model's "
                        f"(both T={len(betas)}); a guide must be trained on the same noise schedule")


def student_denoiser(model: nn.Module, labels: torch.Tensor | None, weight: float | torch.Tensor,
                     schedule: NoiseSchedule):
    """A distilled student (Meng et al. 2023): the guided prediction at `weight` (a number, or one per sample) in one
    call, with no guide and no unconditional branch."""
    made: dict[tuple, torch.Tensor] = {}  # a number as a tensor [N], made once per batch shape, not at every step

    def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        w = weight if isinstance(weight, torch.Tensor) else made.get((x.shape[0], x.device))
        if w is None:
            w = made[(x.shape[0], x.device)] = torch.full((x.shape[0],), float(weight), device=x.device)
        return eps_from_output(schedule, x, t, model(x, t, labels, weight=w), schedule.prediction)

    return denoiser


def make_denoiser(model: nn.Module, labels: torch.Tensor | None, sampling: SamplingConfig, *, schedule: NoiseSchedule,
                  batched: bool | None = None, guide: nn.Module | Guide | None = None,
                  weights: dict[str, torch.Tensor] | None = None):
    """The eps denoiser a sampler needs: the plain model, or a `GuidedDenoiser` (classifier-free guidance for a
    class-conditional model; autoguidance when a `guide` is given and `sampling.guide_weight` != 1).

    A v-predicting network (`schedule.prediction`, or the guide's own `Guide.prediction`) is converted to eps
    (`diffusion.eps_from_output`) before anything else sees it. `sampling` gives the guidance options (guidance,
    guide_weight, guidance_rescale, guidance_interval); an unconditional model has no classifier-free guidance
    and ignores `guidance`; without a guide `guide_weight` is ignored the same way (a default for runs that have
    one must not break those that have none). `weights` ({"guidance" or "guide_weight": tensor [N]}) replace
    `sampling`'s weight of that name by one weight per sample. A distilled student (`config.weight_input`) takes its
    weight as an input instead: one call a step, no guide."""
    weights = weights or {}
    w, g = weights.get("guidance", sampling.guidance), weights.get("guide_weight", sampling.guide_weight)
    net = _as_eps(model, schedule, schedule.prediction)
    conditional = getattr(model, "null_class", None) is not None
    if not conditional and labels is not None:
        raise DdpmError("labels were given but the model is unconditional (trained without --conditional)")
    if conditional and labels is None:
        raise DdpmError("the model is class-conditional: give labels (e.g. --labels 0,1,2 or --per-class K)")
    student_input = getattr(getattr(model, "config", None), "weight_input", None)
    if student_input is not None:
        if guide is not None:
            raise DdpmError("a distilled student draws its guidance itself and takes no guide")
        return student_denoiser(model, labels, w if student_input == "guidance" else g, schedule)
    options = dict(rescale=sampling.guidance_rescale, interval=sampling.guidance_interval, schedule=schedule)
    if guide is not None and not _is(_weight(g), 1.0):
        return GuidedDenoiser(net, labels, w if conditional else 1.0, batched,
                              guide=_guide_net(guide, model, schedule), guide_weight=g, **options)
    if not conditional:
        return lambda x, t: net(x, t)
    return ClassifierFreeGuidance(net, labels, w, batched, **options)
