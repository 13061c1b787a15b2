"""The values of the controls both tabs share, without Gradio: where they start (`ddpm sample`'s defaults, or a
student's), their parsers (one-line DdpmError naming the control) and the command-line flags that give the same
sampling."""
from __future__ import annotations

import random
import shlex
from dataclasses import dataclass
from typing import Any

from ..config import MAX_SEED, SAMPLERS, SamplingConfig, sampling_defaults
from ..errors import DdpmError
from ..sources import NO_GUIDE  # --guide none: no autoguidance even when the run has a guide snapshot
from ..students import SAMPLER, Student
from .served import MAX_GUIDANCE, MAX_GUIDE_WEIGHT, RANDOM_SEED, ServedModel


@dataclass(frozen=True)
class GuidanceDefaults:
    """Where the guidance controls start: `ddpm sample`'s defaults for a model with or without a guide."""

    guidance: float  # classifier-free guidance w
    guide_weight: float  # autoguidance g (1 = off)
    interval: tuple[float, float]  # as the two sliders show it: (0, 1) = every step


def guidance_defaults(guided: bool) -> GuidanceDefaults:
    """config.AUTOGUIDED when a guide is loaded; else config.DEFAULT_CFG and SamplingConfig's interval."""
    d = sampling_defaults(guided)
    interval = d["guidance_interval"]
    return GuidanceDefaults(d["guidance"], d["guide_weight"], (0.0, 1.0) if interval is None else tuple(interval))


def control_defaults(served: ServedModel, max_steps: int) -> dict[str, Any]:
    """Where the controls both tabs share start: `ddpm sample`'s defaults for this model (see guidance_defaults), or
    a distilled student's own sampler, steps and weight."""
    d, sampling = guidance_defaults(served.guide is not None), SamplingConfig()
    values = {"class_index": 0 if served.num_classes else None, "guidance": d.guidance,
              "guide_weight": d.guide_weight, "sampler": sampling.sampler,
              "steps": min(sampling.steps_for(len(served.schedule)), max_steps)}
    if served.student is not None:  # a distilled student: its grid and its own weight, no guide
        values.update(student_defaults(served.student))
    return values


def parse_seed(text, rng: random.Random | None = None) -> int:
    """'random' draws a fresh seed (shown afterwards, so the result can be redrawn); otherwise 0..2^32-1."""
    value = "" if text is None else str(text).strip()
    if value.lower() == RANDOM_SEED:
        return (rng or random.SystemRandom()).randrange(2**31)
    if not value:
        raise DdpmError(f"the seed is empty: type a number (0 to {MAX_SEED}) or '{RANDOM_SEED}'")
    try:
        seed = int(value)
    except ValueError:
        raise DdpmError(f"seed {value!r} is not a whole number: type a number (0 to {MAX_SEED}) "
                        f"or '{RANDOM_SEED}'") from None
    if not 0 <= seed <= MAX_SEED:
        raise DdpmError(f"seed {seed} is out of range: use 0 to {MAX_SEED} or '{RANDOM_SEED}'")
    return seed


def parse_whole(value, name: str, low: int, high: int) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DdpmError(f"{name} is empty: give a whole number from {low} to {high}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DdpmError(f"{name} {value!r} is not a number: give a whole number from {low} to {high}") from None
    if not number.is_integer() or not low <= number <= high:
        raise DdpmError(f"{name} must be a whole number from {low} to {high}, got {value}")
    return int(number)


def parse_number(value, name: str, low: float, high: float) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DdpmError(f"{name} is empty: give a number from {low:g} to {high:g}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DdpmError(f"{name} {value!r} is not a number: give one from {low:g} to {high:g}") from None
    if not low <= number <= high:  # also rejects nan
        raise DdpmError(f"{name} must be from {low:g} to {high:g}, got {value}")
    return number


def parse_class(served: ServedModel, value) -> int:
    if isinstance(value, str) and value in served.class_names:  # a client may send the name instead of the index
        value = served.class_names.index(value)
    return parse_whole(value, "the class", 0, served.num_classes - 1)


def parse_guide_weight(served: ServedModel, value, default: float) -> float:
    g = default if value is None else parse_number(value, "guide weight g", 0.0, MAX_GUIDE_WEIGHT)
    if served.guide is None and g != 1.0 and not _student_weight(served, "guide_weight"):
        raise DdpmError(f"guide weight g={g:g} needs a guide model and this page has none: keep g at 1, or start "
                        "ddpm serve with --guide PATH (a model folder, a run folder or a checkpoint .pt)")
    return g


def parse_interval(interval, default: tuple[float, float]) -> tuple[float, float] | None:
    """The sliders' (lo, hi) as SamplingConfig takes it: (0, 1) is every step, None, as `ddpm sample` reads it."""
    lo, hi = (float(v) for v in (default if interval is None else interval))
    return None if (lo, hi) == (0.0, 1.0) else (lo, hi)


def parse_sampling(served: ServedModel, class_index, guidance, sampler, steps, *, guide_weight=None, interval=None,
                   rescale=0.0, threshold=None, max_steps: int) -> tuple[int | None, SamplingConfig]:
    """The controls both tabs share -> (the class, None for an unconditional model; the SamplingConfig), or a
    one-line DdpmError naming the control. `guide_weight` and `interval` (lo, hi) left as None take the page's
    defaults for this model (see guidance_defaults); a `threshold` of 0 is off, as the slider starts there."""
    if sampler not in SAMPLERS:
        raise DdpmError(f"sampler {sampler!r} is unknown: choose one of {', '.join(SAMPLERS)}")
    steps = parse_whole(steps, "steps", 1, min(max_steps, len(served.schedule)))
    defaults = guidance_defaults(served.guide is not None)
    label, w = None, defaults.guidance
    if served.num_classes:
        label = parse_class(served, class_index)
        w = parse_number(guidance, "guidance w", 0.0, MAX_GUIDANCE)
    g = parse_guide_weight(served, guide_weight, defaults.guide_weight)
    # the remaining options are checked by SamplingConfig (a ConfigError is a DdpmError naming the field)
    sampling = SamplingConfig(sampler=sampler, steps=None if sampler == "ddpm" else steps, guidance=w,
                              guide_weight=g, guidance_interval=parse_interval(interval, defaults.interval),
                              guidance_rescale=float(rescale or 0.0),
                              dynamic_threshold=None if threshold in (None, 0, 0.0) else float(threshold))
    if served.student is not None:  # its weight checked against the range it was trained on
        given = {"sampler": sampler, "steps": sampling.steps, "guidance": w, "guide_weight": g}
        sampling = served.student.sampling(sampling, given)
    return label, sampling


def _student_weight(served: ServedModel, name: str) -> bool:
    """Whether the page's model is a distilled student that takes the weight `name` as its input."""
    return served.student is not None and served.student.weight == name


def page_samplers(served: ServedModel) -> list[str]:
    """The sampler menus: every sampler, and a student's own ("student": DDIM on its grid) for a student only."""
    return [name for name in SAMPLERS if name != SAMPLER or served.student is not None]


def student_defaults(student: Student) -> dict:
    """The page's starting values for a student: its sampler, its steps and its default weight."""
    values = {"sampler": SAMPLER, "steps": student.steps, **student.fixed}
    if student.weight is not None:
        values[student.weight] = student.default_weight
    return values


def sampling_flags(served: ServedModel, s: SamplingConfig, labelled: bool) -> list[str]:
    """The command-line flags (`ddpm sample` and `ddpm edit` share them) that give `s` on this page's model: every
    weight with all its digits (repr) and the guide by its path (or `--guide none`), so no default decides."""
    flags = ["--guidance", repr(s.guidance)] if labelled else []
    if served.guide is not None:
        flags += ["--guide", shlex.quote(str(served.guide_path)), "--guide-weight", repr(s.guide_weight)]
    else:
        flags += ["--guide", NO_GUIDE]
    flags += ["--sampler", s.sampler] + (["--sampling-steps", str(s.steps)] if s.sampler != "ddpm" else [])
    if labelled or served.guide is not None:  # the options of either guidance
        lo, hi = s.guidance_interval if s.guidance_interval is not None else (0.0, 1.0)
        flags += ["--guidance-interval", repr(lo), repr(hi)]
        if s.guidance_rescale:
            flags += ["--guidance-rescale", repr(s.guidance_rescale)]
    if s.dynamic_threshold is not None:
        flags += ["--dynamic-threshold", repr(s.dynamic_threshold)]
    return flags
