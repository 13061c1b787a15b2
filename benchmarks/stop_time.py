"""How long `ddpm train` takes to stop at a checkpoint after SIGTERM: the grace period a cluster must give it.

    python benchmarks/stop_time.py [--repeats 3] [--only quickstart,landscape64]

For each configuration it starts `ddpm train` as a user would, waits until it has trained a few steps (its
TensorBoard log grows at every step with --log-every 1), sends SIGTERM at a random moment of a step, and times
the signal to the process's exit. Beside that, the same configuration's step time and checkpoint write are timed
in this process, so the stop can be compared with "one step plus one checkpoint". Machine noise: run it with
nothing else running.
"""
from __future__ import annotations

import argparse
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    # the quickstart as `make demo` trains it; the seed's 64x64 UNet (landscape64) on the bundled photos
    "quickstart": ["--preset", "quickstart"],
    "landscape64": ["photos", "--preset", "landscape64"],
}
COMMON = ["--steps", "100000", "--checkpoint-every", "100000", "--sample-every", "0", "--val-every", "0",
          "--log-every", "1", "--num-workers", "0", "--quiet", "--device", "cpu"]


def log_bytes(run: Path) -> int:
    folder = run / "tensorboard"
    return sum(f.stat().st_size for f in folder.iterdir()) if folder.is_dir() else 0


def time_a_stop(argv: list[str], run: Path, rng: random.Random) -> tuple[float, int, str]:
    """(seconds from SIGTERM to exit, exit status, the last stderr line)."""
    proc = subprocess.Popen([sys.executable, "-m", "ddpm", "train", *argv, "--out", str(run), *COMMON],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while log_bytes(run) < 3000 and proc.poll() is None:  # a few steps logged: the loop runs
        time.sleep(0.05)
    time.sleep(rng.uniform(0, 2))  # anywhere in a step
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    return time.perf_counter() - sent, proc.returncode, err.strip().splitlines()[-1] if err.strip() else ""


def time_step_and_save(argv: list[str], run: Path) -> tuple[float, float]:
    """(seconds per training step, seconds per checkpoint write) of the same configuration, in this process."""
    import torch

    from ddpm.cli import build_parser, train_config_from_args
    from ddpm.monitor import RankZeroMonitor
    from ddpm.run_setup import prepare
    from ddpm.training import Trainer, save

    config = train_config_from_args(build_parser().parse_args(["train", *argv, "--out", str(run), *COMMON]))
    config, info = prepare(config)
    trainer = Trainer(config, info, torch.device("cpu"))
    monitor = RankZeroMonitor(trainer, run, 100000, show_progress=False)
    batches = trainer.data.batches(0, 6)
    trainer.step(*next(batches))  # the first step allocates
    start = time.perf_counter()
    for x0, labels in batches:
        trainer.step(x0, labels)
    step = (time.perf_counter() - start) / 5
    start = time.perf_counter()
    save(trainer, monitor)
    save = time.perf_counter() - start
    monitor.close(trainer)
    return step, save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=",".join(CONFIGS))
    args = parser.parse_args()
    rng = random.Random(0)
    folder = Path(tempfile.mkdtemp(prefix="ddpm-stop-time-"))
    print("| configuration | one step | one checkpoint | SIGTERM to exit (median, max of N) | exit status |")
    print("|---|---|---|---|---|")
    for name in args.only.split(","):
        step, save = time_step_and_save(CONFIGS[name], folder / f"{name}-timed")
        stops, codes = [], set()
        for k in range(args.repeats):
            seconds, code, line = time_a_stop(CONFIGS[name], folder / f"{name}-{k}", rng)
            stops.append(seconds)
            codes.add(code)
            print(f"  {name} #{k}: {seconds:.2f}s, exit {code}: {line}", file=sys.stderr)
        print(f"| {name} | {step:.2f}s | {save:.2f}s | {statistics.median(stops):.2f}s, {max(stops):.2f}s "
              f"(N={len(stops)}) | {', '.join(map(str, sorted(codes)))} |", flush=True)


if __name__ == "__main__":
    main()
