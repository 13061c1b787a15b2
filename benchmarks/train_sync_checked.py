"""`ddpm train ...` with CUDA's sync debug mode set to "error" inside every `Trainer.step`: any host-device
synchronisation in the step (a `.item()`, a `bool(tensor)`, a blocking copy) raises instead of silently
stalling the GPU. With `--cuda-graphs on` the warm-up steps and every replay are checked; the one step that
captures the graph is not (`torch.cuda.graph` synchronises the device before capturing). Logging, validation
and checkpoints run outside the step, where syncs are allowed.

    python benchmarks/train_sync_checked.py train DATA --out RUN ...   (the arguments of `ddpm train`)
"""
from __future__ import annotations

import sys

import torch

from ddpm import training
from ddpm.cli import main

plain_step = training.Trainer.step


def step_without_syncs(self, x0, labels):
    runner = self.runner
    if runner.enabled and not runner.graphed and runner.warmup_left == 0:
        return plain_step(self, x0, labels)  # this step captures the CUDA graph, which synchronises once by design
    torch.cuda.set_sync_debug_mode("error")
    try:
        return plain_step(self, x0, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("train_sync_checked.py: no CUDA GPU here; the check is about host-device syncs")
    training.Trainer.step = step_without_syncs
    sys.exit(main(sys.argv[1:]))
