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


def latest_step(run: Path) -> int:
    try:
        return int((run / "latest").read_text().split("step_")[1].split(".")[0])
    except (OSError, IndexError, ValueError):
        return 0


def one_case(max_restarts: int, extra: list[str], rdzv_conf: list[str], observe: float, keep: Path | None,
             how: str) -> dict:
    """`how`: worker (kill -9 of node 1's worker), node (kill -9 of node 1's launcher and worker: the node is
    gone), freeze (SIGSTOP of node 1's worker: alive, silent, its sockets open)."""
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary) if keep is None else keep / f"{how}_restarts{max_restarts}"
        folder.mkdir(parents=True, exist_ok=True)
        run = folder / "run"
        launchers = launch_two_nodes(run, folder, max_restarts, extra, rdzv_conf, free_port())
        try:
            deadline = time.time() + 120
            while not latest_step(run) and time.time() < deadline:
                if any(launcher.poll() is not None for launcher in launchers):
                    raise SystemExit("a launcher ended before the first checkpoint:\n"
                                     + (folder / "node0.log").read_text()[-3000:])
                time.sleep(0.1)
            victim = worker_of(launchers[1].pid)
            if victim is None:
                raise SystemExit("no worker found under node 1's launcher")
            if how == "node":  # the worker runs in a session of its own: both go, as when a machine dies
                os.killpg(launchers[1].pid, signal.SIGKILL)
                os.kill(victim, signal.SIGKILL)
            else:
                os.kill(victim, signal.SIGKILL if how == "worker" else signal.SIGSTOP)
            killed_at, step_at_kill = time.time(), latest_step(run)
            ended, resumed = [None, None], None
            while None in ended and time.time() - killed_at < observe:
                for rank, launcher in enumerate(launchers):
                    if ended[rank] is None and launcher.poll() is not None:
                        ended[rank] = time.time() - killed_at
                if resumed is None and latest_step(run) > step_at_kill + 5:  # a checkpoint written after the kill
                    resumed = time.time() - killed_at
                    break
                time.sleep(0.1)
            nodes = {}
            for rank in (0, 1):
                if ended[rank] is not None:
                    nodes[f"node{rank}"] = f"exit {launchers[rank].returncode} after {ended[rank]:.1f}s"
                else:
                    nodes[f"node{rank}"] = "training again" if resumed else f"running after {observe:.0f}s"
            return {"kill": how, "max_restarts": max_restarts, "flags": " ".join(extra) or "(defaults)",
                    "rdzv_conf": ",".join(rdzv_conf) or "(defaults)", **nodes,
                    "resumed": f"a new checkpoint {resumed:.1f}s after the kill" if resumed else "no",
                    "node0_says": ddpm_line(folder / "node0.log")}
        finally:  # torchrun's workers run in sessions of their own: each is killed by its pid
            for launcher in launchers:
                workers = [worker_of(launcher.pid)]
                if launcher.poll() is None:
                    os.killpg(launcher.pid, signal.SIGKILL)
                    launcher.wait()
                for pid in [*workers, victim]:
                    try:
                        if pid is not None:
                            os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass


def ddpm_line(path: Path) -> str:
    """The worker's own last line (`ddpm train: ...`), not torchrun's report."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.startswith("ddpm train")]
    return lines[-1][:160] if lines else "(none)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-restarts", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--dist-timeout", default=None, help="ddpm train --dist-timeout (default: ddpm's)")
    parser.add_argument("--rdzv-conf", nargs="*", default=[], help="extra torchrun --rdzv-conf KEY=VALUE items")
    parser.add_argument("--observe", type=float, default=300.0, help="seconds to wait for both launchers")
    parser.add_argument("--kill", nargs="+", default=["worker"], choices=("worker", "node", "freeze"),
                        help="worker: kill -9 of node 1's worker; node: of its launcher too; freeze: SIGSTOP")
    parser.add_argument("--keep", type=Path, help="keep the launchers' logs (node0.log, node1.log) in this folder")
    args = parser.parse_args()
    extra = [] if args.dist_timeout is None else ["--dist-timeout", args.dist_timeout]
    for how in args.kill:
        for restarts in args.max_restarts:
            row = one_case(restarts, extra, args.rdzv_conf, args.observe, args.keep, how)
            print(" | ".join(f"{key}: {value}" for key, value in row.items()), flush=True)


if __name__ == "__main__":
    main()
