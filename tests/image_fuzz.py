"""Malformed image files from a fixed seed: the corpus of the decoder fuzz test (tests/test_fuzz.py) and of
`python benchmarks/bench.py fuzz`.

Each file starts from a small valid image (PNG in five modes, JPEG in three, GIF, BMP, WebP, TIFF) and gets one
mutation: truncation, random byte changes, a PNG whose IDAT bytes are changed under a recomputed CRC (only
zlib's own check can notice; torchvision 0.29's libpng wrapper dies on it with a segmentation fault), a PNG
whose header claims more rows than its data holds, headers claiming huge sizes (PNG, GIF, BMP, JPEG), one format
under another's suffix, a splice of two files, an empty file, text under an image suffix, and odd but valid
shapes (1x1, a 20000x2 strip).
"""
from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
from PIL import Image, features

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SUFFIXES = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "BMP": "bmp", "WEBP": "webp", "TIFF": "tif"}


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _picture(rng: random.Random, mode: str = "RGB", size: tuple[int, int] | None = None) -> Image.Image:
    """A small picture with structure (a gradient and noise), so that compressed streams are not trivial."""
    width, height = size or (rng.randint(12, 40), rng.randint(12, 40))
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(rng.randrange(2**32)).integers(0, 60, (height, width, 3))
    rgb = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1) + noise
    image = Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")
    if mode == "I;16":
        return Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257)  # 16-bit grey: mode I;16
    if mode == "P":
        return image.quantize(16)
    return image.convert(mode)


def base_files(rng: random.Random) -> list[tuple[str, bytes]]:
    """(format, bytes) of one valid file of each kind: the seeds that mutations start from."""
    files = [("PNG", _encode(_picture(rng, mode), "PNG")) for mode in ("RGB", "L", "LA", "P", "I;16", "RGBA")]
    files += [("JPEG", _encode(_picture(rng, mode), "JPEG", quality=90)) for mode in ("RGB", "L", "CMYK")]
    frames = [_picture(rng, "RGB", (24, 20)).quantize(32) for _ in range(3)]
    files.append(("GIF", _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)))
    files += [("BMP", _encode(_picture(rng), "BMP")), ("TIFF", _encode(_picture(rng), "TIFF"))]
    if features.check("webp"):
        files.append(("WEBP", _encode(_picture(rng), "WEBP", quality=80)))
    return files


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    chunks, position = [], len(PNG_SIGNATURE)
    while position + 8 <= len(png):
        length, kind = struct.unpack(">I4s", png[position : position + 8])
        chunks.append((kind, png[position + 8 : position + 8 + length]))
        position += 12 + length
    return chunks


def _png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """Chunks with correct lengths and CRCs: a decoder can only object to what they contain."""
    out = [PNG_SIGNATURE]
    for kind, data in chunks:
        out.append(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)))
    return b"".join(out)


def with_ihdr(png: bytes, width: int | None = None, height: int | None = None) -> bytes:
    chunks = _chunks(png)
    kind, data = chunks[0]
    w, h = struct.unpack(">II", data[:8])
    chunks[0] = (kind, struct.pack(">II", width or w, height or h) + data[8:])
    return _png(chunks)


def png_idat_changed(rng: random.Random, png: bytes) -> bytes:
    """A few IDAT bytes changed, the chunk CRC recomputed: "IDAT: incorrect data check" in libpng."""
    chunks = _chunks(png)
    for i, (kind, data) in enumerate(chunks):
        if kind == b"IDAT" and len(data) > 4:
            changed = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                changed[rng.randrange(2, len(changed))] ^= rng.randint(1, 255)
            chunks[i] = (kind, bytes(changed))
    return _png(chunks)


def png_short_data(rng: random.Random, png: bytes) -> bytes:
    """The header claims more rows than the data holds: "Not enough image data" in libpng."""
    height = struct.unpack(">I", _chunks(png)[0][1][4:8])[0]
    return with_ihdr(png, height=height * rng.randint(2, 50))


def huge_header(rng: random.Random, fmt: str, data: bytes) -> bytes:
    """The same file with a header claiming tens of thousands of pixels a side (a decompression bomb's header)."""
    side = rng.choice([20_000, 60_000, 65_535])
    if fmt == "PNG":
        return with_ihdr(data, side, side)
    if fmt == "GIF":  # logical screen and first image descriptor
        out = bytearray(data)
        out[6:10] = struct.pack("<HH", side, side)
        return bytes(out)
    if fmt == "BMP":
        out = bytearray(data)
        out[18:26] = struct.pack("<ii", side * 2, side * 2)
        return bytes(out)
    if fmt == "JPEG":  # the frame header (SOF0/SOF2) holds height and width
        out = bytearray(data)
        for marker in (b"\xff\xc0", b"\xff\xc2"):
            at = out.find(marker)
            if at >= 0:
                out[at + 5 : at + 9] = struct.pack(">HH", side, side)
                break
        return bytes(out)
    return data


def _mutate(rng: random.Random, fmt: str, data: bytes, others: list[tuple[str, bytes]]) -> tuple[str, bytes, str]:
    """(kind of mutation, bytes, suffix) for one mutated file."""
    own = SUFFIXES[fmt]
    kind = rng.choice(["truncate", "bytes", "bytes", "huge", "suffix", "splice"]
                      + (["idat", "idat", "short"] if fmt == "PNG" else []))
    if kind == "truncate":
        return kind, data[: rng.randrange(0, len(data))], own
    if kind == "bytes":
        changed = bytearray(data)
        for _ in range(rng.randint(1, 12)):
            changed[rng.randrange(len(changed))] = rng.randrange(256)
        return kind, bytes(changed), own
    if kind == "huge":
        return kind, huge_header(rng, fmt, data), own
    if kind == "suffix":
        return kind, data, rng.choice([s for s in SUFFIXES.values() if s != own])
    if kind == "splice":
        _, other = rng.choice(others)
        return kind, data[: rng.randrange(len(data))] + other[rng.randrange(len(other)) :], own
    if kind == "idat":
        return kind, png_idat_changed(rng, data), own
    return kind, png_short_data(rng, data), own


def odd_files(rng: random.Random) -> list[tuple[str, bytes]]:
    """Files with no mutation that still test the edges: (name, bytes)."""
    return [
        ("empty.png", b""), ("empty.jpg", b""),
        ("text.png", b"this is not an image\n" * 3), ("text.jpg", b"<html></html>"),
        ("one_pixel.png", _encode(_picture(rng, "RGB", (1, 1)), "PNG")),
        ("strip.png", _encode(_picture(rng, "L", (20_000, 2)), "PNG")),
        ("tall_strip.png", _encode(_picture(rng, "RGB", (2, 5_000)), "PNG")),
        ("huge_png.png", huge_header(rng, "PNG", _encode(_picture(rng), "PNG"))),
    ]


def malformed_files(count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """`count` (file name, bytes) pairs, the same for the same seed: the odd files, then mutations."""
    rng = random.Random(seed)
    bases = base_files(rng)
    files = odd_files(rng)
    while len(files) < count:
        fmt, data = rng.choice(bases)
        kind, mutated, suffix = _mutate(rng, fmt, data, bases)
        files.append((f"fuzz_{len(files):05d}_{fmt.lower()}_{kind}.{suffix}", mutated))
    return files[:count]


def good_files(count: int, seed: int = 1) -> list[tuple[str, bytes]]:
    """`count` valid files of every kind: what a folder of real photos holds beside the bad ones."""
    rng = random.Random(seed)
    kinds = [("PNG", "RGB", {}), ("PNG", "P", {}), ("PNG", "I;16", {}), ("JPEG", "RGB", {"quality": 90}),
             ("JPEG", "L", {"quality": 90}), ("GIF", "P", {}), ("BMP", "RGB", {}), ("TIFF", "RGB", {})]
    files = []
    for i in range(count):
        fmt, mode, options = kinds[i % len(kinds)]
        files.append((f"good_{i:05d}.{SUFFIXES[fmt]}", _encode(_picture(rng, mode), fmt, **options)))
    return files
