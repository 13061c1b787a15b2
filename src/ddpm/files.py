"""Every file the package writes goes through here: atomic bytes and JSON, PNG images and grids, sample names,
the denoising process (strip and GIF).

Atomic: a temporary file in the same folder, fsync, then rename over the target, so a reader (or a crash)
sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see the module docstring); the file gets the mode open() would give it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8, rounded (not truncated) and clamped."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def sample_name(index: int, label: int | None = None, prefix: str = "sample") -> str:
    """The one naming of sample files: sample_00024_class3.png (the class only for conditional models)."""
    return f"{prefix}_{index:05d}" + (f"_class{int(label)}" if label is not None else "") + ".png"


def png_bytes(image: torch.Tensor) -> bytes:
    """One image, uint8 [C, H, W] or float [-1, 1] [C, H, W], as PNG bytes (grayscale for one channel)."""
    from PIL import Image

    if image.dtype != torch.uint8:
        image = to_uint8(image)
    array = image.cpu().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def read_png(path: Path, channels: int) -> torch.Tensor:
    """A PNG as uint8 [C, H, W] with `channels` channels; raises OSError/ValueError if absent or broken."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    return torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], channels).permute(2, 0, 1)


def save_images(images: torch.Tensor, folder: Path, labels: Sequence[int] | None = None, start: int = 0,
                prefix: str = "sample") -> list[Path]:
    """Write each image (float [-1, 1] or uint8) as its own PNG, named by `sample_name`; returns the paths."""
    folder = Path(folder)
    paths = []
    for i, image in enumerate(images):
        path = folder / sample_name(start + i, None if labels is None else int(labels[i]), prefix)
        atomic_write_bytes(path, png_bytes(image))
        paths.append(path)
    return paths


def make_grid(images: torch.Tensor, nrow: int, upscale: int = 1) -> torch.Tensor:
    """Images in [-1, 1] tiled with white padding, as uint8 [C, H, W], optionally enlarged (nearest)."""
    import torchvision

    grid = torchvision.utils.make_grid((images.cpu().float().clamp(-1, 1) + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)
    if upscale > 1:
        grid = grid.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
    return to_uint8(grid * 2 - 1)


GRID_MIN_PIXELS = 64  # grids of small images are enlarged (nearest) to at least this many pixels per image


def grid_upscale(image_size: int) -> int:
    """How many times grids of `image_size` images are enlarged: to at least GRID_MIN_PIXELS per image."""
    return max(1, GRID_MIN_PIXELS // image_size)


def save_grid(images: torch.Tensor, path: Path, nrow: int, upscale: int = 1) -> Path:
    """One PNG grid of images in [-1, 1] (see `make_grid`)."""
    atomic_write_bytes(Path(path), png_bytes(make_grid(images, nrow, upscale)))
    return Path(path)


def atomic_write_safetensors(path: Path, module: torch.nn.Module | dict, dtype: torch.dtype | None = None,
                             metadata: dict[str, str] | None = None) -> None:
    """A module's state_dict (or a dict of tensors) as safetensors (no pickle), written atomically: the one weights
    writer. `dtype` converts floating-point tensors (a compact copy); `metadata` goes into the file's header."""
    from safetensors.torch import save

    state = module.state_dict() if isinstance(module, torch.nn.Module) else module
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
               for k, v in state.items()}
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))


# -- the denoising process: frames kept over the steps, as one grid (rows: images, columns: steps) and a GIF -------
PROCESS_FRAMES = 10  # about this many columns: every (total // PROCESS_FRAMES)-th step, and always the last one
PROCESS_GIF_SIZE = 128  # pixels a side of process.gif (nearest-neighbour enlargement)


def keeps_process_frame(step: int, total: int) -> bool:
    """Whether step `step` (0-based) of `total` is a column of the process strip (see PROCESS_FRAMES)."""
    return step % max(1, total // PROCESS_FRAMES) == 0 or step == total - 1


def process_strip(frames: Sequence[torch.Tensor], upscale: int = 1) -> torch.Tensor:
    """The frames (each [N, C, H, W] in [-1, 1], one per kept step) as one uint8 grid [C, H, W]: one row per image,
    one column per frame (`make_grid`'s padding, enlarged `upscale` times)."""
    strip = torch.stack([frame.cpu() for frame in frames], 1).flatten(0, 1)
    return make_grid(strip, nrow=len(frames), upscale=upscale)


def process_gif_bytes(frames: Sequence[torch.Tensor], size: int = PROCESS_GIF_SIZE, frame_ms: int = 200) -> bytes:
    """The first image of each frame as an endless GIF animation, enlarged to size x size (nearest)."""
    from PIL import Image

    pictures = []
    for frame in frames:
        array = to_uint8(frame[0]).cpu().permute(1, 2, 0).numpy()
        picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        pictures.append(picture.resize((size, size), Image.NEAREST))
    buffer = io.BytesIO()
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=frame_ms, loop=0)
    return buffer.getvalue()


def save_process(frames: Sequence[torch.Tensor], folder: Path, upscale: int = 1) -> tuple[Path, Path]:
    """folder/process.png (`process_strip`) and folder/process.gif (`process_gif_bytes`); returns both paths."""
    folder = Path(folder)
    png, gif = folder / "process.png", folder / "process.gif"
    atomic_write_bytes(png, png_bytes(process_strip(frames, upscale)))
    atomic_write_bytes(gif, process_gif_bytes(frames))
    return png, gif
