"""The page itself: the two tabs in one gr.Blocks (queued one request at a time) over one loaded model, and its
launch on this machine only."""
from __future__ import annotations

import atexit
import itertools
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import DdpmError
from .edit_tab import build_edit_tab
from .sample_tab import build_sample_tab
from .served import DEFAULT_HOST, DEFAULT_PORT, MAX_IMAGES, MAX_STEPS, ServedModel, import_gradio, load_served_model

# tiny images shown large, without blur
CSS = ("#result img, #process img, #edit-result img { image-rendering: pixelated; width: 100%; height: 100%; "
       "object-fit: contain; }")


def build_app(model_dir: Path | str, device: torch.device | str | None = None, *, max_steps: int = MAX_STEPS,
              max_images: int = MAX_IMAGES, served: ServedModel | None = None, guide: Path | str | None = None):
    """The Gradio page (a gr.Blocks, queued one request at a time) for the model in `model_dir`.

    Loads the model (and its guide, see load_served_model) at once, so a missing or broken model fails here with
    a one-line DdpmError. Give `served` (from `load_served_model`) to reuse a loaded model. Launch with
    `launch_app`, which keeps it local.
    """
    gr = import_gradio()
    served = served or load_served_model(model_dir, device, guide)
    max_steps = max(1, min(max_steps, len(served.schedule)))
    workdir = Path(tempfile.mkdtemp(prefix="ddpm-serve-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    requests = itertools.count(1)

    def new_folder() -> Path:  # each request of either tab writes into a folder of its own
        return workdir / f"request_{next(requests):05d}"

    with gr.Blocks(title="ddpm: sample and edit with a model", analytics_enabled=False) as app:
        gr.Markdown(f"## Sample and edit with a diffusion model\n{served.describe()}")
        with gr.Tab("Sample", elem_id="tab-sample"):
            build_sample_tab(gr, served, new_folder, max_steps, max_images)
        with gr.Tab("Edit", elem_id="tab-edit"):
            build_edit_tab(gr, served, new_folder, max_steps)
    app.queue(default_concurrency_limit=1, max_size=16)
    return app


def launch_app(app, host: str = DEFAULT_HOST, port: int | None = DEFAULT_PORT, *, block: bool = True,
               quiet: bool = False):
    """Serve the page on host:port only: no share link, no browser opened, no telemetry. Returns the app
    (with `app.local_url`) when `block` is False; otherwise serves until Ctrl-C."""
    try:
        app.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block,
                   quiet=quiet, show_error=False, css=CSS, ssr_mode=False, mcp_server=False, pwa=False)
    except OSError as error:
        raise DdpmError(f"cannot listen on {host}:{port} ({error}); pass a free --port") from error
    return app
