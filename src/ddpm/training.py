"""The training loop: AdamW with warm-up, gradient clipping, EMA, AMP on GPUs, TensorBoard, checkpoints, resume.

Data order, noise, timesteps and label dropout are all drawn from seeded generators whose states go into
every checkpoint, so a resumed run continues the same stream of batches and noise.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from . import checkpoint as ckpt
from .config import ConfigError, RunConfig
from .data import DataInfo, load_dataset
from .devices import autocast, pick_device, resolve_amp
from .diffusion import training_losses
from .ema import EMA
from .guidance import make_denoiser
from .samplers import ddim_sample
from .schedule import NoiseSchedule
from .unet import UNet


class EpochBatches(Sampler[list[int]]):
    """Batches of a seeded permutation per epoch (drop_last), starting `skip` batches into `epoch`.

    The permutation of epoch e depends only on (seed, e), so a resumed run sees the same batches.
    """

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int = 0, skip: int = 0):
        self.size, self.batch_size, self.seed, self.epoch, self.skip = size, batch_size, seed, epoch, skip

    def __len__(self) -> int:
        return self.size // self.batch_size - self.skip

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        for b in range(self.skip, self.size // self.batch_size):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()


def prepare(config: RunConfig) -> tuple[RunConfig, DataInfo]:
    """Load the data and make the model config agree with it (channels, classes)."""
    t = config.train
    info = load_dataset(t.data, config.model.image_size, t.channels, t.conditional)
    if len(info.dataset) < t.batch_size:
        raise ConfigError(f"the dataset has {len(info.dataset)} images, fewer than --batch-size {t.batch_size}; lower --batch-size")
    model = dataclasses.replace(config.model, in_channels=info.channels, out_channels=None, num_classes=info.num_classes)
    return dataclasses.replace(config, model=model), info


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2, drawn from the training generator (so resume is exact)."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


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


def _rng_state(noise_gen: torch.Generator) -> dict:
    # the noise generator draws t, eps, label dropout and flips; the global RNG is kept for user transforms
    state = {"torch": torch.get_rng_state(), "noise": noise_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict, noise_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    noise_gen.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def sample_grid(model: torch.nn.Module, schedule: NoiseSchedule, config: RunConfig, num_classes: int | None, device, seed: int = 0) -> torch.Tensor:
    """A preview grid (values in [0, 1]) from `model`: one column per class for conditional models."""
    import torchvision

    gen = torch.Generator(device).manual_seed(seed)
    c = config.model
    if num_classes:
        per_class = max(1, min(8, 64 // num_classes))
        labels = torch.arange(num_classes, device=device).repeat(per_class)
        nrow = num_classes
    else:
        labels, nrow = None, 8
    n = len(labels) if labels is not None else 16
    denoiser = make_denoiser(model, labels, config.train.guidance)
    x = ddim_sample(denoiser, schedule, (n, c.in_channels, c.image_size, c.image_size), steps=config.train.sample_steps, generator=gen, device=device)
    return torchvision.utils.make_grid((x.clamp(-1, 1) + 1) / 2, nrow=nrow, padding=1)


def train(config: RunConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train (or, with `resume`, continue) the run in `config.train.out_dir`; returns the run folder."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    run_dir = Path(config.train.out_dir)
    state = None
    if resume:
        state = ckpt.load_training_state(ckpt.latest_checkpoint(run_dir))
        saved = RunConfig.from_dict(state["config"])
        # the run continues with its saved config; only its length (and logging) may be changed on resume
        saved.train = dataclasses.replace(saved.train, steps=config.train.steps or saved.train.steps, epochs=config.train.epochs or saved.train.epochs)
        config = saved
    elif run_dir.exists() and (run_dir / ckpt.LATEST).exists():
        raise ConfigError(f"{run_dir} already holds a run; continue it with `ddpm train --resume {run_dir}` or choose another --out")
    elif run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file; give a folder path")

    config, info = prepare(config)
    t = config.train
    device = pick_device(t.device)
    amp_dtype = resolve_amp(t.amp, device)
    torch.manual_seed(t.seed)
    model = UNet(config.model).to(device)
    schedule = NoiseSchedule.from_config(config.diffusion).to(device)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=fused or None, foreach=None if fused else True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = EMA(model, t.ema_decay, t.ema_warmup)
    noise_gen = torch.Generator(device).manual_seed(t.seed + 1)
    hflip = t.hflip if t.hflip is not None else t.data != "mnist"  # digits are not mirror-symmetric
    steps_per_epoch = len(info.dataset) // t.batch_size
    last_step = total_steps(config, len(info.dataset))
    step = 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise ckpt.CheckpointError(f"the checkpoint does not fit the model of its own config: {error}") from error
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        _restore_rng(state["rng"], noise_gen)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_bytes(run_dir / ckpt.CONFIG, (json.dumps(config.to_dict(), indent=2) + "\n").encode())
    writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step if step else None)
    if step == 0:
        writer.add_text("config", "```\n" + json.dumps(config.to_dict(), indent=2) + "\n```")

    def save(step: int) -> None:
        payload = {
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "step": step, "rng": _rng_state(noise_gen), "config": config.to_dict(),
        }
        ckpt.save_training_state(run_dir, payload, step, t.keep_checkpoints)
        ckpt.save_pretrained(ema.model, run_dir / ckpt.MODEL_DIR, config.diffusion, {"class_names": info.class_names, "step": step})

    bar = tqdm(total=last_step, initial=step, disable=not progress, desc="train", dynamic_ncols=True)
    quarter_sums, quarter_counts = torch.zeros(4), torch.zeros(4)
    window_loss, window_n, window_t0, window_images = 0.0, 0, time.perf_counter(), 0
    start_time, start_step = time.perf_counter(), step
    model.train()
    while step < last_step:
        epoch, skip = divmod(step, steps_per_epoch)
        loader = DataLoader(info.dataset, batch_sampler=EpochBatches(len(info.dataset), t.batch_size, t.seed, epoch, skip),
                            num_workers=t.num_workers, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(t.seed))  # keeps the global RNG untouched
        for x0, labels in loader:
            x0 = x0.to(device, non_blocking=True)
            if hflip:
                x0 = random_hflip(x0, noise_gen)
            labels = labels.to(device, non_blocking=True) if config.model.num_classes else None
            lr = _lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device, amp_dtype):
                per_sample, timesteps = training_losses(model, schedule, x0, labels, p_uncond=t.p_uncond, generator=noise_gen)
                loss = per_sample.mean()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
            scaler.step(optimizer)
            scaler.update()
            ema.update(model)
            step += 1

            window_loss += loss.item()
            window_n += 1
            window_images += x0.shape[0]
            quarters = (timesteps * 4 // len(schedule)).cpu()
            quarter_sums.index_add_(0, quarters, per_sample.detach().float().cpu())
            quarter_counts.index_add_(0, quarters, torch.ones_like(quarters, dtype=torch.float))
            if step % t.log_every == 0 or step == last_step:
                elapsed = time.perf_counter() - window_t0
                ips = window_images / max(elapsed, 1e-9)
                writer.add_scalar("train/loss", window_loss / window_n, step)
                for q in range(4):
                    if quarter_counts[q] > 0:
                        writer.add_scalar(f"train/loss_t_quarter{q + 1}", (quarter_sums[q] / quarter_counts[q]).item(), step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/grad_norm", float(grad_norm), step)
                writer.add_scalar("train/images_per_sec", ips, step)
                bar.set_postfix(loss=f"{window_loss / window_n:.4f}", img_s=f"{ips:.0f}")
                quarter_sums.zero_(); quarter_counts.zero_()
                window_loss, window_n, window_images, window_t0 = 0.0, 0, 0, time.perf_counter()
            if t.sample_every and step % t.sample_every == 0:
                writer.add_image("samples/ema", sample_grid(ema.model, schedule, config, config.model.num_classes, device), step)
            if step % t.checkpoint_every == 0 or step == last_step:
                save(step)
            bar.update(1)
            if step >= last_step:
                break
    bar.close()
    writer.flush()
    writer.close()
    elapsed = time.perf_counter() - start_time
    if progress:
        print(f"trained steps {start_step}..{step} in {elapsed:.0f}s ({(step - start_step) * t.batch_size / max(elapsed, 1e-9):.1f} images/s) on {device}; "
              f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; EMA weights in {run_dir / ckpt.MODEL_DIR}")
    return run_dir
