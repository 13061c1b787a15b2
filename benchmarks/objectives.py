"""Issue 14's measurement: eps vs eps + min-SNR 5 vs v vs v + min-SNR 5 on the quickstart data, at equal steps.

    python benchmarks/objectives.py train [--steps 1500] [--every 500]   # four runs, EMA exported at every checkpoint
    python benchmarks/objectives.py eval  [--n 250]                      # score each export, table + plot

Every run is the quickstart preset with only the objective changed. Compared on
  * the held-out validation loss, in one unit for all four: the MSE of the eps each model implies (a v model's
    output is converted with diffusion.eps_from_output), logged by training at every --val-every step;
  * `ddpm eval`'s classifier metrics of the EMA model at the default guidance (w = 3), same sampler for all.
Writes benchmarks/results/objectives.json, objectives.md (the table) and objectives.png (the plot).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ddpm import RunConfig
from ddpm.checkpoint import ema_states
from ddpm.cli import build_parser, train_config_from_args
from ddpm.training import train

VARIANTS = {"eps": [], "eps + min-SNR 5": ["--snr-gamma", "5"], "v": ["--prediction", "v"],
            "v + min-SNR 5": ["--prediction", "v", "--snr-gamma", "5"]}
ROOT = Path("runs/objectives")
RESULTS = Path(__file__).parent / "results"


def slug(name: str) -> str:
    return name.replace(" + ", "_").replace(" ", "").replace("-", "")


def train_all(args) -> None:
    for name, flags in VARIANTS.items():
        out = ROOT / slug(name)
        if (out / "latest").exists():
            print(f"{name}: {out} exists, skipped")
            continue
        argv = ["train", "--preset", "quickstart", "--out", str(out), "--steps", str(args.steps),
                "--checkpoint-every", str(args.every), "--keep-checkpoints", "100", "--val-every", str(args.every // 2),
                "--sample-every", "0", "--quiet", *flags]
        config: RunConfig = train_config_from_args(build_parser().parse_args(argv))
        start = time.perf_counter()
        train(config, progress=False)
        print(f"{name}: {args.steps} steps in {time.perf_counter() - start:.0f}s", flush=True)
        export_checkpoints(out)


def export_checkpoints(run: Path) -> None:
    """model_step_N/ (EMA weights + config) for every kept checkpoint, so `ddpm eval` can score each."""
    from ddpm import UNet
    from ddpm.checkpoint import CHECKPOINT_DIR, load_training_state, save_pretrained
    from ddpm.config import RunConfig

    for path in sorted((run / CHECKPOINT_DIR).glob("step_*.pt")):
        state = load_training_state(path)
        config = RunConfig.from_dict(state["config"])
        model = UNet(config.model)
        model.load_state_dict(ema_states(state)[0]["model"])
        save_pretrained(model, run / f"model_step_{state['step']}", config.diffusion,
                        {"step": state["step"], "class_names": None})


def validation_curve(run: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard")).Reload()
    return {int(e.step): float(e.value) for e in acc.Scalars("val/loss_ema")}


def eval_all(args) -> None:
    from ddpm.checkpoint import from_pretrained
    from ddpm.config import SamplingConfig
    from ddpm.evaluation import prepare_evaluator, sweep

    RESULTS.mkdir(exist_ok=True)
    rows, evaluator = [], None
    sampling = SamplingConfig(sampler=args.sampler, steps=args.sampling_steps, guidance=3.0)
    for name in VARIANTS:
        run = ROOT / slug(name)
        curve = validation_curve(run)
        for folder in sorted(run.glob("model_step_*"), key=lambda p: int(p.name.rsplit("_", 1)[1])):
            model, schedule, config = from_pretrained(folder, "cpu")
            if evaluator is None:
                evaluator = prepare_evaluator("mnist", 16, 1, 10, ROOT / "eval_cache", n=args.n, ref_n=1000, fid=False,
                                              progress=False)
                floor = evaluator.floor()
            record = sweep(model, schedule, evaluator, [sampling], folder / "eval", n=args.n, seed=0,
                           record={"model_sha1": folder.name})
            row = record["rows"][0]
            step = int(config["step"])
            rows.append({"objective": name, "step": step, "val_eps_mse": curve.get(step), **{k: row.get(k) for k in
                         ("classifier_fd", "accuracy", "precision", "recall", "saturated")}})
            print(rows[-1], flush=True)
    result = {"sampling": sampling.__dict__, "n": args.n, "floor": floor, "rows": rows}
    (RESULTS / "objectives.json").write_text(json.dumps(result, indent=2) + "\n")
    write_table(result)
    plot(result)


def write_table(result: dict) -> None:
    f = result["floor"]
    lines = ["| objective | step | val eps-MSE (EMA) | classifier FD | accuracy | precision | recall | saturated |",
             "|---|---|---|---|---|---|---|---|",
             f"| real digits (floor) | - | - | {f.get('classifier_fd', 0):.2f} | {f.get('accuracy', 0):.3f} | "
             f"{f.get('precision', float('nan')):.3f} | {f.get('recall', float('nan')):.3f} | "
             f"{f.get('saturated', 0):.4f} |"]
    for r in result["rows"]:
        def fmt(key, digits):
            return "-" if r.get(key) is None else f"{r[key]:.{digits}f}"
        lines.append(f"| {r['objective']} | {r['step']} | {fmt('val_eps_mse', 4)} | {fmt('classifier_fd', 2)} | "
                     f"{fmt('accuracy', 3)} | {fmt('precision', 3)} | {fmt('recall', 3)} | {fmt('saturated', 4)} |")
    (RESULTS / "objectives.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in VARIANTS:
        rows = [r for r in result["rows"] if r["objective"] == name]
        steps = [r["step"] for r in rows]
        for ax, key in zip(axes, ("val_eps_mse", "classifier_fd", "accuracy")):
            ax.plot(steps, [r[key] for r in rows], marker="o", label=name)
    for ax, key, title in zip(axes, ("val_eps_mse", "classifier_fd", "accuracy"),
                              ("held-out eps-MSE (EMA)", "classifier Frechet distance (w=3)", "class accuracy (w=3)")):
        ax.set_title(title)
        ax.set_xlabel("training steps (batch 64)")
        if key in result["floor"]:
            ax.axhline(result["floor"][key], color="grey", linestyle="--", label="real floor")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "objectives.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train")
    tr.add_argument("--steps", type=int, default=1500)
    tr.add_argument("--every", type=int, default=500)
    ev = sub.add_parser("eval")
    ev.add_argument("--n", type=int, default=250)
    ev.add_argument("--sampler", default="ddim")
    ev.add_argument("--sampling-steps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(2)
    {"train": train_all, "eval": eval_all}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
