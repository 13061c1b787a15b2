"""Every flag of every `ddpm` command with a wrong type, a negative, zero, a huge value, NaN and an empty string.

    python benchmarks/flag_fuzz.py [--timeout 20] [--only train,sample]

Each case runs `ddpm.cli.main(argv)` in a forked child (the parent imports torch once) on a tiny trained run.
A case holds when the command exits 0 (the value is valid), or 2 with one line on stderr and no traceback, or is
still working at the time limit (a valid value that takes long, e.g. --steps 10^12); it fails on a traceback, a
signal, another exit status, or more than one line of error. Results: one line per failure, then the counts.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

BAD_VALUES = {"wrong type": "abc", "negative": "-1", "zero": "0", "huge": "1000000000000", "NaN": "nan", "empty": ""}
SKIP = {"-h", "--help"}


def value_flags(parser: argparse.ArgumentParser, command: str) -> list[tuple[str, int]]:
    """(flag, how many values it takes) for every option of `command` that takes a value."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = []
    for action in sub._actions:
        if not action.option_strings or action.option_strings[0] in SKIP or action.nargs == 0:
            continue
        flags.append((action.option_strings[-1], action.nargs if isinstance(action.nargs, int) else 1))
    return flags


def run_case(argv: list[str], folder: Path, timeout: float) -> tuple[str, str]:
    """(outcome, last stderr line) of main(argv) in a forked child."""
    err_path = folder / "stderr.txt"
    pid = os.fork()
    if pid == 0:
        fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        try:
            import torch

            torch.set_num_threads(1)
            from ddpm.cli import main

            status = main(argv)
        except SystemExit as exit_:  # argparse's own errors: exit 2 and a usage line
            status = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: BLE001 - a traceback is exactly what this script looks for
            import traceback

            traceback.print_exc()
            status = 99
        sys.stderr.flush()
        os._exit(status)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return "running at the time limit", ""
        time.sleep(0.05)
    text = err_path.read_text(errors="replace").strip()
    lines = [line for line in text.splitlines() if not line.startswith("usage:") and not line.startswith("  ")]
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}", text[-300:]
    code = os.WEXITSTATUS(status)
    if "Traceback" in text:
        return "traceback", text.splitlines()[-1] if text else ""
    if code == 0:
        return "ok", ""
    if code == 2 and len(lines) == 1:
        return "one-line error", lines[0]
    return f"exit {code}, {len(lines)} lines", text[-300:]


def base_argv(command: str, run: Path, out: Path) -> list[str]:
    tiny = ["--image-size", "8", "--base-channels", "8", "--channel-mults", "1,2", "--bottleneck-mult", "2",
            "--batch-size", "8", "--sample-every", "0", "--val-every", "0", "--quiet"]
    return {
        "train": ["train", "mnist", "--conditional", "--out", str(out / "train"), "--steps", "1", *tiny],
        "sample": ["sample", str(run), "--out", str(out / "sample"), "--n", "2", "--sampling-steps", "2", "--quiet"],
        "eval": ["eval", str(run), "--out", str(out / "eval"), "--n", "4", "--ref-n", "8", "--no-fid",
                 "--sampling-steps", "2", "--guidance", "1", "--classifier-steps", "2", "--quiet"],
        "prepare": ["prepare", "mnist", "--out", str(out / "prepared"), "--image-size", "8", "--quiet"],
        "serve": ["serve", str(run), "--port", "0", "--max-steps", "2"],
    }[command]


def with_value(argv: list[str], flag: str, values: list[str]) -> list[str]:
    """argv with `flag` set to `values` (replacing its earlier value where argv already has it)."""
    if flag in argv:
        at = argv.index(flag)
        end = at + 1
        while end < len(argv) and not argv[end].startswith("--"):
            end += 1
        argv = argv[:at] + argv[end:]
    return argv + [f"{flag}={values[0]}"] + values[1:] if values[0].startswith("-") else argv + [flag, *values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=20)
    parser.add_argument("--only", default="train,sample,eval,prepare,serve")
    args = parser.parse_args()
    from ddpm.cli import build_parser
    from ddpm.cli import main as ddpm_main

    ddpm_parser = build_parser()
    folder = Path(tempfile.mkdtemp(prefix="ddpm-flag-fuzz-"))
    os.chdir(folder)  # a relative path value (e.g. --out abc) lands here, not in the checkout
    run = folder / "run"
    assert ddpm_main(base_argv("train", run, folder)[:4] + [str(run)] + base_argv("train", run, folder)[5:]) == 0
    counts: dict[str, int] = {}
    tried = held = 0
    start = time.perf_counter()
    for command in args.only.split(","):
        for flag, nargs in value_flags(ddpm_parser, command):
            for kind, value in BAD_VALUES.items():
                out = folder / f"case{tried}"
                argv = with_value(base_argv(command, run, out), flag, [value] * nargs)
                outcome, line = run_case(argv, folder, args.timeout)
                tried += 1
                counts[outcome] = counts.get(outcome, 0) + 1
                if outcome in ("ok", "one-line error", "running at the time limit"):
                    held += 1
                else:
                    print(f"FAIL ddpm {command} {flag} {value!r} ({kind}): {outcome}: {line}", flush=True)
    print(f"{tried} cases tried ({len(BAD_VALUES)} values x every flag of {args.only}), {held} held, "
          f"{tried - held} failed, in {time.perf_counter() - start:.0f}s: {counts}")


if __name__ == "__main__":
    main()
