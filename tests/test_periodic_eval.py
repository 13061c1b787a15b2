"""Quality in the training log (periodic_eval.py): the logged evaluation is `ddpm eval`'s on the same weights, the
best weights are those of the best logged step, and a resumed run neither loses nor repeats an evaluation."""
import json

import pytest

from ddpm.cli import main
from ddpm.config import AUTOGUIDED
from ddpm.periodic_eval import best_so_far, is_better
from helpers import TINY_TRAIN_ARGS

EVAL = ["--eval-every", "3", "--eval-n", "8", "--eval-steps", "2", "--val-every", "0"]


def logged(run_dir, tag: str) -> dict[int, float]:
    """The run's scalars of `tag` by step, read back from its event files (a resumed run's purge applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {}


LAST = 10  # the run's length, no multiple of --eval-every: README promises an evaluation at the last step
CLASSIFIER_STEPS = 30  # the evaluation classifier's (800 by default): cheaper, and the same in the run and ddpm eval


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny conditional run: 3 steps; resumed towards 10 and stopped at step 4 by its time limit (the graceful
    stop, exit 75); resumed again to 10, no multiple of 3. Evaluated every 3 steps and at the last, the best
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


def test_the_logged_evaluation_is_what_ddpm_eval_reports_on_the_same_weights(run, capsys):
    # The bugs it catches: the training log scoring other images than `ddpm eval` would (another seed, batching,
    # label order, sampler settings or guide) or with another evaluator (reference, floor, classifier).
    scores = logged(run, "eval/classifier_fd")
    g = AUTOGUIDED["guide_weight"]
    # RUN/model: the classic EMA the training loop evaluates (`ddpm eval RUN` scores the post-hoc default)
    assert main(["eval", str(run / "model"), "--n", "8", "--sampling-steps", "2", "--guidance", "1",
                 "--guide-weight", str(g), "--no-fid", "--classifier-steps", str(CLASSIFIER_STEPS), "--quiet"]) == 0
    capsys.readouterr()
    record = json.loads((run / "eval" / "eval.json").read_text())
    (row,) = [r for r in record["rows"] if r["guide_weight"] == g]
    assert scores[LAST] == pytest.approx(row["classifier_fd"], rel=1e-6)
    assert logged(run, "eval/accuracy")[LAST] == pytest.approx(row["accuracy"])
    assert logged(run, "eval_floor/classifier_fd")[LAST] == pytest.approx(record["floor"]["classifier_fd"], rel=1e-6)


def test_a_stopped_and_resumed_run_neither_loses_nor_repeats_an_evaluation(run):
    # The bugs it catches: an evaluation lost at the stop (the first run's last step) or done again at the
    # resumed run's first step, one made at the graceful stop's step (4, no multiple of 3) or lost by it, and the
    # purge of a resumed run's events dropping the evaluation at its checkpoint, and (issue 33) no evaluation at
    # the last step when the run's length is no multiple of --eval-every.
    assert sorted(logged(run, "eval/classifier_fd")) == [3, 6, 9, LAST]
    assert sorted(logged(run, "eval/seconds")) == [3, 6, 9, LAST]


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
