"""Which weights to draw with, and which guide steers them: the one resolver behind `ddpm sample`, `edit`, `eval`,
`serve` and the API's `default_sources`.

A run folder that kept post-hoc EMA snapshots is drawn, by default, with the average rebuilt at the measured
length (config.POSTHOC_DEFAULT), guided by the average rebuilt at the measured fraction of the run with the guide's
measured length (benchmarks/RESULTS.md, "Post-hoc EMA"). Anything else is drawn as it is: RUN/model (the classic
EMA), RUN/best, a model folder, and runs without snapshots (written before post-hoc EMA, or trained with
`--ema-lengths none`), each guided by the run's own guide/ snapshot when it has one, as before. A distillation's
folder (RUN/distilled, or its model/) is drawn as the student of fewest calls it has written.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import (
    CHECKPOINT_DIR,
    CONFIG,
    GUIDE_DIR,
    MODEL_DIR,
    WEIGHTS,
    CheckpointError,
    RunFolder,
    ema_states,
    find_run_guide,
    from_pretrained,
    latest_checkpoint,
    load_training_state,
)
from .config import POSTHOC_DEFAULT, DiffusionConfig, ModelConfig, RunConfig, from_dict
from .devices import configure_for_speed, pick_device
from .errors import DdpmError
from .guidance import Guide, check_guide_schedule
from .phema import gamma_of
from .schedule import NoiseSchedule
from .snapshots import WELL_REBUILT, Rebuild, list_snapshots, plan_rebuild, rebuilt_model_dir, step_at_fraction
from .students import Student, distillation_of, last_student
from .unet import UNet

NO_GUIDE = "none"  # --guide none: no autoguidance, whatever the run holds


@dataclass(frozen=True)
class Sources:
    weights: Path  # a model folder (model.safetensors + config.json)
    guide: Path | None  # what `sources.load_guide` reads; None: no autoguidance
    posthoc_default: bool  # the weights and guide are the run's measured post-hoc defaults


def run_folder(model_path: Path) -> Path:
    """The run folder when MODEL is one (or is the model/ or best/ folder inside one), else MODEL itself."""
    run = RunFolder.containing(model_path)
    return run.path if run is not None else Path(model_path)


MEASURED_BATCH = 64  # the batch of the runs the rule was first measured on: a run whose config lacks one


def guide_window_steps(batch_size: int) -> float:
    """The guide's averaging window in training steps: POSTHOC_DEFAULT["guide_window_images"] images at
    `batch_size` images a step (100 steps at the quickstart's 64, 200 at photos32's 32)."""
    return POSTHOC_DEFAULT["guide_window_images"] / batch_size


def default_guide_length(guide_step: int, batch_size: int = MEASURED_BATCH) -> float:
    """The guide's averaging length at `guide_step` of a run of `batch_size` images a step: a window of about
    POSTHOC_DEFAULT["guide_window_images"] images, as a sigma_rel (window in steps / step), within
    POSTHOC_DEFAULT["guide_ema_range"]."""
    low, high = POSTHOC_DEFAULT["guide_ema_range"]
    return round(min(high, max(low, guide_window_steps(batch_size) / guide_step)), 4)


def run_batch_size(run: Path) -> int:
    """The images per optimizer step of the run in `run` (its config.json), or MEASURED_BATCH when it says none."""
    try:
        return int(json.loads((Path(run) / CONFIG).read_text())["train"]["batch_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return MEASURED_BATCH


def default_guide_step(main_step: int, snapshots: list) -> int:
    """The default guide's step: the snapshot step nearest POSTHOC_DEFAULT["guide_ema_fraction"] of `main_step`
    (the earlier on a tie). An average is rebuilt from the snapshots taken up to its step, so a time between two
    snapshots lacks the last stretch of its profile (step 750 of a run snapshotted every 37 steps: profile error
    0.35); the monitor also writes a snapshot at the rule's own step of the planned run (snapshots.snapshot_due)."""
    target = POSTHOC_DEFAULT["guide_ema_fraction"] * main_step
    steps = sorted({s.step for s in snapshots if s.step <= main_step})
    return min(steps, key=lambda step: (abs(step - target), step))


@dataclass(frozen=True)
class PosthocPlan:
    """The run's measured default: the main average and its guide as rebuild plans (snapshots.plan_rebuild)."""

    main: Rebuild
    guide: Rebuild

    @property
    def rebuilds_well(self) -> bool:
        return max(self.main.error, self.guide.error) <= WELL_REBUILT

    def describe(self) -> str:
        return (f"length {self.main.sigma_rel:g} at step {self.main.step}, guided by length {self.guide.sigma_rel:g} "
                f"at step {self.guide.step}")


def plan_posthoc(run: Path, snapshots: list | None = None) -> PosthocPlan | None:
    """The default averages' rebuild plans when `run` is a run folder with snapshots, else None. `snapshots`: the
    run's, when the caller has listed them already."""
    snapshots = list_snapshots(run) if snapshots is None else snapshots
    if not (Path(run) / MODEL_DIR).is_dir() or not snapshots:
        return None
    return default_plan(run, snapshots)


def default_plan(run: Path, snapshots: list) -> PosthocPlan:
    """The default averages' rebuild plans from `snapshots` (not empty): the main length at the last snapshot's
    step, its guide by the rule at that step. The training log plans with the snapshots taken so far."""
    main = plan_rebuild(run, POSTHOC_DEFAULT["ema_length"], snapshots=snapshots)
    guide_step = default_guide_step(main.step, snapshots)
    length = default_guide_length(guide_step, run_batch_size(run))
    return PosthocPlan(main, plan_rebuild(run, length, guide_step, snapshots))


def default_posthoc(run: Path, snapshots: list | None = None) -> tuple[float, int, float, int] | None:
    """(main length, its step, guide length, guide step) when `run` is a run folder whose snapshots rebuild the
    measured default averages well (profile error <= snapshots.WELL_REBUILT at both times), else None: a run
    without snapshots, or one too early in its training to rebuild them (it is then drawn with its classic EMA,
    and `resolve_sources` says so)."""
    plan = plan_posthoc(run, snapshots)
    if plan is None or not plan.rebuilds_well:
        return None
    return plan.main.sigma_rel, plan.main.step, plan.guide.sigma_rel, plan.guide.step


def outside_note(run: Path, plan: PosthocPlan) -> str:
    """The one line said when a run is longer than the runs the guide rule was measured on, with the sweep that
    measures it for this run."""
    low, high = POSTHOC_DEFAULT["measured_steps"]
    window = round(plan.guide.sigma_rel * plan.guide.step)
    return (f"{run} ({plan.main.step:,} steps) is longer than the runs its post-hoc default was measured on "
            f"({low:,}-{high:,} steps: 16x16 digits, 32x32 photos): it draws {plan.describe()} (a guide averaged "
            "over about "
            f"{window:,} steps; the rule's {guide_window_steps(run_batch_size(run)):,.0f} steps, "
            f"{POSTHOC_DEFAULT['guide_window_images']:,} images, cannot be rebuilt that late); "
            f"to measure this run: ddpm eval {run} --guide-ema-length {plan.guide.sigma_rel:g} 0.05 0.1 "
            "--guide-weight 2 2.6 3")


def fallback_note(run: Path, plan: PosthocPlan) -> str:
    """The one line said when a run's post-hoc default cannot be rebuilt: what it draws instead, and why."""
    guide = find_run_guide(run)
    error = max(plan.main.error, plan.guide.error)
    return (f"{run}'s post-hoc EMA default ({plan.describe()}) cannot be rebuilt well from its "
            f"{len(plan.main.snapshots)} snapshots (profile error {error:.0%} > {WELL_REBUILT:.0%}; a run early in "
            f"its training has too few), so this draws {Path(run) / MODEL_DIR} (the classic EMA)"
            + (f" guided by {guide}" if guide is not None else "") + " instead")


def resolve_sources(model: Path | str, *, ema_length: float | None = None, ema_step: int | None = None,
                    guide: str | None = None, guide_ema_length: float | None = None,
                    guide_ema_fraction: float | None = None, raw_weights: bool = False, warn=None) -> Sources:
    """The weights and the guide that the flags of the same names ask for (None: the defaults, see the module
    docstring). `guide`: a path, "none", or None for the default. `raw_weights`: --no-ema (the training weights of
    the latest checkpoint, loaded over MODEL's folder by open_model). `warn(text)` hears about a poor rebuild, a
    default that cannot be rebuilt, and a run outside what the default was measured on. Guides rebuilt by length
    sit at a fraction of the main model's step (`--ema-step`, else the run's end). Contradicting flags are one-line
    DdpmErrors."""
    model = _student_of_distillation(Path(model))
    if ema_length is None and ema_step is not None:
        raise DdpmError("--ema-step needs --ema-length (the average's length)")
    if raw_weights and ema_length is not None:
        raise DdpmError("--no-ema draws the raw weights; it cannot go with --ema-length (a rebuilt average)")
    if guide_ema_length is None and guide_ema_fraction is not None:
        raise DdpmError("--guide-ema-fraction needs --guide-ema-length (the guide's averaging length)")
    if guide is not None and guide_ema_length is not None:
        raise DdpmError("--guide PATH and --guide-ema-length both give a guide; keep one")
    _check_values(guide, ema_length, guide_ema_length)
    run = run_folder(model)
    snapshots = list_snapshots(run)  # once: each listing opens every snapshot's header
    # the defaults apply to a run folder given as itself: RUN/model asks for the classic EMA by name
    plan = plan_posthoc(run, snapshots) if model == run and ema_length is None and not raw_weights else None
    default = plan if plan is not None and plan.rebuilds_well else None
    if default is not None:
        if plan.main.step > POSTHOC_DEFAULT["measured_steps"][1] and warn is not None:
            warn(outside_note(run, plan))
    elif plan is not None and warn is not None:
        warn(fallback_note(run, plan))
    if ema_length is not None:
        main_step = plan_rebuild(run, ema_length, ema_step, snapshots).step
        weights = rebuilt_model_dir(run, ema_length, ema_step, warn=warn, snapshots=snapshots)
    elif default is not None:
        main_step = default.main.step
        weights = rebuilt_model_dir(run, default.main.sigma_rel, main_step, snapshots=snapshots)
    else:
        weights, main_step = model, None

    if guide_ema_length is not None:
        # the default guide's own fraction (0.5, --guide-ema-fraction's documented default)
        fraction = POSTHOC_DEFAULT["guide_ema_fraction"] if guide_ema_fraction is None else guide_ema_fraction
        step = step_at_fraction(run, fraction, main_step, snapshots)
        guide_path = rebuilt_model_dir(run, guide_ema_length, step, warn=warn, snapshots=snapshots)
    elif guide is not None:
        guide_path = None if guide.strip().lower() == NO_GUIDE else Path(guide)
    elif default is not None:
        guide_path = rebuilt_model_dir(run, default.guide.sigma_rel, default.guide.step, snapshots=snapshots)
    elif ema_length is not None and default_posthoc(run, snapshots) is not None:
        # an average chosen by length is guided as the defaults are, at the same fraction of its own step
        step = default_guide_step(main_step, snapshots)
        guide_path = rebuilt_model_dir(run, default_guide_length(step, run_batch_size(run)), step, warn=warn,
                                       snapshots=snapshots)
    else:
        guide_path = find_run_guide(model)
    return Sources(weights, guide_path, default is not None)


def _check_values(guide: str | None, ema_length: float | None, guide_ema_length: float | None) -> None:
    """The flags' values that need no snapshot, checked before any note on the weights: a bad one is one line."""
    if guide is not None and guide.strip().lower() != NO_GUIDE and not Path(guide).exists():
        raise CheckpointError(_not_a_guide(Path(guide), "does not exist"))
    for length in (ema_length, guide_ema_length):
        if length is not None:
            try:
                gamma_of(length)
            except ValueError as error:
                raise CheckpointError(str(error)) from None


def _student_of_distillation(model: Path) -> Path:
    """`model` itself, or for a distillation's folder (or its model/, the last round's weights without the record
    that makes them a student) the student of fewest calls written there: RUN/distilled draws as
    RUN/distilled/steps_2 would, not as a plain model of 20 steps."""
    folder = distillation_of(model)
    if folder is None or model not in (folder, folder / MODEL_DIR):  # a student's own folder draws as itself
        return model
    student = last_student(folder)
    if student is None:
        raise DdpmError(f"{folder} is a distillation that has written no student yet (its first round has not "
                        f"ended); continue it with ddpm distill RUN --out {folder} --resume (RUN: its teacher's run)")
    return student


def default_sources(model: Path | str) -> Sources:
    """What `ddpm sample MODEL` draws with when no flag says otherwise."""
    return resolve_sources(model)


@dataclass
class Opened:
    """A model ready to draw with (eval mode, on its device) and its guide, as `ddpm sample` uses them."""

    model: torch.nn.Module
    schedule: NoiseSchedule
    config: dict  # the model folder's config.json
    device: torch.device
    guide: Guide | None  # autoguidance's guide, loaded; None: none
    sources: Sources  # where both came from
    student: Student | None = None  # a distilled student's record (students.py): its grid and weight range


def open_model(model: Path | str, device: str | None = None, *, warn=None, **flags) -> Opened:
    """The one way in: resolve the weights and the guide once (`resolve_sources`, whose keyword flags these are),
    load both, and make the model fast to sample (configure_for_speed). The CLI's commands, the page and the API
    open models through here."""
    torch_device = pick_device(device)  # first: a bad --device is one line before any note on the weights
    found = resolve_sources(model, warn=warn, **flags)
    net, schedule, config = from_pretrained(found.weights, torch_device)
    student = Student.from_config(config)
    if student is not None and found.guide is not None:
        if flags.get("guide") is not None or flags.get("guide_ema_length") is not None:
            raise DdpmError(f"{model} is a distilled student: it draws its guidance itself ({student.flag} chooses "
                            "the weight), so it takes no --guide")
        found = Sources(found.weights, None, found.posthoc_default)
    if flags.get("raw_weights"):  # --no-ema: the training weights of the latest checkpoint over the same config
        net.load_state_dict(load_training_state(latest_checkpoint(Path(model)))["model"])
    net, _ = configure_for_speed(net)
    guide = None if found.guide is None else load_guide(found.guide, net, torch_device, schedule=schedule)
    return Opened(net, schedule, config, torch_device, guide, found, student)


# -- loading a guide ------------------------------------------------------------------------------------------------
def load_guide(path: Path, main_model: torch.nn.Module, device: torch.device | str = "cpu", *, schedule=None):
    """Load a guide for autoguidance: `Guide(model in eval mode on device, its DiffusionConfig)`.

    `path` is a model folder (model.safetensors + config.json), a run folder (its guide snapshot RUN/guide; never
    its final model/, which is the main model itself) or a training checkpoint checkpoints/step_XXXXXXXX.pt (its
    EMA weights). The guide must fit `main_model` (image size, channels, classes) and, when `schedule` (the main
    model's NoiseSchedule) is given, its noise schedule; otherwise a one-line CheckpointError names both values."""
    path = Path(path)
    if path.is_file():
        model, diffusion = _guide_from_checkpoint(path)
    else:
        folder = _guide_folder(path)
        model, _, config = from_pretrained(folder)
        diffusion, path = from_dict(DiffusionConfig, config["diffusion"]), folder
    _check_guide_fits(path, model.config, main_model.config)
    if schedule is not None:
        try:
            check_guide_schedule(diffusion, schedule, name=f"guide {path}")
        except DdpmError as error:
            raise CheckpointError(str(error)) from None
    model, _ = configure_for_speed(model.to(device).eval())  # the layout the main model samples in: faster calls
    return Guide(model, diffusion)


def _guide_folder(path: Path) -> Path:
    """The model folder behind a guide path: the folder itself, or a run folder's guide snapshot (never the
    run's model/: that is the main model itself, and guiding a model with itself does nothing)."""
    if (path / WEIGHTS).is_file():
        return path
    guide = find_run_guide(path)
    if guide is not None:
        return guide
    if RunFolder(path).looks_like_run():
        raise CheckpointError(f"run {path} has no guide snapshot {GUIDE_DIR}/ (it is written at --guide-fraction of "
                              f"the run); give a model folder or one of its {CHECKPOINT_DIR}/step_*.pt as the guide")
    if (path / CONFIG).is_file():
        return path  # from_pretrained says what is missing
    raise CheckpointError(_not_a_guide(path, "does not exist" if not path.exists() else "is not a guide"))


def _not_a_guide(path: Path, what: str) -> str:
    return (f"{path} {what}: give a model folder ({WEIGHTS} + {CONFIG}), a run folder with a {GUIDE_DIR}/ snapshot, "
            f"or a training checkpoint {CHECKPOINT_DIR}/step_*.pt")


def _guide_from_checkpoint(path: Path):
    """(UNet with the checkpoint's EMA weights, DiffusionConfig) from a training checkpoint file."""
    state = load_training_state(path)
    try:
        config = RunConfig.from_dict(state["config"])
        emas = ema_states(state)
        weights = emas[0]["model"] if emas else state["model"]
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is not a ddpm training checkpoint (no {error}); "
                              f"give a {CHECKPOINT_DIR}/step_*.pt") from None
    model = UNet(config.model)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"the weights in {path} do not fit the model of its own config: {error}") from error
    return model, config.diffusion


def _check_guide_fits(path: Path, guide: ModelConfig, main: ModelConfig) -> None:
    """Autoguidance subtracts the two networks' predictions for the same x_t and labels: shapes and classes
    must agree (widths and depths may differ: a smaller guide is the paper's default)."""
    for name in ("image_size", "in_channels", "num_classes"):
        mine, theirs = getattr(guide, name), getattr(main, name)
        if mine != theirs:
            raise CheckpointError(f"guide {path} has {name} {mine} but the model has {theirs}; "
                                  "a guide must be trained on the same images and classes as the model it guides")
