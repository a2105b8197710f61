"""Plain-PyTorch references. They define the semantics every fused kernel must meet.

Tests compare the kernels with these, and these with a float64 run of themselves;
benchmarks time them as the ``eager`` / ``compiled`` / ``cdist`` providers.

The MMD reference is the formulation found in public IMM training code: three
broadcast-difference kernels of shape (G, M, M, D), each averaged over (1, 2).
It is exact (direct differences, no Gram expansion) and memory-hungry on purpose.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .utils import as_per_group, compute_dtype, reduce_groups

__all__ = [
    "laplace_distance",
    "grouped_mmd_reference",
    "mmd_loss_reference",
    "grouped_mmd_cdist",
    "mmd_loss_cdist",
    "adaln_modulate_reference",
    "adaln_residual_modulate_reference",
    "timestep_embedding_reference",
]


def laplace_distance(sqdist: Tensor, eps: float) -> Tensor:
    """max(sqrt(sqdist), eps), with exactly zero gradient where sqrt(sqdist) <= eps.

    The inner `where` keeps sqrt away from 0, whose derivative is infinite (0 * inf
    would turn the diagonal's zero gradient into NaN). NaN distances stay NaN.
    """
    close = sqdist <= eps * eps
    safe = torch.where(close, torch.ones_like(sqdist), sqdist)
    return torch.where(close, torch.full_like(sqdist, eps), safe.sqrt())


def _laplace_kernel(a: Tensor, b: Tensor, bandwidth: Tensor, eps: float) -> Tensor:
    """k(a_i, b_j) for every pair of a group: (G, M, D) x (G, M, D) -> (G, M, M)."""
    num_features = a.shape[-1]
    sqdist = (a[:, :, None, :] - b[:, None, :, :]).square().sum(-1)
    return torch.exp(-bandwidth[:, None, None] * laplace_distance(sqdist, eps) / num_features)


def grouped_mmd_reference(
    x: Tensor, y: Tensor, group_size: int, bandwidth: Tensor, weight: Tensor, eps: float
) -> Tensor:
    """weight_g * MMD^2_g for every group, as a (G,) tensor in the compute dtype.

    bandwidth and weight are (G,) tensors (see `as_per_group`).
    """
    cdtype = compute_dtype(x.dtype)
    num_groups = x.shape[0] // group_size
    xg = x.reshape(num_groups, group_size, -1).to(cdtype)
    yg = y.reshape(num_groups, group_size, -1).to(cdtype)
    k_xx = _laplace_kernel(xg, xg, bandwidth, eps).mean((1, 2))
    k_yy = _laplace_kernel(yg, yg, bandwidth, eps).mean((1, 2))
    k_xy = _laplace_kernel(xg, yg, bandwidth, eps).mean((1, 2))
    return weight * (k_xx + k_yy - 2 * k_xy)


def _grouped_to_loss(grouped, x, y, group_size, bandwidth, weight, eps, reduction):
    cdtype = compute_dtype(x.dtype)
    num_groups = x.shape[0] // group_size
    bandwidth = as_per_group(bandwidth, num_groups, cdtype, x.device)
    weight = as_per_group(1.0 if weight is None else weight, num_groups, cdtype, x.device)
    return reduce_groups(grouped(x, y, group_size, bandwidth, weight, eps), reduction)


def mmd_loss_reference(
    x: Tensor, y: Tensor, group_size: int, bandwidth=1.0, weight=None, *, eps: float = 1e-8, reduction: str = "mean"
) -> Tensor:
    """The reference `mmd_loss`, without input validation (benchmarks time this)."""
    return _grouped_to_loss(grouped_mmd_reference, x, y, group_size, bandwidth, weight, eps, reduction)


def grouped_mmd_cdist(x: Tensor, y: Tensor, group_size: int, bandwidth: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The same quantity through `torch.cdist` on the stacked group z = [x; y].

    cdist may use the Gram expansion internally (inaccurate for nearly equal rows);
    it is here as a benchmark provider, not as a second source of truth.
    """
    cdtype = compute_dtype(x.dtype)
    num_groups = x.shape[0] // group_size
    z = torch.cat([x.reshape(num_groups, group_size, -1), y.reshape(num_groups, group_size, -1)], dim=1).to(cdtype)
    num_features = z.shape[-1]
    dist = torch.cdist(z, z).clamp_min(eps)
    kern = torch.exp(-bandwidth[:, None, None] * dist / num_features)
    sign = torch.ones(2 * group_size, dtype=z.dtype, device=z.device)
    sign[group_size:] = -1.0
    mmd2 = (sign[:, None] * sign[None, :] * kern).sum((1, 2)) / group_size**2
    return weight * mmd2


def mmd_loss_cdist(
    x: Tensor, y: Tensor, group_size: int, bandwidth=1.0, weight=None, *, eps: float = 1e-8, reduction: str = "mean"
) -> Tensor:
    return _grouped_to_loss(grouped_mmd_cdist, x, y, group_size, bandwidth, weight, eps, reduction)


# ----------------------------------------------------------------------------
# adaLN modulation and the timestep embedding (the DiT's building blocks)
# ----------------------------------------------------------------------------


def adaln_modulate_reference(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """DiT's `modulate(norm(x), shift, scale)`: LayerNorm over H without affine, then
    LN(x) * (1 + scale) + shift per sample. x is (N, L, H); shift and scale are (N, H),
    used in x's dtype (as the fused op reads them). The result has x's dtype even under
    autocast (which computes layer_norm in fp32 and would promote the rest to fp32).
    """
    normed = F.layer_norm(x, x.shape[-1:], eps=eps)
    return (normed * (1 + scale.to(x.dtype)[:, None]) + shift.to(x.dtype)[:, None]).to(x.dtype)


def adaln_residual_modulate_reference(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """A DiT block's gated residual followed by the next modulated LayerNorm:
    x_new = x + gate * y, h = LN(x_new) * (1 + scale) + shift; returns (h, x_new).
    """
    x_new = x + gate.to(x.dtype)[:, None] * y.to(x.dtype)
    return adaln_modulate_reference(x_new, shift, scale, eps), x_new


def timestep_embedding_reference(t: Tensor, dim: int, max_period: float = 10000) -> Tensor:
    """DiT's sinusoidal embedding [cos(t f_i), sin(t f_i)] (+ a zero column when dim is odd),
    f_i = max_period^(-i / half), i < half = dim // 2.

    Computed in float64 and rounded once: the DiT's own fp32 formula is off by up
    to ~1e-4 at t ~ 1000 (t * f_i rounded to fp32 is a 1000-radian angle with an
    error of ~6e-5 rad). Returns float32 (float64 for float64 t).
    """
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float64, device=t.device) / half
    freqs = torch.exp(-math.log(max_period) * exponents)
    args = t.to(torch.float64)[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, embedding.new_zeros(embedding.shape[0], 1)], dim=-1)
    return embedding.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
