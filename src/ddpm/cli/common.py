"""What several commands share: argument types, the sampling and post-hoc EMA flags, and loading the model
and its guide as `ddpm sample` does."""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import warnings
from pathlib import Path

from ..config import (
    AUTOGUIDED,
    DEFAULT_CFG,
    DEFAULT_STEPS,
    MAX_SEED,
    POSTHOC_DEFAULT,
    SAMPLERS,
    SamplingConfig,
    sampling_defaults,
)
from ..errors import DdpmError, DdpmWarning
from ..sources import Opened, load_guide, resolve_sources
from ..sources import open_model as open_model_for_use


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when it has a real one (None and False say nothing a reader needs)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)



def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None


def folder_path(text: str) -> str:
    """A path flag's value: an empty one would mean the current folder, where a run would scatter its files."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder path, got an empty string")
    return text


def worker_count(text: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of processes or 'auto', got {text!r}") from None


def ema_lengths_arg(text: str) -> tuple[float, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sigma_rel values such as 0.05,0.10 (or none), got {text!r}") \
            from None


# the flags every command shares, each defined once; `a` is a parser's add_argument
def add_device_flag(a) -> None:
    a("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")


def add_quiet_flag(a) -> None:
    a("--quiet", action="store_true", help="no progress bars or progress lines")


def add_seed_flag(a, what: str = "random seed", default: int | None = 0, note: str = "") -> None:
    """--seed: a whole number from 0 to MAX_SEED (`seed` checks it), for what `what` says."""
    a("--seed", type=seed, default=default, help=f"{what}, from 0 to 2^63 - 1{note}")


def add_out_flag(a, what: str, required: bool = True) -> None:
    """--out: a folder (`folder_path` refuses an empty path, which would scatter files in the current folder)."""
    a("--out", type=folder_path, required=required, help=what)


def add_batch_size_flag(a, what: str, default: int | None) -> None:
    """--batch-size: each command checks its own range (a sampling batch, an optimizer step's images)."""
    a("--batch-size", type=int, default=default, help=what)


def add_source_flags(parser: argparse.ArgumentParser, many: bool = False) -> None:
    """What a command draws with, as `ddpm sample` chooses it: --guide, --ema / --no-ema, then the post-hoc EMA
    flags. Every command that samples a model takes these. `many`: several lengths, for eval's sweep, and no
    --no-ema (eval/ keeps its samples by setting beside the run's EMA's, so raw weights' rows would mix with them)."""
    a = parser.add_argument
    a("--guide", metavar="PATH", type=folder_path, help="autoguidance (Karras et al. 2024): guide the model with a "
      "weaker version of itself, a model folder, a run folder (its guide/ snapshot) or a checkpoint .pt (its EMA "
      "weights); 'none' = off (default: a run's rebuilt half-way average when it keeps post-hoc EMA snapshots, else "
      "its guide/ when it has one)")
    if not many:
        a("--ema", action=argparse.BooleanOptionalAction, default=True,
          help="EMA weights (--no-ema: the raw weights of the latest checkpoint)")
    add_ema_flags(parser, many=many)


def add_ema_flags(parser: argparse.ArgumentParser, guide: bool = True, many: bool = False) -> None:
    """--ema-length / --ema-step: draw from an average rebuilt from the run's post-hoc EMA snapshots; with `guide`,
    also --guide-ema-length / --guide-ema-fraction: guide with one. `many`: several lengths (eval's sweep)."""
    a = parser.add_argument
    a("--ema-length", type=float, metavar="S", nargs="+" if many else None, help="post-hoc EMA (Karras et al. "
      "2024): rebuild the weights averaged with this relative length sigma_rel, e.g. 0.05-0.15, from the run's "
      "snapshots (cached in RUN/ema_rebuilt); default for a run folder with snapshots: "
      f"{POSTHOC_DEFAULT['ema_length']:g}, measured (RUN/model = the classic EMA)"
      + ("; several lengths are scored one after the other" if many else ""))
    a("--ema-step", type=int, metavar="N", help="with --ema-length: the average as it was at step N (default: "
      "the run's last snapshot)")
    if not guide:
        return
    a("--guide-ema-length", type=float, metavar="S", nargs="+" if many else None,
      help="autoguidance by a guide rebuilt from the run's post-hoc EMA snapshots, averaged with this length "
      "(default for a run folder with snapshots: the average over about "
      f"{POSTHOC_DEFAULT['guide_window_images']:,} training images "
      "at half the run; else the run's guide/ snapshot)"
      + ("; several are crossed with every --ema-length" if many else ""))
    a("--guide-ema-fraction", type=float, metavar="F", nargs="+" if many else None, help="with --guide-ema-length: "
      "the guide as the run was at this fraction of the main model's step (default 0.5)"
      + ("; several are crossed with the guide's lengths" if many else ""))


def source_flags(args: argparse.Namespace) -> dict:
    """The sampling-source flags of any command (absent ones as None), as sources.resolve_sources takes them."""
    return dict(ema_length=getattr(args, "ema_length", None), ema_step=getattr(args, "ema_step", None),
                guide=getattr(args, "guide", None), guide_ema_length=getattr(args, "guide_ema_length", None),
                guide_ema_fraction=getattr(args, "guide_ema_fraction", None),
                raw_weights=not getattr(args, "ema", True))


def warn_one_line(text: str) -> None:
    warnings.warn(text, DdpmWarning, stacklevel=2)


def sources(args: argparse.Namespace):
    """The weights and guide the flags ask for (sources.resolve_sources): by default, for a run folder with
    post-hoc EMA snapshots, the measured rebuilt averages; else MODEL and its run's guide/ snapshot."""
    return resolve_sources(Path(args.model), warn=warn_one_line, **source_flags(args))


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed is a whole number from 0 to 2^63 - 1, got {text!r}")
    return value


def duration(text: str) -> float:
    from ..distributed import parse_duration

    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None



def add_sampling_flags(parser: argparse.ArgumentParser, many: bool = False) -> None:
    """Sampler and guidance flags shared by `sample` and `eval` (`many`: lists, for a sweep)."""
    d = SamplingConfig()
    nargs = "+" if many else None
    a = parser.add_argument
    a("--sampler", choices=SAMPLERS, nargs=nargs, help="ddpm: all T ancestral steps; ddim; dpmpp2m: DPM-Solver++(2M)"
      + ("" if many else f" (default {d.sampler})"))
    a("--sampling-steps", type=int, nargs=nargs, help=f"denoiser evaluations for ddim (default "
      f"{DEFAULT_STEPS['ddim']}) and dpmpp2m (default {DEFAULT_STEPS['dpmpp2m']}); ddpm always takes T")
    a("--guidance", type=float, nargs=nargs, help="classifier-free guidance w: 0 = unconditional, 1 = conditional, "
      f">1 = guided (default {DEFAULT_CFG:g}; {AUTOGUIDED['guidance']:g} when a guide is used)")
    a("--guide-weight", type=float, nargs=nargs, metavar="G", help="autoguidance weight g: 1 = off, >1 = away from "
      f"the guide, 0 = the guide's prediction alone (default {AUTOGUIDED['guide_weight']:g} when a guide is used)")
    a("--eta", type=float, default=d.eta, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    a("--clip-x0", action="store_true", help="clip the predicted x0 to [-1, 1] at every step")
    a("--dynamic-threshold", type=float, metavar="P", help="Imagen's dynamic thresholding of x0 at percentile P, "
      "e.g. 0.995 (default off)")
    a("--guidance-rescale", type=float, default=d.guidance_rescale, metavar="PHI",
      help="rescale the guided prediction's std to the conditional one's (Lin et al. 2024); 0 = off")
    a("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
      help="guide only where t/(T-1) is in [LO, HI], one model call elsewhere (Kynkaenniemi et al. 2024); 0 1 = every "
      f"step (default {d.guidance_interval[0]:g} {d.guidance_interval[1]:g}; with a guide: "
      + ("every step" if AUTOGUIDED["guidance_interval"] is None
         else " ".join(f"{v:g}" for v in AUTOGUIDED["guidance_interval"]))
      + ")")
    a("--spacing", choices=("trailing", "logsnr"),
      help=f"dpmpp2m timesteps: uniform in t, or uniform in log-SNR (default {d.spacing})")


def sampling_configs(args: argparse.Namespace, guided: bool = False, student=None) -> list[SamplingConfig]:
    """Every combination of the listed samplers, steps, guidance scales and guide weights (one for `ddpm sample`).
    `guided`: a guide model is in use, so the measured autoguidance defaults (config.AUTOGUIDED) replace the
    classifier-free ones wherever a flag is not given. `student` (students.Student): a distilled student's grid and
    weight replace them instead, and a draw off its grid is said in one line."""
    _check_read(args, default_sampler="student" if student is not None else SamplingConfig.sampler)
    if student is not None:
        return _unique([_student_sampling(args, student, config) for config in _flag_configs(args, False)])
    return _flag_configs(args, guided)


# which samplers read each sampling flag (samplers.run_sampler): given to none of the chosen ones, it would be dropped
FLAG_READERS = {"--sampling-steps": ("ddim", "dpmpp2m", "student"), "--eta": ("ddim",), "--spacing": ("dpmpp2m",)}


def _check_read(args: argparse.Namespace, default_sampler: str) -> None:
    """One line for a flag given by hand that none of the chosen samplers reads (a student draws on its own grid,
    so its sampler takes no --spacing)."""
    chosen = args.sampler or [default_sampler]
    chosen = [chosen] if isinstance(chosen, str) else chosen
    given = {"--sampling-steps": args.sampling_steps is not None, "--eta": bool(args.eta),
             "--spacing": args.spacing is not None}
    for flag, readers in FLAG_READERS.items():
        if given[flag] and not set(chosen) & set(readers):
            own = " (a student draws on the grid it was distilled on)" if chosen == ["student"] else ""
            raise DdpmError(f"{flag}: the {'/'.join(chosen)} sampler does not read it, so it would be dropped{own}; "
                            f"it is for --sampler {' or '.join(r for r in readers if r != 'student')}")


def _flag_configs(args: argparse.Namespace, guided: bool) -> list[SamplingConfig]:
    """Every combination of the flags' samplers, steps and weights, with the defaults of `guided`."""
    def listed(value, default):
        return [default] if value is None else (value if isinstance(value, list) else [value])

    defaults = sampling_defaults(guided)
    interval = defaults["guidance_interval"] if args.guidance_interval is None else args.guidance_interval
    interval = None if interval is not None and tuple(interval) == (0.0, 1.0) else interval
    configs = []
    for sampler, steps, w, g in itertools.product(
            listed(args.sampler, SamplingConfig.sampler), listed(args.sampling_steps, None),
            listed(args.guidance, defaults["guidance"]), listed(args.guide_weight, defaults["guide_weight"])):
        configs.append(SamplingConfig(sampler=sampler, steps=steps, eta=args.eta, guidance=w, guide_weight=g,
                                      clip_x0=args.clip_x0, dynamic_threshold=args.dynamic_threshold,
                                      guidance_rescale=args.guidance_rescale, guidance_interval=interval,
                                      spacing=args.spacing or SamplingConfig.spacing))
    return _unique(configs)


def _student_sampling(args: argparse.Namespace, student, config: SamplingConfig) -> SamplingConfig:
    """`config` (one of the flags' combinations) as the student draws it: what was given by hand is kept."""
    flags = {"sampler": "sampler", "steps": "sampling_steps", "guidance": "guidance", "guide_weight": "guide_weight"}
    given = {name: getattr(config, name) for name, flag in flags.items() if getattr(args, flag, None) is not None}
    _check_student_flags(args, student, given)
    drawn = student.sampling(config, given)
    note = student.off_grid_note(drawn.sampler, drawn.steps)
    if note is not None:
        warn_one_line(note)
    return drawn


def _check_student_flags(args: argparse.Namespace, student, given: dict) -> None:
    """One line for a guidance flag given by hand that a student would drop silently: one it has built in at another
    value (its teacher's: an autoguided teacher's w, say), or one that shapes how a guide's calls combine, which a
    student, guided in its one call, does not make."""
    for flag, unused in (("--guidance-interval", getattr(args, "guidance_interval", None) is not None),
                         ("--guidance-rescale", bool(getattr(args, "guidance_rescale", None)))):
        if unused:
            raise DdpmError(f"{flag}: a distilled student draws its guidance in its one call a step, so there is no "
                            f"guided combination for it to shape; leave {flag} out")
    for name, flag in (("guidance", "--guidance"), ("guide_weight", "--guide-weight")):
        built_in = student.fixed.get(name)
        if name != student.weight and name in given and built_in is not None and given[name] != built_in:
            takes = "takes no weight"
            if student.weight is not None:
                takes = f"takes {student.flag} from {student.weight_range[0]:g} to {student.weight_range[1]:g}"
            raise DdpmError(f"{flag} {given[name]:g}: this student has its teacher's {flag} {built_in:g} built in "
                            f"and {takes}; leave {flag} out")


def _unique(configs: list[SamplingConfig]) -> list[SamplingConfig]:
    """ddpm ignores --sampling-steps, so several steps give the same setting: keep each once, in order."""
    seen, out = set(), []
    for c in configs:
        key = repr(dataclasses.replace(c, steps=None) if c.sampler == "ddpm" else c)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out



MAX_CLASSIFIER_STEPS = 1_000_000  # the evaluation classifier converges in hundreds
MAX_SAMPLES = 10_000_000  # one `ddpm sample`: labels for more would not fit in memory long before the time runs out


def open_model(args: argparse.Namespace) -> Opened:
    """MODEL and its guide as the flags ask, resolved and loaded once (sources.open_model), compiled with
    --compile; a run without a guide is said in one line (missing_guide)."""
    import torch

    if hasattr(args, "sampler"):
        _flag_configs(args, guided=False)  # the sampling values, checked before any note on the weights
    opened = open_model_for_use(Path(args.model), args.device, warn=warn_one_line, **source_flags(args))
    if getattr(args, "compile", False):
        opened.model = torch.compile(opened.model)  # attribute access (config, null_class) passes through
    if opened.guide is None and opened.student is None:  # a student takes its weight as an input, no guide
        missing_guide(args)
    return opened


def guide_path_text(opened: Opened) -> str | None:
    return None if opened.guide is None else str(opened.sources.guide)


def missing_guide(args: argparse.Namespace) -> None:
    """No guide was found: fine with --guide none; a one-line error with --guide-weight (it needs one); a note for
    a run folder that has not written its guide snapshot yet (sampling goes on with classifier-free guidance)."""
    from .. import checkpoint as ckpt

    if args.guide is not None:  # --guide none
        return
    run = run_folder(Path(args.model))
    if args.guide_weight is not None:
        raise DdpmError(f"--guide-weight needs a guide, and {run} has no {ckpt.GUIDE_DIR}/ snapshot; "
                        "give --guide PATH "
                        "(a model folder, a run folder or a checkpoint .pt)")
    if ckpt.RunFolder(run).checkpoints.is_dir():
        print(f"note: {run} has no guide snapshot yet (written at --guide-fraction of the planned steps), so no "
              "autoguidance: classifier-free guidance only (--guide PATH to give one)", file=sys.stderr)


def resolve_guide(args: argparse.Namespace, model, schedule, device):
    """(Guide or None, its path as text) for flags other than those MODEL was opened with (eval's sweep over
    --guide-ema-length): resolved as open_model does, the guide alone loaded."""
    found = sources(args).guide
    if found is not None:
        return load_guide(found, model, device, schedule=schedule), str(found)
    missing_guide(args)
    return None, None


def run_folder(model_path: Path) -> Path:
    """Where eval/ goes: the run folder when MODEL is one (or is the model/ folder inside one), else MODEL itself."""
    from ..sources import run_folder as shared

    return shared(model_path)

