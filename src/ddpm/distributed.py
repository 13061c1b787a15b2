"""The processes of a training run and how they stop: torchrun's environment, each process's device and process
group, and the stop request that signals and `--time-limit` raise between steps.

Why a flag: a signal handler runs at an arbitrary point of the step (inside a kernel launch, an allocator lock,
a collective), so it does nothing but record the signal (Python's `signal` docs). The training loop reads the
request between steps, saves a checkpoint and ends. Under torchrun the ranks agree on the request with one
all-reduce (MAX) at fixed steps, so a signal that reached one node stops every rank at the same step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .devices import pick_device
from .errors import PeerLost

# SLURM's `--signal=USR1@120` warns with SIGUSR1; Kubernetes, spot instances and torchrun send SIGTERM.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
TIME_LIMIT = 1  # the stop code of --time-limit; a signal's code is its number (all > 1)
# A signal's stop code is agreed every step on a CPU (the step's gradient all-reduce costs far more), every
# this many steps on CUDA: an agreement reads a number on the host, and no step on a GPU should wait for that.
AGREE_EVERY_CUDA = 10
MAX_DURATION = 10**8  # seconds: past about 3 years a time limit is a typo
SAVE_SECONDS_UNMEASURED = 5.0  # what --time-limit reserves for the final checkpoint before one is timed


@dataclasses.dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # a CPU (gloo) group for host-side agreement under nccl, so that agreeing touches no GPU stream
    host_group: object = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def agree_max(self, code: int) -> int:
        """The largest `code` of all ranks (a host-side all-reduce); `code` itself in a single process."""
        if not self.enabled:
            return code
        value = torch.tensor([code], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.host_group)
        return int(value[0])


def distributed_context() -> DistributedContext:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a plain launch is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistributedContext(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup_device(ctx: DistributedContext, device_name: str | None, timeout: float = 600.0) -> torch.device:
    """The device of this process; under torchrun also the process group (nccl on GPUs, gloo on CPUs) and a gloo
    group for host-side agreement, whose collectives fail after `timeout` seconds (RuntimeConfig.dist_timeout)."""
    if not ctx.enabled:
        return pick_device(device_name)
    use_cuda = torch.cuda.is_available() and device_name in (None, "cuda")
    device = torch.device(f"cuda:{ctx.local_rank}") if use_cuda else pick_device(device_name or "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        init_process_group("nccl" if device.type == "cuda" else "gloo", timedelta(seconds=timeout))
    ctx.host_group = (dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
                      if dist.get_backend() != "gloo" else None)
    return device


# what the communication libraries say when a peer died (its sockets closed) or never answered (the timeout)
PEER_FAILURES = ("Connection reset by peer", "Connection closed by peer", "Connection was likely closed",
                 "Connection refused", "timed out", "Timed out", "Timeout", "NCCL communicator was aborted")


def as_peer_lost(error: RuntimeError, ctx: DistributedContext, step: int, run_dir) -> PeerLost | None:
    """The one-line error for a collective that failed because another process of the job died or hung (gloo
    and NCCL raise RuntimeErrors that name the socket), else None (a bug of ours: it keeps its traceback)."""
    text = str(error)
    if not ctx.enabled or not (isinstance(error, dist.DistError) or any(s in text for s in PEER_FAILURES)):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return PeerLost(f"rank {ctx.rank} lost another process of the torchrun job at step {step} ({first[:160]}); "
                    f"the last checkpoint in {run_dir} is kept: torchrun --max-restarts continues from it, as does "
                    "the same command with --resume-if-exists")


def init_process_group(backend: str, timeout: timedelta) -> None:
    """torchrun's process group, its keys apart from every earlier attempt's (session_prefix)."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:  # not under torchrun: its env:// variables as they are
        dist.init_process_group(backend, timeout=timeout)
        return
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    prefix = session_prefix(store, rank, world_size, timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank, world_size=world_size,
                            timeout=timeout)


def session_prefix(store, rank: int, world_size: int, timeout: timedelta, ack_wait: float = 2.0) -> str:
    """A store prefix that this attempt's ranks share and no earlier attempt used.

    Why: torchrun (2.11-2.14 at least) keeps one store across `--max-restarts`, and a restarted gloo group read
    the addresses that the previous attempt's ranks had published there ("Gloo connectFullMesh failed ...
    Connection refused"). TORCHELASTIC_RESTART_COUNT cannot name the attempt: on two nodes it differs between them
    (an agent whose worker failed counts a restart, the agent that restarts for the new membership does not), and
    the two halves then waited for each other under different keys until the timeout (benchmarks/dead_peer.py).
    So rank 0 opens a session under a fresh random name; every other rank joins the name it reads with its own
    fresh nonce and waits `ack_wait` seconds for rank 0 to echo that nonce. A name left by an earlier attempt has
    no rank 0 to echo, so the rank reads the name again, until `timeout`."""
    import uuid

    deadline = time.monotonic() + timeout.total_seconds()
    if rank == 0:
        session = uuid.uuid4().hex
        store.set("ddpm/session", session)
        for other in range(1, world_size):
            joined = f"ddpm/{session}/joined/{other}"
            store.wait([joined], timedelta(seconds=max(0.001, deadline - time.monotonic())))
            store.set(f"ddpm/{session}/ack/{other}", store.get(joined))
        return f"ddpm/{session}"
    nonce = uuid.uuid4().hex.encode()
    while True:
        try:
            store.wait(["ddpm/session"], timedelta(seconds=max(0.001, deadline - time.monotonic())))
        except RuntimeError:
            raise dist.DistError(f"rank {rank}: rank 0 did not open a session within "
                                 f"{timeout.total_seconds():g}s") from None
        session = store.get("ddpm/session").decode()
        store.set(f"ddpm/{session}/joined/{rank}", nonce)
        ack = f"ddpm/{session}/ack/{rank}"
        try:
            store.wait([ack], timedelta(seconds=ack_wait))
            if store.get(ack) == nonce:
                return f"ddpm/{session}"
        except RuntimeError:  # no echo within ack_wait: a name an earlier attempt left
            pass
        if time.monotonic() > deadline:
            raise dist.DistError(f"rank {rank}: rank 0 did not open a session within {timeout.total_seconds():g}s")


# ---------------------------------------------------------------------------------------------------------- stopping
def parse_duration(text: str) -> float:
    """Seconds from '3h50m', '90m', '1h', '45s', '1d2h' or a plain number of seconds ('3600', '0.5')."""
    text = text.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?",
                             text)
        if not text or parts is None:
            raise ValueError(f"expected a duration such as 3h50m, 90m, 45s or seconds, got {text!r}") from None
        seconds = sum(float(v) * unit for v, unit in zip(parts.groups(), (86400, 3600, 60, 1)) if v)
    if not 0 < seconds <= MAX_DURATION:
        raise ValueError(f"a duration must be more than 0 and at most {MAX_DURATION:,} seconds (3 years), "
                         f"got {text!r}")
    return seconds


def stop_code(signal_number: int | None, elapsed: float, time_limit: float | None, step_seconds: float,
              save_seconds: float) -> int:
    """Why a run should stop before its next step: the number of the signal received, TIME_LIMIT when the next
    step and the final checkpoint would no longer fit in `time_limit` seconds, else 0. A pure function: the loop
    gives it the clock's readings."""
    if signal_number is not None:
        return signal_number
    if time_limit is not None and elapsed + step_seconds + save_seconds > time_limit:
        return TIME_LIMIT
    return 0


def describe_stop(code: int) -> str:
    return "the time limit (--time-limit)" if code == TIME_LIMIT else signal.Signals(code).name


class StopRequest:
    """What the training loop asks between steps: has a signal come, or would the time limit pass? Handlers only
    set `signal_number` (no torch, no lock, no I/O). A second SIGINT raises KeyboardInterrupt at once: the user
    asked twice, and gets the last checkpoint instead of a new one."""

    def __init__(self, time_limit: float | None = None, clock=time.monotonic):
        self.signal_number: int | None = None
        self.time_limit, self.clock, self.started = time_limit, clock, clock()

    def handle(self, signum, frame=None) -> None:
        if signum == signal.SIGINT and self.signal_number is not None:
            raise KeyboardInterrupt
        self.signal_number = signum

    def code(self, step_seconds: float, save_seconds: float | None) -> int:
        save = SAVE_SECONDS_UNMEASURED if save_seconds is None else save_seconds
        return stop_code(self.signal_number, self.clock() - self.started, self.time_limit, step_seconds, save)


@contextlib.contextmanager
def stop_on_signals(request: StopRequest):
    """SIGTERM, SIGINT and SIGUSR1 set `request` while the block runs; the former handlers come back after. Only
    the main thread can install handlers: elsewhere (a notebook's worker thread) nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    former = {number: signal.signal(number, request.handle) for number in STOP_SIGNALS}
    try:
        yield request
    finally:
        for number, handler in former.items():
            signal.signal(number, handler)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """A data loader worker's start: the stop signals are the main process's to act on. A worker that died of a
    Ctrl-C sent to the whole process group would end the run with "DataLoader worker exited unexpectedly"
    before the main process could save; the main process shuts its workers down when the loop ends."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
