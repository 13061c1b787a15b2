"""Issue 35's measurement: the students of `ddpm distill RUN` (RUN/distilled/steps_K) against their teacher, scored
by the project's own evaluation (classifier FD as a multiple of the real floor's, class accuracy, saturation) on
500 samples, two seeds, beside the teacher's default (`ddpm sample RUN`) and DPM-Solver++ with the teacher at the
same number of calls.

    python benchmarks/distill_measure.py [RUN] [--n 500] [--seeds 0 1] [--weight 2.6]

Prints a Markdown table (means over the seeds; images/s = the sampling and scoring of the row's images, on this
machine, "(cached)" for a row read back from an earlier run's images); the rows land in RUN/distilled/eval/
and RUN/eval/. Run `ddpm distill RUN --steps 1 --start-steps 16`
first (benchmarks/RESULTS.md, "Distillation").
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from ddpm.config import SamplingConfig
from ddpm.evaluation import prepare_evaluator, sweep
from ddpm.sources import open_model


def rows_of(model, schedule, settings, evaluator, eval_dir: Path, args, guide=None, guide_id=None) -> list[list[dict]]:
    """One list of rows per seed."""
    per_seed = []
    for seed in args.seeds:
        record = sweep(model, schedule, evaluator, settings, eval_dir, n=args.n, seed=seed, record={"rows": []},
                       guide=guide, guide_id=guide_id)
        per_seed.append(record["rows"])
    return per_seed


def mean_fd(per_seed: list[dict]) -> float:
    return statistics.mean(row["classifier_fd"] for row in per_seed)


def table_row(name: str, per_seed: list[dict], floor: dict, n: int) -> str:
    def mean(key):
        return statistics.mean(row[key] for row in per_seed)

    # a row read back from the sample cache timed only its scoring: no images/s to give
    fresh = all(row.get("generated_now", n) >= n for row in per_seed)
    speed = f"{n / mean('seconds'):.0f}" if fresh else "(cached)"
    return (f"| {name} | {per_seed[0]['model_calls']} | {mean('accuracy'):.3f} | "
            f"{mean('classifier_fd') / floor['classifier_fd']:.2f}x | {mean('saturated'):.4f} | {speed} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", default="runs/quickstart")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--weight", type=float, default=2.6, help="the students' g (the teacher's default)")
    parser.add_argument("--students", help="the distillation's folder (default RUN/distilled)")
    parser.add_argument("--no-teacher", action="store_true", help="the students' rows only")
    args = parser.parse_args()
    run = Path(args.run)
    teacher = open_model(run, "cpu")
    c = teacher.model.config
    evaluator = prepare_evaluator("mnist", c.image_size, c.in_channels, c.num_classes, run / "eval" / "cache",
                                  n=args.n, fid=False, classifier_steps=800)
    floor = evaluator.floor()
    lines = [f"real floor: class accuracy {floor['accuracy']:.3f}, classifier FD {floor['classifier_fd']:.3f}", "",
             "| sampling | calls | class acc | classifier FD (x floor) | saturated | images/s |",
             "|---|---|---|---|---|---|"]
    autoguided = dict(guidance=1.0, guide_weight=args.weight, guidance_interval=(0.05, 1.0))
    teacher_rows = [("teacher default: DPM++ 20 steps, autoguided", SamplingConfig(steps=20, **autoguided))]
    teacher_rows += [(f"teacher DPM++ {k} steps, autoguided", SamplingConfig(steps=k, **autoguided)) for k in (4, 2, 1)]
    teacher_rows += [("teacher DPM++ 1 step, unguided", SamplingConfig(steps=1, guidance=1.0, guide_weight=1.0))]
    if not args.no_teacher:
        per_seed = rows_of(teacher.model, teacher.schedule, [s for _, s in teacher_rows], evaluator,
                           run / "eval" / "distill_teacher", args, guide=teacher.guide, guide_id="runguide")
        for i, (name, _) in enumerate(teacher_rows):
            lines.append(table_row(name, [rows[i] for rows in per_seed], floor, args.n))
        default_fd = mean_fd([rows[0] for rows in per_seed])
    ratios = []  # the budgets are multiples of the teacher default's distance, to the fourth decimal
    students = Path(args.students) if args.students else run / "distilled"
    for folder in sorted(students.glob("steps_*"), key=lambda p: -int(p.name.split("_")[1])):
        student = open_model(folder, "cpu")
        sampling = student.student.sampling(SamplingConfig(), {"guide_weight": args.weight})
        per_seed = rows_of(student.model, student.schedule, [sampling], evaluator, folder / "eval", args)
        lines.append(table_row(f"student {folder.name} (g={args.weight:g})", [rows[0] for rows in per_seed], floor,
                               args.n))
        ratios.append(f"{folder.name} {mean_fd([rows[0] for rows in per_seed]) / default_fd:.4f}"
                      if not args.no_teacher else "")
    if not args.no_teacher:
        lines += ["", "classifier FD / the teacher default's: " + ", ".join(ratios)]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
