"""What rank 0 does around the training steps, in two parts: the training log here (progress, TensorBoard and the
trackers, preview grids, validation loss, periodic evaluation) and the run's files in run_files.py (checkpoints,
model folders, guide and post-hoc EMA snapshots). Other ranks get the silent `Monitor`, so the loop has no rank
checks.
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import SamplingConfig
from .data import validation_set
from .diffusion import validation_loss
from .errors import DdpmWarning
from .files import make_grid
from .periodic_eval import PeriodicEvaluation
from .pipeline import balanced_labels, sample_all
from .progress import progress as progress_bar
from .run_files import RunFiles
from .trackers import Trackers


class Monitor:
    """The silent monitor of ranks other than 0: the training loop calls these hooks on every rank."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def record(self, stats) -> None: ...

    def log(self, trainer, stats, skips: int) -> None: ...

    def extras(self, trainer) -> None: ...

    def end_of_epoch(self, trainer, bad_files: list[str]) -> None: ...

    def save(self, trainer) -> None: ...

    def progress(self, trainer) -> None: ...

    def close(self, trainer) -> None: ...


class LossLogger:
    """TensorBoard scalars averaged over each logging window, with the loss per quarter of the t range.

    Sums stay on the training device between flushes, so logging adds no host-device sync per step."""

    def __init__(self, writer, timesteps: int, device: torch.device):
        self.writer, self.timesteps, self.device = writer, timesteps, device
        self.reset()

    def reset(self) -> None:
        self.images, self.t0 = 0, time.perf_counter()
        self.quarter_sums = torch.zeros(4, device=self.device)
        self.quarter_counts = torch.zeros(4, device=self.device)

    def add(self, per_sample: torch.Tensor, t: torch.Tensor, images: int) -> None:
        self.images += images
        quarters = t * 4 // self.timesteps
        finite = torch.isfinite(per_sample)  # a skipped step's NaN must not poison the window's average
        self.quarter_sums.index_add_(0, quarters, torch.where(finite, per_sample.detach().float(), 0.0))
        self.quarter_counts.index_add_(0, quarters, finite.float())

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


@torch.no_grad()
def preview_grid(model: torch.nn.Module, schedule, sampling: SamplingConfig, seed: int = 0) -> torch.Tensor:
    """A uint8 preview grid from `model`: one column per class for conditional models, 16 images otherwise."""

    num_classes = model.config.num_classes
    n = num_classes * max(1, min(8, 64 // num_classes)) if num_classes else 16
    labels = balanced_labels(n, num_classes)
    images = sample_all(model, schedule, n=n, labels=labels, sampling=sampling, seed=seed)
    return make_grid(images, nrow=num_classes or 8)


class RankZeroMonitor(Monitor):
    """Rank 0's training log (progress bar, TensorBoard and the trackers, validation, previews, evaluation) beside
    its writer of the run's files (`files`, run_files.RunFiles). It times the work of both, so the cost of
    monitoring is reported at the end of the run."""

    def __init__(self, trainer, run_dir: Path, last_step: int, show_progress: bool = True):
        super().__init__(run_dir)
        config, step = trainer.config, trainer.step_count
        self.config, self.show_progress, self.last_step = config, show_progress, last_step
        self.files = RunFiles(self.run_dir, config, last_step)
        # TensorBoard, wandb and/or MLflow (trackers.py), each told every value the monitor logs
        self.writer = Trackers(config.runtime.trackers, self.run_dir, config.to_dict(), step)
        self.logger = LossLogger(self.writer, len(trainer.schedule), trainer.device)
        self.held_out = self._validation_set(trainer) if config.runtime.val_every else None
        # in a log file: a line every logging interval, at most about 100 lines a run
        every = config.runtime.log_every * math.ceil(last_step / (100 * config.runtime.log_every))
        self.bar = progress_bar(total=last_step, initial=step, disable=not show_progress, desc="train", lines=True,
                                every=every)
        self.start_time, self.start_step, self.extra_seconds = time.perf_counter(), step, 0.0
        self.bad_files_reported = 0
        self.capture_reported = False
        self.quality = None
        if config.runtime.eval_every:
            self.quality = PeriodicEvaluation(config, self.run_dir, trainer.info.channels, trainer.device)

    def _validation_set(self, trainer):
        c = self.config
        return validation_set(c.train.data, c.model.image_size, trainer.info.channels, c.model.num_classes is not None,
                              n=c.runtime.val_size)

    def record(self, stats) -> None:
        self.logger.add(stats.per_sample, stats.timesteps, stats.images)

    def log(self, trainer, stats, skips: int) -> None:
        postfix = self.logger.flush(trainer.step_count, stats.lr, float(stats.grad_norm))
        if skips:
            warnings.warn(f"step {trainer.step_count}: {skips} step(s) in a row had a non-finite loss or gradient "
                          "and were skipped", DdpmWarning, stacklevel=1)
        self.bar.set_postfix(postfix)

    def extras(self, trainer) -> None:
        """The files due at this step (the guide and EMA snapshots), then the evaluation, preview grids and
        validation loss, each on its own schedule."""
        r, step = self.config.runtime, trainer.step_count
        start = time.perf_counter()
        guide = self.files.at_step(trainer)
        if guide is not None and self.show_progress:
            self.bar.write(f"step {step}: guide snapshot for autoguidance in {guide}")
        if self.quality is not None and (step % r.eval_every == 0 or step == self.last_step):
            self._evaluate(trainer, step)
        if r.sample_every and step % r.sample_every == 0:
            sampling = SamplingConfig(steps=r.sample_steps, guidance=r.guidance)  # the default sampler and options
            grid = preview_grid(trainer.ema.model, trainer.schedule, sampling)
            self.writer.add_image("samples/ema", grid, step)
        if self.held_out is not None and (step % r.val_every == 0 or step == self.last_step):
            self._validate(trainer, step)
        self.extra_seconds += time.perf_counter() - start

    def _evaluate(self, trainer, step: int) -> None:
        """`ddpm eval`'s scores of what `ddpm sample RUN` draws at this step (periodic_eval.PeriodicEvaluation.drawn)
        into eval/ (`eval/posthoc`: 1 for the post-hoc default, 0 for the classic EMA), the real floor into
        eval_floor/, and with --keep-best what scored to RUN/best when it scores best so far."""
        start = time.perf_counter()
        drawn = self.quality.drawn(trainer.ema.model, trainer.schedule, step)
        scores = self.quality.score(drawn.model, trainer.schedule, drawn.guide)
        floor = self.quality.floor()
        for name, value in scores.items():
            self.writer.add_scalar(f"eval/{name}", value, step)
        for name, value in floor.items():
            self.writer.add_scalar(f"eval_floor/{name}", value, step)
        self.writer.add_scalar("eval/posthoc", float(drawn.plan is not None), step)
        self.writer.add_scalar("eval/seconds", time.perf_counter() - start, step)
        metric = self.config.runtime.keep_best
        kept = self.files.keep_best(trainer, scores, drawn)
        if self.show_progress:
            shown = ", ".join(f"{name} {value:.4g} (real {floor[name]:.4g})" for name, value in scores.items()
                              if name in floor and name in ("fid", "classifier_fd", "accuracy"))
            self.bar.write(f"step {step}: eval of {drawn.describe(self.run_dir)}: {shown}"
                           + (f"; best {metric} so far: {self.run_dir / 'best'}" if kept else ""))

    def _validate(self, trainer, step: int) -> None:
        images = self.held_out.images.to(trainer.device)
        labels = None if self.held_out.labels is None else self.held_out.labels.to(trainer.device)
        for tag, net in (("val/loss", trainer.model), ("val/loss_ema", trainer.ema.model)):
            value = validation_loss(net, trainer.schedule, images, labels, seed=self.config.train.seed)
            self.writer.add_scalar(tag, value, step)

    def end_of_epoch(self, trainer, bad_files: list[str]) -> None:
        if len(bad_files) > self.bad_files_reported:
            self.bad_files_reported = len(bad_files)
            self.bar.write(f"step {trainer.step_count}: {len(bad_files)} unreadable image file(s) so far, "
                           "each replaced by the "
                           f"next readable one (listed in {trainer.data.bad_file_log}), e.g. {bad_files[0]}")
            self.writer.add_scalar("data/unreadable_files", len(bad_files), trainer.step_count)

    def save(self, trainer) -> None:
        start = time.perf_counter()
        self.files.save(trainer)
        self.extra_seconds += time.perf_counter() - start

    def progress(self, trainer) -> None:
        self.bar.update(1)
        if not self.show_progress:
            return
        if self.config.runtime.compile and trainer.step_count == self.start_step + 1:
            self.bar.write(f"torch.compile: the first step took {time.perf_counter() - self.start_time:.0f}s "
                           "(compilation included)")
        if trainer.runner.capture_seconds is not None and not self.capture_reported:
            self.capture_reported = True
            self.bar.write(f"CUDA graphs: step {trainer.step_count} captured the training step in "
                           f"{trainer.runner.capture_seconds:.1f}s ({time.perf_counter() - self.start_time:.0f}s "
                           "since the start); every later step replays it")

    def close(self, trainer) -> None:
        self.bar.close()
        self.writer.close()
        if not self.show_progress:
            return
        elapsed = time.perf_counter() - self.start_time
        steps = trainer.step_count - self.start_step
        ctx = trainer.ctx
        print(f"trained steps {self.start_step}..{trainer.step_count} in {elapsed:.0f}s "
              f"({steps * self.config.train.batch_size / max(elapsed, 1e-9):.1f} images/s) on {trainer.device}"
              f"{f' x {ctx.world_size} processes' if ctx.enabled else ''}; "
              "of which validation, previews and checkpoints "
              f"{self.extra_seconds:.0f}s ({100 * self.extra_seconds / max(elapsed, 1e-9):.0f}%); model "
              f"{sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M parameters; "
              f"EMA weights in {self.run_dir / ckpt.MODEL_DIR}")
