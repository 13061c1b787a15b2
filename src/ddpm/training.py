"""The training loop: AdamW with warm-up, gradient clipping and accumulation, EMA, AMP on GPUs, TensorBoard,
atomic checkpoints, exact resume, and DistributedDataParallel when launched by `torchrun`.

Determinism: the data order of epoch e depends only on (seed, e); timesteps, noise, label dropout and flips
come from one generator whose state is in every checkpoint. Those draws are made for the whole global batch
and each rank (and micro-batch) takes its slice, so K processes compute exactly what one process with the
same global batch computes, and a resumed run continues the same stream.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from . import checkpoint as ckpt
from .config import ConfigError, RunConfig
from .data import DataInfo, load_dataset
from .devices import autocast, configure_for_speed, pick_device, resolve_amp
from .diffusion import draw_training_inputs, training_losses
from .ema import EMA
from .guidance import make_denoiser
from .samplers import ddim_sample
from .schedule import NoiseSchedule
from .unet import UNet


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    model: torch.nn.Module  # the trained (raw) weights of this process
    ema_model: torch.nn.Module | None  # rank 0 only
    step: int


class TrainingDiverged(RuntimeError):
    """The loss stayed NaN/inf; the message names the last good checkpoint."""


@dataclasses.dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_context() -> DistributedContext:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a plain launch is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistributedContext(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


class EpochBatches(Sampler[list[int]]):
    """This rank's share of each global batch of a seeded per-epoch permutation (drop_last), from batch `skip`.

    The permutation of epoch e depends only on (seed, e), so a resumed run sees the same batches; rank r of
    K takes items [r*B/K, (r+1)*B/K) of every global batch of size B.
    """

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int = 0, skip: int = 0, rank: int = 0, world_size: int = 1):
        self.size, self.batch_size, self.seed, self.epoch, self.skip = size, batch_size, seed, epoch, skip
        self.share = batch_size // world_size
        self.offset = rank * self.share

    def __len__(self) -> int:
        return self.size // self.batch_size - self.skip

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        for b in range(self.skip, self.size // self.batch_size):
            start = b * self.batch_size + self.offset
            yield order[start : start + self.share].tolist()


def prepare(config: RunConfig) -> tuple[RunConfig, DataInfo]:
    """Load the data and make the model config agree with it (channels, classes)."""
    t = config.train
    info = load_dataset(t.data, config.model.image_size, t.channels, t.conditional)
    if len(info.dataset) < t.batch_size:
        raise ConfigError(f"the dataset has {len(info.dataset)} images, fewer than --batch-size {t.batch_size}; lower --batch-size")
    model = dataclasses.replace(config.model, in_channels=info.channels, out_channels=None, num_classes=info.num_classes)
    return dataclasses.replace(config, model=model), info


def random_hflip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the images where `flip` (bool [N]) is set."""
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the fused kernel (one pass over all parameters instead of a dozen per tensor) where available."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device without a fused implementation
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)


def total_steps(config: RunConfig, dataset_size: int) -> int:
    t = config.train
    if t.steps is not None:
        return t.steps
    if t.epochs is not None:
        return t.epochs * (dataset_size // t.batch_size)
    raise ConfigError("give --steps or --epochs (how long to train)")


def _lr_at(step: int, config: RunConfig) -> float:
    t = config.train
    return t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.lr


@torch.no_grad()
def sample_grid(model: torch.nn.Module, schedule: NoiseSchedule, config: RunConfig, device, seed: int = 0) -> torch.Tensor:
    """A preview grid (values in [0, 1]) from `model`: one column per class for conditional models."""
    import torchvision

    gen = torch.Generator(device).manual_seed(seed)
    c = config.model
    if c.num_classes:
        per_class = max(1, min(8, 64 // c.num_classes))
        labels = torch.arange(c.num_classes, device=device).repeat(per_class)
        nrow = c.num_classes
    else:
        labels, nrow = None, 8
    n = len(labels) if labels is not None else 16
    denoiser = make_denoiser(model, labels, config.train.guidance)
    x = ddim_sample(denoiser, schedule, (n, c.in_channels, c.image_size, c.image_size), steps=config.train.sample_steps, generator=gen, device=device)
    return torchvision.utils.make_grid((x.clamp(-1, 1) + 1) / 2, nrow=nrow, padding=1)


def _resume_state(run_dir: Path) -> dict:
    """The newest checkpoint that loads; a broken newer one (e.g. truncated by hand) is reported and passed over."""
    candidates = sorted((run_dir / ckpt.CHECKPOINT_DIR).glob("step_*.pt"), reverse=True)
    if not candidates:
        ckpt.latest_checkpoint(run_dir)  # raises the clear "no checkpoint" error
    for path in candidates:
        try:
            return ckpt.load_training_state(path)
        except ckpt.CheckpointError as error:
            warnings.warn(f"{error}; trying an older checkpoint", stacklevel=2)
    raise ckpt.CheckpointError(f"no checkpoint in {run_dir / ckpt.CHECKPOINT_DIR} can be read; start a new run")


class _Logger:
    """Rank-0 TensorBoard scalars averaged over each logging window, with the loss per quarter of the t range.

    Sums stay on the training device between flushes, so logging adds no host-device sync per step."""

    def __init__(self, writer, timesteps: int, device: torch.device):
        self.writer, self.timesteps, self.device = writer, timesteps, device
        self.reset()

    def reset(self):
        self.images, self.t0 = 0, time.perf_counter()
        self.quarter_sums = torch.zeros(4, device=self.device)
        self.quarter_counts = torch.zeros(4, device=self.device)

    def add(self, per_sample: torch.Tensor, t: torch.Tensor, images: int):
        self.images += images
        quarters = t * 4 // self.timesteps
        self.quarter_sums.index_add_(0, quarters, per_sample.detach().float())
        self.quarter_counts.index_add_(0, quarters, torch.ones_like(per_sample, dtype=torch.float))

    def flush(self, step: int, lr: float, grad_norm: float) -> dict:
        ips = self.images / max(time.perf_counter() - self.t0, 1e-9)
        sums, counts = self.quarter_sums.cpu(), self.quarter_counts.cpu()
        loss = (sums.sum() / counts.sum().clamp(min=1)).item()
        w = self.writer
        w.add_scalar("train/loss", loss, step)
        for q in range(4):
            if counts[q] > 0:
                w.add_scalar(f"train/loss_t_quarter{q + 1}", (sums[q] / counts[q]).item(), step)
        w.add_scalar("train/lr", lr, step)
        w.add_scalar("train/grad_norm", grad_norm, step)
        w.add_scalar("train/images_per_sec", ips, step)
        self.reset()
        return {"loss": f"{loss:.4f}", "img_s": f"{ips:.0f}"}


def train(config: RunConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train (or, with `resume`, continue) the run in `config.train.out_dir`.

    Under `torchrun` (WORLD_SIZE > 1) it runs DistributedDataParallel: nccl on GPUs, gloo on CPUs; rank 0
    alone keeps the EMA, logs, draws grids and writes checkpoints; every rank resumes from the same file.
    """
    ctx = distributed_context()
    run_dir = Path(config.train.out_dir)
    state = None
    if resume:
        state = _resume_state(run_dir)
        saved = RunConfig.from_dict(state["config"])
        # a run continues with its saved config; only its length, the device and compilation may change on resume
        saved.train = dataclasses.replace(saved.train, out_dir=str(run_dir), steps=config.train.steps or saved.train.steps,
                                          epochs=config.train.epochs or saved.train.epochs, compile=config.train.compile,
                                          device=config.train.device or saved.train.device)
        config = saved
    elif run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file; give a folder path")
    elif (run_dir / ckpt.LATEST).exists() or any((run_dir / ckpt.CHECKPOINT_DIR).glob("step_*.pt")):
        raise ConfigError(f"{run_dir} already holds a run; continue it with `ddpm train --resume {run_dir}` or choose another --out")

    config, info = prepare(config)
    t = config.train
    if t.batch_size % (ctx.world_size * t.grad_accum):
        raise ConfigError(f"--batch-size {t.batch_size} must divide by processes x grad_accum = {ctx.world_size} x {t.grad_accum}")
    if ctx.enabled:
        device = torch.device(f"cuda:{ctx.local_rank}") if torch.cuda.is_available() and t.device in (None, "cuda") else pick_device(t.device or "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    else:
        device = pick_device(t.device)
    amp_dtype = resolve_amp(t.amp, device)
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = UNet(config.model).to(device)
    schedule = NoiseSchedule.from_config(config.diffusion).to(device)
    channels_last = device.type == "cuda"  # measured: a win for cuDNN, none for CPU training (benchmarks/RESULTS.md)
    if channels_last:
        model, _ = configure_for_speed(model)
    optimizer = make_optimizer(model, t.lr, t.weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = EMA(model, t.ema_decay, t.ema_warmup) if ctx.is_main else None
    noise_gen = torch.Generator(device).manual_seed(t.seed + 1)  # identical on every rank: each takes its slice
    hflip = t.hflip if t.hflip is not None else t.data != "mnist"  # digits are not mirror-symmetric
    steps_per_epoch = len(info.dataset) // t.batch_size
    last_step = total_steps(config, len(info.dataset))
    step = 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise ckpt.CheckpointError(f"the checkpoint does not fit the model of its own config: {error}") from error
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        step = int(state["step"])
        try:
            noise_gen.set_state(state["rng"]["noise"].to(torch.uint8))
        except RuntimeError:  # saved by another kind of device (--device moved the run): CPU and CUDA states differ
            noise_gen.manual_seed(t.seed + 1 + step)
            warnings.warn(f"the checkpoint's noise generator comes from another kind of device; continuing on {device} with a "
                          "fresh stream, so the run is no longer bit-identical to an uninterrupted one", stacklevel=2)
        torch.set_rng_state(state["rng"]["torch"])
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if ctx.enabled else model
    if t.compile:
        net = torch.compile(net)  # `model` keeps the plain parameter names for checkpoints and the EMA

    writer = None
    if ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_bytes(run_dir / ckpt.CONFIG, (json.dumps(config.to_dict(), indent=2) + "\n").encode())
        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step if step else None)
        if step == 0:
            writer.add_text("config", "```\n" + json.dumps(config.to_dict(), indent=2) + "\n```")
    logger = _Logger(writer, len(schedule), device) if writer else None
    held_out = None
    if writer is not None and t.val_every:
        from .metrics import validation_set

        held_out = validation_set(t.data, config.model.image_size, info.channels, config.model.num_classes is not None, n=t.val_size)

    def save(step: int) -> None:
        if ctx.is_main:
            payload = {
                "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "step": step, "config": config.to_dict(),
                "rng": {"noise": noise_gen.get_state(), "torch": torch.get_rng_state()},
            }
            ckpt.save_training_state(run_dir, payload, step, t.keep_checkpoints)
            ckpt.save_pretrained(ema.model, run_dir / ckpt.MODEL_DIR, config.diffusion, {"class_names": info.class_names, "step": step})
        if ctx.enabled:
            dist.barrier()

    from tqdm.auto import tqdm

    bar = tqdm(total=last_step, initial=step, disable=not (progress and ctx.is_main), desc="train", dynamic_ncols=True)
    start_time, start_step, last_saved = time.perf_counter(), step, step
    share = t.batch_size // ctx.world_size
    micro = share // t.grad_accum
    mine = slice(ctx.rank * share, (ctx.rank + 1) * share)
    bad_steps = 0
    model.train()
    try:
        while step < last_step:
            epoch, skip = divmod(step, steps_per_epoch)
            sampler = EpochBatches(len(info.dataset), t.batch_size, t.seed, epoch, skip, ctx.rank, ctx.world_size)
            loader = DataLoader(info.dataset, batch_sampler=sampler, num_workers=t.num_workers, pin_memory=device.type == "cuda",
                                generator=torch.Generator().manual_seed(t.seed))  # keeps the global RNG untouched
            for x0, labels in loader:
                x0 = x0.to(device, non_blocking=True)
                if channels_last:
                    x0 = x0.contiguous(memory_format=torch.channels_last)
                labels = labels.to(device, non_blocking=True) if config.model.num_classes else None
                # random inputs for the whole global batch, then this rank's slice (see the module docstring)
                draws = draw_training_inputs(schedule, (t.batch_size, *x0.shape[1:]), t.p_uncond, noise_gen, device)[mine]
                flips = torch.rand(t.batch_size, device=device, generator=noise_gen)[mine] < 0.5
                if hflip:
                    x0 = random_hflip(x0, flips)
                lr = _lr_at(step, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                losses, timesteps = [], []
                for m in range(t.grad_accum):
                    part = slice(m * micro, (m + 1) * micro)
                    last_micro = m == t.grad_accum - 1
                    sync = net.no_sync() if ctx.enabled and not last_micro else torch.enable_grad()
                    with sync, autocast(device, amp_dtype):
                        per_sample, ts = training_losses(net, schedule, x0[part], labels[part] if labels is not None else None,
                                                         draws=draws[part], null_class=model.null_class)
                        # sum / share: the micro-batches add up to this rank's mean; DDP averages the ranks
                        scaler.scale(per_sample.sum() / share).backward()
                    losses.append(per_sample.detach())
                    timesteps.append(ts)
                per_sample, timesteps = torch.cat(losses), torch.cat(timesteps)
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
                nonfinite = ~torch.isfinite(per_sample.sum())
                if amp_dtype != torch.float16:
                    nonfinite |= ~torch.isfinite(grad_norm)  # fp16 overflow is the GradScaler's business
                if ctx.enabled:
                    flag = nonfinite.float().reshape(1)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank must skip together
                    nonfinite = flag[0] > 0
                step += 1
                if bool(nonfinite):
                    bad_steps += 1
                    optimizer.zero_grad(set_to_none=True)
                    if ctx.is_main:
                        warnings.warn(f"step {step}: non-finite loss or gradient, step skipped ({bad_steps} in a row)", stacklevel=1)
                    if bad_steps >= t.max_nonfinite_steps:
                        raise TrainingDiverged(
                            f"the loss was NaN/inf for {bad_steps} steps in a row (up to step {step}); the last good checkpoint "
                            f"is step {last_saved} in {run_dir}. Lower --lr, keep gradient clipping on, or check the data")
                else:
                    bad_steps = 0
                    scaler.step(optimizer)
                    scaler.update()
                    if ema is not None:
                        ema.update(model)
                if logger is not None:
                    logger.add(per_sample, timesteps, len(x0) * ctx.world_size)
                    if step % t.log_every == 0 or step == last_step:
                        bar.set_postfix(logger.flush(step, lr, float(grad_norm)))
                    if t.sample_every and step % t.sample_every == 0:
                        writer.add_image("samples/ema", sample_grid(ema.model, schedule, config, device), step)
                    if held_out is not None and (step % t.val_every == 0 or step == last_step):
                        from .metrics import validation_loss

                        for tag, net_ in (("val/loss", model), ("val/loss_ema", ema.model)):
                            writer.add_scalar(tag, validation_loss(net_, schedule, held_out.images.to(device),
                                                                   None if held_out.labels is None else held_out.labels.to(device), seed=t.seed), step)
                if bad_steps == 0 and (step % t.checkpoint_every == 0 or step == last_step):
                    save(step)
                    last_saved = step
                bar.update(1)
                if t.compile and step == start_step + 1 and ctx.is_main and progress:
                    bar.write(f"torch.compile: the first step took {time.perf_counter() - start_time:.0f}s (compilation included)")
                if step >= last_step:
                    break
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    elapsed = time.perf_counter() - start_time
    if progress and ctx.is_main:
        print(f"trained steps {start_step}..{step} in {elapsed:.0f}s ({(step - start_step) * t.batch_size / max(elapsed, 1e-9):.1f} images/s) "
              f"on {device}{f' x {ctx.world_size} processes' if ctx.enabled else ''}; model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
              f"parameters; EMA weights in {run_dir / ckpt.MODEL_DIR}")
    if ctx.enabled:
        dist.destroy_process_group()
    return TrainResult(run_dir, model, ema.model if ema is not None else None, step)
