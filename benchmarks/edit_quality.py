"""Editing on the quickstart model, scored by the project's own evaluation (issue 26, item 5):

- inpainting: the lower half of 500 held-out real digits redrawn from the top half and the true class, at 10, 20
  and 50 sampler steps; the class accuracy and the classifier Frechet distance of the completed digits (x the real
  floor), against the same digits drawn from scratch with the same labels;
- image-to-image at strength 0.3 / 0.5 / 0.7: how often the evaluation classifier still reads the input's class,
  with the true label and without one (the model's unconditional branch, w = 0, no guide);
- DDIM inversion: the round trip's RMS error (in [-1, 1] units) against the number of steps.

    python benchmarks/edit_quality.py [RUN] [--n 500] [--seed 0]
    python benchmarks/edit_quality.py [RUN] --resample 5 --steps 20    # inpainting with RePaint's resampling only

Sampling otherwise as `ddpm sample` / `ddpm edit` do by default (the run's guide, its measured weights).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from ddpm.checkpoint import find_run_guide, from_pretrained, load_guide
from ddpm.config import SamplingConfig, sampling_defaults
from ddpm.editing import edit_batches, reconstruct
from ddpm.evaluation import prepare_evaluator, saturated_fraction
from ddpm.files import atomic_write_json, to_uint8
from ddpm.images import uint8_to_model_range
from ddpm.pipeline import sample_all


def scored(evaluator, images: torch.Tensor, labels: torch.Tensor, floor: dict) -> dict:
    pixels = to_uint8(images)
    score = evaluator.score(pixels, labels, cache_label=None)
    return {"accuracy": score["accuracy"], "classifier_fd": score["classifier_fd"],
            "fd_x_floor": score["classifier_fd"] / floor["classifier_fd"], "saturated": saturated_fraction(pixels)}


def kept_class(evaluator, images: torch.Tensor, labels: torch.Tensor) -> float:
    from ddpm.classifier import predict

    logits, _ = predict(evaluator.classifier, to_uint8(images))
    return float((logits.argmax(1) == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", default="runs/quickstart")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="default benchmarks/results/edit_quality[_resampleR].json")
    parser.add_argument("--resample", type=int, default=1, help="> 1: only inpainting, resampled R times")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    args = parser.parse_args()
    torch.set_num_threads(2)
    run = Path(args.run)
    model, schedule, _ = from_pretrained(run, "cpu")
    guide_path = find_run_guide(run)
    guide = load_guide(guide_path, model, "cpu", schedule=schedule) if guide_path else None
    base = SamplingConfig(**sampling_defaults(guide is not None))
    evaluator = prepare_evaluator("mnist", model.config.image_size, model.config.in_channels,
                                  model.config.num_classes, run / "eval" / "cache", n=args.n, ref_n=1000, fid=False)
    floor = evaluator.floor()
    real, labels = uint8_to_model_range(evaluator.real.floor), evaluator.real.floor_labels
    results = {"n": len(real), "seed": args.seed, "floor": floor, "sampling": base.__dict__, "guide": str(guide_path),
               "inpaint": {}, "scratch": {}, "img2img": {}, "inversion": {}}
    masks = torch.zeros(len(real), 1, *real.shape[-2:], dtype=torch.bool)
    masks[..., real.shape[-2] // 2:, :] = True  # the lower half is redrawn
    common = dict(guide=guide, seed=args.seed, batch_size=100)
    out = Path(args.out or f"benchmarks/results/edit_quality{'' if args.resample == 1 else f'_resample{args.resample}'}"
                             ".json")
    for steps in args.steps:
        sampling = replace(base, steps=steps)
        start = time.perf_counter()
        done = edit_batches(model, schedule, real, masks=masks, labels=labels, sampling=sampling,
                            resample=args.resample, **common)
        results["inpaint"][steps] = {**scored(evaluator, done, labels, floor), "seconds": time.perf_counter() - start}
        if args.resample > 1:
            print(f"steps {steps}, resample {args.resample}: {results['inpaint'][steps]}", flush=True)
            continue
        drawn = sample_all(model, schedule, labels=labels, sampling=sampling, seed=args.seed, batch_size=100,
                           guide=guide)
        results["scratch"][steps] = scored(evaluator, drawn, labels, floor)
        print(f"steps {steps}: inpaint {results['inpaint'][steps]}, scratch {results['scratch'][steps]}", flush=True)
    if args.resample > 1:
        atomic_write_json(out, results)
        return
    unlabelled = SamplingConfig(guidance=0.0, guidance_interval=None)  # the unconditional branch, no guide
    for strength in (0.3, 0.5, 0.7):
        with_labels = edit_batches(model, schedule, real, strength=strength, labels=labels, sampling=base, **common)
        without = edit_batches(model, schedule, real, strength=strength, labels=torch.zeros_like(labels),
                               sampling=unlabelled, seed=args.seed, batch_size=100)
        results["img2img"][strength] = {"class kept, with the label": kept_class(evaluator, with_labels, labels),
                                        "class kept, without a label": kept_class(evaluator, without, labels)}
        print(f"strength {strength}: {results['img2img'][strength]}", flush=True)
    conditional = SamplingConfig(guidance=1.0, guidance_interval=None)
    for steps in (10, 20, 50, 100, 200):
        back = reconstruct(model, schedule, real[:100], labels=labels[:100], sampling=replace(conditional, steps=steps))
        rms = math.sqrt(float((back - real[:100]).pow(2).mean()))
        results["inversion"][steps] = rms
        print(f"inversion {steps} steps: round-trip RMS {rms:.4f}", flush=True)
    atomic_write_json(out, results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
