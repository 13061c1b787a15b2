"""`ddpm serve`: a local web page (Gradio) to sample a trained model. Optional extra: pip install -e '.[ui]'.

The page draws through `pipeline.sample_batches` with the batch size (config.SAMPLE_BATCH), seed and guide that
`ddpm sample` uses, and prints the `ddpm sample` command that draws the same images (same device). A run's guide
snapshot (RUN/guide, or --guide PATH) is loaded with the model for autoguidance; the page then starts from
`ddpm sample`'s guided defaults (config.AUTOGUIDED), otherwise from its classifier-free ones.

The request logic is plain functions (parse_request, cli_equivalent, sample_live, respond) that need no Gradio;
build_app only lays out the widgets and wires them to `respond`. The sampler runs on one long-lived torch thread
(TorchThread); its step callback feeds a queue that the Gradio generator function drains, so the page shows
"step i of K" and the current x0 prediction live. Nothing is written to the model folder: images go to a
temporary folder that is removed when the server stops.
"""
from __future__ import annotations

import atexit
import itertools
import queue
import random
import shlex
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from ..config import MAX_SEED, SAMPLE_BATCH, SamplingConfig
from ..errors import DdpmError
from ..files import keeps_process_frame, save_images
from .edit_tab import build_edit_tab
from .served import (  # noqa: F401 - re-exported: ddpm.serve is the page's public module
    DEFAULT_HOST,
    DEFAULT_IMAGES,
    DEFAULT_PORT,
    INSTALL_HINT,
    MAX_GUIDANCE,
    MAX_GUIDE_WEIGHT,
    MAX_IMAGES,
    MAX_STEPS,
    NO_GUIDE,
    RANDOM_SEED,
    GuidanceDefaults,
    ServedModel,
    TorchThread,
    _class_index,
    _gradio_update,
    _guide_weight,
    _interval,
    _number,
    _whole_number,
    class_names_for,
    grid_array,
    guidance_defaults,
    import_gradio,
    load_served_model,
    page_samplers,
    parse_sampling,
    parse_seed,
    process_array,
    sampling_flags,
    student_defaults,
)

# tiny images shown large, without blur
CSS = ("#result img, #process img, #edit-result img { image-rendering: pixelated; width: 100%; height: 100%; "
       "object-fit: contain; }")
# the page's fields, in the order the "generate" endpoint takes them; and the outputs it updates
FIELDS = ("class_index", "guidance", "guide_weight", "sampler", "steps", "seed", "count", "show_process",
          "interval_lo", "interval_hi", "rescale", "threshold")
OUTPUTS = ("status", "result", "seed_used", "files", "process")





# ---------------------------------------------------------------------------------------------------- the model










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






def page_defaults(served: ServedModel, max_steps: int = MAX_STEPS, max_images: int = MAX_IMAGES) -> dict[str, Any]:
    """The value every field (FIELDS) starts from on the page: `ddpm sample`'s defaults (see guidance_defaults)."""
    d, sampling = guidance_defaults(served.guide is not None), SamplingConfig()
    values = {"class_index": 0 if served.num_classes else None, "guidance": d.guidance,
              "guide_weight": d.guide_weight, "sampler": sampling.sampler,
              "steps": min(sampling.steps_for(len(served.schedule)), max_steps), "seed": RANDOM_SEED,
              "count": min(DEFAULT_IMAGES, max_images), "show_process": False, "interval_lo": d.interval[0],
              "interval_hi": d.interval[1], "rescale": sampling.guidance_rescale,
              "threshold": sampling.dynamic_threshold or 0.0}  # the threshold slider's 0 is off
    if served.student is not None:  # a distilled student: its grid and its own weight, no guide
        values.update(student_defaults(served.student))
    return values














def parse_request(served: ServedModel, class_index, guidance, sampler, steps, seed_text, count, show_process=False,
                  *, guide_weight=None, interval=None, rescale=0.0, threshold=None, max_steps: int = MAX_STEPS,
                  max_images: int = MAX_IMAGES, rng: random.Random | None = None) -> Request:
    """The page's fields -> a Request, or a one-line DdpmError naming the field and the allowed values.

    `guide_weight` and `interval` (lo, hi) left as None take the page's defaults for this model (see
    guidance_defaults); a `threshold` of 0 is off, as the page's slider starts there."""
    count = _whole_number(count, "the number of images", 1, max_images)
    label, sampling = parse_sampling(served, class_index, guidance, sampler, steps, guide_weight=guide_weight,
                                     interval=interval, rescale=rescale, threshold=threshold, max_steps=max_steps)
    labels = None if label is None else (label,) * count
    seed = parse_seed(seed_text, rng)
    return Request(labels, count, sampling, seed, bool(show_process))


def request_from_fields(served: ServedModel, fields: Mapping[str, Any], **limits) -> Request:
    """parse_request on the page's fields by name (FIELDS); `limits`: max_steps, max_images, rng."""
    return parse_request(served, fields["class_index"], fields["guidance"], fields["sampler"], fields["steps"],
                         fields["seed"], fields["count"], fields["show_process"], guide_weight=fields["guide_weight"],
                         interval=(fields["interval_lo"], fields["interval_hi"]), rescale=fields["rescale"],
                         threshold=fields["threshold"], **limits)


def cli_equivalent(served: ServedModel, request: Request) -> str:
    """The `ddpm sample` command that draws the same images (same device). Every weight is written with all its
    digits (repr) and the guide by its path (or `--guide none`), so no default of `ddpm sample` decides anything."""
    parts = ["ddpm sample", shlex.quote(str(served.source))]
    parts += ["--labels", ",".join(str(y) for y in request.labels)] if request.labels is not None else \
        ["--n", str(request.count)]
    parts += sampling_flags(served, request.sampling, request.labels is not None)
    parts += ["--seed", str(request.seed), "--device", str(served.device), "--out", "OUT"]
    return " ".join(parts)


def finished_text(served: ServedModel, request: Request, seconds: float) -> str:
    """The status line of a finished request, with the command that draws the same images."""
    s = request.sampling
    weights = ([f"w={s.guidance:g}"] if request.labels is not None else []) + \
        ([f"g={s.guide_weight:g}"] if served.guide is not None else [])
    what = f" of {served.class_names[request.labels[0]]}" if request.labels is not None else ""
    what += f" ({', '.join(weights)})" if weights else ""
    return (f"done: {request.count} image(s){what}, {s.sampler} {request.total_steps(len(served.schedule))} steps, "
            f"seed {request.seed}, {seconds:.1f}s on {served.device}.  \n"
            f"Same images from the command line: `{cli_equivalent(served, request)}`")


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
    process: np.ndarray | None  # x0 predictions over the kept steps (process_array), if asked for
    seconds: float


class _Stopped(Exception):
    """Raised inside the sampler's callback when the page went away, to end the worker thread early."""


def draw(served: ServedModel, request: Request) -> torch.Tensor:
    """The request's images exactly as `ddpm sample` draws them (no live view): for tests and scripts."""
    return served.worker.run(_sample, served, request, None)


def _sample(served: ServedModel, request: Request, callback) -> torch.Tensor:
    from ..pipeline import sample_batches

    labels = torch.tensor(request.labels, dtype=torch.long) if request.labels is not None else None
    parts = sample_batches(served.model, served.schedule, n=None if labels is not None else request.count,
                           labels=labels, sampling=request.sampling, batch_size=SAMPLE_BATCH, seed=request.seed,
                           callback=callback, guide=served.guide)
    return torch.cat([images for _, images in parts])


def sample_live(served: ServedModel, request: Request) -> Iterator[Step | Finished]:
    """Run the request on the model's torch thread; yield the newest Step whenever the consumer is ready, then
    Finished.

    Steps the consumer was too slow to see are dropped (only the newest is shown), but the last step is always
    yielded. Closing the generator (the page went away) stops the sampler at its next step and waits for that
    (at most one step). Errors from the sampler are re-raised here, in the consumer's thread.
    """
    total = request.total_steps(len(served.schedule))
    size = served.model.config.image_size
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    frames: list[torch.Tensor] = []

    def on_step(i: int, t_index: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        if stop.is_set():
            raise _Stopped
        x0 = x0.detach().float().cpu()
        if request.show_process and keeps_process_frame(i, total):
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
        yield from _newest_events(events)
    finally:
        stop.set()  # the page went away (or we are done): the sampler stops at its next step...
        job.result()  # ...and is done before the next request starts (one request at a time)


def _newest_events(events: queue.Queue) -> Iterator[Step | Finished]:
    """Drain `events` until Finished (yielded last) or an error (raised): of the steps queued since the last
    look, only the newest is yielded."""
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


def respond(served: ServedModel, fields: Mapping[str, Any], folder: Path, **limits) -> Iterator[dict[str, Any]]:
    """One press of Generate, without Gradio: yields updates {output name (OUTPUTS): value}; "process" None means
    hidden, and "warning" carries the message of a refused or failed request. The PNGs go to `folder`, named as
    `ddpm sample` names them. `limits`: max_steps, max_images (see parse_request)."""
    try:
        request = request_from_fields(served, fields, **limits)
    except DdpmError as error:
        yield {"status": f"**Not started:** {error}", "warning": str(error)}
        return
    yield {"status": "starting...", "seed_used": str(request.seed), "files": None, "process": None}
    try:
        for event in sample_live(served, request):
            if isinstance(event, Step):
                yield {"status": f"step {event.index + 1} of {event.total}", "result": event.preview}
                continue
            paths = save_images(event.images, folder, request.labels)
            yield {"status": finished_text(served, request, event.seconds), "result": event.grid,
                   "seed_used": str(request.seed), "files": [str(p) for p in paths], "process": event.process}
    except (DdpmError, NotImplementedError) as error:  # a setting this model or build cannot do
        yield {"status": f"**Failed:** {error}", "warning": str(error)}


# ---------------------------------------------------------------------------------------------------- pictures






# ---------------------------------------------------------------------------------------------------- the page
def build_app(model_dir: Path | str, device: torch.device | str | None = None, *, max_steps: int = MAX_STEPS,
              max_images: int = MAX_IMAGES, served: ServedModel | None = None, guide: Path | str | None = None):
    """The Gradio page (a gr.Blocks, queued one request at a time) for the model in `model_dir`.

    Loads the model (and its guide, see load_served_model) at once, so a missing or broken model fails here with
    a one-line DdpmError. Give `served` (from `load_served_model`) to reuse a loaded model. Launch with
    `launch_app`, which keeps it local.
    """
    gr = import_gradio()
    served = served or load_served_model(model_dir, device, guide)
    limits = {"max_steps": max(1, min(max_steps, len(served.schedule))), "max_images": max_images}
    workdir = Path(tempfile.mkdtemp(prefix="ddpm-serve-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    requests = itertools.count(1)

    # named parameters (not *values): gradio_client shows a script writer these names, in FIELDS' order
    def generate(class_index, guidance, guide_weight, sampler, steps, seed, count, show_process, interval_lo,
                 interval_hi, rescale, threshold):
        values = (class_index, guidance, guide_weight, sampler, steps, seed, count, show_process, interval_lo,
                  interval_hi, rescale, threshold)
        folder = workdir / f"request_{next(requests):05d}"
        for update in respond(served, dict(zip(FIELDS, values)), folder, **limits):
            yield _gradio_update(gr, outputs, update)

    with gr.Blocks(title="ddpm: sample and edit with a model", analytics_enabled=False) as app:
        gr.Markdown(f"## Sample and edit with a diffusion model\n{served.describe()}")
        with gr.Tab("Sample", elem_id="tab-sample"):
            with gr.Row():
                with gr.Column(scale=1, min_width=280):
                    controls = _controls(gr, served, page_defaults(served, **limits), **limits)
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=2):
                    outputs = _outputs(gr)
            button.click(generate, [controls[name] for name in FIELDS], [outputs[name] for name in OUTPUTS],
                         api_name="generate", concurrency_limit=1)
        with gr.Tab("Edit", elem_id="tab-edit"):
            build_edit_tab(gr, served, lambda: workdir / f"request_{next(requests):05d}", limits["max_steps"])
    app.queue(default_concurrency_limit=1, max_size=16)
    return app




def _controls(gr, served: ServedModel, start: dict[str, Any], max_steps: int, max_images: int) -> dict[str, Any]:
    """The settings column's widgets, by field name (FIELDS), starting at `start` (page_defaults)."""
    conditional = bool(served.num_classes)
    controls = {
        "class_index": gr.Dropdown(choices=[(name, i) for i, name in enumerate(served.class_names or [])],
                                   value=start["class_index"], label="Class", visible=conditional, elem_id="class"),
        "guidance": gr.Slider(*_guidance_range(served), value=start["guidance"], step=0.1,
                              label="Classifier-free guidance w", info="0 unconditional, 1 conditional, >1 guided",
                              visible=conditional, elem_id="guidance"),
        "guide_weight": _guide_slider(gr, served, start["guide_weight"]),
        "sampler": gr.Dropdown(choices=page_samplers(served), value=start["sampler"], label="Sampler",
                               info=f"ddpm always takes all T={len(served.schedule)} steps", elem_id="sampler"),
        "steps": gr.Slider(1, max_steps, value=start["steps"], step=1, label="Steps", elem_id="steps"),
        "seed": gr.Textbox(value=start["seed"], label="Seed", info=f"'{RANDOM_SEED}' or a number from 0 to {MAX_SEED}",
                           elem_id="seed"),
        "count": gr.Slider(1, max_images, value=start["count"], step=1, label="Number of images", elem_id="count"),
        "show_process": gr.Checkbox(value=start["show_process"], label="Show process (x0 predictions over the steps)",
                                    elem_id="show-process"),
    }
    with gr.Accordion("Guidance options", open=False, elem_id="guidance-options"):
        controls.update(_guidance_options(gr, served, start))
    return controls


def _guidance_range(served: ServedModel) -> tuple[float, float]:
    """The w slider's ends: 0 to MAX_GUIDANCE, or the weights a student of w was trained on."""
    student = served.student
    return student.weight_range if student is not None and student.weight == "guidance" else (0.0, MAX_GUIDANCE)


def _guide_slider(gr, served: ServedModel, value: float):
    """Autoguidance's weight g; without a guide it stays at 1 (off), greyed out, with a note on how to get one. A
    student of g spans the weights it was trained on."""
    student = served.student
    if student is not None and student.weight == "guide_weight":
        lo, hi = student.weight_range
        return gr.Slider(lo, hi, value=value, step=0.1, label="Guide weight g", elem_id="guide-weight",
                         info=f"{student.describe()}: one call a step at any g from {lo:g} to {hi:g}")
    if served.guide is None:
        info = "no guide for this model (start ddpm serve with --guide PATH): autoguidance is off"
    else:
        info = f"autoguidance by `{served.guide_path}`: 1 = off, >1 = away from the weaker guide's errors"
    return gr.Slider(0, MAX_GUIDE_WEIGHT, value=value, step=0.1, label="Guide weight g", info=info,
                     interactive=served.guide is not None, elem_id="guide-weight")


def _guidance_options(gr, served: ServedModel, start: dict[str, Any]) -> dict[str, Any]:
    """The collapsed options: where and how strongly to guide (shown when there is guidance: a conditional model
    or a guide), and dynamic thresholding (any model)."""
    guided = bool(served.num_classes) or served.guide is not None
    return {
        "interval_lo": gr.Slider(0, 1, value=start["interval_lo"], step=0.05, label="Guide from t/(T-1) =",
                                 visible=guided, elem_id="interval-lo",
                                 info="guidance only on the noisier steps (Kynkaenniemi et al. 2024); "
                                      "0 and 1 = every step"),
        "interval_hi": gr.Slider(0, 1, value=start["interval_hi"], step=0.05, label="to t/(T-1) =", visible=guided,
                                 elem_id="interval-hi"),
        "rescale": gr.Slider(0, 1, value=start["rescale"], step=0.05, label="Guidance rescale phi", visible=guided,
                             elem_id="rescale",
                             info="rescale the guided x0's spread to the conditional one's (Lin et al. 2024)"),
        "threshold": gr.Slider(0, 1, value=start["threshold"], step=0.005, label="Dynamic threshold percentile",
                               elem_id="threshold", info="0 = off; e.g. 0.995 (Imagen)"),
    }


def _outputs(gr) -> dict[str, Any]:
    """The result column's widgets, by output name (OUTPUTS)."""
    return {
        "status": gr.Markdown("Choose the settings and press **Generate**.", elem_id="status"),
        "result": gr.Image(label="Result", type="numpy", format="png", interactive=False, height=320,
                           elem_id="result"),
        "seed_used": gr.Textbox(label="Seed used (type it into Seed to draw the same images again)",
                                interactive=False, elem_id="seed-used"),
        "files": gr.File(label="Images as PNG", file_count="multiple", interactive=False, elem_id="files"),
        "process": gr.Image(label="Process: the x0 prediction over the steps (rows: images, columns: steps)",
                            type="numpy", format="png", interactive=False, visible=False, elem_id="process"),
    }


def launch_app(app, host: str = DEFAULT_HOST, port: int | None = DEFAULT_PORT, *, block: bool = True,
               quiet: bool = False):
    """Serve the page on host:port only: no share link, no browser opened, no telemetry. Returns the app
    (with `app.local_url`) when `block` is False; otherwise serves until Ctrl-C."""
    try:
        app.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block,
                   quiet=quiet, show_error=False, css=CSS, ssr_mode=False, mcp_server=False, pwa=False)
    except OSError as error:
        raise DdpmError(f"cannot listen on {host}:{port} ({error}); pass a free --port") from error
    return app
