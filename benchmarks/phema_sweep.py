"""Post-hoc EMA on a trained run: the main model's averaging length x the guide's (rebuilt at half the run, or the
run's own guide/ snapshot of the classic EMA) x the guide weight g, scored by the project's own evaluation beside
today's default (the classic EMA guided by its half-way snapshot at g = 2.5).

    python benchmarks/phema_sweep.py [RUN] [--n 500] [--seed 0] [--steps 20] [--lengths 0.05 0.08 0.10 0.13]
        [--guide-lengths 0.05 0.10] [--guide-fractions 0.5] [--weights 2.5 3.0] [--guidance 1.0]
        [--intervals none 0.2,1] [--no-own-guide] [--no-classic] [--tag NAME]

RUN must have been trained with post-hoc EMA tracking (the default since it exists; `make demo` makes one); it is
scored against its own training data (class accuracy only for a class-conditional run). Guides are rebuilt at each
--guide-fractions of the run with each --guide-lengths; --no-own-guide leaves the run's own guide/ out of the
post-hoc rows. The rows land in RUN/eval/phema_seedS[_TAG].json and print as a Markdown table; samples are reused
when run again.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ddpm.checkpoint import from_pretrained, load_guide
from ddpm.config import SamplingConfig
from ddpm.evaluation import prepare_evaluator, sweep
from ddpm.files import atomic_write_json
from ddpm.metrics import file_sha1
from ddpm.snapshots import rebuilt_model_dir, step_at_fraction


def row_settings(args) -> list[SamplingConfig]:
    """DPM-Solver++ at each g x CFG w x guidance interval; by default autoguidance alone (w = 1), every step."""
    intervals = [None if text == "none" else tuple(float(v) for v in text.split(",")) for text in args.intervals]
    return [SamplingConfig(sampler="dpmpp2m", steps=args.steps, guidance=w, guidance_interval=interval,
                           guide_weight=g)
            for g in args.weights for w in args.guidance for interval in intervals]


def score(folder: Path, guides: dict, evaluator, args, eval_dir: Path) -> list[dict]:
    """The rows of one main model (a model folder) with each guide."""
    model, schedule, _ = from_pretrained(folder, "cpu")
    record = {"model_sha1": file_sha1(folder / "model.safetensors"), "rows": []}
    for name, guide_folder in guides.items():
        guide = load_guide(guide_folder, model, "cpu", schedule=schedule)
        record = sweep(model, schedule, evaluator, row_settings(args), eval_dir,
                       n=args.n, seed=args.seed, record=record, guide=guide, guide_id=name, progress=False)
    return record["rows"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", default="runs/quickstart")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lengths", type=float, nargs="+", default=[0.05, 0.08, 0.10, 0.13])
    parser.add_argument("--guide-lengths", type=float, nargs="+", default=[0.05, 0.10])
    parser.add_argument("--guide-fractions", type=float, nargs="+", default=[0.5])
    parser.add_argument("--weights", type=float, nargs="+", default=[2.5, 3.0])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0], help="CFG w beside autoguidance")
    parser.add_argument("--intervals", nargs="+", default=["none"], help="guidance intervals: none or LO,HI")
    parser.add_argument("--no-own-guide", action="store_true")
    parser.add_argument("--no-classic", action="store_true", help="leave out the classic EMA's rows")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    torch.set_num_threads(2)
    run = Path(args.run)
    eval_dir = run / "eval"
    model, _, _ = from_pretrained(run, "cpu")
    data = json.loads((run / "config.json").read_text())["train"]["data"]  # the run's own training data
    evaluator = prepare_evaluator(data, model.config.image_size, model.config.in_channels, model.config.num_classes,
                                  eval_dir / "cache", n=args.n, ref_n=1000, fid=False, progress=True)
    floor = evaluator.floor()
    guide_steps = [step_at_fraction(run, f) for f in args.guide_fractions]
    rebuilt_guides = {f"phema{s:g}@{step}": rebuilt_model_dir(run, s, step)
                      for step in guide_steps for s in args.guide_lengths}
    own_guide = {"guide/ (classic EMA, half-way)": run / "guide"} if (run / "guide").is_dir() else {}
    rows = [] if args.no_classic else [
        {"main": "classic EMA (model/)", **row}
        for row in score(run / "model", own_guide or rebuilt_guides, evaluator, args, eval_dir)]
    for length in args.lengths:
        guides = {**({} if args.no_own_guide else own_guide), **rebuilt_guides}
        rows += [{"main": f"post-hoc {length:g}", **row}
                 for row in score(rebuilt_model_dir(run, length), guides, evaluator, args, eval_dir)]
        print(f"length {length:g} done", flush=True)
    tag = f"_{args.tag}" if args.tag else ""
    atomic_write_json(eval_dir / f"phema_seed{args.seed}{tag}.json", {"floor": floor, "rows": rows, "n": args.n,
                                                                 "seed": args.seed,
                                                                      "steps": args.steps})
    fd_floor = floor["classifier_fd"]
    acc = floor.get("accuracy")
    print(f"\nreal floor: class acc {acc if acc is None else round(acc, 3)}, classifier FD {fd_floor:.3f}, "
          f"saturated {floor['saturated']:.4f} (n={args.n}, seed {args.seed}, {args.steps} steps)\n")
    print("| main model | guide | g | w | interval | class acc | classifier FD (x floor) | saturated |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        interval = row["settings"]["guidance_interval"]
        print(f"| {row['main']} | {row['guide']} | {row['guide_weight']:g} | {row['settings']['guidance']:g} | "
              f"{'-' if interval is None else '%g-%g' % tuple(interval)} | {row.get('accuracy', float('nan')):.3f} | "
              f"{row['classifier_fd']:.3f} ({row['classifier_fd'] / fd_floor:.2f}x) | {row['saturated']:.4f} |")
    print(json.dumps({"floor": floor}))


if __name__ == "__main__":
    main()
