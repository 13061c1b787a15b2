"""Progress for a person: tqdm's bar on a terminal, plain lines in a log file.

A redrawn bar is carriage returns: in a file (SLURM, Kubernetes, CI, `make demo > log`) every redraw stays, about
1,000 updates and 300 KB for the quickstart. When stderr is not a terminal, a long job (`lines=True`: training,
`ddpm prepare`, the sampling of `ddpm sample`/`eval`) prints one line every `every` updates (default: every 10%
of the total) and one at the end; short inner loops (one sampler's steps, one feature pass) print nothing.
"""
from __future__ import annotations

import sys
import time


def on_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


class LineProgress:
    """The part of tqdm's interface that ddpm uses (update, set_postfix, write, close, iteration, context), written
    as one line per `every` updates: `train: 250/1000 (25%) 12s, 20.8 it/s, loss=0.0412`."""

    def __init__(self, iterable=None, total: int | None = None, initial: int = 0, desc: str = "",
                 disable: bool = False, every: int | None = None, stream=None):
        self.iterable, self.desc, self.disable = iterable, desc, disable
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.n = self.start_n = initial
        self.every = every or max(1, (self.total or 10) // 10)
        self.stream = sys.stderr if stream is None else stream
        self.postfix = ""
        self.started = time.perf_counter()
        self.last_shown = initial

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n // self.every > self.last_shown // self.every or self.n == self.total:
            self._show()

    def set_postfix(self, values: dict | None = None, refresh: bool = True, **more) -> None:
        items = {**(values or {}), **more}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def write(self, text: str) -> None:
        """A message between the progress lines: stdout, even when the progress is off, as tqdm.write."""
        print(text, flush=True)

    def _show(self) -> None:
        self.last_shown = self.n
        if self.disable:
            return
        elapsed = time.perf_counter() - self.started
        rate = (self.n - self.start_n) / max(elapsed, 1e-9)
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        line = f"{self.desc}: {done} {elapsed:.0f}s, {rate:.3g} it/s" + (f", {self.postfix}" if self.postfix else "")
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.n != self.last_shown and self.n > self.start_n:
            self._show()
        self.last_shown = self.n


def progress(iterable=None, *, total: int | None = None, initial: int = 0, desc: str = "", disable: bool = False,
             lines: bool = False, every: int | None = None, leave: bool = True):
    """tqdm on a terminal; otherwise LineProgress (`lines=True`) or a silent one. `every`: updates per line."""
    if on_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True,
                    leave=leave)
    return LineProgress(iterable, total, initial, desc, disable or not lines, every)
