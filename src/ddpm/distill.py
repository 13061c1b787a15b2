"""Guided progressive distillation: a student that samples in K calls what its guided teacher samples in 2K steps
(Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models", Algorithm 2), with the
guidance weight as an input of the student (Meng et al. 2023, "On Distillation of Guided Diffusion Models"), so one
student draws at any weight of its range with one call a step and no guide. This module runs the rounds through the
Trainer and writes the students; one round's grids, target and loss are distill_target.py's.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import time
import warnings
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
    sampling_defaults,
)
from .devices import configure_for_speed, emulated_precision, native_bf16
from .distill_target import TEACHER_SOLVERS, DistillationObjective, Teacher, check_teacher_solver
from .distributed import StopRequest, distributed_context, setup_device
from .errors import DdpmError, DdpmWarning
from .files import atomic_write_bytes, atomic_write_json, make_grid, png_bytes
from .guidance import make_denoiser
from .periodic_eval import PeriodicEvaluation
from .pipeline import balanced_labels, sample_all
from .run_setup import load_latest_state, prepare
from .samplers import STUDENT_SPACINGS, student_timesteps
from .schedule import NoiseSchedule
from .sources import open_model, run_folder
from .students import Student
from .training import Trainer, closing_run, fit, monitor_for
from .unet import UNet

STUDENT = "student"  # the student's record in its model folder's config.json
SETTINGS = "distill.json"  # the distillation's settings, in its folder beside config.json and the checkpoints
STEP_CHOICES = (1, 2, 4)
# The weight ranges trained by default: autoguidance's g from off (1) to well past its measured 2.6; classifier-free
# guidance's w from the plain conditional model (1) to past the seed's 3.
WEIGHT_RANGES = {"guide_weight": (1.0, 4.0), "guidance": (1.0, 6.0)}
MAX_START_STEPS = 256  # past this a distillation has more rounds than any measured plan, and T = 1000 runs out
START_STEPS = 16  # the first teacher's grid (benchmarks/RESULTS.md, "Distillation")
# optimizer steps a round by default: round 1, which learns from the guided model itself, FIRST_ROUND_STEPS, every
# later round ROUND_STEPS (benchmarks/RESULTS.md, "Distillation": four runs with round 1 at 300 or 400 steps were all
# nearer the digits at 8 and 4 calls than the one at 200, three of them at 2 calls, by less than two seeds of one
# setting differ; 400 gained nothing over 300; the last round gained nothing from 400 and lost little with 100)
FIRST_ROUND_STEPS, ROUND_STEPS = 300, 200
# how many times as often the round that makes the 2-step student draws its step to the image as its first
# (benchmarks/RESULTS.md, "Distillation", stop 44: the 2-step student loses its distance to the digits in that step)
FINAL_STEP_WEIGHT = 3.0
# the student each round writes: "half", the plain mean of its weights over the round's second half; "last", its last
# weights (the paper's); or a decay D, their exponential average. A round's last weights are a noisy draw (round 1
# re-run with two training seeds: 8-call students 1.53x and 2.20x of the floor; round 3 with four: 1.66x-2.02x),
# its second half's mean is not (1.55x and 1.53x; 1.73x-1.77x) (benchmarks/RESULTS.md, "Distillation", stop 46)
STUDENT_AVERAGES = ("half", "last")
STUDENT_AVERAGE = "half"
# AdamW's rate in every round. With the mean as the student, twice the earlier 3e-4 came out nearer at 4 and 2 calls
# with one training seed (0.04x and 0.09x of the floor) and level with the other, at the same cost (with last weights
# 3e-4 had beaten 1e-4 and 1e-3: their noise grows with the rate, and the mean takes it out) (benchmarks/RESULTS.md,
# "Distillation", stop 46)
LEARNING_RATE = 6e-4
# the precision of the teacher's calls (no gradient: they only make targets): "auto" = bf16 where the device computes
# it natively (CUDA, and CPUs with AVX512-BF16 or AMX), else fp32. On this project's CPU a round-1 step takes 0.50 s
# instead of 0.67 s, and its averaged students came out no further (benchmarks/RESULTS.md, "Distillation", stop 46)
TEACHER_PRECISIONS = ("auto", "bf16", "fp32")
# the student's training step (`ddpm train --amp`'s choices): "auto" = bf16 where the device computes it natively, as
# for the teacher's calls, elsewhere what `ddpm train --amp auto` does. On this project's CPU the three rounds to 2
# steps took 241 s instead of 279 s, and their 4- and 2-call students came out as near the digits (1.57x and 1.74x of
# the floor on eight seeds, as the fp32 student's) (benchmarks/RESULTS.md, "Distillation", stop 47)
STUDENT_AMPS = ("auto", "bf16", "fp16", "none")

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


def round_lengths(round_steps: int | list[int] | None, rounds: int) -> list[int]:
    """Optimizer steps of each of `rounds` rounds: `round_steps` for all, or one number per round; None: the
    defaults (FIRST_ROUND_STEPS, then ROUND_STEPS)."""
    if round_steps is None:
        return [FIRST_ROUND_STEPS] + [ROUND_STEPS] * (rounds - 1)
    return list(round_steps) if isinstance(round_steps, (list, tuple)) else [round_steps] * rounds


def check_rounds(steps: int, start_steps: int, round_steps: int | list[int] | None) -> int:
    """The number of rounds that halve `start_steps` down to `steps` (1, 2 or 4); one line unless they can, each
    with >= 1 step."""
    if steps not in STEP_CHOICES:
        raise ConfigError(f"--steps {steps}: a student takes 1, 2 or 4 steps (each round halves the steps from "
                          f"{start_steps})")
    ratio = start_steps // steps
    if start_steps % steps or ratio < 2 or ratio & (ratio - 1):
        raise ConfigError(f"--start-steps {start_steps} must be {steps} times a power of 2 (>= 2), e.g. "
                          f"{max(8, 2 * steps)}")
    rounds = ratio.bit_length() - 1
    lengths = round_lengths(round_steps, rounds)
    if len(lengths) != rounds:
        raise ConfigError(f"--round-steps {','.join(map(str, lengths))}: {start_steps} -> {steps} steps takes {rounds} "
                          f"rounds, so give one number for all or {rounds} numbers")
    if min(lengths) < 1:
        raise ConfigError(f"--round-steps {','.join(map(str, lengths))}: each round needs >= 1 step")
    if start_steps > MAX_START_STEPS:
        raise ConfigError(f"--start-steps {start_steps} is more than {MAX_START_STEPS} teacher steps; a round halves "
                          f"them, so start from 16 or 32")
    return rounds


def check_spacing(spacing: str) -> None:
    if spacing not in STUDENT_SPACINGS:
        raise ConfigError(f"--spacing {spacing}: choose auto or one of {', '.join(STUDENT_SPACINGS)}")


def check_final_weight(weight: float) -> None:
    if not 1 <= weight <= 100:
        raise ConfigError(f"--final-weight {weight:g} must be from 1 (every step drawn alike) to 100")


def round_averages(student_average, rounds: int) -> list:
    """Each round's average ("half", "last" or a decay): `student_average` for all, or one per round."""
    return list(student_average) if isinstance(student_average, (list, tuple)) else [student_average] * rounds


def check_student_average(student_average, rounds: int | None = None) -> None:
    """One line unless each is "half", "last" or a decay in (0, 1) and, given `rounds`, there is one for all or one
    per round."""
    averages = round_averages(student_average, rounds or 1)
    text = ",".join(a if isinstance(a, str) else f"{a:g}" for a in averages)
    if not all(a in STUDENT_AVERAGES if isinstance(a, str) else 0 < a < 1 for a in averages):
        raise ConfigError(f"--student-average {text}: each is half (the mean of the round's second half), last (its "
                          "last weights) or an exponential decay between 0 and 1, e.g. 0.98")
    if rounds is not None and len(averages) != rounds:
        raise ConfigError(f"--student-average {text}: this distillation takes {rounds} rounds, so give one for all "
                          f"or {rounds}")


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{flag} {value}: choose one of {', '.join(choices)}")


def check_teacher_precision(precision: str) -> None:
    _check_choice("--teacher-precision", precision, TEACHER_PRECISIONS)


def resolve_teacher_precision(precision: str, device: torch.device) -> str:
    """"bf16" or "fp32" for `precision` on `device`: auto is bf16 on CUDA and on a CPU that lists AVX512-BF16 or AMX
    (Linux's /proc/cpuinfo; elsewhere fp32), where bf16 runs natively; elsewhere it is emulated and slower."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def _warn_if_emulated(precision: str, device: torch.device) -> None:
    """One warning for an explicit bf16 teacher on a CPU that only emulates it (auto picks fp32 there)."""
    bf16 = resolve_teacher_precision(precision, device) == "bf16"
    slow = emulated_precision(torch.bfloat16 if bf16 else None, device, "--teacher-precision fp32")
    if slow:
        warnings.warn(f"the teacher's calls: {slow}", DdpmWarning, stacklevel=3)


def check_student_amp(amp: str) -> None:
    _check_choice("--amp", amp, STUDENT_AMPS)


def resolve_student_amp(amp: str, device: torch.device) -> str:
    """The student's training step's --amp for `device`: auto is bf16 where native_bf16, else left to the Trainer
    (devices.resolve_amp: bf16 or fp16 on CUDA, none on CPUs without native bf16)."""
    return "bf16" if amp == "auto" and native_bf16(device) else amp


def resolve_spacing(spacing: str, start_steps: int, schedule) -> str:
    """--spacing as the students are trained: "auto" is the log-SNR grid (its 2-call student about 2.0x the real
    floor against the trailing grid's 3.5x; at 8 and 4 calls the grids differ by less than two training seeds do:
    benchmarks/RESULTS.md, "Distillation"), or trailing where a log-SNR grid does not fit the schedule's timesteps
    (samplers.nested_logsnr_timesteps); a grid asked for by name that does not fit is one line."""
    chosen = "logsnr" if spacing == "auto" else spacing
    check_spacing(chosen)
    try:
        student_timesteps(schedule, start_steps, chosen)
    except DdpmError as error:
        if spacing == "auto":
            return "trailing"
        raise ConfigError(f"--spacing {chosen} --start-steps {start_steps}: {error}") from None
    return chosen


# -- the settings of a distillation --------------------------------------------------------------------------------
@dataclass
class DistillSettings:
    """What a distillation computes, saved as RUN/distilled/distill.json: its teacher, its rounds and its weights."""

    teacher: dict  # {"weights": path, "guide": path or None, "sampling": the teacher's SamplingConfig}
    weight: str | None  # "guide_weight", "guidance" or None (an unconditional model without a guide)
    weight_range: tuple[float, float] | None
    default_weight: float | None
    start_steps: int = START_STEPS
    steps: int = 2
    round_steps: int | list[int] | None = None  # for every round, or one number per round; None: the defaults
    teacher_solver: str = TEACHER_SOLVERS[0]  # how round 1's teacher steps (later rounds: DDIM)
    spacing: str = "trailing"  # the students' nested grids (samplers.STUDENT_SPACINGS)
    final_weight: float = 1.0  # the 2-step student's step to the image drawn this many times as often as its first
    # what each round writes of its student ("half", "last" or an exponential decay), for all or one per round
    student_average: str | float | list = "last"
    teacher_precision: str = "fp32"  # of the teacher's calls (TEACHER_PRECISIONS)

    def __post_init__(self) -> None:
        if self.round_steps is None:  # written out, so that distill.json says what ran
            check_rounds(self.steps, self.start_steps, None)
            self.round_steps = round_lengths(None, len(self.rounds))
        if isinstance(self.round_steps, (list, tuple)):
            self.round_steps = [int(n) for n in self.round_steps]
        if self.weight_range is not None:
            self.weight_range = tuple(float(v) for v in self.weight_range)
        check_rounds(self.steps, self.start_steps, self.round_steps)
        check_teacher_solver(self.teacher_solver)
        check_spacing(self.spacing)
        check_final_weight(self.final_weight)
        check_student_average(self.student_average, len(self.rounds))
        check_teacher_precision(self.teacher_precision)
        if self.weight_range is not None:
            lo, hi = self.weight_range
            if not 0 <= lo <= hi <= 100:
                raise ConfigError(f"--weight-range {lo:g} {hi:g} must be two weights 0 <= LO <= HI <= 100")
            if self.default_weight is not None and not lo <= self.default_weight <= hi:
                flag = "--guide-weight" if self.weight == "guide_weight" else "--guidance"
                raise ConfigError(f"{flag} {self.default_weight:g}, the student's default, is outside --weight-range "
                                  f"{lo:g} {hi:g}; widen the range or choose a weight inside it")

    @property
    def rounds(self) -> list[int]:
        """The student's steps after each round: start_steps / 2, / 4, ... down to `steps`."""
        counts, k = [], self.start_steps // 2
        while k >= self.steps:
            counts.append(k)
            k //= 2
        return counts

    @property
    def averages(self) -> list:
        """What each round writes of its student: "half", "last" or an exponential decay."""
        return round_averages(self.student_average, len(self.rounds))

    @classmethod
    def from_record(cls, saved: dict) -> "DistillSettings":
        """The settings of a distill.json, older ones included (upgrade_record)."""
        return cls(**upgrade_record(saved))

    @property
    def round_ends(self) -> list[int]:
        """The optimizer step at which each round ends."""
        return list(itertools.accumulate(round_lengths(self.round_steps, len(self.rounds))))

    @property
    def last_step(self) -> int:
        return self.round_ends[-1]

    def student(self, steps: int, teacher_text: str, data: str) -> dict:
        fixed = {k: v for k, v in self.teacher["sampling"].items() if k in ("guidance", "guide_weight")
                 and k != self.weight}
        return Student(steps, 2 * steps, self.weight, self.weight_range, self.default_weight, fixed,
                       teacher_text, data, self.spacing).to_record()


def upgrade_record(saved: dict) -> dict:
    """A distill.json's settings with what older versions left out written as they ran."""
    saved = dict(saved)
    saved.setdefault("teacher_solver", "ddim")  # written before round 1 had a choice: DDIM
    saved.setdefault("spacing", "trailing")  # written before the grid had a choice: trailing
    saved.setdefault("final_weight", 1.0)  # written before the draw had a choice: uniform
    if "student_ema" in saved:  # stop 45's exponential decays, 0 for the last weights
        decays = saved.pop("student_ema")
        saved["student_average"] = [d or "last" for d in decays] if isinstance(decays, list) else decays or "last"
    saved.setdefault("student_average", "last")  # written before the average had a choice: the last weights
    saved.setdefault("teacher_precision", "fp32")  # written before the teacher's calls had a choice: fp32
    return saved


# -- the command ---------------------------------------------------------------------------------------------------
@dataclass
class DistillResult:
    folder: Path  # RUN/distilled
    students: list[Path]  # the steps_K folders written so far, the last round's last
    stopped: int = 0  # 0: every round done; else why it saved and stopped early (distributed.stop_code)


def student_dir(folder: Path, steps: int) -> Path:
    return Path(folder) / f"steps_{steps}"


def teacher_settings(opened, sampling_overrides: dict, weight_range, start_steps: int):
    """(the teacher's record, the weight name, its range, its default) for a model opened as `ddpm sample` opens it."""
    conditional = opened.model.config.num_classes is not None
    defaults = sampling_defaults(opened.guide is not None)
    defaults.update({k: v for k, v in sampling_overrides.items() if v is not None})
    weight = "guide_weight" if opened.guide is not None else ("guidance" if conditional else None)
    sampling = SamplingConfig(sampler="ddim", steps=start_steps, **defaults)
    default_weight = None if weight is None else getattr(sampling, weight)
    weight_range = None if weight is None else tuple(weight_range or WEIGHT_RANGES[weight])
    record = {"weights": str(opened.sources.weights), "guide": None if opened.guide is None else
              str(opened.sources.guide), "sampling": dataclasses.asdict(sampling)}
    return record, weight, weight_range, default_weight


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
            spacing: str = "auto", final_weight: float = FINAL_STEP_WEIGHT,
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
    its grid included). Training is the Trainer's: checkpoints, resume,
    the graceful stop, --time-limit, torchrun and the log come with it. `eval_n`: images scored at each round's end
    into the log (see _score_student); None = the teacher run's --eval-n when it evaluated while training, else 0."""

    run = Path(run)
    if data is not None and not data.strip():
        raise ConfigError("--data is empty; give an image folder, a CIFAR-10 folder, mnist or photos")
    rounds = check_rounds(steps, start_steps, round_steps)  # before anything is opened (a rebuild writes its cache)
    check_student_average(student_average, rounds)
    check_teacher_precision(teacher_precision)
    check_student_amp(amp)
    _check_options(teacher_solver, spacing, final_weight, eval_n, checkpoint_every)
    opened = open_model(run, device, warn=warn, **source_flags)
    if start_steps > len(opened.schedule):
        raise ConfigError(f"--start-steps {start_steps} is more than the model's {len(opened.schedule)} timesteps")
    spacing = resolve_spacing(spacing, start_steps, opened.schedule)
    _warn_if_emulated(teacher_precision, opened.device)
    record, weight, weights, default_weight = teacher_settings(
        opened, {"guidance": guidance, "guide_weight": guide_weight}, weight_range, start_steps)
    if source_flags.get("raw_weights"):  # --no-ema: the same folder's raw weights are another teacher
        record["raw_weights"] = True
    settings = DistillSettings(record, weight, weights, default_weight, start_steps, steps, round_steps,
                               teacher_solver, spacing, final_weight, student_average, teacher_precision)
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


def _check_options(teacher_solver: str, spacing: str, final_weight: float, eval_n: int | None,
                   checkpoint_every: int | None) -> None:
    """distill()'s flags that need no model, checked before anything is opened."""
    check_teacher_solver(teacher_solver)
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
        previous = None if number == 0 else ckpt.from_pretrained(student_dir(folder, settings.rounds[number - 1]),
                                                                 trainer.device)[:2]
        teacher = _round_teacher(settings, opened, previous)
        if previous is not None and trainer.step_count == settings.round_ends[number - 1]:
            _start_from(trainer, previous[0])
        if trainer.ema is not None:  # rank 0's; resumed mid-round too
            _set_average(trainer.ema, settings, number, trainer.step_count)
        solver = settings.teacher_solver if number == 0 else "ddim"  # a student is exact under DDIM
        trainer.objective = DistillationObjective(
            teacher, trainer.schedule, steps, settings.weight_range, solver, settings.spacing, settings.final_weight,
            resolve_teacher_precision(settings.teacher_precision, trainer.device))
        stopped = fit(trainer, end, monitor, stop)
        if stopped:
            return written, stopped
        if trainer.ctx.is_main:
            written.append(_write_student(trainer, settings, folder, steps, run, monitor, info, quality))
        trainer.ctx.barrier()
    return written, 0


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


def _round_teacher(settings: DistillSettings, opened, previous: tuple | None) -> Teacher:
    """Round 0's teacher (`previous` None) is the guided model; each later round's is the previous round's student,
    `previous` = (its network, its schedule) as read from its folder, frozen."""
    sampling = SamplingConfig(**{**settings.teacher["sampling"], "guidance_interval": _interval(settings)})
    if previous is None:
        return denoiser_teacher(opened.model, opened.schedule, sampling, opened.guide, settings.weight)
    model, schedule = previous
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
