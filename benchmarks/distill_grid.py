"""README's picture of distillation: one row per way of drawing, from the same noise and labels (digits 0-9): the
teacher's default (`ddpm sample RUN`, 39 calls), then the students of RUN/distilled at 4, 2 and 1 calls (g 2.6).

    python benchmarks/distill_grid.py [RUN] [--out docs/distilled_grid.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ddpm.config import SamplingConfig, sampling_defaults
from ddpm.files import save_grid
from ddpm.pipeline import sample
from ddpm.sources import open_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", default="runs/quickstart")
    parser.add_argument("--out", default="docs/distilled_grid.png")
    args = parser.parse_args()
    run = Path(args.run)
    teacher = open_model(run, "cpu")
    c = teacher.model.config
    labels = torch.arange(10)
    x_T = torch.randn(10, c.in_channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(3))
    rows = [sample(teacher.model, teacher.schedule, labels=labels, x_T=x_T, guide=teacher.guide,
                   sampling=SamplingConfig(steps=20, **sampling_defaults(True)))]
    for steps in (4, 2, 1):
        student = open_model(run / "distilled" / f"steps_{steps}", "cpu")
        rows.append(sample(student.model, student.schedule, labels=labels, x_T=x_T,
                           sampling=student.student.sampling(SamplingConfig(), {})))
    print(save_grid(torch.cat(rows), Path(args.out), nrow=10, upscale=4))


if __name__ == "__main__":
    main()
