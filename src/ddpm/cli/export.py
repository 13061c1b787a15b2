"""`ddpm export`: a post-hoc EMA average of a run as a standalone model folder."""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from ..checkpoint import WEIGHTS, RunFolder
from ..errors import DdpmError, DdpmWarning
from .common import HelpFormatter, add_ema_flags, add_out_flag, folder_path, run_folder


def add_export_parser(sub) -> None:
    ex = sub.add_parser("export", help="write a post-hoc EMA average of a run as a standalone model folder",
                        formatter_class=HelpFormatter,
                        description="Rebuild the weights averaged with --ema-length from the run's post-hoc EMA "
                                    "snapshots (Karras et al. 2024) and write them as a model folder "
                                    "(model.safetensors + config.json), which ddpm sample, eval, serve and --guide "
                                    "read like any other.")
    ex.add_argument("model", type=folder_path, help="run folder (trained with --ema-lengths)")
    add_out_flag(ex.add_argument, "the model folder to write")
    add_ema_flags(ex, guide=False)


def cmd_export(args: argparse.Namespace) -> int:
    from ..snapshots import rebuilt_model_dir

    _check_source(Path(args.model))
    if args.ema_length is None:
        raise DdpmError("give --ema-length S, the average's relative length (e.g. 0.1); the run's own EMA is "
                        f"already a model folder: {RunFolder.containing(args.model).model}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DdpmError(f"--out {out} is a file; give a folder for the model")
    folder = rebuilt_model_dir(run_folder(Path(args.model)), args.ema_length, args.ema_step, out=out,
                               warn=lambda text: warnings.warn(text, DdpmWarning, stacklevel=2))
    print(f"wrote {folder} (EMA length {args.ema_length:g}); sample it: ddpm sample {folder} --out SAMPLES")
    return 0


def _check_source(path: Path) -> None:
    """One line unless `path` is a run (or its model/ or best/ folder): a model folder (a student's, an export's)
    has no snapshots to average, and its message says it is drawn as it is."""
    if RunFolder.containing(path) is not None:
        return
    if (path / WEIGHTS).is_file():
        raise DdpmError(f"{path} is a model folder, which ddpm sample, eval and serve read as it is; export rebuilds "
                        "a post-hoc EMA average from a run folder trained with --ema-lengths")
    raise DdpmError(f"{path} is not a run folder; give the folder of a run trained with --ema-lengths")
