"""No image file can crash, hang or blow up a run: 1,200 malformed files (tests/image_fuzz.py, seed 0) mixed with
good ones, through `ddpm prepare` (in loader workers) and `ddpm train --conditional` (in the main process), each
in a subprocess with a time limit.

The bug this catches: torchvision.io's PNG decoder (torchvision 0.29) kills the process with a segmentation fault
on a PNG whose compressed data is damaged or short, and libjpeg through it allocates whatever a header claims
(10.7 GB for one file). On the decoder before this test, `ddpm prepare` died of SIGSEGV in a worker.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY_TRAIN_ARGS
from image_fuzz import good_files, malformed_files

MALFORMED, GOOD = 1200, 336  # 1,536 files: 24 batches of 64, so one epoch visits every file
# Each command's peak measured 1.0-1.7 GB (python, torch, the loader; one decode is at most ~100 MB of it: see
# `python benchmarks/bench.py fuzz`); one 65535 x 65535 JPEG header decoded as it claims took 10.7 GB.
RSS_LIMIT_MB = 2500


def run_measured(args: list[str], cwd: Path, timeout: float) -> tuple[int, str, str, float]:
    """(exit status, or -signal; stdout; stderr; peak resident MB of the process and the children it reaped)."""
    import subprocess

    out, err = cwd / "stdout.txt", cwd / "stderr.txt"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "ddpm", *args], cwd=cwd, stdout=stdout, stderr=stderr,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:  # the command and its loader workers
                os.killpg(process.pid, signal.SIGKILL)
                _, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.05)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    assert time.monotonic() <= deadline, (f"ddpm {args[0]} did not finish within {timeout}s (a hang?); its stderr "
                                          f"ends:\n{err.read_text()[-2000:]}")
    return process.returncode, out.read_text(), err.read_text(), usage.ru_maxrss / 1024


def assert_clean_exit(status: int, stderr: str, rss: float, allowed=(0,)) -> None:
    assert status >= 0, f"killed by signal {-status}:\n{stderr[-2000:]}"
    assert status in allowed, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert rss < RSS_LIMIT_MB, f"peak resident memory {rss:.0f} MB"


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory) -> tuple[Path, list[str]]:
    """Two class folders holding the malformed and the good files, alternately; returns (folder, every path)."""
    folder = tmp_path_factory.mktemp("fuzz") / "images"
    paths = []
    for i, (name, data) in enumerate(malformed_files(MALFORMED, seed=0) + good_files(GOOD, seed=1)):
        path = folder / ("a" if i % 2 == 0 else "b") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths.append(str(path))
    return folder, paths


@pytest.mark.slow
def test_prepare_and_train_survive_malformed_files_and_account_for_every_one(fuzz_folder, tmp_path):
    folder, paths = fuzz_folder
    prepared = tmp_path / "prepared"
    status, _, err, rss = run_measured(["prepare", str(folder), "--out", str(prepared), "--image-size", "8",
                                        "--conditional", "--num-workers", "2", "--max-bad-fraction", "1", "--quiet"],
                                       tmp_path, timeout=60)
    assert_clean_exit(status, err, rss)
    import json

    meta = json.loads((prepared / "meta.json").read_text())
    bad = (prepared / "bad_files.txt").read_text().split("\n")[:-1]
    assert sorted(bad) == sorted(meta["splits"]["train"]["skipped"])
    assert meta["count"] + len(bad) == len(paths)  # every file loaded or listed as bad
    assert set(bad) <= set(paths) and not any(p.rsplit("/", 1)[1].startswith("good_") for p in bad)
    assert len(bad) > MALFORMED // 2  # the corpus really is malformed (757 of 1,200 at seed 0)
    images = np.concatenate([np.load(prepared / s) for s in meta["splits"]["train"]["shards"]])
    assert images.shape == (meta["count"], 3, 8, 8)

    # one epoch of training in the main process visits every file once: the same files come out bad
    tiny = [*TINY_TRAIN_ARGS, "--batch-size", "64", "--val-every", "0", "--device", "cpu"]  # the last value counts
    run = tmp_path / "run"
    status, _, err, rss = run_measured(["train", str(folder), "--conditional", "--out", str(run), "--epochs", "1",
                                        "--max-bad-fraction", "1", *tiny], tmp_path, timeout=60)
    assert_clean_exit(status, err, rss)
    assert sorted((run / "bad_files.txt").read_text().split("\n")[:-1]) == sorted(bad)
    assert (run / "model" / "model.safetensors").is_file()

    # at the default threshold (1%: 15 files) the run stops with one line naming the list
    status, _, err, rss = run_measured(["train", str(folder), "--conditional", "--out", str(tmp_path / "strict"),
                                        "--steps", "2", *tiny], tmp_path, timeout=60)
    assert_clean_exit(status, err, rss, allowed=(2,))
    assert len(err.strip().splitlines()) == 1 and "cannot be read" in err and "bad_files.txt" in err
