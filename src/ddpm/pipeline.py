"""The one batched sampling path: a model and its schedule in, images out.

`ddpm sample`, `ddpm eval`, the training preview grids and `ddpm serve` all draw through `sample_batches`, so
one seed and one `SamplingConfig` give the same images everywhere: batch b is drawn from a generator seeded by
(seed, b), which also lets an interrupted evaluation redraw exactly the batches it lacks.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterator, Sequence

import torch

from .config import SAMPLE_BATCH, SamplingConfig
from .errors import DdpmError
from .guidance import Guide, make_denoiser
from .modes import eval_mode
from .samplers import StateHook, StepCallback, run_sampler
from .schedule import NoiseSchedule


def balanced_labels(n: int, num_classes: int | None) -> torch.Tensor | None:
    """Classes 0, 1, ..., K-1, 0, 1, ... for n images (None for an unconditional model)."""
    return torch.arange(n) % num_classes if num_classes else None


def per_class_labels(per_class: int, num_classes: int) -> torch.Tensor:
    """K images of class 0, then K of class 1, ...: one grid row per class."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def batch_generator(device: torch.device | str, seed: int, batch: int) -> torch.Generator:
    """The generator of batch `batch`: seeded by (seed, batch), so any batch can be redrawn alone."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + batch)


def _check_labels(model: torch.nn.Module, labels: torch.Tensor | None) -> None:
    num_classes = model.config.num_classes
    if labels is None or not num_classes or len(labels) == 0:
        return
    if labels.min() < 0 or labels.max() >= num_classes:
        bad = sorted({y for y in labels.tolist() if not 0 <= y < num_classes})
        raise DdpmError(f"labels {bad} are out of range: this model has classes 0..{num_classes - 1}")


def sample(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    n: int | None = None,
    *,
    labels: Sequence[int] | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
    sampling: SamplingConfig | None = None,
    batched_guidance: bool | None = None,
    guide: torch.nn.Module | Guide | None = None,
    x_T: torch.Tensor | None = None,
    start_index: int | None = None,
    stop_index: int | None = None,
    state_hook: StateHook | None = None,
    **options,
) -> torch.Tensor:
    """Draw one batch of images in [-1, 1], shape [N, C, H, W], on the model's device.

    Unconditional models take `n`; conditional ones take `labels` (n = len(labels)). The sampler and guidance
    come from `sampling` and/or keyword options of `SamplingConfig` (sampler="dpmpp2m", steps=20, guidance=3, ...).
    The network's output is read as `schedule.prediction` says (eps or v). `guide` (a `sources.load_guide`
    result, or a module predicting what the model predicts) turns on autoguidance when `guide_weight` != 1.
    `x_T`, `start_index`, `stop_index`, `state_hook`: start from a given state at a given timestep index, stop at
    another, and a hook on each new state (`samplers`' docstring; `editing.py` uses them).
    """
    sampling = replace(sampling or SamplingConfig(), **options)
    device = next(model.parameters()).device
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long, device=device)
        _check_labels(model, labels)
        if n is not None and n != len(labels):
            raise DdpmError(f"n={n} disagrees with the {len(labels)} labels given; give one of them")
        n = len(labels)
    if n is None or n < 1:
        raise DdpmError(f"the number of images must be >= 1, got {n}")
    c = model.config
    shape = (n, c.in_channels, c.image_size, c.image_size)
    networks = [model] + ([guide_module(guide, device)] if guide is not None else [])
    with eval_mode(*networks):
        denoiser = make_denoiser(model, labels, sampling, schedule=schedule, batched=batched_guidance, guide=guide)
        return run_sampler(denoiser, schedule, shape, sampling, generator=generator, device=device, callback=callback,
                           progress=progress, x_T=x_T, start_index=start_index, stop_index=stop_index,
                           state_hook=state_hook)


def guide_module(guide: torch.nn.Module | Guide, device: torch.device) -> torch.nn.Module:
    """The guide's network, checked to be on the model's device (a mismatch would fail deep inside a step)."""
    module = guide.model if isinstance(guide, Guide) else guide
    param = next(module.parameters(), None)
    if param is not None and param.device != device:
        raise DdpmError(f"the guide is on {param.device} but the model on {device}; load it onto the same device")
    return module


def sample_batches(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    *,
    n: int | None = None,
    labels: torch.Tensor | None = None,
    sampling: SamplingConfig | None = None,
    batch_size: int = SAMPLE_BATCH,
    seed: int = 0,
    skip: Callable[[range], bool] | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
    guide: torch.nn.Module | Guide | None = None,
) -> Iterator[tuple[range, torch.Tensor]]:
    """Yield (indices, images) batch by batch; images in [-1, 1] on the CPU.

    Give `labels` (conditional) or `n` (unconditional). Batch b covers indices [b*B, (b+1)*B) and is drawn with
    `batch_generator(device, seed, b)`. `skip(indices)` returning True leaves a batch out (e.g. its files exist).
    `callback` sees the steps of the first batch drawn. `guide`: autoguidance, as in `sample`.
    """
    if batch_size < 1:
        raise DdpmError(f"--batch-size must be >= 1, got {batch_size}")
    total = len(labels) if labels is not None else n
    if total is None or total < 1:
        raise DdpmError(f"nothing to sample: the number of images must be >= 1, got {total}")
    device = next(model.parameters()).device
    first = True
    for b, start in enumerate(range(0, total, batch_size)):
        indices = range(start, min(total, start + batch_size))
        if skip is not None and skip(indices):
            continue
        part = labels[indices.start : indices.stop] if labels is not None else None
        x = sample(model, schedule, None if part is not None else len(indices), labels=part, sampling=sampling,
                   generator=batch_generator(device, seed, b), callback=callback if first else None, progress=progress,
                   guide=guide)
        first = False
        yield indices, x.cpu()


def sample_all(model, schedule, **kwargs) -> torch.Tensor:
    """Every image of `sample_batches` at once, in order."""
    return torch.cat([x for _, x in sample_batches(model, schedule, **kwargs)])

