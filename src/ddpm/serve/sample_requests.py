"""The Sample tab's request layer, without Gradio: the page's fields -> a validated Request, the images drawn live
on the model's torch thread (`ddpm sample`'s path: pipeline.sample_batches, same batch size and seed), and the
`ddpm sample` command that draws the same images."""
from __future__ import annotations

import queue
import random
import shlex
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from ..config import SAMPLE_BATCH, SamplingConfig
from ..errors import DdpmError
from ..files import keeps_process_frame, save_images
from ..pipeline import sample_batches
from .fields import control_defaults, guidance_defaults, parse_sampling, parse_seed, parse_whole, sampling_flags
from .served import DEFAULT_IMAGES, MAX_IMAGES, MAX_STEPS, RANDOM_SEED, ServedModel, grid_array, process_array

# the page's fields, in the order the "generate" endpoint takes them; and the outputs it updates
FIELDS = ("class_index", "guidance", "guide_weight", "sampler", "steps", "seed", "count", "show_process",
          "interval_lo", "interval_hi", "rescale", "threshold")
OUTPUTS = ("status", "result", "seed_used", "files", "process")


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
    """The value every field (FIELDS) starts from on the page: `ddpm sample`'s defaults (see control_defaults)."""
    d, sampling = guidance_defaults(served.guide is not None), SamplingConfig()
    return {**control_defaults(served, max_steps), "seed": RANDOM_SEED, "count": min(DEFAULT_IMAGES, max_images),
            "show_process": False, "interval_lo": d.interval[0], "interval_hi": d.interval[1],
            "rescale": sampling.guidance_rescale,
            "threshold": sampling.dynamic_threshold or 0.0}  # the threshold slider's 0 is off


def parse_request(served: ServedModel, class_index, guidance, sampler, steps, seed_text, count, show_process=False,
                  *, guide_weight=None, interval=None, rescale=0.0, threshold=None, max_steps: int = MAX_STEPS,
                  max_images: int = MAX_IMAGES, rng: random.Random | None = None) -> Request:
    """The page's fields -> a Request, or a one-line DdpmError naming the field and the allowed values.

    `guide_weight` and `interval` (lo, hi) left as None take the page's defaults for this model (see
    guidance_defaults); a `threshold` of 0 is off, as the page's slider starts there."""
    count = parse_whole(count, "the number of images", 1, max_images)
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
