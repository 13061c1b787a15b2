import os

import pytest
import torch

from helpers import tiny_model_config

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_config():
    """helpers.tiny_model_config: `tiny_config(num_classes=3)` is the tiny UNet's ModelConfig with that override."""
    return tiny_model_config
