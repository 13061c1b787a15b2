"""Decode once: `ddpm prepare` stores a dataset's images, resized, as uint8 arrays that training memory-maps.

A prepared folder holds, per split ('train', and 'holdout' when the source keeps one, i.e. mnist and CIFAR-10
with its test_batch):
    {split}-images-00000.npy ...   uint8 [n, C, S, S] shards of at most SHARD_BYTES each (numpy .npy, so
                                   `np.load(path, mmap_mode="r")` maps them without reading them)
    {split}-labels.npy             int64 [count] (-1 where the source has no labels)
and a meta.json (format, version, image_size, channels, count, source, class names, each split's shards),
written last: a folder is prepared once its meta.json is there. Every file is written atomically.

Images are quantised exactly as `to_uint8` quantises a dataset's items, so a prepared item equals the source's
item to the pixel (the folder pipeline itself works in uint8; see data.resize_center_crop). Files that cannot
be read are left out (and listed in meta.json) instead of being substituted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset

from .data import BAD_FRACTION, UNREADABLE, DataError, DataInfo, ImageFiles, load_dataset, raise_if_too_many_bad, to_uint8, uint8_to_model_range
from .files import atomic_write_bytes, atomic_write_json

FORMAT, VERSION, META, BAD_FILES = "ddpm-prepared", 1, "meta.json", "bad_files.txt"
SHARD_BYTES = 128 * 2**20  # 10,922 images of 64x64 RGB per shard; a shard is built in memory before its write
SPLITS = ("train", "holdout")
_OWN_FILE = re.compile(rf"({'|'.join(SPLITS)})-(images-\d{{5}}|labels)\.npy|{re.escape(META)}|{re.escape(BAD_FILES)}|\..+\.tmp")


# ------------------------------------------------------------------------------------------------ reading

def read_meta(folder: Path) -> dict | None:
    """The folder's meta.json if it is a prepared folder's, else None."""
    path = Path(folder) / META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def is_prepared(folder: Path) -> bool:
    return read_meta(folder) is not None


class PreparedImages(Dataset):
    """One split of a prepared folder: items (float [C, S, S] in [-1, 1], label) read from memory-mapped shards.

    The shards are mapped lazily in each process and never pickled: DataLoader workers (fork or spawn) map
    their own, sharing the page cache."""

    def __init__(self, folder: Path, shards: list[str], shard_size: int, labels: np.ndarray):
        self.folder, self.shard_names, self.shard_size = Path(folder), list(shards), shard_size
        self.labels = labels
        self._shards: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": None}

    def _mapped(self) -> list[np.ndarray]:
        if self._shards is None:
            self._shards = [np.load(self.folder / name, mmap_mode="r") for name in self.shard_names]
        return self._shards

    def uint8_item(self, index: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        shard, row = divmod(index % len(self), self.shard_size)
        return torch.from_numpy(np.array(self._mapped()[shard][row])), int(self.labels[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.uint8_item(index)
        return uint8_to_model_range(image), label


def _split_dataset(folder: Path, entry: dict) -> PreparedImages:
    labels = np.load(folder / entry["labels"])
    if len(labels) != entry["count"]:
        raise DataError(f"{folder / entry['labels']} has {len(labels)} labels, meta.json says {entry['count']}; prepare the folder again")
    return PreparedImages(folder, entry["shards"], entry["shard_size"], labels)


def _check_matches(folder: Path, meta: dict, image_size: int, channels: int | None, conditional: bool) -> None:
    redo = f"or prepare the source again into a new folder: ddpm prepare {meta['source']}"
    if meta["version"] > VERSION:
        raise DataError(f"{folder} was prepared by a newer ddpm (format version {meta['version']}, this one reads {VERSION}); "
                        f"upgrade ddpm {redo} --image-size {image_size} --out NEW_DIR")
    if meta["image_size"] != image_size:
        raise DataError(f"{folder} was prepared at {meta['image_size']}x{meta['image_size']} pixels, not {image_size}; "
                        f"use --image-size {meta['image_size']} {redo} --image-size {image_size} --out NEW_DIR")
    if channels is not None and meta["channels"] != channels:
        raise DataError(f"{folder} was prepared with {meta['channels']} channel(s), not {channels}; use --channels {meta['channels']} "
                        f"{redo} --image-size {image_size} --channels {channels} --out NEW_DIR")
    if conditional and not meta["class_names"]:
        raise DataError(f"--conditional needs labels, but {folder} was prepared without them; drop --conditional "
                        f"{redo} --image-size {image_size} --conditional --out NEW_DIR")


def load_prepared(folder: Path, image_size: int, channels: int | None = None, conditional: bool = False,
                  split: str = "train") -> DataInfo:
    """A prepared folder as a DataInfo (load_dataset's contract), after checking it matches the request."""
    folder = Path(folder)
    meta = read_meta(folder)
    if meta is None:
        raise DataError(f"{folder} has no ddpm meta.json; prepare it with: ddpm prepare SOURCE --out {folder}")
    _check_matches(folder, meta, image_size, channels, conditional)
    wanted = {"train": ["train"], "holdout": ["holdout"], "all": list(SPLITS)}[split]
    present = [s for s in wanted if s in meta["splits"]]
    if split == "holdout" and not present:
        raise DataError(f"{folder} has no held-out split (its source {meta['source']} keeps none; only mnist and CIFAR-10 do)")
    parts = [_split_dataset(folder, meta["splits"][s]) for s in present]
    dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    names = meta["class_names"]
    source = " + ".join(meta["splits"][s]["description"] for s in present)
    return DataInfo(dataset, meta["channels"], len(names) if names else None, names,
                    f"prepared copy of {source} ({len(dataset):,} images, {folder})")


# ------------------------------------------------------------------------------------------------ writing

class _Attempt(Dataset):
    """An image folder's items without substitution: (uint8 image or None, label, path) for `prepare`."""

    def __init__(self, files: ImageFiles):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path, label = self.files.path(index), self.files.label(index)
        try:
            return self.files.read(index), label, str(path)
        except UNREADABLE:
            return None, label, str(path)


def _as_list(items: list) -> list:
    return items


def _uint8_items(dataset: Dataset, num_workers: int, skipped: list[str]):
    """(uint8 [C, S, S] numpy, label) of every readable item, in order; unreadable files go to `skipped`."""
    if isinstance(dataset, TensorDataset):  # the bundled sets and CIFAR-10: already in memory
        images, labels = dataset.tensors
        for start in range(0, len(images), 1024):
            chunk = to_uint8(images[start : start + 1024]).numpy()
            yield from zip(chunk, labels[start : start + 1024].tolist())
        return
    if isinstance(dataset, ImageFiles):
        loader = DataLoader(_Attempt(dataset), batch_size=64, num_workers=num_workers, collate_fn=_as_list)
        for batch in loader:
            for image, label, path in batch:
                if image is None:
                    skipped.append(path)
                else:
                    yield image.numpy(), label
        return
    for index in range(len(dataset)):  # anything else with the (image, label) contract, e.g. a prepared copy
        image, label = dataset[index]
        yield to_uint8(image).numpy(), int(label)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _write_split(dataset: Dataset, out: Path, split: str, image_size: int, channels: int, num_workers: int,
                 progress: bool, max_bad_fraction: float = BAD_FRACTION) -> dict:
    """Write one split's shards and labels; returns its meta.json entry."""
    from tqdm.auto import tqdm

    shard_size = max(1, SHARD_BYTES // (channels * image_size * image_size))
    buffer = np.empty((min(shard_size, len(dataset)), channels, image_size, image_size), np.uint8)
    shards, labels, skipped, filled = [], [], [], 0

    def flush() -> None:
        name = f"{split}-images-{len(shards):05d}.npy"
        atomic_write_bytes(out / name, _npy_bytes(buffer[:filled]))
        shards.append(name)

    bar = tqdm(total=len(dataset), desc=f"prepare {split}", disable=not progress, dynamic_ncols=True)
    for image, label in _uint8_items(dataset, num_workers, skipped):
        buffer[filled] = image
        labels.append(label)
        filled += 1
        bar.update(1)
        if filled == len(buffer):
            flush()
            filled = 0
    bar.close()
    if filled:
        flush()
    if skipped:  # every unreadable file, one a line (after the earlier splits'), also when there are too many
        earlier = (out / BAD_FILES).read_bytes() if (out / BAD_FILES).is_file() else b""
        atomic_write_bytes(out / BAD_FILES, earlier + "".join(f"{path}\n" for path in skipped).encode())
    raise_if_too_many_bad(skipped, len(dataset), f"all listed in {out / BAD_FILES}; nothing was prepared",
                          max_bad_fraction)
    if not labels:
        raise DataError(f"none of the {len(dataset)} images of the {split} split could be read; check the source")
    atomic_write_bytes(out / f"{split}-labels.npy", _npy_bytes(np.asarray(labels, dtype=np.int64)))
    return {"count": len(labels), "shard_size": shard_size, "shards": shards, "labels": f"{split}-labels.npy", "skipped": skipped}


def _check_out(out: Path, data: str) -> None:
    """`out` must be new, empty, or a folder holding only a prepared copy's files (which are replaced)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a new folder")
    if Path(data).expanduser().exists() and Path(data).expanduser().resolve() == out.resolve():
        raise DataError(f"--out {out} is the source folder itself; give a new folder")
    foreign = [p.name for p in out.iterdir() if not _OWN_FILE.fullmatch(p.name)] if out.is_dir() else []
    if foreign:
        raise DataError(f"--out {out} already holds other files (e.g. {foreign[0]}); give a new or empty folder")


def _source_name(data: str) -> str:
    path = Path(data).expanduser()
    return str(path.resolve()) if path.exists() else data


def prepare_dataset(data: str, image_size: int, out: Path, channels: int | None = None, conditional: bool = False,
                    progress: bool = True, num_workers: int | None = None,
                    max_bad_fraction: float = BAD_FRACTION) -> Path:
    """Decode DATA (anything load_dataset reads) once at `image_size` into a prepared folder `out` (module
    docstring); returns `out`. `num_workers`: decoding processes for image folders (default: the cores this
    process may use, at most 8). A folder already prepared at `out` is replaced; nothing else is overwritten."""
    out = Path(out).expanduser()
    _check_out(out, data)
    train = load_dataset(data, image_size, channels, conditional, split="train")
    try:
        holdout = load_dataset(data, image_size, channels, conditional, split="holdout")
    except DataError:  # folders and photos keep no images out of training
        holdout = None
    if num_workers is None:
        num_workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)  # while the files change, the folder is not a prepared one
    (out / BAD_FILES).unlink(missing_ok=True)
    splits = {}
    for split, info in (("train", train), ("holdout", holdout)):
        if info is not None:
            entry = _write_split(info.dataset, out, split, image_size, train.channels, num_workers, progress,
                                 max_bad_fraction)
            splits[split] = {"description": info.description, **entry}
    atomic_write_json(out / META, {
        "format": FORMAT, "version": VERSION, "image_size": image_size, "channels": train.channels,
        "count": splits["train"]["count"], "source": _source_name(data), "description": train.description,
        "conditional": conditional, "class_names": train.class_names, "splits": splits,
    })
    kept = {META, BAD_FILES} | {name for entry in splits.values() for name in entry["shards"] + [entry["labels"]]}
    for stale in out.iterdir():  # a previous, larger preparation's shards
        if _OWN_FILE.fullmatch(stale.name) and stale.name not in kept and not stale.name.startswith("."):
            stale.unlink()
    return out


# --------------------------------------------------------------------------------------------- command line

def add_prepare_parser(subparsers) -> argparse.ArgumentParser:
    from .cli import HelpFormatter, folder_path  # the one formatter: real defaults only

    pr = subparsers.add_parser(
        "prepare", help="decode a dataset once into memory-mapped uint8 arrays, for training at full speed",
        formatter_class=HelpFormatter,
        description="Decode and resize DATA once and store it as uint8 .npy shards in --out; `ddpm train OUT` then "
                    "reads images without decoding them. Unreadable files are left out and listed in OUT/meta.json.")
    pr.add_argument("data", help="dataset: image folder, CIFAR-10 folder, 'mnist' or 'photos'")
    pr.add_argument("--image-size", type=int, default=64, help="the training resolution the images are resized to")
    pr.add_argument("--channels", type=int, choices=(1, 3), help="1 = grayscale, 3 = RGB (default: 1 for mnist, else 3)")
    pr.add_argument("--conditional", action="store_true", help="keep the labels of an image folder's class subfolders")
    pr.add_argument("--out", type=folder_path, required=True, help="the folder to write (new, empty, or an earlier prepared copy to replace)")
    pr.add_argument("--num-workers", type=int, help="decoding processes for image folders (default: available cores, at most 8)")
    pr.add_argument("--max-bad-fraction", type=float, default=BAD_FRACTION, metavar="F",
                    help="unreadable image files tolerated, as a fraction of the folder (at least 10 files); past it "
                         "nothing is prepared and OUT/bad_files.txt lists them")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    return pr


def run_prepare(args: argparse.Namespace) -> int:
    """`ddpm prepare`: see add_prepare_parser. Returns the exit status."""
    if not 1 <= args.image_size <= 8192:
        raise DataError(f"--image-size must be between 1 and 8192 pixels, got {args.image_size}")
    if args.num_workers is not None and args.num_workers < 0:
        raise DataError(f"--num-workers must be >= 0, got {args.num_workers}")
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
    print(f"train on it with: ddpm train {out} --image-size {meta['image_size']}" + (" --conditional" if args.conditional else ""))
    return 0
