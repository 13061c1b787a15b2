"""Issue 34, item 2: what it would cost the training log to score what `ddpm sample RUN` draws at that step (the
post-hoc default, rebuilt from the snapshots so far, guided by its rebuilt guide) instead of RUN/model (the classic
EMA, guided by RUN/guide), as it does.

    python benchmarks/posthoc_log_cost.py [--run runs/quickstart] [--rounds 3]

Part 1, the quickstart run of `make demo` at its last step: one periodic evaluation as the log does it (K images,
scored by `ddpm eval`'s library) against the two rebuilds the post-hoc default needs first (plan, read the
snapshots, sum them in float64, load into a UNet). Medians of `rounds`, interleaved, after one warm-up of each.

Part 2, the seed's 64x64 UNet: the rebuild's cost grows with the snapshots' size, so one rebuild over 8 snapshots
of the untrained 64x64 UNet is timed and scaled to the number of snapshots the quickstart's default reads.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ddpm import checkpoint as ckpt
from ddpm.config import ModelConfig, RunConfig, from_dict
from ddpm.periodic_eval import PeriodicEvaluation
from ddpm.presets import PRESETS
from ddpm.snapshots import Rebuild, list_snapshots, rebuild_state_dict, write_snapshot
from ddpm.sources import load_guide, plan_posthoc
from ddpm.unet import UNet


def rebuild_default(run: Path, template: torch.nn.Module) -> tuple[int, int]:
    """The post-hoc default's two averages rebuilt in memory, as the log would need them; the snapshot counts."""
    plan = plan_posthoc(run)
    for rebuild in (plan.main, plan.guide):
        template.load_state_dict(rebuild_state_dict(rebuild))
    return (sum(int(x != 0) for x in plan.main.coefficients), sum(int(x != 0) for x in plan.guide.coefficients))


def timed(function, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)

    config = RunConfig.from_dict(json.loads((args.run / "config.json").read_text()))
    model, schedule, _ = ckpt.from_pretrained(args.run / ckpt.MODEL_DIR)
    guide = load_guide(args.run, model, schedule=schedule)
    quality = PeriodicEvaluation(config, args.run, model.config.in_channels, torch.device("cpu"))
    template = UNet(model.config)

    def evaluation():
        quality.score(model, schedule, guide)

    evaluation()  # prepares the evaluator (once a run) and warms the file cache
    counts = rebuild_default(args.run, template)
    evaluations, rebuilds = [], []
    for _ in range(args.rounds):  # interleaved: the machine's noise falls on both alike
        evaluations += timed(evaluation, 1)
        rebuilds += timed(lambda: rebuild_default(args.run, template), 1)
    e, r = statistics.median(evaluations), statistics.median(rebuilds)
    snapshots = list_snapshots(args.run)
    size = snapshots[0].path.stat().st_size / 2**20
    print(f"quickstart ({args.run}, {len(snapshots)} snapshots of {size:.1f} MiB): one evaluation "
          f"({config.runtime.eval_n} images, {config.runtime.eval_steps} steps) {e:.2f} s; the post-hoc default's "
          f"two rebuilds (reading {counts[0]} + {counts[1]} snapshots) {r:.2f} s: +{r / e:.0%} per evaluation")

    seed = UNet(from_dict(ModelConfig, {**PRESETS["landscape64"]["model"], "num_classes": None}))
    with tempfile.TemporaryDirectory() as folder:
        paths = [write_snapshot(Path(folder), seed, 0.05, step) for step in range(1, 9)]
        found = list_snapshots(Path(folder))
        plan = Rebuild(0.05, 8, found, np.full(len(found), 1 / len(found)), 0.0)
        rebuild_state_dict(plan)  # warms the file cache
        per = statistics.median(timed(lambda: rebuild_state_dict(plan), args.rounds)) / len(found)
        big = paths[0].stat().st_size / 2**20
    print(f"the seed's 64x64 UNet ({sum(p.numel() for p in seed.parameters()) / 1e6:.1f} M parameters, snapshots "
          f"of {big:.0f} MiB): {per:.2f} s a snapshot read and summed, so the default's two rebuilds "
          f"({sum(counts)} snapshots) about {per * sum(counts):.0f} s per evaluation")


if __name__ == "__main__":
    main()
