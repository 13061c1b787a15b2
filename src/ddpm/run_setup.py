"""Before a Trainer exists: which run a folder holds, the config that continues it (`--resume`,
`--resume-if-exists`), and the data with the model config made to fit it."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

from . import checkpoint as ckpt
from .config import ConfigError, RunConfig
from .data import DataInfo, load_dataset
from .errors import DdpmWarning
from .students import is_distillation


def load_latest_state(run_dir: Path) -> dict:
    """The newest checkpoint that loads; a broken newer one (e.g. truncated by hand) is reported and passed over."""
    candidates = sorted((run_dir / ckpt.CHECKPOINT_DIR).glob("step_*.pt"), reverse=True)
    if not candidates:
        ckpt.latest_checkpoint(run_dir)  # raises the clear "no checkpoint" error
    for path in candidates:
        try:
            return ckpt.load_training_state(path)
        except ckpt.CheckpointError as error:
            warnings.warn(f"{error}; trying an older checkpoint", DdpmWarning, stacklevel=2)
    raise ckpt.CheckpointError(f"no checkpoint in {run_dir / ckpt.CHECKPOINT_DIR} can be read; start a new run")


def saved_config(run_dir: Path) -> RunConfig:
    """The config of the newest readable checkpoint of a run (what `--resume` continues)."""
    return RunConfig.from_dict(load_latest_state(Path(run_dir))["config"])


def resume_config(run_dir: Path, **runtime_changes) -> RunConfig:
    """The saved run with new runtime settings (every RuntimeConfig field may change; nothing else can).

    Giving `steps` or `epochs` replaces the run's length, whichever of the two it was defined by."""
    config = saved_config(run_dir)
    changes = {k: v for k, v in runtime_changes.items() if v is not None}
    if "steps" in changes or "epochs" in changes:
        changes.setdefault("steps", None)
        changes.setdefault("epochs", None)
    config.runtime = dataclasses.replace(config.runtime, **{**changes, "out_dir": str(run_dir)})
    return config


def holds_run(run_dir: Path) -> bool:
    return ckpt.RunFolder(Path(run_dir)).holds_checkpoints()


def check_not_a_distillation(run_dir: Path) -> None:
    """One line for `ddpm train` on a distillation's folder (RUN/distilled): resumed, its checkpoints would train the
    student as a plain diffusion model."""
    if is_distillation(run_dir):
        raise ConfigError(f"{run_dir} holds a distillation, not a training run: continue it with `ddpm distill RUN "
                          f"--out {run_dir} --resume` (RUN: its teacher's run), or give another --out")


def check_new_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file; give a folder path")
    if holds_run(run_dir):
        raise ConfigError(
            f"{run_dir} already holds a run; continue it with `ddpm train --resume {run_dir}` (or run the same "
            "command with --resume-if-exists) or choose another --out"
        )


def first_difference(saved: RunConfig, given: RunConfig) -> str | None:
    """'section.field: A in the run, B here' for the first field of the model, diffusion or recipe that differs
    (how the run executes, the runtime section, may differ), or None."""
    a, b = RunConfig.from_dict(saved.to_dict()).to_dict(), RunConfig.from_dict(given.to_dict()).to_dict()
    for section in ("model", "diffusion", "train"):
        for field, value in a[section].items():
            if b[section].get(field) != value:
                return f"{section}.{field}: {value!r} in the run, {b[section].get(field)!r} here"
    return None


def continued_config(state: dict, config: RunConfig, run_dir: Path) -> RunConfig:
    """--resume-if-exists: the saved run under this command's runtime settings, when this command describes the
    same run (`config` already prepared from its data); otherwise the one-line refusal a new run gets."""
    saved = RunConfig.from_dict(state["config"])
    difference = first_difference(saved, config)
    if difference:
        raise ConfigError(f"{run_dir} holds a run with another configuration ({difference}); continue it with "
                          f"`ddpm train --resume {run_dir}`, or choose another --out")
    return dataclasses.replace(saved, runtime=config.runtime)


def prepare(config: RunConfig) -> tuple[RunConfig, DataInfo]:
    """Load the data and make the model config agree with it (channels, classes)."""
    t = config.train
    info = load_dataset(t.data, config.model.image_size, t.channels, t.conditional)
    if len(info.dataset) < t.batch_size:
        raise ConfigError(
            f"the dataset has {len(info.dataset)} images, fewer than --batch-size {t.batch_size}; lower --batch-size"
        )
    model = dataclasses.replace(
        config.model, in_channels=info.channels, out_channels=None, num_classes=info.num_classes
    )
    return dataclasses.replace(config, model=model), info
