"""Figures of training runs as PNG files: the curves of a run's log.jsonl and FD against sampling steps.

Each `plot_*` function takes data and a path, writes one PNG there (its folder is made) and returns the
path; the `*_figure` functions build the same figures without writing them, for callers that compose or
inspect them. Drawing uses matplotlib's Agg canvas directly: no display, no pyplot state shared between
calls.

    records = read_log("run/log.jsonl")
    plot_training_curves(records, "run/plots")                 # loss.png, loss_by_t.png, throughput.png, ...
    plot_fd_vs_steps({"EMA": ([1, 2, 4], [30.1, 12.5, 9.8], None)}, "run/plots/fd_vs_steps.png")
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

__all__ = [
    "read_log",
    "log_series",
    "log_series_by_key",
    "log_events",
    "training_curves",
    "training_figures",
    "plot_training_curves",
    "fd_vs_steps_figure",
    "plot_fd_vs_steps",
    "new_figure",
    "set_log2_axis",
    "save_figure",
]

# (x values, y values): one curve. A value that is missing, null or non-finite in the log is left out.
Series = tuple[list[float], list[float]]
# label -> (step counts, FD values, FD error or None): the curves of an FD-vs-steps figure.
FdSeries = Mapping[str, tuple[Sequence[int], Sequence[float], Sequence[float] | None]]

# The figures' size in inches at DPI: 640×400 pixels, legible on a screen and in a README.
FIGURE_SIZE, DPI = (6.4, 4.0), 100

# The training-curve files plot_training_curves writes, each with the log field it draws.
CURVE_FILES = {
    "loss": "loss.png",
    "loss_by_t": "loss_by_t.png",
    "samples_per_s": "throughput.png",
    "fd": "fd_at_checkpoints.png",
}


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a log.jsonl, in order. Lines that are not a JSON object (a line cut short by a
    crash, a blank line, bytes that are not UTF-8) are skipped; the file itself must exist (OSError otherwise)."""
    records = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _number(value) -> float | None:
    """value as a finite float, or None (missing, null, a string, NaN, a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _step(record: dict) -> float | None:
    return _number(record.get("step"))


def log_series(records: Iterable[dict], field: str, *, events: bool = False) -> Series:
    """(steps, values) of a numeric field over the records that have a step and a finite value.

    events: also read event lines (records with an "event" key, e.g. a skipped batch's loss). The
    training curves leave them out: their numbers describe one batch, not a logging interval.
    """
    steps, values = [], []
    for record in records:
        if "event" in record and not events:
            continue
        step, value = _step(record), _number(record.get(field))
        if step is not None and value is not None:
            steps.append(step)
            values.append(value)
    return steps, values


def log_series_by_key(records: Iterable[dict], field: str) -> dict[str, Series]:
    """{key: (steps, values)} of a field that holds a dict of numbers (loss_by_t: mean loss per bin of t),
    keys in order of first appearance; null entries (a bin no group fell in) are left out."""
    curves: dict[str, Series] = {}
    for record in records:
        step, values = _step(record), record.get(field)
        if "event" in record or step is None or not isinstance(values, dict):
            continue
        for key, value in values.items():
            curve = curves.setdefault(str(key), ([], []))
            if _number(value) is not None:
                curve[0].append(step)
                curve[1].append(float(value))
    return {key: curve for key, curve in curves.items() if curve[0]}


def log_events(records: Iterable[dict]) -> list[tuple[float, str]]:
    """(step, name) of the event lines (a skipped batch, a divergence)."""
    return [(_step(r), str(r["event"])) for r in records if "event" in r and _step(r) is not None]


def training_curves(records: Sequence[dict]) -> dict[str, dict[str, Series]]:
    """{figure: {curve label: (steps, values)}} for each CURVE_FILES field the log has values of.

    loss: the mean loss per logging interval; loss_by_t: the mean weighted MMD² per bin of t, one curve
    per bin ("t in lo-hi"); samples_per_s: training throughput; fd: FD of the EMA model where a log line
    records one (a checkpoint's evaluation). Figures without any value are absent.
    """
    curves = {
        "loss": {"loss": log_series(records, "loss")},
        "loss_by_t": {f"t in {key}": series for key, series in log_series_by_key(records, "loss_by_t").items()},
        "samples_per_s": {"samples/s": log_series(records, "samples_per_s")},
        "fd": {"FD (EMA)": log_series(records, "fd", events=True)},
    }
    return {name: kept for name, figure in curves.items() if (kept := {k: s for k, s in figure.items() if s[0]})}


_CURVE_AXES = {  # figure -> (title, y label)
    "loss": ("training loss (mean per logging interval)", "loss"),
    "loss_by_t": ("loss by time bin (weighted MMD², mean per interval)", "loss"),
    "samples_per_s": ("throughput", "samples / s"),
    "fd": ("FD of the EMA model at checkpoints", "FD (lower is better)"),
}


def training_figures(records: Sequence[dict]):
    """{figure name: matplotlib Figure} of `training_curves(records)`; event lines are dotted vertical
    lines on the loss figures."""
    events = log_events(records)
    figures = {}
    for name, curves in training_curves(records).items():
        title, y_label = _CURVE_AXES[name]
        figure = new_figure()
        axes = figure.add_subplot()
        for label, (steps, values) in curves.items():
            axes.plot(steps, values, label=label, marker="o" if len(steps) < 20 else None, markersize=3)
        if name.startswith("loss"):
            _mark_events(axes, events)
            if _spans_decades(values for _, values in curves.values()):
                axes.set_yscale("log")
        axes.set(title=title, xlabel="training step", ylabel=y_label)
        axes.grid(alpha=0.3)
        if len(curves) > 1 or (name.startswith("loss") and events):
            axes.legend(fontsize="small")
        figures[name] = figure
    return figures


def _spans_decades(value_lists: Iterable[list[float]]) -> bool:
    """Whether positive values span a factor of 10 or more, where a log axis shows them best (a loss by
    time bin spans several); over a narrower range a log axis only crowds its tick labels."""
    values = [v for values in value_lists for v in values]
    return bool(values) and min(values) > 0 and max(values) >= 10 * min(values)


def _mark_events(axes, events: list[tuple[float, str]]) -> None:
    colours = {"diverged": "tab:red", "skipped": "tab:orange"}
    labelled = set()
    for step, name in events:
        axes.axvline(
            step,
            color=colours.get(name, "tab:grey"),
            linestyle=":",
            linewidth=1,
            label=None if name in labelled else name,
        )
        labelled.add(name)


def plot_training_curves(records: Sequence[dict], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes each figure of `training_figures(records)` as out_dir/CURVE_FILES[name]; returns {name: path}.
    Figures without data (an old log without loss_by_t, a log without FD) are not written."""
    out_dir = Path(out_dir)
    return {
        name: save_figure(figure, out_dir / CURVE_FILES[name]) for name, figure in training_figures(records).items()
    }


def fd_vs_steps_figure(series: FdSeries, *, title: str = "FD vs sampling steps"):
    """A matplotlib Figure of FD against sampling steps: one curve per label (markers at each step count,
    log-2 step axis), with a shaded ±err band where an error is given."""
    figure = new_figure()
    axes = figure.add_subplot()
    all_steps = set()
    for label, (steps, fd, fd_err) in series.items():
        if not len(steps) == len(fd) or (fd_err is not None and len(fd_err) != len(fd)):
            raise ValueError(f"series {label!r}: steps, fd and fd_err must have one value per step count")
        (line,) = axes.plot(list(steps), list(fd), marker="o", label=label)
        if fd_err is not None:
            low = [value - err for value, err in zip(fd, fd_err)]
            high = [value + err for value, err in zip(fd, fd_err)]
            axes.fill_between(list(steps), low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        all_steps.update(steps)
    if all_steps:
        set_log2_axis(axes, sorted(all_steps))
    else:
        axes.set_xscale("log", base=2)
    axes.set(title=title, xlabel="sampling steps", ylabel="FD (lower is better)")
    axes.grid(alpha=0.3)
    if series:
        axes.legend(fontsize="small")
    return figure


def plot_fd_vs_steps(series: FdSeries, path: str | os.PathLike, *, title: str = "FD vs sampling steps") -> Path:
    """Writes `fd_vs_steps_figure(series, title=title)` as a PNG at path; returns the path.

    series: {label: (step counts, FD per step count, FD error per step count or None)}, e.g.
    {"M=4": ([1, 2, 4, 8], [31.0, 14.2, 10.9, 10.1], [1.2, 0.8, 0.7, 0.7])}.
    """
    return save_figure(fd_vs_steps_figure(series, title=title), Path(path))


def new_figure(size: tuple[float, float] = FIGURE_SIZE):
    """An empty matplotlib Figure of `size` inches at DPI, drawn on Agg: no display needed, whatever backend
    matplotlib would pick, and no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def set_log2_axis(axes, ticks: Sequence[int]) -> None:
    """A log-2 x axis labelled at exactly `ticks` (step counts, group sizes), without minor ticks."""
    axes.set_xscale("log", base=2)
    axes.set_xticks(ticks, [str(tick) for tick in ticks])
    axes.minorticks_off()


def save_figure(figure, path: Path) -> Path:
    """Writes the figure as a PNG at path (its folder is made); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
    return path
