"""Sample writers for evaluation and training-time sample images.

`pushforward_sample` is `imm_kernels.sampling.pushforward` on the uniform grid
linspace(T, eps, num_steps + 1), which is what the trainer and `imm-kernels eval` use.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from ..precond import Preconditioner
from ..sampling import pushforward, time_grid
from ..validation import check_positive_int
from .data import TOY2D_KINDS, load_dataset, save_image_grid, save_scatter_plot

SAMPLE_STEPS = (1, 2, 4, 8)
# The scatter plots cover [-3, 3]²: the toy data have unit standard deviation per coordinate.
SCATTER_EXTENT = 3.0
# Draws of a toy's data behind its scatter plots: enough for a smooth density (about 70 per shaded
# cell of the checkerboard), under 0.1 s to draw on a CPU.
DENSITY_DRAWS = 200_000


def pushforward_sample(
    net: Preconditioner, noise: Tensor, num_steps: int, class_labels: Tensor | None = None, cfg_scale: float = 1.0
) -> Tensor:
    """x ← f_{t_next, t_cur}(x) over the grid linspace(T, eps, num_steps + 1), starting from x = noise.

    noise: (N, *shape) draws of the prior N(0, sigma_d² I) (see prior_noise). The net runs in
    eval mode (no dropout). cfg_scale != 1 applies classifier-free guidance (needs a
    conditional net and class_labels).
    """
    grid = time_grid("uniform", check_positive_int("num_steps", num_steps), net.T, net.eps)
    state_dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32  # the net's output dtype
    return pushforward(net, noise, grid, class_labels, None if cfg_scale == 1.0 else cfg_scale, dtype=state_dtype)


def prior_noise(net: Preconditioner, num_samples: int, shape: tuple[int, ...], seed: int) -> Tensor:
    """num_samples draws of N(0, sigma_d² I) on the net's device, the same for a seed whatever the device."""
    gen = torch.Generator().manual_seed(seed)
    device = next(net.parameters()).device
    return (net.sigma_data * torch.randn(num_samples, *shape, generator=gen)).to(device)


def balanced_labels(net: Preconditioner, num_samples: int) -> Tensor | None:
    """Class labels 0, 1, …, 0, 1, … for a conditional net (every class about equally often); None otherwise."""
    if not net.label_dim:
        return None
    return torch.arange(num_samples, device=next(net.parameters()).device) % net.label_dim


def step_label(num_steps: int) -> str:
    """How a picture names a step count: "1 step", "4 steps"."""
    return f"{num_steps} step{'' if num_steps == 1 else 's'}"


def data_density_points(data_name: str | None) -> Tensor | None:
    """DENSITY_DRAWS points of the 2-D toy a run trained on, named as DataInfo.name gives it ("toy2d:checkerboard"
    or "checkerboard"), for the background of its scatter plots; None for other data (and for None)."""
    toy = (data_name or "").removeprefix("toy2d:")
    if toy not in TOY2D_KINDS:
        return None
    return load_dataset(toy, split="all", num_samples=DENSITY_DRAWS).x


def save_steps_grid(
    net: Preconditioner,
    path: str | os.PathLike,
    shape: tuple[int, ...],
    *,
    steps: tuple[int, ...] = SAMPLE_STEPS,
    per_row: int = 16,
    seed: int = 0,
    cfg_scale: float = 1.0,
) -> Path:
    """A PNG with one row of image samples per step count, each row labelled with its step count, every
    row from the same prior draws (so a column shows one draw across step counts)."""
    noise = prior_noise(net, per_row, shape, seed)
    labels = balanced_labels(net, per_row)
    rows = [pushforward_sample(net, noise, num_steps, labels, cfg_scale) for num_steps in steps]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_image_grid(torch.cat(rows).float(), path, nrow=per_row, row_labels=[step_label(n) for n in steps])


def save_points_scatter(
    net: Preconditioner,
    path: str | os.PathLike,
    num_steps: int,
    *,
    num_points: int = 2000,
    seed: int = 0,
    cfg_scale: float = 1.0,
    data_name: str | None = None,
) -> Path:
    """A PNG scatter plot of num_points 2-D samples at num_steps steps, labelled with the step count.

    data_name: the run's data (DataInfo.name); for a 2-D toy its density is drawn behind the samples.
    """
    noise = prior_noise(net, num_points, (2,), seed)
    points = pushforward_sample(net, noise, num_steps, balanced_labels(net, num_points), cfg_scale)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_scatter_plot(
        points.float(),
        path,
        extent=SCATTER_EXTENT,
        background=data_density_points(data_name),
        label=step_label(num_steps),
    )
