"""Evaluating trained IMM models: checkpoints → models, the digits metric table, sample files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..precond import Preconditioner
from .checkpoints import open_checkpoint
from .metrics import DIGITS_SHAPE, DigitsEvaluator
from .sampling_helpers import (
    SAMPLE_STEPS,
    balanced_labels,
    prior_noise,
    pushforward_sample,
    save_points_scatter,
    save_steps_grid,
)
from .trainer import EMA_FILE, DataInfo, TrainConfig, build_net, load_module_weights, load_run_config

__all__ = ["MetricRow", "load_ema_net", "untrained_net", "digits_metric_rows", "format_metric_table", "write_samples"]


@dataclass(frozen=True)
class MetricRow:
    """One row of the digits table: a sample source, its FD to the held-out digits, the classifier's confidence."""

    name: str
    fd: float
    confidence: float


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
) -> list[MetricRow]:
    """The digits table: real digits, a Gaussian fit, the untrained model, then each model.

    Real training digits are the floor a generator is read against: with 360 held-out digits
    the FD's sampling noise is about that row's value, so models near or below it are at the
    metric's resolution (the confidence column still tells them from real digits).

    models maps a row label (e.g. "trained (EMA)") to a model, which gives a row per step
    count; `untrained` gives one row at 1 step. Every model starts from the same prior draws.
    """
    references = evaluator.reference_rows(num_samples, seed)
    rows = [
        MetricRow("real digits (train split)", *references["real (train split)"]),
        MetricRow("gaussian fit of the pixels", *references["gaussian fit"]),
    ]
    runs = [("untrained model", untrained, (1,))] if untrained is not None else []
    runs += [(label, net, steps) for label, net in models.items()]
    for label, net, step_counts in runs:
        noise = prior_noise(net, num_samples, DIGITS_SHAPE, seed)
        labels = balanced_labels(net, num_samples)
        for num_steps in step_counts:
            samples = pushforward_sample(net, noise, num_steps, labels, cfg_scale)
            name = f"{label}, {num_steps} step{'s' if num_steps > 1 else ''}"
            rows.append(MetricRow(name, evaluator.fd(samples), evaluator.confidence(samples)))
    return rows


def format_metric_table(rows: list[MetricRow]) -> str:
    """Plain text: one line per row with FD (lower is better) and classifier confidence (higher is better)."""
    width = max(len(row.name) for row in rows)
    lines = [f"{'samples':<{width}}  {'FD':>8}  {'confidence':>10}", "-" * (width + 22)]
    lines += [f"{row.name:<{width}}  {row.fd:8.1f}  {row.confidence:10.3f}" for row in rows]
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
                net, out_dir / f"samples_{n}step.png", n, num_points=num_samples, seed=seed, cfg_scale=cfg_scale
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
