"""What a distilled student's model folder says about itself (its config.json's "student" record, written by
`ddpm distill`), and how `ddpm sample`, `eval`, `edit` and the page draw with it: K calls on its grid, the guidance
weight as its input, no guide."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .config import SamplingConfig
from .errors import DdpmError

RECORD = "student"  # the key of the record in a model folder's config.json
SAMPLER = "student"  # samplers.run_sampler's name for DDIM on a student's grid
SETTINGS = "distill.json"  # a distillation's settings, in its folder (RUN/distilled) beside config.json


def student_dir(folder: Path, steps: int) -> Path:
    """Where a distillation in `folder` writes its `steps`-call student."""
    return Path(folder) / f"steps_{steps}"


def is_distillation(folder: Path) -> bool:
    """Whether `folder` is a distillation's own folder (RUN/distilled: its checkpoints, distill.json, steps_K/)."""
    return (Path(folder) / SETTINGS).is_file()


def distillation_of(path: Path) -> Path | None:
    """The distillation folder that `path` is, or is inside (its model/, a steps_K/), else None."""
    path = Path(path)
    return next((folder for folder in (path, path.parent) if is_distillation(folder)), None)


def last_student(folder: Path) -> Path | None:
    """The student of fewest calls that the distillation in `folder` has written (its last round's), or None."""
    calls = [int(path.parent.name.removeprefix("steps_")) for path in Path(folder).glob("steps_*/config.json")
             if path.parent.name.removeprefix("steps_").isdigit()]
    return student_dir(folder, min(calls)) if calls else None


@dataclass(frozen=True)
class Student:
    steps: int  # the calls it was distilled to take, on samplers.student_timesteps(schedule, steps, spacing)
    teacher_steps: int  # its teacher's DDIM steps (2 or, with a teacher span of 4, 4 x steps)
    weight: str | None  # the guidance weight it takes: "guide_weight" (g), "guidance" (w), or None
    weight_range: tuple[float, float] | None  # the weights it was trained over
    default_weight: float | None  # what it draws at when no flag gives a weight (its teacher's default)
    fixed: dict  # the teacher's other guidance settings, baked in (e.g. w = 1 for an autoguided teacher)
    teacher: str  # what it was distilled from, as text
    data: str | None = None  # the images it was distilled on (`ddpm eval` compares with them)
    spacing: str = "trailing"  # its grid (samplers.STUDENT_SPACINGS); students written before the choice: trailing

    @classmethod
    def from_config(cls, config: dict) -> Student | None:
        record = config.get(RECORD)
        if record is None:
            return None
        record = dict(record)
        if record.get("weight_range") is not None:
            record["weight_range"] = tuple(float(v) for v in record["weight_range"])
        # a field missing from an older record takes its default (data: None, spacing: trailing)
        return cls(**{f.name: record.get(f.name) for f in dataclasses.fields(cls)
                      if f.name in record or f.default is dataclasses.MISSING})

    def to_record(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def flag(self) -> str:
        return {"guide_weight": "--guide-weight", "guidance": "--guidance"}.get(self.weight, "")

    def describe(self) -> str:
        """e.g. 'a 2-call student of g 1-4' for summary lines."""
        text = f"a {self.steps}-call student"
        if self.weight_range is not None:
            lo, hi = self.weight_range
            text += f" ({'g' if self.weight == 'guide_weight' else 'w'} {lo:g}-{hi:g})"
        return text

    def sampling(self, sampling: SamplingConfig, given: dict) -> SamplingConfig:
        """`sampling` as a student draws it: its sampler and steps unless given, its weight unless given (checked
        against its range), and the teacher's other settings. `given`: the flags given by hand ({name: value})."""
        changes = {"sampler": given.get("sampler") or SAMPLER, "guidance_interval": None}
        if changes["sampler"] == SAMPLER:
            changes["spacing"] = self.spacing
        changes["steps"] = given.get("steps") or self.steps
        changes.update({k: v for k, v in self.fixed.items() if k in ("guidance", "guide_weight")})
        if self.weight is not None:
            value = given.get(self.weight)
            value = self.default_weight if value is None else value
            lo, hi = self.weight_range
            if not lo <= value <= hi:
                raise DdpmError(f"{self.flag} {value:g} is outside the weights this student was trained on ({lo:g} to "
                                f"{hi:g}); choose one inside, or distill again with --weight-range")
            changes[self.weight] = value
        return dataclasses.replace(sampling, **changes)

    def off_grid_note(self, sampler: str, steps: int) -> str | None:
        """One line when a draw leaves the grid the student was trained for, else None."""
        if sampler == SAMPLER and steps == self.steps:
            return None
        return (f"this student was distilled for {self.steps} {SAMPLER} steps; {steps} {sampler} steps are off its "
                "grid and draw worse images (leave --sampler and --sampling-steps out)")
