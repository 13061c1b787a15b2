"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper.

    eps = eps(x, t, null) + w * (eps(x, t, y) - eps(x, t, null))

Our w is the weight of the conditional branch: w = 1 is the plain conditional model, w = 0 the unconditional
one, and w > 1 extrapolates away from the unconditional prediction. The CFG paper writes
eps = (1 + w') eps(x, t, y) - w' eps(x, t, null), so w = 1 + w' (our default w = 3 is the paper's w' = 2).
"""
from __future__ import annotations

import torch
from torch import nn


def default_batched(device: torch.device | str) -> bool:
    """One pass over 2N on accelerators (better occupancy); two passes of N on CPU (measured 8-18% faster there)."""
    return torch.device(device).type != "cpu"


class ClassifierFreeGuidance:
    """A denoiser `eps = f(x_t, t)` for fixed labels and guidance scale w, wrapping a conditional UNet.

    `batched=None` picks by device (`default_batched`). w == 1 runs only the conditional branch and
    w == 0 only the null branch: one model call per step in both cases.
    """

    def __init__(self, model: nn.Module, labels: torch.Tensor, guidance: float = 3.0, batched: bool | None = None):
        if getattr(model, "null_class", None) is None:
            raise ValueError("classifier-free guidance needs a class-conditional model (num_classes set)")
        self.model = model
        self.labels = labels
        self.null_labels = torch.full_like(labels, model.null_class)
        self.guidance = float(guidance)
        self.batched = default_batched(labels.device) if batched is None else batched

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        w = self.guidance
        if w == 1.0:
            return self.model(x, t, self.labels)
        if w == 0.0:
            return self.model(x, t, self.null_labels)
        if self.batched:
            eps_cond, eps_null = self.model(
                torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.labels, self.null_labels])
            ).chunk(2)
        else:
            eps_cond = self.model(x, t, self.labels)
            eps_null = self.model(x, t, self.null_labels)
        return eps_null + w * (eps_cond - eps_null)


def make_denoiser(model: nn.Module, labels: torch.Tensor | None = None, guidance: float = 3.0, batched: bool | None = None):
    """The denoiser a sampler needs: the plain model when unconditional, guided when labels are given."""
    if getattr(model, "null_class", None) is None:
        if labels is not None:
            raise ValueError("labels were given but the model is unconditional (trained without --conditional)")
        return lambda x, t: model(x, t)
    if labels is None:
        raise ValueError("the model is class-conditional: give labels (e.g. --labels 0,1,2 or --per-class K)")
    return ClassifierFreeGuidance(model, labels, guidance, batched)
