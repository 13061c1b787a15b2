"""Which weights to draw with, and which guide steers them: the one resolver behind `ddpm sample`, `edit`, `eval`,
`serve` and the API's `default_sources`.

A run folder that kept post-hoc EMA snapshots is drawn, by default, with the average rebuilt at the measured
length (config.POSTHOC_DEFAULT), guided by the average rebuilt at the measured fraction of the run with the guide's
measured length (benchmarks/RESULTS.md, "Post-hoc EMA"). Anything else is drawn as it is: RUN/model (the classic
EMA), RUN/best, a model folder, and runs without snapshots (written before post-hoc EMA, or trained with
`--ema-lengths none`), each guided by the run's own guide/ snapshot when it has one, as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint import BEST_DIR, CONFIG, LATEST, MODEL_DIR, find_run_guide
from .config import POSTHOC_DEFAULT
from .errors import DdpmError

NO_GUIDE = "none"


@dataclass(frozen=True)
class Sources:
    weights: Path | None  # a model folder (model.safetensors + config.json); None when only the guide was asked
    guide: Path | None  # what `checkpoint.load_guide` reads; None: no autoguidance
    posthoc_default: bool  # the weights and guide are the run's measured post-hoc defaults


def run_folder(model_path: Path) -> Path:
    """The run folder when MODEL is one (or is the model/ or best/ folder inside one), else MODEL itself."""
    model_path = Path(model_path)
    if (model_path / MODEL_DIR).is_dir():
        return model_path
    if model_path.name in (MODEL_DIR, BEST_DIR) and (
        (model_path.parent / LATEST).exists() or (model_path.parent / CONFIG).is_file()
    ):
        return model_path.parent
    return model_path


def default_guide_length(guide_step: int) -> float:
    """The guide's averaging length at `guide_step`: a window of about POSTHOC_DEFAULT["guide_window"] steps, as a
    sigma_rel (window / step), within POSTHOC_DEFAULT["guide_ema_range"]."""
    low, high = POSTHOC_DEFAULT["guide_ema_range"]
    return round(min(high, max(low, POSTHOC_DEFAULT["guide_window"] / guide_step)), 4)


def default_posthoc(run: Path) -> tuple[float, int, float, int] | None:
    """(main length, its step, guide length, guide step) when `run` is a run folder whose snapshots rebuild the
    measured default averages well (profile error <= snapshots.WELL_REBUILT at both times), else None: a run
    without snapshots, or one too early in its training to rebuild them (it is then drawn with its classic EMA)."""
    from .snapshots import WELL_REBUILT, list_snapshots, plan_rebuild

    if not (Path(run) / MODEL_DIR).is_dir() or not list_snapshots(run):
        return None
    main = plan_rebuild(run, POSTHOC_DEFAULT["ema_length"])
    guide_step = guide_step_at(run, main.step, POSTHOC_DEFAULT["guide_ema_fraction"])
    guide = plan_rebuild(run, default_guide_length(guide_step), guide_step)
    if max(main.error, guide.error) > WELL_REBUILT:
        return None
    return main.sigma_rel, main.step, guide.sigma_rel, guide.step


def guide_step_at(run: Path, main_step: int, fraction: float) -> int:
    """The guide's step: `fraction` of the main model's step (the run's last snapshot by default), no earlier
    than the first snapshot."""
    from .snapshots import run_snapshots

    if not 0 < fraction <= 1:
        raise DdpmError(f"a fraction of the run must be in (0, 1], got {fraction}")
    return max(run_snapshots(run)[0].step, round(fraction * main_step))


def resolve_sources(model: Path | str, *, ema_length: float | None = None, ema_step: int | None = None,
                    guide: str | None = None, guide_ema_length: float | None = None,
                    guide_ema_fraction: float | None = None, raw_weights: bool = False, part: str = "both",
                    warn=None) -> Sources:
    """The weights and the guide that the flags of the same names ask for (None: the defaults, see the module
    docstring). `guide`: a path, "none", or None for the default. `raw_weights`: --no-ema (the training weights of
    the latest checkpoint, loaded over MODEL's folder by the caller). `part`: "both", "weights" (guide None, the
    guide's flags unread) or "guide" (weights None: the main average is only planned, for the guide's time, and not
    warned about again). `warn(text)` hears about a poor rebuild.
    Contradicting flags are one-line DdpmErrors."""
    from .snapshots import plan_rebuild, rebuilt_model_dir, run_snapshots

    model = Path(model)
    if ema_length is None and ema_step is not None:
        raise DdpmError("--ema-step needs --ema-length (the average's length)")
    if raw_weights and ema_length is not None:
        raise DdpmError("--no-ema draws the raw weights; it cannot go with --ema-length (a rebuilt average)")
    if part == "weights":
        guide = guide_ema_length = guide_ema_fraction = None
    if guide_ema_length is None and guide_ema_fraction is not None:
        raise DdpmError("--guide-ema-fraction needs --guide-ema-length (the guide's averaging length)")
    if guide is not None and guide_ema_length is not None:
        raise DdpmError("--guide PATH and --guide-ema-length both give a guide; keep one")
    run = run_folder(model)
    # the defaults apply to a run folder given as itself: RUN/model asks for the classic EMA by name
    default = None
    if model == run and ema_length is None and not raw_weights:
        default = default_posthoc(run)
    if ema_length is not None:
        main_step = plan_rebuild(run, ema_length, ema_step).step
        weights = None if part == "guide" else rebuilt_model_dir(run, ema_length, ema_step, warn=warn)
    elif default is not None:
        main_step = default[1]
        weights = None if part == "guide" else rebuilt_model_dir(run, default[0], default[1])
    else:
        weights, main_step = model, None

    if part == "weights":
        guide_path = None
    elif guide_ema_length is not None:
        fraction = 0.5 if guide_ema_fraction is None else guide_ema_fraction
        step = guide_step_at(run, main_step or run_snapshots(run)[-1].step, fraction)
        guide_path = rebuilt_model_dir(run, guide_ema_length, step, warn=warn)
    elif guide is not None:
        guide_path = None if guide.strip().lower() == NO_GUIDE else Path(guide)
    elif default is not None:
        guide_path = rebuilt_model_dir(run, default[2], default[3])
    elif ema_length is not None and default_posthoc(run) is not None:
        # an average chosen by length is guided as the defaults are, at the same fraction of its own step
        step = guide_step_at(run, main_step, POSTHOC_DEFAULT["guide_ema_fraction"])
        guide_path = rebuilt_model_dir(run, default_guide_length(step), step, warn=warn)
    else:
        guide_path = find_run_guide(model)
    return Sources(weights, guide_path, default is not None)


def default_sources(model: Path | str) -> Sources:
    """What `ddpm sample MODEL` draws with when no flag says otherwise."""
    return resolve_sources(model)
