"""Autoguidance from the command line: `ddpm sample RUN` finds the run's own guide, the flags reproduce it, a run
without a guide says so in one line, and `ddpm eval` records the guide and its weight."""
import json

import numpy as np
import pytest
from PIL import Image

from ddpm.cli import main
from ddpm.config import AUTOGUIDED
from helpers import TINY_TRAIN_ARGS

TINY = [*TINY_TRAIN_ARGS, "--val-every", "0"]
FAST = ["--sampling-steps", "3", "--labels", "0,1,2", "--quiet"]


def pixels(folder):
    images = {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("sample_*.png"))}
    assert images, f"no sample in {folder}"
    return images


def same(a, b) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 6-step conditional run with its guide snapshot at step 3, and a 2-step run without one (as a run stopped
    before its snapshot point is)."""
    root = tmp_path_factory.mktemp("runs")
    guided, short = root / "guided", root / "short"
    assert main(["train", "mnist", "--conditional", "--out", str(guided), "--steps", "6", "--lr", "0.01",
                 "--guide-fraction", "0.5", "--checkpoint-every", "3", "--ema-warmup", "0", *TINY]) == 0
    assert main(["train", "mnist", "--conditional", "--out", str(short), "--steps", "2", "--guide-fraction", "0",
                 *TINY]) == 0
    return guided, short


def test_sample_finds_the_runs_guide_and_the_printed_flags_reproduce_it(runs, tmp_path, capsys):
    # bugs caught: the run's guide not found by default (no autoguidance), the defaults not the measured ones,
    # --guide/--guide-weight ignored, or `--guide none` still guiding
    guided, _ = runs
    assert (guided / "guide" / "model.safetensors").is_file()
    assert json.loads((guided / "guide" / "config.json").read_text())["step"] == 3
    auto, explicit, off = tmp_path / "auto", tmp_path / "explicit", tmp_path / "off"
    assert main(["sample", str(guided), "--out", str(auto), *FAST]) == 0
    printed = capsys.readouterr().out
    assert f"autoguidance g={AUTOGUIDED['guide_weight']:g} by {guided / 'guide'}" in printed
    assert main(["sample", str(guided), "--out", str(explicit), "--guide", str(guided / "guide"), "--guide-weight",
                 f"{AUTOGUIDED['guide_weight']:g}", "--guidance", f"{AUTOGUIDED['guidance']:g}", *FAST]) == 0
    assert same(pixels(auto), pixels(explicit))
    assert main(["sample", str(guided), "--out", str(off), "--guide", "none", "--guidance", "1", *FAST]) == 0
    assert not same(pixels(auto), pixels(off))  # the guide changes the images
    # a checkpoint of the run is a guide too (its EMA weights): the step-3 checkpoint's EMA is the step-3 snapshot
    from_checkpoint = tmp_path / "ckpt"
    assert main(["sample", str(guided), "--out", str(from_checkpoint), "--guide",
                 str(guided / "checkpoints" / "step_00000003.pt"), *FAST]) == 0
    assert same(pixels(auto), pixels(from_checkpoint))


def test_a_run_without_a_guide_says_so_in_one_line_and_samples_with_cfg(runs, tmp_path, capsys):
    _, short = runs
    assert not (short / "guide").exists()
    assert main(["sample", str(short), "--out", str(tmp_path / "s"), *FAST]) == 0
    captured = capsys.readouterr()
    assert "no guide snapshot" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert "autoguidance" not in captured.out and "classifier-free guidance w=3" in captured.out
    assert main(["sample", str(short), "--out", str(tmp_path / "t"), "--guide-weight", "2", *FAST]) == 2
    assert "--guide-weight needs a guide" in capsys.readouterr().err


def test_a_guide_that_does_not_fit_is_one_line(runs, tmp_path, capsys):
    guided, _ = runs
    other = tmp_path / "other"
    assert main(["train", "mnist", "--conditional", "--out", str(other), "--steps", "1", *TINY[:1], "16",
                 *TINY[2:]]) == 0
    assert main(["sample", str(guided), "--out", str(tmp_path / "s"), "--guide", str(other / "model"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "image_size 16 but the model has 8" in err


def test_eval_records_the_guide_and_its_weight(runs, tmp_path):
    # bugs caught: rows of different guide weights sharing one sample folder, the guide missing from eval.json,
    # model calls not counting the guide's
    guided, _ = runs
    out = tmp_path / "e"
    assert main(["eval", str(guided), "--out", str(out), "--n", "8", "--ref-n", "16", "--no-fid", "--sampling-steps",
                 "3", "--classifier-steps", "2", "--quiet"]) == 0
    record = json.loads((out / "eval" / "eval.json").read_text())
    assert record["guide"]["path"] == str(guided / "guide") and len(record["guide"]["sha1"]) == 40
    rows = record["rows"]
    assert [(r["guidance"], r["guide_weight"]) for r in rows] == [(1.0, None), (1.0, AUTOGUIDED["guide_weight"])]
    assert rows[0]["model_calls"] == 3 and rows[1]["model_calls"] == 6  # the guide: one more call per step
    assert rows[0]["samples"] != rows[1]["samples"]
    # --guide and --guide-weight by hand: a checkpoint's EMA as the guide, two weights, one record
    assert main(["eval", str(guided), "--out", str(out), "--n", "8", "--ref-n", "16", "--no-fid", "--sampling-steps",
                 "3", "--classifier-steps", "2", "--guide", str(guided / "checkpoints" / "step_00000003.pt"),
                 "--guide-weight", "1.5", "3", "--quiet"]) == 0
    record = json.loads((out / "eval" / "eval.json").read_text())
    assert record["guide"]["path"].endswith("step_00000003.pt")
    assert [r["guide_weight"] for r in record["rows"]] == [1.5, 3.0]
