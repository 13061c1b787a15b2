"""What rank 0 writes into the run folder while training runs: its config.json, the checkpoints, the model folders
(model/, guide/ and best/, each through checkpoint.save_pretrained) and the post-hoc EMA snapshots. The training log
(progress, trackers, previews, validation, evaluation) is monitor.py's; this part only writes files."""
from __future__ import annotations

from pathlib import Path

from . import checkpoint as ckpt
from .config import POSTHOC_DEFAULT, RunConfig
from .files import atomic_write_json
from .periodic_eval import keep_if_best
from .snapshots import snapshot_due, snapshot_every, write_snapshot


def guide_step(fraction: float, last_step: int) -> int | None:
    """The step at which a run planned for `last_step` steps exports its guide snapshot: round(fraction *
    last_step), at least 1; None when `fraction` is 0. Karras et al. 2024 guide with the same model trained for
    a fraction of the time (their presets pair each model with a shorter-trained, often smaller, guide)."""
    return max(1, round(fraction * last_step)) if fraction > 0 else None


class RunFiles:
    """The run folder's writer during training (rank 0 only)."""

    def __init__(self, run_dir: Path, config: RunConfig, last_step: int):
        self.run = ckpt.RunFolder(Path(run_dir))
        self.config, self.last_step = config, last_step
        self.run.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.run.path / ckpt.CONFIG, config.to_dict())
        self.guide_step = guide_step(config.runtime.guide_fraction, last_step)
        self.snapshot_every = snapshot_every(config.runtime.ema_snapshot_every, last_step)

    def _extra(self, trainer, **more) -> dict:
        return {"class_names": trainer.info.class_names, "step": trainer.step_count, **more}

    def at_step(self, trainer) -> Path | None:
        """The files due after this step: the guide snapshot at `guide_step` (returned when written, so that the
        log can say so) and the post-hoc EMA snapshots on their schedule."""
        step, written = trainer.step_count, None
        if step == self.guide_step:
            extra = self._extra(trainer, guide_fraction=self.config.runtime.guide_fraction)
            # a resumed run keeps its first guide; one resumed past this step without one gets none (its
            # checkpoints can serve as guides instead)
            if ckpt.save_guide_snapshot(self.run.path, trainer.ema.model, self.config.diffusion, extra):
                written = self.run.guide
        if trainer.ema_tracks and snapshot_due(step, self.last_step, self.snapshot_every,
                                                POSTHOC_DEFAULT["guide_ema_fraction"]):
            for track in trainer.ema_tracks:
                write_snapshot(self.run.path, track.model, track.sigma_rel, step)
        return written

    def save(self, trainer) -> None:
        """The checkpoint (what resume reads) and RUN/model, the classic EMA's export."""
        ckpt.save_training_state(self.run.path, trainer.state_dict(), trainer.step_count,
                                 self.config.runtime.keep_checkpoints)
        ckpt.save_pretrained(trainer.ema.model, self.run.model, self.config.diffusion, self._extra(trainer))

    def keep_best(self, trainer, scores: dict, drawn) -> bool:
        """--keep-best: what scored (`drawn`, a periodic_eval.Drawn) to RUN/best when `scores` beat the best so far
        (periodic_eval.keep_if_best)."""

        metric = self.config.runtime.keep_best
        return metric is not None and keep_if_best(self.run.path, metric, scores, trainer.step_count, drawn,
                                                   self.config.diffusion, trainer.info.class_names)
