"""The page's Edit tab: the image editor, the mode and strength, and the shared controls, wired to the request
layer's `respond_edit` (edit_requests.py)."""
from __future__ import annotations

from . import controls as c
from .edit_requests import DEFAULT_STRENGTH, EDIT_FIELDS, EDIT_OUTPUTS, MODES, respond_edit
from .fields import control_defaults
from .served import ServedModel


def build_edit_tab(gr, served: ServedModel, new_folder, max_steps: int) -> None:
    """The Edit tab's widgets inside the current gr.Blocks; `new_folder()` gives each request its own folder."""
    start = control_defaults(served, max_steps)
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            controls = {
                "image": gr.ImageEditor(label="Image: upload, then paint what to redraw", type="numpy",
                                        image_mode="RGBA", format="png", transforms=(), sources=("upload",),
                                        layers=False, elem_id="edit-image",
                                        brush=gr.Brush(colors=["#ff0000"], color_mode="fixed")),
                "mode": gr.Radio(list(MODES), value=MODES[0], label="Edit",
                                 info="inpaint: redraw the painted region; image-to-image: redraw it all from "
                                      "noise level strength", elem_id="edit-mode"),
                "class_index": c.class_dropdown(gr, served, start["class_index"], "edit-class"),
                "strength": gr.Slider(0, 1, value=DEFAULT_STRENGTH, step=0.05, label="Strength (image-to-image)",
                                      info="0 keeps the image, 1 ignores it", elem_id="edit-strength"),
                "guidance": c.guidance_slider(gr, served, start["guidance"], "edit-guidance"),
                "guide_weight": c.guide_slider(gr, served, start["guide_weight"], "edit-guide-weight"),
                "sampler": c.sampler_dropdown(gr, served, start["sampler"], "edit-sampler"),
                "steps": c.steps_slider(gr, max_steps, start["steps"], "edit-steps"),
                "seed": c.seed_box(gr, "0", "edit-seed"),
            }
            button = gr.Button("Generate", variant="primary", elem_id="edit-generate")
        with gr.Column(scale=2):
            outputs = {
                "edit_status": gr.Markdown("Upload an image, paint over what to redraw, press **Generate**.",
                                           elem_id="edit-status"),
                "edit_result": gr.Image(label="Input | mask | result", type="numpy", format="png",
                                        interactive=False, height=320, elem_id="edit-result"),
            }

    def edit(image, mode, class_index, strength, guidance, guide_weight, sampler, steps, seed):
        values = dict(zip(EDIT_FIELDS, (image, mode, class_index, strength, guidance, guide_weight, sampler, steps,
                                        seed)))
        folder = new_folder()
        for update in respond_edit(served, values, folder, max_steps=max_steps):
            yield c.gradio_update(gr, outputs, update, folder)

    button.click(edit, [controls[name] for name in EDIT_FIELDS], [outputs[name] for name in EDIT_OUTPUTS],
                 api_name="edit", concurrency_limit=1)
