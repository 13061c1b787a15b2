"""`ddpm serve`: the Gradio page, driven through gradio_client and through a real headless Chromium, and its request
logic (parse_request, cli_equivalent, respond) on its own, without Gradio.

The page must draw exactly what `ddpm sample` draws for the same settings (guide included), show its progress live,
reject bad fields with a message, stay on 127.0.0.1, and never write to the model folder.

Also a script: `python tests/test_serve.py MODEL_DIR OUT.png` drives the page in Chromium the way the browser
test does and saves the screenshot (docs/serve.png is made this way).
"""
from __future__ import annotations

import io
import os
import shlex
import socket
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm import cli, serve
from ddpm.checkpoint import save_pretrained
from ddpm.config import AUTOGUIDED, DEFAULT_CFG, SAMPLE_BATCH, DiffusionConfig, RunConfig, SamplingConfig
from ddpm.errors import DdpmError
from ddpm.files import keeps_process_frame, save_process, to_uint8
from ddpm.pipeline import sample_batches
from ddpm.serve import sample_requests
from ddpm.sources import load_guide
from ddpm.training import train
from ddpm.unet import UNet
from helpers import TINY_MODEL, tiny_model_config

# Debian's chromium (scripts/ensure_chromium.sh installs it); DDPM_TEST_CHROMIUM names another binary.
CHROMIUM = os.environ.get("DDPM_TEST_CHROMIUM", "/usr/bin/chromium")
CLASS_NAMES = [f"digit{i}" for i in range(10)]


def tiny_model_folder(folder: Path, num_classes: int | None = 10) -> Path:
    """An 8x8 UNet with seeded random weights, exported like a run's model/ folder (fast: no training, no guide)."""
    torch.manual_seed(0)
    model = UNet(tiny_model_config(num_classes=num_classes))
    save_pretrained(model, folder, DiffusionConfig(), {"class_names": CLASS_NAMES if num_classes else None, "step": 2})
    return folder


def tiny_guided_run(folder: Path) -> Path:
    """A 2-step conditional run of the tiny UNet on mnist (class names "0".."9") whose guide snapshot RUN/guide is
    the EMA after step 1. The high learning rate makes the guide differ visibly from the final model."""
    runtime = dict(out_dir=str(folder), steps=2, device="cpu", amp="none", num_workers=0, checkpoint_every=1,
                   keep_checkpoints=1, sample_every=0, val_every=0, log_every=1, guide_fraction=0.5)
    train(RunConfig.from_dict({"model": dict(TINY_MODEL), "runtime": runtime,
                               "train": dict(data="mnist", conditional=True, batch_size=4, lr=0.01, ema_warmup=1,
                                             ema_decay=0.8)}), progress=False)
    assert (folder / "guide" / "model.safetensors").is_file()
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folder_snapshot(folder: Path) -> dict:
    """Every path under `folder` with its size and modification time: any write changes it."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def png_pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def widgets(app) -> dict:
    return {block.elem_id: block for block in app.blocks.values() if getattr(block, "elem_id", None)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A model without a guide."""
    return tiny_model_folder(tmp_path_factory.mktemp("served") / "model")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run with a guide snapshot: the page serves it with autoguidance by default."""
    return tiny_guided_run(tmp_path_factory.mktemp("guided") / "run")


@pytest.fixture(scope="module")
def guided(run_dir) -> serve.ServedModel:
    return serve.load_served_model(run_dir, "cpu")


@pytest.fixture(scope="module")
def unguided(model_dir) -> serve.ServedModel:
    return serve.load_served_model(model_dir, "cpu")


@pytest.fixture(scope="module")
def server(guided, run_dir):
    """The page for the guided run on 127.0.0.1:<free port>, in this process; (app, url, snapshot before, folder)."""
    before = folder_snapshot(run_dir)
    app = serve.launch_app(serve.build_app(run_dir, served=guided), "127.0.0.1", free_port(), block=False, quiet=True)
    yield app, app.local_url, before, run_dir
    app.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[1], verbose=False)


def fields(served, **changes) -> dict:
    """The page's fields as they start for `served`, with `changes` (seed "123" and 2 ddim steps unless given)."""
    return serve.page_defaults(served) | {"seed": "123", "sampler": "ddim", "steps": 2} | changes


def generate(client, class_index=7, guidance=3.0, guide_weight=2.0, sampler="ddim", steps=5, seed="123", count=2,
             show_process=False, interval=(0.4, 1.0), rescale=0.0, threshold=0.0):
    job = client.submit(class_index, guidance, guide_weight, sampler, steps, seed, count, show_process, *interval,
                        rescale, threshold, api_name="/generate")
    return job.result(timeout=60), job.outputs()


def direct_draw(served, labels, sampling: SamplingConfig, seed: int, guide=None) -> torch.Tensor:
    """What the library draws with `ddpm sample`'s batching: the page's reference."""
    return torch.cat([x for _, x in sample_batches(served.model, served.schedule, labels=torch.tensor(labels),
                                                   sampling=sampling, batch_size=SAMPLE_BATCH, seed=seed,
                                                   guide=guide)])


# ------------------------------------------------------------------------------------------ through gradio_client
def test_page_draws_what_ddpm_sample_draws(client, guided, run_dir, tmp_path):
    # Catches: the page seeding or batching differently from `ddpm sample` (one generator for all images, its own
    # batch size), dropping the class, w or the guide (or g), a command that leaves out --guide/--guide-weight,
    # or PNGs encoded differently: any of them changes pixels.
    (status, _, seed_used, files, _), _ = generate(client, class_index=7, guidance=2.5, guide_weight=1.5, steps=5,
                                                   seed="123", count=2)
    assert status.startswith("done") and seed_used == "123"
    assert (f"--labels 7,7 --guidance 2.5 --guide {run_dir / 'guide'} --guide-weight 1.5 --sampler ddim "
            "--sampling-steps 5 --guidance-interval 0.4 1.0 --seed 123 --device cpu") in status, status
    assert [Path(f).name for f in files] == ["sample_00000_class7.png", "sample_00001_class7.png"]
    command = shlex.split(status.split("`")[1])  # the command the page prints, run as printed
    assert command[:2] == ["ddpm", "sample"]
    out = tmp_path / "cli"
    assert cli.main([str(out) if arg == "OUT" else arg for arg in command[1:]] + ["--quiet"]) == 0
    for page_file in files:
        page = png_pixels(Path(page_file).read_bytes())
        assert np.array_equal(page, png_pixels((out / Path(page_file).name).read_bytes())), page_file
    # and what a direct sample_batches call with the CLI's defaults (SAMPLE_BATCH, the seed, the guide) draws
    guide = load_guide(run_dir / "guide", guided.model, "cpu", schedule=guided.schedule)
    sampling = SamplingConfig(sampler="ddim", steps=5, guidance=2.5, guide_weight=1.5)
    direct = direct_draw(guided, [7, 7], sampling, 123, guide)
    for page_file, image in zip(files, direct):
        assert np.array_equal(png_pixels(Path(page_file).read_bytes()), to_uint8(image)[0].numpy())
    # the guide weight really reaches the sampler: g = 1 (off) draws other images
    unguided = to_uint8(direct_draw(guided, [7, 7], SamplingConfig(sampler="ddim", steps=5, guidance=2.5), 123))
    assert not torch.equal(unguided, to_uint8(direct))


def test_progress_is_streamed_step_by_step_and_ends_with_the_grid(client):
    # Catches: a page that only answers at the end (no live preview), a wrong step count, or a lost last step.
    (status, grid, _, files, process), outputs = generate(client, steps=4, count=3, show_process=True)
    progress = [o[0] for o in outputs if str(o[0]).startswith("step ")]
    assert progress and progress[-1] == "step 4 of 4", progress
    assert all(o[1] for o in outputs if str(o[0]).startswith("step ")), "each progress update carries the x0 preview"
    assert status.startswith("done") and len(files) == 3
    # the grid: 3 images of 8 px enlarged 8x (to 64 px) with make_grid's 2 px padding, also enlarged
    assert png_pixels(Path(grid).read_bytes()).shape[:2] == ((8 + 4) * 8, (3 * 10 + 2) * 8)
    # the process strip: one row per image, one column per step (4 steps: all kept)
    assert process["visible"]
    assert png_pixels(Path(process["value"]).read_bytes()).shape[:2] == ((3 * 10 + 2) * 8, (4 * 10 + 2) * 8)


def test_random_seed_is_shown_and_redraws_the_same_images(client):
    # Catches: showing a seed other than the one used, so a result cannot be reproduced.
    (_, _, seed_used, files, _), _ = generate(client, seed="random", count=1)
    assert seed_used.isdigit()
    (_, _, again_seed, again, _), _ = generate(client, seed=seed_used, count=1)
    assert again_seed == seed_used
    assert Path(files[0]).read_bytes() == Path(again[0]).read_bytes()


@pytest.mark.parametrize("seed, message", [("", "the seed is empty"), ("abc", "not a whole number"),
                                           ("-1", "out of range")])
def test_bad_fields_give_a_message_on_the_page(client, seed, message):
    # Catches: a bad field reaching the sampler (a traceback / a bare "Error" on the page) instead of a message.
    (status, *_), _ = generate(client, seed=seed)
    assert status.startswith("**Not started:**") and message in status, status


@pytest.mark.parametrize("field, value, message", [("class_index", 10, "not in the list of choices"),
                                                   ("sampler", "euler", "not in the list of choices"),
                                                   ("steps", 201, "greater than maximum"),
                                                   ("count", 0, "less than minimum"),
                                                   ("guide_weight", 5.5, "greater than maximum")])
def test_out_of_range_controls_are_refused_with_a_message(client, field, value, message):
    # Gradio's own checks of drop-downs and sliders answer first, with a message (no traceback is sent to the page);
    # parse_request checks the same fields again (next test). Catches: bounds missing from the controls.
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        generate(client, **{field: value})


def test_limits_are_enforced_by_the_server_not_only_by_the_sliders(guided):
    # Catches: trusting the page's sliders; an API caller could ask for 10^6 steps, 1000 images or g = 100.
    ok = serve.parse_request(guided, 3, 2.0, "ddim", 200, "5", 16)
    assert ok.labels == (3,) * 16 and ok.sampling.steps == 200 and ok.seed == 5
    for args, options, message in [((10, 2.0, "ddim", 5, "5", 1), {}, "the class must be"),
                                   ((3, 2.0, "euler", 5, "5", 1), {}, "unknown"),
                                   ((3, 2.0, "ddim", 201, "5", 1), {}, "steps must be"),
                                   ((3, 2.0, "ddim", 0, "5", 1), {}, "steps must be"),
                                   ((3, 2.0, "ddim", 5, "5", 17), {}, "number of images must be"),
                                   ((3, 2.0, "ddim", 5, "5", None), {}, "is empty"),
                                   ((3, 10.5, "ddim", 5, "5", 1), {}, "guidance w must be"),
                                   ((3, float("nan"), "ddim", 5, "5", 1), {}, "guidance w must be"),
                                   ((3, 2.0, "ddim", 2.5, "5", 1), {}, "whole number"),
                                   ((3, 2.0, "ddim", 5, "5", 1), {"guide_weight": 5.5}, "guide weight g must be"),
                                   ((3, 2.0, "ddim", 5, "5", 1), {"guide_weight": float("nan")}, "g must be"),
                                   ((3, 2.0, "ddim", 5, "5", 1), {"guide_weight": ""}, "g is empty"),
                                   ((3, 2.0, "ddim", 5, "5", 1), {"interval": (0.8, 0.2)}, "guidance_interval")]:
        with pytest.raises(DdpmError, match=message):
            serve.parse_request(guided, *args, **options)


def test_one_request_at_a_time(client, monkeypatch):
    # Catches: two requests sampling at once (both compete for the CPU/GPU, each taking twice as long).
    running, most = [0], [0]
    real = sample_requests._sample

    def counting(*args, **kwargs):
        running[0] += 1
        most[0] = max(most[0], running[0])
        time.sleep(0.3)
        try:
            return real(*args, **kwargs)
        finally:
            running[0] -= 1

    monkeypatch.setattr(sample_requests, "_sample", counting)
    jobs = [client.submit(1, 3.0, 2.0, "ddim", 2, str(s), 1, False, 0.4, 1.0, 0.0, 0.0, api_name="/generate")
            for s in range(3)]
    assert all(job.result(timeout=60)[0].startswith("done") for job in jobs)
    assert most[0] == 1


def test_every_image_reaches_gradio_as_a_file_it_never_rewrites(client, monkeypatch, tmp_path):
    # Catches: an image handed to Gradio as an array. Gradio stores an array under a name made from its bytes and
    # rewrites that file in place, so two requests drawing the same picture truncated a preview another client was
    # downloading (CI: "peer closed connection without sending complete message body (received 0 bytes)").
    import gradio as gr
    from gradio import processing_utils

    from ddpm.serve import controls

    rewritten = []
    real = processing_utils.save_pil_to_cache
    monkeypatch.setattr(processing_utils, "save_pil_to_cache",
                        lambda *args, **kwargs: rewritten.append(args) or real(*args, **kwargs))
    (status, *_), _ = generate(client, steps=3, show_process=True)
    assert status.startswith("done") and rewritten == []
    grid = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)  # the edit tab's updates take the same road
    with gr.Blocks():
        image = gr.Image(type="numpy", format="png")
    path = controls.gradio_update(gr, {"edit_result": image}, {"edit_result": grid}, tmp_path)[image]
    assert np.array_equal(png_pixels(Path(path).read_bytes()), grid)
    grey = controls.shown_png(grid[..., 0], tmp_path, "process")
    assert np.array_equal(png_pixels(Path(grey).read_bytes()), grid[..., 0])


def test_the_model_folder_is_only_read(client, server):
    # Catches: anything (PNGs, a cache, Gradio's files) written into the run folder being served (guide included).
    generate(client, count=1)
    assert folder_snapshot(server[3]) == server[2]


# ------------------------------------------------------------------------------------------ without a server
def test_live_events_end_with_the_last_step_then_finished(guided):
    # Catches: the newest-step-only drain losing the final step when the page falls behind, or Finished
    # missing/duplicated.
    request = serve.parse_request(guided, 2, 3.0, "ddim", 6, "9", 2, show_process=True)
    live = serve.sample_live(guided, request)
    events = [next(live)]
    time.sleep(0.5)  # a slow page: the other steps and the end are all queued when it asks again
    events += list(live)
    steps = [e for e in events if isinstance(e, serve.Step)]
    assert isinstance(events[-1], serve.Finished) and all(isinstance(e, serve.Step) for e in events[:-1])
    assert steps[-1].index == 5 and steps[-1].total == 6
    assert [s.index for s in steps] == sorted({s.index for s in steps})
    assert events[-1].images.shape == (2, 1, 8, 8)
    assert events[-1].process.shape[:2] == ((2 * 10 + 2) * 8, (6 * 10 + 2) * 8)  # 2 rows of images, all 6 steps kept
    assert torch.equal(events[-1].images, serve.draw(guided, request))


def test_closing_the_page_stops_the_sampler(guided, monkeypatch):
    # Catches: a sampler that keeps running all its steps after the page went away (and delays the next request).
    request = serve.parse_request(guided, 2, 3.0, "ddim", 200, "9", 1)
    steps_run = []
    real = sample_requests._sample
    monkeypatch.setattr(sample_requests, "_sample",
                        lambda s, r, callback: real(s, r, lambda *a: (steps_run.append(1), callback(*a))))
    live = serve.sample_live(guided, request)
    next(live)
    live.close()  # returns once the sampler has stopped
    stopped_after = len(steps_run)
    time.sleep(0.2)
    assert len(steps_run) == stopped_after < 200


def test_the_process_strip_is_the_one_ddpm_sample_writes(guided, tmp_path):
    # Catches: the page building its own process strip or its own choice of steps instead of files.py's (which
    # `ddpm sample --process` writes), and the last step left out of the strip when the steps do not divide evenly.
    request = serve.parse_request(guided, 1, 2.0, "ddim", 24, "3", 2, show_process=True)
    finished = list(serve.sample_live(guided, request))[-1]
    frames = []

    def keep(i, t_index, x_t, x0):
        if keeps_process_frame(i, 24):
            frames.append(x0.detach().float().cpu().clone())

    guided.worker.run(lambda: list(sample_batches(
        guided.model, guided.schedule, labels=torch.tensor([1, 1]), sampling=request.sampling, seed=3,
        callback=keep, guide=guided.guide)))
    assert len(frames) == 13  # steps 0, 2, ..., 22 and the last one, 23
    png, gif = save_process(frames, tmp_path, upscale=8)
    assert np.array_equal(finished.process, png_pixels(png.read_bytes()))
    from PIL import Image

    with Image.open(gif) as animation:
        assert animation.n_frames == 13 and animation.size == (128, 128)


def sample_args(command: str):
    """A printed `ddpm sample ...` command, parsed by the CLI's own parser."""
    words = shlex.split(command)
    assert words[:2] == ["ddpm", "sample"]
    return cli.build_parser().parse_args(words[1:])


@pytest.mark.parametrize("served_name", ["guided", "unguided"])
def test_the_page_starts_from_the_defaults_of_ddpm_sample(served_name, request):
    # Catches: defaults restated on the page (w = 3 with a guide, no g, the classifier-free interval with a guide)
    # instead of taken from config (AUTOGUIDED, DEFAULT_CFG, SamplingConfig): the page's untouched settings must
    # be the SamplingConfig that `ddpm sample` builds when no sampling flag is given.
    served = request.getfixturevalue(served_name)
    start = serve.page_defaults(served)
    has_guide = served.guide is not None
    assert (start["guidance"], start["guide_weight"]) == ((AUTOGUIDED["guidance"], AUTOGUIDED["guide_weight"])
                                                           if has_guide else (DEFAULT_CFG, 1.0))
    page = serve.request_from_fields(served, start | {"seed": "0"}).sampling
    args = sample_args(f"ddpm sample {served.source} --out OUT --sampling-steps {start['steps']}")
    assert page == cli.sampling_configs(args, guided=has_guide)[0]


def test_the_printed_command_parses_back_to_the_same_request(guided, unguided, model_dir, tmp_path):
    # Catches: a reproduction command without the guide, g, w, the interval or the rescale, or one that leaves a
    # setting to a default of `ddpm sample` that differs from the page's (e.g. no --guide none on a page without
    # a guide while the run has one: `ddpm sample` would then guide). Fast: the command is parsed, not run.
    uncond = tiny_model_folder(tmp_path / "uncond", num_classes=None)
    uncond_guided = serve.load_served_model(uncond, "cpu", guide=uncond)  # the guide: any model folder that fits
    no_guide = serve.load_served_model(guided.source, "cpu", guide="none")  # the run, its guide turned off
    cases = [(guided, dict(class_index=3, guidance=1.3, guide_weight=1.7, sampler="ddpm", interval_lo=0.2,
                           interval_hi=0.9, rescale=0.5, threshold=0.99), str(guided.guide_path)),
             (guided, dict(guide_weight=1.0), str(guided.guide_path)),
             (unguided, dict(guidance=4.25, sampler="dpmpp2m", steps=7), "none"),
             (no_guide, dict(), "none"),
             (uncond_guided, dict(guide_weight=2.5, count=3), str(uncond))]
    for served, changes, guide in cases:
        page = serve.request_from_fields(served, fields(served, **changes))
        args = sample_args(serve.cli_equivalent(served, page))
        assert args.guide == guide and args.seed == page.seed and args.device == "cpu"
        assert cli.sampling_configs(args, guided=guide != "none")[0] == page.sampling, (changes, args)
        assert (args.labels, args.n) == ((page.labels, None) if page.labels else (None, page.count))


def test_respond_runs_a_request_without_gradio(guided, tmp_path):
    # Catches: the page's request logic tied to Gradio (respond must stream plain updates), PNGs not written to
    # the request's folder or named otherwise than by `ddpm sample`, a refused request without its message.
    updates = list(serve.respond(guided, fields(guided, class_index=4, count=2, show_process=True), tmp_path / "r1"))
    assert updates[0] == {"status": "starting...", "seed_used": "123", "files": None, "process": None}
    steps = [u["status"] for u in updates[1:-1]]
    assert steps and steps[-1] == "step 2 of 2" and all(text.startswith("step ") for text in steps), steps
    done = updates[-1]
    expected = f"done: 2 image(s) of 4 (w=1, g={AUTOGUIDED['guide_weight']:g}), ddim 2 steps, seed 123"
    assert done["status"].startswith(expected), done["status"]
    assert done["files"] == [str(tmp_path / "r1" / f"sample_0000{i}_class4.png") for i in range(2)]
    assert done["result"].shape[:2] == ((8 + 4) * 8, (2 * 10 + 2) * 8) and done["process"] is not None
    refused = list(serve.respond(guided, fields(guided, guide_weight=-1), tmp_path / "r2"))
    assert len(refused) == 1 and refused[0]["status"].startswith("**Not started:** guide weight g must be")
    assert refused[0]["warning"] in refused[0]["status"] and not (tmp_path / "r2").exists()


def test_without_a_guide_the_guide_weight_is_off_and_says_why(unguided, run_dir):
    # Catches: a guide slider that can be moved (or a g accepted) when there is no guide to guide with, and a
    # page that does not load the run's own guide by default or cannot be told not to.
    app = serve.build_app(None, served=unguided)
    slider = widgets(app)["guide-weight"]
    assert slider.interactive is False and slider.value == 1.0 and "no guide" in slider.info
    with pytest.raises(DdpmError, match="needs a guide model"):
        serve.parse_request(unguided, 3, 2.0, "ddim", 5, "5", 1, guide_weight=2.0)
    assert "--guide none" in serve.cli_equivalent(unguided, serve.parse_request(unguided, 3, 2.0, "ddim", 5, "5", 1))
    assert serve.load_served_model(run_dir, "cpu", guide="none").guide is None
    assert serve.load_served_model(run_dir / "model", "cpu").guide_path == run_dir / "guide"  # RUN/model finds it


def test_guidance_options_hold_the_guide_interval_and_the_threshold(guided):
    # Catches: the dynamic-threshold slider laid out below the collapsed "Guidance options" instead of in it, and
    # the guide controls of a guided run shown disabled.
    by_id = widgets(serve.build_app(None, served=guided))

    def ancestors(block):
        while (block := getattr(block, "parent", None)) is not None:
            yield block

    for elem_id in ("interval-lo", "interval-hi", "rescale", "threshold"):
        assert by_id["guidance-options"] in ancestors(by_id[elem_id]), elem_id
        assert by_id[elem_id].visible
    assert by_id["guide-weight"].interactive is not False and by_id["guide-weight"].value == AUTOGUIDED["guide_weight"]
    assert by_id["guidance"].value == AUTOGUIDED["guidance"]


def test_unconditional_model_hides_class_and_guidance(tmp_path):
    # Catches: a class drop-down shown (and labels sent) for a model trained without classes.
    folder = tiny_model_folder(tmp_path / "uncond", num_classes=None)
    app = serve.build_app(folder, "cpu")
    by_id = widgets(app)
    assert not by_id["class"].visible and not by_id["guidance"].visible and by_id["sampler"].visible
    assert not by_id["interval-lo"].visible and by_id["threshold"].visible  # no guidance, but thresholding
    assert list(by_id["sampler"].choices) == [(s, s) for s in ("ddpm", "ddim", "dpmpp2m")]
    served = serve.load_served_model(folder, "cpu")
    request = serve.parse_request(served, None, None, "ddim", 3, "1", 2)
    assert request.labels is None and serve.draw(served, request).shape == (2, 1, 8, 8)


def test_serve_help_shows_only_real_defaults(capsys):
    # Catches: argparse's ArgumentDefaultsHelpFormatter printing "(default: None)" for flags without a default.
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "default: None" not in text and "(default None)" not in text
    assert "--guide PATH" in text and f"(default {serve.DEFAULT_PORT})" in text


def test_ddpm_serve_takes_the_run_guide_unless_told_otherwise(run_dir, monkeypatch, capsys):
    # Catches: `ddpm serve` ignoring the run's guide snapshot or --guide, and a bad --guide as a traceback.
    import gradio

    pages = []
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: pages.append(widgets(self)))
    for extra, interactive in (([], True), (["--guide", "none"], False), (["--guide", str(run_dir)], True)):
        assert cli.main(["serve", str(run_dir), "--device", "cpu"] + extra) == 0
        assert (pages[-1]["guide-weight"].interactive is not False) is interactive, extra
    assert "(guide " in capsys.readouterr().out
    assert cli.main(["serve", str(run_dir), "--device", "cpu", "--guide", str(run_dir / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err


def test_ddpm_serve_listens_on_localhost_without_share_link(model_dir, monkeypatch):
    # Catches: a default that binds every interface, or a public share link.
    import gradio

    seen = {}
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: seen.update(kwargs))
    assert cli.main(["serve", str(model_dir), "--device", "cpu"]) == 0
    assert seen["server_name"] == "127.0.0.1" and seen["server_port"] == 7860 and seen["share"] is False
    assert seen["inbrowser"] is False


def test_missing_model_is_a_one_line_error(tmp_path, capsys):
    # Catches: a traceback (or a page that starts and fails on the first request) for a wrong path.
    assert cli.main(["serve", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    assert cli.main(["serve", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "config.json" in err


def test_without_gradio_the_error_says_how_to_install(model_dir, monkeypatch, capsys):
    # Catches: an ImportError traceback when the optional [ui] extra is not installed.
    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` raise ImportError
    assert cli.main(["serve", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install -e '.[ui]'" in err


def test_busy_port_is_a_one_line_error(model_dir, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert cli.main(["serve", str(model_dir), "--device", "cpu", "--port", str(s.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "pass a free --port" in err[-1]


# ------------------------------------------------------------------------------------------ the Edit tab
def editor_value(painted_rows=slice(4, 8), size=8, seed=0) -> dict:
    """What Gradio's ImageEditor sends: a grey RGBA background and one layer painted (opaque) over `painted_rows`."""
    grey = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    background = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    layer = np.zeros((size, size, 4), np.uint8)
    layer[painted_rows] = (255, 0, 0, 255)
    return {"background": background, "layers": [layer], "composite": background}


def edit_fields(served, **changes) -> dict:
    start = {"image": editor_value(), "mode": "inpaint", "class_index": 3, "strength": 0.6, "guidance": 3.0,
             "guide_weight": serve.guidance_defaults(served.guide is not None).guide_weight, "sampler": "ddim",
             "steps": 4, "seed": "11"}
    return start | changes


def test_the_edit_tab_edits_as_ddpm_edit_does_and_keeps_the_unpainted_pixels(guided, tmp_path):
    # Catches: a tab that reads the image or the mask otherwise than `ddpm edit` (the printed command, run on the
    # tab's files, must write the same PNG), the painted layer ignored or inverted (unpainted pixels must be the
    # upload's exactly), the class, w or g not reaching the edit.
    from ddpm.serve import respond_edit

    updates = list(respond_edit(guided, edit_fields(guided), tmp_path / "req", max_steps=50))
    status, grid = updates[-1]["edit_status"], updates[-1]["edit_result"]
    assert status.startswith("done: inpainted"), status
    result = png_pixels((tmp_path / "req" / "result.png").read_bytes())
    upload = editor_value()["background"][..., 0]
    assert np.array_equal(result[:4], upload[:4]) and not np.array_equal(result[4:], upload[4:])
    assert grid.shape[:2] == (8 * 12, 8 * (3 * 10 + 2))  # input | mask | result, enlarged 8x
    command = shlex.split(status.split("`")[1])
    assert command[:2] == ["ddpm", "edit"] and "--labels" in command and "--guide-weight" in command
    out = tmp_path / "cli"
    assert cli.main([str(out) if arg == "OUT" else arg for arg in command[1:]] + ["--quiet"]) == 0
    assert np.array_equal(png_pixels((out / "input.png").read_bytes()), result)
    other = list(respond_edit(guided, edit_fields(guided, class_index=5), tmp_path / "req5", max_steps=50))
    assert not np.array_equal(png_pixels((tmp_path / "req5" / "result.png").read_bytes()), result)
    assert other[-1]["edit_status"].startswith("done")
    i2i = list(respond_edit(guided, edit_fields(guided, mode="image-to-image", strength=0.0), tmp_path / "i2i",
                            max_steps=50))
    assert i2i[-1]["edit_status"].startswith("done: redrawn at strength 0")
    assert np.array_equal(png_pixels((tmp_path / "i2i" / "result.png").read_bytes()), upload)


@pytest.mark.parametrize("changes, message", [
    ({"image": None}, "no image: upload one"),
    ({"image": editor_value(painted_rows=slice(0, 0))}, "nothing painted"),
    ({"mode": "image-to-image", "strength": 1.5}, "strength must be from 0 to 1"),
    ({"mode": "blur"}, "mode 'blur' is unknown"),
    ({"seed": "x"}, "is not a whole number"),
])
def test_bad_edit_fields_give_a_message(guided, tmp_path, changes, message):
    from ddpm.serve import respond_edit

    updates = list(respond_edit(guided, edit_fields(guided, **changes), tmp_path / "req", max_steps=50))
    assert len(updates) == 1 and message in updates[0]["warning"], updates


def test_the_api_names_its_parameters(client):
    # Catches: endpoints whose parameters gradio_client lists as param_0, param_1, ... (a script writer cannot tell
    # which is which).
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert [p["parameter_name"] for p in api["/generate"]["parameters"]] == list(serve.FIELDS)
    from ddpm.serve import EDIT_FIELDS

    assert [p["parameter_name"] for p in api["/edit"]["parameters"]] == list(EDIT_FIELDS)


# ------------------------------------------------------------------------------------------ in a real browser
def chromium_missing() -> str | None:
    """Why the browser test cannot run here, with how to fix it; None when CHROMIUM is there."""
    if os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK):
        return None
    return (f"{CHROMIUM} is missing: the browser test needs Debian's chromium: sudo apt-get install chromium "
            "(`make test` installs it when run as root with apt-get)")


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def launch_chromium(playwright):
    if reason := chromium_missing():
        raise SystemExit(reason)
    # --no-sandbox: CI runs as root, where Chromium refuses its sandbox
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                      args=["--no-sandbox", "--disable-dev-shm-usage"])


def drive_page(url: str, screenshot: Path, class_name: str = "7", guidance: str | None = None,
               guide_weight: str | None = None, steps: str = "5", timeout_ms: int = 60_000) -> dict:
    """Use the page as a person would: pick a class, set w, g (None: leave them at the page's defaults) and steps,
    open the guidance options, press Generate, wait for the images, save a screenshot. Returns the status text,
    the seed shown, the result image's pixels and whether the threshold slider was hidden before the options
    were opened."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.locator("#class input").click()
            page.get_by_role("option", name=class_name, exact=True).click()
            for box, value in (("#guidance", guidance), ("#guide-weight", guide_weight), ("#steps", steps)):
                if value is not None:
                    number = page.locator(f"{box} input[type=number]")
                    number.fill(value)
                    number.press("Enter")
            threshold_hidden = page.locator("#threshold").is_hidden()  # inside the collapsed options
            page.locator("#guidance-options").get_by_text("Guidance options").click()
            expect(page.locator("#threshold")).to_be_visible()
            page.locator("#generate").click()
            expect(page.locator("#status")).to_contain_text("done", timeout=timeout_ms)
            image_url = page.locator("#result img").get_attribute("src")
            with urllib.request.urlopen(image_url, timeout=10) as response:
                pixels = png_pixels(response.read())
            page.screenshot(path=str(screenshot), full_page=True)
            return {"status": page.locator("#status").inner_text(), "threshold_hidden": threshold_hidden,
                    "seed": page.locator("#seed-used textarea").input_value(), "pixels": pixels}
        finally:
            browser.close()


@pytest.mark.slow
def test_page_in_headless_chromium(server, guided, tmp_path):
    # Catches: a page that works through the API but not in a browser (controls not wired, the guide weight not
    # reaching the sampler or the printed command, the image never shown), and the threshold outside the options.
    if reason := chromium_missing():
        if under_ci():  # CI must run every test: a missing browser there is a broken set-up, not a skip
            pytest.fail(f"CI={os.environ['CI']}: {reason}", pytrace=False)
        pytest.skip(reason)
    shot = tmp_path / "serve.png"
    seen = drive_page(server[1], shot, "7", guidance="2.5", guide_weight="1.5")
    assert "of 7 (w=2.5, g=1.5), dpmpp2m 5 steps" in seen["status"], seen["status"]  # the default sampler
    assert f"--guide {server[3] / 'guide'} --guide-weight 1.5 " in seen["status"], seen["status"]
    assert seen["threshold_hidden"], "the dynamic threshold must sit inside the collapsed guidance options"
    assert seen["seed"].isdigit()
    pixels = seen["pixels"]
    # 4 images (the default) of 8 px, 2 px padding, enlarged 8x
    assert pixels.shape[:2] == ((8 + 4) * 8, (4 * 10 + 2) * 8)
    # the images, without the padding
    tiles = np.stack([pixels[16:80, 16 + 80 * k : 80 + 80 * k].astype(float) for k in range(4)])
    assert tiles.std() > 1, "the generated image is blank"
    # and it is what the model draws for the class, w, g, steps and the seed the page showed
    request = serve.parse_request(guided, 7, 2.5, "dpmpp2m", 5, seen["seed"], 4, guide_weight=1.5)
    assert np.array_equal(pixels, serve.grid_array(serve.draw(guided, request), 8))
    assert shot.stat().st_size > 10_000


def drive_edit_tab(url: str, image: Path, screenshot: Path, class_name: str, steps: str = "4",
                   timeout_ms: int = 60_000) -> dict:
    """Use the Edit tab as a person would: open it, upload `image`, paint one stroke across its lower part, pick a
    class and the steps, press Generate, wait for the result, save a screenshot. Returns the status text and the
    result image's pixels (input | mask | result)."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.get_by_role("tab", name="Edit").click()
            with page.expect_file_chooser() as chooser:
                page.locator("#edit-image button[aria-label=Upload]").click()
            chooser.value.set_files(str(image))
            canvas = page.locator("#edit-image canvas").first
            expect(canvas).to_be_visible()
            page.wait_for_timeout(1000)  # the upload is drawn on the canvas
            box = canvas.bounding_box()
            x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            page.mouse.move(x - 40, y + 35)  # the image is drawn centred: a stroke across its bottom
            page.mouse.down()
            page.mouse.move(x + 40, y + 35, steps=12)
            page.mouse.up()
            page.locator("#edit-class input").click()
            page.get_by_role("option", name=class_name, exact=True).click()
            number = page.locator("#edit-steps input[type=number]")
            number.fill(steps)
            number.press("Enter")
            page.locator("#edit-generate").click()
            expect(page.locator("#edit-status")).to_contain_text("done", timeout=timeout_ms)
            with urllib.request.urlopen(page.locator("#edit-result img").get_attribute("src"), timeout=10) as response:
                pixels = png_pixels(response.read())
            page.screenshot(path=str(screenshot), full_page=True)
            return {"status": page.locator("#edit-status").inner_text(), "pixels": pixels}
        finally:
            browser.close()


@pytest.mark.slow
def test_edit_tab_in_headless_chromium(server, tmp_path):
    # Catches: an Edit tab that works through the API but not in a browser: the upload or the painted stroke not
    # reaching the server (nothing painted, or everything), the class not wired, the known pixels not kept.
    if reason := chromium_missing():
        if under_ci():
            pytest.fail(f"CI={os.environ['CI']}: {reason}", pytrace=False)
        pytest.skip(reason)
    from PIL import Image

    grey = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    Image.fromarray(grey).save(tmp_path / "upload.png")  # 64x64: the model's 8x8 after the training resize
    seen = drive_edit_tab(server[1], tmp_path / "upload.png", tmp_path / "edit.png", "7")
    assert "done: inpainted" in seen["status"] and "ddpm edit" in seen["status"], seen["status"]
    assert "--labels 7 " in seen["status"], seen["status"]
    pixels = seen["pixels"]
    assert pixels.shape[:2] == ((8 + 4) * 8, (3 * 10 + 2) * 8)  # input | mask | result, 8 px each, enlarged 8x
    tiles = [pixels[16:80:8, 16 + 80 * k : 80 + 80 * k : 8].astype(int) for k in range(3)]  # one value a pixel
    tiles = [tile[..., 0] if tile.ndim == 3 else tile for tile in tiles]
    image, mask, result = tiles
    painted = mask > 127
    assert painted.any() and not painted.all(), mask
    assert painted[-1].sum() > painted[0].sum(), "the stroke across the bottom must be where the mask is"
    assert np.array_equal(result[~painted], image[~painted])  # the known pixels, exactly


if __name__ == "__main__":  # python tests/test_serve.py MODEL_DIR OUT.png [CLASS_NAME]
    model, out = Path(sys.argv[1]), Path(sys.argv[2])
    class_name = sys.argv[3] if len(sys.argv) > 3 else None
    served_model = serve.load_served_model(model, "cpu")
    app = serve.launch_app(serve.build_app(model, served=served_model), "127.0.0.1", free_port(), block=False,
                           quiet=True)
    try:
        names = served_model.class_names
        # w and g stay at the page's defaults (those of `ddpm sample`)
        result = drive_page(app.local_url, out, class_name or names[7 % len(names)], steps="20", timeout_ms=600_000)
        print(result["status"])
    finally:
        app.close()


def test_the_pages_rescale_and_the_edit_tabs_g_reach_the_sampler(guided, tmp_path):
    # bugs caught: the rescale slider's value dropped on its way to SamplingConfig, the Edit tab's g slider dropped
    # (a guided model edited at the default g whatever the slider said)
    from ddpm.serve.fields import parse_sampling

    _, sampling = parse_sampling(guided, 3, 2.0, "ddim", 4, guide_weight=1.8, rescale=0.7, max_steps=50)
    assert (sampling.guidance_rescale, sampling.guide_weight, sampling.steps) == (0.7, 1.8, 4)
    size = guided.model.config.image_size
    image = np.full((size, size, 3), 128, dtype=np.uint8)
    request = serve.parse_edit_request(guided, {
        "image": {"background": image, "layers": []}, "mode": "image-to-image", "class_index": 3, "strength": 0.5,
        "guidance": 2.0, "guide_weight": 1.8, "sampler": "ddim", "steps": 4, "seed": "5"}, tmp_path, max_steps=50)
    assert request.sampling.guide_weight == 1.8


def test_the_printed_command_of_a_guided_page_keeps_the_guidance_options_without_labels(guided):
    # bug caught: the interval and rescale left out of the "same images" command when the page's model has a guide
    # but no classes (autoguidance alone): the command then draws other images than the page
    from ddpm.serve.fields import sampling_flags

    sampling = SamplingConfig(sampler="ddim", steps=4, guide_weight=2.0, guidance_interval=(0.3, 0.9),
                              guidance_rescale=0.5)
    flags = sampling_flags(guided, sampling, labelled=False)
    assert "--guidance" not in flags  # no classes: no w
    at = flags.index("--guidance-interval")
    assert flags[at + 1 : at + 3] == ["0.3", "0.9"] and flags[flags.index("--guidance-rescale") + 1] == "0.5"
