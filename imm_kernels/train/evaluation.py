"""Evaluating trained IMM models: checkpoints → models, the digits metric table, sample files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..precond import Preconditioner
from .checkpoints import open_checkpoint
from .metrics import (
    DIGITS_SHAPE,
    FD_DRAWS,
    NUM_DIGIT_CLASSES,
    DigitsEvaluator,
    covered_classes,
    gaussian_fit_samples,
)
from .sampling_helpers import (
    SAMPLE_STEPS,
    balanced_labels,
    prior_noise,
    pushforward_sample,
    save_points_scatter,
    save_steps_grid,
    step_label,
)
from .trainer import EMA_FILE, DataInfo, TrainConfig, build_net, load_module_weights, load_run_config

__all__ = [
    "MIN_TABLE_SAMPLES",
    "MetricRow",
    "load_ema_net",
    "untrained_net",
    "digits_metric_rows",
    "format_metric_table",
    "write_samples",
]

# digits_metric_rows scores subsets of at most half of a row's samples, and an FD needs two samples.
MIN_TABLE_SAMPLES = 4


@dataclass(frozen=True)
class MetricRow:
    """One row of the digits table (see digits_metric_rows).

    name: the sample source. fd, fd_std: mean and standard deviation of its FD over `draws` random
    draws of sample_size samples against as many held-out digits. confidence: the classifier's mean
    max-softmax probability, and class_counts: the counts of its predicted classes (0 to 9), both
    over all the row's samples.
    """

    name: str
    fd: float
    confidence: float
    fd_std: float
    sample_size: int
    draws: int
    class_counts: tuple[int, ...]

    @property
    def covered_classes(self) -> int:
        """Predicted classes with at least half their fair share of the samples (10 of 10 for real digits)."""
        return covered_classes(self.class_counts)

    @property
    def rarest_class_share(self) -> float:
        """The smallest predicted class's share of the samples (about 0.1 for real digits)."""
        return min(self.class_counts) / sum(self.class_counts)


def load_ema_net(checkpoint: str | os.PathLike) -> tuple[Preconditioner, TrainConfig, DataInfo]:
    """The EMA model of a checkpoint (a run directory's newest complete one, or a checkpoint folder), float32
    on the CPU, eval mode. Every file's checksum is verified; a bad checkpoint is a CheckpointError naming
    the file."""
    directory, _ = open_checkpoint(checkpoint)
    config, data_info = load_run_config(directory)
    net = build_net(config, data_info)
    load_module_weights(net, directory / EMA_FILE, torch.device("cpu"))
    return net.eval().requires_grad_(False), config, data_info


def untrained_net(config: TrainConfig, data_info: DataInfo) -> Preconditioner:
    """The model a run with this config starts from (its step-0 weights), in eval mode."""
    return build_net(config, data_info).eval().requires_grad_(False)


def digits_metric_rows(
    models: dict[str, Preconditioner],
    evaluator: DigitsEvaluator,
    *,
    untrained: Preconditioner | None = None,
    steps: tuple[int, ...] = SAMPLE_STEPS,
    num_samples: int = 1000,
    seed: int = 0,
    cfg_scale: float = 1.0,
    draws: int = FD_DRAWS,
) -> list[MetricRow]:
    """The digits table: real held-out digits (the floor), a Gaussian fit, the untrained model, then each model.

    Every row's FD is scored the same way: N = evaluator.sample_size(num_samples)
    (177 for 1000 samples) samples against N held-out digits, over `draws` random draws that share
    their reference digits across rows (DigitsEvaluator.fd_draws); the row gives the mean and the
    standard deviation over the draws, the FD's sampling spread at this N (two rows closer than
    about that are not told apart). The real-digits row scores N other held-out digits against the
    same references (DigitsEvaluator.floor_fd_draws): what a generator of exactly the digits'
    distribution would score. Held-out digits are in neither the models' nor the classifier's
    training digits. Confidence and class counts are over all of a row's samples (for the real
    digits, all held-out digits).

    models maps a row label (e.g. "trained (EMA)") to a model, which gives a row per step count;
    `untrained` gives one row at 1 step. Every model starts from the same num_samples prior draws.
    """
    if not isinstance(num_samples, int) or num_samples < MIN_TABLE_SAMPLES:
        raise ValueError(f"num_samples must be an int >= {MIN_TABLE_SAMPLES}, got {num_samples!r}")
    sample_size = evaluator.sample_size(num_samples)

    def row(name: str, fds: np.ndarray, samples: torch.Tensor) -> MetricRow:
        counts = tuple(int(n) for n in evaluator.class_histogram(samples))
        fd_std = float(fds.std(ddof=1))
        return MetricRow(name, float(fds.mean()), evaluator.confidence(samples), fd_std, sample_size, draws, counts)

    def sample_row(name: str, samples: torch.Tensor) -> MetricRow:
        return row(name, evaluator.fd_draws(samples, sample_size, draws=draws, seed=seed), samples)

    rows = [
        row(
            "real digits (held out)",
            evaluator.floor_fd_draws(sample_size, draws=draws, seed=seed),
            evaluator.held_out.x,
        ),
        sample_row("gaussian fit of the pixels", gaussian_fit_samples(num_samples, seed)),
    ]
    runs = [("untrained model", untrained, (1,))] if untrained is not None else []
    runs += [(label, net, steps) for label, net in models.items()]
    for label, net, step_counts in runs:
        noise = prior_noise(net, num_samples, DIGITS_SHAPE, seed)
        labels = balanced_labels(net, num_samples)
        for num_steps in step_counts:
            samples = pushforward_sample(net, noise, num_steps, labels, cfg_scale)
            rows.append(sample_row(f"{label}, {step_label(num_steps)}", samples))
    return rows


def format_metric_table(rows: list[MetricRow]) -> str:
    """Plain text, at most 100 columns: the FD table (a legend under it), then each row's predicted-class shares.

    FD ± std (lower is better), confidence (higher is better), classes: predicted classes with at
    least half their fair share (10/10 when every digit is generated), rarest: the smallest class's
    share of the samples (10% when balanced); then, per row, the share of each predicted class.
    """
    histogram_title = "predicted class, % of samples"
    width = max(len(histogram_title), *(len(row.name) for row in rows))
    header = f"{'samples':<{width}}  {'FD':>6} ± {'std':<5}  {'confidence':>10}  {'classes':>7}  {'rarest':>6}"
    lines = [header, "-" * len(header)]
    for row in rows:
        classes = f"{row.covered_classes}/{len(row.class_counts)}"
        lines.append(
            f"{row.name:<{width}}  {row.fd:6.1f} ± {row.fd_std:<5.1f}  {row.confidence:10.3f}  {classes:>7}  "
            f"{row.rarest_class_share:6.1%}"
        )
    lines += [
        f"FD: {rows[0].sample_size} samples to as many held-out digits, mean ± std over {rows[0].draws} random draws",
        "classes: predicted classes with >= half their fair share; rarest: the rarest class's share",
        "",
        f"{histogram_title:<{width}}  " + "".join(f"{digit:>4}" for digit in range(NUM_DIGIT_CLASSES)),
    ]
    for row in rows:
        total = sum(row.class_counts)
        lines.append(f"{row.name:<{width}}  " + "".join(f"{100 * count / total:4.0f}" for count in row.class_counts))
    return "\n".join(lines)


def write_samples(
    net: Preconditioner,
    data_info: DataInfo,
    out_dir: str | os.PathLike,
    *,
    steps: tuple[int, ...] = SAMPLE_STEPS,
    num_samples: int = 1000,
    seed: int = 0,
    cfg_scale: float = 1.0,
) -> list[Path]:
    """Writes a model's samples under out_dir: images as one grid (a row per step count), 2-D points as a
    scatter plot per step count, other vectors (e.g. latents to decode) as a .npy array per step count."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if data_info.kind == "image":
        return [
            save_steps_grid(net, out_dir / "samples.png", data_info.shape, steps=steps, seed=seed, cfg_scale=cfg_scale)
        ]
    if data_info.shape == (2,):
        return [
            save_points_scatter(
                net,
                out_dir / f"samples_{n}step.png",
                n,
                num_points=num_samples,
                seed=seed,
                cfg_scale=cfg_scale,
                data_name=data_info.name,
            )
            for n in steps
        ]
    noise = prior_noise(net, num_samples, data_info.shape, seed)
    labels = balanced_labels(net, num_samples)
    paths = []
    for num_steps in steps:
        path = out_dir / f"samples_{num_steps}step.npy"
        np.save(path, pushforward_sample(net, noise, num_steps, labels, cfg_scale).float().cpu().numpy())
        paths.append(path)
    return paths
