"""Where a run's log goes: TensorBoard (the default), Weights & Biases and MLflow, any of them at once
(`ddpm train --tracker tensorboard,wandb,mlflow`). The monitor writes through `Trackers`, which hands every scalar,
image and text to each backend; no tracker code lives anywhere else.

Each backend follows its own ecosystem's conventions and contacts no server the user did not configure:
- wandb reads WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE (offline: nothing leaves the machine), WANDB_DIR...;
  the project defaults to "ddpm";
- MLflow reads MLFLOW_TRACKING_URI (default: MLflow's own local store) and MLFLOW_EXPERIMENT_NAME (default
  "ddpm").
A resumed run continues the same tracked run: the backends' run ids are kept in RUN/trackers.json. wandb and
MLflow are optional extras; a missing one is a one-line error naming it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .errors import DdpmError
from .files import atomic_write_json

TRACKERS = ("tensorboard", "wandb", "mlflow")
IDS_FILE = "trackers.json"


class TrackerMissing(DdpmError):
    """A tracker was asked for whose package is not installed."""


def _import(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise TrackerMissing(f"--tracker {name} needs the {name} package ({error}); install it with "
                             f"pip install 'ddpm-kit[{name}]' (or pip install -e '.[{name}]' in a clone)") from None


def flat_config(config: dict, prefix: str = "") -> dict[str, object]:
    """{"train": {"lr": 0.002}} -> {"train.lr": 0.002}: the run's configuration as the trackers' parameters."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def _hwc(image: torch.Tensor) -> np.ndarray:
    """uint8 [C, H, W] -> numpy H x W (grey) or H x W x 3, as wandb and MLflow take images."""
    array = image.detach().cpu().permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


class TensorBoardTracker:
    def __init__(self, run_dir: Path, config: dict, step: int):
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops what was logged after its checkpoint (a killed run logs past it), not at its step
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1 if step else None)
        if step == 0:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, image, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict, run_id: str | None):
        wandb = _import("wandb")
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ddpm"), id=run_id, resume="allow",
                              name=Path(run_dir).resolve().name, dir=os.environ.get("WANDB_DIR", str(run_dir)),
                              config=flat_config(config))
        self.id = self.run.id

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: value}, step=step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.run.log({tag: self.wandb.Image(_hwc(image))}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, run_dir: Path, config: dict, run_id: str | None):
        mlflow = _import("mlflow")
        self.client = mlflow.MlflowClient()  # MLFLOW_TRACKING_URI, or MLflow's own local store
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "ddpm")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run_id = self.client.create_run(experiment_id, run_name=Path(run_dir).resolve().name).info.run_id
            for key, value in flat_config(config).items():
                self.client.log_param(run_id, key, value)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.id = run_id

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.client.log_metric(self.id, tag, float(value), step=step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.client.log_image(self.id, _hwc(image), key=tag, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.id)


FIXES = {"wandb": "log in with `wandb login`, or set WANDB_MODE=offline to keep the run on this machine",
         "mlflow": "check MLFLOW_TRACKING_URI (unset: MLflow's local store)"}


def _started(name: str, run_dir: Path, config: dict, run_id: str | None):
    """The wandb or MLflow backend, or a one-line DdpmError saying why it could not start (no login, a server that
    does not answer, a run id the store does not know)."""
    try:
        return (WandbTracker if name == "wandb" else MlflowTracker)(run_dir, config, run_id)
    except DdpmError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of a tracker's start is the user's set-up, said in one line
        why = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DdpmError(f"--tracker {name} could not start ({type(error).__name__}: {why}); {FIXES[name]}") from None


class Trackers:
    """Every backend asked for, behind the part of SummaryWriter's interface the monitor uses (add_scalar,
    add_image, close), so the monitor writes each value once."""

    def __init__(self, names: tuple[str, ...], run_dir: Path, config: dict, step: int):
        unknown = [name for name in names if name not in TRACKERS]
        if unknown or not names:
            raise DdpmError(f"--tracker {','.join(names)}: choose from {', '.join(TRACKERS)} (comma-separated)")
        for name in names:  # every package first: a missing one stops the run before anything is written
            if name != "tensorboard":
                _import(name)
        run_dir = Path(run_dir)
        ids_path = run_dir / IDS_FILE
        ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        self.backends = []
        for name in names:  # the remote ones first: one that cannot start stops the run before TensorBoard writes
            if name != "tensorboard":
                backend = _started(name, run_dir, config, ids.get(name))
                ids[name] = backend.id
                self.backends.append(backend)
        if "tensorboard" in names:
            self.backends.insert(0, TensorBoardTracker(run_dir, config, step))
        if set(ids) - {"tensorboard"}:
            atomic_write_json(ids_path, ids)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for backend in self.backends:
            backend.scalar(tag, float(value), step)

    def add_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        for backend in self.backends:
            backend.image(tag, image, step)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
