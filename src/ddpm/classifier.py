"""A small CNN classifier of the dataset's classes, used to judge class-conditional samples.

`ddpm eval` trains it once on real images the diffusion model did not train on, saves it (safetensors + JSON)
in the run's cache folder and reuses it. Two numbers come out of it: the class accuracy of samples (does a
sample of class k look like a k?) and the Frechet distance in its penultimate feature space (a domain-specific
FID, sensitive to exactly the features that tell the classes apart).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURE_VERSION = 1  # part of the cache key: bump it when the network or its training changes


@dataclass
class ClassifierConfig:
    in_channels: int
    num_classes: int
    width: int = 16
    feature_dim: int = 128


def _conv_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(8, cout), nn.SiLU()]


class SmallClassifier(nn.Module):
    """Three conv stages (width, 2x, 4x; halving the size twice), global average pooling (any image size),
    a `feature_dim` penultimate layer (the features for the Frechet distance) and a linear head.

    GroupNorm rather than BatchNorm: the same function in training and eval mode, whatever the batch.
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

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> penultimate features [N, feature_dim]."""
        return self.penultimate(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def uint8_to_model_range(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


def _random_shift(x: torch.Tensor, max_shift: float, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `max_shift` of its width (sub-pixel, border pixels repeated)."""
    n = x.shape[0]
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * max_shift)  # grid units: the image spans 2
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    steps: int = 800,
    batch_size: int = 64,
    lr: float = 3e-3,
    hflip: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> SmallClassifier:
    """Train a `SmallClassifier` on uint8 images [N, C, H, W] with labels 0..K-1: AdamW, cosine decay,
    random shifts of 1/8 of the width (and mirror images when `hflip`). Seeded: the same data gives the same
    weights on the same device."""
    from tqdm.auto import tqdm

    if len(images) != len(labels) or len(images) < 2:
        raise ValueError(f"need at least 2 labelled images to train a classifier, got {len(images)} images and {len(labels)} labels")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # initial weights from `seed` without moving the global RNG
        torch.manual_seed(seed)
        model = SmallClassifier(ClassifierConfig(images.shape[1], num_classes)).to(device)
    data, targets = uint8_to_model_range(images), labels.long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for step in tqdm(range(steps), desc="classifier", disable=not progress, dynamic_ncols=True, leave=False):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.randint(0, len(data), (min(batch_size, len(data)),), generator=generator)
        x = _random_shift(data[index], 1 / 8, generator)
        if hflip:
            flip = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(model(x.to(device)), targets[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def predict(model: SmallClassifier, images: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images -> (logits [N, K], penultimate features [N, D]) as float64 numpy arrays."""
    device = next(model.parameters()).device
    logits, features = [], []
    for start in range(0, len(images), batch_size):
        f = model.features(uint8_to_model_range(images[start : start + batch_size]).to(device))
        features.append(f.double().cpu().numpy())
        logits.append(model.head(f).double().cpu().numpy())
    return np.concatenate(logits), np.concatenate(features)


def save_classifier(model: SmallClassifier, stem: Path, info: dict) -> None:
    """stem.safetensors (weights) + stem.json (config and `info`), each written atomically."""
    from safetensors.torch import save

    from .files import atomic_write_bytes, atomic_write_json

    stem = Path(stem)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(stem.with_suffix(".safetensors"), save(tensors))
    record = {"config": asdict(model.config), **info}
    atomic_write_json(stem.with_suffix(".json"), record)


def load_classifier(stem: Path, device: torch.device | str = "cpu") -> tuple[SmallClassifier, dict]:
    from safetensors.torch import load_file

    stem = Path(stem)
    record = json.loads(stem.with_suffix(".json").read_text())
    model = SmallClassifier(ClassifierConfig(**record["config"]))
    model.load_state_dict(load_file(str(stem.with_suffix(".safetensors"))))
    return model.to(device).eval(), record


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
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[SmallClassifier, dict, Path]:
    """The classifier trained on exactly these images and labels with these settings: loaded from
    `cache_dir` if it was trained before, else trained now and saved there. Returns (model, record, stem)."""
    digest = hashlib.sha1(json.dumps([ARCHITECTURE_VERSION, steps, hflip, seed, num_classes]).encode())
    digest.update(images.contiguous().cpu().numpy().tobytes())
    digest.update(str(tuple(images.shape)).encode())
    digest.update(labels.long().cpu().numpy().tobytes())
    stem = Path(cache_dir) / f"classifier-{digest.hexdigest()[:20]}"
    if stem.with_suffix(".json").is_file() and stem.with_suffix(".safetensors").is_file():
        try:
            model, record = load_classifier(stem, device)
            return model, record, stem
        except Exception:  # noqa: BLE001 - a damaged cache entry is retrained, not fatal
            pass
    model = train_classifier(images, labels, num_classes, steps=steps, hflip=hflip, seed=seed, device=device, progress=progress)
    logits, _ = predict(model, images)
    record = {
        "trained_on": description, "images": len(images), "steps": steps, "hflip": hflip, "seed": seed,
        "train_accuracy": float((logits.argmax(1) == labels.cpu().numpy()).mean()),
    }
    save_classifier(model, stem, record)
    return model, {"config": asdict(model.config), **record}, stem
