"""Quality in the training log: every `--eval-every` steps rank 0 draws K images from the classic EMA weights
(RUN/model) with `ddpm sample`'s default settings (autoguided by the run's guide/ snapshot once it exists) and scores
them with `ddpm eval`'s own library, so the logged `eval/*` numbers are what `ddpm eval RUN/model --n K --seed 0
--sampling-steps S` reports at that step. They are not what `ddpm eval RUN` reports after training: that draws the
post-hoc EMA default, rebuilt from snapshots only once the run is done (a rebuild per evaluation is not paid for
here). `--keep-best METRIC` exports the best-scoring classic EMA weights to RUN/best/.

The evaluator (real reference images, the floor, the evaluation classifier) is prepared once, at the first
evaluation, from the run's training data, and shares `ddpm eval`'s cache (RUN/eval/cache), so the classifier is
trained once for both. FID needs Inception-v3, about 0.3 s an image on a CPU: it is computed on accelerators, and on
a CPU only when the data has no labels (then it is the only metric); classifier metrics whenever the data has
labels.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import RunConfig, SamplingConfig, sampling_defaults
from .evaluation import prepare_evaluator, saturated_fraction
from .files import to_uint8
from .pipeline import balanced_labels, sample_all

EVAL_SEED = 0  # `ddpm eval`'s default seed: the same noise at every evaluation, so curves differ by the weights
EVAL_BATCH = 64  # `ddpm eval`'s default --batch-size (batch b is seeded by (seed, b)): the same images
CLASSIFIER_STEPS = 800  # `ddpm eval`'s default --classifier-steps: the same classifier, trained once for both
BEST_DIR = ckpt.BEST_DIR
METRICS = {"classifier_fd": "lower", "fid": "lower", "accuracy": "higher"}  # --keep-best's choices, and better is


def eval_sampling(steps: int, guided: bool) -> SamplingConfig:
    """`ddpm sample`'s default settings (config.sampling_defaults) at `steps` DPM-Solver++ steps."""
    return SamplingConfig(steps=steps, **sampling_defaults(guided))


class PeriodicEvaluation:
    """Scores the EMA weights of a run during training; create once per run, call `score` at each evaluation."""

    def __init__(self, config: RunConfig, run_dir: Path, channels: int, device: torch.device):
        self.config, self.run_dir, self.channels, self.device = config, Path(run_dir), channels, device
        self._evaluator = self._floor = None

    def evaluator(self):
        if self._evaluator is None:
            c = self.config

            def prepare(fid: bool):
                return prepare_evaluator(c.train.data, c.model.image_size, self.channels, c.model.num_classes,
                                         self.run_dir / "eval" / "cache", n=c.runtime.eval_n, ref_n=1000, fid=fid,
                                         classifier_steps=CLASSIFIER_STEPS, device=self.device)

            fid = self.device.type != "cpu"
            evaluator = prepare(fid)
            if evaluator.classifier is None and not fid:  # unlabelled data: FID is the only metric there is
                evaluator = prepare(True)
            self._evaluator = evaluator
        return self._evaluator

    def floor(self) -> dict:
        """The real floor's scores: the same at every evaluation of a run, so computed once."""
        if self._floor is None:
            self._floor = self.evaluator().floor()
        return self._floor

    def score(self, model, schedule, guide=None, sampling: SamplingConfig | None = None) -> dict:
        """{metric: value} of K images drawn as `ddpm eval` draws them (balanced labels, seed 0, batches of 64),
        with `ddpm sample`'s defaults at --eval-steps, or `sampling` (a distilled student's own)."""

        r = self.config.runtime
        evaluator = self.evaluator()  # the first time, this trains the evaluation classifier (gradients on)
        sampling = sampling or eval_sampling(r.eval_steps, guide is not None)
        labels = balanced_labels(r.eval_n, model.config.num_classes)
        with torch.no_grad():
            images = to_uint8(sample_all(model, schedule, n=r.eval_n, labels=labels, sampling=sampling,
                                         seed=EVAL_SEED, batch_size=EVAL_BATCH, guide=guide))
            return {**evaluator.score(images, labels, cache_label=None), "saturated": saturated_fraction(images)}


def best_so_far(run_dir: Path) -> dict | None:
    """RUN/best's record ({"metric", "value", "step", "scores"}) or None before the first."""
    try:
        return json.loads((Path(run_dir) / BEST_DIR / ckpt.CONFIG).read_text())["best"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_better(metric: str, value: float, best: dict | None) -> bool:
    if best is None or best.get("metric") != metric:
        return True
    return value < best["value"] if METRICS[metric] == "lower" else value > best["value"]


def keep_if_best(run_dir: Path, metric: str, scores: dict, step: int, model, diffusion, class_names) -> bool:
    """Export `model` to RUN/best/ (a model folder, with the metric, its value and the step) when `scores` beat
    the best so far; never pruned. Returns whether it wrote."""
    if metric not in scores or not is_better(metric, scores[metric], best_so_far(run_dir)):
        return False
    ckpt.replace_pretrained(model, Path(run_dir) / BEST_DIR, diffusion, {
        "class_names": class_names, "step": step,
        "best": {"metric": metric, "value": scores[metric], "step": step, "scores": scores}})
    return True
