"""Training checkpoints (resume); save_pretrained / from_pretrained (safetensors + config.json); the guide snapshot
of a run (autoguidance, Karras et al. 2024; sources.load_guide loads any guide)."""
from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DiffusionConfig, ModelConfig, from_dict, to_dict
from .errors import DdpmError
from .files import atomic_write_bytes, atomic_write_json, atomic_write_safetensors
from .schedule import NoiseSchedule
from .unet import UNet

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
MODEL_DIR = "model"
GUIDE_DIR = "guide"  # written once, at RuntimeConfig.guide_fraction of the run; outside checkpoints/, never pruned
DISTILLED_DIR = "distilled"  # `ddpm distill`: its checkpoints and one student folder a round, steps_K/
BEST_DIR = "best"  # --keep-best: the best-scoring EMA weights so far (periodic_eval.py); never pruned
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(DdpmError):
    """A checkpoint or model folder cannot be used; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class RunFolder:
    """A training run's folder, and the one place that knows its layout: RUN/model (the classic EMA's export),
    RUN/guide (the guide snapshot), RUN/best (--keep-best), RUN/checkpoints and RUN/latest (resume). A new kind of
    folder inside a run (a distilled student) is one more property here."""

    path: Path

    @classmethod
    def containing(cls, path: Path | str) -> RunFolder | None:
        """The run that `path` is (a folder with a model/ export), or whose model/ or best/ folder it is; None for
        anything else (a plain model folder)."""
        path = Path(path)
        if (path / MODEL_DIR).is_dir():
            return cls(path)
        parent = path.parent
        if path.name in (MODEL_DIR, BEST_DIR) and ((parent / LATEST).exists() or (parent / CONFIG).is_file()):
            return cls(parent)
        return None

    @property
    def model(self) -> Path:
        return self.path / MODEL_DIR

    @property
    def guide(self) -> Path:
        return self.path / GUIDE_DIR

    @property
    def best(self) -> Path:
        return self.path / BEST_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def distilled(self) -> Path:
        return self.path / DISTILLED_DIR

    def has_model_export(self) -> bool:
        return (self.model / WEIGHTS).is_file() or (self.model / CONFIG).is_file()

    def guide_snapshot(self) -> Path | None:
        """RUN/guide once the run has written it whole, else None."""
        return self.guide if (self.guide / WEIGHTS).is_file() and (self.guide / CONFIG).is_file() else None

    def holds_checkpoints(self) -> bool:
        """A run has started here: `latest` or a checkpoint (what a new run must not overwrite)."""
        return (self.path / LATEST).exists() or any(self.checkpoints.glob("step_*.pt"))

    def looks_like_run(self) -> bool:
        """Any trace of a run: checkpoints/, latest or model/ (a guide asked of it must be its guide/)."""
        return self.checkpoints.is_dir() or (self.path / LATEST).is_file() or self.model.is_dir()


def ema_states(state: dict) -> list[dict]:
    """A checkpoint's averages of the weights, the classic EMA first, then the post-hoc EMA's tracks: its "emas"
    list, or those of a checkpoint written before that list ("ema" and "ema_tracks")."""
    if "emas" in state:
        return list(state["emas"])
    return ([state["ema"]] if state.get("ema") else []) + list(state.get("ema_tracks", []))


def save_training_state(run_dir: Path, state: dict, step: int, keep: int = 3) -> Path:
    """Write checkpoints/step_XXXXXXXX.pt atomically, point `latest` at it, keep the newest `keep` files."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    path = folder / f"step_{step:08d}.pt"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    atomic_write_bytes(Path(run_dir) / LATEST, f"{CHECKPOINT_DIR}/{path.name}\n".encode())
    for old in sorted(folder.glob("step_*.pt"))[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.is_file():
        path = run_dir / pointer.read_text().strip()
        if path.is_file():
            return path
    found = sorted((run_dir / CHECKPOINT_DIR).glob("step_*.pt"))
    if not found:
        raise CheckpointError(
            f"no checkpoint in {run_dir} (expected {CHECKPOINT_DIR}/step_*.pt); start a new run without --resume"
        )
    return found[-1]


def load_training_state(path: Path, map_location="cpu") -> dict:
    """Load a training checkpoint with `weights_only=True` (no arbitrary pickle)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure here means the file is unusable
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(error).__name__}: {error}); it may be truncated, use an older one"
        ) from error


def save_pretrained(
    model: torch.nn.Module, folder: Path, diffusion: DiffusionConfig, extra: dict | None = None
) -> None:
    """Export weights as safetensors and the configs as JSON: all `from_pretrained` needs, no pickle."""
    folder = Path(folder)
    atomic_write_safetensors(folder / WEIGHTS, model)
    config = {"model": to_dict(model.config), "diffusion": to_dict(diffusion), **(extra or {})}
    atomic_write_json(folder / CONFIG, config)


def resolve_model_dir(path: Path) -> Path:
    """A run folder (its `model/` export) or a model folder itself."""
    run = RunFolder(Path(path))
    return run.model if run.has_model_export() else run.path


def from_pretrained(path: Path, device: torch.device | str = "cpu"):
    """Load (UNet in eval mode, NoiseSchedule, config dict) from a model folder or a run folder."""
    from safetensors.torch import load_file

    folder = resolve_model_dir(Path(path))
    if not folder.is_dir():
        raise CheckpointError(f"{path} is not a folder; give a run folder or a folder with {WEIGHTS} and {CONFIG}")
    if not (folder / CONFIG).is_file():
        raise CheckpointError(
            f"{folder} has no {CONFIG}; it is not a ddpm model folder (export one with save_pretrained)"
        )
    if not (folder / WEIGHTS).is_file():
        raise CheckpointError(
            f"{folder} has no {WEIGHTS}; the run has not exported weights yet (it does at each checkpoint)"
        )
    try:
        config = json.loads((folder / CONFIG).read_text())
    except ValueError as error:  # JSONDecodeError, or bytes that are not UTF-8
        raise CheckpointError(f"{folder / CONFIG} is not valid JSON ({error}); re-export the model or restore "
                              "the file from the run's config.json") from error
    model = UNet(from_dict(ModelConfig, config["model"]))
    try:
        model.load_state_dict(load_file(str(folder / WEIGHTS)))
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"weights in {folder / WEIGHTS} do not fit the model in {CONFIG}: {error}") from error
    schedule = NoiseSchedule.from_config(from_dict(DiffusionConfig, config["diffusion"]))
    return model.to(device).eval(), schedule.to(device), config


# -- autoguidance: the run's guide snapshot and loading any guide ---------------------------------------------------
def find_run_guide(run_dir: Path) -> Path | None:
    """RUN/guide when the run has written its guide snapshot, else None. `run_dir` may also be the run's model/
    export or its best/ (what `ddpm sample RUN/model` is given): its run folder is then the parent. A best/ that
    keeps its own guide (RUN/best/guide: the rebuilt guide of the post-hoc default that scored best) uses that."""
    run_dir = Path(run_dir)
    if run_dir.name == BEST_DIR and RunFolder(run_dir).guide_snapshot() is not None:
        return RunFolder(run_dir).guide
    for run in (run_dir, run_dir.parent) if run_dir.name in (MODEL_DIR, BEST_DIR) else (run_dir,):
        if RunFolder(run).guide_snapshot() is not None:
            return RunFolder(run).guide
    return None


def replace_pretrained(model: torch.nn.Module, folder: Path, diffusion: DiffusionConfig, extra: dict,
                       guide: tuple[torch.nn.Module, dict] | None = None) -> None:
    """`save_pretrained` into a new folder that then takes `folder`'s place, so that a crash leaves the old model
    folder or the new one whole, never the new weights beside the old config. `guide`: (network, extra) saved
    inside it as its own guide (GUIDE_DIR), replaced with it."""
    folder = Path(folder)
    staging, old = folder.with_name(f".{folder.name}.{os.getpid()}.tmp"), folder.with_name(f".{folder.name}.old")
    shutil.rmtree(staging, ignore_errors=True)
    save_pretrained(model, staging, diffusion, extra)
    if guide is not None:
        save_pretrained(guide[0], staging / GUIDE_DIR, diffusion, guide[1])
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def save_guide_snapshot(run_dir: Path, model: torch.nn.Module, diffusion: DiffusionConfig, extra: dict) -> bool:
    """Export `model` to RUN/guide exactly as `save_pretrained` exports RUN/model, once: an existing guide (a
    resumed run's) is never replaced. The folder is written under a temporary name and renamed into place, so a
    crash leaves no half-written guide that would then block the real one. Returns whether it wrote."""
    target = Path(run_dir) / GUIDE_DIR
    if target.exists():
        return False
    staging = Path(run_dir) / f".{GUIDE_DIR}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)  # left by a crash in this very spot
    staging.mkdir(parents=True)
    try:
        save_pretrained(model, staging, diffusion, extra)
        os.rename(staging, target)  # atomic; fails if another writer got there first, and that one is kept
    except OSError:
        if not target.exists():
            raise
        return False
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True
