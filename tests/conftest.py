import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_config():
    """A UNet small enough for CPU tests: two levels, width 8, 8x8 grayscale."""
    from ddpm import ModelConfig

    def make(**overrides):
        base = dict(image_size=8, in_channels=1, base_channels=8, channel_mults=(1, 2), bottleneck_mult=2, time_embed_dim=16, num_heads=4)
        base.update(overrides)
        return ModelConfig(**base)

    return make
