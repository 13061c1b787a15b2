"""CUDA graphs of the whole training step: warm up, capture once, replay at every later step.

A training step launches about a thousand small kernels (forward, backward, clipping, fused AdamW, the EMA). At
small batches the GPU waits for the host to launch them one by one (benchmarks/RESULTS.md: 45 ms a step at the
seed's batch 14 on an H200, the same as at batch 64). A CUDA graph records the launches once and replays them
with a single call.

What a replay needs (PyTorch's CUDA-graphs notes, "whole-network capture"):
- every tensor the step reads or writes stays at one address: the inputs are copied into static buffers
  (`StaticInputs`), parameters, gradients and optimizer state are updated in place, and the learning rate and
  the EMA weight are device tensors, not Python numbers baked in at capture;
- no host-device sync inside the step (benchmarks/train_sync_checked.py checks the eager step for that);
- a few warm-up steps on a side stream before the capture, and `capturable=True` for the optimizer.

The random draws of a step (timesteps, noise, label dropout, flips) are made outside the graph by the same
generator calls as an eager step and copied into the static buffers, so a graphed run draws exactly the numbers
an eager run draws; resume and DDP's per-rank slices rely on that.

`StepRunner` is the only code that knows about capture. With graphs off (and on every CPU) it calls the step
directly, so the CPU test suite runs the very static-buffer step that a graph replays.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable

import torch

from .errors import DdpmWarning

# `--cuda-graphs auto` turns graphs on where they were measured to win. Nothing has been measured yet (no GPU
# session since they exist; benchmarks/gpu_check.sh measures them), so auto means off until that run says so.
GRAPHS_MEASURED_FASTER_ON_CUDA = False
WARMUP_STEPS = 3  # eager steps on a side stream before the capture (PyTorch's notes use 3; DDP would need 11)


def graphs_decision(setting: str, device: torch.device, *, distributed: bool, grad_scaler: bool,
                    capturable_optimizer: bool) -> tuple[bool, str | None]:
    """Whether to graph the training step, and a one-line notice when `--cuda-graphs on` cannot be honoured (or
    None). `setting` is auto | on | off."""
    if setting == "off" or (setting == "auto" and not (GRAPHS_MEASURED_FASTER_ON_CUDA and device.type == "cuda")):
        return False, None
    reason = None
    if device.type != "cuda":
        reason = f"CUDA graphs need a CUDA device; training on {device} runs eagerly"
    elif distributed:
        reason = "CUDA graphs are not used under torchrun (DDP's gradient all-reduce is not captured); training " \
                 "runs eagerly"
    elif grad_scaler:
        reason = "CUDA graphs are not used with --amp fp16 (its gradient scaler is not verified under capture); " \
                 "use --amp bf16, or training runs eagerly"
    elif not capturable_optimizer:
        reason = "CUDA graphs need the fused AdamW, which this PyTorch lacks here; training runs eagerly"
    return reason is None, (reason if setting == "on" else None)


class StaticInputs:
    """Fixed-address copies of a step's input tensors; `load` copies a new batch in and returns the copies.

    The buffers are made on the first call, like the tensors given (device, dtype, memory format); later calls
    must give the same shapes (a training run's batch never changes)."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] | None = None

    def load(self, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.buffers is None:
            self.buffers = {name: torch.empty_like(value) for name, value in tensors.items()}
        for name, value in tensors.items():
            self.buffers[name].copy_(value, non_blocking=True)
        return self.buffers


def capture_cuda_graph(step: Callable[[], object], stream: torch.cuda.Stream):
    """Capture `step` as a CUDA graph on `stream` and run it once (a capture records kernels, it runs none).
    Returns (replay, the step's outputs): `replay()` runs the step again and returns the same output tensors."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        outputs = step()
    graph.replay()

    def replay():
        graph.replay()
        return outputs

    return replay, outputs


class StepRunner:
    """Runs a step function (no arguments; it reads static buffers): directly when graphs are off; otherwise
    `WARMUP_STEPS` calls (on a side stream on CUDA), then one capture, and a replay at every later call.

    The step's outputs are the graph's own tensors when replayed: valid until the next call. A capture that fails
    warns once and the run continues eagerly; nothing ran during the failed capture (kernels are recorded, not
    executed), so that step is then simply run eagerly. `capture` replaces `capture_cuda_graph` (the tests give
    one that traces the step on a CPU, which freezes every Python value as a graph does)."""

    def __init__(self, enabled: bool, capture: Callable | None = None, device: torch.device | None = None):
        self.enabled = enabled
        self.capture = capture or capture_cuda_graph
        self.warmup_left = WARMUP_STEPS
        self.replay: Callable[[], object] | None = None
        # the training device, not the current one (`--device cuda:1` leaves the current device at 0)
        self.device = device if device is not None and device.type == "cuda" else None
        self.stream = torch.cuda.Stream(device=self.device) if enabled and capture is None else None
        self.capture_seconds: float | None = None  # how long the capture took, once it happened

    @property
    def graphed(self) -> bool:
        return self.replay is not None

    def __call__(self, step: Callable[[], object]):
        if not self.enabled:
            return step()
        if self.replay is not None:
            return self.replay()
        if self.warmup_left > 0:
            self.warmup_left -= 1
            return self._warm_up(step)
        return self._capture(step)

    def _warm_up(self, step: Callable[[], object]):
        if self.stream is None:
            return step()
        with torch.cuda.device(self.device):
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                outputs = step()
            torch.cuda.current_stream().wait_stream(self.stream)
        return outputs

    def _capture(self, step: Callable[[], object]):
        start = time.perf_counter()
        try:
            if self.stream is None:
                self.replay, outputs = self.capture(step, self.stream)
            else:
                with torch.cuda.device(self.device):
                    self.replay, outputs = self.capture(step, self.stream)
        except Exception as error:  # noqa: BLE001 - whatever broke the capture, eager training still works
            self.enabled, self.replay = False, None
            lines = str(error).strip().splitlines()
            warnings.warn(f"CUDA graph capture of the training step failed ({type(error).__name__}: "
                          f"{lines[0] if lines else ''}); training continues without CUDA graphs "
                          "(--cuda-graphs off skips the attempt)", DdpmWarning, stacklevel=3)
            if self.stream is not None:
                torch.cuda.synchronize(self.device)
            return step()
        self.capture_seconds = time.perf_counter() - start
        return outputs
