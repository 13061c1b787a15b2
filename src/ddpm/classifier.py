"""A small CNN classifier of the dataset's classes, used to judge class-conditional samples.

`ddpm eval` trains it once on the diffusion model's training images, saves it (safetensors + JSON) in the run's
cache folder and reuses it. Its penultimate features give the Frechet distance and precision/recall of samples
(a domain-specific FID) and its head gives their class accuracy (does a sample of class k look like a k?).

Why not a plain classifier: a network trained only to tell the classes apart learns to ignore what does not
change the class, and stroke brightness does not; on 16x16 digits it (and Inception) ranked over-guided,
over-bright samples best. So the features here must see intensity as well as shape:
  * they are trained on two tasks at once: the class (shape) and, through a second linear head, a handful of
    each image's own intensity statistics (`intensity_statistics`: per channel mean, spread and quantiles of the
    pixel values). Nothing else has to be learnt for that second task (no augmentation changes intensity), so
    the features must carry brightness and contrast, and images made brighter or darker land away from real
    ones in feature space;
  * BatchNorm: at evaluation a fixed affine map per channel, so a feature of an image depends on that image
    alone. (GroupNorm divides each image by its own spread; with the intensity task it measured about as
    sensitive, but less accurate: 0.968 against 0.975 on the 16x16 MNIST holdout.)
  * augmentations are geometric only (shifts, small rotations and scalings, mirror images only for data that is
    symmetric under them) and never touch intensity, which keeps the features sensitive to it.
Measured on MNIST 16x16 (800 steps, 10-15 s on 2 CPU cores; 500 held-out digits against 1,000 training digits):
without the intensity task, brightened digits sat close to the real floor's Frechet distance; with it, far above
(the numbers: README, "Evaluation").
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import DdpmError
from .images import uint8_to_model_range
from .metrics import class_accuracy
from .modes import eval_mode
from .progress import progress as progress_bar

ARCHITECTURE_VERSION = 2  # part of the cache key: bump it when the network or its training changes
INTENSITY_QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)  # with the mean and std: 7 statistics per channel


@dataclass
class ClassifierConfig:
    in_channels: int
    num_classes: int
    width: int = 16
    feature_dim: int = 128

    @property
    def intensity_dim(self) -> int:
        return (2 + len(INTENSITY_QUANTILES)) * self.in_channels


@dataclass
class Augmentation:
    """Random geometric changes for training; nothing that changes pixel values (brightness, contrast)."""

    max_shift: float = 1 / 8  # of the image width, each way
    max_rotation: float = 10.0  # degrees, each way
    max_scale: float = 0.1  # zoom factor in [1 - s, 1 + s]
    hflip: bool = False  # mirror images: only for data that is symmetric under them (photos, never digits)


def _conv_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.SiLU()]


class SmallClassifier(nn.Module):
    """Three conv stages (width, 2x, 4x; halving the size twice), global average pooling (any image size),
    a `feature_dim` penultimate layer (the features for the Frechet distance and precision/recall), a linear
    class head and a linear intensity head (used only in training; see the module docstring).

    Features and predictions are taken in eval mode, where BatchNorm uses its running statistics: a fixed
    function of each image alone, whatever the batch.
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.trunk = nn.Sequential(
            *_conv_block(config.in_channels, w), *_conv_block(w, w), nn.MaxPool2d(2),
            *_conv_block(w, 2 * w), *_conv_block(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv_block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.penultimate = nn.Sequential(nn.Linear(4 * w, config.feature_dim), nn.SiLU())
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        self.intensity_head = nn.Linear(config.feature_dim, config.intensity_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> penultimate features [N, feature_dim]."""
        return self.penultimate(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def intensity_statistics(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] [N, C, H, W] -> per channel mean, std and `INTENSITY_QUANTILES` of the pixel values
    (in [0, 1] units), [N, 7 C]: what the features must be able to predict, so that they see intensity."""
    pixels = ((x + 1) / 2).flatten(2)  # [N, C, HW]
    quantiles = torch.quantile(pixels, torch.tensor(INTENSITY_QUANTILES, device=x.device, dtype=x.dtype), dim=-1)
    stats = torch.cat([pixels.mean(-1, keepdim=True), pixels.std(-1, keepdim=True), quantiles.permute(1, 2, 0)], -1)
    return stats.flatten(1)


def random_geometry(x: torch.Tensor, augmentation: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """Rotate, scale and translate each image at random (one affine warp, bilinear, border pixels repeated),
    then mirror half of them when `augmentation.hflip`. Pixel values are only interpolated, never rescaled."""
    n = x.shape[0]

    def uniform(*shape) -> torch.Tensor:  # U(-1, 1), drawn on the CPU generator whatever the device
        return torch.rand(*shape, generator=generator) * 2 - 1

    angle = uniform(n) * math.radians(augmentation.max_rotation)
    zoom = 1 + uniform(n) * augmentation.max_scale
    shift = uniform(n, 2) * (2 * augmentation.max_shift)  # grid units: the image spans 2
    # affine_grid maps output to input coordinates: the inverse of "zoom by `zoom`, rotate by `angle`"
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if augmentation.hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


MIN_SPREAD = 0.02  # in [0, 1] pixel units (~5 grey levels): the least spread a statistic is divided by


def _standardizer(images: torch.Tensor, sample: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the intensity statistics over (up to `sample` of) the training images, so that each
    statistic weighs about the same in the loss. The std is floored at `MIN_SPREAD`: a statistic that is almost
    constant in the data (the median pixel of a digit is 0 but for a few) would otherwise turn its rare
    exceptions into huge targets that drown the class loss."""
    stats = intensity_statistics(uint8_to_model_range(images[:: max(1, len(images) // sample)]))
    return stats.mean(0), stats.std(0).clamp(min=MIN_SPREAD)


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    steps: int = 800,
    batch_size: int = 64,
    lr: float = 3e-3,
    augmentation: Augmentation | None = None,
    intensity_weight: float = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> SmallClassifier:
    """Train a `SmallClassifier` on uint8 images [N, C, H, W] with labels 0..K-1: AdamW with cosine decay on
    cross-entropy + `intensity_weight` x the mean squared error of the standardized intensity statistics, over
    geometrically augmented batches. Seeded: the same data gives the same weights on the same device."""
    if len(images) != len(labels) or len(images) < 2:
        raise DdpmError(f"need at least 2 labelled images to train the evaluation classifier, got {len(images)} images "
                        f"and {len(labels)} labels")
    augmentation = augmentation or Augmentation()
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # initial weights from `seed` without moving the global RNG
        torch.manual_seed(seed)
        model = SmallClassifier(ClassifierConfig(images.shape[1], num_classes)).to(device)
    stats_mean, stats_std = (t.to(device) for t in _standardizer(images))
    targets = labels.long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for step in progress_bar(range(steps), desc="classifier", disable=not progress, leave=False):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=generator)
        x = random_geometry(uint8_to_model_range(images[index]).to(device), augmentation, generator)
        features = model.features(x)
        intensity = (intensity_statistics(x) - stats_mean) / stats_std  # of the augmented image the network sees
        loss = (F.cross_entropy(model.head(features), targets[index].to(device))
                + intensity_weight * F.mse_loss(model.intensity_head(features), intensity))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def predict(model: SmallClassifier, images: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images -> (logits [N, K], penultimate features [N, D]) as float64 numpy arrays (eval mode)."""
    device = next(model.parameters()).device
    logits, features = [], []
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            f = model.features(uint8_to_model_range(images[start : start + batch_size]).to(device))
            features.append(f.double().cpu().numpy())
            logits.append(model.head(f).double().cpu().numpy())
    return np.concatenate(logits), np.concatenate(features)


def save_classifier(model: SmallClassifier, stem: Path, info: dict) -> None:
    """stem.safetensors (weights) + stem.json (config and `info`), each written atomically."""
    from .files import atomic_write_json, atomic_write_safetensors

    stem = Path(stem)
    atomic_write_safetensors(stem.with_suffix(".safetensors"), model)
    record = {"config": asdict(model.config), **info}
    atomic_write_json(stem.with_suffix(".json"), record)


def load_classifier(stem: Path, device: torch.device | str = "cpu") -> tuple[SmallClassifier, dict]:
    from safetensors.torch import load_file

    stem = Path(stem)
    record = json.loads(stem.with_suffix(".json").read_text())
    model = SmallClassifier(ClassifierConfig(**record["config"]))
    model.load_state_dict(load_file(str(stem.with_suffix(".safetensors"))))
    return model.to(device).eval(), record


def _cache_stem(cache_dir: Path, images: torch.Tensor, labels: torch.Tensor, settings: list) -> Path:
    """A file name that follows the exact training images, labels and settings."""
    digest = hashlib.sha1(json.dumps([ARCHITECTURE_VERSION, *settings]).encode())
    digest.update(images.contiguous().cpu().numpy().tobytes())
    digest.update(str(tuple(images.shape)).encode())
    digest.update(labels.long().cpu().numpy().tobytes())
    return Path(cache_dir) / f"classifier-{digest.hexdigest()[:20]}"


def classifier_for(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    cache_dir: Path,
    description: str,
    *,
    steps: int = 800,
    hflip: bool = False,
    seed: int = 0,
    holdout_images: torch.Tensor | None = None,
    holdout_labels: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[SmallClassifier, dict, Path]:
    """The classifier trained on exactly these images and labels with these settings: loaded from `cache_dir`
    if it was trained before, else trained now and saved there. Its record holds the training accuracy, the
    training time and, given images it never saw (`holdout_images`), its accuracy on them. Returns
    (model, record, stem)."""
    augmentation = Augmentation(hflip=hflip)
    stem = _cache_stem(cache_dir, images, labels, [steps, asdict(augmentation), seed, num_classes])
    if stem.with_suffix(".json").is_file() and stem.with_suffix(".safetensors").is_file():
        try:
            model, record = load_classifier(stem, device)
            return model, record, stem
        except Exception:  # noqa: BLE001 - a damaged cache entry is retrained, not fatal
            pass
    start = time.perf_counter()
    model = train_classifier(
        images, labels, num_classes, steps=steps, augmentation=augmentation, seed=seed, device=device, progress=progress
    )
    seconds = time.perf_counter() - start
    record = {
        "trained_on": description, "images": len(images), "steps": steps, "augmentation": asdict(augmentation),
        "seed": seed, "train_seconds": round(seconds, 1),
        "train_accuracy": class_accuracy(predict(model, images)[0], labels),
    }
    if holdout_images is not None and holdout_labels is not None and len(holdout_images):
        record["holdout_images"] = len(holdout_images)
        record["holdout_accuracy"] = class_accuracy(predict(model, holdout_images)[0], holdout_labels)
    save_classifier(model, stem, record)
    return model, {"config": asdict(model.config), **record}, stem
