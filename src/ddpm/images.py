"""One image file in, one tensor out: decoding any format safely (no malformed file can crash the process or
exhaust its memory), the deterministic resize and crop that training applies, the data range, and the image and
mask files that `ddpm edit` and the page's Edit tab read exactly as training reads its data."""
from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import DataError

# What decoders raise on a missing, truncated or malformed file (PIL: OSError, SyntaxError, EOFError,
# struct.error, DecompressionBombError; ImageTooLarge is a ValueError). Anything else is a bug and propagates.
UNREADABLE = (OSError, ValueError, SyntaxError, RuntimeError, EOFError, struct.error, Image.DecompressionBombError)


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return x * 2 - 1


def uint8_to_model_range(image: torch.Tensor) -> torch.Tensor:
    """uint8 [.., C, H, W] -> float in [-1, 1]; `to_uint8` gives the same uint8 back exactly."""
    return to_model_range(image.float() / 255)


def _high_byte(image: torch.Tensor) -> torch.Tensor:
    """16-bit (or wider integer) pixels -> uint8 by their high byte, as PIL reduces 16-bit RGB PNGs."""
    return (image.to(torch.int64).clamp(0, 65535) >> 8).to(torch.uint8)


# Decoding refuses, before any pixel is decoded, an image whose header claims more pixels than this (8192 x 8192,
# 192 MiB as RGB): a decompression bomb (a few KB claiming 60000 x 60000) would otherwise take gigabytes, as
# libjpeg through torchvision did (benchmarks/RESULTS.md, "Malformed files"). Camera photos (up to ~50 megapixels)
# pass.
MAX_PIXELS = 8192 * 8192


# A strip longer than this many times its width is cropped to that ratio around its centre before the resize:
# the centre square that is kept comes from there anyway, and a 20000 x 2 strip resized to 64 rows would be
# 640,000 columns (123 MB) for a 64 x 64 crop.
MAX_ASPECT = 4


class ImageTooLarge(ValueError):
    """An image header claims more than MAX_PIXELS pixels (one of UNREADABLE: the file is skipped, not decoded)."""


def _checked_header(image: Image.Image) -> None:
    width, height = image.size
    if width < 1 or height < 1 or width * height > MAX_PIXELS:
        raise ImageTooLarge(f"the header claims {width} x {height} pixels; at most {MAX_PIXELS:,} are decoded "
                            "(a decompression bomb, or a photo to downscale first)")


def _decode_pil(image: Image.Image, channels: int) -> torch.Tensor:
    """Any format PIL reads (PNG, palette, RGBA, CMYK, 16-bit, GIF, BMP, TIFF, WebP...) as uint8 [C, H, W]."""
    if image.mode.startswith("I"):  # 16/32-bit integer grey: the high byte of the 16-bit range
        image = Image.fromarray(_high_byte(torch.from_numpy(np.array(image, dtype=np.int64))).numpy(), "L")
    array = np.array(image.convert("L" if channels == 1 else "RGB"))
    return torch.from_numpy(array).reshape(array.shape[0], array.shape[1], channels).permute(2, 0, 1)


def decode_image(data: bytes, channels: int) -> torch.Tensor:
    """A file's bytes -> uint8 [channels, H, W] at full size; raises one of UNREADABLE if it cannot be read.

    No malformed file can crash the process, exhaust its memory or fill the terminal here (tests/test_fuzz.py):
    - every format is decoded by PIL, which raises on damaged data. torchvision.io is not used: its libpng
      wrapper (torchvision 0.29) dies with a segmentation fault on PNGs whose compressed data is damaged or short
      (benchmarks/RESULTS.md, "Malformed files", has the counts and the speed cost), and its libjpeg wrapper
      prints a line to stderr for every damaged JPEG;
    - the header is read first (PIL's open reads nothing else) and sizes over MAX_PIXELS are refused."""
    with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as image:  # header only: no pixel decoded yet
        warnings.simplefilter("ignore")  # e.g. "Truncated File Read" for each damaged TIFF: files, not code, at fault
        _checked_header(image)
        return _decode_pil(image, channels)


def resize_center_crop(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [C, H, W] -> [C, size, size]: the shorter side to `image_size` (aspect kept; bilinear, antialiased:
    torch's uint8 kernel, within 1 grey level of PIL's), then the centre square. Deterministic: random flips
    happen in the training loop, from its seeded generator."""
    from torchvision.transforms.v2 import functional as TF

    height, width = image.shape[-2:]
    if max(height, width) > MAX_ASPECT * min(height, width):  # see MAX_ASPECT
        keep = MAX_ASPECT * min(height, width)
        image = TF.center_crop(image, [min(height, keep), min(width, keep)])
    image = TF.resize(image, [image_size], antialias=True)
    return TF.center_crop(image, [image_size, image_size]).contiguous()


MASK_THRESHOLD = 128  # a mask pixel at least this white (after the resize) is regenerated


def _read_decoded(path: Path, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the file decoded as training decodes it, the same file as RGB); DataError (one line) if unreadable."""
    try:
        data = Path(path).read_bytes()
        return decode_image(data, channels), decode_image(data, 3)
    except UNREADABLE as error:
        why = (str(error).splitlines() or [type(error).__name__])[0]
        raise DataError(f"{path} cannot be read as an image ({why}); give a PNG or JPEG") from None


def read_image_to_edit(path: Path, channels: int, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """An image to edit, read exactly as training reads its data (`decode_image`, then `resize_center_crop`):
    uint8 [C, image_size, image_size] and the file's (height, width). A colour image for a greyscale model, or a
    greyscale one for a colour model, is refused in one line (training would convert it silently; an edit that
    changed an input's colours is not what was asked for)."""
    pixels, rgb = _read_decoded(path, channels)
    grey = bool((rgb[0] == rgb[1]).all() and (rgb[1] == rgb[2]).all())
    if channels == 1 and not grey:
        raise DataError(f"{path} is a colour image but the model draws 1-channel (greyscale) images; convert it to "
                        "greyscale first")
    if channels == 3 and grey:
        raise DataError(f"{path} is a greyscale image but the model draws 3-channel (RGB) images; give a colour "
                        "image")
    return resize_center_crop(pixels, image_size), tuple(pixels.shape[-2:])


def read_mask(path: Path, image_size: int, size: tuple[int, int]) -> tuple[torch.Tensor, bool]:
    """A mask (white = regenerate) for an image of `size` (height, width): bool [1, image_size, image_size],
    resized and cropped exactly as the image, then at least MASK_THRESHOLD grey counts as white; and whether the
    file had grey values (between black and white) to report. A mask of another size than its image is refused."""
    mask, _ = _read_decoded(path, 1)
    if tuple(mask.shape[-2:]) != tuple(size):
        raise DataError(f"mask {path} is {mask.shape[-1]}x{mask.shape[-2]} but its image is {size[1]}x{size[0]}; "
                        "give a mask of the image's size")
    grey = bool(((mask > 0) & (mask < 255)).any())
    return resize_center_crop(mask, image_size) >= MASK_THRESHOLD, grey
