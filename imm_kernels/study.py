"""A reproducible mini-study of IMM's claims on sklearn's 8×8 digits, on the CPU (`imm-kernels study`).

The claims it checks, at this scale:
  (a) few-step quality: good samples at 1 and 2 sampling steps;
  (b) quality grows with the number of sampling steps (the FD falls);
  (c) stability: with group size M = 1 the IMM objective is a consistency-model-style loss, which the
      IMM paper finds less stable than M > 1 (larger M: more stable and better).

The study trains a grid of runs, group size M × learning rate × seed, every run at one fixed budget:
the same optimizer steps at the same batch, so every run sees the same number of training digits and
makes the same number of network calls (M only groups them: batch / M groups of M particles sharing
their times), with the same warm-up, EMA, model and data. Then each run's EMA model samples at 1, 2,
4, 8 (and 16) steps from the same prior draws, scored with the digits FD
(`imm_kernels.train.metrics.DigitsEvaluator.fd_draws`): the mean and spread over random draws of N
samples against N held-out digits, the same draws for every run.

A run's outcome is one of:
  diverged   training raised TrainingDiverged (a non-finite loss or gradient, or weights whose RMS
             passed the trainer's limit): what ends `imm-kernels train` with exit status 3. No FD.
  collapsed  it trained to the end, but its samples are collapsed at every sampling step count:
             the classifier sees fewer than COLLAPSE_MIN_CLASSES of the 10 digits with at least half
             their fair share of the samples, or their FD is no better than a Gaussian fit's of the
             training pixels (blobs with no digit shapes; same N and draws), or it is not finite.
  ok         otherwise.

Outputs, in the study's folder:
  results.jsonl         one JSON line per finished run, written as each run ends; a study started again
                        with the same settings skips the runs recorded there and refuses other settings
  summary.md            the tables: FD per M and learning rate, FD vs steps at each M's best rate, runs
  fd_vs_steps.png       FD against sampling steps per M at its best learning rate, ± the std over seeds
  fd_by_group_size.png  FD at 1 and at 8 steps against M, a curve per learning rate, ± the std over seeds

Reproducible: every random draw comes from the run's seed (init, data order, the loss's draws, the
prior draws) or a fixed seed (the classifier, the FD's reference draws), and the study runs on the CPU
with a fixed torch thread count (`threads`, 1 by default: the floating-point path depends on the
count, and on a shared CPU one thread is also many times faster than several that wait for each
other). The same settings give the same numbers on the same machine and software versions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "COLLAPSE_MIN_CLASSES",
    "QUICK_SETTINGS",
    "CellSummary",
    "RunKey",
    "StudySettings",
    "best_learning_rates",
    "format_summary",
    "read_results",
    "run_study",
    "samples_collapsed",
    "summarize",
    "write_report",
]

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.md"
FD_VS_STEPS_FILE = "fd_vs_steps.png"
FD_BY_GROUP_SIZE_FILE = "fd_by_group_size.png"
STUDY_FILES = (RESULTS_FILE, SUMMARY_FILE, FD_VS_STEPS_FILE, FD_BY_GROUP_SIZE_FILE)

# Samples collapsed (see the module docstring): fewer than half the digits get half their fair share of the
# classifier's predictions (real digits and every trained run so far: 9 or 10 of 10), or an FD no better than a
# Gaussian fit of the pixels, the demo table's line between having learned digit shapes and not (at N = 177 the fit
# scored 136-139, an untrained model 378, trained runs 20-115; the fit itself covers 9 of 10 classes).
COLLAPSE_MIN_CLASSES = 5
# The step counts of the summary's main table: one step (claim a) and eight (claim b).
TABLE_STEPS = (1, 8)
# The seed of the FD's reference draws: the same held-out digits for every run.
FD_DRAW_SEED = 0
# Steps between the trainer's divergence checks (it also checks at the end).
DIVERGENCE_CHECK_EVERY = 50


class RunKey(NamedTuple):
    """One cell of the grid and one seed: a training run."""

    group_size: int
    lr: float
    seed: int


@dataclass(frozen=True)
class StudySettings:
    """The grid and the budget of every run.

    group_sizes, lrs, seeds: the grid (every combination is a run).
    steps, batch: the fixed budget, the same for every run: optimizer steps at `batch` samples each.
        The learning rate warms up over min(200, steps // 4) steps, then stays constant; everything
        else is the TrainConfig default (the `imm-kernels demo` run: conv backbone 64 × 3, EMA 0.998).
    num_samples: samples per sampling step count; each FD draw takes N = min(num_samples // 2,
        the evaluator's maximum) of them (the demo table's N).
    sampling_steps: the step counts each run's EMA model is sampled at; must include 1 and 8.
    threads: torch threads while the study runs (the numbers depend on it).
    draws: FD draws per score (their mean is the FD, their std its sampling spread).
    """

    group_sizes: tuple[int, ...] = (1, 2, 4, 8)
    lrs: tuple[float, ...] = (2e-3, 6e-3, 2e-2)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 4000
    batch: int = 128
    num_samples: int = 1000
    sampling_steps: tuple[int, ...] = (1, 2, 4, 8, 16)
    threads: int = 1
    # The digits table's draws (imm_kernels.train.metrics.FD_DRAWS; not imported, so that `imm-kernels` starts fast).
    draws: int = 50

    def __post_init__(self) -> None:
        for name in ("group_sizes", "lrs", "seeds", "sampling_steps"):
            values = tuple(getattr(self, name))
            object.__setattr__(self, name, values)
            if not values:
                raise ValueError(f"{name} must not be empty")
            if len(set(values)) < len(values):
                raise ValueError(f"{name} lists a value twice: {values}")
        for name, minimum in (("steps", 1), ("batch", 1), ("num_samples", 4), ("threads", 1), ("draws", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        for m in self.group_sizes:
            if isinstance(m, bool) or not isinstance(m, int) or m < 1 or self.batch % m:
                raise ValueError(f"group_sizes must be ints >= 1 that divide batch={self.batch}, got {m!r}")
        for lr in self.lrs:
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
                raise ValueError(f"lrs must be finite numbers > 0, got {lr!r}")
        object.__setattr__(self, "lrs", tuple(float(lr) for lr in self.lrs))
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
                raise ValueError(f"seeds must be ints in [0, 2**32 - 1], got {seed!r}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.sampling_steps):
            raise ValueError(f"sampling_steps must be ints >= 1, got {self.sampling_steps}")
        if not set(TABLE_STEPS) <= set(self.sampling_steps):
            raise ValueError(f"sampling_steps must include {TABLE_STEPS} (the summary's), got {self.sampling_steps}")
        object.__setattr__(self, "sampling_steps", tuple(sorted(self.sampling_steps)))

    @property
    def warmup(self) -> int:
        """Learning-rate warm-up steps: TrainConfig's default, at most a quarter of a short run."""
        from .train.trainer import TrainConfig

        return min(TrainConfig.warmup, self.steps // 4)

    def runs(self) -> list[RunKey]:
        """The grid in the order it runs: seed, then learning rate, then M (so an interrupted study
        has every M of its first seeds)."""
        return [RunKey(m, lr, seed) for seed in self.seeds for lr in self.lrs for m in self.group_sizes]

    def train_config(self, key: RunKey):
        """The TrainConfig of one run (on the CPU, no files written)."""
        from .train.trainer import TrainConfig

        return TrainConfig(
            steps=self.steps,
            batch=self.batch,
            group_size=key.group_size,
            lr=key.lr,
            seed=key.seed,
            warmup=self.warmup,
            log_every=DIVERGENCE_CHECK_EVERY,
            device="cpu",
        )

    def run_settings(self) -> dict:
        """What every recorded run must share with this study to be reused: the budget, the evaluation,
        the thread count and every TrainConfig field but the grid's (group size, learning rate, seed)."""
        config = dataclasses.asdict(self.train_config(self.runs()[0]))
        for varied in ("group_size", "lr", "seed"):
            del config[varied]
        return {
            "num_samples": self.num_samples,
            "sampling_steps": list(self.sampling_steps),
            "draws": self.draws,
            "threads": self.threads,
            "train_config": config,
        }


# `imm-kernels study --quick`: the full grid's M, its lowest and highest learning rates, two seeds and a fifth of
# the steps; about 10 minutes on this project's 2-core CPU machine while others share it.
QUICK_SETTINGS = StudySettings(group_sizes=(1, 2, 4, 8), lrs=(2e-3, 2e-2), seeds=(0, 1), steps=800)


# Outcomes.


def samples_collapsed(fd: float | None, covered_classes: int, gaussian_fit_fd: float | None) -> bool:
    """Whether one step count's samples are collapsed: a non-finite (or missing) FD, fewer than
    COLLAPSE_MIN_CLASSES classes covered, or an FD no better (lower) than the Gaussian fit's."""
    if fd is None or not math.isfinite(fd) or covered_classes < COLLAPSE_MIN_CLASSES:
        return True
    return gaussian_fit_fd is not None and math.isfinite(gaussian_fit_fd) and fd >= gaussian_fit_fd


def run_outcome(fds: Sequence[float | None], covered: Sequence[int], gaussian_fit_fd: float | None) -> str:
    """The outcome of a run that trained to the end: "collapsed" when the samples of every step count are
    collapsed (samples_collapsed), else "ok"."""
    if all(samples_collapsed(fd, n, gaussian_fit_fd) for fd, n in zip(fds, covered, strict=True)):
        return "collapsed"
    return "ok"


# Results file.


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _key_of(record: dict) -> RunKey:
    return RunKey(int(record["group_size"]), float(record["lr"]), int(record["seed"]))


def _differences(recorded: dict, wanted: dict, prefix: str = "") -> list[str]:
    """The settings that differ, as "name: THERE there, HERE here"."""
    found = []
    for name in sorted(set(recorded) | set(wanted)):
        there, here = recorded.get(name), wanted.get(name)
        if isinstance(there, dict) and isinstance(here, dict):
            found += _differences(there, here, f"{prefix}{name}.")
        elif there != here:
            found.append(f"{prefix}{name}: {there!r} there, {here!r} here")
    return found


def read_results(out_dir: str | os.PathLike, settings: StudySettings) -> dict[RunKey, dict]:
    """The runs recorded in out_dir/results.jsonl, by key ({} when there is no such file).

    A line that is not JSON (one cut short when a study was killed while writing it) is skipped; a
    run recorded twice keeps its first record. Raises ValueError when a record is no study record or
    was made with other settings (StudySettings.run_settings): results of other settings never mix.
    """
    path = Path(out_dir) / RESULTS_FILE
    if not path.exists():
        return {}
    wanted = settings.run_settings()
    records: dict[RunKey, dict] = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        try:
            key = _key_of(record)
            recorded = record["settings"]
        except (TypeError, KeyError, ValueError) as err:
            raise ValueError(f"{path}, line {number}: not a study record ({err!r})") from err
        if recorded != wanted:
            differences = "; ".join(_differences(recorded, wanted)[:3])
            raise ValueError(
                f"{path} holds runs made with other settings ({differences}); use another output folder, "
                "or start over (--force) to discard them"
            )
        records.setdefault(key, record)
    return records


def _append_record(path: Path, record: dict) -> None:
    """One JSON line, on disk before the next run starts (flushed, fsynced)."""
    with open(path, "a+b") as results:
        results.seek(0, os.SEEK_END)
        if results.tell():
            results.seek(-1, os.SEEK_END)
            if results.read(1) != b"\n":  # a line cut short by a kill: keep it apart from this one
                results.write(b"\n")
        results.write((json.dumps(record, allow_nan=False) + "\n").encode())
        results.flush()
        os.fsync(results.fileno())


# One run.


def train_and_score(key: RunKey, settings: StudySettings, evaluator) -> dict:
    """Trains one run and scores its EMA model; returns its record (see run_study). A run that diverges is
    recorded as such (TrainingDiverged is caught here), with its message and no FD."""
    from .train.evaluation import untrained_net
    from .train.metrics import DIGITS_SHAPE, covered_classes, gaussian_fit_samples
    from .train.sampling_helpers import prior_noise, pushforward_sample
    from .train.trainer import Trainer, TrainingDiverged

    trainer = Trainer(settings.train_config(key), None, progress=False)
    record = {**key._asdict(), "settings": settings.run_settings()}
    started = time.perf_counter()
    try:
        summary = trainer.train()
    except TrainingDiverged as err:
        return {**record, "outcome": "diverged", "message": str(err), "train_s": time.perf_counter() - started}
    train_s = time.perf_counter() - started

    started = time.perf_counter()
    sample_size = evaluator.sample_size(settings.num_samples)

    def fd_and_spread(samples: torch.Tensor) -> tuple[float | None, float | None]:
        fds = evaluator.fd_draws(samples, sample_size, draws=settings.draws, seed=FD_DRAW_SEED)
        return _finite_or_none(fds.mean()), _finite_or_none(fds.std(ddof=1))

    untrained = untrained_net(trainer.config, trainer.data_info)
    noise = prior_noise(untrained, settings.num_samples, DIGITS_SHAPE, key.seed)
    untrained_fd, _ = fd_and_spread(pushforward_sample(untrained, noise, 1))
    gaussian_fit_fd, _ = fd_and_spread(gaussian_fit_samples(settings.num_samples, key.seed))
    net = trainer.ema.float().eval()
    fds, fd_stds, counts, confidences = [], [], [], []
    for num_steps in settings.sampling_steps:
        samples = pushforward_sample(net, noise, num_steps)
        fd, fd_std = fd_and_spread(samples)
        fds.append(fd)
        fd_stds.append(fd_std)
        counts.append([int(n) for n in evaluator.class_histogram(samples)])
        confidences.append(_finite_or_none(evaluator.confidence(samples)))
    covered = [covered_classes(np.array(c)) for c in counts]
    floor = evaluator.floor_fd_draws(sample_size, draws=settings.draws, seed=FD_DRAW_SEED)
    return {
        **record,
        "outcome": run_outcome(fds, covered, gaussian_fit_fd),
        "message": None,
        "train_s": train_s,
        "eval_s": time.perf_counter() - started,
        "final_loss": _finite_or_none(summary["loss"]),
        "sample_size": sample_size,
        "fd": fds,
        "fd_std": fd_stds,
        "covered_classes": covered,
        "class_counts": counts,
        "confidence": confidences,
        "untrained_fd": untrained_fd,
        "gaussian_fit_fd": gaussian_fit_fd,
        "floor_fd": _finite_or_none(floor.mean()),
        "floor_fd_std": _finite_or_none(floor.std(ddof=1)),
    }


def _progress_line(index: int, total: int, record: dict, settings: StudySettings, elapsed: float, left: float) -> str:
    head = f"[{index}/{total}] M={record['group_size']} lr={record['lr']:g} seed={record['seed']}: "
    timing = f"trained in {record['train_s']:.0f} s"
    if record["outcome"] == "diverged":
        body = "diverged"
    else:
        fds = "/".join(_format_number(fd) for fd in record["fd"])
        body = (
            f"{record['outcome']}, FD at {'/'.join(map(str, settings.sampling_steps))} steps {fds}, "
            f"classes {min(record['covered_classes'])}-{max(record['covered_classes'])}/10"
        )
        timing += f", scored in {record['eval_s']:.0f} s"
    return f"{head}{body} ({timing}; {elapsed / 60:.1f} min so far, about {left / 60:.1f} min left)"


def run_study(
    settings: StudySettings,
    out_dir: str | os.PathLike,
    *,
    restart: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Runs the grid's runs that out_dir/results.jsonl lacks, appending each record as it ends, then
    writes summary.md and the PNGs; returns the grid's records in grid order.

    restart: delete the study's files in out_dir first (the results of other settings with them).
    log: where the progress lines go, one per run. The torch thread count is settings.threads while
    the study runs, then restored.
    """
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    from .train.metrics import DigitsEvaluator

    out_dir = Path(out_dir)
    if restart:
        for name in STUDY_FILES:
            (out_dir / name).unlink(missing_ok=True)
    recorded = read_results(out_dir, settings)
    grid = settings.runs()
    todo = [key for key in grid if key not in recorded]
    out_dir.mkdir(parents=True, exist_ok=True)
    log(
        f"imm-kernels study: {len(grid)} runs of {settings.steps} steps at batch {settings.batch}, "
        f"{len(grid) - len(todo)} already in {out_dir / RESULTS_FILE}; {settings.threads} CPU thread(s)"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    # numpy's BLAS too (the FD's covariances and eigendecompositions): its default of a thread per core
    # made each FD 40 times slower on a busy 2-core machine.
    try:
        with threadpool_limits(settings.threads):
            evaluator = DigitsEvaluator(seed=0) if todo else None
            for index, key in enumerate(todo, 1):
                record = train_and_score(key, settings, evaluator)
                _append_record(out_dir / RESULTS_FILE, record)
                recorded[key] = record
                elapsed = time.perf_counter() - started
                left = elapsed / index * (len(todo) - index)
                log(_progress_line(index, len(todo), record, settings, elapsed, left))
    finally:
        torch.set_num_threads(threads)
    records = [recorded[key] for key in grid]
    written = write_report(records, settings, out_dir)
    log(f"study: {', '.join(map(str, written))} ({(time.perf_counter() - started) / 60:.1f} min)")
    return records


# Summary.


@dataclass(frozen=True)
class CellSummary:
    """The runs of one (M, learning rate) over the seeds.

    fd_mean, fd_std: per sampling step count, the mean and standard deviation (ddof 1; None with
    fewer than two) over the seeds of each run's FD, over the runs that trained to the end with a
    finite FD there (None when there is none); draw_std: the mean over those runs of their FD's
    spread over the draws (the metric's resolution at this N). collapsed_at_one_step: the runs that
    trained to the end but whose 1-step samples are collapsed (samples_collapsed), collapsed or not
    at more steps: few-step failures.
    """

    group_size: int
    lr: float
    runs: int
    diverged: int
    collapsed: int
    collapsed_at_one_step: int
    fd_mean: tuple[float | None, ...]
    fd_std: tuple[float | None, ...]
    draw_std: tuple[float | None, ...]

    @property
    def failed(self) -> int:
        return self.diverged + self.collapsed

    @property
    def overall_fd(self) -> float:
        """The mean of fd_mean over the step counts (inf when any is missing): how best lrs are ranked."""
        if any(value is None for value in self.fd_mean):
            return math.inf
        return float(np.mean(self.fd_mean))


def _mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else None


def _collapsed_at(record: dict, column: int) -> bool:
    return samples_collapsed(record["fd"][column], record["covered_classes"][column], record["gaussian_fit_fd"])


def summarize(records: Sequence[dict], settings: StudySettings) -> list[CellSummary]:
    """A CellSummary per (M, learning rate) of the grid, in order (M, then learning rate), over the records
    of that cell (cells without records are left out)."""
    cells = []
    for m in settings.group_sizes:
        for lr in settings.lrs:
            runs = [r for r in records if _key_of(r)[:2] == (m, lr)]
            if not runs:
                continue
            trained = [r for r in runs if r["outcome"] != "diverged"]
            per_step = [_mean_std(r["fd"][i] for r in trained) for i in range(len(settings.sampling_steps))]
            draw_std = [_mean_std(r["fd_std"][i] for r in trained)[0] for i in range(len(settings.sampling_steps))]
            cells.append(
                CellSummary(
                    group_size=m,
                    lr=lr,
                    runs=len(runs),
                    diverged=sum(r["outcome"] == "diverged" for r in runs),
                    collapsed=sum(r["outcome"] == "collapsed" for r in runs),
                    collapsed_at_one_step=sum(_collapsed_at(r, settings.sampling_steps.index(1)) for r in trained),
                    fd_mean=tuple(mean for mean, _ in per_step),
                    fd_std=tuple(std for _, std in per_step),
                    draw_std=tuple(draw_std),
                )
            )
    return cells


def best_learning_rates(cells: Sequence[CellSummary]) -> dict[int, CellSummary]:
    """Per M, its cell with the fewest failed runs (diverged or collapsed), then the lowest FD averaged over
    the sampling step counts; M whose every run diverged have none."""
    best: dict[int, CellSummary] = {}
    for cell in cells:
        if cell.diverged == cell.runs:
            continue
        current = best.get(cell.group_size)
        rank = (cell.failed / cell.runs, cell.overall_fd)
        if current is None or rank < (current.failed / current.runs, current.overall_fd):
            best[cell.group_size] = cell
    return best


def _format_number(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _mean_pm_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def format_summary(records: Sequence[dict], settings: StudySettings) -> str:
    """summary.md: the settings, what the outcomes mean, then three tables (per M and learning rate; FD vs
    steps at each M's best learning rate; every run)."""
    from .train.sampling_helpers import step_label

    cells = summarize(records, settings)
    steps = settings.sampling_steps
    columns = [steps.index(n) for n in TABLE_STEPS]
    scored = [r for r in records if r["outcome"] != "diverged"]
    lines = [
        "# IMM on 8×8 digits: group size × learning rate × seed",
        "",
        f"Budget of every run: {settings.steps} optimizer steps at batch {settings.batch} "
        f"({settings.steps * settings.batch:,} training samples), warm-up {settings.warmup} steps, "
        f"then a constant learning rate; the `imm-kernels demo` model (conv 64 × 3, EMA 0.998). "
        f"Grid: M ∈ {{{', '.join(map(str, settings.group_sizes))}}} × lr ∈ "
        f"{{{', '.join(f'{lr:g}' for lr in settings.lrs)}}} × seeds {{{', '.join(map(str, settings.seeds))}}}; "
        f"{settings.threads} CPU thread(s), torch {torch.__version__}.",
        "",
    ]
    if scored:
        first = scored[0]
        untrained = _mean_std(r["untrained_fd"] for r in scored)[0]
        gaussian_fit = _mean_std(r["gaussian_fit_fd"] for r in scored)[0]
        lines += [
            f"FD: {settings.num_samples} samples per step count from the run seed's prior draws; the FD is the "
            f"mean over {settings.draws} draws of {first['sample_size']} samples against as many held-out "
            f"digits (the same draws for every run). Real held-out digits score "
            f"{_mean_pm_std(first['floor_fd'], first['floor_fd_std'])} (the floor, ± one draw's spread), a "
            f"Gaussian fit of the training pixels {_format_number(gaussian_fit)}, the untrained models "
            f"{_format_number(untrained)} at 1 step (means over the runs).",
            "",
        ]
    lines += [
        f"Outcomes: *diverged*: training stopped with TrainingDiverged (a non-finite loss or gradient, or "
        f"exploding weights; `imm-kernels train` exit status 3). *collapsed*: trained, but at every step count "
        f"the samples cover fewer than {COLLAPSE_MIN_CLASSES} of 10 digit classes (a class counts with at least "
        f"half its fair share of the classifier's predictions) or score no better an FD than the Gaussian fit "
        f"(no digit shapes learned). *1-step collapsed*: runs whose 1-step samples fail that test, whatever "
        f"their samples at more steps do.",
        "",
        "## FD by group size and learning rate",
        "",
        "| M | lr | runs | "
        + " | ".join(f"FD, {step_label(n)}" for n in TABLE_STEPS)
        + " | diverged | collapsed | 1-step collapsed |",
        "|---:|---:|---:|" + "---:|" * len(TABLE_STEPS) + "---:|---:|---:|",
    ]
    for cell in cells:
        fds = " | ".join(_mean_pm_std(cell.fd_mean[i], cell.fd_std[i]) for i in columns)
        lines.append(
            f"| {cell.group_size} | {cell.lr:g} | {cell.runs} | {fds} | {cell.diverged}/{cell.runs} | "
            f"{cell.collapsed}/{cell.runs} | {cell.collapsed_at_one_step}/{cell.runs} |"
        )
    draw_spread = " and ".join(
        f"{_format_number(_mean_std(c.draw_std[i] for c in cells)[0])} at {step_label(n)}"
        for i, n in zip(columns, TABLE_STEPS)
    )
    lines += [
        "",
        "FD: mean ± std over the seeds of each run's FD (runs that trained to the end); lower is better. "
        f"One draw's spread, averaged over the runs, is {draw_spread}: that is the metric's resolution "
        "for one draw; every run is scored on the same reference draws, so the mean over the draws "
        "separates runs more finely, and the spread over seeds is what separates settings.",
        "",
        "## FD vs sampling steps at each M's best learning rate",
        "",
        "Best: the fewest diverged or collapsed runs, then the lowest FD averaged over the step counts.",
        "",
        "| M | lr | " + " | ".join(step_label(n) for n in steps) + " |",
        "|---:|---:|" + "---:|" * len(steps),
    ]
    for m, cell in best_learning_rates(cells).items():
        fds = " | ".join(_mean_pm_std(mean, std) for mean, std in zip(cell.fd_mean, cell.fd_std))
        lines.append(f"| {m} | {cell.lr:g} | {fds} |")
    lines += [
        "",
        "## Runs",
        "",
        "| M | lr | seed | outcome | "
        + " | ".join(f"FD {n}" for n in steps)
        + " | classes (fewest) | final loss | train s |",
        "|---:|---:|---:|---|" + "---:|" * len(steps) + "---:|---:|---:|",
    ]
    for record in records:
        trained = record["outcome"] != "diverged"
        fds = " | ".join(_format_number(fd) for fd in record["fd"]) if trained else " | ".join("–" for _ in steps)
        classes = f"{min(record['covered_classes'])}/10" if trained else "–"
        loss = _format_number(record["final_loss"], 4) if trained else "–"
        lines.append(
            f"| {record['group_size']} | {record['lr']:g} | {record['seed']} | {record['outcome']} | {fds} | "
            f"{classes} | {loss} | {record['train_s']:.0f} |"
        )
    diverged = [r for r in records if r["outcome"] == "diverged"]
    if diverged:
        lines += ["", "Divergence messages:", ""]
        lines += [f"- M={r['group_size']} lr={r['lr']:g} seed={r['seed']}: {r['message']}" for r in diverged]
    return "\n".join(lines) + "\n"


def _spread_note(settings: StudySettings) -> str:
    seeds = len(settings.seeds)
    return f"± std over {seeds} seeds" if seeds > 1 else "one seed, no spread"


def write_report(records: Sequence[dict], settings: StudySettings, out_dir: str | os.PathLike) -> list[Path]:
    """Writes summary.md, fd_vs_steps.png and fd_by_group_size.png into out_dir; returns their paths."""
    from .plots import plot_fd_vs_steps

    out_dir = Path(out_dir)
    summary = out_dir / SUMMARY_FILE
    summary.write_text(format_summary(records, settings))
    cells = summarize(records, settings)
    series = {}
    for m, cell in best_learning_rates(cells).items():
        kept = [i for i, fd in enumerate(cell.fd_mean) if fd is not None]
        errors = [cell.fd_std[i] or 0.0 for i in kept] if settings.seeds[1:] else None
        series[f"M={m} (lr {cell.lr:g})"] = (
            [settings.sampling_steps[i] for i in kept],
            [cell.fd_mean[i] for i in kept],
            errors,
        )
    title = f"FD vs sampling steps at each M's best lr ({_spread_note(settings)})"
    fd_vs_steps = plot_fd_vs_steps(series, out_dir / FD_VS_STEPS_FILE, title=title)
    return [summary, fd_vs_steps, _plot_fd_by_group_size(cells, settings, out_dir / FD_BY_GROUP_SIZE_FILE)]


def _plot_fd_by_group_size(cells: Sequence[CellSummary], settings: StudySettings, path: Path) -> Path:
    """Two panels, FD at 1 and at 8 steps against M (log-2 axis), a curve per learning rate with error bars
    (the std over seeds)."""
    from .plots import new_figure, save_figure, set_log2_axis

    figure = new_figure((9.6, 4.0))
    panels = figure.subplots(1, len(TABLE_STEPS), sharey=True)
    for axes, num_steps in zip(panels, TABLE_STEPS):
        column = settings.sampling_steps.index(num_steps)
        for lr in settings.lrs:
            points = [(c.group_size, c.fd_mean[column], c.fd_std[column] or 0.0) for c in cells if c.lr == lr]
            points = [p for p in points if p[1] is not None]
            if points:
                ms, fds, stds = zip(*points)
                axes.errorbar(ms, fds, yerr=stds, marker="o", capsize=3, label=f"lr {lr:g}")
        set_log2_axis(axes, settings.group_sizes)
        axes.set(title=f"{num_steps} sampling step{'s' if num_steps > 1 else ''}", xlabel="group size M")
        axes.grid(alpha=0.3)
    panels[0].set_ylabel("FD (lower is better)")
    if panels[0].get_legend_handles_labels()[0]:  # no curve when every run diverged
        panels[0].legend(fontsize="small")
    figure.suptitle(f"FD by group size ({settings.steps} training steps each; {_spread_note(settings)})")
    return save_figure(figure, path)
