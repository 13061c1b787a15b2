"""Exponential moving average of the weights (the seed's EMA: decay 0.995, copy during a warm-up)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .phema import beta, gamma_of


def sized_warmup(warmup_steps: int, run_steps: int | None) -> int:
    """The classic EMA's warm-up for a run planned for `run_steps`: `warmup_steps`, at most a tenth of the run. The
    seed's 2,000 steps are longer than a short run, whose "EMA" (and half-way guide) would then be its raw weights;
    the quickstart's 100 of 1,000 is unchanged."""
    return warmup_steps if run_steps is None else min(warmup_steps, run_steps // 10)


class EMA:
    """Keeps `self.model`, a frozen copy whose parameters follow ema = decay * ema + (1 - decay) * param.

    During the first `warmup_steps` updates the copy simply takes the weights (early weights are noise and
    averaging them only slows the start). Buffers are copied, not averaged. `state_dict()` holds the averaged
    weights and the update count, so a resumed run continues the same average.
    """

    def __init__(self, model: nn.Module, decay: float = 0.995, warmup_steps: int = 0, uniform: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.uniform = uniform  # after the warm-up, the plain mean of the weights instead of decaying
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._source: nn.Module | None = None
        self._tensors: tuple[list[torch.Tensor], ...] = ()

    def next_weight(self) -> float:
        """Count one update and return its interpolation weight: 1 (a copy) during the warm-up, then 1 - decay; or,
        `uniform`, 1 / (k + 1) for the k-th update after the warm-up, which makes the copy the plain mean of the
        weights from the warm-up's last one on (distill.py's average of a round's second half)."""
        self.num_updates += 1
        if self.num_updates <= self.warmup_steps:
            return 1.0
        return 1.0 / (self.num_updates - self.warmup_steps + 1) if self.uniform else 1.0 - self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.average(model, self.next_weight())

    @torch.no_grad()
    def average(self, model: nn.Module, weight: float | torch.Tensor) -> None:
        """ema = lerp(ema, param, weight) = ema + weight * (param - ema); weight 1 copies exactly.

        `weight` may be a 0-dim tensor on the model's device (what a CUDA graph of the training step needs: the
        graph replays the same kernels, so the weight must be read from memory, not baked in at capture). Both
        forms give the same bits (tests/test_ema.py)."""
        ema_params, params, ema_buffers, buffers = self._pairs(model)
        if isinstance(weight, torch.Tensor):  # foreach lerp has no overload for a single tensor weight
            torch._foreach_lerp_(ema_params, params, [weight] * len(params))
        else:
            torch._foreach_lerp_(ema_params, params, weight)
        for ema_buf, buf in zip(ema_buffers, buffers):
            ema_buf.copy_(buf)

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], ...]:
        """(EMA parameters, model parameters, EMA buffers, model buffers), listed once per source model: walking
        the module tree costs about half a millisecond of host time each (more than a whole step's kernels take to
        launch on a GPU). The Parameter objects stay the same through `.to()` and `load_state_dict`."""
        if model is not self._source:
            self._source = model
            self._tensors = (list(self.model.parameters()), list(model.parameters()), list(self.model.buffers()),
                             list(model.buffers()))
        return self._tensors

    def state_dict(self) -> dict:
        # the warm-up is fixed when the run starts (sized_warmup): a run resumed for longer keeps it
        return {"model": self.model.state_dict(), "num_updates": self.num_updates,
                "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        """`state["warmup_steps"]`, when saved, replaces this EMA's (checkpoints from before it keep the caller's)."""
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
        self.warmup_steps = int(state.get("warmup_steps", self.warmup_steps))


class PowerEMA(EMA):
    """A power-function EMA (Karras et al. 2024, eq. 4): update t averages with weight 1 - beta_t, beta_t =
    (1 - 1/t)^(gamma + 1), so that after t updates the copy is the average of theta_1..theta_t with density
    proportional to tau^gamma (phema.py). No warm-up: its profile already gives early weights little weight at the
    end. Same interface as EMA: `next_weight` on the host, `average` on the device, `state_dict`."""

    def __init__(self, model: nn.Module, sigma_rel: float):
        super().__init__(model, decay=0.0)
        self.sigma_rel = sigma_rel
        self.gamma = gamma_of(sigma_rel)

    def next_weight(self) -> float:
        self.num_updates += 1
        return 1.0 - beta(self.num_updates, self.gamma)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates, "sigma_rel": self.sigma_rel}
