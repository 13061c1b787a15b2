"""Issue 11's measurement on the quickstart model: samplers x steps x w, and the guidance options, in one evaluator.

    python benchmarks/guidance_sweep.py [RUN] [--n 500] [--ref-n 1000]

The same as a series of `ddpm eval RUN --no-fid ...` commands (the same library calls, the same cached classifier,
real sets and samples under RUN/eval/), gathered into one record: RUN/eval/eval.json, eval.csv and
quality_vs_steps.png. Resumable: samples already written are reused.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ddpm.checkpoint import from_pretrained
from ddpm.config import SamplingConfig
from ddpm.eval_report import format_table, write_sweep_files
from ddpm.evaluation import prepare_evaluator, sweep
from ddpm.metrics import file_sha1


def settings() -> list[SamplingConfig]:
    """The rows, each with every guidance option spelt out (so that a change of the defaults changes no row)."""
    def setting(**fields) -> SamplingConfig:  # guidance at every step unless the row says otherwise
        return SamplingConfig(**{"guidance_interval": None, **fields})

    rows = []
    for w in (1.0, 3.0):  # the budget's two guidance scales: plain conditional and the default
        rows.append(setting(sampler="ddim", steps=100, guidance=w))
        rows += [setting(sampler="dpmpp2m", steps=k, guidance=w) for k in (10, 20)]
    rows.append(setting(sampler="ddim", steps=20, guidance=3.0))  # DDIM at DPM-Solver's budget
    base = dict(sampler="dpmpp2m", steps=20, guidance=3.0)
    rows += [  # the levers against over-saturation, at the default w
        setting(**base, dynamic_threshold=0.995),
        setting(**base, guidance_rescale=0.7),
        setting(**base, guidance_interval=(0.0, 0.5)),
        setting(**base, guidance_interval=(0.2, 0.8)),
        setting(**base, guidance_interval=(0.5, 1.0)),
        setting(**base, guidance_rescale=0.7, dynamic_threshold=0.995),
        setting(**{**base, "guidance": 2.0}),
        setting(**{**base, "guidance": 1.5}),
    ]
    # second round, around the best of the first (guidance at high noise only; lower w)
    rows += [
        setting(**base, guidance_interval=(0.4, 1.0)),
        setting(**base, guidance_interval=(0.3, 1.0)),
        setting(**{**base, "guidance": 4.0}, guidance_interval=(0.5, 1.0)),
        setting(**{**base, "guidance": 2.0}, guidance_interval=(0.3, 1.0)),
        setting(**{**base, "guidance": 2.5}, guidance_interval=(0.5, 1.0)),
        setting(**base, guidance_interval=(0.5, 1.0), guidance_rescale=0.7),
        setting(**{**base, "steps": 10}, guidance_interval=(0.5, 1.0)),
        setting(sampler="ddim", steps=100, guidance=3.0, guidance_interval=(0.5, 1.0)),
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", default="runs/quickstart")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--ref-n", type=int, default=1000)
    parser.add_argument("--only", type=int, nargs="*", help="indices of settings() to run (default all)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    run = Path(args.run)
    model, schedule, config = from_pretrained(run, "cpu")
    eval_dir = run / "eval"
    evaluator = prepare_evaluator("mnist", model.config.image_size, model.config.in_channels, model.config.num_classes,
                                  eval_dir / "cache", n=args.n, ref_n=args.ref_n, fid=False, progress=True)
    floor = evaluator.floor()
    chosen = settings() if args.only is None else [settings()[i] for i in args.only]
    record = {"model": str(run), "model_step": config.get("step"),
              "model_sha1": file_sha1(run / "model" / "model.safetensors"), "data": "mnist", "n": args.n, "seed": 0,
              "batch_size": 64, "floor": {"n": len(evaluator.real.floor), **floor},
              "classifier": evaluator.real.notes.get("classifier")}
    record = sweep(model, schedule, evaluator, chosen, eval_dir, n=args.n, record=record, progress=True)
    write_sweep_files(record, eval_dir)
    print(format_table(record["rows"], floor))
    print(json.dumps({"floor": floor}, indent=1))


if __name__ == "__main__":
    main()
