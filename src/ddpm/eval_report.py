"""`ddpm eval`'s record as a person reads it: the table printed, eval.csv, the quality-against-calls plot, and the
files of a sweep over post-hoc EMA lengths. It only reads records (evaluation.py makes them) and writes files."""
from __future__ import annotations

import io
from pathlib import Path

from .config import SamplingConfig, from_dict
from .files import atomic_write_bytes, atomic_write_json


def _format(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


METRIC_COLUMNS = (("fid", "FID", 2), ("accuracy", "class acc", 3), ("classifier_fd", "classifier FD", 3),
                  ("precision", "precision", 3), ("recall", "recall", 3), ("saturated", "saturated", 4))
def row_sampling(row: dict) -> SamplingConfig:
    """The SamplingConfig of an eval.json row (JSON lists become tuples again)."""

    return from_dict(SamplingConfig, row.get("settings", {}))


def _options(row: dict) -> str:
    """A row's sampling options that differ from the defaults (`SamplingConfig.describe`), after its guide."""
    options = row_sampling(row).describe()
    if row.get("guide_weight") is None:
        return options
    guide = "" if row.get("guide") is None else f"guide {row['guide']} "  # None: g is a student's input
    return f"{guide}g={row['guide_weight']:g}" + ("" if options == "-" else f" {options}")


def format_table(rows: list[dict], floor: dict) -> str:
    """One line per setting, the real-data floor first; metric columns only for the metrics computed."""
    columns = [(key, title, digits) for key, title, digits in METRIC_COLUMNS
               if key in floor or any(key in r for r in rows)]
    widths = [max(len(title), 9) for _, title, _ in columns]
    options = [_options(row) for row in rows]
    width = max([len("options")] + [len(o) for o in options])
    head = f"{'sampler':>8} {'steps':>5} {'calls':>5} {'w':>5}  {'options':<{width}}  "
    lines = [head + "  ".join(title.rjust(w) for (_, title, _), w in zip(columns, widths))]
    lines.append("-" * len(lines[0]))
    lines.append(f"{'real':>8} {'':>5} {'':>5} {'':>5}  {'':<{width}}  "
                 + "  ".join(_format(floor.get(k), d).rjust(w) for (k, _, d), w in zip(columns, widths))
                 + "   <- floor")
    for row, option in zip(rows, options):
        w = "-" if row["guidance"] is None else f"{row['guidance']:g}"
        lines.append(f"{row['sampler']:>8} {row['steps']:>5} {row.get('model_calls', ''):>5} {w:>5}  "
                     f"{option:<{width}}  "
                     + "  ".join(_format(row.get(k), d).rjust(wd) for (k, _, d), wd in zip(columns, widths)))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# the sweep as a table and a plot

CSV_COLUMNS = ("sampler", "steps", "model_calls", "guidance", "guidance_rescale", "guidance_interval", "clip_x0",
               "dynamic_threshold", "eta", "spacing", "fid", "accuracy", "classifier_fd", "precision", "recall",
               "saturated", "seconds")
OPTION_COLUMNS = ("guidance_rescale", "guidance_interval", "clip_x0", "dynamic_threshold", "eta", "spacing")


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "-".join(f"{v:g}" for v in value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def sweep_csv(record: dict) -> str:
    """eval.csv's text: the real floor first (sampler "real", no settings), then one line per setting."""
    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    floor = {"sampler": "real", **{k: v for k, v in (record.get("floor") or {}).items() if k in CSV_COLUMNS}}
    for row in [floor, *record.get("rows", [])]:
        values = {**row, **{k: row.get("settings", {}).get(k) for k in OPTION_COLUMNS if "settings" in row}}
        writer.writerow([_csv_value(values.get(column)) for column in CSV_COLUMNS])
    return buffer.getvalue()


def _line_label(row: dict) -> str:
    """(sampler, w, guide, options that differ from the defaults): one plotted line per label, steps along it."""
    parts = [row["sampler"]] + ([] if row.get("guidance") is None else [f"w={row['guidance']:g}"])
    options = _options(row)
    return " ".join(parts + ([] if options == "-" else [options]))


def quality_lines(rows: list[dict], metric: str, x: str = "model_calls",
                  label=None) -> dict[str, list[tuple[float, float]]]:
    """{line label: [(x value, metric value), ...] sorted by x}: by default the rows that share sampler, w and
    options make one line across their step counts (x = model calls per image)."""
    label = label or _line_label
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row.get(x) and row.get(metric) is not None:
            lines.setdefault(label(row), []).append((row[x], row[metric]))
    return {name: sorted(points) for name, points in lines.items()}


def quality_plot_png(record: dict, x: str = "model_calls", xlabel: str = "model calls per image",
                     label=None, log_x: bool = True) -> bytes | None:
    """quality_vs_steps.png's bytes: classifier Frechet distance and class accuracy against model calls per image
    (log x; or any row key `x`), one line per (sampler, w, options) (or per `label(row)`), the real floor dashed;
    FID alone for a model without a classifier; None when there is nothing to plot. Matplotlib's Agg canvas, no
    global backend change."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 20, 50, 100 rather than 2x10^1 on the log axis

    rows = record.get("rows", [])
    metrics = [m for m in ("classifier_fd", "accuracy") if quality_lines(rows, m, x, label)]
    metrics = metrics or (["fid"] if quality_lines(rows, "fid", x, label) else [])
    if not metrics:
        return None
    titles = {"classifier_fd": "classifier Frechet distance", "accuracy": "class accuracy", "fid": "FID"}
    # room below the panels for a legend of one entry per line (a sweep can have twenty)
    entries = len(quality_lines(rows, metrics[0], x, label)) + 1
    figure = Figure(figsize=(5.5 * len(metrics), 4.2 + 0.22 * (entries + 1) // 2), layout="constrained")
    floor = record.get("floor") or {}
    for axes, metric in zip(figure.subplots(1, len(metrics), squeeze=False)[0], metrics):
        for i, (name, points) in enumerate(quality_lines(rows, metric, x, label).items()):
            # ten colours, then the next marker shape: no two of a sweep's lines look alike
            axes.plot(*zip(*points), marker="os^Dv<>PX*"[i // 10 % 10], color=f"C{i % 10}", label=name)
        if floor.get(metric) is not None:
            axes.axhline(floor[metric], color="black", linestyle="--", linewidth=1, label="real floor")
        if log_x:
            axes.set_xscale("log")
            axes.xaxis.set_minor_formatter(plain)
        axes.xaxis.set_major_formatter(plain)
        axes.set_xlabel(xlabel)
        axes.set_title(titles[metric])
        axes.grid(True, which="both", alpha=0.3)
    figure.legend(*axes.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_sweep_files(record: dict, eval_dir: Path) -> dict:
    """Write eval.csv and quality_vs_steps.png (when matplotlib is installed and there is a metric to plot) into
    `eval_dir`, each atomically; returns their paths (None for a plot not drawn)."""

    eval_dir = Path(eval_dir)
    csv_path, plot_path = eval_dir / "eval.csv", eval_dir / "quality_vs_steps.png"
    atomic_write_bytes(csv_path, sweep_csv(record).encode())
    try:
        png = quality_plot_png(record)
    except ImportError:  # matplotlib comes with the metrics extra; the numbers are in the CSV and JSON anyway
        png = None
    if png is not None:
        atomic_write_bytes(plot_path, png)
    return {"csv": str(csv_path), "plot": str(plot_path) if png is not None else None}


# ---------------------------------------------------------------------------------------------------------------
# several post-hoc EMA lengths as one table and one plot

def _setting_label(row: dict) -> str:
    """Everything of a row but its EMA length: one plotted line per label, the lengths along it."""
    return f"{_line_label(row)} {row['steps']} steps"


def ema_length_record(records: dict[float, dict]) -> dict:
    """{length: eval record} -> one record whose rows carry their `ema_length` (the floor is the same for all:
    the same data, n and seed)."""
    rows = [{"ema_length": length, **row} for length, record in records.items() for row in record["rows"]]
    floor = next(iter(records.values()))["floor"]
    return {"floor": floor, "rows": rows, "lengths": list(records),
            "records": {f"{length:g}": record.get("model") for length, record in records.items()}}


def write_ema_length_files(records: dict[float, dict], folder: Path) -> dict:
    """ema_lengths.json, ema_lengths.csv and quality_vs_ema_length.png in `folder`: every length's rows side by
    side, the plot one line per setting (sampler, steps, w, guide, g) across the lengths. Returns their paths."""

    folder = Path(folder)
    record = ema_length_record(records)
    atomic_write_json(folder / "ema_lengths.json", record)
    csv_text = sweep_csv({"floor": record["floor"], "rows": []}).splitlines()
    lines = ["ema_length," + csv_text[0], "," + csv_text[1]]
    for row in record["rows"]:
        lines.append(f"{row['ema_length']:g}," + sweep_csv({"rows": [row]}).splitlines()[-1])
    atomic_write_bytes(folder / "ema_lengths.csv", ("\n".join(lines) + "\n").encode())
    paths = {"json": str(folder / "ema_lengths.json"), "csv": str(folder / "ema_lengths.csv"), "plot": None}
    try:
        png = quality_plot_png(record, x="ema_length", xlabel="post-hoc EMA length sigma_rel", label=_setting_label,
                               log_x=False)
    except ImportError:  # matplotlib comes with the metrics extra
        png = None
    if png is not None:
        atomic_write_bytes(folder / "quality_vs_ema_length.png", png)
        paths["plot"] = str(folder / "quality_vs_ema_length.png")
    return paths


def format_ema_length_table(records: dict[float, dict]) -> str:
    """The rows of every length, one table, the length first."""
    record = ema_length_record(records)
    table = format_table(record["rows"], record["floor"]).splitlines()
    lengths = ["length", "-" * 6, ""] + [f"{row['ema_length']:g}" for row in record["rows"]]
    return "\n".join(f"{length:>6} {line}" for length, line in zip(lengths, table))
