"""`ddpm serve`: a local web page (Gradio) to sample and edit with a trained model. Optional extra:
pip install -e '.[ui]'.

The page draws through `ddpm sample`'s and `ddpm edit`'s own paths (same batch size, seed and guide) and prints the
command that makes the same images. Its modules, from the bottom up:
- served.py: the model, opened as `ddpm sample` opens it (sources.open_model) on one long-lived torch thread;
- fields.py: where the shared controls start and how their values are checked (one-line DdpmError), no Gradio;
- sample_requests.py, edit_requests.py: each tab's request layer, plain functions that need no Gradio (a request
  from the fields, the images drawn live, the equivalent command);
- controls.py, sample_tab.py, edit_tab.py: the Gradio widgets, the shared ones built once;
- app.py: both tabs in one page, launched on this machine only. The command line is cli/serve.py.
Nothing is written to the model folder: images go to a temporary folder that is removed when the server stops.
"""
from .app import CSS, build_app, launch_app
from .edit_requests import EDIT_FIELDS, EDIT_OUTPUTS, EditRequest, parse_edit_request, respond_edit
from .fields import GuidanceDefaults, guidance_defaults, page_samplers, parse_seed, student_defaults
from .sample_requests import (
    FIELDS,
    OUTPUTS,
    Finished,
    Request,
    Step,
    cli_equivalent,
    draw,
    finished_text,
    page_defaults,
    parse_request,
    request_from_fields,
    respond,
    sample_live,
)
from .served import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    INSTALL_HINT,
    MAX_IMAGES,
    MAX_STEPS,
    RANDOM_SEED,
    ServedModel,
    TorchThread,
    grid_array,
    import_gradio,
    load_served_model,
    process_array,
)

__all__ = [
    "CSS", "DEFAULT_HOST", "DEFAULT_PORT", "EDIT_FIELDS", "EDIT_OUTPUTS", "FIELDS", "INSTALL_HINT", "MAX_IMAGES",
    "MAX_STEPS", "OUTPUTS", "RANDOM_SEED", "EditRequest", "Finished", "GuidanceDefaults", "Request", "ServedModel",
    "Step", "TorchThread", "build_app", "cli_equivalent", "draw", "finished_text", "grid_array", "guidance_defaults",
    "import_gradio", "launch_app", "load_served_model", "page_defaults", "page_samplers", "parse_edit_request",
    "parse_request", "parse_seed", "process_array", "request_from_fields", "respond", "respond_edit",
    "sample_live", "student_defaults",
]
