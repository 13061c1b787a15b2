"""`ddpm serve`: a local web page (Gradio) to sample a trained model. Optional extra: pip install -e '.[ui]'.

The page draws through `pipeline.sample_batches` with the same batch size and seed that `ddpm sample` uses, so a
seed and settings shown on the page give the same images from the command line (same device). The sampler runs
on one long-lived torch thread (TorchThread); its step callback feeds a queue that the Gradio generator function
drains, so the page shows "step i of K" and the current x0 prediction live. Nothing is written to the model folder: images go to a
temporary folder that is removed when the server stops.
"""
from __future__ import annotations

import argparse
import atexit
import queue
import random
import shlex
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .config import SAMPLERS, SamplingConfig
from .errors import DdpmError

DEFAULT_HOST = "127.0.0.1"  # this machine only; another address must be asked for with --host
DEFAULT_PORT = 7860
MAX_IMAGES = 16  # per request: the page is for trying a model, not for drawing data sets
MAX_STEPS = 200  # per request, for the samplers that take a step count (ddpm always takes all T steps)
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.0
MAX_GUIDANCE = 10.0
DEFAULT_SAMPLER = SamplingConfig.sampler  # the measured default of `ddpm sample`
RANDOM_SEED = "random"
MAX_SEED = 2**32 - 1
CLI_BATCH_SIZE = 256  # `ddpm sample --batch-size` default: batch b is seeded by (seed, b), so it must match
PROCESS_FRAMES = 10  # columns of the "show process" strip
INSTALL_HINT = "pip install -e '.[ui]' (in a clone of ddpm) or pip install 'ddpm[ui]'"
# tiny images shown large, without blur
CSS = "#result img, #process img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }"


def import_gradio():
    """Gradio, or a one-line DdpmError saying how to install it (it is an optional extra)."""
    try:
        import gradio
    except ImportError as error:
        raise DdpmError(f"ddpm serve needs Gradio, which is not installed ({error}); install it with {INSTALL_HINT}") from error
    return gradio


# ---------------------------------------------------------------------------------------------------- the model
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
    worker: TorchThread = field(default_factory=TorchThread, repr=False)

    @property
    def num_classes(self) -> int | None:
        return self.model.config.num_classes

    def describe(self) -> str:
        c = self.model.config
        kind = f"{c.num_classes} classes" if c.num_classes else "unconditional"
        step = self.config.get("step")
        trained = f", trained {step} steps" if step is not None else ""
        return (f"`{self.source}`: {c.image_size}x{c.image_size}, {c.in_channels} channel(s), {kind}{trained}; "
                f"T={len(self.schedule)} diffusion steps; running on {self.device}")


def class_names_for(config: dict, num_classes: int | None) -> list[str] | None:
    """The saved class names (one per class), or "class 0", "class 1", ... when none were saved; None if unconditional."""
    if not num_classes:
        return None
    names = config.get("class_names")
    if isinstance(names, list) and len(names) == num_classes:
        return [str(name) for name in names]
    return [f"class {i}" for i in range(num_classes)]


def load_served_model(model_dir: Path | str, device: torch.device | str | None = None) -> ServedModel:
    """Load a run folder or model folder (only reads it) the way `ddpm sample` does, on the page's torch thread
    (see TorchThread); DdpmError if unusable."""
    worker = TorchThread()
    return worker.run(_load, Path(model_dir), device, worker)


def _load(source: Path, device, worker: TorchThread) -> ServedModel:
    from .checkpoint import from_pretrained
    from .devices import configure_for_speed, pick_device

    if not source.exists():
        raise DdpmError(f"{source} does not exist; give a run folder (runs/NAME) or a model folder (model.safetensors + config.json)")
    try:
        torch_device = pick_device(str(device) if device is not None else None)
    except ValueError as error:  # pick_device's message names the flag and the fix
        raise DdpmError(str(error)) from error
    model, schedule, config = from_pretrained(source, torch_device)
    model, _ = configure_for_speed(model)  # as `ddpm sample` does (results unchanged, steps faster)
    return ServedModel(model, schedule, config, torch_device, source, class_names_for(config, model.config.num_classes), worker)


# ---------------------------------------------------------------------------------------------------- one request
@dataclass(frozen=True)
class Request:
    """One validated request from the page: everything `sample_batches` needs."""

    labels: tuple[int, ...] | None  # conditional models: the class of each image
    count: int
    sampling: SamplingConfig
    seed: int
    show_process: bool = False

    def total_steps(self, timesteps: int) -> int:
        return self.sampling.steps_for(timesteps)


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
        raise DdpmError(f"seed {value!r} is not a whole number: type a number (0 to {MAX_SEED}) or '{RANDOM_SEED}'") from None
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


def parse_request(served: ServedModel, class_index, guidance, sampler, steps, seed_text, count, show_process=False, *,
                  interval=SamplingConfig.guidance_interval, rescale=0.0, threshold=None,
                  max_steps: int = MAX_STEPS, max_images: int = MAX_IMAGES, rng: random.Random | None = None) -> Request:
    """The page's fields -> a Request, or a one-line DdpmError naming the field and the allowed values."""
    count = _whole_number(count, "the number of images", 1, max_images)
    if sampler not in SAMPLERS:
        raise DdpmError(f"sampler {sampler!r} is unknown: choose one of {', '.join(SAMPLERS)}")
    steps = _whole_number(steps, "steps", 1, min(max_steps, len(served.schedule)))
    labels = None
    w = DEFAULT_GUIDANCE
    if served.num_classes:
        names = served.class_names
        if isinstance(class_index, str) and class_index in names:  # a client may send the name instead of the index
            class_index = names.index(class_index)
        label = _whole_number(class_index, "the class", 0, served.num_classes - 1)
        labels = (label,) * count
        if guidance is None or (isinstance(guidance, str) and not guidance.strip()):
            raise DdpmError(f"guidance w is empty: give a number from 0 to {MAX_GUIDANCE:g}")
        try:
            w = float(guidance)
        except (TypeError, ValueError):
            raise DdpmError(f"guidance w {guidance!r} is not a number: give one from 0 to {MAX_GUIDANCE:g}") from None
        if not 0 <= w <= MAX_GUIDANCE:  # also rejects nan
            raise DdpmError(f"guidance w must be from 0 to {MAX_GUIDANCE:g}, got {guidance}")
    seed = parse_seed(seed_text, rng)
    # the guidance options, checked by SamplingConfig (a ConfigError is a DdpmError naming the field); a threshold
    # of 0 means off, as the page's slider starts there
    threshold = None if threshold in (None, 0, 0.0) else float(threshold)
    interval = None if interval is None else tuple(float(v) for v in interval)
    sampling = SamplingConfig(sampler=sampler, steps=steps, guidance=w, guidance_interval=interval,
                              guidance_rescale=float(rescale or 0.0), dynamic_threshold=threshold)
    return Request(labels, count, sampling, seed, bool(show_process))


def cli_equivalent(served: ServedModel, request: Request) -> str:
    """The `ddpm sample` command that draws the same images (same device)."""
    s = request.sampling
    parts = ["ddpm sample", shlex.quote(str(served.source))]
    if request.labels is not None:  # repr: every digit of w, so the command draws exactly these images
        parts += ["--labels", ",".join(str(y) for y in request.labels), "--guidance", repr(s.guidance)]
    else:
        parts += ["--n", str(request.count)]
    parts += ["--sampler", s.sampler]
    if s.sampler != "ddpm":
        parts += ["--sampling-steps", str(s.steps)]
    if request.labels is not None:
        lo, hi = s.guidance_interval if s.guidance_interval is not None else (0.0, 1.0)
        parts += ["--guidance-interval", repr(lo), repr(hi)]
        if s.guidance_rescale:
            parts += ["--guidance-rescale", repr(s.guidance_rescale)]
    if s.dynamic_threshold is not None:
        parts += ["--dynamic-threshold", repr(s.dynamic_threshold)]
    parts += ["--seed", str(request.seed), "--device", str(served.device), "--out", "OUT"]
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------- live sampling
@dataclass
class Step:
    """The sampler finished step `index` (0-based) of `total`; `preview` is its x0 prediction as a grid."""

    index: int
    total: int
    preview: np.ndarray  # uint8 (H, W, C), see grid_array


@dataclass
class Finished:
    images: torch.Tensor  # [N, C, H, W] in [-1, 1], CPU
    grid: np.ndarray  # the images as one uint8 grid (grid_array)
    process: np.ndarray | None  # x0 predictions over ~PROCESS_FRAMES steps (process_array), if asked for
    seconds: float


class _Stopped(Exception):
    """Raised inside the sampler's callback when the page went away, to end the worker thread early."""


def draw(served: ServedModel, request: Request) -> torch.Tensor:
    """The request's images exactly as `ddpm sample` draws them (no live view): for tests and scripts."""
    return served.worker.run(_sample, served, request, None)


def _sample(served: ServedModel, request: Request, callback) -> torch.Tensor:
    from .pipeline import sample_batches

    labels = torch.tensor(request.labels, dtype=torch.long) if request.labels is not None else None
    parts = sample_batches(served.model, served.schedule, n=None if labels is not None else request.count,
                           labels=labels, sampling=request.sampling, batch_size=CLI_BATCH_SIZE, seed=request.seed,
                           callback=callback)
    return torch.cat([images for _, images in parts])


def sample_live(served: ServedModel, request: Request) -> Iterator[Step | Finished]:
    """Run the request on the model's torch thread; yield the newest Step whenever the consumer is ready, then
    Finished.

    Steps the consumer was too slow to see are dropped (only the newest is shown), but the last step is always
    yielded. Closing the generator (the page went away) stops the sampler at its next step and waits for that
    (at most one step). Errors from the sampler are re-raised here, in the consumer's thread.
    """
    total = request.total_steps(len(served.schedule))
    keep_every = max(1, total // PROCESS_FRAMES)
    size = served.model.config.image_size
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    frames: list[torch.Tensor] = []

    def on_step(i: int, t_index: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        if stop.is_set():
            raise _Stopped
        x0 = x0.detach().float().cpu()
        if request.show_process and (i % keep_every == 0 or i == total - 1):
            frames.append(x0.clone())
        events.put(Step(i, total, grid_array(x0, size)))

    def work() -> None:
        start = time.perf_counter()
        try:
            images = _sample(served, request, on_step)
            process = process_array(frames, size) if frames else None
            events.put(Finished(images, grid_array(images, size), process, time.perf_counter() - start))
        except _Stopped:
            pass
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which reports it
            events.put(error)

    job = served.worker.submit(work)
    try:
        while True:
            pending = [events.get()]
            while True:  # take everything already queued: only the newest step is worth showing
                try:
                    pending.append(events.get_nowait())
                except queue.Empty:
                    break
            steps = [event for event in pending if isinstance(event, Step)]
            if steps:
                yield steps[-1]
            for event in pending:
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, Finished):
                    yield event
                    return
    finally:
        stop.set()  # the page went away (or we are done): the sampler stops at its next step...
        job.result()  # ...and is done before the next request starts (one request at a time)


# ---------------------------------------------------------------------------------------------------- pictures
def grid_array(images: torch.Tensor, image_size: int, nrow: int | None = None):
    """Images in [-1, 1] as one uint8 numpy grid (H, W[, C]), enlarged to at least 64 px per image like `ddpm sample`."""
    from .files import make_grid

    grid = make_grid(images, nrow=nrow or min(len(images), 8), upscale=max(1, 64 // image_size))
    array = grid.permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def process_array(frames: list[torch.Tensor], image_size: int):
    """The x0 predictions over the steps: one row per image, one column per kept step."""
    strip = torch.stack(frames, 1).flatten(0, 1)
    return grid_array(strip, image_size, nrow=len(frames))


def write_pngs(images: torch.Tensor, labels: tuple[int, ...] | None, folder: Path) -> list[Path]:
    """Each image as its own PNG, named and encoded as `ddpm sample` writes them (sample_00000_class7.png)."""
    from .files import atomic_write_bytes, png_bytes, sample_name

    paths = []
    for i, image in enumerate(images):
        path = folder / sample_name(i, None if labels is None else labels[i])
        atomic_write_bytes(path, png_bytes(image))
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------- the page
def build_app(model_dir: Path | str, device: torch.device | str | None = None, *, max_steps: int = MAX_STEPS,
              max_images: int = MAX_IMAGES, served: ServedModel | None = None):
    """The Gradio page (a gr.Blocks, queued one request at a time) for the model in `model_dir`.

    Loads the model at once, so a missing or broken model fails here with a one-line DdpmError. Give `served`
    (from `load_served_model`) to reuse a loaded model. Launch with `launch_app`, which keeps it local.
    """
    gr = import_gradio()
    served = served or load_served_model(model_dir, device)
    max_steps = max(1, min(max_steps, len(served.schedule)))
    workdir = Path(tempfile.mkdtemp(prefix="ddpm-serve-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    requests_done = [0]
    conditional = bool(served.num_classes)

    with gr.Blocks(title="ddpm: sample a model", analytics_enabled=False) as app:
        gr.Markdown(f"## Sample a diffusion model\n{served.describe()}")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                choices = [(name, i) for i, name in enumerate(served.class_names or [])]
                class_box = gr.Dropdown(choices=choices, value=0 if conditional else None, label="Class",
                                        visible=conditional, elem_id="class")
                guidance_box = gr.Slider(0, MAX_GUIDANCE, value=DEFAULT_GUIDANCE, step=0.1, label="Guidance w",
                                         info="0 unconditional, 1 conditional, >1 guided", visible=conditional,
                                         elem_id="guidance")
                sampler_box = gr.Dropdown(choices=list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler",
                                          info=f"ddpm always takes all T={len(served.schedule)} steps", elem_id="sampler")
                steps_box = gr.Slider(1, max_steps, value=min(DEFAULT_STEPS, max_steps), step=1, label="Steps",
                                      elem_id="steps")
                seed_box = gr.Textbox(value=RANDOM_SEED, label="Seed", info=f"'{RANDOM_SEED}' or a number from 0 to {MAX_SEED}",
                                      elem_id="seed")
                count_box = gr.Slider(1, max_images, value=min(4, max_images), step=1, label="Number of images",
                                      elem_id="count")
                process_box = gr.Checkbox(value=False, label="Show process (x0 predictions over the steps)",
                                          elem_id="show-process")
                lo, hi = SamplingConfig.guidance_interval
                with gr.Accordion("Guidance options", open=False, visible=conditional):
                    interval_lo = gr.Slider(0, 1, value=lo, step=0.05, label="Guide from t/(T-1) =", elem_id="interval-lo",
                                            info="guidance only on the noisier steps (Kynkaenniemi et al. 2024); 0 and 1 = every step")
                    interval_hi = gr.Slider(0, 1, value=hi, step=0.05, label="to t/(T-1) =", elem_id="interval-hi")
                    rescale_box = gr.Slider(0, 1, value=0.0, step=0.05, label="Guidance rescale phi", elem_id="rescale",
                                            info="rescale the guided x0's spread to the conditional one's (Lin et al. 2024)")
                threshold_box = gr.Slider(0, 1, value=0.0, step=0.005, label="Dynamic threshold percentile", elem_id="threshold",
                                          info="0 = off; e.g. 0.995 (Imagen)")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                status = gr.Markdown("Choose the settings and press **Generate**.", elem_id="status")
                result = gr.Image(label="Result", type="numpy", format="png", interactive=False, height=320, elem_id="result")
                seed_used = gr.Textbox(label="Seed used (type it into Seed to draw the same images again)",
                                       interactive=False, elem_id="seed-used")
                files = gr.File(label="Images as PNG", file_count="multiple", interactive=False, elem_id="files")
                process = gr.Image(label="Process: x0 prediction at every tenth step (rows: images)", type="numpy",
                                   format="png", interactive=False, visible=False, elem_id="process")

        def generate(class_index, guidance, sampler, steps, seed_text, count, show_process, lo=lo, hi=hi, rescale=0.0,
                     threshold=0.0):
            try:
                request = parse_request(served, class_index, guidance, sampler, steps, seed_text, count, show_process,
                                        interval=(lo, hi), rescale=rescale, threshold=threshold,
                                        max_steps=max_steps, max_images=max_images)
            except DdpmError as error:
                gr.Warning(str(error))
                yield {status: f"**Not started:** {error}"}
                return
            yield {status: "starting...", seed_used: str(request.seed), files: None,
                   process: gr.update(value=None, visible=False)}
            try:
                for event in sample_live(served, request):
                    if isinstance(event, Step):
                        yield {status: f"step {event.index + 1} of {event.total}", result: event.preview}
                    else:
                        yield finish(request, event)
            except (DdpmError, NotImplementedError) as error:  # a setting this model or build cannot do
                gr.Warning(str(error))
                yield {status: f"**Failed:** {error}"}

        def finish(request: Request, done: Finished) -> dict:
            requests_done[0] += 1
            folder = workdir / f"request_{requests_done[0]:05d}"
            paths = write_pngs(done.images, request.labels, folder)
            what = ""
            if request.labels is not None:
                what = f" of {served.class_names[request.labels[0]]} (w={request.sampling.guidance:g})"
            text = (f"done: {request.count} image(s){what}, {request.sampling.sampler} "
                    f"{request.total_steps(len(served.schedule))} steps, seed {request.seed}, "
                    f"{done.seconds:.1f}s on {served.device}.  \nSame images from the command line: "
                    f"`{cli_equivalent(served, request)}`")
            strip = done.process if request.show_process else None
            return {status: text, result: done.grid, seed_used: str(request.seed),
                    files: [str(p) for p in paths], process: gr.update(value=strip, visible=strip is not None)}

        inputs = [class_box, guidance_box, sampler_box, steps_box, seed_box, count_box, process_box, interval_lo, interval_hi,
                  rescale_box, threshold_box]
        button.click(generate, inputs, [status, result, seed_used, files, process], api_name="generate",
                     concurrency_limit=1)
    app.queue(default_concurrency_limit=1, max_size=16)
    return app


def launch_app(app, host: str = DEFAULT_HOST, port: int | None = DEFAULT_PORT, *, block: bool = True, quiet: bool = False):
    """Serve the page on host:port only: no share link, no browser opened, no telemetry. Returns the app
    (with `app.local_url`) when `block` is False; otherwise serves until Ctrl-C."""
    try:
        app.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block,
                   quiet=quiet, show_error=False, css=CSS, ssr_mode=False, mcp_server=False, pwa=False)
    except OSError as error:
        raise DdpmError(f"cannot listen on {host}:{port} ({error}); pass a free --port") from error
    return app


# ---------------------------------------------------------------------------------------------------- the command
def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add `ddpm serve` to the CLI's sub-commands (Gradio is imported only when it runs)."""
    parser = subparsers.add_parser(
        "serve", help="a local web page to sample a trained model (needs the [ui] extra)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Open a web page to sample a run folder or a model folder: choose the class, guidance, sampler, "
                    f"steps and seed and watch the images form. Needs Gradio: {INSTALL_HINT}.")
    parser.add_argument("model", help="run folder or model folder (only read, never written)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on; the default serves this machine only, 0.0.0.0 opens the page to your network")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    parser.add_argument("--max-steps", type=int, default=MAX_STEPS, help="most sampling steps one request may ask for")
    return parser


def run_serve(args: argparse.Namespace) -> int:
    """`ddpm serve`: load the model (one-line DdpmError if unusable), then serve the page until Ctrl-C."""
    if not 1 <= args.port <= 65535:
        raise DdpmError(f"--port {args.port} is not a port number; use 1 to 65535 (default {DEFAULT_PORT})")
    if args.max_steps < 1:
        raise DdpmError(f"--max-steps must be >= 1, got {args.max_steps}")
    app = build_app(args.model, args.device, max_steps=args.max_steps)
    print(f"ddpm serve: {args.model} on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    launch_app(app, args.host, args.port, block=True)
    return 0
