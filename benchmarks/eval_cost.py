"""What `ddpm train --eval-every N` costs: one training step against one periodic evaluation (K images drawn with
`ddpm sample`'s default guidance at S DPM-Solver++ steps, then scored by `ddpm eval`'s library), for the quickstart
and the seed's 64x64 model, and the share of the training time each --eval-every takes.

    python benchmarks/eval_cost.py [--rounds 3]

Timings do not depend on the weights, so both models are untrained. The quickstart's evaluation is timed whole
(classifier metrics). The 64x64 model stands for the seed's landscape run, unlabelled, so FID is its metric; its
evaluation is timed as one batch of 64 images sampled and one batch through Inception-v3 (clean-fid's resize
included), times K/64: preparing its 1,000 reference features once per run (about 0.3 s an image on this CPU) is
left out.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ddpm.config import RunConfig
from ddpm.periodic_eval import PeriodicEvaluation
from ddpm.presets import PRESETS
from ddpm.run_setup import prepare
from ddpm.training import Trainer

CASES = {
    # the quickstart preset as `make demo` runs it, its guide in use (2 model calls a step)
    "quickstart": ({**PRESETS["quickstart"]}, "mnist", True),
    # the seed's 64x64 UNet, unconditional, on unlabelled photos: FID
    "landscape64": ({**PRESETS["landscape64"]}, "photos", False),
}


def run_config(preset: dict, data: str, out: Path) -> RunConfig:
    sections = {name: dict(values) for name, values in preset.items()}
    sections.setdefault("train", {})["data"] = data
    runtime = sections.setdefault("runtime", {})
    runtime.update(out_dir=str(out), steps=10, device="cpu", sample_every=0, val_every=0, num_workers=0,
                   eval_every=runtime.get("eval_every") or 250)
    runtime.pop("epochs", None)
    return RunConfig.from_dict(sections)


def timed_evaluation(config, folder: Path, trainer, guided: bool, rounds: int) -> float:
    quality = PeriodicEvaluation(config, folder, trainer.info.channels, trainer.device)
    guide = trainer.ema.model if guided else None  # any network of the same shape times like the guide
    quality.score(trainer.ema.model, trainer.schedule, guide)  # prepares the evaluator (once a run)
    times = []
    for _ in range(max(1, rounds - 1)):
        start = time.perf_counter()
        quality.score(trainer.ema.model, trainer.schedule, guide)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def batch_extrapolation(trainer, n: int, steps: int) -> float:
    """One batch of 64 sampled as the evaluation samples (no guide: an unconditional run without one), and its
    Inception-v3 features, times n / 64."""
    from ddpm.metrics import InceptionFeatures, default_inception_path
    from ddpm.periodic_eval import eval_sampling
    from ddpm.pipeline import sample_all

    start = time.perf_counter()
    images = sample_all(trainer.ema.model, trainer.schedule, n=64, sampling=eval_sampling(steps, False), seed=0,
                        batch_size=64)
    sampled = time.perf_counter() - start
    inception = InceptionFeatures(default_inception_path(), "cpu")
    start = time.perf_counter()
    inception(((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    featured = time.perf_counter() - start
    print(f"  64x64: one batch of 64: sampled in {sampled:.1f} s ({steps} steps), Inception {featured:.1f} s",
          flush=True)
    return (sampled + featured) * n / 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| model | K images, steps | one step | one evaluation | share at --eval-every N |")
    print("|---|---|---|---|---|")
    for name, (preset, data, guided) in CASES.items():
        with tempfile.TemporaryDirectory() as folder:
            config, info = prepare(run_config(preset, data, Path(folder)))
            trainer = Trainer(config, info, torch.device("cpu"))
            x0, labels = next(iter(trainer.data.batches(0, 10)))
            step_times = []
            for _ in range(args.rounds + 1):
                start = time.perf_counter()
                trainer.step(x0, labels)
                step_times.append(time.perf_counter() - start)
            step = statistics.median(step_times[1:])
            r = config.runtime
            if name == "quickstart":
                evaluation = timed_evaluation(config, Path(folder), trainer, guided, args.rounds)
            else:
                evaluation = batch_extrapolation(trainer, r.eval_n, r.eval_steps)
            every = r.eval_every
            share = evaluation / (evaluation + every * step)
            print(f"| {name} | {r.eval_n}, {r.eval_steps} | {step * 1000:.0f} ms | {evaluation:.1f} s | "
                  f"{100 * share:.1f}% at {every}; 10% at {evaluation * 9 / step:.0f} |", flush=True)


if __name__ == "__main__":
    main()
