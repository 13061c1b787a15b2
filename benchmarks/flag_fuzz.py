"""Every flag of every `ddpm` command with a wrong type, a negative, zero, a huge value, NaN and an empty string.

    python benchmarks/flag_fuzz.py [--timeout 20] [--only train,sample] [--flags serve:--host,train:--steps]

Each case runs `ddpm.cli.main(argv)` in a forked child (the parent imports torch once) on a tiny trained run,
from a base command that works and ends at once (serve listens on a free port, then closes instead of serving),
so the fuzzed flag is what fails. Every case falls in one column:

- "one-line error": exit 2 with one line on stderr, no traceback: what a bad value must give;
- "accepted": exit 0. It holds only where `ALLOWED` says the value is valid, and that flag's help says so;
  otherwise it is "accepted a bad value", a failure (e.g. a negative count run as if it were fine);
- "crash": a traceback, a signal, another exit status, or an error of more than one line: a failure;
- "hang": still running at the time limit: a failure (a valid value must not run forever either: huge values
  of lengths and counts are refused with one line).

Results: one line per failure, then the counts per column. tests/test_flag_fuzz.py runs a bounded subset.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

BAD_VALUES = {"wrong type": "abc", "negative": "-1", "zero": "0", "huge": "1000000000000", "NaN": "nan", "empty": ""}
SKIP = {"-h", "--help"}
HOLDS = ("one-line error", "accepted")  # the columns that are not failures

# Values that a flag's help says are valid, so that exit 0 is right: (command, flag) -> {kind: words of its help}.
# The words are checked against the help text, so that an entry cannot outlive what the help promises.
NAMES = {"wrong type": "folder", "negative": "folder", "zero": "folder", "huge": "folder", "NaN": "folder"}
ALLOWED: dict[tuple[str, str], dict[str, str]] = {
    # any name is a folder name (the empty one is refused)
    ("train", "--out"): NAMES, ("sample", "--out"): NAMES, ("eval", "--out"): NAMES, ("edit", "--out"): NAMES,
    ("prepare", "--out"): NAMES, ("export", "--out"): NAMES, ("distill", "--out"): NAMES,
    **{("train", flag): {"zero": "0 = "} for flag in (
        "--warmup-steps", "--weight-decay", "--grad-clip", "--ema-decay", "--ema-warmup", "--guidance-dropout",
        "--num-workers", "--sample-every", "--guidance", "--val-every", "--guide-fraction", "--max-bad-fraction",
        "--eval-every")},
    **{(command, "--seed"): {"zero": "from 0", "huge": "to 2^63 - 1"}
       for command in ("train", "sample", "eval", "edit", "distill")},
    ("sample", "--labels"): {"zero": "class labels"}, ("edit", "--labels"): {"zero": "class labels"},
    ("edit", "--strength"): {"zero": "0 (the image as it is)"},
    ("edit", "--seeds"): {"zero": "--seed A", "huge": "--seed A"},  # two equal seeds: a walk that stays put
    **{(command, flag): {"zero": "0 = "} for command in ("sample", "eval", "edit") for flag in (
        "--guidance", "--guide-weight", "--guidance-rescale")},
    **{(command, "--eta"): {"zero": "0 deterministic"} for command in ("sample", "eval", "edit")},
    **{(command, "--guidance-interval"): {"zero": "[LO, HI]"} for command in ("sample", "eval", "edit")},
    ("prepare", "--num-workers"): {"zero": "0 = "}, ("prepare", "--max-bad-fraction"): {"zero": "0 = "},
    ("distill", "--guidance"): {"zero": "0 = "}, ("distill", "--guide-weight"): {"zero": "0 = "},
    ("distill", "--eval-n"): {"zero": "0 = never"}, ("distill", "--student-average"): {"zero": "(0 = last)"},
}


def value_flags(parser: argparse.ArgumentParser, command: str) -> list[tuple[str, int, str]]:
    """(flag, how many values it takes, help text) for every option of `command` that takes a value."""
    sub = subparser(parser, command)
    flags = []
    for action in sub._actions:
        if not action.option_strings or action.option_strings[0] in SKIP or action.nargs == 0:
            continue
        flags.append((action.option_strings[-1], action.nargs if isinstance(action.nargs, int) else 1,
                      action.help or ""))
    return flags


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve_once() -> None:
    """In a case's child: `ddpm serve` opens its page as usual, then closes it instead of serving until Ctrl-C."""
    import ddpm.serve as serve

    launch = serve.launch_app

    def launch_and_close(app, host, port, **options):
        launch(app, host, port, **{**options, "block": False, "quiet": True})
        app.close()
        return app

    serve.launch_app = launch_and_close


def run_case(argv: list[str], folder: Path, timeout: float) -> tuple[str, str]:
    """(outcome, last stderr line) of main(argv) in a forked child: "one-line error", "exit 0", "hang", or a
    crash's description."""
    err_path = folder / "stderr.txt"
    pid = os.fork()
    if pid == 0:
        # a fresh working folder per case: a relative path one case writes (train --out abc) must not become a
        # valid value of the next (sample --guide abc)
        os.chdir(tempfile.mkdtemp(dir=folder, prefix="cwd"))
        fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        # to the new descriptors even where the parent had replaced the streams (pytest's capture does)
        sys.stderr, sys.stdout = open(2, "w", closefd=False), open(1, "w", closefd=False)
        try:
            import torch

            torch.set_num_threads(1)
            from ddpm.cli import main

            if argv[0] == "serve":
                _serve_once()
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
            return "hang", f"still running after {timeout:.0f}s"
        time.sleep(0.05)
    text = err_path.read_text(errors="replace").strip()
    lines = [line for line in text.splitlines() if not line.startswith("usage:") and not line.startswith("  ")]
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}", text[-300:]
    code = os.WEXITSTATUS(status)
    if "Traceback" in text:
        return "traceback", text.splitlines()[-1] if text else ""
    if code == 0:
        return "exit 0", ""
    if code == 2 and len(lines) == 1:
        return "one-line error", lines[0]
    return f"exit {code}, {len(lines)} lines", text[-300:]


def column(outcome: str, command: str, flag: str, kind: str, help_text: str) -> str:
    """The column of a case: one-line error, accepted, accepted a bad value, hang or crash."""
    if outcome == "exit 0":
        words = ALLOWED.get((command, flag), {}).get(kind)
        return "accepted" if words is not None and words in help_text else "accepted a bad value"
    if outcome in ("one-line error", "hang"):
        return outcome
    return "crash"


def edit_argv(run: Path, out: Path, flag: str) -> list[str]:
    """`ddpm edit`'s base for `flag`: image-to-image of the run's image, or for the other modes' flags that mode
    (the modes exclude each other, so a fuzzed --mask must not meet --strength)."""
    image, common = str(run.parent / "edit.png"), ["--out", str(out / "edit"), "--sampling-steps", "2", "--quiet"]
    if flag in ("--mask", "--resample"):
        return ["edit", str(run), image, "--mask", image, "--labels", "0", *common]
    if flag == "--interpolate":
        return ["edit", str(run), image, image, "--interpolate", "2", "--labels", "0", *common]
    if flag == "--seeds":
        return ["edit", str(run), "--interpolate", "2", "--seeds", "1", "2", "--labels", "0", *common]
    return ["edit", str(run), image, "--strength", "0.5", "--labels", "0", *common]


def base_argv(command: str, run: Path, out: Path, flag: str = "") -> list[str]:
    if command == "edit":
        return edit_argv(run, out, flag)
    tiny = ["--image-size", "8", "--base-channels", "8", "--channel-mults", "1,2", "--bottleneck-mult", "2",
            "--batch-size", "8", "--sample-every", "0", "--val-every", "0", "--quiet"]
    return {
        "train": ["train", "mnist", "--conditional", "--out", str(out / "train"), "--steps", "1", *tiny],
        "sample": ["sample", str(run), "--out", str(out / "sample"), "--n", "2", "--sampling-steps", "2", "--quiet"],
        "eval": ["eval", str(run), "--out", str(out / "eval"), "--n", "4", "--ref-n", "8", "--no-fid",
                 "--sampling-steps", "2", "--guidance", "1", "--classifier-steps", "2", "--quiet"],
        "prepare": ["prepare", "mnist", "--out", str(out / "prepared"), "--image-size", "8", "--quiet"],
        "serve": ["serve", str(run), "--port", str(free_port()), "--max-steps", "2", "--device", "cpu"],
        "export": ["export", str(run), "--ema-length", "0.1", "--out", str(out / "export")],
        # RUN/model, the classic EMA by name: the tiny run is too short to rebuild its post-hoc default, whose note
        # would be a second line beside every one-line error
        "distill": ["distill", str(run / "model"), "--steps", "1", "--start-steps", "2", "--round-steps", "1",
                    "--batch-size", "8", "--out", str(out / "distill"), "--quiet"],
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


def train_tiny_run(folder: Path) -> Path:
    """The tiny conditional run every sample/eval/serve case reads."""
    import numpy as np
    from PIL import Image

    from ddpm.cli import main as ddpm_main

    run = folder / "run"
    argv = base_argv("train", run, folder)
    argv[argv.index("--out") + 1] = str(run)
    assert ddpm_main(argv) == 0
    mask = np.zeros((8, 8), np.uint8)
    mask[4:] = 255  # half white: an image to edit, and a mask that regenerates its lower half
    Image.fromarray(mask).save(folder / "edit.png")
    return run


def fuzz(cases: list[tuple[str, str]] | None, commands: list[str], timeout: float, folder: Path,
         report=print) -> dict[str, list[str]]:
    """Run every bad value of every flag of `commands` (or of the (command, flag) pairs `cases`); returns the
    cases of each column, each as 'ddpm COMMAND FLAG VALUE (KIND): outcome: line'."""
    from ddpm.cli import build_parser

    parser = build_parser()
    run = train_tiny_run(folder)
    columns: dict[str, list[str]] = {}
    tried = 0
    for command in commands:
        for flag, nargs, help_text in value_flags(parser, command):
            if cases is not None and (command, flag) not in cases:
                continue
            for kind, value in BAD_VALUES.items():
                argv = with_value(base_argv(command, run, folder / f"case{tried}", flag), flag, [value] * nargs)
                outcome, line = run_case(argv, folder, timeout)
                tried += 1
                where = column(outcome, command, flag, kind, help_text)
                entry = f"ddpm {command} {flag} {value!r} ({kind}): {outcome}: {line}"
                columns.setdefault(where, []).append(entry)
                if where not in HOLDS:
                    report(f"FAIL {entry}")
    return columns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=20)
    parser.add_argument("--only", default="train,sample,edit,eval,prepare,serve,export")
    parser.add_argument("--flags", help="only these, as COMMAND:FLAG,COMMAND:FLAG")
    args = parser.parse_args()
    cases = [tuple(pair.split(":", 1)) for pair in args.flags.split(",")] if args.flags else None
    commands = sorted({c for c, _ in cases}) if cases else args.only.split(",")
    folder = Path(tempfile.mkdtemp(prefix="ddpm-flag-fuzz-"))
    os.chdir(folder)  # a relative path value (e.g. --out abc) lands here, not in the checkout
    start = time.perf_counter()
    columns = fuzz(cases, commands, args.timeout, folder, report=lambda line: print(line, flush=True))
    tried = sum(len(v) for v in columns.values())
    held = sum(len(columns.get(c, [])) for c in HOLDS)
    counts = ", ".join(f"{name} {len(columns.get(name, []))}" for name in
                       ("one-line error", "accepted", "accepted a bad value", "crash", "hang"))
    print(f"{tried} cases tried ({len(BAD_VALUES)} values x every flag of {','.join(commands)}), {held} held, "
          f"{tried - held} failed, in {time.perf_counter() - start:.0f}s: {counts}")


if __name__ == "__main__":
    main()
