"""The Gradio widgets both tabs share, each built in one place: the class, w, g, sampler, steps and seed controls
(their ranges follow the model: a student's sliders span the weights it was trained on), and the function that
turns a request layer's update into Gradio's."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import MAX_SEED
from ..files import atomic_write_bytes, png_bytes
from .fields import page_samplers
from .served import MAX_GUIDANCE, MAX_GUIDE_WEIGHT, RANDOM_SEED, ServedModel


def class_dropdown(gr, served: ServedModel, value, elem_id: str):
    return gr.Dropdown(choices=[(name, i) for i, name in enumerate(served.class_names or [])], value=value,
                       label="Class", visible=bool(served.num_classes), elem_id=elem_id)


def guidance_slider(gr, served: ServedModel, value: float, elem_id: str):
    """Classifier-free guidance w: 0 to MAX_GUIDANCE, or the weights a student of w was trained on."""
    student = served.student
    if student is not None and student.weight != "guidance" and student.fixed.get("guidance") is not None:
        built_in = student.fixed["guidance"]  # a student of g (or of no weight) draws at its teacher's w alone
        return gr.Slider(0.0, MAX_GUIDANCE, value=built_in, step=0.1, label="Classifier-free guidance w",
                         info=f"{student.describe()}: its teacher's w {built_in:g} is built in", interactive=False,
                         visible=bool(served.num_classes), elem_id=elem_id)
    lo, hi = student.weight_range if student is not None and student.weight == "guidance" else (0.0, MAX_GUIDANCE)
    return gr.Slider(lo, hi, value=value, step=0.1, label="Classifier-free guidance w",
                     info="0 unconditional, 1 conditional, >1 guided", visible=bool(served.num_classes),
                     elem_id=elem_id)


def guide_slider(gr, served: ServedModel, value: float, elem_id: str):
    """Autoguidance's weight g; without a guide it stays at 1 (off), greyed out, with a note on how to get one. A
    student of g spans the weights it was trained on."""
    student = served.student
    if student is not None and student.weight == "guide_weight":
        lo, hi = student.weight_range
        return gr.Slider(lo, hi, value=value, step=0.1, label="Guide weight g", elem_id=elem_id,
                         info=f"{student.describe()}: one call a step at any g from {lo:g} to {hi:g}")
    if served.guide is None:
        info = "no guide for this model (start ddpm serve with --guide PATH): autoguidance is off"
    else:
        info = f"autoguidance by `{served.guide_path}`: 1 = off, >1 = away from the weaker guide's errors"
    return gr.Slider(0, MAX_GUIDE_WEIGHT, value=value, step=0.1, label="Guide weight g", info=info,
                     interactive=served.guide is not None, elem_id=elem_id)


def sampler_dropdown(gr, served: ServedModel, value: str, elem_id: str):
    return gr.Dropdown(choices=page_samplers(served), value=value, label="Sampler",
                       info=f"ddpm always takes all T={len(served.schedule)} steps", elem_id=elem_id)


def steps_slider(gr, max_steps: int, value: int, elem_id: str):
    return gr.Slider(1, max_steps, value=value, step=1, label="Steps", elem_id=elem_id)


def seed_box(gr, value: str, elem_id: str):
    return gr.Textbox(value=value, label="Seed", info=f"'{RANDOM_SEED}' or a number from 0 to {MAX_SEED}",
                      elem_id=elem_id)


def gradio_update(gr, outputs: dict, update: dict[str, Any], folder: Path) -> dict:
    """A request layer's update keyed by the output components; a warning pops up, the process image shows or
    hides, and every image goes to Gradio as a PNG file in the request's `folder` (shown_png)."""
    if "warning" in update:
        gr.Warning(update["warning"])
    update = {name: shown_png(value, folder, name) if isinstance(value, np.ndarray) else value
              for name, value in update.items()}
    values = {outputs[name]: value for name, value in update.items() if name in outputs}
    if "process" in update:
        values[outputs["process"]] = gr.update(value=update["process"], visible=update["process"] is not None)
    return values


def shown_png(image: np.ndarray, folder: Path, name: str) -> str:
    """`image` (uint8, H x W [x C]) written to `folder` as <name>-<hash of its bytes>.png; the path, for Gradio.

    Why not hand Gradio the array: Gradio stores an array under a name made from its bytes and rewrites that file in
    place each time it is handed one, so two requests drawing the same picture (the same seed, or a blank preview)
    truncate a file another client is downloading ("peer closed connection", a CI failure). A path Gradio copies
    once, atomically, and never rewrites; ours is written atomically too.
    """
    data = png_bytes(torch.from_numpy(image if image.ndim == 3 else image[..., None]).permute(2, 0, 1))
    path = Path(folder) / f"{name}-{hashlib.sha256(data).hexdigest()[:16]}.png"
    if not path.exists():
        atomic_write_bytes(path, data)
    return str(path)
