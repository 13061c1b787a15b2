"""What post-hoc EMA tracking costs a training step, and what its snapshots cost on disk.

    python benchmarks/phema_cost.py [--rounds 5] [--steps 10]

The quickstart and the seed's 64x64 UNet (landscape64 on the bundled photos) are trained on the CPU with and
without the two tracks, in alternating rounds of `--steps` steps (the machine is noisy: the rounds interleave and
the ratio uses each configuration's median). Disk: the snapshots one run keeps (2 tracks x SNAPSHOTS_PER_RUN, as
float16), whatever its length.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch

from ddpm.cli import build_parser, train_config_from_args
from ddpm.run_setup import prepare
from ddpm.snapshots import SNAPSHOT_DTYPE, SNAPSHOTS_PER_RUN
from ddpm.training import Trainer

CONFIGS = {"quickstart": ["--preset", "quickstart"], "landscape64": ["photos", "--preset", "landscape64"]}


def trainer_for(argv: list[str], lengths: tuple[float, ...], out: str) -> Trainer:
    config = train_config_from_args(build_parser().parse_args(["train", *argv, "--out", out, "--device", "cpu"]))
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, ema_lengths=lengths))
    config, info = prepare(config)
    return Trainer(config, info, torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="ddpm-phema-cost-")
    print("| configuration | step without tracks | step with 2 tracks | ratio | snapshots on disk per run |")
    print("|---|---|---|---|---|")
    for name, argv in CONFIGS.items():
        trainers = {lengths: trainer_for(argv, lengths, f"{folder}/{name}") for lengths in ((), (0.05, 0.10))}
        batches = {lengths: trainer.data.batches(0, 10**6) for lengths, trainer in trainers.items()}
        times: dict[tuple, list[float]] = {lengths: [] for lengths in trainers}
        for lengths, trainer in trainers.items():
            trainer.step(*next(batches[lengths]))  # the first step allocates
        for round_ in range(args.rounds):
            order = list(trainers.items())
            for lengths, trainer in order if round_ % 2 else order[::-1]:  # neither always goes first
                start = time.perf_counter()
                for _ in range(args.steps):
                    trainer.step(*next(batches[lengths]))
                times[lengths].append((time.perf_counter() - start) / args.steps)
        plain, tracked = (statistics.median(times[k]) for k in ((), (0.05, 0.10)))
        params = sum(p.numel() for p in trainers[()].model.parameters())
        disk = 2 * SNAPSHOTS_PER_RUN * params * torch.finfo(SNAPSHOT_DTYPE).bits / 8
        print(f"| {name} ({params / 1e6:.2f}M parameters) | {plain * 1000:.0f} ms | {tracked * 1000:.0f} ms | "
              f"{tracked / plain:.3f} | {disk / 1e6:.0f} MB |", flush=True)


if __name__ == "__main__":
    main()
