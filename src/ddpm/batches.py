"""A run's batches: which images each optimizer step of each rank takes (StepBatches: the same batches after a
resume and on any number of ranks), the DataLoader that yields them on the device, and the log of unreadable
files met on the way."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from .config import RunConfig
from .data import DataInfo, auto_workers, check_bad_files
from .distributed import DistributedContext, ignore_stop_signals


class StepBatches(Sampler[list[int]]):
    """This rank's share of each global batch, for optimizer steps `start`, `start` + 1, ... `stop` - 1.

    Step s is batch s mod E of epoch s // E (E = batches per epoch, drop_last) of a permutation that depends
    only on (seed, epoch), so a resumed run sees the same batches. One sampler spans all epochs, so a single
    DataLoader (and its worker processes) lives for the whole run. Rank r of K takes items
    [r*B/K, (r+1)*B/K) of every global batch of size B.
    """

    def __init__(
        self, size: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world_size: int = 1
    ):
        self.size, self.batch_size, self.seed, self.start, self.stop = size, batch_size, seed, start, stop
        self.share = batch_size // world_size
        self.offset = rank * self.share
        self.per_epoch = size // batch_size

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __iter__(self):
        epoch, order = None, None
        for step in range(self.start, self.stop):
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                order = self.permutation(epoch)
            first = (step % self.per_epoch) * self.batch_size + self.offset
            yield order[first : first + self.share].tolist()


def random_hflip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the images where `flip` (bool [N]) is set."""
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class RunBatches:
    """The training data of one run on one rank: its batches on the device for any range of steps, and its bad
    files."""

    def __init__(self, config: RunConfig, info: DataInfo, device: torch.device, ctx: DistributedContext):
        self.config, self.info, self.device, self.ctx = config, info, device, ctx
        self.channels_last = device.type == "cuda"  # the layout the Trainer's model uses there

    @property
    def steps_per_epoch(self) -> int:
        return len(self.info.dataset) // self.config.train.batch_size

    @property
    def bad_file_log(self) -> Path:
        """Unreadable image files, one path a line, appended by the loader's workers (data.ImageFiles)."""
        return Path(self.config.runtime.out_dir) / "bad_files.txt"

    def check_data(self) -> list[str]:
        """The unreadable files met so far (each was replaced by the next readable one); stops the run with
        their list past the data module's threshold. Every rank reads the same log, so all stop together."""
        return check_bad_files(self.bad_file_log if hasattr(self.info.dataset, "bad_log") else None,
                               len(self.info.dataset), self.config.runtime.max_bad_fraction)

    def batches(self, start: int, stop: int):
        """(x0, labels) on the device for steps start..stop-1, from one DataLoader whose workers live all run."""
        workers = self.config.runtime.num_workers
        workers = auto_workers(self.device) if workers is None else workers
        if hasattr(self.info.dataset, "bad_log"):  # set before the workers start, so that they inherit it
            self.bad_file_log.parent.mkdir(parents=True, exist_ok=True)
            self.info.dataset.bad_log = self.bad_file_log
        sampler = StepBatches(len(self.info.dataset), self.config.train.batch_size, self.config.train.seed, start, stop,
                              self.ctx.rank, self.ctx.world_size)
        loader = DataLoader(self.info.dataset, batch_sampler=sampler, num_workers=workers,
                            persistent_workers=workers > 0, pin_memory=self.device.type == "cuda",
                            worker_init_fn=ignore_stop_signals,
                            generator=torch.Generator().manual_seed(self.config.train.seed))
        conditional = self.config.model.num_classes is not None
        for x0, labels in loader:
            x0 = x0.to(self.device, non_blocking=True)
            if self.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            yield x0, labels.to(self.device, non_blocking=True) if conditional else None
