"""High-level sampling: a model and its schedule in, images out (the notebook and CLI entry point)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .guidance import make_denoiser
from .samplers import StepCallback, ddim_sample, ddpm_sample
from .schedule import NoiseSchedule

SAMPLERS = ("ddpm", "ddim")


def sample(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    n: int | None = None,
    *,
    labels: Sequence[int] | torch.Tensor | None = None,
    guidance: float = 3.0,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    clip_x0: bool = False,
    generator: torch.Generator | None = None,
    batched_guidance: bool | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Draw images in [-1, 1] with shape [N, C, H, W] from `model` (on the model's device).

    Unconditional models take `n`; conditional ones take `labels` (n = len(labels)) and `guidance` w
    (classifier-free guidance, see `guidance.py`). `sampler="ddpm"` runs all T ancestral steps;
    `sampler="ddim"` runs `steps` (default 50) DDIM steps with `eta`.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, not {sampler!r}")
    device = next(model.parameters()).device
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long, device=device)
        num_classes = model.config.num_classes
        if num_classes and (labels.min() < 0 or labels.max() >= num_classes):
            bad = sorted({y for y in labels.tolist() if not 0 <= y < num_classes})
            raise ValueError(f"labels {bad} are out of range: this model has classes 0..{num_classes - 1}")
        if n is not None and n != len(labels):
            raise ValueError(f"n={n} disagrees with the {len(labels)} labels given; give one of them")
        n = len(labels)
    if n is None or n < 1:
        raise ValueError(f"the number of images must be >= 1, got {n}")
    c = model.config
    shape = (n, c.in_channels, c.image_size, c.image_size)
    was_training = model.training
    model.eval()
    try:
        denoiser = make_denoiser(model, labels, guidance, batched_guidance)
        common = dict(generator=generator, device=device, clip_x0=clip_x0, callback=callback, progress=progress)
        if sampler == "ddpm":
            return ddpm_sample(denoiser, schedule, shape, **common)
        return ddim_sample(denoiser, schedule, shape, steps=steps or 50, eta=eta, **common)
    finally:
        model.train(was_training)  # leave the model as it was (an EMA copy stays in eval mode)


def save_images(images: torch.Tensor, folder: Path, prefix: str = "sample", labels: Sequence[int] | None = None) -> list[Path]:
    """Write each image in [-1, 1] as a PNG (rounded to uint8); returns the paths."""
    from PIL import Image

    from .data import to_uint8

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(images.cpu()).permute(0, 2, 3, 1).numpy()
    paths = []
    for i, array in enumerate(pixels):
        name = f"{prefix}_{i:05d}" + (f"_class{labels[i]}" if labels is not None else "") + ".png"
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(folder / name)
        paths.append(folder / name)
    return paths


def save_grid(images: torch.Tensor, path: Path, nrow: int, upscale: int = 1) -> Path:
    """One PNG grid of images in [-1, 1], optionally enlarged (nearest) so that small images are visible."""
    import torchvision

    from .data import to_uint8

    grid = torchvision.utils.make_grid((images.cpu().clamp(-1, 1) + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)
    if upscale > 1:
        grid = grid.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    array = to_uint8(grid * 2 - 1).permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)
    return path
