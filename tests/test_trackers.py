"""`ddpm train --tracker tensorboard,wandb,mlflow`: each backend logs what TensorBoard logs (read back through wandb's
own record format offline and MLflow's client on a sqlite store), a resumed run continues the same tracked run,
and a tracker whose package is missing is one line naming the extra. Nothing contacts a server."""
import json
import struct
import sys

import pytest

from ddpm.cli import main
from helpers import TINY_TRAIN_ARGS, logged

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

TRAIN = ["--steps", "4", "--log-every", "1", "--val-every", "2", "--sample-every", "2", "--sampling-steps", "2",
         "--tracker", "tensorboard,wandb,mlflow"]


def wandb_records(path):
    """The protobuf records of an offline wandb run file (its LevelDB-log framing: a 7-byte file header, then
    32 KiB blocks of chunks, each with a 7-byte header: crc32c, length, type 1 full / 2 first / 3 middle / 4 last),
    parsed with wandb's own Record message."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    position, pending = 7, b""
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # a block's tail too short for a header is padding
            position += room
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_scalars(run_dir, tag: str) -> dict[int, float]:
    """{step: value} of `tag` over every offline wandb run in RUN (a resumed run adds a second one)."""
    values = {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") != "history":
                continue
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if tag in items:
                values[int(items["_step"])] = float(items[tag])
    return values


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A tiny run logged to all three trackers (wandb offline, MLflow on a sqlite file), resumed once."""
    folder = tmp_path_factory.mktemp("tracked")
    patch = pytest.MonkeyPatch()
    patch.setenv("WANDB_MODE", "offline")
    patch.setenv("WANDB_SILENT", "true")
    patch.setenv("WANDB_PROJECT", "ddpm-test")
    patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    patch.chdir(folder)  # a sqlite store keeps its artifacts (the preview grids) in ./mlruns
    run = folder / "run"
    assert main(["train", "mnist", "--conditional", "--out", str(run), *TINY_TRAIN_ARGS, *TRAIN]) == 0
    first_ids = json.loads((run / "trackers.json").read_text())
    assert main(["train", "--resume", str(run), "--steps", "6", "--quiet"]) == 0
    yield run, first_ids
    patch.undo()


def mlflow_scalars(run_id: str, tag: str) -> dict[int, float]:
    import mlflow

    return {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run_id, tag)}


def test_every_tracker_logs_the_same_scalars_as_tensorboard(tracked):
    # The bugs it catches: a backend that drops a value, logs it at another step, or is never told the periodic
    # values (validation loss every 2 steps), and a resumed run logged as a new run or not at all.
    run, ids = tracked
    assert json.loads((run / "trackers.json").read_text()) == ids  # the resumed run continued both tracked runs
    for tag in ("train/loss", "train/lr", "val/loss_ema"):
        board = logged(run, tag)
        assert sorted(board) == ([2, 4, 6] if tag.startswith("val") else list(range(1, 7)))
        for name, other in (("wandb", wandb_scalars(run, tag)), ("mlflow", mlflow_scalars(ids["mlflow"], tag))):
            assert other.keys() == board.keys(), (name, tag)
            assert all(other[s] == pytest.approx(board[s], rel=1e-6) for s in board), (name, tag)


def test_the_configuration_and_the_preview_grids_reach_every_tracker(tracked):
    import mlflow

    run, ids = tracked
    params = mlflow.MlflowClient().get_run(ids["mlflow"]).data.params
    assert params["train.lr"] == "0.002" or float(params["train.lr"]) > 0
    assert params["model.image_size"] == "8"
    config = next(r.run.config for p in sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
                  for r in wandb_records(p) if r.WhichOneof("record_type") == "run")
    assert any(item.key == "model.image_size" and json.loads(item.value_json) == 8 for item in config.update)
    assert {2, 4} <= set(wandb_scalars(run, "train/loss"))
    images = [item.key or "/".join(item.nested_key) for p in sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
              for r in wandb_records(p) if r.WhichOneof("record_type") == "history" for item in r.history.item]
    assert any(key.startswith("samples/ema") for key in images)
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(ids["mlflow"], "images")]
    assert artifacts, "no preview grid in MLflow"


def test_a_missing_tracker_package_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import raises ImportError
    run = tmp_path / "run"
    assert main(["train", "mnist", "--out", str(run), "--steps", "1", "--tracker", "tensorboard,wandb",
                 *TINY_TRAIN_ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'ddpm-kit[wandb]'" in err, err
    assert not (run / "tensorboard").exists()  # checked before anything was written


@pytest.mark.parametrize("name, env, words", [
    ("wandb", {"HOME": None}, "wandb login"),  # not logged in, not offline
    ("mlflow", {"MLFLOW_TRACKING_URI": "nosuch://store"}, "MLFLOW_TRACKING_URI"),
])
def test_a_tracker_that_cannot_start_is_one_line_saying_what_to_set(tmp_path, capsys, monkeypatch, name, env, words):
    # The bug it catches: wandb's or MLflow's own exception (a traceback) when the user has not logged in or gave
    # a store MLflow does not know, and TensorBoard files written for a run that never started.
    for variable in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value if value is not None else str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    import wandb

    wandb.teardown()  # an earlier test's offline session would otherwise carry over within this process
    run = tmp_path / "run"
    assert main(["train", "mnist", "--out", str(run), "--steps", "1", "--tracker", f"tensorboard,{name}",
                 *TINY_TRAIN_ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--tracker {name} could not start" in err and words in err, err
    assert not (run / "tensorboard").exists()
