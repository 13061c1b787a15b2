"""`ddpm distill RUN`: students that draw in 4, 2 or 1 calls what RUN draws in about 39 (distill.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import DdpmError
from . import common


def add_distill_parser(sub) -> None:
    from ..distill_settings import LEARNING_RATE, STUDENT_AMPS, WEIGHT_RANGES

    d = sub.add_parser("distill", formatter_class=common.HelpFormatter,
                       help="distil a run into a student that draws in 1, 2 or 4 calls (progressive distillation)",
                       description="Guided progressive distillation (Salimans & Ho 2022; Meng et al. 2023): each round "
                                   "trains a student to take in one DDIM step what its teacher takes in two (in the "
                                   "rounds after the second four, of the student two rounds back), with the "
                                   "guidance weight as its input, and writes RUN/distilled/steps_K. The teacher is "
                                   "what ddpm sample draws with the same source flags; with --guide none the student "
                                   "learns classifier-free guidance's w, with a guide the guide weight g.")
    a = d.add_argument
    a("model", type=common.folder_path,
      help="the teacher: a run folder (drawn as ddpm sample draws it) or its model folder")
    _add_round_flags(a)
    a("--weight-range", type=float, nargs=2, metavar=("LO", "HI"), help="the guidance weights the student learns "
      f"(default: g {WEIGHT_RANGES['guide_weight'][0]:g}-{WEIGHT_RANGES['guide_weight'][1]:g} with a guide, w "
      f"{WEIGHT_RANGES['guidance'][0]:g}-{WEIGHT_RANGES['guidance'][1]:g} without)")
    a("--guidance", type=float, help="classifier-free guidance w: the teacher's when the student learns g, else the "
      "student's default; 0 = unconditional, 1 = conditional (default: ddpm sample's)")
    a("--guide-weight", type=float, metavar="G", help="autoguidance g: the student's default; 0 = the guide's "
      "prediction alone, 1 = off (default: ddpm sample's)")
    common.add_source_flags(d)  # the teacher, chosen as ddpm sample chooses it
    a("--data", help="the images to distil on (default: the run's training data)")
    common.add_batch_size_flag(a, "images per step (default: the run's)", None)
    a("--lr", type=float, default=LEARNING_RATE, help="AdamW learning rate of every round (measured: "
      "benchmarks/RESULTS.md, \"Distillation\")")
    common.add_out_flag(a, "the distillation's folder (default RUN/distilled)", required=False)
    common.add_seed_flag(a)
    a("--resume", action="store_true", help="continue the distillation in its folder from its latest checkpoint")
    a("--resume-if-exists", action="store_true", help="continue it when the folder holds this same distillation, "
      "else start it (for restarted jobs)")
    a("--time-limit", type=common.duration, metavar="DURATION",
      help="stop at a checkpoint before this much time (exit 75)")
    a("--checkpoint-every", type=int, help="checkpoint every N steps (default: at each round's end)")
    a("--eval-n", type=int, metavar="N", help="at each round's end, score N images of the new student as ddpm eval "
      "does, into the log; 0 = never (default: the teacher run's --eval-n when it evaluated while training)")
    common.add_device_flag(a)
    a("--amp", choices=STUDENT_AMPS, default="auto", help="mixed precision of the student's training step; auto = "
      "bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), else as ddpm train (measured: "
      "benchmarks/RESULTS.md, \"Distillation\")")
    common.add_quiet_flag(a)


def _add_round_flags(a) -> None:
    """The flags of the rounds: how many, how long, their teacher's solver, grids, draw and average."""
    from ..distill_settings import (
        FINAL_STEP_WEIGHT,
        FIRST_ROUND_STEPS,
        ROUND_STEPS,
        START_STEPS,
        STUDENT_AVERAGE,
        TEACHER_PRECISIONS,
        TEACHER_SPAN,
        TEACHER_SPANS,
    )
    from ..distill_target import TEACHER_SOLVERS
    from ..samplers import STUDENT_SPACINGS

    a("--steps", type=int, default=2, help="the last student's calls per image: 1, 2 or 4")
    a("--start-steps", type=int, default=START_STEPS, help="the first teacher's steps; each round halves them")
    a("--round-steps", type=_round_steps, metavar="N[,N...]", help="optimizer steps per round: one number for "
      f"every round, or one per round (e.g. 300,200,100 for 16 -> 2 steps) (default: {FIRST_ROUND_STEPS} for round 1, "
      f"which learns from the guided model, {ROUND_STEPS} for each later one)")
    a("--teacher-solver", choices=TEACHER_SOLVERS, default=TEACHER_SOLVERS[0], help="how round 1's teacher makes "
      "the target: each of its two steps by DPM-Solver++(2S) (4 calls, the nearest targets, measured), one 2S step "
      "across both (DDIM's 2 calls, faster), or two DDIM steps")
    a("--spacing", choices=("auto", *STUDENT_SPACINGS), default="auto", help="the students' grids: uniform in t "
      "(trailing) or in log-SNR (whose 2-step middle point is t = 0.3 T instead of 0.5 T); auto = logsnr, or "
      "trailing where the schedule has too few timesteps for it (measured: benchmarks/RESULTS.md, \"Distillation\")")
    a("--final-weight", type=float, default=FINAL_STEP_WEIGHT, metavar="W", help="how many times as often the "
      "2-step student trains its step to the image as its first; 1 = alike, the paper's (other students: alike) "
      "(measured: benchmarks/RESULTS.md, \"Distillation\")")
    a("--student-average", type=_averages, default=STUDENT_AVERAGE, metavar="A[,A...]", help="what each round "
      "writes of its student, the next round's start: half = the mean of its weights over the round's second half, "
      "last = its last weights (the paper's), or a decay D = their exponential average (0 = last); one for every "
      "round or one "
      "per round (e.g. last,last,half) (default: half; measured: benchmarks/RESULTS.md, \"Distillation\")")
    a("--teacher-span", type=int, choices=TEACHER_SPANS, default=TEACHER_SPAN, help="in the rounds after the "
      "second, how many DDIM steps of its teacher one student step learns: 4 of the student two rounds back (twice "
      "the calls of 2, nearer the digits: benchmarks/RESULTS.md, \"Distillation\") or 2 of the previous round's "
      "student (the paper's)")
    a("--teacher-precision", choices=TEACHER_PRECISIONS, default="auto", help="the teacher's calls (targets, no "
      "gradient) in bf16 or fp32; auto = bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), else fp32")


def _per_round(kind, what: str, example: str):
    """An argparse type: one number of `kind` for every round, or a comma-separated list of one per round."""
    def parse(text: str):
        try:
            numbers = [kind(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} or a comma-separated list of them (e.g. "
                                             f"{example})") from None
        return numbers[0] if len(numbers) == 1 else numbers

    return parse


_round_steps = _per_round(int, "a number of steps", "200 or 100,200,400")


def _average(text: str):
    """half, last, or a decay (0 is the last weights)."""
    from ..distill_settings import STUDENT_AVERAGES

    if text in STUDENT_AVERAGES:
        return text
    return float(text) or "last"


_averages = _per_round(_average, "half, last or a decay", "half or last,last,0.99")


def cmd_distill(args: argparse.Namespace) -> int:
    from ..distill import distill
    from ..distributed import StopRequest, describe_stop, distributed_context, stop_on_signals

    if args.batch_size is not None and args.batch_size < 1:
        raise DdpmError(f"--batch-size must be >= 1, got {args.batch_size}")
    stop = StopRequest()
    with stop_on_signals(stop):
        result = distill(Path(args.model), steps=args.steps, start_steps=args.start_steps,
                         round_steps=args.round_steps, teacher_solver=args.teacher_solver, spacing=args.spacing,
                         final_weight=args.final_weight, student_average=args.student_average,
                         teacher_precision=args.teacher_precision, teacher_span=args.teacher_span, amp=args.amp,
                         weight_range=args.weight_range, batch_size=args.batch_size,
                         lr=args.lr, data=args.data, out=args.out, device=args.device, seed=args.seed,
                         resume=args.resume, if_exists=args.resume_if_exists, progress=not args.quiet, stop=stop,
                         time_limit=args.time_limit, checkpoint_every=args.checkpoint_every, warn=common.warn_one_line,
                         guidance=args.guidance, guide_weight=args.guide_weight, eval_n=args.eval_n,
                         **common.source_flags(args))
    if not distributed_context().is_main:
        return 0
    if result.stopped:
        print(f"ddpm distill: stopped by {describe_stop(result.stopped)}, checkpoint written; continue with "
              f"`ddpm distill {args.model} --resume` and the same flags", file=sys.stderr, flush=True)
        from .train import EXIT_STOPPED

        return EXIT_STOPPED
    last = result.students[-1]
    print(f"students: {', '.join(str(path) for path in result.students)}")
    print(f"sample it:  ddpm sample {last} --out {last / 'samples'}")
    return 0
