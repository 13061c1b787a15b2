"""What a two-node torchrun job does when one node's worker is killed (kill -9): how long until every launcher has
exited, with which status and which last lines. Two launchers on 127.0.0.1 stand in for two nodes, one CPU worker
each, training the tiny test model.

    python benchmarks/dead_peer.py [--max-restarts 0 1] [--dist-timeout 30s] [--rdzv-conf ...] [--observe 300]

Each case prints one row: the killed node's and the surviving node's exit time (seconds after the kill), exit
code and last line of output. A launcher still running after --observe seconds is reported as such, and its
process group is then killed.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ["--image-size", "8", "--base-channels", "8", "--channel-mults", "1,2", "--bottleneck-mult", "2",
        "--batch-size", "8", "--sample-every", "0", "--quiet", "--val-every", "0", "--num-workers", "0",
        "--device", "cpu", "--log-every", "5"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker_of(launcher_pid: int) -> int | None:
    """The pid of the torchrun worker (a child of the launcher that has RANK in its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher_pid and b"\0RANK=" in b"\0" + environ:
            return int(entry.name)
    return None


def launch_two_nodes(run: Path, logs: Path, max_restarts: int, extra: list[str], rdzv_conf: list[str],
                     port: int) -> list[subprocess.Popen]:
    argv = ["-m", "ddpm", "train", "mnist", "--conditional", "--out", str(run), "--steps", "100000",
            "--checkpoint-every", "5", "--resume-if-exists", *TINY, *extra]
    launchers = []
    for rank in (0, 1):
        conf = ",".join([f"is_host={int(rank == 0)}", *rdzv_conf])
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                   "--rdzv-id", f"dead-peer-{port}", "--rdzv-conf", conf, "--max-restarts", str(max_restarts),
                   "--monitor-interval", "0.5", *argv]
        with open(logs / f"node{rank}.log", "w") as log:
            launchers.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                              env={**os.environ, "OMP_NUM_THREADS": "1"}))
    return launchers


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def one_case(max_restarts: int, extra: list[str], rdzv_conf: list[str], observe: float) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        launchers = launch_two_nodes(folder / "run", folder, max_restarts, extra, rdzv_conf, free_port())
        try:
            deadline = time.time() + 120
            while not (folder / "run" / "latest").exists() and time.time() < deadline:
                if any(launcher.poll() is not None for launcher in launchers):
                    raise SystemExit("a launcher ended before the first checkpoint:\n"
                                     + (folder / "node0.log").read_text()[-3000:])
                time.sleep(0.1)
            victim = worker_of(launchers[1].pid)
            if victim is None:
                raise SystemExit("no worker found under node 1's launcher")
            os.kill(victim, signal.SIGKILL)
            killed_at = time.time()
            ended = [None, None]
            while None in ended and time.time() - killed_at < observe:
                for rank, launcher in enumerate(launchers):
                    if ended[rank] is None and launcher.poll() is not None:
                        ended[rank] = time.time() - killed_at
                time.sleep(0.1)
            return {"max_restarts": max_restarts, "flags": " ".join(extra) or "(defaults)",
                    "rdzv_conf": ",".join(rdzv_conf) or "(defaults)",
                    **{f"node{rank}": (f"{ended[rank]:.1f}s, exit {launchers[rank].returncode}"
                                       if ended[rank] is not None else f"still running after {observe:.0f}s")
                       for rank in (0, 1)},
                    **{f"node{rank}_last": last_line(folder / f"node{rank}.log") for rank in (0, 1)}}
        finally:
            for launcher in launchers:
                if launcher.poll() is None:
                    os.killpg(launcher.pid, signal.SIGKILL)
                    launcher.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-restarts", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--dist-timeout", default=None, help="ddpm train --dist-timeout (default: ddpm's)")
    parser.add_argument("--rdzv-conf", nargs="*", default=[], help="extra torchrun --rdzv-conf KEY=VALUE items")
    parser.add_argument("--observe", type=float, default=300.0, help="seconds to wait for both launchers")
    args = parser.parse_args()
    extra = [] if args.dist_timeout is None else ["--dist-timeout", args.dist_timeout]
    for restarts in args.max_restarts:
        row = one_case(restarts, extra, args.rdzv_conf, args.observe)
        print(" | ".join(f"{key}: {value}" for key, value in row.items()), flush=True)


if __name__ == "__main__":
    main()
