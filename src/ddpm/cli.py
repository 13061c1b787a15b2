"""`ddpm train | sample`: parse flags into config objects and call the library; nothing else lives here."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import DiffusionConfig, ModelConfig, RunConfig, TrainConfig
from .evaluation import add_eval_parser
from .presets import PRESETS

# flag -> (config section, field); every one defaults to None so that presets and dataclass defaults apply
TRAIN_FLAGS = {
    "image_size": ("model", "image_size"), "base_channels": ("model", "base_channels"),
    "channel_mults": ("model", "channel_mults"), "bottleneck_mult": ("model", "bottleneck_mult"),
    "timesteps": ("diffusion", "timesteps"), "beta_schedule": ("diffusion", "beta_schedule"),
    "out": ("train", "out_dir"), "conditional": ("train", "conditional"), "channels": ("train", "channels"),
    "batch_size": ("train", "batch_size"), "steps": ("train", "steps"), "epochs": ("train", "epochs"),
    "lr": ("train", "lr"), "warmup_steps": ("train", "warmup_steps"), "ema_decay": ("train", "ema_decay"),
    "ema_warmup": ("train", "ema_warmup"), "guidance_dropout": ("train", "p_uncond"), "guidance": ("train", "guidance"),
    "seed": ("train", "seed"), "device": ("train", "device"), "amp": ("train", "amp"), "num_workers": ("train", "num_workers"),
    "sample_every": ("train", "sample_every"), "checkpoint_every": ("train", "checkpoint_every"), "hflip": ("train", "hflip"),
    "grad_accum": ("train", "grad_accum"), "val_every": ("train", "val_every"), "compile": ("train", "compile"),
}


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm", description="Train and sample denoising diffusion models (DDPM, DDIM, classifier-free guidance).")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a model (or continue one with --resume)", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        description="Train a diffusion model. DATA: a folder of images (class subfolders = labels with --conditional), "
                                    "a CIFAR-10 folder (cifar-10-batches-py), or a bundled set: mnist, photos.")
    tr.add_argument("data", nargs="?", help="dataset: folder, CIFAR-10 folder, 'mnist' or 'photos' (not needed with --resume)")
    tr.add_argument("--out", help="run folder for checkpoints, TensorBoard logs and the exported model (default runs/<preset or data>)")
    tr.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint (--steps/--epochs may extend it)")
    tr.add_argument("--preset", choices=sorted(PRESETS), help="start from a named configuration; other flags override it")
    tr.add_argument("--conditional", action=argparse.BooleanOptionalAction, default=None, help="class-conditional with classifier-free guidance (labels from class subfolders)")
    tr.add_argument("--image-size", type=int, help="training resolution, a multiple of 8 (default 64)")
    tr.add_argument("--channels", type=int, choices=(1, 3), help="1 = grayscale, 3 = RGB (default: 1 for mnist, else 3)")
    tr.add_argument("--base-channels", type=int, help="UNet width at full resolution (default 64)")
    tr.add_argument("--channel-mults", type=_ints, help="width multipliers per level, e.g. 1,2,4,4 (default)")
    tr.add_argument("--bottleneck-mult", type=int, help="bottleneck width / base width (default 8)")
    tr.add_argument("--timesteps", type=int, help="diffusion steps T (default 1000)")
    tr.add_argument("--beta-schedule", choices=("linear", "cosine"), help="noise schedule (default linear 1e-4..0.02)")
    tr.add_argument("--batch-size", type=int, help="images per optimizer step (default 12)")
    tr.add_argument("--steps", type=int, help="optimizer steps to train for")
    tr.add_argument("--epochs", type=int, help="passes over the data (when --steps is not given)")
    tr.add_argument("--lr", type=float, help="AdamW learning rate (default 3e-4)")
    tr.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up steps (default 0)")
    tr.add_argument("--ema-decay", type=float, help="EMA decay per step (default 0.995)")
    tr.add_argument("--ema-warmup", type=int, help="steps during which the EMA copies the weights (default 2000)")
    tr.add_argument("--guidance-dropout", type=float, help="probability of dropping each label to the null class (default 0.1)")
    tr.add_argument("--guidance", type=float, help="guidance scale w of the preview grids (default 3)")
    tr.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flips (default: on, off for mnist)")
    tr.add_argument("--seed", type=int, help="seed for data order, noise and initial weights (default 0)")
    tr.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    tr.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), help="mixed precision (default auto: bf16 on CUDA, off on CPU)")
    tr.add_argument("--num-workers", type=int, help="data loading processes (default 0)")
    tr.add_argument("--sample-every", type=int, help="log a sample grid to TensorBoard every N steps, 0 = never (default 1000)")
    tr.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (default 500)")
    tr.add_argument("--grad-accum", type=int, help="micro-batches per step; --batch-size stays the global batch (default 1)")
    tr.add_argument("--val-every", type=int, help="held-out validation loss every N steps, 0 = never (default 250)")
    tr.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (first step compiles; may pay off on long GPU runs)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")

    sa = sub.add_parser("sample", help="draw images from a trained model", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        description="Sample from a run folder or an exported model folder (model.safetensors + config.json).")
    sa.add_argument("model", help="run folder or model folder")
    sa.add_argument("--out", required=True, help="output folder for the PNGs and the grid")
    sa.add_argument("--n", type=int, help="number of images (unconditional models; default 16)")
    sa.add_argument("--labels", type=_ints, help="class labels to draw, e.g. 0,1,2 (conditional models)")
    sa.add_argument("--per-class", type=int, help="K images of every class, one grid row per class (conditional default: 8)")
    sa.add_argument("--guidance", type=float, help="classifier-free guidance w: 0 = unconditional, 1 = conditional, >1 = guided (default 3)")
    sa.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm", help="ddpm: all T ancestral steps; ddim: --sampling-steps steps")
    sa.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps")
    sa.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    sa.add_argument("--clip-x0", action="store_true", help="clip the predicted x0 to [-1, 1] at every step")
    sa.add_argument("--seed", type=int, default=0, help="random seed (same seed, same device: same images)")
    sa.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights (--no-ema: the raw weights of the latest checkpoint)")
    sa.add_argument("--batch-size", type=int, default=256, help="images per sampling batch")
    sa.add_argument("--process", action="store_true", help="also write the denoising process as process.png and process.gif")
    sa.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    sa.add_argument("--compile", action="store_true", help="torch.compile the model (the first step compiles; worth it for many steps)")
    sa.add_argument("--quiet", action="store_true", help="no progress bar")
    add_eval_parser(sub)
    return parser


# flags that --resume accepts: they lengthen the run or say where and how it runs, not what it computes
RESUME_FLAGS = ("steps", "epochs", "device", "compile")


def train_config_from_args(args: argparse.Namespace) -> RunConfig:
    """Preset (if any) -> dataclass defaults, then every flag the user gave on top."""
    sections: dict[str, dict] = {"model": {}, "diffusion": {}, "train": {}}
    if args.preset:
        for name, values in PRESETS[args.preset].items():
            sections[name].update(values)
    if args.data:
        sections["train"]["data"] = args.data
    for flag, (section, field) in TRAIN_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            sections[section][field] = value
    sections["train"].setdefault("out_dir", str(Path("runs") / (args.preset or Path(sections["train"].get("data", "run")).name)))
    return RunConfig(ModelConfig(**sections["model"]), DiffusionConfig(**sections["diffusion"]), TrainConfig(**sections["train"]))


def cmd_train(args: argparse.Namespace) -> int:
    from .training import train

    if args.resume:
        fixed = [flag for flag in TRAIN_FLAGS if flag not in RESUME_FLAGS and getattr(args, flag, None) is not None]
        if args.data or args.preset or fixed:
            given = ([args.data] if args.data else []) + (["--preset"] if args.preset else []) + ["--" + f.replace("_", "-") for f in fixed]
            raise ValueError(f"--resume continues a run with its saved config; {', '.join(given)} cannot change it "
                             "(only --steps/--epochs, which extend it, --device and --compile may be given): start a new run with another --out instead")
        extend = TrainConfig(out_dir=args.resume, steps=args.steps, epochs=args.epochs, compile=bool(args.compile), device=args.device)
        run_dir = train(RunConfig(train=extend), resume=True, progress=not args.quiet).run_dir
    else:
        if not args.data and not (args.preset and "data" in PRESETS[args.preset]["train"]):
            raise ValueError("give DATA (an image folder, a CIFAR-10 folder, mnist or photos), a --preset with data, or --resume RUN_DIR")
        run_dir = train(train_config_from_args(args), progress=not args.quiet).run_dir
    print(f"run folder: {run_dir}  (TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'})")
    print(f"sample it:  ddpm sample {run_dir} --out {run_dir / 'samples'}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from . import checkpoint as ckpt
    from .devices import configure_for_speed, pick_device
    from .pipeline import sample, save_grid, save_images

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the images")
    device = pick_device(args.device)
    model, schedule, config = ckpt.from_pretrained(Path(args.model), device)
    if not args.ema:
        state = ckpt.load_training_state(ckpt.latest_checkpoint(Path(args.model)))
        model.load_state_dict(state["model"])
    model, _ = configure_for_speed(model)
    if args.compile:
        model = torch.compile(model)  # attribute access (config, null_class) passes through to the UNet
    num_classes = model.config.num_classes
    if num_classes is None:
        if args.labels is not None or args.per_class is not None:
            raise ValueError("this model is unconditional: it takes --n, not --labels or --per-class")
        if args.guidance is not None:
            raise ValueError("--guidance needs a class-conditional model; this one is unconditional (drop --guidance)")
        labels, n = None, 16 if args.n is None else args.n
        nrow = max(1, min(8, n))
    else:
        if args.labels is not None and args.per_class is not None:
            raise ValueError("give --labels or --per-class, not both")
        if args.n is not None and args.labels is None and args.per_class is None:
            labels = [i % num_classes for i in range(args.n)]
            nrow = num_classes
        elif args.labels is not None:
            labels = list(args.labels)
            nrow = min(len(labels), 10)
        else:
            k = 8 if args.per_class is None else args.per_class
            labels = [c for c in range(num_classes) for _ in range(k)]  # one grid row per class
            nrow = k
        n = len(labels)
    if n < 1:
        raise ValueError(f"nothing to sample: --n must be >= 1, got {n}")
    guidance = 3.0 if args.guidance is None else args.guidance
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")

    generator = torch.Generator(device).manual_seed(args.seed)
    frames: list[torch.Tensor] = []
    steps_total = len(schedule) if args.sampler == "ddpm" else args.sampling_steps
    keep_every = max(1, steps_total // 10)

    def record(i: int, index: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if args.compile and i == 0 and not args.quiet:
            print(f"torch.compile: the first step took {time.perf_counter() - start:.0f}s (compilation included)", file=sys.stderr)
        if args.process and (i % keep_every == 0 or index == 0):
            frames.append(x[: min(len(x), 8)].detach().cpu().clone())

    start = time.perf_counter()
    images = []
    for b in range(0, n, args.batch_size):
        batch_labels = labels[b : b + args.batch_size] if labels is not None else None
        count = len(batch_labels) if batch_labels is not None else min(args.batch_size, n - b)
        images.append(sample(model, schedule, None if batch_labels is not None else count, labels=batch_labels,
                             guidance=guidance, sampler=args.sampler, steps=args.sampling_steps, eta=args.eta,
                             clip_x0=args.clip_x0, generator=generator, callback=record if b == 0 else None,
                             progress=not args.quiet))
    images = torch.cat(images)
    elapsed = time.perf_counter() - start
    paths = save_images(images, out, labels=labels)
    upscale = max(1, 64 // model.config.image_size)
    grid = save_grid(images, out / "grid.png", nrow=nrow, upscale=upscale)
    print(f"{len(paths)} images ({args.sampler}, {steps_total} steps"
          + (f", guidance w={guidance}" if labels is not None else "") + f") in {elapsed:.1f}s on {device}")
    if args.process and frames:
        strip = torch.stack(frames, 1).flatten(0, 1)  # rows: images, columns: steps
        save_grid(strip, out / "process.png", nrow=len(frames), upscale=upscale)
        from PIL import Image

        from .data import to_uint8

        pictures = [Image.fromarray(to_uint8(f[0]).permute(1, 2, 0).squeeze(-1).numpy()).resize((128, 128), Image.NEAREST) for f in frames]
        pictures[0].save(out / "process.gif", save_all=True, append_images=pictures[1:], duration=200, loop=0)
        print(f"denoising process: {out / 'process.png'} and {out / 'process.gif'}")
    print(f"grid: {grid}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .training import TrainingDiverged

    args = build_parser().parse_args(argv)
    try:
        from .evaluation import run_eval

        return {"train": cmd_train, "sample": cmd_sample, "eval": run_eval}[args.command](args)
    except (ConfigError, DataError, CheckpointError, ValueError) as error:
        print(f"ddpm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"ddpm {args.command}: stopped: {error}", file=sys.stderr)
        return 3
    except OSError as error:  # disk full, permissions: earlier checkpoints are intact (writes are atomic)
        print(f"ddpm {args.command}: error: cannot write {error.filename or ''}: {error.strerror or error}; "
              "files written before are intact (free space or fix permissions, then --resume)", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print(f"ddpm {args.command}: interrupted; the last checkpoint is kept (continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
