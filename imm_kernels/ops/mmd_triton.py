"""Grouped Laplace-kernel MMD: the Triton kernels and their launchers.

The custom ops and autograd that call these launchers are shared by every
backend and live in `imm_kernels.ops.mmd`.

Per group g, z = [x_g; y_g] stacks its M rows of x over its M rows of y (2M rows,
sign sigma = +1 for x and -1 for y). With S_ij = ||z_i - z_j||^2,
d_ij = max(sqrt(S_ij), eps) and k_ij = exp(-b * d_ij / D):

    forward   loss_g = w * (1/M^2) sum_ij sigma_i sigma_j k_ij
    backward  dz_i   = sum_j A_ij (z_i - z_j),
              A_ij   = -(2 w b g_out / (M^2 D)) sigma_i sigma_j k_ij / d_ij   (0 where d_ij <= eps)

The forward reads x and y once and keeps only S (a (2M)x(2M) matrix per group,
padded to R = next_pow2(2M)) for the backward, which reads x and y once more
and writes dx (and dy). Both use direct differences, never the Gram expansion
||a||^2 + ||b||^2 - 2 a.b, which cancels when a group's outputs converge.

When the groups alone cannot fill the GPU, the D axis is split across programs:
each writes its partial S to a buffer that a second kernel sums in a fixed order,
so results are bitwise deterministic (no atomics).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .mmd import MMDKernels
from .reference import compute_dtype

MAX_GROUP_SIZE = 32
# Triton decides at decoration time whether kernels run in its CPU interpreter.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------


@triton.jit
def _laplace_terms(sqdist, bandwidth, eps, num_features):
    """(close, d, k) from squared distances; `close` marks pairs with ||.|| <= eps.

    Written so that NaN survives: `sqdist <= eps^2` is False for NaN.
    """
    close = sqdist <= eps * eps
    dist = tl.where(close, eps, tl.sqrt(tl.where(close, 1.0, sqdist)))
    kern = tl.exp(-bandwidth * dist / num_features)
    return close, dist, kern


@triton.jit
def _group_rows(group, M: tl.constexpr, R: tl.constexpr):
    """Rows of z = [x_g; y_g]: (index, is_x, is_y, row of x, row of y), rows as int64.

    int64 because row * stride passes 2^31 once B * D does.
    """
    rows = tl.arange(0, R)
    is_x = rows < M
    is_y = (rows >= M) & (rows < 2 * M)
    x_rows = (group * M + rows).to(tl.int64)
    return rows, is_x, is_y, x_rows, x_rows - M


@triton.jit
def _group_tile(x_rows, y_rows, is_x, is_y, cols, in_d, OUT_DTYPE: tl.constexpr):
    """The (R, BLOCK_D) tile of z = [x_g; y_g] at columns `cols`; padded rows read 0."""
    zx = tl.load(x_rows[:, None] + cols[None, :], mask=is_x[:, None] & in_d[None, :], other=0.0)
    zy = tl.load(y_rows[:, None] + cols[None, :], mask=is_y[:, None] & in_d[None, :], other=0.0)
    return tl.where(is_x[:, None], zx, zy).to(OUT_DTYPE)


@triton.jit
def _signed_pairs(rows, M: tl.constexpr):
    """sigma_i sigma_j over the real 2M x 2M block, 0 on padding."""
    sign = tl.where(rows < M, 1.0, -1.0)
    real = rows < 2 * M
    return tl.where(real[:, None] & real[None, :], sign[:, None] * sign[None, :], 0.0)


@triton.jit
def _finalize_group(
    group, sqdist, bandwidth_ptr, weight_ptr, loss_ptr, sqdist_ptr, mmd2_ptr, dmmd_db_ptr,
    num_features, eps, M: tl.constexpr, R: tl.constexpr,
):
    """From a group's summed S: store S, MMD^2, dMMD^2/db and the weighted loss."""
    rows = tl.arange(0, R)
    tl.store(sqdist_ptr + group.to(tl.int64) * (R * R) + rows[:, None] * R + rows[None, :], sqdist)
    bandwidth = tl.load(bandwidth_ptr + group)
    weight = tl.load(weight_ptr + group)
    _, dist, kern = _laplace_terms(sqdist, bandwidth, eps, num_features)
    signed_kern = _signed_pairs(rows, M) * kern
    mmd2 = tl.sum(tl.sum(signed_kern, axis=1), axis=0) / (M * M)
    dmmd_db = -tl.sum(tl.sum(signed_kern * dist, axis=1), axis=0) / (M * M) / num_features
    tl.store(mmd2_ptr + group, mmd2)
    tl.store(dmmd_db_ptr + group, dmmd_db)
    tl.store(loss_ptr + group, weight * mmd2)


@triton.jit
def _mmd_fwd_kernel(
    x_ptr, y_ptr, stride_x, stride_y,
    partial_ptr,  # (G, SPLIT, R, R) partial S; unused when FINALIZE
    bandwidth_ptr, weight_ptr, loss_ptr, sqdist_ptr, mmd2_ptr, dmmd_db_ptr,
    num_features, cols_per_split, eps,
    M: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr, FINALIZE: tl.constexpr,
):
    """Program (group, split): S over its column range; finalizes in place when unsplit."""
    group = tl.program_id(0)
    split = tl.program_id(1)
    cdtype = sqdist_ptr.dtype.element_ty
    rows, is_x, is_y, x_rows, y_rows = _group_rows(group, M, R)
    x_src = x_ptr + x_rows * stride_x
    y_src = y_ptr + y_rows * stride_y

    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, num_features)
    sqdist = tl.zeros((R, R), dtype=cdtype)
    for block_start in range(col_start, col_end, BLOCK_D):
        cols = block_start + tl.arange(0, BLOCK_D)
        z = _group_tile(x_src, y_src, is_x, is_y, cols, cols < col_end, cdtype)
        diff = z[:, None, :] - z[None, :, :]
        sqdist += tl.sum(diff * diff, axis=2)

    if FINALIZE:
        _finalize_group(
            group, sqdist, bandwidth_ptr, weight_ptr, loss_ptr, sqdist_ptr, mmd2_ptr, dmmd_db_ptr,
            num_features, eps, M, R,
        )
    else:
        num_splits = tl.num_programs(1)
        tile = partial_ptr + (group * num_splits + split).to(tl.int64) * (R * R)
        tl.store(tile + rows[:, None] * R + rows[None, :], sqdist)


@triton.jit
def _mmd_finalize_kernel(
    partial_ptr, bandwidth_ptr, weight_ptr, loss_ptr, sqdist_ptr, mmd2_ptr, dmmd_db_ptr,
    num_splits, num_features, eps, M: tl.constexpr, R: tl.constexpr,
):
    """Sums a group's partial S in split order (deterministic), then finalizes."""
    group = tl.program_id(0)
    rows = tl.arange(0, R)
    tiles = partial_ptr + group.to(tl.int64) * num_splits * (R * R) + rows[:, None] * R + rows[None, :]
    sqdist = tl.zeros((R, R), dtype=sqdist_ptr.dtype.element_ty)
    for split in range(0, num_splits):
        sqdist += tl.load(tiles + split * (R * R))
    _finalize_group(
        group, sqdist, bandwidth_ptr, weight_ptr, loss_ptr, sqdist_ptr, mmd2_ptr, dmmd_db_ptr,
        num_features, eps, M, R,
    )


@triton.jit
def _mmd_bwd_kernel(
    x_ptr, y_ptr, stride_x, stride_y,
    dx_ptr, dy_ptr,  # contiguous (B, D)
    grad_ptr, stride_grad,  # grad of loss_g; stride 0 when expanded from a mean
    sqdist_ptr, bandwidth_ptr, weight_ptr,
    num_features, cols_per_split, eps,
    M: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr,
    STORE_DX: tl.constexpr, STORE_DY: tl.constexpr,
):
    """Program (group, split): dz = A (.) (z_i - z_j) summed over j, on its column range."""
    group = tl.program_id(0)
    split = tl.program_id(1)
    cdtype = sqdist_ptr.dtype.element_ty
    rows, is_x, is_y, x_rows, y_rows = _group_rows(group, M, R)

    sqdist = tl.load(sqdist_ptr + group.to(tl.int64) * (R * R) + rows[:, None] * R + rows[None, :])
    bandwidth = tl.load(bandwidth_ptr + group)
    weight = tl.load(weight_ptr + group)
    grad = tl.load(grad_ptr + group.to(tl.int64) * stride_grad).to(cdtype)
    close, dist, kern = _laplace_terms(sqdist, bandwidth, eps, num_features)
    scale = -2.0 * grad * weight * bandwidth / (M * M) / num_features
    coeff = tl.where(close, 0.0, scale * _signed_pairs(rows, M) * kern / dist)

    x_src = x_ptr + x_rows * stride_x
    y_src = y_ptr + y_rows * stride_y
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, num_features)
    for block_start in range(col_start, col_end, BLOCK_D):
        cols = block_start + tl.arange(0, BLOCK_D)
        in_d = cols < col_end
        z = _group_tile(x_src, y_src, is_x, is_y, cols, in_d, cdtype)
        dz = tl.sum(coeff[:, :, None] * (z[:, None, :] - z[None, :, :]), axis=1)
        if STORE_DX:
            dst = dx_ptr + x_rows[:, None] * num_features + cols[None, :]
            tl.store(dst, dz.to(dx_ptr.dtype.element_ty), mask=is_x[:, None] & in_d[None, :])
        if STORE_DY:
            dst = dy_ptr + y_rows[:, None] * num_features + cols[None, :]
            tl.store(dst, dz.to(dy_ptr.dtype.element_ty), mask=is_y[:, None] & in_d[None, :])


# ----------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------


def padded_rows(group_size: int) -> int:
    """R: the stacked group's 2M rows rounded up to a power of two."""
    return triton.next_power_of_2(2 * group_size)


# (BLOCK_D, num_warps) per padded row count R, for 4-byte and 8-byte compute. The
# (R, R, BLOCK_D) difference tile lives in registers: each entry is the widest
# block whose forward and backward compile for sm_90 without spilling (ptxas
# resource report; fp64 at R=64 spills least with this choice). GPU timing of
# the alternatives is still to be done.
_TILE_CONFIG = {
    False: {2: (512, 4), 4: (512, 4), 8: (256, 4), 16: (64, 8), 32: (32, 16), 64: (8, 8)},
    True: {2: (256, 4), 4: (256, 4), 8: (128, 8), 16: (32, 8), 32: (8, 16), 64: (4, 8)},
}


def _tile_config(rows: int, num_features: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_D, num_warps), the block no wider than D needs."""
    block_d, num_warps = _TILE_CONFIG[dtype == torch.float64][rows]
    return min(block_d, max(16, triton.next_power_of_2(num_features))), num_warps


def target_programs(device: torch.device) -> int:
    """How many programs fill the device; fewer groups than this split the D axis."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: small, so that CPU tests exercise the split path too


def _column_split(num_groups: int, num_features: int, block_d: int, device) -> tuple[int, int]:
    """(number of splits, columns per split), a whole number of blocks per split."""
    num_blocks = triton.cdiv(num_features, block_d)
    wanted = triton.cdiv(target_programs(device), num_groups)
    blocks_per_split = triton.cdiv(num_blocks, max(1, min(num_blocks, wanted)))
    return triton.cdiv(num_blocks, blocks_per_split), blocks_per_split * block_d


class _Launch(NamedTuple):
    """What forward and backward launches share: row views and the grid geometry."""

    x_rows: Tensor
    y_rows: Tensor
    num_groups: int
    num_features: int
    rows: int  # R
    block_d: int
    num_warps: int
    num_splits: int
    cols_per_split: int


def _plan_launch(x_rows: Tensor, y_rows: Tensor, group_size: int) -> _Launch:
    batch, num_features = x_rows.shape
    num_groups, rows = batch // group_size, padded_rows(group_size)
    block_d, num_warps = _tile_config(rows, num_features, compute_dtype(x_rows.dtype))
    num_splits, cols_per_split = _column_split(num_groups, num_features, block_d, x_rows.device)
    return _Launch(x_rows, y_rows, num_groups, num_features, rows, block_d, num_warps, num_splits, cols_per_split)


def mmd_forward_triton(x_rows, y_rows, bandwidth, weight, group_size, eps):
    """(loss_g, S, MMD^2_g, dMMD^2_g/db) for (B, D) row views; S is (G, R, R)."""
    plan = _plan_launch(x_rows, y_rows, group_size)
    out = dict(device=x_rows.device, dtype=compute_dtype(x_rows.dtype))
    loss, mmd2, dmmd_db = (torch.empty(plan.num_groups, **out) for _ in range(3))
    sqdist = torch.empty((plan.num_groups, plan.rows, plan.rows), **out)
    split = plan.num_splits > 1
    partial = torch.empty((plan.num_groups, plan.num_splits, plan.rows, plan.rows), **out) if split else sqdist
    outputs = (loss, sqdist, mmd2, dmmd_db)
    _mmd_fwd_kernel[(plan.num_groups, plan.num_splits)](
        plan.x_rows, plan.y_rows, plan.x_rows.stride(0), plan.y_rows.stride(0), partial, bandwidth, weight,
        *outputs, plan.num_features, plan.cols_per_split, eps,
        M=group_size, R=plan.rows, BLOCK_D=plan.block_d, FINALIZE=not split, num_warps=plan.num_warps,
    )
    if split:
        _mmd_finalize_kernel[(plan.num_groups,)](
            partial, bandwidth, weight, *outputs, plan.num_splits, plan.num_features, eps, M=group_size, R=plan.rows,
        )
    return outputs


def mmd_backward_triton(grad_loss, x_rows, y_rows, sqdist, bandwidth, weight, group_size, eps, need_dx, need_dy):
    """(dx, dy) as contiguous (B, D) tensors; an empty tensor where not asked for."""
    plan = _plan_launch(x_rows, y_rows, group_size)
    dx = torch.empty_like(x_rows, memory_format=torch.contiguous_format) if need_dx else x_rows.new_empty(0)
    dy = torch.empty_like(y_rows, memory_format=torch.contiguous_format) if need_dy else y_rows.new_empty(0)
    if not (need_dx or need_dy):
        return dx, dy
    _mmd_bwd_kernel[(plan.num_groups, plan.num_splits)](
        plan.x_rows, plan.y_rows, plan.x_rows.stride(0), plan.y_rows.stride(0), dx, dy,
        grad_loss, grad_loss.stride(0), sqdist, bandwidth, weight,
        plan.num_features, plan.cols_per_split, eps,
        M=group_size, R=plan.rows, BLOCK_D=plan.block_d, STORE_DX=need_dx, STORE_DY=need_dy,
        num_warps=plan.num_warps,
    )
    return dx, dy


KERNELS = MMDKernels(mmd_forward_triton, mmd_backward_triton, padded_rows)
