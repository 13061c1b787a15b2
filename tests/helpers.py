"""What several test files share: the tiny model and the fake data folders. Test files import from here, never
from each other (tests/ is on sys.path through pyproject's [tool.pytest.ini_options] pythonpath)."""
import os
import pickle
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ddpm import ModelConfig

# A UNet small enough for CPU tests: two levels, width 8, 8x8 grayscale (the rest are ModelConfig's defaults).
TINY_MODEL = dict(image_size=8, in_channels=1, base_channels=8, channel_mults=(1, 2), bottleneck_mult=2,
                  time_embed_dim=16, num_heads=4)


# The same model as `ddpm train` flags (a 1-step run of it takes about a second).
TINY_TRAIN_ARGS = ["--image-size", "8", "--base-channels", "8", "--channel-mults", "1,2", "--bottleneck-mult", "2",
                   "--batch-size", "8", "--sample-every", "0", "--quiet"]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now, below Linux's ephemeral range (32768-60999): the kernel
    never hands those out to outgoing connections, so the port stays free until the caller binds it, unless another
    program binds it by number."""
    import random

    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError("no free port in 20000-31999")


def checkpoint_step(run) -> int:
    """The step a run's `latest` points at (0 before the first checkpoint); read without torch while a writer runs."""
    try:
        return int((run / "latest").read_text().strip().split("step_")[1].split(".")[0])
    except (OSError, IndexError, ValueError):
        return 0


def logged(run_dir, tag: str) -> dict[int, float]:
    """The run's TensorBoard scalars of `tag` by step, read back from its event files (a resumed run's purge applied;
    {} when the tag was never written)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {}


def tiny_model_config(**overrides) -> ModelConfig:
    """TINY_MODEL with `overrides` (num_classes=10, image_size=16, ...) as a validated ModelConfig."""
    return ModelConfig(**{**TINY_MODEL, **overrides})


class TracedCapture:
    """A CPU stand-in for CUDA graph capture (step_graph.StepRunner's `capture`) that counts its replays.

    make_fx traces the step while running it once, and the traced graph replays the same ops on the same tensors
    with every Python value frozen at the trace, as a CUDA graph does. Like a CUDA graph, every replay writes its
    results into the same output tensors (the ones the capture returned), so a caller that keeps a step's outputs
    past the next step sees them overwritten, as it would on a GPU. A step that reads a Python number which changes
    between steps, or rebinds a tensor instead of writing into it, goes wrong here as it would on a GPU.

    `replays[k]` counts the replays of the k-th capture: a runner that captures and then runs the step eagerly
    leaves it at 0."""

    def __init__(self):
        self.replays: list[int] = []

    def __call__(self, step, stream=None):
        import torch
        from torch.fx.experimental.proxy_tensor import make_fx

        ran = {}

        def run(_):
            ran["outputs"] = step()
            return ran["outputs"]

        graph = make_fx(run)(torch.zeros(()))
        outputs = ran["outputs"]
        index = len(self.replays)
        self.replays.append(0)

        def replay():
            with torch.no_grad():  # the trace holds the backward's ops already; a CUDA graph's outputs have no autograd
                for static, fresh in zip(outputs, graph(torch.zeros(())), strict=True):
                    static.copy_(fresh)  # one address per output, overwritten by each replay
            self.replays[index] += 1
            return outputs

        return replay, outputs


# ------------------------------------------------------------------------------------------ fake data on disk
def write_mixed_folder(root):
    """A class-folder tree of images in every awkward mode and size, plus one file that is not an image."""
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    Image.fromarray(np.full((20, 30), 200, np.uint8), "L").save(root / "cats" / "gray.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 10, 4), dtype=np.uint8), "RGBA").save(
        root / "cats" / "rgba.png")
    Image.fromarray(np.zeros((7, 7), np.uint8), "L").convert("P").save(root / "dogs" / "palette.gif")
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(root / "dogs" / "sixteen.png")
    Image.fromarray(np.zeros((100, 60, 3), np.uint8)).save(root / "dogs" / "big.jpg")
    (root / "dogs" / "notes.txt").write_text("not an image")


def write_fake_cifar(root, per_batch=4):
    """CIFAR-10's python batches (5 x `per_batch` random images); returns the folder and the last batch's entry."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for b in range(1, 6):
        entry = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": [(b + i) % 10 for i in range(per_batch)]}
        with open(folder / f"data_batch_{b}", "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{k}" for k in range(10)]}, f)
    return folder, entry


def write_with_bad_files(root):
    """Five files, labelled by class folder: c0/0 ok, c0/1 bad, c1/2 bad, c1/3 ok, c1/4 bad (the last one)."""
    files = (("c0/0.png", 10), ("c0/1.png", None), ("c1/2.jpg", None), ("c1/3.png", 200), ("c1/4.png", None))
    for name, value in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if value is None:
            path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
        else:
            Image.fromarray(np.full((8, 8), value, np.uint8), "L").save(path)


# -- child processes that never hang a test -------------------------------------------------------------------------
LIVE: list["Child"] = []  # killed by conftest's autouse fixture after each test, whatever it left running


class Child:
    """A process whose stdout and stderr go to files (`NAME.out`, `NAME.err` in `folder`: a pipe nobody reads can
    block it), in its own process group (a timeout kills it with everything it started), and whose log tails
    every failure message shows."""

    def __init__(self, argv: list[str], folder: Path, name: str, *, env=None, cwd=None, preexec_fn=None):
        self.name, self.out, self.err = name, Path(folder) / f"{name}.out", Path(folder) / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True,
                                         preexec_fn=preexec_fn)
        self.pid = self.proc.pid
        LIVE.append(self)

    @property
    def returncode(self):
        return self.proc.returncode

    def poll(self):
        return self.proc.poll()

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def tail(self, chars: int = 2500) -> str:
        return (f"--- {self.name} (pid {self.pid}, exit {self.proc.returncode}) stderr:\n{self.stderr()[-chars:]}\n"
                f"--- {self.name} stdout:\n{self.stdout()[-chars // 2:]}")

    def kill_group(self) -> None:
        """SIGKILL to its process group and to every descendant: torchrun starts its workers in sessions of their
        own, out of the launcher's group."""
        below = descendants(self.pid)
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in below:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def wait(self, timeout: float, *others: "Child") -> int:
        """This process's exit code; past `timeout` seconds it and `others` are killed (process groups) and the
        test fails with every log tail."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for child in (self, *others):
                child.kill_group()
            raise AssertionError(f"{self.name} still running after {timeout:.0f}s (killed)\n"
                                 + "\n".join(child.tail() for child in (self, *others))) from None


def run_child(argv: list[str], folder: Path, name: str, timeout: float = 120, **options) -> Child:
    """Run a process to its end as a Child (output to files, its group killed past `timeout`, tails on failure)."""
    child = Child(argv, folder, name, **options)
    child.wait(timeout)
    return child


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...), read from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        below = [child for child, parent in parents.items() if parent in frontier]
        found += below
        frontier = below
    return found


def wait_all(children: list[Child], timeout: float) -> list[int]:
    """Every child's exit code, within one shared deadline; on timeout all are killed and every tail shown."""
    deadline = time.time() + timeout
    for child in children:
        child.wait(max(0.1, deadline - time.time()), *[c for c in children if c is not child])
    return [child.returncode for child in children]


def kill_live_children() -> None:
    while LIVE:
        child = LIVE.pop()
        if child.poll() is None:
            child.kill_group()
