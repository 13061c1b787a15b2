"""The training loop: a small Trainer (set-up, one checkpoint payload, one step) and `fit`, which runs its steps.

Determinism: the data order of epoch e depends only on (seed, e); timesteps, noise, label dropout and flips
come from one generator whose state is in every checkpoint. Those draws are made for the whole global batch
and each rank (and micro-batch) takes its slice, so K processes compute exactly what one process with the
same global batch computes, and a resumed run continues the same stream.

No host-device sync per step: the loss statistics stay on the device until a logging step, and a step whose
loss or gradient is not finite is skipped on the device (see `Trainer.step`).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .batches import RunBatches, random_hflip
from .config import ConfigError, RunConfig, RuntimeConfig
from .data import DataInfo
from .devices import autocast, compile_for_training, configure_for_speed, emulated_precision, resolve_amp
from .diffusion import TrainingDraws, draw_training_inputs, training_losses
from .distributed import (
    AGREE_EVERY_CUDA,
    DistributedContext,
    StopRequest,
    as_peer_lost,
    distributed_context,
    setup_device,
)
from .ema import EMA, PowerEMA, sized_warmup
from .errors import DdpmError, DdpmWarning
from .monitor import Monitor, RankZeroMonitor
from .run_setup import (
    check_new_run_dir,
    check_not_a_distillation,
    continued_config,
    holds_run,
    load_latest_state,
    prepare,
)
from .schedule import NoiseSchedule
from .step_graph import StaticInputs, StepRunner, graphs_decision
from .unet import UNet


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    model: torch.nn.Module  # the trained (raw) weights of this process
    ema_model: torch.nn.Module | None  # rank 0 only
    step: int
    stopped: int = 0  # 0: reached its last step; else why it saved and stopped early (distributed.stop_code)


class TrainingDiverged(DdpmError):
    """The loss stayed NaN/inf; the message names the last good checkpoint."""


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where available: one pass over all parameters, and it can skip a step on
    the device (`found_inf`) without a host sync. It is capturable, with the learning rate as a device tensor,
    so that a CUDA graph of the step replays it with each step's rate. Elsewhere the foreach kernels with a
    float rate.

    The rate's dtype: CUDA's fused kernel reads a float32 tensor. The CPU kernel reads a float64 one exactly as
    it reads a Python number (a float32 rate moves the weights by an ulp now and then), so CPU training keeps
    the bits it had before the rate became a tensor."""
    params = list(model.parameters())
    device = params[0].device
    rate = torch.tensor(lr, device=device, dtype=torch.float64 if device.type == "cpu" else torch.float32)
    try:
        return torch.optim.AdamW(params, lr=rate, weight_decay=weight_decay, fused=True, capturable=True)
    except (RuntimeError, ValueError):  # a device without a fused implementation
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write the rate in place when it is a device tensor (a CUDA graph reads it there), else as a number."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def total_steps(config: RunConfig, dataset_size: int) -> int:
    r, batch = config.runtime, config.train.batch_size
    if r.steps is not None:
        return r.steps
    if r.epochs is not None:
        return r.epochs * (dataset_size // batch)
    raise ConfigError("give --steps or --epochs (how long to train)")


def learning_rate(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up to `base_lr` over `warmup_steps`, then constant (the seed's schedule)."""
    return base_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else base_lr


@dataclasses.dataclass
class StepStats:
    """What one step measured, all on the training device (reading any of them syncs). Under CUDA graphs the
    tensors are the graph's outputs, overwritten by the next step: read them before it."""

    per_sample: torch.Tensor  # loss per sample of this rank [N]
    timesteps: torch.Tensor  # their t [N]
    grad_norm: torch.Tensor  # before clipping
    skipped: torch.Tensor  # bool: loss or gradient not finite, the update was not applied
    lr: float
    images: int  # global images this step


class DenoisingObjective:
    """The diffusion model's loss (diffusion.training_losses) under the run's settings. An objective draws each
    step's random inputs for the global batch (`draw`: tensors of one row per sample, named `draw_names`) and turns a
    slice of them into losses per sample (`losses`); distill.DistillationObjective is the other one."""

    draw_names = ("t", "noise", "drop")

    def __init__(self, config: RunConfig, schedule: NoiseSchedule, null_class: int | None):
        self.config, self.schedule, self.null_class = config, schedule, null_class

    def draw(self, shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        draws = draw_training_inputs(self.schedule, shape, self.config.train.p_uncond, generator, device)
        return {"t": draws.t, "noise": draws.noise, "drop": draws.drop}

    def losses(self, net, x0: torch.Tensor, labels: torch.Tensor | None, draws: dict[str, torch.Tensor]):
        return training_losses(net, self.schedule, x0, labels, draws=TrainingDraws(**draws),
                               null_class=self.null_class, prediction=self.config.diffusion.prediction,
                               snr_gamma=self.config.train.snr_gamma)


class Trainer:
    """Model, optimizer, EMA, noise generator and the step that updates them; `state_dict` is the checkpoint."""

    def __init__(self, config: RunConfig, info: DataInfo, device: torch.device, ctx: DistributedContext | None = None,
                 model: torch.nn.Module | None = None, last_step: int | None = None, objective=None):
        """`model` replaces the UNet of `config.model` (benchmarks train other networks with this very step); it
        takes (x_t, t, labels) and has a `null_class` attribute (None when unconditional). `last_step`: the run's
        planned length, which sizes the classic EMA's warm-up (ema.sized_warmup). `objective`: the loss
        (DenoisingObjective, the default, or distillation's), which may be replaced between `fit` calls."""
        self.config, self.info, self.device = config, info, device
        self.ctx = ctx or DistributedContext()
        t = config.train
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.model = (model or UNet(config.model)).to(device)
        self.channels_last = device.type == "cuda"  # a cuDNN win, none for CPU training (benchmarks/RESULTS.md)
        if self.channels_last:
            self.model, _ = configure_for_speed(self.model)
        self.schedule = NoiseSchedule.from_config(config.diffusion).to(device)
        self.objective = objective or DenoisingObjective(config, self.schedule, self.model.null_class)
        self.optimizer = make_optimizer(self.model, t.lr, t.weight_decay)
        self.params = list(self.model.parameters())  # listed once: a walk of the module tree costs host time each step
        self.amp_dtype = resolve_amp(config.runtime.amp, device)
        slow = emulated_precision(self.amp_dtype, device, "--amp none")  # only an explicit --amp gets here on a CPU
        if slow and self.ctx.is_main:
            warnings.warn(slow, DdpmWarning, stacklevel=2)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        # rank 0's averages of the weights, one list with one code path: the classic EMA first (RUN/model), then the
        # post-hoc EMA's power-function tracks (phema.py); each with its interpolation weight on the device
        self.emas: list[EMA] = [EMA(self.model, t.ema_decay, sized_warmup(t.ema_warmup, last_step))] + [
            PowerEMA(self.model, s) for s in t.ema_lengths] if self.ctx.is_main else []
        self.ema_weights = [torch.zeros((), device=device) for _ in self.emas]
        # identical on every rank: each takes its slice
        self.noise_gen = torch.Generator(device).manual_seed(t.seed + 1)
        self.hflip = t.hflip if t.hflip is not None else t.data != "mnist"  # digits are not mirror-symmetric
        self.data = RunBatches(config, info, device, self.ctx)
        self.step_count = 0
        self.save_seconds: float | None = None  # how long the last checkpoint took (rank 0's write and the wait)
        self.bad_run = torch.zeros((), device=device, dtype=torch.long)  # consecutive skipped steps, on the device
        self.worst_bad_run = torch.zeros((), device=device, dtype=torch.long)  # the longest since the last check
        self.net = self._wrap(self.model)
        # what the step reads from memory (so that a CUDA graph can replay it), and the numbers last written there
        self.static = StaticInputs()
        self.lr_value: float | None = None
        graphs, notice = graphs_decision(config.runtime.cuda_graphs, device, distributed=self.ctx.enabled,
                                         grad_scaler=self.scaler.is_enabled(),
                                         capturable_optimizer=bool(self.optimizer.defaults.get("capturable")))
        if notice:
            warnings.warn(notice, DdpmWarning, stacklevel=2)
        self.runner = StepRunner(graphs, device=device)

    @property
    def ema(self) -> EMA | None:
        """The classic EMA (what RUN/model exports), on rank 0; None elsewhere."""
        return self.emas[0] if self.emas else None

    @property
    def ema_tracks(self) -> list[PowerEMA]:
        """The post-hoc EMA's tracks, whose snapshots rebuild any other length after training."""
        return self.emas[1:]

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        net = model
        if self.ctx.enabled:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if self.config.runtime.compile:  # `self.model` keeps the plain parameter names for checkpoints and the EMA
            net = compile_for_training(net)
        return net

    # -- the checkpoint payload -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(), "emas": [ema.state_dict() for ema in self.emas],
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step_count,
            "config": self.config.to_dict(),
            "rng": {"noise": self.noise_gen.get_state(), "torch": torch.get_rng_state()},
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise ckpt.CheckpointError(f"the checkpoint does not fit the model of its own config: {error}") from error
        bound = {key: self.optimizer.param_groups[0][key] for key in ("lr", "capturable", "fused", "foreach")}
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the saved rate and flags would replace the device-tensor rate
            group.update(bound)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.emas:  # rank 0's; a run from before post-hoc EMA tracks none (its config says so)
            self.ema.warmup_steps = self.config.train.ema_warmup  # what a checkpoint from before sized warm-ups used
            for ema, saved in zip(self.emas, ckpt.ema_states(state), strict=True):
                ema.load_state_dict(saved)
        self.step_count = int(state["step"])
        try:
            self.noise_gen.set_state(state["rng"]["noise"].to(torch.uint8))
        except RuntimeError:  # saved by another kind of device (--device moved the run): CPU and CUDA states differ
            self.noise_gen.manual_seed(self.config.train.seed + 1 + self.step_count)
            warnings.warn(f"the checkpoint's noise generator comes from another kind of device; "
                          f"continuing on {self.device} "
                          "with a fresh stream, so the run is no longer bit-identical to an uninterrupted one",
                          DdpmWarning, stacklevel=2)
        torch.set_rng_state(state["rng"]["torch"])

    # -- one optimizer step --------------------------------------------------------------------------------------
    def load_inputs(self, x0: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Draw the step's randomness for the global batch (the same generator calls on every rank and in every
        mode), take this rank's slice, and copy it with the batch into the static inputs that `update` reads."""
        t, ctx = self.config.train, self.ctx
        share = t.batch_size // ctx.world_size
        mine = slice(ctx.rank * share, (ctx.rank + 1) * share)
        draws = self.objective.draw((t.batch_size, *x0.shape[1:]), self.noise_gen, self.device)
        flips = torch.rand(t.batch_size, device=self.device, generator=self.noise_gen)[mine] < 0.5
        inputs = {"x0": x0, **{name: value[mine] for name, value in draws.items()}, "flips": flips}
        if labels is not None:
            inputs["labels"] = labels
        return self.static.load(**inputs)

    def forward_backward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Backpropagate the loss of this rank's inputs over `grad_accum` micro-batches. Returns (loss per sample,
        t)."""
        t, ctx = self.config.train, self.ctx
        share = t.batch_size // ctx.world_size
        x0, labels = inputs["x0"], inputs.get("labels")
        draws = {name: inputs[name] for name in self.objective.draw_names}
        if self.hflip:
            x0 = random_hflip(x0, inputs["flips"])
        micro = share // t.grad_accum
        losses, timesteps = [], []
        for m in range(t.grad_accum):
            part = slice(m * micro, (m + 1) * micro)
            last = m == t.grad_accum - 1
            sync = self.net.no_sync() if ctx.enabled and not last else torch.enable_grad()
            # no autocast weight cache: a CUDA graph must not keep casts made at capture time
            with sync, autocast(self.device, self.amp_dtype, cache=False):
                per_sample, ts = self.objective.losses(self.net, x0[part], labels[part] if labels is not None else None,
                                                       {name: value[part] for name, value in draws.items()})
                # sum / share: the micro-batches add up to this rank's mean; DDP averages the ranks
                self.scaler.scale(per_sample.sum() / share).backward()
            losses.append(per_sample.detach())
            timesteps.append(ts)
        return torch.cat(losses), torch.cat(timesteps)

    def step(self, x0: torch.Tensor, labels: torch.Tensor | None) -> StepStats:
        """One optimizer step: the host's part (learning rate, EMA weight, random draws into the static inputs),
        then `update` on the device, run directly or replayed as a CUDA graph (step_graph.py)."""
        t = self.config.train
        lr = learning_rate(self.step_count, t.lr, t.warmup_steps)
        if lr != self.lr_value:  # a launch saved per step once the warm-up is over
            set_learning_rate(self.optimizer, lr)
            self.lr_value = lr
        for ema, weight in zip(self.emas, self.ema_weights):
            weight.fill_(ema.next_weight())  # read from memory by the step (a CUDA graph replays it)
        self.load_inputs(x0, labels)
        per_sample, timesteps, grad_norm, skipped = self.runner(self.update)
        self.step_count += 1
        return StepStats(per_sample, timesteps, grad_norm, skipped, lr, len(x0) * self.ctx.world_size)

    def update(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The device side of a step. It reads only the static inputs and state updated in place, and makes no
        host-device sync: what a CUDA graph captures. A non-finite loss or gradient skips the update on the device
        (fused AdamW's `found_inf`, as GradScaler does for fp16), and `check_divergence` reads the count of
        consecutive skips at logging steps. The EMA still averages on a skipped step (towards the unchanged
        weights). Returns (loss per sample, t, gradient norm before clipping, skipped)."""
        t = self.config.train
        self.optimizer.zero_grad(set_to_none=True)
        per_sample, timesteps = self.forward_backward(self.static.buffers)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip if t.grad_clip > 0 else float("inf"))
        skipped = ~torch.isfinite(per_sample.sum())
        if self.amp_dtype != torch.float16:
            skipped |= ~torch.isfinite(grad_norm)  # fp16 overflow is the GradScaler's business
        if self.ctx.enabled:
            flag = skipped.float().reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank must skip together
            skipped = flag[0] > 0
        self._apply_update(skipped)
        for ema, weight in zip(self.emas, self.ema_weights):
            ema.average(self.model, weight)
        self.bad_run.add_(1).mul_(skipped)  # in place: a replay reads and writes this same memory
        torch.maximum(self.worst_bad_run, self.bad_run, out=self.worst_bad_run)
        return per_sample, timesteps, grad_norm, skipped

    def _apply_update(self, skipped: torch.Tensor) -> None:
        fused = self.optimizer.defaults.get("fused")
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips on fp16 overflow (and on NaN, which overflows too)
            self.scaler.update()
        elif fused:
            self.optimizer.found_inf = skipped.float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not bool(skipped):  # no fused kernel on this device: the one place that syncs
            self.optimizer.step()


def _check_divergence(trainer: Trainer, run_dir: Path, last_saved: int) -> int:
    """Stop when `max_nonfinite_steps` steps in a row were skipped; returns the skips since the last check."""
    worst = int(trainer.worst_bad_run)
    trainer.worst_bad_run.zero_()
    limit = trainer.config.train.max_nonfinite_steps
    if worst >= limit:
        raise TrainingDiverged(
            f"the loss was NaN/inf for {worst} steps in a row (up to step {trainer.step_count}); "
            "the last good checkpoint "
            f"is step {last_saved} in {run_dir}. Lower --lr, keep gradient clipping on, or check the data")
    return worst


def fit(trainer: Trainer, last_step: int, monitor: Monitor, stop: StopRequest | None = None) -> int:
    """Train up to `last_step`; the monitor logs, validates, draws previews and saves on its schedule. Returns
    0 at `last_step`, or the code of the stop request (distributed.stop_code) at which it saved and ended."""
    r = trainer.config.runtime
    last_saved = trainer.step_count
    step_times = collections.deque(maxlen=10)  # the slowest of the last few steps sizes --time-limit's margin
    batches = trainer.data.batches(trainer.step_count, last_step)
    try:
        started = time.perf_counter()
        for x0, labels in batches:
            stats = trainer.step(x0, labels)
            step = trainer.step_count
            final = step == last_step
            monitor.record(stats)
            if step % r.log_every == 0 or final:
                skips = _check_divergence(trainer, monitor.run_dir, last_saved)
                monitor.log(trainer, stats, skips)
            monitor.extras(trainer)
            if step % trainer.data.steps_per_epoch == 0 or final:
                monitor.end_of_epoch(trainer, trainer.data.check_data())
            # never save in the middle of a run of skipped steps (a sync, at checkpoint steps only)
            if (step % r.checkpoint_every == 0 or final) and bool(trainer.bad_run == 0):
                last_saved = save(trainer, monitor)
            monitor.progress(trainer)
            step_times.append(time.perf_counter() - started)
            code = 0 if final else _stop_code(trainer, stop, max(step_times))
            if code:
                if last_saved != step:  # a stop is the one save that a run of skipped steps does not wait for
                    save(trainer, monitor)
                return code
            started = time.perf_counter()
    finally:
        batches.close()  # ends the loader's workers now, not when the generator is collected
    return 0


def save(trainer: Trainer, monitor: Monitor) -> int:
    """Rank 0 writes the checkpoint and the exported model; every rank waits for it. Returns the step."""
    start = time.perf_counter()
    monitor.save(trainer)
    trainer.ctx.barrier()
    trainer.save_seconds = time.perf_counter() - start
    return trainer.step_count


def _stop_code(trainer: Trainer, stop: StopRequest | None, step_seconds: float) -> int:
    """The stop request's code, agreed by all ranks (MAX): every step in one process or on CPUs, every
    AGREE_EVERY_CUDA steps under torchrun on GPUs (an agreement waits for the host; a step should not)."""
    if stop is None:
        return 0
    every = AGREE_EVERY_CUDA if trainer.ctx.enabled and trainer.device.type == "cuda" else 1
    if trainer.step_count % every:
        return 0
    return trainer.ctx.agree_max(stop.code(every * step_seconds, trainer.save_seconds))


def monitor_for(trainer: Trainer, run_dir: Path, last_step: int, progress: bool) -> Monitor:
    """Rank 0's log and files (RankZeroMonitor); the silent Monitor on the other ranks."""
    if trainer.ctx.is_main:
        return RankZeroMonitor(trainer, run_dir, last_step, progress)
    return Monitor(run_dir)


@contextlib.contextmanager
def closing_run(trainer: Trainer, monitor: Monitor, run_dir: Path):
    """Around a run's `fit` calls: a peer lost under torchrun becomes one PeerLost line, and whatever happens the
    log is closed and the process group ended."""
    ctx = trainer.ctx
    try:
        yield
    except RuntimeError as error:
        lost = as_peer_lost(error, ctx, trainer.step_count, run_dir)
        if lost is None:
            raise
        raise lost from None
    finally:
        monitor.close(trainer)
        if ctx.enabled:
            dist.destroy_process_group()


def train(config: RunConfig, resume: bool = False, progress: bool = True, stop: StopRequest | None = None,
          if_exists: bool = False) -> TrainResult:
    """Train the run in `config.runtime.out_dir`; with `resume`, continue its saved run (model, diffusion and
    recipe from the checkpoint) under `config.runtime` (see `resume_config`). With `if_exists`, continue the run
    the folder holds when it is this same run (a restarted job), else start it.

    `stop` (set by signal handlers, see distributed.stop_on_signals) and `--time-limit` end the run early at a
    checkpoint; `TrainResult.stopped` says why. Under `torchrun` (WORLD_SIZE > 1) it runs
    DistributedDataParallel: rank 0 alone keeps the EMA, logs, draws grids and writes checkpoints; every rank
    resumes from the same file and all stop at the same step."""
    ctx = distributed_context()
    run_dir = Path(config.runtime.out_dir)
    check_not_a_distillation(run_dir)
    state = load_latest_state(run_dir) if resume or (if_exists and holds_run(run_dir)) else None
    if resume:
        config = dataclasses.replace(RunConfig.from_dict(state["config"]), runtime=config.runtime)
    elif state is None:
        check_new_run_dir(run_dir)
    config, info = prepare(config)
    if state is not None and not resume:
        config = continued_config(state, config, run_dir)
    if config.train.batch_size % (ctx.world_size * config.train.grad_accum):
        raise ConfigError(f"--batch-size {config.train.batch_size} must divide by processes x grad_accum = "
                          f"{ctx.world_size} x {config.train.grad_accum}")
    last_step = total_steps(config, len(info.dataset))
    device = setup_device(ctx, config.runtime.device, config.runtime.dist_timeout)
    trainer = Trainer(config, info, device, ctx, last_step=last_step)
    if state is not None:
        trainer.load_state_dict(state)
    stop = stop or StopRequest()
    stop.time_limit = config.runtime.time_limit
    monitor = monitor_for(trainer, run_dir, last_step, progress)
    with closing_run(trainer, monitor, run_dir):
        stopped = fit(trainer, last_step, monitor, stop)
    return TrainResult(run_dir, trainer.model, trainer.ema.model if trainer.ema else None, trainer.step_count,
                       stopped)


__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "RuntimeConfig", "train", "fit", "save"]
