"""What the page's tabs share, without Gradio widgets: the model loaded read-only on its torch thread, the limits
and defaults of the controls, the parsers of their values (one-line DdpmError naming the field) and the pictures."""
from __future__ import annotations

import queue
import random
import shlex
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import MAX_SEED, SAMPLERS, SamplingConfig, sampling_defaults
from ..errors import DdpmError
from ..files import grid_upscale, make_grid, process_strip
from ..guidance import Guide
from ..sources import NO_GUIDE  # --guide none: no autoguidance even when the run has a guide snapshot
from ..students import SAMPLER, Student

DEFAULT_HOST = "127.0.0.1"  # this machine only; another address must be asked for with --host
DEFAULT_PORT = 7860
MAX_IMAGES = 16  # per request: the page is for trying a model, not for drawing data sets
MAX_STEPS = 200  # per request, for the samplers that take a step count (ddpm always takes all T steps)
DEFAULT_IMAGES = 4
MAX_GUIDANCE = 10.0  # classifier-free guidance w
MAX_GUIDE_WEIGHT = 5.0  # autoguidance g (Karras et al. 2024 use about 1.5 to 3)
RANDOM_SEED = "random"
INSTALL_HINT = "pip install -e '.[ui]' (in a clone of ddpm) or pip install 'ddpm[ui]'"


def import_gradio():
    """Gradio, or a one-line DdpmError saying how to install it (it is an optional extra)."""
    try:
        import gradio
    except ImportError as error:
        raise DdpmError(f"ddpm serve needs Gradio, which is not installed ({error}); "
                        f"install it with {INSTALL_HINT}") from error
    return gradio


class TorchThread:
    """One long-lived daemon thread that makes every torch call of the page, loading included.

    Why: on a CPU, torch ops from a second thread run slower while the first thread's OpenMP team exists.
    Measured on 2 cores (16x16 quickstart shape, 16 images, 20 DDIM steps): 0.64 s with everything on one thread,
    0.91 s when the model was loaded on the main thread and sampled on another. It also makes one request at a
    time hold at the torch level. A daemon thread, so Ctrl-C never waits for a long request to finish.
    """

    def __init__(self, name: str = "ddpm-serve-torch"):
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as error:  # noqa: BLE001 - handed to whoever waits on the future
                    future.set_exception(error)

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def run(self, fn, *args):
        """fn(*args) on this thread; waits and returns its result (or raises its error)."""
        return self.submit(fn, *args).result()


@dataclass
class ServedModel:
    """A model loaded read-only for the page, with what the controls need to know about it."""

    model: torch.nn.Module
    schedule: object
    config: dict
    device: torch.device
    source: Path
    class_names: list[str] | None = field(default=None)
    guide: Guide | None = None  # autoguidance: a `sources.load_guide` result
    guide_path: Path | None = None  # where the guide came from (printed as `ddpm sample --guide PATH`)
    worker: TorchThread = field(default_factory=TorchThread, repr=False)
    student: Student | None = None  # a distilled student: its grid, its weight and the range it was trained on

    @property
    def num_classes(self) -> int | None:
        return self.model.config.num_classes

    def describe(self) -> str:
        c = self.model.config
        kind = f"{c.num_classes} classes" if c.num_classes else "unconditional"
        step = self.config.get("step")
        trained = f", trained {step} steps" if step is not None else ""
        guide = f"guided by `{self.guide_path}` (autoguidance)" if self.guide is not None else "no guide"
        return (f"`{self.source}`: {c.image_size}x{c.image_size}, {c.in_channels} channel(s), {kind}{trained}; "
                f"T={len(self.schedule)} diffusion steps; {guide}; running on {self.device}")


def class_names_for(config: dict, num_classes: int | None) -> list[str] | None:
    """The saved class names (one per class), or "class 0", "class 1", ... when none were saved; None if
    unconditional."""
    if not num_classes:
        return None
    names = config.get("class_names")
    if isinstance(names, list) and len(names) == num_classes:
        return [str(name) for name in names]
    return [f"class {i}" for i in range(num_classes)]


def load_served_model(model_dir: Path | str, device: torch.device | str | None = None,
                      guide: Path | str | None = None, warn=None, **flags) -> ServedModel:
    """Open a run folder or model folder (only reads it) as `ddpm sample` does (sources.open_model, with the
    sampling-source `flags` of the same names), on the page's torch thread (see TorchThread); DdpmError if
    unusable. `guide` as `ddpm sample --guide`: None = the default (a run's post-hoc default guide or its own guide
    snapshot), "none" = no autoguidance, or a path (a model folder, a run folder or a checkpoint .pt)."""
    worker = TorchThread()
    return worker.run(_load, Path(model_dir), device, guide, worker, warn, flags)


def _load(source: Path, device, guide, worker: TorchThread, warn, flags: dict) -> ServedModel:
    from ..sources import open_model

    if not source.exists():
        raise DdpmError(f"{source} does not exist; give a run folder (runs/NAME) or a model folder "
                        "(model.safetensors + config.json)")
    opened = open_model(source, None if device is None else str(device), warn=warn,
                        guide=None if guide is None else str(guide), **flags)
    config = opened.config
    return ServedModel(opened.model, opened.schedule, config, opened.device, opened.sources.weights,
                       class_names_for(config, opened.model.config.num_classes), opened.guide, opened.sources.guide,
                       worker, opened.student)


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


def _whole_number(value, name: str, low: int, high: int) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DdpmError(f"{name} is empty: give a whole number from {low} to {high}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DdpmError(f"{name} {value!r} is not a number: give a whole number from {low} to {high}") from None
    if not number.is_integer() or not low <= number <= high:
        raise DdpmError(f"{name} must be a whole number from {low} to {high}, got {value}")
    return int(number)


def _number(value, name: str, low: float, high: float) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DdpmError(f"{name} is empty: give a number from {low:g} to {high:g}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DdpmError(f"{name} {value!r} is not a number: give one from {low:g} to {high:g}") from None
    if not low <= number <= high:  # also rejects nan
        raise DdpmError(f"{name} must be from {low:g} to {high:g}, got {value}")
    return number


def _class_index(served: ServedModel, value) -> int:
    if isinstance(value, str) and value in served.class_names:  # a client may send the name instead of the index
        value = served.class_names.index(value)
    return _whole_number(value, "the class", 0, served.num_classes - 1)


def _guide_weight(served: ServedModel, value, default: float) -> float:
    g = default if value is None else _number(value, "guide weight g", 0.0, MAX_GUIDE_WEIGHT)
    if served.guide is None and g != 1.0 and not _student_weight(served, "guide_weight"):
        raise DdpmError(f"guide weight g={g:g} needs a guide model and this page has none: keep g at 1, or start "
                        "ddpm serve with --guide PATH (a model folder, a run folder or a checkpoint .pt)")
    return g


def _interval(interval, default: tuple[float, float]) -> tuple[float, float] | None:
    """The sliders' (lo, hi) as SamplingConfig takes it: (0, 1) is every step, None, as `ddpm sample` reads it."""
    lo, hi = (float(v) for v in (default if interval is None else interval))
    return None if (lo, hi) == (0.0, 1.0) else (lo, hi)


def _as_array(grid: torch.Tensor) -> np.ndarray:
    array = grid.permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def grid_array(images: torch.Tensor, image_size: int, nrow: int | None = None) -> np.ndarray:
    """Images in [-1, 1] as one uint8 numpy grid (H, W[, C]), enlarged like `ddpm sample`'s grids."""
    return _as_array(make_grid(images, nrow=nrow or min(len(images), 8), upscale=grid_upscale(image_size)))


def process_array(frames: list[torch.Tensor], image_size: int) -> np.ndarray:
    """The x0 predictions over the steps (files.process_strip): one row per image, one column per kept step."""
    return _as_array(process_strip(frames, grid_upscale(image_size)))


def _gradio_update(gr, outputs: dict, update: dict[str, Any]) -> dict:
    """A `respond` update keyed by the output components; a warning pops up, the process image shows or hides."""
    if "warning" in update:
        gr.Warning(update["warning"])
    values = {outputs[name]: value for name, value in update.items() if name in outputs}
    if "process" in update:
        values[outputs["process"]] = gr.update(value=update["process"], visible=update["process"] is not None)
    return values



def parse_sampling(served: ServedModel, class_index, guidance, sampler, steps, *, guide_weight=None, interval=None,
                   rescale=0.0, threshold=None, max_steps: int) -> tuple[int | None, SamplingConfig]:
    """The controls both tabs share -> (the class, None for an unconditional model; the SamplingConfig), or a
    one-line DdpmError naming the control. `guide_weight` and `interval` (lo, hi) left as None take the page's
    defaults for this model (see guidance_defaults); a `threshold` of 0 is off, as the slider starts there."""
    if sampler not in SAMPLERS:
        raise DdpmError(f"sampler {sampler!r} is unknown: choose one of {', '.join(SAMPLERS)}")
    steps = _whole_number(steps, "steps", 1, min(max_steps, len(served.schedule)))
    defaults = guidance_defaults(served.guide is not None)
    label, w = None, defaults.guidance
    if served.num_classes:
        label = _class_index(served, class_index)
        w = _number(guidance, "guidance w", 0.0, MAX_GUIDANCE)
    g = _guide_weight(served, guide_weight, defaults.guide_weight)
    # the remaining options are checked by SamplingConfig (a ConfigError is a DdpmError naming the field)
    sampling = SamplingConfig(sampler=sampler, steps=None if sampler == "ddpm" else steps, guidance=w,
                              guide_weight=g, guidance_interval=_interval(interval, defaults.interval),
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
