"""Configuration dataclasses, saved as JSON next to every checkpoint and exported model.

A checkpoint (or a `model.safetensors` + `config.json` folder) carries its config, so it alone is enough to
rebuild the network and the noise schedule for sampling.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import DdpmError


class ConfigError(DdpmError):
    """A configuration value is out of range; the message names the field and the fix."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# Bounds far past any model that fits a GPU, so that a typo (an extra zero or three) is a one-line error instead of
# an allocation of terabytes.
MAX_IMAGE_SIZE, MAX_WIDTH, MAX_TIMESTEPS = 8192, 16384, 100_000
# Bounds past which a value is a typo, not a plan: a billion steps is years on any GPU; seeds are torch's int64;
# a guidance weight of 100 already saturates every pixel; a process per core of the largest machines.
MAX_STEPS, MAX_SEED, MAX_GUIDANCE, MAX_WORKERS = 10**9, 2**63 - 1, 100.0, 256


@dataclass
class ModelConfig:
    """The UNet's shape. Defaults are the seed: 64x64 RGB, widths 64-128-256-256, bottleneck 512."""

    image_size: int = 64
    in_channels: int = 3
    out_channels: int | None = None  # None: same as in_channels (eps has the image's shape)
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 4, 4)
    bottleneck_mult: int = 8  # bottleneck width = base_channels * bottleneck_mult (512 in the seed)
    time_embed_dim: int = 256
    num_heads: int = 4
    num_classes: int | None = None  # None: unconditional
    attention: bool = True
    # A 1x1 convolution from the input straight to the output (identity at init). Without it every feature
    # the seed's UNet sees has passed a GroupNorm, so the network is exactly invariant to the scale of x_t and
    # cannot predict eps to the precision that x0 = (x_t - sqrt(1-abar) eps)/sqrt(abar) needs at large t:
    # samples come out grey or saturated. False gives the seed's network exactly.
    input_skip: bool = True
    # A distilled student's extra input (Meng et al. 2023): the guidance weight it was trained to produce in one
    # call, "guide_weight" (autoguidance's g) or "guidance" (classifier-free guidance's w); None: no such input.
    weight_input: str | None = None

    def __post_init__(self) -> None:
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        self.validate()

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)

    def validate(self) -> None:
        _check(len(self.channel_mults) >= 2, "channel_mults needs at least two levels, e.g. (1, 2, 4, 4)")
        _check(all(m >= 1 for m in self.channel_mults), "channel_mults must be positive integers")
        f = self.downsample_factor
        _check(
            self.image_size >= f and self.image_size % f == 0,
            f"image_size={self.image_size} must be a positive multiple of {f} "
            f"(the UNet halves it {len(self.channel_mults) - 1} times); try {max(f, round(self.image_size / f) * f)}",
        )
        _check(
            self.image_size <= MAX_IMAGE_SIZE, f"image_size={self.image_size} is over {MAX_IMAGE_SIZE} pixels a side"
        )
        _check(self.in_channels >= 1, "in_channels must be >= 1")
        _check(self.base_channels >= 1 and self.bottleneck_mult >= 1, "base_channels and bottleneck_mult must be >= 1")
        widest = self.base_channels * max(self.channel_mults + (self.bottleneck_mult,))
        _check(widest <= MAX_WIDTH, f"the widest layer (base_channels x its multiplier = {widest:,}) is over "
                                    f"{MAX_WIDTH:,} channels; the seed's is 512")
        _check(self.num_heads >= 1, "num_heads must be >= 1")
        for m in self.channel_mults + (self.bottleneck_mult,):
            _check(
                (self.base_channels * m) % self.num_heads == 0,
                f"every width (base_channels * mult = {self.base_channels * m}) "
                f"must divide by num_heads={self.num_heads}",
            )
        _check(self.time_embed_dim >= 2 and self.time_embed_dim % 2 == 0, "time_embed_dim must be an even number >= 2")
        _check(self.num_classes is None or self.num_classes >= 1, "num_classes must be None (unconditional) or >= 1")
        _check(self.weight_input in WEIGHT_INPUTS,
               f"weight_input must be one of {WEIGHT_INPUTS}, not {self.weight_input!r}")


PREDICTIONS = ("eps", "v")
WEIGHT_INPUTS = (None, "guide_weight", "guidance")


@dataclass
class DiffusionConfig:
    """The forward process. Defaults are Ho et al. 2020: linear betas 1e-4..0.02 over T=1000."""

    timesteps: int = 1000
    beta_schedule: str = "linear"  # "linear" or "cosine" (Nichol & Dhariwal 2021)
    beta_start: float = 1e-4  # at T=1000; other T scale both ends by 1000/T (see schedule.linear_betas)
    beta_end: float = 0.02
    prediction: str = "eps"  # what the network outputs: "eps" (Ho et al. 2020) or "v" (Salimans & Ho 2022)

    def __post_init__(self) -> None:
        _check(
            2 <= self.timesteps <= MAX_TIMESTEPS, f"timesteps={self.timesteps} must be between 2 and {MAX_TIMESTEPS:,}"
        )
        _check(
            self.beta_schedule in ("linear", "cosine"),
            f"beta_schedule must be 'linear' or 'cosine', not {self.beta_schedule!r}",
        )
        _check(0 < self.beta_start <= self.beta_end < 1, "need 0 < beta_start <= beta_end < 1")
        _check(self.prediction in PREDICTIONS, f"prediction must be one of {PREDICTIONS}, not {self.prediction!r}")


# Fields written only when set: a model without them saves the same config.json as before they existed, which
# earlier versions of ddpm can still read.
WRITTEN_WHEN_SET = {"weight_input"}


def to_dict(obj: Any) -> dict:
    data = dataclasses.asdict(obj)
    if isinstance(obj, ModelConfig):
        data = {k: v for k, v in data.items() if k not in WRITTEN_WHEN_SET or v is not None}
    return data


def from_dict(cls: type, data: dict) -> Any:
    """Build a dataclass from a dict, rejecting unknown keys by name (a typo must not pass silently)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    _check(not unknown, f"unknown {cls.__name__} field(s): {sorted(unknown)}; known: {sorted(names)}")
    return cls(**data)


@dataclass
class TrainConfig:
    """What a run computes: the data and the training recipe. Fixed for the life of a run (resume keeps it).

    Defaults are the seed's (AdamW lr 3e-4, EMA 0.995 after 2000 steps, p_uncond 0.1, plain eps MSE)."""

    data: str = "mnist"
    conditional: bool = False
    channels: int | None = None  # None: the dataset's natural count (1 for mnist, 3 otherwise)
    hflip: bool | None = None  # None: flip image folders, CIFAR-10 and photos; never digits
    batch_size: int = 12
    lr: float = 3e-4
    warmup_steps: int = 0  # linear learning-rate warm-up
    weight_decay: float = 0.01  # torch.optim.AdamW's default, as the seed
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size is the global batch they add up to)
    max_nonfinite_steps: int = 5  # a NaN/inf loss skips the step; this many in a row stops the run
    ema_decay: float = 0.995
    ema_warmup: int = 2000  # the EMA copies the weights this many steps (at most a tenth of the run), then averages
    p_uncond: float = 0.1  # per-sample label dropout for classifier-free guidance
    snr_gamma: float | None = None  # min-SNR-gamma loss weighting (Hang et al. 2023); None: the plain MSE
    seed: int = 0
    # Post-hoc EMA (Karras et al. 2024): the power-function EMAs tracked beside the classic one, by sigma_rel; their
    # snapshots let any other length be rebuilt after training (phema.py). (): none (runs from before it).
    ema_lengths: tuple[float, ...] = (0.05, 0.10)

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        _check(self.lr > 0, f"lr={self.lr} must be > 0")
        _check(self.warmup_steps >= 0 and self.ema_warmup >= 0, "warm-up steps must be >= 0")
        _check(self.weight_decay >= 0 and self.grad_clip >= 0, "weight_decay and grad_clip must be >= 0")
        _check(0 <= self.ema_decay < 1, f"ema_decay={self.ema_decay} must be in [0, 1)")
        _check(0 <= self.p_uncond < 1, f"p_uncond (--guidance-dropout)={self.p_uncond} must be in [0, 1)")
        _check(self.channels in (None, 1, 3), f"channels={self.channels} must be 1 (grayscale) or 3 (RGB)")
        _check(self.grad_accum >= 1, f"grad_accum={self.grad_accum} must be >= 1")
        _check(self.max_nonfinite_steps >= 1, "max_nonfinite_steps must be >= 1")
        _check(self.snr_gamma is None or 0 < self.snr_gamma <= 1e6,
               f"snr_gamma={self.snr_gamma} must be in (0, 10^6] (leave it out for the plain MSE)")
        _check(self.lr <= 1, f"lr={self.lr} must be at most 1 (AdamW rates are about 1e-4 to 1e-2)")
        _check(self.weight_decay <= 1, f"weight_decay={self.weight_decay} must be in [0, 1]")
        _check(self.grad_clip <= 1e6, f"grad_clip={self.grad_clip} never clips past 10^6; use 0 to turn clipping off")
        _check(max(self.warmup_steps, self.ema_warmup) <= MAX_STEPS, f"warm-up steps must be at most {MAX_STEPS:,}")
        _check(0 <= self.seed <= MAX_SEED, f"seed={self.seed} must be in [0, 2^63 - 1]")
        self.ema_lengths = tuple(float(v) for v in self.ema_lengths)
        _check(all(0 < v <= 0.2886 for v in self.ema_lengths) and len(set(self.ema_lengths)) == len(self.ema_lengths),
               f"ema_lengths={self.ema_lengths} must be distinct sigma_rel values in (0, 0.2886]")


@dataclass
class RuntimeConfig:
    """How and where a run executes, and for how long. `--resume` takes all of these anew; nothing else."""

    out_dir: str = "runs/ddpm"
    steps: int | None = None  # optimizer steps; or
    epochs: int | None = None  # passes over the data (used when steps is None)
    device: str | None = None
    amp: str = "auto"  # auto | bf16 | fp16 | none
    # torch.compile the model: the first step compiles (a minute or more), later ones may run faster
    compile: bool = False
    # CUDA graphs of the whole training step (step_graph.py): auto | on | off. auto: where measured faster
    cuda_graphs: str = "auto"
    num_workers: int | None = None  # None: auto (see data.auto_workers)
    log_every: int = 25
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    sample_every: int = 1000  # preview grids to TensorBoard (EMA weights); 0 disables
    sample_steps: int = 50  # DDIM steps for those grids
    guidance: float = 3.0  # w of those grids
    val_every: int = 250  # held-out validation loss (fixed noise and t) to TensorBoard; 0 disables
    val_size: int = 256  # held-out images used for it (mnist: holdout split; CIFAR-10: test_batch)
    # Unreadable image files are replaced by their neighbours; past this fraction of the folder (and at least 10
    # files) the run stops with their list. 1 tolerates any number (a scraped folder, checked afterwards).
    max_bad_fraction: float = 0.01
    # Autoguidance (Karras et al. 2024) guides a model with a weaker version of itself: at this fraction of the
    # planned steps the EMA weights are exported once to RUN/guide/, which checkpoint pruning never touches. 0: none.
    guide_fraction: float = 0.5
    # Seconds this process may train (from the start of `ddpm train`): before the next step and the final checkpoint
    # would pass it, the run saves and stops (exit 75), to be continued; for fixed-length jobs (SLURM --time).
    time_limit: float | None = None
    # Under torchrun: seconds a process waits for the others in one collective before the job fails. A dead peer
    # (a killed node) ends the job after at most this long; it must exceed rank 0's longest work between two
    # steps (a checkpoint, a periodic evaluation), which the other ranks wait through. PyTorch's own default is
    # 30 minutes for gloo and 10 for NCCL (benchmarks/RESULTS.md "A dead peer").
    dist_timeout: float = 600.0
    # Steps between snapshots of the post-hoc EMA tracks (TrainConfig.ema_lengths), kept for good; None: the run's
    # planned steps / SNAPSHOTS_PER_RUN
    ema_snapshot_every: int | None = None
    # Quality in the log (periodic_eval.py): every eval_every steps (0: never) rank 0 scores eval_n images drawn
    # with eval_steps DPM-Solver++ steps as `ddpm eval` would; keep_best (classifier_fd, fid or accuracy) exports
    # the best-scoring EMA weights to RUN/best/.
    eval_every: int = 0
    eval_n: int = 250
    eval_steps: int = 20
    keep_best: str | None = None
    # Where the log goes (trackers.py): tensorboard, wandb, mlflow, any of them
    trackers: tuple[str, ...] = ("tensorboard",)

    def __post_init__(self) -> None:
        self.trackers = tuple(self.trackers)
        _check(len(self.trackers) >= 1 and set(self.trackers) <= {"tensorboard", "wandb", "mlflow"},
               f"trackers={','.join(self.trackers)} must be among tensorboard, wandb, mlflow")
        _check(self.steps is None or self.steps >= 1, f"steps={self.steps} must be >= 1")
        _check(self.eval_every >= 0, f"eval_every={self.eval_every} must be >= 0 (0 = never)")
        _check(2 <= self.eval_n <= 100_000, f"eval_n={self.eval_n} must be from 2 to 100,000 images")
        _check(1 <= self.eval_steps <= MAX_TIMESTEPS, f"eval_steps={self.eval_steps} must be from 1 to "
                                                     f"{MAX_TIMESTEPS:,}")
        _check(self.keep_best in (None, "classifier_fd", "fid", "accuracy"),
               f"keep_best={self.keep_best!r} must be classifier_fd, fid or accuracy")
        _check(self.keep_best is None or self.eval_every > 0,
               f"keep_best={self.keep_best} needs eval_every > 0 (the evaluation it keeps the best of)")
        _check(0 < self.dist_timeout <= 7 * 86400, f"dist_timeout={self.dist_timeout} must be in (0, 7 days] seconds")
        _check(self.time_limit is None or 0 < self.time_limit < math.inf,
               f"time_limit={self.time_limit} must be a positive number of seconds")
        _check(self.ema_snapshot_every is None or self.ema_snapshot_every >= 1,
               f"ema_snapshot_every={self.ema_snapshot_every} must be >= 1 (or auto)")
        for name in ("steps", "epochs", "log_every", "checkpoint_every", "keep_checkpoints", "sample_every",
                     "val_every", "ema_snapshot_every", "eval_every"):
            value = getattr(self, name)
            _check(value is None or value <= MAX_STEPS, f"{name}={value} must be at most {MAX_STEPS:,}")
        _check(self.sample_steps <= MAX_TIMESTEPS,
               f"sample_steps={self.sample_steps} must be at most {MAX_TIMESTEPS:,}")
        _check(self.val_size <= 10**7, f"val_size={self.val_size} must be at most 10,000,000")
        _check(self.num_workers is None or self.num_workers <= MAX_WORKERS,
               f"num_workers={self.num_workers} must be at most {MAX_WORKERS}")
        _check(self.device is None or self.device.strip() != "", "device is empty; give cpu, cuda, cuda:N or mps")
        _check(0 <= self.guidance <= MAX_GUIDANCE, f"guidance={self.guidance} must be in [0, {MAX_GUIDANCE:g}]")
        _check(self.epochs is None or self.epochs >= 1, f"epochs={self.epochs} must be >= 1")
        _check(self.amp in ("auto", "bf16", "fp16", "none"), f"amp={self.amp!r} must be auto, bf16, fp16 or none")
        _check(self.cuda_graphs in ("auto", "on", "off"), f"cuda_graphs={self.cuda_graphs!r} must be auto, on or off")
        _check(self.log_every >= 1 and self.checkpoint_every >= 1, "log_every and checkpoint_every must be >= 1")
        _check(self.sample_every >= 0 and self.sample_steps >= 1, "sample_every must be >= 0 and sample_steps >= 1")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
        _check(self.val_every >= 0 and self.val_size >= 1, "val_every must be >= 0 and val_size >= 1")
        _check(self.num_workers is None or self.num_workers >= 0, "num_workers must be >= 0 (or auto)")
        _check(math.isfinite(self.guidance), f"guidance={self.guidance} must be a finite number")
        _check(0 <= self.max_bad_fraction <= 1, f"max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
        _check(self.guide_fraction == 0 or 0 < self.guide_fraction < 1,
               f"guide_fraction={self.guide_fraction} must be in (0, 1), or 0 for no guide snapshot")


SAMPLERS = ("ddpm", "ddim", "dpmpp2m", "student")  # student: DDIM on a distilled student's grid (distill.py)
# denoiser evaluations when no step count is given (ddpm always takes all T): DPM-Solver++'s second-order updates
# reach DDIM-100 quality in 15-20 (Lu et al. 2022)
DEFAULT_STEPS = {"ddim": 50, "dpmpp2m": 20, "student": 4}
DEFAULT_CFG = 3.0  # classifier-free guidance w of `ddpm sample` when no guide model is used (the seed's)
# `ddpm sample`'s defaults when the run has a guide (autoguidance, Karras et al. 2024): measured on the quickstart
# model, benchmarks/RESULTS.md "Autoguidance" and "Post-hoc EMA" (guiding the steps below t = 0.05 T too, the last
# of 20, moved the samples away from the real digits' features at the same class accuracy). Flags override each.
AUTOGUIDED = {"guidance": 1.0, "guide_weight": 2.6, "guidance_interval": (0.05, 1.0)}
# A run with post-hoc EMA snapshots is drawn, by default, with the average of length `ema_length` (sigma_rel, Karras
# et al. 2024), guided by an average rebuilt at `guide_ema_fraction` of the run whose length spans about
# `guide_window_images` training images (sigma_rel x the guide's step x the batch: 0.2 at step 500 of the 1,000-step
# quickstart of batch 64, 0.05 at step 2,000 of a 4,000-step run, 0.2 at step 1,000 of the photos32 run of batch
# 32), kept within `guide_ema_range`, where the default tracks rebuild it well (sources.py; measured in
# benchmarks/RESULTS.md "Post-hoc EMA" on digits and "Colour" on photos: counted in images, the window held on both
# data sets and both lengths; counted in steps it lost 3% FID on the colour run at 2,000 steps).
POSTHOC_DEFAULT = {"ema_length": 0.13, "guide_ema_fraction": 0.5, "guide_window_images": 6400,
                   "guide_ema_range": (0.03, 0.2),
                   "measured_steps": (1000, 8000)}  # the run lengths the rule was measured on: 16x16 digits to
# 4,000 steps, the photos32 colour benchmark to 8,000 (benchmarks/RESULTS.md, "Colour")


def sampling_defaults(guided: bool) -> dict[str, Any]:
    """`ddpm sample`'s (and the page's) guidance defaults: AUTOGUIDED when a guide model is in use, else
    classifier-free guidance at DEFAULT_CFG over SamplingConfig's interval. Keys: guidance, guide_weight,
    guidance_interval (None: every step)."""
    if guided:
        return dict(AUTOGUIDED)
    return {"guidance": DEFAULT_CFG, "guide_weight": 1.0, "guidance_interval": SamplingConfig.guidance_interval}
# images per sampling batch of `ddpm sample` and `ddpm serve`: batch b is seeded by (seed, b), so the two must agree
# for one seed to draw the same images
SAMPLE_BATCH = 256


@dataclass
class SamplingConfig:
    """How to draw images: the sampler, its steps and the guidance options. Shared by `ddpm sample`, `ddpm eval`,
    the preview grids and `ddpm serve`, so one setting means the same images everywhere."""

    # Defaults measured on the quickstart model (README's quickstart table, benchmarks/RESULTS.md): DPM-Solver++(2M)
    # in 20 steps is as close to the data as DDIM in 100, and guiding only the noisier steps keeps the class
    # right while coming much closer to the real digits.
    sampler: str = "dpmpp2m"  # ddpm (all T ancestral steps) | ddim | dpmpp2m (DPM-Solver++(2M))
    steps: int | None = None  # denoiser evaluations; None: see steps_for
    eta: float = 0.0  # DDIM only: 0 deterministic, 1 DDPM-like
    guidance: float = 3.0  # classifier-free guidance w (1 = conditional, 0 = unconditional)
    guide_weight: float = 1.0  # autoguidance g (Karras et al. 2024) against a guide model: 1 = off; no guide, no effect
    guidance_rescale: float = 0.0  # phi of Lin et al. 2024; 0 = off
    guidance_interval: tuple[float, float] | None = (0.4, 1.0)  # guide only where t/(T-1) is in [lo, hi]; None = always
    clip_x0: bool = False  # clip the predicted x0 to [-1, 1]
    dynamic_threshold: float | None = None  # Imagen's percentile p (e.g. 0.995); None = off
    spacing: str = "trailing"  # dpmpp2m timesteps: "trailing" (uniform in t, T-1 first) or "logsnr"

    def __post_init__(self) -> None:
        if self.guidance_interval is not None:
            self.guidance_interval = tuple(float(v) for v in self.guidance_interval)
        _check(self.sampler in SAMPLERS, f"sampler must be one of {SAMPLERS}, not {self.sampler!r}")
        _check(self.steps is None or self.steps >= 1, f"sampling steps must be >= 1, got {self.steps}")
        for name in ("eta", "guidance", "guide_weight", "guidance_rescale"):
            _check(math.isfinite(getattr(self, name)), f"{name}={getattr(self, name)} must be a finite number")
        _check(0 <= self.eta <= 1, f"eta={self.eta} must be in [0, 1]")
        _check(0 <= self.guidance <= MAX_GUIDANCE, f"guidance={self.guidance} must be in [0, {MAX_GUIDANCE:g}]")
        _check(0 <= self.guide_weight <= MAX_GUIDANCE,
               f"guide_weight={self.guide_weight} must be in [0, {MAX_GUIDANCE:g}] (1 = no autoguidance)")
        _check(0 <= self.guidance_rescale <= 1, f"guidance_rescale={self.guidance_rescale} must be in [0, 1]")
        if self.guidance_interval is not None:
            lo, hi = self.guidance_interval
            _check(len(self.guidance_interval) == 2 and 0 <= lo <= hi <= 1,
                   f"guidance_interval={self.guidance_interval} must be two fractions 0 <= lo <= hi <= 1")
        _check(self.dynamic_threshold is None or 0 < self.dynamic_threshold <= 1,
               f"dynamic_threshold={self.dynamic_threshold} must be a percentile in (0, 1], e.g. 0.995")
        _check(self.spacing in ("trailing", "logsnr"), f"spacing must be 'trailing' or 'logsnr', not {self.spacing!r}")

    # the options `describe` names, with their short names (sampler, steps and the two weights have columns)
    OPTION_NAMES: ClassVar[dict[str, str]] = {
        "eta": "eta", "clip_x0": "clip", "dynamic_threshold": "dt", "guidance_rescale": "rescale",
        "guidance_interval": "interval", "spacing": "spacing"}

    def changed_options(self) -> dict[str, Any]:
        """{field: value} of the options (OPTION_NAMES) that differ from a default SamplingConfig's."""
        default = SamplingConfig()
        return {key: getattr(self, key) for key in self.OPTION_NAMES if getattr(self, key) != getattr(default, key)}

    def describe(self) -> str:
        """Those options as short text, e.g. 'interval=0.5-1 rescale=0.7', 'no-interval' for an option switched
        off, '-' for none: the one rendering that tables, plot legends and the page share."""
        def text(name: str, value) -> str:
            if value is True or value is None:
                return name if value else f"no-{name}"
            if isinstance(value, tuple):
                return f"{name}=" + "-".join(f"{v:g}" for v in value)
            return f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"

        return " ".join(text(self.OPTION_NAMES[k], v) for k, v in self.changed_options().items()) or "-"

    def steps_for(self, timesteps: int) -> int:
        """The number of denoiser evaluations this setting makes: T for ddpm; else `steps`, by default
        DEFAULT_STEPS[sampler]."""
        if self.sampler == "ddpm":
            return timesteps
        return self.steps if self.steps is not None else DEFAULT_STEPS[self.sampler]


@dataclass
class RunConfig:
    """Everything a run needs, saved as RUN_DIR/config.json and inside every checkpoint.

    model + diffusion + train are what the run computes; runtime is how it runs (`--resume` replaces it)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "model": to_dict(self.model)}

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        unknown = set(data) - {"model", "diffusion", "train", "runtime"}
        _check(not unknown, f"unknown config section(s): {sorted(unknown)}")
        train, runtime = dict(data.get("train", {})), dict(data.get("runtime", {}))
        # configs written before the split kept the runtime fields under "train"
        for name in {f.name for f in dataclasses.fields(RuntimeConfig)} & set(train):
            runtime.setdefault(name, train.pop(name))
        train.setdefault("ema_lengths", ())  # runs from before post-hoc EMA tracked none
        return cls(
            from_dict(ModelConfig, data.get("model", {})),
            from_dict(DiffusionConfig, data.get("diffusion", {})),
            from_dict(TrainConfig, train),
            from_dict(RuntimeConfig, runtime),
        )
