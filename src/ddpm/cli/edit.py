"""`ddpm edit`: inpainting, image-to-image and interpolation with a trained model."""
from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import torch

from ..config import SAMPLE_BATCH
from ..editing import INVERSION_STEPS, edit_batches, interpolate_images, interpolate_seeds
from ..errors import DdpmError
from ..files import atomic_write_bytes, grid_upscale, png_bytes, save_grid, save_images
from ..images import MASK_THRESHOLD, read_image_to_edit, read_mask, uint8_to_model_range
from . import common

MAX_FRAMES = 1000


def add_edit_parser(sub) -> None:
    ed = sub.add_parser(
        "edit", help="inpaint, image-to-image or interpolate with a trained model",
        formatter_class=common.HelpFormatter,
        description="Edit images with a run folder or model folder, one of three ways: --mask MASK inpaints (white "
                    "= regenerate, black = keep), --strength S redraws the images from noise level S (SDEdit), "
                    "--interpolate N walks in N frames between two images (DDIM inversion) or two --seeds. Images "
                    "are read, resized and cropped exactly as training data is. Sampling flags are `ddpm "
                    "sample`'s.",
        epilog="examples:  ddpm edit runs/quickstart digits/ --mask masks/ --labels 3 --out filled;  "
               "ddpm edit runs/quickstart sketch.png --strength 0.5 --labels 7 --out redrawn;  "
               "ddpm edit runs/quickstart a.png b.png --interpolate 8 --labels 1,7 --out walk")
    a = ed.add_argument
    a("model", type=common.folder_path, help="run folder or model folder")
    a("images", nargs="*", help="a PNG/JPEG or a folder of them (inpainting, image-to-image); two images "
      "(interpolation)")
    common.add_out_flag(a, "output folder")
    mode = ed.add_mutually_exclusive_group(required=True)
    mode.add_argument("--mask", help="inpaint: one mask PNG for every image, or a folder with a mask of the same "
                      "file name per image; white = regenerate (grey at least 128 counts as white)")
    mode.add_argument("--strength", type=float, help="image-to-image: the share of the sampler's steps to redraw, "
                      "0 (the image as it is) to 1 (plain sampling, the image ignored)")
    mode.add_argument("--interpolate", type=int, metavar="N", help="N frames from the first image to the second "
                      "(or between --seeds A B), ends included; between images through DDIM's inversion, without "
                      "guidance and with 50 steps unless --guidance, --guide-weight or --sampling-steps say otherwise")
    a("--resample", type=int, default=1, metavar="R", help="with --mask: RePaint's resampling, every 5 sampler "
      "steps jump back and run them again, R times in all (R times the model calls); 1 = off")
    a("--seeds", type=common.seed, nargs=2, metavar=("A", "B"), help="with --interpolate: walk between the images that "
      "`ddpm sample --seed A` and `--seed B` draw first, instead of between two images")
    a("--labels", type=common.int_list,
      help="class labels (conditional models): one for all images, or one per image in "
      "sorted file-name order (interpolation: one, or the two ends')")
    common.add_sampling_flags(ed)
    common.add_seed_flag(a, "random seed (batch b is seeded by (seed, b), as `ddpm sample` does)")
    common.add_source_flags(ed)
    common.add_batch_size_flag(a, "images per sampling batch", SAMPLE_BATCH)
    common.add_device_flag(a)
    common.add_quiet_flag(a)


# ------------------------------------------------------------------------------------------------ reading inputs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _image_files(inputs: list[str]) -> list[Path]:
    """The image files named, a folder's images in sorted file-name order."""
    files = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise DdpmError(f"{path} has no images ({', '.join(IMAGE_SUFFIXES)}); give a folder of images")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DdpmError(f"{path} does not exist; give an image file or a folder of images")
    if len(files) > common.MAX_SAMPLES:
        raise DdpmError(f"{len(files):,} images, more than the {common.MAX_SAMPLES:,} one command edits")
    return files


def _read_images(files: list[Path], config):

    read = [read_image_to_edit(path, config.in_channels, config.image_size) for path in files]
    return uint8_to_model_range(torch.stack([image for image, _ in read])), [size for _, size in read]


def _read_masks(mask: str, files: list[Path], sizes, image_size: int):
    """One bool mask per image: MASK itself for all, or MASK/<the image's file name> each."""
    import sys

    folder = Path(mask)
    if not folder.exists():
        raise DdpmError(f"--mask {folder} does not exist; give a mask PNG or a folder of masks")
    paths = [folder / path.name for path in files] if folder.is_dir() else [folder] * len(files)
    for path in paths:
        if not path.is_file():
            raise DdpmError(f"--mask folder {folder} has no {path.name}; give one mask of the same file name per image")
    read = [read_mask(path, image_size, size) for path, size in zip(paths, sizes)]
    grey = sorted({str(path) for path, (_, has_grey) in zip(paths, read) if has_grey})
    if grey:
        print(f"note: {', '.join(grey[:3])}{' ...' if len(grey) > 3 else ''} has grey pixels: at least "
              f"{MASK_THRESHOLD} of 255 counts as white (regenerate), below as black (keep)", file=sys.stderr)
    masks = torch.stack([m for m, _ in read])
    if not masks.any():
        raise DdpmError(f"--mask {folder} is black everywhere: nothing to regenerate (white = regenerate)")
    return masks


def _labels(args: argparse.Namespace, num_classes: int | None, count: int):
    """The labels tensor (one per image, or one for all) or None; refuses the wrong count in one line."""

    if num_classes is None:
        if args.labels is not None:
            raise DdpmError("this model is unconditional: drop --labels")
        if args.guidance is not None:
            raise DdpmError("--guidance needs a class-conditional model; this one is unconditional (drop --guidance)")
        return None
    if args.labels is None:
        raise DdpmError(f"this model is class-conditional: give --labels (one for all, or {count} in sorted file-name "
                        "order)")
    if len(args.labels) not in (1, count):
        raise DdpmError(f"--labels has {len(args.labels)} labels for {count} images: give one for all, or one per "
                        "image in sorted file-name order")
    labels = torch.as_tensor(args.labels, dtype=torch.long)
    return labels.expand(count).clone() if len(labels) == 1 else labels


# ------------------------------------------------------------------------------------------------ the command

def _check_args(args: argparse.Namespace) -> None:
    if args.strength is not None and not (math.isfinite(args.strength) and 0 <= args.strength <= 1):
        raise DdpmError(f"--strength must be in [0, 1] (0 keeps the image, 1 ignores it), got {args.strength}")
    if args.interpolate is not None and not 2 <= args.interpolate <= MAX_FRAMES:
        raise DdpmError(f"--interpolate needs 2 to {MAX_FRAMES} frames (the two ends included), got "
                        f"{args.interpolate}")
    if args.resample != 1 and args.mask is None:
        raise DdpmError("--resample R goes with --mask (it resamples inpainting)")
    if not 1 <= args.resample <= 100:
        raise DdpmError(f"--resample must be from 1 (off) to 100, got {args.resample}")
    if args.seeds is not None and args.interpolate is None:
        raise DdpmError("--seeds A B goes with --interpolate N (a walk between two seeds' images)")
    if args.seeds is not None and args.images:
        raise DdpmError("--interpolate walks between two images or between --seeds A B, not both")
    if args.interpolate is not None and args.seeds is None and len(args.images) != 2:
        raise DdpmError(f"--interpolate needs exactly two images (got {len(args.images)}), or --seeds A B")
    if args.interpolate is None and not args.images:
        raise DdpmError("give the images to edit: a PNG or a folder of them")
    if not 1 <= args.batch_size <= common.MAX_SAMPLES:
        raise DdpmError(f"--batch-size must be from 1 to {common.MAX_SAMPLES:,}, got {args.batch_size}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DdpmError(f"--out {out} is a file; give a folder for the results")


def cmd_edit(args: argparse.Namespace) -> int:
    _check_args(args)
    opened = common.open_model(args)
    model, schedule, device = opened.model, opened.schedule, opened.device
    guide, guide_path = opened.guide, common.guide_path_text(opened)
    if args.interpolate is not None:
        return _interpolate(args, model, schedule, device, guide, guide_path)
    files = _image_files(args.images)
    images, sizes = _read_images(files, model.config)
    masks = None if args.mask is None else _read_masks(args.mask, files, sizes, model.config.image_size)
    labels = _labels(args, model.config.num_classes, len(files))
    sampling = common.sampling_configs(args, guided=guide is not None, student=opened.student)[0]

    results = edit_batches(model, schedule, images, masks=masks, strength=None if masks is not None else args.strength,
                           labels=labels, sampling=sampling, guide=guide, seed=args.seed, batch_size=args.batch_size,
                           progress=not args.quiet, resample=args.resample)
    _write_edits(args, files, images, masks, results, model.config.image_size)
    what = f"inpainted ({int(masks.float().mean() * 100)}% of pixels redrawn)" if masks is not None else \
        f"redrawn at strength {args.strength:g}"
    print(f"{len(files)} images {what} ({_describe(sampling, len(schedule), opened.student)}"
          + (f", autoguidance g={sampling.guide_weight:g} by {guide_path}" if guide is not None
             and sampling.guide_weight != 1 else "") + f") on {device}: {Path(args.out) / 'grid.png'}")
    return 0


def _write_edits(args, files, images, masks, results, image_size: int) -> None:
    """OUT/NAME.png (the result), OUT/NAME_grid.png (input | mask | result) and OUT/grid.png (every row)."""

    out = Path(args.out)
    upscale = grid_upscale(image_size)
    rows = []
    for i, path in enumerate(files):
        row = [images[i]] + ([masks[i].expand_as(images[i]).float() * 2 - 1] if masks is not None else []) \
            + [results[i]]
        atomic_write_bytes(out / f"{path.stem}.png", png_bytes(results[i]))
        save_grid(torch.stack(row), out / f"{path.stem}_grid.png", nrow=len(row), upscale=upscale)
        rows += row
    save_grid(torch.stack(rows), out / "grid.png", nrow=3 if masks is not None else 2, upscale=upscale)


def _describe(sampling, timesteps: int, student=None) -> str:
    """e.g. 'dpmpp2m, 20 steps, w=3'; a distilled student names the weight it takes instead (g for a student of g)."""
    weight = f"w={sampling.guidance:g}"
    if student is not None and student.weight == "guide_weight":
        weight = f"g={sampling.guide_weight:g}, {student.describe()}"
    return f"{sampling.sampler}, {sampling.steps_for(timesteps)} steps, {weight}"


def _interpolate(args, model, schedule, device, guide, guide_path) -> int:

    if args.seeds is None:
        files = _image_files(args.images)
        ends, _ = _read_images(files, model.config)
    labels = _labels(args, model.config.num_classes, 2)  # one label for every frame, or the two ends'
    sampling = common.sampling_configs(args, guided=guide is not None)[0]
    if args.seeds is None:
        # through DDIM's inversion: guidance off unless asked for (a guided inversion does not come back to the image)
        sampling = replace(sampling, sampler="ddim", eta=0.0,
                           guidance=1.0 if args.guidance is None else sampling.guidance,
                           guide_weight=1.0 if args.guide_weight is None else sampling.guide_weight,
                           steps=args.sampling_steps or INVERSION_STEPS)
        frames = interpolate_images(model, schedule, ends[:1], ends[1:], args.interpolate, labels=labels,
                                    sampling=sampling, guide=guide, progress=not args.quiet)
    else:
        frames = interpolate_seeds(model, schedule, *args.seeds, args.interpolate, labels=labels, sampling=sampling,
                                   guide=guide, progress=not args.quiet)
    out = Path(args.out)
    frames = frames.cpu()
    save_images(frames, out, prefix="frame")
    strip = save_grid(frames, out / "strip.png", nrow=len(frames), upscale=grid_upscale(model.config.image_size))
    between = f"seeds {args.seeds[0]} and {args.seeds[1]}" if args.seeds else f"{files[0]} and {files[1]}"
    print(f"{len(frames)} frames between {between} ({_describe(sampling, len(schedule))}"
          + (f", autoguidance by {guide_path}" if guide is not None and sampling.guide_weight != 1 else "")
          + f"): {strip}")
    return 0
