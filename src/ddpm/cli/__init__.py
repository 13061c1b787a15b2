"""`ddpm train | sample | edit | eval | distill | prepare | serve | export`: parse flags into config objects and call
the library.

One module a command (its parser beside its function), `common` for what they share. Only this package prints
tables and maps errors to exit codes: a `DdpmError` (bad input, unusable file) is one line on stderr and exit 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

from ..errors import DdpmError, DdpmWarning, PeerLost
from . import distill, edit, evaluate, export, prepare, sample, serve, train
from .common import sampling_configs
from .distill import add_distill_parser
from .edit import add_edit_parser
from .evaluate import add_eval_parser
from .export import add_export_parser
from .prepare import add_prepare_parser
from .sample import add_sample_parser
from .serve import add_serve_parser
from .train import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_PEER_LOST,
    EXIT_WRITE_FAILED,
    TRAIN_FLAGS,
    Interrupted,
    add_train_parser,
    train_config_from_args,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm",
                                     description="Train and sample denoising diffusion models (DDPM, DDIM, "
                                                 "DPM-Solver++, classifier-free guidance).")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_sample_parser(sub)
    add_edit_parser(sub)
    add_eval_parser(sub)
    add_distill_parser(sub)
    add_prepare_parser(sub)
    add_export_parser(sub)
    add_serve_parser(sub)
    return parser





# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def one_line_warnings(command: str):
    """ddpm's own warnings (DdpmWarning) as one line each, `ddpm train: warning: ...`: Python's default format adds
    a file, a line number and a source line, which tell a user nothing. Other libraries' warnings keep theirs."""
    default = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None):
        if issubclass(category, DdpmWarning):
            return f"ddpm {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = default


def main(argv: list[str] | None = None) -> int:
    from ..training import TrainingDiverged

    args = build_parser().parse_args(argv)
    # looked up at each call, so that a test can replace one command's function in its module
    commands = {"train": train.cmd_train, "sample": sample.cmd_sample, "edit": edit.cmd_edit, "eval": evaluate.cmd_eval,
                "distill": distill.cmd_distill,
                "prepare": prepare.cmd_prepare, "serve": serve.run_serve, "export": export.cmd_export}
    try:
        with one_line_warnings(args.command):
            return commands[args.command](args)
    except TrainingDiverged as error:
        print(f"ddpm {args.command}: stopped: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    except PeerLost as error:
        print(f"ddpm {args.command}: stopped: {error}", file=sys.stderr, flush=True)
        return EXIT_PEER_LOST
    except Interrupted as error:
        print(f"ddpm {args.command}: {error}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DdpmError as error:
        print(f"ddpm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # disk full, permissions: earlier checkpoints are intact (writes are atomic)
        print(f"ddpm {args.command}: error: cannot write {error.filename or ''}: {error.strerror or error}; "
              "files written before are intact (free space or fix permissions, then --resume)", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except KeyboardInterrupt:
        print(f"ddpm {args.command}: interrupted; files written before are kept", file=sys.stderr)
        return 130


def run() -> None:
    """The process's entry (`ddpm`, `python -m ddpm`): main's status as the exit status. After a lost torchrun peer
    the process leaves at once, without the interpreter's teardown, in which the broken process group's threads can
    abort it (torchrun then reported SIGABRT instead of EXIT_PEER_LOST, once in the suite's two-node test)."""
    code = main()
    if code == EXIT_PEER_LOST:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()


__all__ = ["main", "build_parser", "train_config_from_args", "sampling_configs", "one_line_warnings", "TRAIN_FLAGS"]
