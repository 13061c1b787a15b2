"""Quality in the training log: every `--eval-every` steps rank 0 draws K images as `ddpm sample RUN` would draw
them at that step, and scores them with `ddpm eval`'s own library, so the logged `eval/*` numbers are what `ddpm eval
RUN --n K --seed 0 --sampling-steps S` reports when the run stops there:
  - the post-hoc EMA default (sources.default_plan), rebuilt in memory from the snapshots taken so far and guided by
    its rebuilt guide, once those rebuild it well (`eval/posthoc` is 1);
  - before that, and in runs without snapshots, RUN/model (the classic EMA), autoguided by RUN/guide once it exists
    (`eval/posthoc` is 0), as `ddpm sample RUN` then draws it.
The two rebuilds cost about 21% of an evaluation of the quickstart (benchmarks/posthoc_log_cost.py, RESULTS.md).
`--keep-best METRIC` exports what scored best to RUN/best (a rebuilt average with its guide in RUN/best/guide).
Previews (`samples/ema`) and `val/loss_ema` stay on the classic EMA: they are cheap and frequent.

The evaluator (real reference images, the floor, the evaluation classifier) is prepared once, at the first
evaluation, from the run's training data, and shares `ddpm eval`'s cache (RUN/eval/cache), so the classifier is
trained once for both. FID needs Inception-v3, about 0.3 s an image on a CPU: it is computed on accelerators, and on
a CPU only when the data has no labels (then it is the only metric); classifier metrics whenever the data has
labels.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import RunConfig, SamplingConfig, sampling_defaults
from .evaluation import prepare_evaluator, saturated_fraction
from .files import to_uint8
from .guidance import Guide
from .pipeline import balanced_labels, sample_all
from .snapshots import list_snapshots, rebuild_state_dict
from .sources import PosthocPlan, default_plan, load_guide

EVAL_SEED = 0  # `ddpm eval`'s default seed: the same noise at every evaluation, so curves differ by the weights
EVAL_BATCH = 64  # `ddpm eval`'s default --batch-size (batch b is seeded by (seed, b)): the same images
CLASSIFIER_STEPS = 800  # `ddpm eval`'s default --classifier-steps: the same classifier, trained once for both
BEST_DIR = ckpt.BEST_DIR
METRICS = {"classifier_fd": "lower", "fid": "lower", "accuracy": "higher"}  # --keep-best's choices, and better is


def eval_sampling(steps: int, guided: bool) -> SamplingConfig:
    """`ddpm sample`'s default settings (config.sampling_defaults) at `steps` DPM-Solver++ steps."""
    return SamplingConfig(steps=steps, **sampling_defaults(guided))


@dataclass
class Drawn:
    """What `ddpm sample RUN` draws at a step of the run: the weights, their guide, and the post-hoc plan they were
    rebuilt by (None: the classic EMA)."""

    model: torch.nn.Module
    guide: Guide | None
    plan: PosthocPlan | None

    def describe(self, run_dir: Path) -> str:
        if self.plan is not None:
            return f"the post-hoc default ({self.plan.describe()})"
        return f"{Path(run_dir) / ckpt.MODEL_DIR} (the classic EMA)" + ("" if self.guide is None else " guided")


class PeriodicEvaluation:
    """Scores what a run draws during training; create once per run, call `drawn` then `score` at each
    evaluation."""

    def __init__(self, config: RunConfig, run_dir: Path, channels: int, device: torch.device):
        self.config, self.run_dir, self.channels, self.device = config, Path(run_dir), channels, device
        self._evaluator = self._floor = self._classic_guide = None
        self._templates: list[torch.nn.Module] = []  # the rebuilt averages' networks, made once

    def drawn(self, classic: torch.nn.Module, schedule, step: int) -> Drawn:
        """What `ddpm sample RUN` draws at `step` (sources.resolve_sources with no flags), from the files so far:
        the post-hoc default rebuilt in memory from the snapshots up to `step` when they rebuild it well, else
        `classic` (the classic EMA) guided by RUN/guide once the run has written it."""
        snapshots = [s for s in list_snapshots(self.run_dir) if s.step <= step]
        plan = default_plan(self.run_dir, snapshots) if snapshots else None
        if plan is not None and plan.rebuilds_well:
            while len(self._templates) < 2:
                self._templates.append(copy.deepcopy(classic).eval())
            main, guide = self._templates
            for net, rebuild in ((main, plan.main), (guide, plan.guide)):
                net.load_state_dict(rebuild_state_dict(rebuild))
            return Drawn(main, Guide(guide, self.config.diffusion), plan)
        if self._classic_guide is None:  # RUN/guide is written once and never changes: loaded once it exists
            guide_dir = ckpt.find_run_guide(self.run_dir)
            self._classic_guide = None if guide_dir is None else load_guide(guide_dir, classic, self.device,
                                                                            schedule=schedule)
        return Drawn(classic, self._classic_guide, None)

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


def keep_if_best(run_dir: Path, metric: str, scores: dict, step: int, drawn: Drawn, diffusion, class_names) -> bool:
    """Export what scored (`drawn`) to RUN/best/ (a model folder, with the metric, its value and the step; a
    rebuilt average also with its length and its guide in RUN/best/guide, which `ddpm sample RUN/best` uses) when
    `scores` beat the best so far; never pruned. Returns whether it wrote."""
    if metric not in scores or not is_better(metric, scores[metric], best_so_far(run_dir)):
        return False
    extra = {"class_names": class_names, "step": step,
             "best": {"metric": metric, "value": scores[metric], "step": step, "scores": scores}}
    guide = None
    if drawn.plan is not None:
        main, rebuilt = drawn.plan.main, drawn.plan.guide
        extra.update(ema_length=main.sigma_rel, ema_step=main.step, ema_rebuild_error=main.error)
        guide = (drawn.guide.model, {"class_names": class_names, "step": rebuilt.step,
                                     "ema_length": rebuilt.sigma_rel, "ema_rebuild_error": rebuilt.error})
    ckpt.replace_pretrained(drawn.model, Path(run_dir) / BEST_DIR, diffusion, extra, guide=guide)
    return True
