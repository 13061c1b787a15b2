"""Autoguidance on the quickstart model: guide snapshot fraction x guide weight x sampler steps, beside today's
classifier-free guidance rows and CFG + autoguidance together, scored by the project's own evaluation.

    python benchmarks/autoguidance_sweep.py [RUN] [--n 500] [--train] [--unconditional]

--train first trains RUN with the quickstart preset (keeping every checkpoint, so that the EMA weights at 1/4,
1/2 and 3/4 of the steps are there to guide with); --unconditional does the same without labels. The guides are
the checkpoints' EMA weights (`checkpoint.load_guide`); the rows land in RUN/eval/autoguidance.json and print as
`ddpm eval`'s table. Resumable: samples already written are reused.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ddpm.checkpoint import from_pretrained, load_guide
from ddpm.cli import main as ddpm
from ddpm.config import SamplingConfig
from ddpm.eval_report import format_table
from ddpm.evaluation import prepare_evaluator, sweep
from ddpm.files import atomic_write_json
from ddpm.metrics import file_sha1

FRACTIONS = (0.25, 0.5, 0.75)


def setting(**fields) -> SamplingConfig:
    """A row with every option spelt out: DPM-Solver++ 20 steps, guidance at every step, no CFG, unless given."""
    return SamplingConfig(**{"sampler": "dpmpp2m", "steps": 20, "guidance": 1.0, "guidance_interval": None, **fields})


def cfg_rows(conditional: bool) -> list[SamplingConfig]:
    if not conditional:
        return [setting()]
    return [setting(), setting(guidance=3.0), setting(guidance=3.0, guidance_interval=(0.4, 1.0)),
            setting(guidance=1.5)]


def guide_rows(fraction: float, conditional: bool) -> list[SamplingConfig]:
    rows = [setting(guide_weight=g) for g in (1.5, 2.0, 2.5, 3.0)]
    if fraction == 0.5:  # around the expected best: steps, sampler, interval, and CFG on top
        rows += [setting(guide_weight=2.0, steps=10), setting(sampler="ddim", steps=50, guide_weight=2.0),
                 setting(guide_weight=2.0, guidance_interval=(0.4, 1.0))]
        if conditional:
            rows += [setting(guide_weight=2.0, guidance=1.5), setting(guide_weight=2.0, guidance=3.0,
                                                                       guidance_interval=(0.4, 1.0))]
    return rows


def train(run: Path, conditional: bool) -> None:
    args = ["train", "--preset", "quickstart", "--out", str(run), "--keep-checkpoints", "20", "--quiet"]
    if not conditional:
        args.append("--no-conditional")
    assert ddpm(args) == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", default="runs/autoguidance")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--ref-n", type=int, default=1000)
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--unconditional", action="store_true")
    parser.add_argument("--fractions", type=float, nargs="+", default=FRACTIONS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    run = Path(args.run)
    if args.train and not (run / "model").is_dir():
        train(run, not args.unconditional)
    model, schedule, config = from_pretrained(run, "cpu")
    conditional = model.config.num_classes is not None
    steps = int(config["step"])
    eval_dir = run / "eval"
    # the digits' classes train the evaluation classifier even for an unconditional model: its samples are then
    # scored in the same features (all but the class accuracy)
    evaluator = prepare_evaluator("mnist", model.config.image_size, model.config.in_channels, 10,
                                  eval_dir / "cache", n=args.n, ref_n=args.ref_n, fid=False, progress=True)
    floor = evaluator.floor()
    record = {"model": str(run), "model_step": steps, "model_sha1": file_sha1(run / "model" / "model.safetensors"),
              "data": "mnist", "n": args.n, "seed": 0, "batch_size": 64,
              "floor": {"n": len(evaluator.real.floor), **floor},
              "classifier": evaluator.real.notes.get("classifier")}
    record = sweep(model, schedule, evaluator, cfg_rows(conditional), eval_dir, n=args.n, record=record, progress=True)
    for fraction in args.fractions:
        step = round(fraction * steps)
        guide = load_guide(run / "checkpoints" / f"step_{step:08d}.pt", model, "cpu", schedule=schedule)
        record = sweep(model, schedule, evaluator, guide_rows(fraction, conditional), eval_dir, n=args.n,
                       record=record, progress=True, guide=guide, guide_id=f"step{step}")
    atomic_write_json(eval_dir / "autoguidance.json", record)
    print(format_table(record["rows"], floor))
    print(json.dumps({"floor": floor}, indent=None))


if __name__ == "__main__":
    main()
