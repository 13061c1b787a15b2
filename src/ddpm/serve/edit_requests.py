"""The Edit tab's request layer, without Gradio: upload an image, paint what to redraw (inpainting), or redraw the
whole image from a noise level (image-to-image).

As the Sample tab does for `ddpm sample`, it edits exactly as `ddpm edit` does and prints that command: the uploaded
image and the painted mask are written as PNGs into the request's folder, read back with the CLI's readers
(`images.read_image_to_edit`, `images.read_mask`) and edited by the CLI's path (`editing.edit_batches`), so the printed
command, run on those files, writes the same result.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from ..config import SamplingConfig
from ..editing import edit_batches
from ..errors import DdpmError
from ..files import atomic_write_bytes, png_bytes
from ..images import read_image_to_edit, read_mask, uint8_to_model_range
from .fields import parse_number, parse_sampling, parse_seed, sampling_flags
from .served import ServedModel, grid_array

MODES = ("inpaint", "image-to-image")
# the tab's fields, in the order its endpoint ("edit") takes them
EDIT_FIELDS = ("image", "mode", "class_index", "strength", "guidance", "guide_weight", "sampler", "steps", "seed")
EDIT_OUTPUTS = ("edit_status", "edit_result")
DEFAULT_STRENGTH = 0.6


@dataclass(frozen=True)
class EditRequest:
    """One validated edit: the files written for it and everything `editing.edit_batches` needs."""

    image_path: Path
    mask_path: Path | None  # inpainting; None: image-to-image
    image: torch.Tensor  # [1, C, S, S] in [-1, 1], as `ddpm edit` reads image_path
    mask: torch.Tensor | None  # [1, 1, S, S] bool, as `ddpm edit` reads mask_path
    strength: float | None
    labels: tuple[int, ...] | None
    sampling: SamplingConfig
    seed: int


def editor_arrays(value) -> tuple[np.ndarray, np.ndarray]:
    """Gradio ImageEditor's value -> (the uploaded image, uint8 H x W x 3; the mask, bool H x W: True where any
    layer was painted). One-line DdpmError when nothing was uploaded."""
    background = value.get("background") if isinstance(value, Mapping) else None
    if background is None or np.asarray(background).size == 0:
        raise DdpmError("no image: upload one (drop a PNG or JPEG on the editor) before pressing Generate")
    background = np.asarray(background)
    if background.ndim == 2:
        background = np.repeat(background[..., None], 3, axis=2)
    rgb = background[..., :3].astype(np.uint8)
    mask = np.zeros(rgb.shape[:2], dtype=bool)
    for layer in value.get("layers") or []:
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[:2] == mask.shape and layer.shape[2] == 4:
            mask |= layer[..., 3] > 0
    return rgb, mask


def _write_inputs(rgb: np.ndarray, mask: np.ndarray | None, folder: Path) -> tuple[Path, Path | None]:
    """input.png (greyscale when its three channels are equal) and mask.png (white = redraw) in `folder`."""
    grey = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    pixels = torch.from_numpy(np.ascontiguousarray(rgb[..., :1] if grey else rgb)).permute(2, 0, 1)
    image_path = folder / "input.png"
    atomic_write_bytes(image_path, png_bytes(pixels))
    if mask is None:
        return image_path, None
    mask_path = folder / "mask.png"
    atomic_write_bytes(mask_path, png_bytes(torch.from_numpy(mask.astype(np.uint8) * 255)[None]))
    return image_path, mask_path


def parse_edit_request(served: ServedModel, fields: Mapping[str, Any], folder: Path, *, max_steps: int,
                       rng=None) -> EditRequest:
    """The tab's fields (EDIT_FIELDS) -> an EditRequest, writing the image and mask into `folder`; one-line
    DdpmError naming the field otherwise."""
    mode = fields["mode"]
    if mode not in MODES:
        raise DdpmError(f"mode {mode!r} is unknown: choose one of {', '.join(MODES)}")
    rgb, painted = editor_arrays(fields["image"])
    if mode == "inpaint" and not painted.any():
        raise DdpmError("nothing painted: paint over what to redraw (or choose image-to-image)")
    strength = parse_number(fields["strength"], "strength", 0.0, 1.0) if mode == "image-to-image" else None
    label, sampling = parse_sampling(served, fields["class_index"], fields["guidance"], fields["sampler"],
                                     fields["steps"], guide_weight=fields["guide_weight"], max_steps=max_steps)
    labels = None if label is None else (label,)
    seed = parse_seed(fields["seed"], rng)
    folder.mkdir(parents=True, exist_ok=True)
    image_path, mask_path = _write_inputs(rgb, painted if mode == "inpaint" else None, folder)
    c = served.model.config
    image, size = read_image_to_edit(image_path, c.in_channels, c.image_size)
    mask = None if mask_path is None else read_mask(mask_path, c.image_size, size)[0][None]
    if mask is not None and not mask.any():
        raise DdpmError("the painted region vanishes at the model's size: paint a larger region")
    return EditRequest(image_path, mask_path, uint8_to_model_range(image)[None], mask, strength, labels, sampling,
                       seed)


def edit_cli_equivalent(served: ServedModel, request: EditRequest) -> str:
    """The `ddpm edit` command that writes the same result from the request's files (same device)."""
    parts = ["ddpm edit", shlex.quote(str(served.source)), shlex.quote(str(request.image_path))]
    parts += ["--mask", shlex.quote(str(request.mask_path))] if request.mask_path else \
        ["--strength", repr(request.strength)]
    if request.labels is not None:
        parts += ["--labels", str(request.labels[0])]
    parts += sampling_flags(served, request.sampling, request.labels is not None)
    parts += ["--seed", str(request.seed), "--device", str(served.device), "--out", "OUT"]
    return " ".join(parts)


def run_edit(served: ServedModel, request: EditRequest) -> torch.Tensor:
    """The edited image, [1, C, S, S] in [-1, 1] on the CPU, by `ddpm edit`'s path, on the page's torch thread."""
    labels = None if request.labels is None else torch.tensor(request.labels, dtype=torch.long)
    return served.worker.run(lambda: edit_batches(
        served.model, served.schedule, request.image, masks=request.mask, strength=request.strength, labels=labels,
        sampling=request.sampling, guide=served.guide, seed=request.seed))


def respond_edit(served: ServedModel, fields: Mapping[str, Any], folder: Path, *, max_steps: int) \
        -> Iterator[dict[str, Any]]:
    """One press of the tab's Generate, without Gradio: yields {output name (EDIT_OUTPUTS): value}, "warning" for a
    refused or failed request. The result shows input | mask | result (input | result for image-to-image)."""
    try:
        request = parse_edit_request(served, fields, folder, max_steps=max_steps)
    except DdpmError as error:
        yield {"edit_status": f"**Not started:** {error}", "warning": str(error)}
        return
    yield {"edit_status": "editing..."}
    try:
        result = run_edit(served, request)
    except (DdpmError, NotImplementedError) as error:
        yield {"edit_status": f"**Failed:** {error}", "warning": str(error)}
        return
    atomic_write_bytes(folder / "result.png", png_bytes(result[0]))
    row = [request.image[0]] + ([request.mask[0].expand_as(request.image[0]).float() * 2 - 1]
                                if request.mask is not None else []) + [result[0]]
    what = "inpainted" if request.mask is not None else f"redrawn at strength {request.strength:g}"
    yield {"edit_status": f"done: {what}, seed {request.seed}.  \nSame result from the command line: "
                          f"`{edit_cli_equivalent(served, request)}`",
           "edit_result": grid_array(torch.stack(row), served.model.config.image_size, nrow=len(row))}
