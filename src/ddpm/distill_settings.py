"""The settings of a distillation (distill.py runs it): the defaults each measured in benchmarks/RESULTS.md,
"Distillation", the one-line checks of every option, and DistillSettings, what RUN/distilled/distill.json records
(older records read as they ran: upgrade_record).
"""
from __future__ import annotations

import dataclasses
import itertools
import warnings
from dataclasses import dataclass

import torch

from .config import ConfigError, SamplingConfig, sampling_defaults
from .devices import emulated_precision, native_bf16
from .distill_target import TEACHER_SOLVERS, check_teacher_solver
from .errors import DdpmError, DdpmWarning
from .samplers import STUDENT_SPACINGS, student_timesteps
from .students import Student

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
# how many of its teacher's DDIM steps one student step learns in the rounds after the second: 2, those of the previous
# round's student (the paper's), or 4, those of the student two rounds back (its grid holds the new one at every fourth
# point). Round 2 keeps 2 (two rounds back is the guided model, a worse teacher for it: stop 49). With 4 the 2-call
# student came out 0.05x and 0.07x of the floor nearer the digits with two training seeds, for 0.03 s more a step
# (benchmarks/RESULTS.md, "Distillation", stop 51)
TEACHER_SPANS = (2, 4)
TEACHER_SPAN = 4


# -- the options -------------------------------------------------------------------------------------------------
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


def check_teacher_span(span: int) -> None:
    if span not in TEACHER_SPANS:
        raise ConfigError(f"--teacher-span {span}: 2 (the previous round's student) or 4 (the student two rounds "
                          "back)")


def check_teacher_precision(precision: str) -> None:
    _check_choice("--teacher-precision", precision, TEACHER_PRECISIONS)


def resolve_teacher_precision(precision: str, device: torch.device) -> str:
    """"bf16" or "fp32" for `precision` on `device`: auto is bf16 on CUDA and on a CPU that lists AVX512-BF16 or AMX
    (Linux's /proc/cpuinfo; elsewhere fp32), where bf16 runs natively; elsewhere it is emulated and slower."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def warn_if_emulated(precision: str, device: torch.device) -> None:
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
    teacher_span: int = 2  # the teacher's steps a student step learns in the rounds after the second (TEACHER_SPANS)

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
        check_teacher_span(self.teacher_span)
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

    def span(self, number: int) -> int:
        """How many teacher steps round `number` (0 first) teaches a student step: 2 in the first two rounds (the
        guided model's, then the first student's), teacher_span after them; its teacher is the student
        log2(span) rounds back."""
        return 2 if number < 2 else self.teacher_span

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
        span = self.span(self.rounds.index(steps))
        return Student(steps, span * steps, self.weight, self.weight_range, self.default_weight, fixed,
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
    saved.setdefault("teacher_span", 2)  # written before later rounds had a choice: the previous student's 2 steps
    return saved


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
