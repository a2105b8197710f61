"""Grouped Laplace-kernel MMD: the Triton kernels and their launchers.

The custom ops and autograd that call these launchers are shared by every
backend and live in `imm_kernels.ops.mmd`.

Per group g, z = [x_g; y_g] stacks its M rows of x over its M rows of y (sign
sigma = +1 for x and -1 for y). With S_ij = ||z_i - z_j||^2, d_ij = max(sqrt(S_ij), eps)
and k_ij = exp(-b * d_ij / D):

    forward   loss_g = w * (1/M^2) sum_ij sigma_i sigma_j k_ij
    backward  dz_i   = sum_j A_ij (z_i - z_j),
              A_ij   = -(2 w b g_out / (M^2 D)) sigma_i sigma_j k_ij / d_ij   (0 where d_ij <= eps)

How the work is laid out. A program holds a group's x rows and y rows as two
(MX, BLOCK_D) tiles (MX = M rounded up to a power of two) and streams D in blocks,
pipelined (`tl.range(num_stages=...)`, asynchronous copies on sm_90). The pair terms
are (MX, MX, BLOCK_D) tensors accumulated element-wise; the sum over columns happens
once, after the loop. With BLOCK_D a multiple of the program's thread count, all rows
of a column sit in one thread: the pair arithmetic is register arithmetic (no
shuffles), and the masks that keep only the pairs i < j of xx and yy are constants
per register, so the compiler drops the pairs not needed. On the diagonal only
sum(z * 0) is accumulated: 0, or NaN for a row holding inf/NaN, which must give a
NaN loss even where the row's distances to other rows overflow to inf (k = 0).

The forward keeps S in a (G, 2MX, 2MX) buffer (x rows, then y rows; padding unused)
for the backward, which reads x and y once more and writes dx (and dy); with dx only
(IMM training) only the x rows' gradients are computed. Both use direct differences,
never the Gram expansion ||a||^2 + ||b||^2 - 2 a.b, which cancels when a group's
outputs converge.

Forward with gradient: when the upstream gradient is known in advance (1 into the
reduced loss), the forward also writes dx, reading the group a second time while it
is still in L2: 3 passes over B*D from memory (read x, y; write dx) instead of 5.
The backward then rewrites, in place, only the groups whose upstream gradient turns
out to differ, and decides that on the device: no host sync.

When the groups alone cannot fill the GPU, the D axis is split across programs:
each writes its partial S to a buffer that a second kernel sums in a fixed order,
so results are bitwise deterministic (no atomics). How many programs fill the GPU
comes from the compiled kernel's registers and shared memory (its occupancy).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import compute_dtype, resident_programs

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
def _half_rows(base_ptr, row_stride, group, M: tl.constexpr, MX: tl.constexpr):
    """Pointers to a group's M rows of one input, padded to MX, and which of them are real.

    int64 because row * stride passes 2^31 once B * D does.
    """
    rows = tl.arange(0, MX)
    return base_ptr + (group * M + rows).to(tl.int64) * row_stride, rows < M


@triton.jit
def _load_tile(row_ptrs, real, cols, col_end, EVEN_D: tl.constexpr, CDTYPE: tl.constexpr):
    """The (MX, BLOCK_D) tile at `cols`; padding rows (and columns past col_end) read 0."""
    if EVEN_D:
        mask = real[:, None] & (cols >= 0)[None, :]
    else:
        mask = real[:, None] & (cols < col_end)[None, :]
    return tl.load(row_ptrs[:, None] + cols[None, :], mask=mask, other=0.0).to(CDTYPE)


@triton.jit
def _pair_sqdist(
    x_rows,
    y_rows,
    real,
    col_start,
    col_end,
    MX: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    EVEN_D: tl.constexpr,
    CDTYPE: tl.constexpr,
):
    """(S_xx, S_yy, S_xy), each (MX, MX): squared distances summed over columns [col_start, col_end).

    S_xx and S_yy are symmetric; their diagonal, 2 sum(z * 0) of the row, is 0 or NaN.
    """
    rows = tl.arange(0, MX)
    upper = ((rows[:, None] < rows[None, :]) & real[None, :])[:, :, None]
    diagonal = (rows[:, None] == rows[None, :])[:, :, None]
    both = (real[:, None] & real[None, :])[:, :, None]
    xx = tl.zeros((MX, MX, BLOCK_D), dtype=CDTYPE)
    yy = tl.zeros((MX, MX, BLOCK_D), dtype=CDTYPE)
    xy = tl.zeros((MX, MX, BLOCK_D), dtype=CDTYPE)
    for block_start in tl.range(col_start, col_end, BLOCK_D, num_stages=NUM_STAGES):
        cols = block_start + tl.arange(0, BLOCK_D)
        zx = _load_tile(x_rows, real, cols, col_end, EVEN_D, CDTYPE)
        zy = _load_tile(y_rows, real, cols, col_end, EVEN_D, CDTYPE)
        diff = zx[:, None, :] - zx[None, :, :]
        xx = tl.where(upper, xx + diff * diff, tl.where(diagonal, xx + zx[:, None, :] * 0.0, xx))
        diff = zy[:, None, :] - zy[None, :, :]
        yy = tl.where(upper, yy + diff * diff, tl.where(diagonal, yy + zy[:, None, :] * 0.0, yy))
        diff = zx[:, None, :] - zy[None, :, :]
        xy = tl.where(both, xy + diff * diff, xy)
    xx = tl.sum(xx, axis=2)
    yy = tl.sum(yy, axis=2)
    return xx + tl.trans(xx), yy + tl.trans(yy), tl.sum(xy, axis=2)


@triton.jit
def _block_offsets(MX: tl.constexpr):
    """Offsets of an (MX, MX) block inside the row-major (2MX, 2MX) S."""
    rows = tl.arange(0, MX)
    return rows[:, None] * (2 * MX) + rows[None, :]


@triton.jit
def _store_sqdist(dst, xx, yy, xy, MX: tl.constexpr):
    """S as the (2MX, 2MX) matrix [[xx, xy], [xy^T, yy]]."""
    at = _block_offsets(MX)
    tl.store(dst + at, xx)
    tl.store(dst + at + MX, xy)
    tl.store(dst + at + MX * (2 * MX), tl.trans(xy))
    tl.store(dst + at + MX * (2 * MX) + MX, yy)


@triton.jit
def _load_sqdist(src, MX: tl.constexpr):
    """(xx, yy, xy) blocks of a stored S."""
    at = _block_offsets(MX)
    return tl.load(src + at), tl.load(src + at + MX * (2 * MX) + MX), tl.load(src + at + MX)


@triton.jit
def _finalize_group(
    group,
    xx,
    yy,
    xy,
    real,
    bandwidth,
    weight,
    loss_ptr,
    mmd2_ptr,
    dmmd_db_ptr,
    num_features,
    eps,
    M: tl.constexpr,
):
    """Stores MMD^2, dMMD^2/db and the weighted loss of a group from its S blocks."""
    both = real[:, None] & real[None, :]
    _, d_xx, k_xx = _laplace_terms(xx, bandwidth, eps, num_features)
    _, d_yy, k_yy = _laplace_terms(yy, bandwidth, eps, num_features)
    _, d_xy, k_xy = _laplace_terms(xy, bandwidth, eps, num_features)
    signed_kern = tl.where(both, k_xx + k_yy - 2.0 * k_xy, 0.0)
    signed_kern_dist = tl.where(both, k_xx * d_xx + k_yy * d_yy - 2.0 * (k_xy * d_xy), 0.0)
    mmd2 = tl.sum(tl.sum(signed_kern, axis=1), axis=0) / (M * M)
    dmmd_db = -tl.sum(tl.sum(signed_kern_dist, axis=1), axis=0) / (M * M) / num_features
    tl.store(mmd2_ptr + group, mmd2)
    tl.store(dmmd_db_ptr + group, dmmd_db)
    tl.store(loss_ptr + group, weight * mmd2)


@triton.jit
def _pair_coefficient(sqdist, sign, scale, both, bandwidth, eps, num_features):
    """A for one block of pairs: scale * sigma_i sigma_j * k / d; 0 for close pairs and padding."""
    close, dist, kern = _laplace_terms(sqdist, bandwidth, eps, num_features)
    return tl.where(close | (both == 0), 0.0, sign * scale * kern / dist)


@triton.jit
def _store_gradients(
    x_rows,
    y_rows,
    dx_ptr,
    dy_ptr,
    group,
    real,
    xx,
    yy,
    xy,
    grad,
    bandwidth,
    weight,
    col_start,
    col_end,
    num_features,
    eps,
    M: tl.constexpr,
    MX: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    EVEN_D: tl.constexpr,
    STORE_DX: tl.constexpr,
    STORE_DY: tl.constexpr,
):
    """dz_i = sum_j A_ij (z_i - z_j) over columns [col_start, col_end), for the x rows and/or the y rows."""
    cdtype = xx.dtype
    scale = -2.0 * grad * weight * bandwidth / (M * M) / num_features
    both = real[:, None] & real[None, :]
    a_xx = _pair_coefficient(xx, 1.0, scale, both, bandwidth, eps, num_features)
    a_yy = _pair_coefficient(yy, 1.0, scale, both, bandwidth, eps, num_features)
    a_xy = _pair_coefficient(xy, -1.0, scale, both, bandwidth, eps, num_features)
    a_yx = tl.trans(a_xy)
    rows = tl.arange(0, MX)
    # A_ii = 0 (or NaN, when row i is not finite: then its other terms are NaN too). Where
    # this constant mask drops the diagonal, the sums add -0.0: x + -0.0 == x exactly, so
    # the compiler removes those terms.
    off_diagonal = (rows[:, None] != rows[None, :])[:, :, None]
    # Gradients are contiguous (B, D).
    out_rows = (group * M + rows).to(tl.int64) * num_features
    for block_start in tl.range(col_start, col_end, BLOCK_D, num_stages=NUM_STAGES):
        cols = block_start + tl.arange(0, BLOCK_D)
        zx = _load_tile(x_rows, real, cols, col_end, EVEN_D, cdtype)
        zy = _load_tile(y_rows, real, cols, col_end, EVEN_D, cdtype)
        mask = real[:, None] & (cols < col_end)[None, :]
        out = out_rows[:, None] + cols[None, :]
        # Pair terms indexed [j, i, column], summed over j: where the pairs spread over threads
        # (large M), the sum's axis is the one Triton keeps inside a thread.
        if STORE_DX:
            dz = tl.sum(tl.where(off_diagonal, a_xx[:, :, None] * (zx[None, :, :] - zx[:, None, :]), -0.0), axis=0)
            dz += tl.sum(a_yx[:, :, None] * (zx[None, :, :] - zy[:, None, :]), axis=0)
            tl.store(dx_ptr + out, dz.to(dx_ptr.dtype.element_ty), mask=mask)
        if STORE_DY:
            dz = tl.sum(tl.where(off_diagonal, a_yy[:, :, None] * (zy[None, :, :] - zy[:, None, :]), -0.0), axis=0)
            dz += tl.sum(a_xy[:, :, None] * (zy[None, :, :] - zx[:, None, :]), axis=0)
            tl.store(dy_ptr + out, dz.to(dy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mmd_fwd_kernel(
    x_ptr,
    y_ptr,
    stride_x,
    stride_y,
    partial_ptr,  # (G, SPLIT, 2MX, 2MX) partial S; unused when FINALIZE
    bandwidth_ptr,
    weight_ptr,
    loss_ptr,
    sqdist_ptr,
    mmd2_ptr,
    dmmd_db_ptr,
    dx_ptr,
    dy_ptr,
    grad_ptr,
    stride_grad,  # the gradient for upstream grad_ptr (STORE_DX/STORE_DY, unsplit only)
    num_features,
    cols_per_split,
    eps,
    M: tl.constexpr,
    MX: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    EVEN_D: tl.constexpr,
    FINALIZE: tl.constexpr,
    STORE_DX: tl.constexpr,
    STORE_DY: tl.constexpr,
):
    """Program (group, split): S over its column range. Unsplit, it finalizes the group in place
    and, asked for a gradient, streams the group once more to write it."""
    group = tl.program_id(0)
    split = tl.program_id(1)
    cdtype = sqdist_ptr.dtype.element_ty
    x_rows, real = _half_rows(x_ptr, stride_x, group, M, MX)
    y_rows, _ = _half_rows(y_ptr, stride_y, group, M, MX)
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, num_features)
    xx, yy, xy = _pair_sqdist(x_rows, y_rows, real, col_start, col_end, MX, BLOCK_D, NUM_STAGES, EVEN_D, cdtype)
    if FINALIZE:
        _store_sqdist(sqdist_ptr + group.to(tl.int64) * (4 * MX * MX), xx, yy, xy, MX)
        bandwidth = tl.load(bandwidth_ptr + group)
        weight = tl.load(weight_ptr + group)
        _finalize_group(
            group, xx, yy, xy, real, bandwidth, weight, loss_ptr, mmd2_ptr, dmmd_db_ptr, num_features, eps, M
        )
        if STORE_DX or STORE_DY:
            grad = tl.load(grad_ptr + group.to(tl.int64) * stride_grad)
            _store_gradients(
                x_rows,
                y_rows,
                dx_ptr,
                dy_ptr,
                group,
                real,
                xx,
                yy,
                xy,
                grad,
                bandwidth,
                weight,
                col_start,
                col_end,
                num_features,
                eps,
                M,
                MX,
                BLOCK_D,
                NUM_STAGES,
                EVEN_D,
                STORE_DX,
                STORE_DY,
            )
    else:
        tile = (group * tl.num_programs(1) + split).to(tl.int64) * (4 * MX * MX)
        _store_sqdist(partial_ptr + tile, xx, yy, xy, MX)


@triton.jit
def _mmd_finalize_kernel(
    partial_ptr,
    bandwidth_ptr,
    weight_ptr,
    loss_ptr,
    sqdist_ptr,
    mmd2_ptr,
    dmmd_db_ptr,
    num_splits,
    num_features,
    eps,
    M: tl.constexpr,
    MX: tl.constexpr,
):
    """Sums a group's partial S in split order (deterministic), then finalizes."""
    group = tl.program_id(0)
    real = tl.arange(0, MX) < M
    tiles = partial_ptr + group.to(tl.int64) * num_splits * (4 * MX * MX)
    cdtype = sqdist_ptr.dtype.element_ty
    xx = tl.zeros((MX, MX), dtype=cdtype)
    yy = tl.zeros((MX, MX), dtype=cdtype)
    xy = tl.zeros((MX, MX), dtype=cdtype)
    for split in range(0, num_splits):
        part_xx, part_yy, part_xy = _load_sqdist(tiles + split * (4 * MX * MX), MX)
        xx += part_xx
        yy += part_yy
        xy += part_xy
    _store_sqdist(sqdist_ptr + group.to(tl.int64) * (4 * MX * MX), xx, yy, xy, MX)
    _finalize_group(
        group,
        xx,
        yy,
        xy,
        real,
        tl.load(bandwidth_ptr + group),
        tl.load(weight_ptr + group),
        loss_ptr,
        mmd2_ptr,
        dmmd_db_ptr,
        num_features,
        eps,
        M,
    )


@triton.jit
def _mmd_bwd_kernel(
    x_ptr,
    y_ptr,
    stride_x,
    stride_y,
    dx_ptr,
    dy_ptr,  # contiguous (B, D)
    grad_ptr,
    stride_grad,  # grad of loss_g; stride 0 when expanded from a mean
    expected_ptr,
    stride_expected,  # SKIP_EXPECTED: the upstream gradient dx/dy already hold
    sqdist_ptr,
    bandwidth_ptr,
    weight_ptr,
    num_features,
    cols_per_split,
    eps,
    M: tl.constexpr,
    MX: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    EVEN_D: tl.constexpr,
    STORE_DX: tl.constexpr,
    STORE_DY: tl.constexpr,
    SKIP_EXPECTED: tl.constexpr,
):
    """Program (group, split): dz on its column range. With SKIP_EXPECTED, a group whose upstream
    gradient equals the expected one keeps the gradient the forward wrote (an empty column range)."""
    group = tl.program_id(0)
    split = tl.program_id(1)
    cdtype = sqdist_ptr.dtype.element_ty
    x_rows, real = _half_rows(x_ptr, stride_x, group, M, MX)
    y_rows, _ = _half_rows(y_ptr, stride_y, group, M, MX)
    grad = tl.load(grad_ptr + group.to(tl.int64) * stride_grad).to(cdtype)
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, num_features)
    if SKIP_EXPECTED:
        expected = tl.load(expected_ptr + group.to(tl.int64) * stride_expected).to(cdtype)
        col_end = tl.where(grad == expected, col_start, col_end)
    xx, yy, xy = _load_sqdist(sqdist_ptr + group.to(tl.int64) * (4 * MX * MX), MX)
    _store_gradients(
        x_rows,
        y_rows,
        dx_ptr,
        dy_ptr,
        group,
        real,
        xx,
        yy,
        xy,
        grad,
        tl.load(bandwidth_ptr + group),
        tl.load(weight_ptr + group),
        col_start,
        col_end,
        num_features,
        eps,
        M,
        MX,
        BLOCK_D,
        NUM_STAGES,
        EVEN_D,
        STORE_DX,
        STORE_DY,
    )


# ----------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------


def half_rows(group_size: int) -> int:
    """MX: a group's M rows of x (or of y) rounded up to a power of two."""
    return triton.next_power_of_2(group_size)


def saved_rows(group_size: int) -> int:
    """The side of the saved S: x's rows then y's, each padded to MX."""
    return 2 * half_rows(group_size)


# (BLOCK_D, num_warps) per MX, for 4-byte and 8-byte compute. Up to MX = 8 (fp64: 4),
# BLOCK_D is a multiple of the thread count (32 * num_warps), so a column's rows sit in
# one thread (see the module docstring); beyond that the (MX, MX) pairs spread over the
# threads and a narrow BLOCK_D keeps the element-wise accumulators in registers.
# `benchmarks/ptxas_report.py` compiles each entry for sm_90 and reports registers,
# spills, shuffles, instructions per element and occupancy; a test holds the fp32/bf16
# kernels of a training step (dx only) to zero spills up to MX = 8.
_TILE_CONFIG = {
    False: {1: (512, 4), 2: (512, 4), 4: (256, 4), 8: (64, 2), 16: (16, 4), 32: (8, 8)},
    True: {1: (256, 4), 2: (256, 4), 4: (64, 2), 8: (32, 2), 16: (8, 4), 32: (4, 8)},
}
# Column blocks in flight per program: the loads of the next blocks overlap this one's arithmetic.
NUM_STAGES = 3


def _tile_config(group_size: int, num_features: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_D, num_warps), the block no wider than D needs (but at least one column per thread)."""
    block_d, num_warps = _TILE_CONFIG[dtype == torch.float64][half_rows(group_size)]
    return min(block_d, max(32 * num_warps, triton.next_power_of_2(num_features))), num_warps


def _column_split(num_groups: int, num_features: int, block_d: int, resident: int) -> tuple[int, int]:
    """(number of splits, columns per split), a whole number of blocks per split."""
    num_blocks = triton.cdiv(num_features, block_d)
    wanted = triton.cdiv(resident, num_groups)
    blocks_per_split = triton.cdiv(num_blocks, max(1, min(num_blocks, wanted)))
    return triton.cdiv(num_blocks, blocks_per_split), blocks_per_split * block_d


class _Launch(NamedTuple):
    """What forward and backward launches share: the geometry and the kernels' constexprs."""

    num_groups: int
    num_features: int
    num_warps: int
    block_d: int
    constexprs: dict  # M, MX, BLOCK_D, NUM_STAGES, EVEN_D

    def split(self, kernel, device, args: tuple, **constexprs) -> tuple[int, int]:
        """(number of splits, columns per split) that fill the device with this kernel."""
        resident = resident_programs(kernel, device, args, {**self.constexprs, **constexprs}, self.num_warps)
        return _column_split(self.num_groups, self.num_features, self.block_d, resident)


def _plan_launch(x_rows: Tensor, group_size: int) -> _Launch:
    batch, num_features = x_rows.shape
    block_d, num_warps = _tile_config(group_size, num_features, compute_dtype(x_rows.dtype))
    constexprs = dict(
        M=group_size,
        MX=half_rows(group_size),
        BLOCK_D=block_d,
        NUM_STAGES=NUM_STAGES,
        EVEN_D=num_features % block_d == 0,
    )
    return _Launch(batch // group_size, num_features, num_warps, block_d, constexprs)


def _forward(x_rows, y_rows, bandwidth, weight, group_size, eps, grad_loss=None, need_dx=False, need_dy=False):
    """(loss_g, S, MMD^2_g, dMMD^2_g/db, dx, dy); dx/dy for upstream grad_loss where asked (else empty)."""
    plan = _plan_launch(x_rows, group_size)
    out = dict(device=x_rows.device, dtype=compute_dtype(x_rows.dtype))
    loss, mmd2, dmmd_db = (torch.empty(plan.num_groups, **out) for _ in range(3))
    side = saved_rows(group_size)
    sqdist = torch.empty((plan.num_groups, side, side), **out)
    dx = torch.empty_like(x_rows, memory_format=torch.contiguous_format) if need_dx else x_rows.new_empty(0)
    dy = torch.empty_like(y_rows, memory_format=torch.contiguous_format) if need_dy else y_rows.new_empty(0)
    grad = grad_loss if grad_loss is not None else loss  # never read without a gradient asked for
    args = [
        x_rows,
        y_rows,
        x_rows.stride(0),
        y_rows.stride(0),
        sqdist,
        bandwidth,
        weight,
        loss,
        sqdist,
        mmd2,
        dmmd_db,
        dx,
        dy,
        grad,
        grad.stride(0),
        plan.num_features,
        plan.num_features,
        eps,
    ]
    num_splits, cols_per_split = plan.split(
        _mmd_fwd_kernel, x_rows.device, tuple(args), FINALIZE=False, STORE_DX=False, STORE_DY=False
    )
    if num_splits == 1:  # one program per group: it finalizes, and writes the gradient if asked
        _mmd_fwd_kernel[(plan.num_groups, 1)](
            *args, **plan.constexprs, FINALIZE=True, STORE_DX=need_dx, STORE_DY=need_dy, num_warps=plan.num_warps
        )
        return loss, sqdist, mmd2, dmmd_db, dx, dy
    args[4] = partial = torch.empty((plan.num_groups, num_splits, side, side), **out)
    args[16] = cols_per_split
    _mmd_fwd_kernel[(plan.num_groups, num_splits)](
        *args, **plan.constexprs, FINALIZE=False, STORE_DX=False, STORE_DY=False, num_warps=plan.num_warps
    )
    _mmd_finalize_kernel[(plan.num_groups,)](
        partial,
        bandwidth,
        weight,
        loss,
        sqdist,
        mmd2,
        dmmd_db,
        num_splits,
        plan.num_features,
        eps,
        M=group_size,
        MX=plan.constexprs["MX"],
    )
    if need_dx or need_dy:  # the group spans programs: its gradient needs S complete first
        _launch_backward(plan, grad, None, x_rows, y_rows, sqdist, bandwidth, weight, eps, dx, dy, need_dx, need_dy)
    return loss, sqdist, mmd2, dmmd_db, dx, dy


def _launch_backward(
    plan, grad_loss, expected, x_rows, y_rows, sqdist, bandwidth, weight, eps, dx, dy, need_dx, need_dy
):
    """Writes dx/dy for grad_loss; with `expected`, only the groups whose grad_loss differs from it."""
    skip = expected is not None
    expected = expected if skip else grad_loss
    args = (
        x_rows,
        y_rows,
        x_rows.stride(0),
        y_rows.stride(0),
        dx,
        dy,
        grad_loss,
        grad_loss.stride(0),
        expected,
        expected.stride(0),
        sqdist,
        bandwidth,
        weight,
        plan.num_features,
        plan.num_features,
        eps,
    )
    flags = dict(STORE_DX=need_dx, STORE_DY=need_dy, SKIP_EXPECTED=skip)
    num_splits, cols_per_split = plan.split(_mmd_bwd_kernel, x_rows.device, args, **flags)
    _mmd_bwd_kernel[(plan.num_groups, num_splits)](
        *args[:-2], cols_per_split, eps, **plan.constexprs, **flags, num_warps=plan.num_warps
    )


def mmd_forward_triton(x_rows, y_rows, bandwidth, weight, group_size, eps):
    """(loss_g, S, MMD^2_g, dMMD^2_g/db) for (B, D) row views; S is (G, 2MX, 2MX)."""
    return _forward(x_rows, y_rows, bandwidth, weight, group_size, eps)[:4]


def mmd_forward_with_grad_triton(x_rows, y_rows, bandwidth, weight, group_size, eps, grad_loss, need_dx, need_dy):
    """The forward's four outputs, then (dx, dy) for the upstream gradient grad_loss ((G,), compute dtype)."""
    return _forward(x_rows, y_rows, bandwidth, weight, group_size, eps, grad_loss, need_dx, need_dy)


def mmd_backward_triton(grad_loss, x_rows, y_rows, sqdist, bandwidth, weight, group_size, eps, need_dx, need_dy):
    """(dx, dy) as contiguous (B, D) tensors; an empty tensor where not asked for."""
    dx = torch.empty_like(x_rows, memory_format=torch.contiguous_format) if need_dx else x_rows.new_empty(0)
    dy = torch.empty_like(y_rows, memory_format=torch.contiguous_format) if need_dy else y_rows.new_empty(0)
    if need_dx or need_dy:
        plan = _plan_launch(x_rows, group_size)
        _launch_backward(
            plan, grad_loss, None, x_rows, y_rows, sqdist, bandwidth, weight, eps, dx, dy, need_dx, need_dy
        )
    return dx, dy


def mmd_refresh_grad_triton(grad_loss, expected, x_rows, y_rows, sqdist, bandwidth, weight, group_size, eps, dx, dy):
    """Rewrites in place, in the forward's dx/dy (contiguous (B, D) or empty), the groups whose
    grad_loss differs from the `expected` gradient they were computed for; decided on the device."""
    need_dx, need_dy = dx.numel() > 0, dy.numel() > 0
    if need_dx or need_dy:
        plan = _plan_launch(x_rows, group_size)
        _launch_backward(
            plan, grad_loss, expected, x_rows, y_rows, sqdist, bandwidth, weight, eps, dx, dy, need_dx, need_dy
        )
