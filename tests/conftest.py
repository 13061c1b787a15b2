import os

import pytest
import torch

from helpers import kill_live_children, tiny_model_config

# Under pytest-xdist (`make test` runs two workers) each worker keeps to one thread: two workers of one thread
# each use both cores with less idle spinning than one process of two threads.
# Their child processes (`ddpm train` under test, torchrun's workers) get one thread too, through the environment:
# CPU kernels sum in another order with another thread count, and several tests compare a child's weights with
# this process's bit for bit.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_config():
    """helpers.tiny_model_config: `tiny_config(num_classes=3)` is the tiny UNet's ModelConfig with that override."""
    return tiny_model_config


@pytest.fixture(autouse=True)
def no_child_outlives_its_test():
    """A test that failed or timed out never leaves processes behind for the next one (a port, a store, CPU)."""
    yield
    kill_live_children()
