"""`ddpm train`: its flags (the recipe, fixed for a run's life, and how it runs, which --resume may change), the
config they make, the graceful stop's exit statuses and messages."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from ..config import (
    DiffusionConfig,
    ModelConfig,
    RunConfig,
    RuntimeConfig,
    TrainConfig,
)
from ..errors import DdpmError
from ..presets import PRESETS
from .common import (
    HelpFormatter,
    add_batch_size_flag,
    add_device_flag,
    add_out_flag,
    add_quiet_flag,
    add_seed_flag,
    duration,
    ema_lengths_arg,
    folder_path,
    int_list,
    worker_count,
)


def tracker_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names or not set(names) <= {"tensorboard", "wandb", "mlflow"}:
        raise argparse.ArgumentTypeError(f"expected tensorboard, wandb and/or mlflow, comma-separated, got {text!r}")
    return names

SECTIONS = {"model": ModelConfig, "diffusion": DiffusionConfig, "train": TrainConfig, "runtime": RuntimeConfig}

# flag -> (config section, field); every one defaults to None so that presets and dataclass defaults apply.
# The flags of the "runtime" section are exactly those `--resume` accepts.
TRAIN_FLAGS = {
    "image_size": ("model", "image_size"), "base_channels": ("model", "base_channels"),
    "channel_mults": ("model", "channel_mults"), "bottleneck_mult": ("model", "bottleneck_mult"),
    "timesteps": ("diffusion", "timesteps"), "beta_schedule": ("diffusion", "beta_schedule"),
    "prediction": ("diffusion", "prediction"),
    "conditional": ("train", "conditional"), "channels": ("train", "channels"), "hflip": ("train", "hflip"),
    "batch_size": ("train", "batch_size"), "lr": ("train", "lr"), "warmup_steps": ("train", "warmup_steps"),
    "weight_decay": ("train", "weight_decay"), "grad_clip": ("train", "grad_clip"),
    "grad_accum": ("train", "grad_accum"),
    "ema_decay": ("train", "ema_decay"), "ema_warmup": ("train", "ema_warmup"),
    "guidance_dropout": ("train", "p_uncond"),
    "snr_gamma": ("train", "snr_gamma"), "seed": ("train", "seed"),
    "out": ("runtime", "out_dir"), "steps": ("runtime", "steps"), "epochs": ("runtime", "epochs"),
    "device": ("runtime", "device"), "amp": ("runtime", "amp"), "compile": ("runtime", "compile"),
    "cuda_graphs": ("runtime", "cuda_graphs"),
    "num_workers": ("runtime", "num_workers"), "log_every": ("runtime", "log_every"),
    "checkpoint_every": ("runtime", "checkpoint_every"), "keep_checkpoints": ("runtime", "keep_checkpoints"),
    "sample_every": ("runtime", "sample_every"), "sampling_steps": ("runtime", "sample_steps"),
    "guidance": ("runtime", "guidance"), "val_every": ("runtime", "val_every"), "val_size": ("runtime", "val_size"),
    "max_bad_fraction": ("runtime", "max_bad_fraction"), "guide_fraction": ("runtime", "guide_fraction"),
    "time_limit": ("runtime", "time_limit"), "dist_timeout": ("runtime", "dist_timeout"),
    "ema_lengths": ("train", "ema_lengths"),
    "ema_snapshot_every": ("runtime", "ema_snapshot_every"),
    "eval_every": ("runtime", "eval_every"), "eval_n": ("runtime", "eval_n"), "eval_steps": ("runtime", "eval_steps"),
    "keep_best": ("runtime", "keep_best"), "tracker": ("runtime", "trackers"),
}
RESUME_FLAGS = tuple(flag for flag, (section, _) in TRAIN_FLAGS.items() if section == "runtime")
# `ddpm train`'s exit statuses besides 0 (done) and 2 (bad input): documented in its --help and the README
EXIT_DIVERGED, EXIT_WRITE_FAILED, EXIT_PEER_LOST, EXIT_STOPPED, EXIT_INTERRUPTED = 3, 4, 5, 75, 130
TRAIN_EPILOG = (f"exit status: 0 the run reached its last step; 2 bad input (one line says what); {EXIT_DIVERGED} the "
                f"loss diverged; {EXIT_WRITE_FAILED} a file could not be written; {EXIT_PEER_LOST} under torchrun, "
                "another process of the job died or did not answer within --dist-timeout; "
                f"{EXIT_STOPPED} stopped early by SIGTERM, SIGINT, SIGUSR1 or --time-limit after writing a checkpoint "
                "(continue with --resume RUN_DIR or the same command with --resume-if-exists); "
                f"{EXIT_INTERRUPTED} a second Ctrl-C stopped it at once, without a new checkpoint")



def _default(flag: str) -> str:
    """' (default X)' from the dataclass field behind a train flag, so help never drifts from the code."""
    section, name = TRAIN_FLAGS[flag]
    value = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name).default
    if isinstance(value, tuple):
        value = ",".join(str(v) for v in value)
    return "" if value is None else f" (default {value})"



def add_train_parser(sub) -> None:
    tr = sub.add_parser("train", help="train a model (or continue one with --resume)", formatter_class=HelpFormatter,
                        epilog=TRAIN_EPILOG, description="Train a diffusion model. "
                                    "DATA: a folder of images (class subfolders = labels with --conditional), "
                                    "a CIFAR-10 folder (cifar-10-batches-py), a folder made by `ddpm prepare`, "
                                    "or a bundled set: mnist, photos.")
    a = tr.add_argument
    a("data", nargs="?", help="dataset: folder, CIFAR-10 folder, prepared folder, 'mnist' or 'photos' "
      "(not needed with --resume)")
    add_out_flag(a, "run folder for checkpoints, TensorBoard logs and the exported model (default runs/<preset or "
                 "data>)", required=False)
    a("--resume", type=folder_path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint; "
      "only the flags of how it runs "
      "(--steps/--epochs, --device, --amp, --compile, --num-workers, logging and checkpoint intervals) may be given")
    a("--resume-if-exists", action="store_true", help="when --out already holds this same run, continue it "
      "(a job restarted by torchrun --max-restarts, a SLURM requeue or a shell loop runs the same command line); "
      "a folder holding another run is refused")
    a("--preset", choices=sorted(PRESETS), help="start from a named configuration; other flags override it")
    a("--conditional", action=argparse.BooleanOptionalAction, default=None,
      help="class-conditional with classifier-free guidance (labels from class subfolders)")
    _add_recipe_flags(a)
    _add_runtime_flags(a)
    add_quiet_flag(a)


def _add_recipe_flags(a) -> None:
    """What a run computes: the model, the diffusion process and the training recipe (fixed for its life)."""
    a("--image-size", type=int, help="training resolution, a multiple of 2^(levels-1)" + _default("image_size"))
    a("--channels", type=int, choices=(1, 3), help="1 = grayscale, 3 = RGB (default: 1 for mnist, else 3)")
    a("--base-channels", type=int, help="UNet width at full resolution" + _default("base_channels"))
    a("--channel-mults", type=int_list, help="width multipliers per level" + _default("channel_mults"))
    a("--bottleneck-mult", type=int, help="bottleneck width / base width" + _default("bottleneck_mult"))
    a("--timesteps", type=int, help="diffusion steps T; linear betas scale by 1000/T" + _default("timesteps"))
    a("--beta-schedule", choices=("linear", "cosine"), help="noise schedule" + _default("beta_schedule"))
    a("--prediction", choices=("eps", "v"), help="what the network predicts: the noise eps or v (Salimans & Ho 2022)"
      + _default("prediction"))
    a("--snr-gamma", type=float, help="min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5 "
      "(default: off, the plain MSE)")
    add_batch_size_flag(a, "images per optimizer step" + _default("batch_size"), None)
    a("--lr", type=float, help="AdamW learning rate" + _default("lr"))
    a("--warmup-steps", type=int, help="linear learning-rate warm-up steps, 0 = none" + _default("warmup_steps"))
    a("--weight-decay", type=float, help="AdamW weight decay, 0 = none" + _default("weight_decay"))
    a("--grad-clip", type=float, help="clip the global gradient norm to this, 0 = off" + _default("grad_clip"))
    a("--grad-accum", type=int, help="micro-batches per step; --batch-size stays the global batch"
      + _default("grad_accum"))
    a("--ema-decay", type=float, help="EMA decay per step, 0 = no averaging" + _default("ema_decay"))
    a("--ema-warmup", type=int, help="steps during which the EMA copies the weights (at most a tenth of the "
      "planned run), 0 = none" + _default("ema_warmup"))
    a("--guidance-dropout", type=float, help="probability of dropping each label to the null class, 0 = never"
      + _default("guidance_dropout"))
    a("--ema-lengths", type=ema_lengths_arg, metavar="S,S", help="post-hoc EMA: the power-function EMA lengths "
      "(sigma_rel) tracked and snapshotted, from which any length is rebuilt after training "
      "(ddpm sample --ema-length); none = off" + _default("ema_lengths"))
    a("--hflip", action=argparse.BooleanOptionalAction, default=None,
      help="random horizontal flips (default: on, off for mnist)")
    add_seed_flag(a, "seed for data order, noise and initial weights", default=None, note=_default("seed"))


def _add_runtime_flags(a) -> None:
    """How a run executes: the flags `--resume` accepts (RuntimeConfig's fields, except --out)."""
    a("--steps", type=int, help="optimizer steps to train for")
    a("--epochs", type=int, help="passes over the data (when --steps is not given)")
    add_device_flag(a)
    a("--amp", choices=("auto", "bf16", "fp16", "none"), help="mixed precision; auto = bf16 on CUDA, off on CPU"
      + _default("amp"))
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the model (first step compiles; may pay off on long GPU runs)")
    a("--cuda-graphs", choices=("auto", "on", "off"), help="capture the whole training step as a CUDA graph and "
      "replay it (CUDA only, one process, bf16 or no amp); auto = where measured faster, not yet anywhere"
      + _default("cuda_graphs"))
    a("--num-workers", type=worker_count, help="data loading processes (0 = in the main process), or auto "
      "(default auto: from the cores on CUDA, 0 on CPU)")
    a("--log-every", type=int, help="TensorBoard scalars every N steps" + _default("log_every"))
    a("--checkpoint-every", type=int, help="checkpoint every N steps" + _default("checkpoint_every"))
    a("--keep-checkpoints", type=int, help="checkpoints kept (older ones are deleted)" + _default("keep_checkpoints"))
    a("--sample-every", type=int, help="preview grid to TensorBoard every N steps, 0 = never"
      + _default("sample_every"))
    a("--sampling-steps", type=int, help="denoiser evaluations of the preview grids (the default sampler, as "
      "ddpm sample --sampling-steps)" + _default("sampling_steps"))
    a("--sample-steps", type=int, dest="old_sample_steps", help=argparse.SUPPRESS)  # the old name of the above
    a("--guidance", type=float, help="guidance scale w of the preview grids, 0 = unconditional" + _default("guidance"))
    a("--val-every", type=int, help="held-out validation loss every N steps, 0 = never" + _default("val_every"))
    a("--val-size", type=int, help="held-out images for the validation loss" + _default("val_size"))
    a("--eval-every", type=int, metavar="N", help="every N steps, score EVAL_N images of what ddpm sample RUN draws "
      "at that step (the post-hoc EMA default once it rebuilds, else the classic EMA) as ddpm eval does (classifier "
      "FD and class accuracy on labelled data, FID on GPUs or unlabelled data) into the log; "
      "0 = never (the quickstart preset: 250)" + _default("eval_every"))
    a("--eval-n", type=int, help="images per evaluation (ddpm eval --n)" + _default("eval_n"))
    a("--eval-steps", type=int, help="DPM-Solver++ steps of those images, sampled with ddpm sample's default "
      "guidance" + _default("eval_steps"))
    a("--tracker", type=tracker_list, help="where the log goes, comma-separated: tensorboard, wandb (reads "
      "WANDB_PROJECT, WANDB_MODE, ...), mlflow (reads MLFLOW_TRACKING_URI; default: its local store); wandb and "
      "mlflow are extras (pip install 'ddpm-kit[wandb]')" + _default("tracker"))
    a("--keep-best", choices=("classifier_fd", "fid", "accuracy"), help="export what scores best on this metric "
      "(with its guide) to RUN/best (a model folder: ddpm sample RUN/best); needs --eval-every")
    a("--guide-fraction", type=float, metavar="F", help="save the EMA weights at this fraction of the planned steps "
      "to RUN/guide, kept for autoguidance (ddpm sample guides with it); 0 = none" + _default("guide_fraction"))
    a("--ema-snapshot-every", type=int, metavar="N", help="steps between post-hoc EMA snapshots, kept for good "
      "(default: 1/40 of the planned steps)")
    a("--time-limit", type=duration, metavar="DURATION", help="stop at a checkpoint before this much time has "
      "passed, e.g. 3h50m, 90m or seconds (exit 75; continue with --resume); for jobs of fixed length")
    a("--dist-timeout", type=duration, metavar="DURATION", help="under torchrun: how long a process waits for the "
      "others in one step's communication before the job fails (a dead node ends it within this), e.g. 10m; "
      "longer than rank 0's slowest checkpoint or evaluation" + _default("dist_timeout"))
    a("--max-bad-fraction", type=float, metavar="F", help="unreadable image files tolerated, as a fraction of the "
      "folder (at least 10 files), 0 = none; past it the run stops with their list" + _default("max_bad_fraction"))



def train_config_from_args(args: argparse.Namespace) -> RunConfig:
    """Preset (if any) -> dataclass defaults, then every flag the user gave on top."""
    sections: dict[str, dict] = {name: {} for name in SECTIONS}
    if args.preset:
        for name, values in PRESETS[args.preset].items():
            sections[name].update(values)
    if args.data:
        sections["train"]["data"] = args.data
    for flag, (section, field) in TRAIN_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            sections[section][field] = None if value == "auto" else value
    name = args.preset or Path(sections["train"].get("data", "run")).name
    sections["runtime"].setdefault("out_dir", str(Path("runs") / name))
    return RunConfig(**{section: cls(**sections[section]) for section, cls in SECTIONS.items()})


def cmd_train(args: argparse.Namespace) -> int:
    from ..distributed import StopRequest, stop_on_signals

    stop = StopRequest()  # --time-limit counts from here
    if getattr(args, "old_sample_steps", None) is not None:
        print("ddpm train: note: --sample-steps is now --sampling-steps (the same name as in ddpm sample); the old "
              "name still works", file=sys.stderr)
        args.sampling_steps = args.sampling_steps if args.sampling_steps is not None else args.old_sample_steps
    if args.resume:
        config, resume = resumed_config_from_args(args), True
    else:
        if not args.data and not (args.preset and "data" in PRESETS[args.preset].get("train", {})):
            raise DdpmError("give DATA (an image folder, a CIFAR-10 folder, mnist or photos), a --preset with data, "
                            "or --resume RUN_DIR")
        config, resume = train_config_from_args(args), False
    run_dir = Path(config.runtime.out_dir)
    try:
        with stop_on_signals(stop):
            result = _train(config, resume, args, stop)
    except KeyboardInterrupt:  # the second Ctrl-C: at once, wherever the step was
        raise Interrupted(f"interrupted twice: stopped at once; {_what_is_kept(run_dir)}") from None
    if result.stopped:
        from ..distributed import describe_stop, distributed_context

        if distributed_context().is_main:
            print(f"ddpm train: stopped by {describe_stop(result.stopped)} at step {result.step}, checkpoint "
                  f"written; continue with `ddpm train --resume {run_dir}`", file=sys.stderr, flush=True)
        return EXIT_STOPPED
    print(f"run folder: {run_dir}  (TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'})")
    print(f"sample it:  ddpm sample {run_dir} --out {run_dir / 'samples'}")
    return 0


def _train(config: RunConfig, resume: bool, args: argparse.Namespace, stop):
    from ..training import train

    return train(config, resume=resume, progress=not args.quiet, stop=stop, if_exists=args.resume_if_exists)


def resumed_config_from_args(args: argparse.Namespace) -> RunConfig:
    """--resume RUN_DIR: the saved run under the runtime flags given (the only ones it accepts)."""
    from ..run_setup import resume_config

    fixed = [flag for flag in TRAIN_FLAGS if flag not in RESUME_FLAGS and getattr(args, flag, None) is not None]
    if args.data or args.preset or fixed or args.out or args.resume_if_exists:
        given = (([args.data] if args.data else []) + (["--preset"] if args.preset else [])
                 + (["--out"] if args.out else []) + (["--resume-if-exists"] if args.resume_if_exists else [])
                 + ["--" + f.replace("_", "-") for f in fixed])
        raise DdpmError(f"--resume continues a run with its saved recipe; {', '.join(given)} cannot change it "
                        "(only how it runs: "
                        f"{', '.join('--' + f.replace('_', '-') for f in RESUME_FLAGS if f != 'out')}): "
                        "start a new run with another --out instead")
    changes = {TRAIN_FLAGS[f][1]: getattr(args, f) for f in RESUME_FLAGS if getattr(args, f, None) is not None}
    if changes.get("num_workers") == "auto":
        changes["num_workers"] = None  # resume_config ignores None: auto is spelt by leaving the saved value
    return resume_config(Path(args.resume), **changes)


class Interrupted(DdpmError):
    """Stopped at once by a second Ctrl-C (exit 130)."""


def _what_is_kept(run_dir: Path) -> str:
    from ..checkpoint import CheckpointError, latest_checkpoint

    try:
        step = int(latest_checkpoint(run_dir).stem.split("_")[-1])
    except (CheckpointError, ValueError):
        return f"no checkpoint was written yet, so nothing of this run is kept in {run_dir}"
    return (f"nothing since the last checkpoint (step {step}) is kept; continue with `ddpm train --resume "
            f"{run_dir}`")


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"

