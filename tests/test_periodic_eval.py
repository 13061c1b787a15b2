"""Quality in the training log (periodic_eval.py): the logged evaluation is `ddpm eval`'s on the same weights, the
best weights are those of the best logged step, and a resumed run neither loses nor repeats an evaluation."""
import json

import pytest

from ddpm.cli import main
from ddpm.config import AUTOGUIDED
from ddpm.periodic_eval import best_so_far, is_better
from helpers import TINY_TRAIN_ARGS, logged

EVAL = ["--eval-every", "7", "--eval-n", "8", "--eval-steps", "2", "--val-every", "0"]


LAST = 25  # the run's length, no multiple of --eval-every (README promises an evaluation at the last step), and
# long enough for its post-hoc default to rebuild well (a guide at step 12 from snapshots at every step)
CLASSIFIER_STEPS = 30  # the evaluation classifier's (800 by default): cheaper, and the same in the run and ddpm eval


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny conditional run: 3 steps; resumed towards 25 and stopped at step 4 by its time limit (the graceful
    stop, exit 75); resumed again to 25, no multiple of 7. Evaluated every 7 steps and at the last, the best
    classifier FD kept."""
    import ddpm.periodic_eval

    patch = pytest.MonkeyPatch()
    patch.setattr(ddpm.periodic_eval, "CLASSIFIER_STEPS", CLASSIFIER_STEPS)
    folder = tmp_path_factory.mktemp("quality") / "run"
    assert main(["train", "mnist", "--conditional", "--out", str(folder), "--steps", "3", *EVAL,
                 "--keep-best", "classifier_fd", "--lr", "0.01", *TINY_TRAIN_ARGS]) == 0
    assert main(["train", "--resume", str(folder), "--steps", str(LAST), "--time-limit", "0.01s", "--quiet"]) == 75
    assert main(["train", "--resume", str(folder), "--steps", str(LAST), "--time-limit", "1h", "--quiet"]) == 0
    yield folder
    patch.undo()


def test_the_logged_evaluation_is_what_ddpm_eval_reports_of_the_run(run, capsys):
    # The bugs it catches: the training log scoring other weights than `ddpm eval RUN` draws (issue 34: the classic
    # EMA, when the run's default is the post-hoc average and its rebuilt guide), other images than `ddpm eval`
    # would (another seed, batching, label order, sampler settings or guide) or with another evaluator (reference,
    # floor, classifier).
    scores = logged(run, "eval/classifier_fd")
    assert logged(run, "eval/posthoc")[LAST] == 1  # the run's default rebuilds at its end: the case to check
    g = AUTOGUIDED["guide_weight"]
    assert main(["eval", str(run), "--n", "8", "--sampling-steps", "2", "--guidance", "1",
                 "--guide-weight", str(g), "--no-fid", "--classifier-steps", str(CLASSIFIER_STEPS), "--quiet"]) == 0
    capsys.readouterr()
    record = json.loads((run / "eval" / "eval.json").read_text())
    (row,) = [r for r in record["rows"] if r["guide_weight"] == g]
    assert scores[LAST] == pytest.approx(row["classifier_fd"], rel=1e-6)
    assert logged(run, "eval/accuracy")[LAST] == pytest.approx(row["accuracy"])
    assert logged(run, "eval_floor/classifier_fd")[LAST] == pytest.approx(record["floor"]["classifier_fd"], rel=1e-6)


def test_a_stopped_and_resumed_run_neither_loses_nor_repeats_an_evaluation(run):
    # The bugs it catches: an evaluation lost at the stop (the first run's last step) or done again at the
    # resumed run's first step, one made at the graceful stop's step (4, no multiple of 7) or lost by it, and the
    # purge of a resumed run's events dropping the evaluation at its checkpoint, and (issue 33) no evaluation at
    # the last step when the run's length is no multiple of --eval-every.
    assert sorted(logged(run, "eval/classifier_fd")) == [3, 7, 14, 21, LAST]  # 3: the first run's last step
    assert sorted(logged(run, "eval/seconds")) == [3, 7, 14, 21, LAST]


def test_the_best_model_is_the_best_logged_steps_and_samples(run, tmp_path, capsys):
    # The bugs it catches: best/ replaced by a worse evaluation (the comparison's direction), forgotten on resume
    # (a resumed run starts its "best" anew), or a best/ that `ddpm sample` cannot read.
    scores = logged(run, "eval/classifier_fd")
    best = best_so_far(run)
    assert best["metric"] == "classifier_fd" and best["step"] == min(scores, key=scores.get)
    assert best["value"] == pytest.approx(scores[best["step"]], rel=1e-6)
    assert json.loads((run / "best" / "config.json").read_text())["step"] == best["step"]
    assert main(["sample", str(run / "best"), "--out", str(tmp_path / "s"), "--n", "2", "--sampling-steps", "2",
                 "--quiet"]) == 0
    # the run's guide, as RUN/model has
    assert f"autoguidance g={AUTOGUIDED['guide_weight']:g} by {run / 'guide'}" in capsys.readouterr().out


def test_better_means_lower_distances_and_higher_accuracy():
    assert is_better("classifier_fd", 1.0, {"metric": "classifier_fd", "value": 2.0})
    assert not is_better("fid", 3.0, {"metric": "fid", "value": 2.0})
    assert is_better("accuracy", 0.9, {"metric": "accuracy", "value": 0.8})
    assert is_better("accuracy", 0.1, {"metric": "fid", "value": 0.8})  # another metric's best is no rival
    assert is_better("fid", 9.0, None)


def test_keep_best_needs_an_evaluation(tmp_path, capsys):
    assert main(["train", "mnist", "--conditional", "--out", str(tmp_path / "r"), "--steps", "1", "--keep-best",
                 "accuracy", *TINY_TRAIN_ARGS]) == 2
    assert "needs eval_every > 0" in capsys.readouterr().err


def test_a_best_post_hoc_default_samples_as_the_run_did(run, tmp_path, capsys):
    # The bugs it catches (issue 34): RUN/best written from the classic EMA when the post-hoc default scored, or
    # without its rebuilt guide, so that `ddpm sample RUN/best` draws other images than the run drew at that step.
    import shutil

    import numpy as np
    import torch
    from PIL import Image

    from ddpm.checkpoint import from_pretrained
    from ddpm.config import RunConfig
    from ddpm.periodic_eval import PeriodicEvaluation, keep_if_best

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = RunConfig.from_dict(json.loads((copy / "config.json").read_text()))
    classic, schedule, exported = from_pretrained(copy / "model")
    drawn = PeriodicEvaluation(config, copy, 1, torch.device("cpu")).drawn(classic, schedule, LAST)
    assert drawn.plan is not None  # the run's end rebuilds its default (as eval/posthoc says)
    assert keep_if_best(copy, "classifier_fd", {"classifier_fd": -1.0}, LAST, drawn, config.diffusion,
                        exported["class_names"])
    assert json.loads((copy / "best" / "config.json").read_text())["ema_length"] == drawn.plan.main.sigma_rel
    common = ["--n", "4", "--sampling-steps", "2", "--seed", "3", "--quiet"]
    assert main(["sample", str(copy / "best"), "--out", str(tmp_path / "best"), *common]) == 0
    assert f"by {copy / 'best' / 'guide'}" in capsys.readouterr().out
    assert main(["sample", str(copy), "--out", str(tmp_path / "default"), *common]) == 0
    pngs = sorted((tmp_path / "default").glob("*.png"))
    assert pngs and all(np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "best" / p.name)))
                        for p in pngs)
