"""Screening the last round of a distillation alone: re-train the 2-step student from a distillation's 4-step student
(its teacher and its start) with other settings and training seeds, to tell a setting from the round's own noise
(benchmarks/RESULTS.md, "Distillation", stop 45: one round's last weights scored 1.66x-2.02x of the floor over four
training seeds). The objective is distill_target's; the optimizer is a fresh AdamW (the Trainer carries the
previous round's), so compare settings with each other, not with `ddpm distill`'s own students.

    python benchmarks/distill_last_round.py runs/quickstart/distilled OUT --steps 400 --avg-from 0.5 --seed 1
    python benchmarks/distill_measure.py ... / ddpm eval OUT ...

OUT is an ordinary student folder, with the distillation's 2-step student's record.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from ddpm import checkpoint as ckpt
from ddpm.data import mnist
from ddpm.distill import _diffusion, _round_teacher, frozen
from ddpm.distill_settings import DistillSettings, resolve_teacher_precision
from ddpm.distill_target import DistillationObjective
from ddpm.ema import EMA
from ddpm.training import make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("distilled", type=Path, help="a distillation folder holding steps_4 and steps_2 (mnist data)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--final-weight", type=float, default=3.0)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--lr-end", type=float, help="decay the rate linearly to this")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--avg-from", type=float, help="write the uniform average of the weights after this fraction")
    parser.add_argument("--ema", type=float, help="write the exponential average of the weights with this decay")
    args = parser.parse_args()
    settings = DistillSettings.from_record(json.loads((args.distilled / "distill.json").read_text()))
    number = settings.rounds.index(2)
    model, schedule, _ = ckpt.from_pretrained(args.distilled / f"steps_{settings.rounds[number - 1]}", "cpu")
    teacher = _round_teacher(settings, None, (model, schedule))
    student = copy.deepcopy(model).train().requires_grad_(True)
    objective = DistillationObjective(teacher, schedule, 2, settings.weight_range, "ddim", settings.spacing,
                                      args.final_weight,  # the teacher's calls in the precision the distillation used
                                      resolve_teacher_precision(settings.teacher_precision, torch.device("cpu")))
    images, labels = mnist(model.config.image_size, model.config.in_channels).dataset.tensors
    optimizer = make_optimizer(student, args.lr, 0.01)
    generator = torch.Generator().manual_seed(1000 + args.seed)
    # the uniform mean of the weights after steps avg_from * steps + 1 .. steps, or an exponential average
    average = (EMA(student, 0.0, int(args.avg_from * args.steps) + 1, uniform=True) if args.avg_from is not None
               else EMA(model, args.ema) if args.ema is not None else None)
    start = time.perf_counter()
    for step in range(args.steps):
        if args.lr_end is not None:
            for group in optimizer.param_groups:
                group["lr"] = args.lr + (args.lr_end - args.lr) * step / max(1, args.steps - 1)
        index = torch.randint(0, len(images), (args.batch,), generator=generator)
        x0, y = images[index], labels[index]
        per_sample, _ = objective.losses(student, x0, y, objective.draw(tuple(x0.shape), generator,
                                                                       torch.device("cpu")))
        optimizer.zero_grad(set_to_none=True)
        per_sample.mean().backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        if average is not None:
            average.update(student)
        if step % 50 == 0:
            print(step, f"loss {per_sample.mean().item():.4f}", f"{time.perf_counter() - start:.0f}s", flush=True)
    record = json.loads((args.distilled / "steps_2" / "config.json").read_text())
    ckpt.save_pretrained(frozen(average.model if average else student), args.out, _diffusion(record),
                         {k: v for k, v in record.items() if k not in ("model", "diffusion")})
    print("wrote", args.out, f"in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
