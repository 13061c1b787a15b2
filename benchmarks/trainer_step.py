"""The step `ddpm train` runs (`Trainer.step`: the loss, backward, clipping, the NaN skip, fused AdamW and the EMA),
on random data, for the benchmarks. Not a copy of the step: the Trainer itself."""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import TensorDataset

from ddpm import ModelConfig, RunConfig, RuntimeConfig, TrainConfig
from ddpm.data import DataInfo
from ddpm.training import Trainer


class PeerNet(torch.nn.Module):
    """Another project's UNet behind our network interface (x_t, t, labels), unconditional, so that
    `Trainer.step` trains it exactly as it trains ours."""

    null_class = None

    def __init__(self, net: torch.nn.Module, forward: Callable):
        super().__init__()
        self.net, self._forward = net, forward

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        return self._forward(x, t)


def seed_trainer(batch: int, device: str | torch.device = "cpu", *, num_classes: int | None = None, amp: str = "none",
                 compile_model: bool = False, model: ModelConfig | None = None,
                 net: torch.nn.Module | None = None, cuda_graphs: str = "off") -> Trainer:
    """A Trainer for the seed model (64x64 RGB unless `model` says otherwise) with the seed's recipe; `net`
    (e.g. a PeerNet) replaces our UNet; `cuda_graphs` is `--cuda-graphs`."""
    model = model or ModelConfig(num_classes=num_classes)
    config = RunConfig(model=model, train=TrainConfig(batch_size=batch, conditional=num_classes is not None),
                       runtime=RuntimeConfig(device=str(device), amp=amp, compile=compile_model,
                                                          cuda_graphs=cuda_graphs))
    images = torch.zeros(batch, model.in_channels, model.image_size, model.image_size)
    info = DataInfo(TensorDataset(images, torch.zeros(batch, dtype=torch.long)), model.in_channels, num_classes, None,
                    "random")
    return Trainer(config, info, torch.device(device), model=net)


def trainer_step(trainer: Trainer, seed: int = 0) -> Callable[[], object]:
    """A closure running one `Trainer.step` on a fixed random batch (already on the device, as a loader leaves it)."""
    c, device = trainer.config.model, trainer.device
    generator = torch.Generator().manual_seed(seed)
    batch = trainer.config.train.batch_size
    x0 = (torch.rand(batch, c.in_channels, c.image_size, c.image_size, generator=generator) * 2 - 1).to(device)
    if trainer.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, c.num_classes, (batch,), generator=generator).to(device) if c.num_classes else None
    trainer.model.train()
    return lambda: trainer.step(x0, labels)
