"""Guided progressive distillation: a student that samples in K calls what its guided teacher samples in 2K steps
(Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models", Algorithm 2), with the
guidance weight as an input of the student (Meng et al. 2023, "On Distillation of Guided Diffusion Models"), so one
student draws at any weight of its range with one call a step and no guide. This module runs the rounds through the
Trainer and writes the students; one round's grids, target and loss are distill_target.py's, the options and what
distill.json records distill_settings.py's.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import (
    ConfigError,
    DiffusionConfig,
    RunConfig,
    RuntimeConfig,
    SamplingConfig,
    TrainConfig,
    from_dict,
)
from .devices import configure_for_speed
from .distill_settings import (
    FINAL_STEP_WEIGHT,
    LEARNING_RATE,
    START_STEPS,
    STUDENT_AVERAGE,
    TEACHER_SPAN,
    DistillSettings,
    check_final_weight,
    check_rounds,
    check_spacing,
    check_student_amp,
    check_student_average,
    check_teacher_precision,
    check_teacher_span,
    resolve_spacing,
    resolve_student_amp,
    resolve_teacher_precision,
    teacher_settings,
    upgrade_record,
    warn_if_emulated,
)
from .distill_target import TEACHER_SOLVERS, DistillationObjective, Teacher, check_teacher_solver
from .distributed import StopRequest, distributed_context, setup_device
from .errors import DdpmError
from .files import atomic_write_bytes, atomic_write_json, make_grid, png_bytes
from .guidance import make_denoiser
from .periodic_eval import PeriodicEvaluation
from .pipeline import balanced_labels, sample_all
from .run_setup import load_latest_state, prepare
from .schedule import NoiseSchedule
from .sources import open_model, run_folder
from .students import SETTINGS, Student, distillation_of, student_dir
from .training import Trainer, closing_run, fit, monitor_for
from .unet import UNet


# -- teachers ----------------------------------------------------------------------------------------------------
def denoiser_teacher(model: torch.nn.Module, schedule: NoiseSchedule, sampling: SamplingConfig, guide=None,
                     weight_name: str | None = None) -> Teacher:
    """eps(z, t, labels, weight) of `model` guided as `sampling` says (by `guide` too), with `weight_name`'s weight
    replaced by one weight per sample: the same guided prediction `ddpm sample` draws with (guidance.make_denoiser).
    A student teacher (a previous round's) takes the weight as its input."""
    def teacher(z, t, labels, weight):
        weights = {weight_name: weight} if weight_name is not None and weight is not None else None
        return make_denoiser(model, labels, sampling, schedule=schedule, guide=guide, weights=weights)(z, t)

    return teacher


def student_from(teacher: torch.nn.Module, weight_name: str | None, seed: int = 0) -> torch.nn.Module:
    """A copy of the teacher's network with a guidance-weight input (zero at the start: the teacher's outputs). The
    embedding's first layer is drawn from `seed`, not from the global generator: the same seed, the same student."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = UNet(dataclasses.replace(teacher.config, weight_input=weight_name))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not key.startswith("weight_emb.") for key in missing):
        raise DdpmError(f"the teacher's weights do not fit its student (missing {missing}, unexpected {unexpected})")
    return student.to(next(teacher.parameters()).device)


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).eval().requires_grad_(False)


# -- the command ---------------------------------------------------------------------------------------------------
@dataclass
class DistillResult:
    folder: Path  # RUN/distilled
    students: list[Path]  # the steps_K folders written so far, the last round's last
    stopped: int = 0  # 0: every round done; else why it saved and stopped early (distributed.stop_code)


def _run_config(run: Path) -> RunConfig:
    """The config of the run that `run` is (or whose model/ or best/ folder it is): its data and flips."""
    path = run_folder(run) / ckpt.CONFIG
    try:
        return RunConfig.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, ConfigError):
        raise ConfigError(f"{run} is not a training run with its config.json: distillation trains on the run's data "
                          "(give the run folder, or --data DATA)") from None


def distill(run: Path | str, *, steps: int = 2, start_steps: int = START_STEPS,
            round_steps: int | list[int] | None = None, teacher_solver: str = TEACHER_SOLVERS[0],
            spacing: str = "auto", final_weight: float = FINAL_STEP_WEIGHT, teacher_span: int = TEACHER_SPAN,
            student_average: str | float | list = STUDENT_AVERAGE, teacher_precision: str = "auto",
            weight_range: tuple[float, float] | None = None, batch_size: int | None = None, lr: float = LEARNING_RATE,
            data: str | None = None, out: Path | str | None = None, device: str | None = None,
            seed: int = 0, resume: bool = False, if_exists: bool = False, progress: bool = True, stop=None,
            time_limit: float | None = None, checkpoint_every: int | None = None, log_every: int = 25,
            trackers: tuple[str, ...] = ("tensorboard",), amp: str = "auto", warn=None,
            guidance: float | None = None, guide_weight: float | None = None, eval_n: int | None = None,
            **source_flags) -> DistillResult:
    """Distil what `ddpm sample RUN` draws (or what `source_flags`, sources.resolve_sources's, choose) into students
    of start_steps / 2, / 4, ... `steps` steps, `round_steps` optimizer steps a round, on the nested grids of
    `spacing` (resolve_spacing), each written to RUN/distilled/steps_K/ (a model folder with a "student" record,
    its grid included); the rounds after the second learn `teacher_span` steps of their teacher
    (DistillSettings.span). Training is the Trainer's: checkpoints, resume, the graceful stop, --time-limit, torchrun
    and the log come with it. `eval_n`: images scored at each round's end into the log (see _score_student); None =
    the teacher run's --eval-n when it evaluated while training, else 0."""

    run = Path(run)
    _check_options(teacher_solver, spacing, final_weight, eval_n, checkpoint_every, teacher_precision, teacher_span,
                   amp, data)
    _check_not_a_distillation(run)
    rounds = check_rounds(steps, start_steps, round_steps)  # before anything is opened (a rebuild writes its cache)
    check_student_average(student_average, rounds)
    opened = open_model(run, device, warn=warn, **source_flags)
    if start_steps > len(opened.schedule):
        raise ConfigError(f"--start-steps {start_steps} is more than the model's {len(opened.schedule)} timesteps")
    spacing = resolve_spacing(spacing, start_steps, opened.schedule)
    warn_if_emulated(teacher_precision, opened.device)
    record, weight, weights, default_weight = teacher_settings(
        opened, {"guidance": guidance, "guide_weight": guide_weight}, weight_range, start_steps)
    if source_flags.get("raw_weights"):  # --no-ema: the same folder's raw weights are another teacher
        record["raw_weights"] = True
    settings = DistillSettings(record, weight, weights, default_weight, start_steps, steps, round_steps,
                               teacher_solver, spacing, final_weight, student_average, teacher_precision,
                               teacher_span)
    folder = Path(out) if out is not None else ckpt.RunFolder(run_folder(run)).distilled
    state = _existing(folder, settings, resume, if_exists)
    config = student_run_config(opened, run, folder, settings, data=data, batch_size=batch_size, lr=lr, seed=seed,
                                device=device, amp=resolve_student_amp(amp, opened.device), log_every=log_every,
                                checkpoint_every=checkpoint_every, time_limit=time_limit, trackers=trackers)
    config, info = prepare(config)
    ctx = distributed_context()
    torch_device = setup_device(ctx, device, config.runtime.dist_timeout)
    trainer = Trainer(config, info, torch_device, ctx, model=student_from(opened.model, weight, seed),
                      last_step=settings.last_step)
    if state is not None:
        trainer.load_state_dict(state)
    elif ctx.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / SETTINGS, dataclasses.asdict(settings))
    stop = stop or StopRequest()
    stop.time_limit = time_limit
    monitor = monitor_for(trainer, folder, settings.last_step, progress)
    with closing_run(trainer, monitor, folder):
        written, stopped = run_rounds(trainer, settings, opened, folder, monitor, stop, run, info,
                                      _round_evaluation(trainer, run, eval_n))
    return DistillResult(folder, written, stopped)


def _check_not_a_distillation(run: Path) -> None:
    """One line for a distillation's own folder (or a student in it) given as the run: its students are drawn, and a
    distillation continues from its teacher's run (--out FOLDER --resume)."""
    folder = distillation_of(run)
    if folder is not None:
        where = "a distillation's folder" if folder == run else f"in the distillation {folder}"
        raise ConfigError(f"{run} is {where}, not a training run: draw its students (ddpm sample "
                          f"{folder}/steps_K), or continue it from its teacher's run (ddpm distill RUN --out {folder} "
                          "--resume)")


def _check_options(teacher_solver: str, spacing: str, final_weight: float, eval_n: int | None,
                   checkpoint_every: int | None, teacher_precision: str, teacher_span: int, amp: str,
                   data: str | None) -> None:
    """distill()'s flags that need no model, checked before anything is opened."""
    if data is not None and not data.strip():
        raise ConfigError("--data is empty; give an image folder, a CIFAR-10 folder, mnist or photos")
    check_teacher_solver(teacher_solver)
    check_teacher_precision(teacher_precision)
    check_teacher_span(teacher_span)
    check_student_amp(amp)
    check_final_weight(final_weight)
    if spacing != "auto":
        check_spacing(spacing)
    if eval_n is not None and eval_n != 0 and not 2 <= eval_n <= 100_000:
        raise ConfigError(f"--eval-n {eval_n} must be 0 (no evaluation) or from 2 to 100,000 images")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every {checkpoint_every} must be >= 1 (default: at each round's end)")


def student_run_config(opened, run: Path, folder: Path, settings: DistillSettings, *, data, batch_size, lr, seed,
                       device, amp, log_every, checkpoint_every, time_limit, trackers) -> RunConfig:
    """The distillation as a run of the Trainer: the student's network, the teacher's schedule, the run's data, the
    classic EMA as the student's average (decay 0 copies the weights: none, the paper's), no label dropout, no
    guide snapshot and no previews of its own (one a round)."""
    trained = _run_config(run) if data is None else None
    model = opened.model.config
    return RunConfig(
        model=dataclasses.replace(model, weight_input=settings.weight),
        diffusion=_diffusion(opened.config),
        train=TrainConfig(data=data or trained.train.data, conditional=model.num_classes is not None,
                          channels=model.in_channels, hflip=None if trained is None else trained.train.hflip,
                          batch_size=batch_size or (64 if trained is None else trained.train.batch_size), lr=lr,
                          ema_decay=0.0, ema_warmup=0, p_uncond=0.0, seed=seed, ema_lengths=()),
        runtime=RuntimeConfig(out_dir=str(folder), steps=settings.last_step, device=device, amp=amp,
                              log_every=log_every, checkpoint_every=checkpoint_every or math.gcd(*settings.round_ends),
                              sample_every=0, val_every=0, guide_fraction=0.0, time_limit=time_limit,
                              trackers=tuple(trackers)))


def run_rounds(trainer, settings: DistillSettings, opened, folder: Path, monitor, stop, run: Path,
               info, quality: PeriodicEvaluation | None = None) -> tuple[list[Path], int]:
    """The rounds not done yet, each through `training.fit` with its own teacher; (the student folders, the stop
    code or 0)."""
    written = []
    for number, steps in enumerate(settings.rounds):
        end = settings.round_ends[number]
        if trainer.step_count >= end:
            written.append(student_dir(folder, steps))
            continue
        span = settings.span(number)
        previous = _student(folder, 2 * steps, trainer) if number else None  # the student this round starts from
        taught_by = previous if span == 2 else _student(folder, span * steps, trainer)
        teacher = _round_teacher(settings, opened, taught_by)
        if previous is not None and trainer.step_count == settings.round_ends[number - 1]:
            _start_from(trainer, previous[0])
        if trainer.ema is not None:  # rank 0's; resumed mid-round too
            _set_average(trainer.ema, settings, number, trainer.step_count)
        solver = settings.teacher_solver if number == 0 else "ddim"  # a student is exact under DDIM
        trainer.objective = DistillationObjective(
            teacher, trainer.schedule, steps, settings.weight_range, solver, settings.spacing, settings.final_weight,
            resolve_teacher_precision(settings.teacher_precision, trainer.device), span)
        stopped = fit(trainer, end, monitor, stop)
        if stopped:
            return written, stopped
        if trainer.ctx.is_main:
            written.append(_write_student(trainer, settings, folder, steps, run, monitor, info, quality))
        trainer.ctx.barrier()
    return written, 0


def _student(folder: Path, steps: int, trainer) -> tuple:
    """(network, schedule) of the `steps`-step student an earlier round wrote, read from its folder by every rank."""
    return ckpt.from_pretrained(student_dir(folder, steps), trainer.device)[:2]


def _set_average(ema, settings: DistillSettings, number: int, step: int) -> None:
    """Round `number`'s average of its student in the Trainer's classic EMA: "last" copies every step; a decay D
    averages from the round's first weights (the EMA's copy, which the previous round wrote and this one starts
    from); "half" copies until the round's middle, then keeps the plain mean (EMA.uniform). Restarted at the round's
    first step; a round resumed in its middle keeps the count its checkpoint saved."""
    start = settings.round_ends[number - 1] if number else 0
    length = settings.round_ends[number] - start
    if step == start:
        ema.num_updates = 0
    average = settings.averages[number]
    ema.uniform = average == "half"
    ema.decay = 0.0 if isinstance(average, str) else average
    ema.warmup_steps = max(1, length // 2) if average == "half" else 0


def _start_from(trainer, model: torch.nn.Module) -> None:
    """A later round's student starts as its teacher, the student the previous round wrote (its average, or with
    no average the very weights it ends with), read from its folder by every rank alike."""
    with torch.no_grad():
        for param, saved in zip(trainer.model.parameters(), model.parameters(), strict=True):
            param.copy_(saved)


def _diffusion(config: dict):

    return from_dict(DiffusionConfig, config["diffusion"])


def _existing(folder: Path, settings: DistillSettings, resume: bool, if_exists: bool) -> dict | None:
    """The checkpoint to continue from (--resume, or --resume-if-exists on a folder that holds this distillation),
    or None for a new one; a folder holding another distillation is a one-line error."""

    held = ckpt.RunFolder(folder).holds_checkpoints()
    if not held:
        if resume:
            raise ConfigError(f"{folder} holds no distillation to resume; leave --resume out to start one")
        return None
    try:
        saved = json.loads((folder / SETTINGS).read_text())
    except (OSError, ValueError):
        saved = None
    if saved is not None:
        saved = upgrade_record(saved)
    if saved != json.loads(json.dumps(dataclasses.asdict(settings))):  # compared as written (tuples are lists)
        what = "another teacher or other settings" if saved is not None else f"no {SETTINGS}"
        raise ConfigError(f"{folder} holds a distillation of {what}; give another --out (or the same flags as "
                          "that distillation to continue it)")
    if not (resume or if_exists):
        raise ConfigError(f"{folder} already holds this distillation; continue it with --resume (or "
                          "--resume-if-exists), or give another --out")
    return load_latest_state(folder)


def _round_teacher(settings: DistillSettings, opened, student: tuple | None) -> Teacher:
    """Round 0's teacher (`student` None) is the guided model; each later round's is an earlier round's student (the
    previous one, or two rounds back with a span of 4: DistillSettings.span), `student` = (its network, its schedule)
    as read from its folder, frozen."""
    sampling = SamplingConfig(**{**settings.teacher["sampling"], "guidance_interval": _interval(settings)})
    if student is None:
        return denoiser_teacher(opened.model, opened.schedule, sampling, opened.guide, settings.weight)
    model, schedule = student
    teacher, _ = configure_for_speed(frozen(model))  # channels_last: a tenth faster a call (sampling's layout)
    return denoiser_teacher(teacher, schedule, sampling, None, settings.weight)


def _interval(settings: DistillSettings):
    interval = settings.teacher["sampling"]["guidance_interval"]
    return None if interval is None else tuple(interval)


def _write_student(trainer, settings: DistillSettings, folder: Path, steps: int, run: Path, monitor,
                   info, quality: PeriodicEvaluation | None = None) -> Path:
    """RUN/distilled/steps_K: the student's weights (no EMA) with its record, its preview grid, and with
    with `quality` its scores in the log."""

    path = student_dir(folder, steps)
    teacher_text = f"{run} ({settings.teacher['weights']})"
    record = settings.student(steps, teacher_text, trainer.config.train.data)
    student = frozen(trainer.ema.model)  # the round's average (decay 0: the last weights themselves)
    ckpt.save_pretrained(student, path, trainer.config.diffusion,
                         {"class_names": info.class_names, "step": trainer.step_count, "student": record})
    num_classes = student.config.num_classes
    n = num_classes * 8 if num_classes else 16
    sampling = Student.from_config({"student": record}).sampling(SamplingConfig(), {})
    images = sample_all(student, trainer.schedule, n=n, labels=balanced_labels(n, num_classes), sampling=sampling,
                        seed=0)
    grid = make_grid(images, nrow=num_classes or 8)
    atomic_write_bytes(path / "preview.png", png_bytes(grid))
    monitor.writer.add_image(f"distill/steps_{steps}", grid, trainer.step_count)
    if monitor.show_progress:
        monitor.bar.write(f"step {trainer.step_count}: round done, {path} draws in {steps} call(s) "
                          f"(preview {path / 'preview.png'})")
    if quality is not None:
        _score_student(trainer, student, sampling, quality, steps, monitor)
    return path


def _round_evaluation(trainer, run: Path, eval_n: int | None) -> PeriodicEvaluation | None:
    """The evaluation of each round's student, prepared once for all rounds on the teacher run's own evaluator
    (real images, classifier; cached in RUN/eval/cache, so trained once for both): `eval_n` images, or by default
    the teacher run's own --eval-n when it evaluated while training (the quickstart does); None for none."""
    if eval_n is None:
        try:
            runtime = _run_config(run).runtime
            eval_n = runtime.eval_n if runtime.eval_every else 0
        except ConfigError:  # a model folder outside a run: nothing says how it was evaluated
            eval_n = 0
    if not eval_n or not trainer.ctx.is_main:
        return None
    config = dataclasses.replace(trainer.config, runtime=dataclasses.replace(trainer.config.runtime, eval_n=eval_n))
    return PeriodicEvaluation(config, run_folder(run), trainer.info.channels, trainer.device)


def _score_student(trainer, student, sampling: SamplingConfig, quality: PeriodicEvaluation, steps: int,
                   monitor) -> None:
    """The training log's quality evaluation at a round's end: `ddpm eval`'s scores of the new student as it draws
    by default (its K calls at its default weight) into eval/steps_K/*, beside the real floor."""
    start = time.perf_counter()
    scores, floor = quality.score(student, trainer.schedule, sampling=sampling), quality.floor()
    for name, value in {**scores, "seconds": time.perf_counter() - start}.items():
        monitor.writer.add_scalar(f"eval/steps_{steps}/{name}", value, trainer.step_count)
    if monitor.show_progress:
        shown = ", ".join(f"{name} {value:.4g} (real {floor[name]:.4g})" for name, value in scores.items()
                          if name in floor and name in ("fid", "classifier_fd", "accuracy"))
        monitor.bar.write(f"step {trainer.step_count}: eval of {steps}-call student: {shown}")
