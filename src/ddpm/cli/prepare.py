"""`ddpm prepare`: decode a dataset once into uint8 shards."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..config import (
    MAX_WORKERS,
)
from .common import HelpFormatter, add_out_flag, add_quiet_flag


def add_prepare_parser(subparsers) -> argparse.ArgumentParser:
    from ..data import BAD_FRACTION

    pr = subparsers.add_parser(
        "prepare", help="decode a dataset once into memory-mapped uint8 arrays, for training at full speed",
        formatter_class=HelpFormatter,
        description="Decode and resize DATA once and store it as uint8 .npy shards in --out; `ddpm train OUT` then "
                    "reads images without decoding them. "
                    "Unreadable files are left out and listed in OUT/bad_files.txt.")
    pr.add_argument("data", help="dataset: image folder, CIFAR-10 folder, 'mnist' or 'photos'")
    pr.add_argument("--image-size", type=int, default=64, help="the training resolution the images are resized to")
    pr.add_argument("--channels", type=int, choices=(1, 3),
                    help="1 = grayscale, 3 = RGB (default: 1 for mnist, else 3)")
    pr.add_argument("--conditional", action="store_true", help="keep the labels of an image folder's class subfolders")
    add_out_flag(pr.add_argument, "the folder to write (new, empty, or an earlier prepared copy to replace)")
    pr.add_argument("--num-workers", type=int,
                    help="decoding processes for image folders, 0 = in this process "
                         "(default: available cores, at most 8)")
    pr.add_argument("--max-bad-fraction", type=float, default=BAD_FRACTION, metavar="F",
                    help="unreadable image files tolerated, as a fraction of the folder (at least 10 files); past it "
                         "nothing is prepared and OUT/bad_files.txt lists them; 0 = none")
    add_quiet_flag(pr.add_argument)
    return pr


def cmd_prepare(args: argparse.Namespace) -> int:
    """`ddpm prepare`: see add_prepare_parser. Returns the exit status."""
    from ..data import DataError, read_meta
    from ..prepared import BAD_FILES, prepare_dataset

    if not 1 <= args.image_size <= 8192:
        raise DataError(f"--image-size must be between 1 and 8192 pixels, got {args.image_size}")
    if args.num_workers is not None and not 0 <= args.num_workers <= MAX_WORKERS:
        raise DataError(f"--num-workers must be from 0 to {MAX_WORKERS}, got {args.num_workers}")
    if not 0 <= args.max_bad_fraction <= 1:
        raise DataError(f"--max-bad-fraction must be in [0, 1], got {args.max_bad_fraction}")
    start = time.perf_counter()
    out = prepare_dataset(args.data, args.image_size, Path(args.out), args.channels, args.conditional,
                          progress=not args.quiet, num_workers=args.num_workers, max_bad_fraction=args.max_bad_fraction)
    meta = read_meta(out)
    skipped = [p for entry in meta["splits"].values() for p in entry["skipped"]]
    counts = ", ".join(f"{entry['count']:,} {name}" for name, entry in meta["splits"].items())
    print(f"prepared {counts} images ({meta['image_size']}x{meta['image_size']}, {meta['channels']} channel(s)) "
          f"of {meta['description']} into {out} in {time.perf_counter() - start:.1f}s")
    if skipped:
        print(f"left out {len(skipped)} unreadable file(s), listed in {out / BAD_FILES}: {', '.join(skipped[:5])}")
    print(f"train on it with: ddpm train {out} --image-size {meta['image_size']}"
          + (" --conditional" if args.conditional else ""))
    return 0

