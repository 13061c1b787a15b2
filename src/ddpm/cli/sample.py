"""`ddpm sample`: draw images from a run folder or model folder."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..config import (
    SAMPLE_BATCH,
)
from ..errors import DdpmError
from ..files import grid_upscale, keeps_process_frame, save_grid, save_images, save_process
from ..pipeline import balanced_labels, per_class_labels, sample_batches
from . import common


def add_sample_parser(sub) -> None:
    sa = sub.add_parser("sample", help="draw images from a trained model", formatter_class=common.HelpFormatter,
                        description="Sample from a run folder or an exported model folder "
                                    "(model.safetensors + config.json).")
    a = sa.add_argument
    a("model", type=common.folder_path, help="run folder or model folder")
    common.add_out_flag(a, "output folder for the PNGs and the grid")
    a("--n", type=int, help="number of images (unconditional default 16; conditional: balanced classes)")
    a("--labels", type=common.int_list, help="class labels to draw, e.g. 0,1,2 (conditional models)")
    a("--per-class", type=int, help="K images of every class, one grid row per class (conditional default: 8)")
    common.add_sampling_flags(sa)
    common.add_seed_flag(a, "random seed (same seed, same device: same images)")
    common.add_source_flags(sa)
    common.add_batch_size_flag(a, "images per sampling batch (batch b is seeded by (seed, b))", SAMPLE_BATCH)
    a("--process", action="store_true", help="also write the denoising process (x_t over the steps) "
      "as process.png and process.gif")
    common.add_device_flag(a)
    a("--compile", action="store_true",
      help="torch.compile the model (the first step compiles; worth it for many steps)")
    common.add_quiet_flag(a)



def _labels_and_rows(args: argparse.Namespace, num_classes: int | None):
    """(labels or None, n, images per grid row) from --n / --labels / --per-class (_check_counts checked them)."""
    _check_total(max(args.n or 0, (args.per_class or 0) * (num_classes or 1)))
    if num_classes is None:
        if args.labels is not None or args.per_class is not None:
            raise DdpmError("this model is unconditional: it takes --n, not --labels or --per-class")
        if args.guidance is not None:
            raise DdpmError("--guidance needs a class-conditional model; this one is unconditional (drop --guidance, "
                            "or guide it with a weaker version of itself: --guide, --guide-weight)")
        n = 16 if args.n is None else args.n
        return None, n, max(1, min(8, n))
    if args.labels is not None and args.per_class is not None:
        raise DdpmError("give --labels or --per-class, not both")
    if args.labels is not None:
        labels = torch.as_tensor(args.labels, dtype=torch.long)
        return labels, len(labels), max(1, min(len(labels), 10))
    if args.n is not None and args.per_class is None:
        return balanced_labels(args.n, num_classes), args.n, num_classes
    k = 8 if args.per_class is None else args.per_class
    return per_class_labels(k, num_classes), k * num_classes, k


def _check_counts(args: argparse.Namespace) -> None:
    """The counts that need no model, checked before it is opened (a bad one is then one line, before any note)."""
    if args.n is not None and args.n < 1:
        raise DdpmError(f"nothing to sample: --n must be >= 1, got {args.n}")
    if args.per_class is not None and args.per_class < 1:
        raise DdpmError(f"--per-class must be >= 1, got {args.per_class}")
    _check_total(max(args.n or 0, args.per_class or 0))  # per class: the model's classes multiply it later


def _check_total(count: int) -> None:
    if count > common.MAX_SAMPLES:
        raise DdpmError(f"{count:,} images asked for, more than the {common.MAX_SAMPLES:,} one command draws; "
                        "split the job over several seeds")



def cmd_sample(args: argparse.Namespace) -> int:

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DdpmError(f"--out {out} is a file; give a folder for the images")
    if not 1 <= args.batch_size <= common.MAX_SAMPLES:
        raise DdpmError(f"--batch-size must be from 1 to {common.MAX_SAMPLES:,}, got {args.batch_size}")
    _check_counts(args)
    opened = common.open_model(args)
    model, schedule, config, device = opened.model, opened.schedule, opened.config, opened.device
    labels, n, nrow = _labels_and_rows(args, model.config.num_classes)
    if n < 1:
        raise DdpmError(f"nothing to sample: --n must be >= 1, got {n}")
    guide, guide_path = opened.guide, common.guide_path_text(opened)
    sampling = common.sampling_configs(args, guided=guide is not None, student=opened.student)[0]
    steps_total = sampling.steps_for(len(schedule))
    frames, start = [], time.perf_counter()

    def record(i: int, index: int, x, x0) -> None:
        if args.compile and i == 0 and not args.quiet:
            print(f"torch.compile: the first step took {time.perf_counter() - start:.0f}s (compilation included)",
                  file=sys.stderr)
        if args.process and keeps_process_frame(i, steps_total):  # ~10 columns, the last step always
            frames.append(x[: min(len(x), 8)].detach().cpu().clone())

    images = []
    for indices, x in sample_batches(model, schedule, n=n, labels=labels, sampling=sampling, batch_size=args.batch_size,
                                     seed=args.seed, callback=record, progress=not args.quiet, guide=guide):
        save_images(x, out, None if labels is None else labels[indices.start : indices.stop], start=indices.start)
        images.append(x)
    elapsed = time.perf_counter() - start
    upscale = grid_upscale(model.config.image_size)
    grid = save_grid(torch.cat(images), out / "grid.png", nrow=nrow, upscale=upscale)
    guided = guide is not None and sampling.guide_weight != 1
    student = opened.student
    print(f"{_count(n, 'image')} ({sampling.sampler}, {_count(steps_total, 'step')}"
          + (f" = {_count(steps_total, 'call')} of {student.describe()} of {student.teacher}, "
             f"{'g' if student.weight == 'guide_weight' else 'w'}="
             f"{getattr(sampling, student.weight):g}" if student is not None and student.weight else "")
          + (f", classifier-free guidance w={sampling.guidance:g}" if labels is not None and student is None else "")
          + (f", autoguidance g={sampling.guide_weight:g} by {guide_path}" if guided else "")
          # a rebuilt average (--ema-length, or a run's post-hoc default) names its length in its config
          + (f", post-hoc EMA length {config['ema_length']:g}" if config.get("ema_length") is not None else "")
          + f") in {elapsed:.1f}s on {device}")
    if args.process and frames:
        _save_process(frames, out, upscale)
    print(f"grid: {grid}")
    return 0


def _count(k: int, noun: str) -> str:
    """'1 step', '2 steps'."""
    return f"{k} {noun}{'' if k == 1 else 's'}"


def _save_process(frames, out: Path, upscale: int) -> None:
    """process.png (rows: images, columns: steps) and process.gif (the first image over the steps)."""

    png, gif = save_process(frames, out, upscale)
    print(f"denoising process: {png} and {gif}")

