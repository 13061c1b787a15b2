"""The post-hoc EMA's files: the tracks' snapshots a run keeps (RUN/ema_snapshots, never pruned) and the averages
rebuilt from them (RUN/ema_rebuilt/<length and step>, ordinary model folders that sample, eval, serve and --guide
read as they read RUN/model). The maths is phema.py's.

A snapshot is one track's averaged weights at one step, as float16 safetensors with the track's sigma_rel, gamma
and the step in its header (float16: the rebuild from it differs from the float32 one far below the weights' own
step-to-step change; tests/test_phema.py measures it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CONFIG, MODEL_DIR, WEIGHTS, CheckpointError, save_pretrained
from .config import DiffusionConfig, ModelConfig, from_dict
from .files import atomic_write_safetensors
from .phema import fit, gamma_of
from .unet import UNet

SNAPSHOT_DIR = "ema_snapshots"
REBUILT_DIR = "ema_rebuilt"
SNAPSHOTS_PER_RUN = 40  # per track, by default (RuntimeConfig.ema_snapshot_every = None)
SNAPSHOT_DTYPE = torch.float16
# a target profile the snapshots represent worse than this (relative L2 error of the profiles) gets a warning
WELL_REBUILT = 0.05


def snapshot_every(setting: int | None, last_step: int) -> int:
    """Steps between snapshots: `setting`, or SNAPSHOTS_PER_RUN over the planned run."""
    return setting if setting is not None else max(1, last_step // SNAPSHOTS_PER_RUN)


def snapshot_due(step: int, last_step: int, every: int, guide_fraction: float) -> bool:
    """Whether the monitor snapshots the tracks at `step` of a run planned for `last_step`: every `every` steps,
    at the end, and at `guide_fraction` of the run, where the post-hoc default rebuilds its guide
    (sources.default_guide_step), so that the default is rebuilt at the rule's own step whatever `every` is."""
    return step % every == 0 or step == last_step or step == round(guide_fraction * last_step)


def snapshot_path(run_dir: Path, sigma_rel: float, step: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"step_{step:08d}_sigma{sigma_rel:.4f}.safetensors"


def write_snapshot(run_dir: Path, model: torch.nn.Module, sigma_rel: float, step: int) -> Path:
    """One track's weights at `step` (a resumed run that passes the step again writes the same bits again)."""
    path = snapshot_path(run_dir, sigma_rel, step)
    # one metadata key: safetensors writes several in no fixed order, and equal snapshots should be equal files
    about = json.dumps({"step": step, "sigma_rel": sigma_rel, "gamma": gamma_of(sigma_rel)}, sort_keys=True)
    atomic_write_safetensors(path, model, dtype=SNAPSHOT_DTYPE, metadata={"ddpm_ema_snapshot": about})
    return path


@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    sigma_rel: float
    gamma: float


def list_snapshots(run_dir: Path) -> list[Snapshot]:
    """The run's snapshots, by step then length, read from their headers."""
    from safetensors import safe_open

    found = []
    for path in sorted((Path(run_dir) / SNAPSHOT_DIR).glob("step_*.safetensors")):
        with safe_open(str(path), "pt") as f:
            about = json.loads((f.metadata() or {})["ddpm_ema_snapshot"])
        found.append(Snapshot(path, int(about["step"]), float(about["sigma_rel"]), float(about["gamma"])))
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


def run_snapshots(run_dir: Path) -> list[Snapshot]:
    """list_snapshots, or a one-line CheckpointError for a run that kept none."""
    snapshots = list_snapshots(run_dir)
    if not snapshots and (run_dir / WEIGHTS).is_file() and not (run_dir / MODEL_DIR).is_dir():
        raise CheckpointError(f"{run_dir} is a model folder, with no post-hoc EMA snapshots to average (only runs "
                              "trained with --ema-lengths keep them); leave --ema-length out to draw it as it is")
    if not snapshots:
        raise CheckpointError(f"{run_dir} has no post-hoc EMA snapshots ({SNAPSHOT_DIR}/); only runs trained with "
                              "--ema-lengths keep them (the run's own EMA is in its model/ folder)")
    return snapshots


def step_at_fraction(run_dir: Path, fraction: float, of_step: int | None = None,
                     snapshots: list[Snapshot] | None = None) -> int:
    """The step at `fraction` of `of_step` (default: the run's last snapshot's step), at least the first snapshot's.
    `snapshots`: the run's, when the caller has listed them already."""
    snapshots = snapshots or run_snapshots(run_dir)
    if not 0 < fraction <= 1:
        raise CheckpointError(f"a fraction of the run must be in (0, 1], got {fraction}")
    return max(snapshots[0].step, round(fraction * (snapshots[-1].step if of_step is None else of_step)))


@dataclass(frozen=True)
class Rebuild:
    """How a length is rebuilt: the snapshots used, their coefficients, and how well their combination matches the
    target profile (relative L2 error)."""

    sigma_rel: float
    step: int
    snapshots: list[Snapshot]
    coefficients: np.ndarray
    error: float


def plan_rebuild(run_dir: Path, sigma_rel: float, step: int | None = None,
                 snapshots: list[Snapshot] | None = None) -> Rebuild:
    """The least-squares combination of the run's snapshots that averages like a power-function EMA of
    `sigma_rel` at `step` (default: the last snapshot's step). One-line CheckpointError when nothing can.
    `snapshots`: the run's, when the caller has listed them already (each listing opens every snapshot)."""
    snapshots = snapshots or run_snapshots(run_dir)
    last = max(s.step for s in snapshots)
    step = last if step is None else step
    if not 1 <= step <= last:
        raise CheckpointError(f"--ema-step {step} is outside the run's snapshots (steps "
                              f"{snapshots[0].step}..{last})")
    try:
        gamma = gamma_of(sigma_rel)
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    usable = [s for s in snapshots if s.step <= step]
    pairs = [(s.gamma, s.step) for s in usable]
    x, error = fit(pairs, gamma, step)
    return Rebuild(sigma_rel, step, usable, x, error)


def rebuild_state_dict(plan: Rebuild) -> dict[str, torch.Tensor]:
    """sum_i x_i snapshot_i, accumulated in float64 and returned as float32."""
    from safetensors.torch import load_file

    total: dict[str, torch.Tensor] = {}
    for snapshot, x in zip(plan.snapshots, plan.coefficients):
        if x == 0:
            continue
        for name, value in load_file(str(snapshot.path)).items():
            term = value.double() * float(x)
            total[name] = total[name] + term if name in total else term
    return {name: value.float() for name, value in total.items()}


def rebuilt_model_dir(run_dir: Path, sigma_rel: float, step: int | None = None, out: Path | None = None,
                      warn=None, snapshots: list[Snapshot] | None = None) -> Path:
    """A model folder holding the rebuilt average: `out` when given (an export), else the run's cache
    RUN/ema_rebuilt/sigma<S>_step<N>, reused when it exists. `warn(text)` hears about a poor rebuild."""
    run_dir = Path(run_dir)
    plan = plan_rebuild(run_dir, sigma_rel, step, snapshots)
    folder = Path(out) if out is not None else run_dir / REBUILT_DIR / f"sigma{sigma_rel:.4f}_step{plan.step:08d}"
    if plan.error > WELL_REBUILT and warn is not None:
        warn(f"an EMA length of {sigma_rel:g} at step {plan.step} is rebuilt only approximately from the stored "
             f"lengths {sorted({s.sigma_rel for s in plan.snapshots})} ({len(plan.snapshots)} snapshots; profile "
             f"error {plan.error:.0%}): choose a length nearer those, or a later step")
    if out is None and (folder / WEIGHTS).is_file() and (folder / CONFIG).is_file():
        return folder
    exported = json.loads((run_dir / MODEL_DIR / CONFIG).read_text())
    model = UNet(from_dict(ModelConfig, exported["model"]))
    model.load_state_dict(rebuild_state_dict(plan))
    extra = {k: v for k, v in exported.items() if k not in ("model", "diffusion")}
    extra.update(step=plan.step, ema_length=sigma_rel, ema_rebuild_error=plan.error)
    save_pretrained(model, folder, from_dict(DiffusionConfig, exported["diffusion"]), extra)
    return folder
