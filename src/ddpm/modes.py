"""Network modes: `eval_mode`, so that sampling, validation and prediction never leave a network in another
mode than they found it in (an EMA copy stays in eval mode; a model in training goes back to training)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put `modules` in eval mode for the block, then give each back the mode it had (even on an error)."""
    was_training = [module.training for module in modules]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for module, training in zip(modules, was_training):
            module.train(training)
