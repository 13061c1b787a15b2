"""Decode once: `ddpm prepare` stores a dataset's images, resized, as uint8 arrays that training memory-maps.

A prepared folder holds, per split ('train', and 'holdout' when the source keeps one, i.e. mnist and CIFAR-10
with its test_batch):
    {split}-images-00000.npy ...   uint8 [n, C, S, S] shards of at most SHARD_BYTES each (numpy .npy, so
                                   `np.load(path, mmap_mode="r")` maps them without reading them)
    {split}-labels.npy             int64 [count] (-1 where the source has no labels)
and a meta.json (format, version, image_size, channels, count, source, class names, each split's shards),
written last: a folder is prepared once its meta.json is there. Every file is written atomically.

Images are quantised exactly as `to_uint8` quantises a dataset's items, so a prepared item equals the source's
item to the pixel (the folder pipeline itself works in uint8; see images.resize_center_crop). Files that cannot
be read are left out (and listed in meta.json) instead of being substituted.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .data import (
    BAD_FRACTION,
    META,
    PREPARED_FORMAT,
    PREPARED_VERSION,
    SPLITS,
    DataError,
    ImageFiles,
    load_dataset,
    raise_if_too_many_bad,
)
from .files import atomic_write_bytes, atomic_write_json, to_uint8
from .images import UNREADABLE
from .progress import progress as progress_bar

BAD_FILES = "bad_files.txt"
SHARD_BYTES = 128 * 2**20  # 10,922 images of 64x64 RGB per shard; a shard is built in memory before its write
_OWN_FILE = re.compile(
    rf"({'|'.join(SPLITS)})-(images-\d{{5}}|labels)\.npy|{re.escape(META)}|{re.escape(BAD_FILES)}|\..+\.tmp"
)


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
    shard_size = max(1, SHARD_BYTES // (channels * image_size * image_size))
    buffer = np.empty((min(shard_size, len(dataset)), channels, image_size, image_size), np.uint8)
    shards, labels, skipped, filled = [], [], [], 0

    def flush() -> None:
        name = f"{split}-images-{len(shards):05d}.npy"
        atomic_write_bytes(out / name, _npy_bytes(buffer[:filled]))
        shards.append(name)

    bar = progress_bar(total=len(dataset), desc=f"prepare {split}", disable=not progress, lines=True)
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
    return {"count": len(labels), "shard_size": shard_size, "shards": shards, "labels": f"{split}-labels.npy",
            "skipped": skipped}


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
        num_workers = min(
            8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        )
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
        "format": PREPARED_FORMAT, "version": PREPARED_VERSION, "image_size": image_size, "channels": train.channels,
        "count": splits["train"]["count"], "source": _source_name(data), "description": train.description,
        "conditional": conditional, "class_names": train.class_names, "splits": splits,
    })
    kept = {META, BAD_FILES} | {name for entry in splits.values() for name in entry["shards"] + [entry["labels"]]}
    for stale in out.iterdir():  # a previous, larger preparation's shards
        if _OWN_FILE.fullmatch(stale.name) and stale.name not in kept and not stale.name.startswith("."):
            stale.unlink()
    return out
