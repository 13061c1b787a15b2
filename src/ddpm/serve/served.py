"""The page's model, without Gradio widgets: loaded read-only on one torch thread as `ddpm sample` opens it, the
limits of the controls, and the pictures the tabs show (uint8 grids)."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DdpmError
from ..files import grid_upscale, make_grid, process_strip
from ..guidance import Guide
from ..sources import open_model
from ..students import Student

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
    if not source.exists():
        raise DdpmError(f"{source} does not exist; give a run folder (runs/NAME) or a model folder "
                        "(model.safetensors + config.json)")
    opened = open_model(source, None if device is None else str(device), warn=warn,
                        guide=None if guide is None else str(guide), **flags)
    config = opened.config
    return ServedModel(opened.model, opened.schedule, config, opened.device, opened.sources.weights,
                       class_names_for(config, opened.model.config.num_classes), opened.guide, opened.sources.guide,
                       worker, opened.student)


def _as_array(grid: torch.Tensor) -> np.ndarray:
    array = grid.permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def grid_array(images: torch.Tensor, image_size: int, nrow: int | None = None) -> np.ndarray:
    """Images in [-1, 1] as one uint8 numpy grid (H, W[, C]), enlarged like `ddpm sample`'s grids."""
    return _as_array(make_grid(images, nrow=nrow or min(len(images), 8), upscale=grid_upscale(image_size)))


def process_array(frames: list[torch.Tensor], image_size: int) -> np.ndarray:
    """The x0 predictions over the steps (files.process_strip): one row per image, one column per kept step."""
    return _as_array(process_strip(frames, grid_upscale(image_size)))
