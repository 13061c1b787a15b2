"""The page's Sample tab: the settings column (the shared controls, the number of images, the process view and the
collapsed guidance options) and the result column, wired to the request layer's `respond`."""
from __future__ import annotations

from typing import Any

from . import controls as c
from .sample_requests import FIELDS, OUTPUTS, page_defaults, respond
from .served import ServedModel


def build_sample_tab(gr, served: ServedModel, new_folder, max_steps: int, max_images: int) -> None:
    """The Sample tab's widgets inside the current gr.Blocks; `new_folder()` gives each request its own folder."""
    start = page_defaults(served, max_steps, max_images)
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            controls = {
                "class_index": c.class_dropdown(gr, served, start["class_index"], "class"),
                "guidance": c.guidance_slider(gr, served, start["guidance"], "guidance"),
                "guide_weight": c.guide_slider(gr, served, start["guide_weight"], "guide-weight"),
                "sampler": c.sampler_dropdown(gr, served, start["sampler"], "sampler"),
                "steps": c.steps_slider(gr, max_steps, start["steps"], "steps"),
                "seed": c.seed_box(gr, start["seed"], "seed"),
                "count": gr.Slider(1, max_images, value=start["count"], step=1, label="Number of images",
                                   elem_id="count"),
                "show_process": gr.Checkbox(value=start["show_process"], elem_id="show-process",
                                            label="Show process (x0 predictions over the steps)"),
            }
            with gr.Accordion("Guidance options", open=False, elem_id="guidance-options"):
                controls.update(_guidance_options(gr, served, start))
            button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=2):
            outputs = _outputs(gr)

    # named parameters (not *values): gradio_client shows a script writer these names, in FIELDS' order
    def generate(class_index, guidance, guide_weight, sampler, steps, seed, count, show_process, interval_lo,
                 interval_hi, rescale, threshold):
        values = (class_index, guidance, guide_weight, sampler, steps, seed, count, show_process, interval_lo,
                  interval_hi, rescale, threshold)
        folder = new_folder()
        for update in respond(served, dict(zip(FIELDS, values)), folder, max_steps=max_steps,
                              max_images=max_images):
            yield c.gradio_update(gr, outputs, update, folder)

    button.click(generate, [controls[name] for name in FIELDS], [outputs[name] for name in OUTPUTS],
                 api_name="generate", concurrency_limit=1)


def _guidance_options(gr, served: ServedModel, start: dict[str, Any]) -> dict[str, Any]:
    """The collapsed options: where and how strongly to guide (shown when there is guidance: a conditional model
    or a guide, but not a student, guided in its one call), and dynamic thresholding (any model)."""
    guided = (bool(served.num_classes) or served.guide is not None) and served.student is None
    return {
        "interval_lo": gr.Slider(0, 1, value=start["interval_lo"], step=0.05, label="Guide from t/(T-1) =",
                                 visible=guided, elem_id="interval-lo",
                                 info="guidance only on the noisier steps (Kynkaenniemi et al. 2024); "
                                      "0 and 1 = every step"),
        "interval_hi": gr.Slider(0, 1, value=start["interval_hi"], step=0.05, label="to t/(T-1) =", visible=guided,
                                 elem_id="interval-hi"),
        "rescale": gr.Slider(0, 1, value=start["rescale"], step=0.05, label="Guidance rescale phi", visible=guided,
                             elem_id="rescale",
                             info="rescale the guided x0's spread to the conditional one's (Lin et al. 2024)"),
        "threshold": gr.Slider(0, 1, value=start["threshold"], step=0.005, label="Dynamic threshold percentile",
                               elem_id="threshold", info="0 = off; e.g. 0.995 (Imagen)"),
    }


def _outputs(gr) -> dict[str, Any]:
    """The result column's widgets, by output name (OUTPUTS)."""
    return {
        "status": gr.Markdown("Choose the settings and press **Generate**.", elem_id="status"),
        "result": gr.Image(label="Result", type="numpy", format="png", interactive=False, height=320,
                           elem_id="result"),
        "seed_used": gr.Textbox(label="Seed used (type it into Seed to draw the same images again)",
                                interactive=False, elem_id="seed-used"),
        "files": gr.File(label="Images as PNG", file_count="multiple", interactive=False, elem_id="files"),
        "process": gr.Image(label="Process: the x0 prediction over the steps (rows: images, columns: steps)",
                            type="numpy", format="png", interactive=False, visible=False, elem_id="process"),
    }
