"""Fused adaLN: LayerNorm without affine + per-sample modulation, optionally after a gated residual.

    adaln_modulate(x, shift, scale)                    h = LN(x) * (1 + scale) + shift
    adaln_residual_modulate(x, y, gate, shift, scale)  x_new = x + gate * y,  h = LN(x_new) * (1 + scale) + shift

x, y are (N, L, H); gate, shift, scale are (N, H), broadcast over L. One kernel
family with a HAS_RESIDUAL constexpr, statistics in fp32 (fp64 for fp64 x). Any
strides work (the `chunk(6)` views of a DiT's modulation output, stride-0
expanded tensors, stride-0 gradients): nothing is copied.

Both kernels give each program a block of rows of one sample and walk it a row
at a time: the (N, H) vectors are read once per block, and the next rows' loads
are in flight (cp.async pipeline stages) while one is reduced. A row is held
whole in registers as two power-of-two segments (1152 = 1024 + 128), so no lane
idles where a single next_power_of_2(H) block would leave 44% masked.

Besides its inputs (x_new instead of x for the residual form), the forward
saves only the per-row mean and 1/std. The backward, with
xhat = (x_new - mean) * rstd and g = dh * (1 + scale):

    dx_new = rstd * (g - mean_H(g) - xhat * mean_H(g * xhat)) + (grad flowing into x_new)
    dx = dx_new,   dy = gate * dx_new
    dshift = sum_L dh,   dscale = sum_L dh * xhat,   dgate = sum_L dx_new * y

The sums over L are deterministic without atomics: program (block, n) sums its
block of rows in registers, one row after another, and writes a partial; the
partials are summed in a fixed order afterwards.

Mixed dtypes: y, gate, shift and scale may have any floating dtype; they are
used as if cast to x's dtype (the kernels read them as they are and compute
in fp32), h and x_new have x's dtype, and each gradient has its input's dtype.
"""

from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor

from ..validation import check_choice
from .backends import TORCH, TRITON_AUTO, TRITON_BACKEND_NAMES, choose_backend
from .reference import adaln_modulate_reference, adaln_residual_modulate_reference
from .utils import compute_dtype, jit, programs_on, tl, triton

# A row of H is held in registers; wider rows take the reference.
MAX_HIDDEN = 16384
# N is the grid's second axis, which CUDA limits to 65535 blocks.
MAX_SAMPLES = 65535


# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------


@jit
def _load_row(ptr, stride_l, stride_h, pos, cols, mask):
    return tl.load(ptr + pos * stride_l + cols * stride_h, mask=mask, other=0.0)


@jit
def _load_vector(ptr, stride_h, cols, mask, dtype):
    """Columns `cols` of one sample's (N, H) vector, in `dtype`."""
    return tl.load(ptr + cols * stride_h, mask=mask, other=0.0).to(dtype)


@jit
def _add_pair(a, b, c, d):
    return a + c, b + d


@jit
def _fwd_segment_input(x, y, gate, x_new_ptr, out_row, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """One column segment of the row to normalise, in gate's (the compute) dtype: x, or with
    the residual x_new = x + gate * y, stored and normalised as stored (rounded to x's
    dtype), so h is exactly LN of the returned x_new."""
    if HAS_RESIDUAL:
        x = (x.to(gate.dtype) + gate * y.to(gate.dtype)).to(x_new_ptr.dtype.element_ty)
        tl.store(x_new_ptr + out_row + cols, x, mask=mask)
    return x.to(gate.dtype)


@jit
def _adaln_fwd_kernel(
    x_ptr,
    stride_xn,
    stride_xl,
    stride_xh,
    y_ptr,
    stride_yn,
    stride_yl,
    stride_yh,
    gate_ptr,
    stride_gate_n,
    stride_gate_h,
    shift_ptr,
    stride_shift_n,
    stride_shift_h,
    scale_ptr,
    stride_scale_n,
    stride_scale_h,
    h_ptr,
    x_new_ptr,  # contiguous (N, L, H); x_new unused without the residual
    mean_ptr,
    rstd_ptr,  # contiguous (N, L), the compute dtype
    seq_len,
    hidden,
    eps,
    rows_per_program,
    BLOCK_MAIN: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    """Program (block, n): rows [block * rows_per_program, ...) of sample n, one at a time,
    each whole in registers as two power-of-two column segments (see `_segments`)."""
    n = tl.program_id(1).to(tl.int64)
    cdtype = mean_ptr.dtype.element_ty
    x_ptr += n * stride_xn
    y_ptr += n * stride_yn
    gate_ptr += n * stride_gate_n
    shift_ptr += n * stride_shift_n
    scale_ptr += n * stride_scale_n
    mean_ptr += n * seq_len
    rstd_ptr += n * seq_len
    start = tl.program_id(0).to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, seq_len)

    # The (N, H) vectors are read once per program, not once per row.
    cols = tl.arange(0, BLOCK_MAIN)
    in_cols = tl.full((BLOCK_MAIN,), True, tl.int1)  # the first segment never passes hidden
    gate = tl.zeros((BLOCK_MAIN,), dtype=cdtype)
    if HAS_RESIDUAL:
        gate = _load_vector(gate_ptr, stride_gate_h, cols, in_cols, cdtype)
    scale_plus_one = 1.0 + _load_vector(scale_ptr, stride_scale_h, cols, in_cols, cdtype)
    shift = _load_vector(shift_ptr, stride_shift_h, cols, in_cols, cdtype)
    if BLOCK_TAIL > 0:
        tail_cols = BLOCK_MAIN + tl.arange(0, BLOCK_TAIL)
        tail_in_cols = tail_cols < hidden
        tail_gate = tl.zeros((BLOCK_TAIL,), dtype=cdtype)
        if HAS_RESIDUAL:
            tail_gate = _load_vector(gate_ptr, stride_gate_h, tail_cols, tail_in_cols, cdtype)
        tail_scale_plus_one = 1.0 + _load_vector(scale_ptr, stride_scale_h, tail_cols, tail_in_cols, cdtype)
        tail_shift = _load_vector(shift_ptr, stride_shift_h, tail_cols, tail_in_cols, cdtype)
        # The loop's loads of the first segment are prefetched as cp.async, which needs 4+ bytes
        # per thread; the tail has less (one bf16 per thread at H = 1152), so its loads are
        # prefetched by hand, one row ahead (every program has a row at start).
        next_tail_x = _load_row(x_ptr, stride_xl, stride_xh, start, tail_cols, tail_in_cols)
        next_tail_y = next_tail_x  # unused without the residual
        if HAS_RESIDUAL:
            next_tail_y = _load_row(y_ptr, stride_yl, stride_yh, start, tail_cols, tail_in_cols)

    for pos in tl.range(start, end, num_stages=NUM_STAGES):
        out_row = (n * seq_len + pos) * hidden
        x = _load_row(x_ptr, stride_xl, stride_xh, pos, cols, in_cols)
        y = x  # unused without the residual
        if HAS_RESIDUAL:
            y = _load_row(y_ptr, stride_yl, stride_yh, pos, cols, in_cols)
        x = _fwd_segment_input(x, y, gate, x_new_ptr, out_row, cols, in_cols, HAS_RESIDUAL)
        row_sum = tl.sum(x, axis=0)
        if BLOCK_TAIL > 0:
            tail_x = _fwd_segment_input(
                next_tail_x, next_tail_y, tail_gate, x_new_ptr, out_row, tail_cols, tail_in_cols, HAS_RESIDUAL
            )
            in_next = tail_cols < tl.where(pos + 1 < end, hidden, 0)
            next_tail_x = _load_row(x_ptr, stride_xl, stride_xh, pos + 1, tail_cols, in_next)
            if HAS_RESIDUAL:
                next_tail_y = _load_row(y_ptr, stride_yl, stride_yh, pos + 1, tail_cols, in_next)
            row_sum += tl.sum(tail_x, axis=0)
        mean = row_sum / hidden
        centred = x - mean
        sum_squares = tl.sum(centred * centred, axis=0)
        if BLOCK_TAIL > 0:
            tail_centred = tl.where(tail_in_cols, tail_x - mean, 0.0)
            sum_squares += tl.sum(tail_centred * tail_centred, axis=0)
        rstd = 1.0 / tl.sqrt(sum_squares / hidden + eps)
        tl.store(mean_ptr + pos, mean)
        tl.store(rstd_ptr + pos, rstd)
        h = centred * rstd * scale_plus_one + shift
        tl.store(h_ptr + out_row + cols, h.to(h_ptr.dtype.element_ty))
        if BLOCK_TAIL > 0:
            tail_h = tail_centred * rstd * tail_scale_plus_one + tail_shift
            tl.store(h_ptr + out_row + tail_cols, tail_h.to(h_ptr.dtype.element_ty), mask=tail_in_cols)


@jit
def _bwd_segment_sums(x, dh, mean, rstd, scale_plus_one):
    """(xhat, dh, g = dh * (1 + scale), sum g, sum g * xhat) over one column segment of a row,
    x and dh as loaded. In the padding past hidden dh is 0, so g and g * xhat add nothing."""
    dh = dh.to(mean.dtype)
    xhat = (x.to(mean.dtype) - mean) * rstd
    g = dh * scale_plus_one
    sum_g, sum_gx = tl.reduce((g, g * xhat), 0, _add_pair)
    return xhat, dh, g, sum_g, sum_gx


@jit
def _bwd_segment_store(
    xhat,
    dh,
    g,
    y,
    dres,
    mean_g,
    mean_gx,
    rstd,
    gate,
    dx_ptr,
    dy_ptr,
    out_row,
    cols,
    mask,
    sum_dshift,
    sum_dscale,
    sum_dgate,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DRES: tl.constexpr,
):
    """Stores dx (and dy) over one column segment of a row; returns the column sums with
    the row's dshift, dscale (, dgate) terms added."""
    dx = (g - mean_g - xhat * mean_gx) * rstd
    if HAS_DRES:
        dx += dres.to(dx.dtype)
    tl.store(dx_ptr + out_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    sum_dshift += dh
    sum_dscale += dh * xhat
    if HAS_RESIDUAL:
        tl.store(dy_ptr + out_row + cols, (dx * gate).to(dy_ptr.dtype.element_ty), mask=mask)
        sum_dgate += dx * y.to(dx.dtype)
    return sum_dshift, sum_dscale, sum_dgate


@jit
def _store_partial(partial_ptr, hidden, cols, mask, sum_dshift, sum_dscale, sum_dgate, HAS_RESIDUAL: tl.constexpr):
    tl.store(partial_ptr + cols, sum_dshift, mask=mask)
    tl.store(partial_ptr + hidden + cols, sum_dscale, mask=mask)
    if HAS_RESIDUAL:
        tl.store(partial_ptr + 2 * hidden + cols, sum_dgate, mask=mask)


@jit
def _adaln_bwd_kernel(
    dh_ptr,
    stride_dhn,
    stride_dhl,
    stride_dhh,
    dres_ptr,
    stride_dresn,
    stride_dresl,
    stride_dresh,  # grad flowing into x_new; unused without HAS_DRES
    x_ptr,
    stride_xn,
    stride_xl,
    stride_xh,  # the normalised input: x, or x_new with the residual
    y_ptr,
    stride_yn,
    stride_yl,
    stride_yh,
    gate_ptr,
    stride_gate_n,
    stride_gate_h,
    scale_ptr,
    stride_scale_n,
    stride_scale_h,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    dy_ptr,  # contiguous (N, L, H)
    partial_ptr,  # contiguous (N, num_blocks, 2 + HAS_RESIDUAL, H): per-block sums for dshift, dscale (, dgate)
    seq_len,
    hidden,
    rows_per_block,
    BLOCK_MAIN: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DRES: tl.constexpr,
):
    """Program (block, n): rows [block * rows_per_block, ...) of sample n, one at a time, each
    whole in registers as in the forward; the column sums stay in registers until the end."""
    block = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    cdtype = mean_ptr.dtype.element_ty
    dh_ptr += n * stride_dhn
    dres_ptr += n * stride_dresn
    x_ptr += n * stride_xn
    y_ptr += n * stride_yn
    gate_ptr += n * stride_gate_n
    scale_ptr += n * stride_scale_n
    mean_ptr += n * seq_len
    rstd_ptr += n * seq_len
    start = block * rows_per_block
    end = tl.minimum(start + rows_per_block, seq_len)

    cols = tl.arange(0, BLOCK_MAIN)
    in_cols = tl.full((BLOCK_MAIN,), True, tl.int1)  # the first segment never passes hidden
    scale_plus_one = 1.0 + _load_vector(scale_ptr, stride_scale_h, cols, in_cols, cdtype)
    gate = tl.zeros((BLOCK_MAIN,), dtype=cdtype)
    if HAS_RESIDUAL:
        gate = _load_vector(gate_ptr, stride_gate_h, cols, in_cols, cdtype)
    sum_dshift = tl.zeros((BLOCK_MAIN,), dtype=cdtype)
    sum_dscale = tl.zeros((BLOCK_MAIN,), dtype=cdtype)
    sum_dgate = tl.zeros((BLOCK_MAIN,), dtype=cdtype)
    if BLOCK_TAIL > 0:
        tail_cols = BLOCK_MAIN + tl.arange(0, BLOCK_TAIL)
        tail_in_cols = tail_cols < hidden
        tail_scale_plus_one = 1.0 + _load_vector(scale_ptr, stride_scale_h, tail_cols, tail_in_cols, cdtype)
        tail_gate = tl.zeros((BLOCK_TAIL,), dtype=cdtype)
        if HAS_RESIDUAL:
            tail_gate = _load_vector(gate_ptr, stride_gate_h, tail_cols, tail_in_cols, cdtype)
        tail_sum_dshift = tl.zeros((BLOCK_TAIL,), dtype=cdtype)
        tail_sum_dscale = tl.zeros((BLOCK_TAIL,), dtype=cdtype)
        tail_sum_dgate = tl.zeros((BLOCK_TAIL,), dtype=cdtype)
        # As in the forward: the tail's loads, too narrow for cp.async, are prefetched by hand.
        next_tail_x = _load_row(x_ptr, stride_xl, stride_xh, start, tail_cols, tail_in_cols)
        next_tail_dh = _load_row(dh_ptr, stride_dhl, stride_dhh, start, tail_cols, tail_in_cols)
        next_tail_y = next_tail_x  # unused without the residual / dx_new
        next_tail_dres = next_tail_x
        if HAS_RESIDUAL:
            next_tail_y = _load_row(y_ptr, stride_yl, stride_yh, start, tail_cols, tail_in_cols)
        if HAS_DRES:
            next_tail_dres = _load_row(dres_ptr, stride_dresl, stride_dresh, start, tail_cols, tail_in_cols)

    for pos in tl.range(start, end, num_stages=NUM_STAGES):
        out_row = (n * seq_len + pos) * hidden
        mean = tl.load(mean_ptr + pos)
        rstd = tl.load(rstd_ptr + pos)
        x = _load_row(x_ptr, stride_xl, stride_xh, pos, cols, in_cols)
        dh = _load_row(dh_ptr, stride_dhl, stride_dhh, pos, cols, in_cols)
        xhat, dh, g, sum_g, sum_gx = _bwd_segment_sums(x, dh, mean, rstd, scale_plus_one)
        if BLOCK_TAIL > 0:
            tail_y = next_tail_y
            tail_dres = next_tail_dres
            tail_xhat, tail_dh, tail_g, tail_sum_g, tail_sum_gx = _bwd_segment_sums(
                next_tail_x, next_tail_dh, mean, rstd, tail_scale_plus_one
            )
            in_next = tail_cols < tl.where(pos + 1 < end, hidden, 0)
            next_tail_x = _load_row(x_ptr, stride_xl, stride_xh, pos + 1, tail_cols, in_next)
            next_tail_dh = _load_row(dh_ptr, stride_dhl, stride_dhh, pos + 1, tail_cols, in_next)
            if HAS_RESIDUAL:
                next_tail_y = _load_row(y_ptr, stride_yl, stride_yh, pos + 1, tail_cols, in_next)
            if HAS_DRES:
                next_tail_dres = _load_row(dres_ptr, stride_dresl, stride_dresh, pos + 1, tail_cols, in_next)
            sum_g += tail_sum_g
            sum_gx += tail_sum_gx
        mean_g = sum_g / hidden
        mean_gx = sum_gx / hidden
        # Loaded only now (from the prefetch buffers), so they do not hold registers across the sums.
        y = x  # unused without the residual / dx_new
        dres = x
        if HAS_RESIDUAL:
            y = _load_row(y_ptr, stride_yl, stride_yh, pos, cols, in_cols)
        if HAS_DRES:
            dres = _load_row(dres_ptr, stride_dresl, stride_dresh, pos, cols, in_cols)
        sum_dshift, sum_dscale, sum_dgate = _bwd_segment_store(
            xhat,
            dh,
            g,
            y,
            dres,
            mean_g,
            mean_gx,
            rstd,
            gate,
            dx_ptr,
            dy_ptr,
            out_row,
            cols,
            in_cols,
            sum_dshift,
            sum_dscale,
            sum_dgate,
            HAS_RESIDUAL,
            HAS_DRES,
        )
        if BLOCK_TAIL > 0:
            tail_sum_dshift, tail_sum_dscale, tail_sum_dgate = _bwd_segment_store(
                tail_xhat,
                tail_dh,
                tail_g,
                tail_y,
                tail_dres,
                mean_g,
                mean_gx,
                rstd,
                tail_gate,
                dx_ptr,
                dy_ptr,
                out_row,
                tail_cols,
                tail_in_cols,
                tail_sum_dshift,
                tail_sum_dscale,
                tail_sum_dgate,
                HAS_RESIDUAL,
                HAS_DRES,
            )

    partial = partial_ptr + ((n * tl.num_programs(0) + block) * (2 + HAS_RESIDUAL)) * hidden
    _store_partial(partial, hidden, cols, in_cols, sum_dshift, sum_dscale, sum_dgate, HAS_RESIDUAL)
    if BLOCK_TAIL > 0:
        _store_partial(
            partial, hidden, tail_cols, tail_in_cols, tail_sum_dshift, tail_sum_dscale, tail_sum_dgate, HAS_RESIDUAL
        )


# ----------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------


def _segments(hidden: int) -> tuple[int, int]:
    """(BLOCK_MAIN, BLOCK_TAIL): a row held as [0, BLOCK_MAIN), the largest power of two
    <= hidden, and the rest padded to a power of two (0 when there is none).

    One block of next_power_of_2(hidden) would leave 44% of its lanes masked at H = 1152;
    two segments leave none at 384 = 256 + 128 and 1152 = 1024 + 128, and under a
    quarter at any H (the tail is padded to less than twice its length, and is at most
    BLOCK_MAIN wide).
    """
    block_main = 1 << (hidden.bit_length() - 1)
    rest = hidden - block_main
    return block_main, triton.next_power_of_2(rest) if rest else 0


# Elements of the first segment per thread: 16-byte loads in bf16; at H = 1152, 4 warps.
ELEMENTS_PER_THREAD = 8
MAX_WARPS = 16
# Each pipeline stage buffers one row of each streamed tensor in shared memory; at most
# this many bytes of such buffers per program.
PREFETCH_BYTES = 64 * 1024
MAX_STAGES = 3


def _launch_config(hidden: int, streamed: tuple[Tensor, ...]) -> dict:
    """BLOCK_MAIN, BLOCK_TAIL, NUM_STAGES and num_warps for a kernel whose row loop loads
    one row of each `streamed` tensor per iteration."""
    block_main, block_tail = _segments(hidden)
    num_warps = min(max(block_main // (32 * ELEMENTS_PER_THREAD), 1), MAX_WARPS)
    stage_bytes = hidden * sum(t.element_size() for t in streamed)
    num_stages = 1 + min(MAX_STAGES - 1, PREFETCH_BYTES // stage_bytes)
    return dict(BLOCK_MAIN=block_main, BLOCK_TAIL=block_tail, NUM_STAGES=num_stages, num_warps=num_warps)


# Programs launched per SM, fewer than fit at once (sm_90, H = 1152, bf16/fp32: 8+ forward and
# 4+ backward programs, with Triton 3.6 or 3.9), so that each grid runs in one wave; the
# backward launches fewer still: each of its blocks writes a (2 or 3, H) fp32 partial that is
# read back once.
FORWARD_PROGRAMS_PER_SM, BACKWARD_PROGRAMS_PER_SM = 6, 3
# At 4+ rows per block the partials' traffic stays under a quarter of the rows' own (bf16);
# in the forward, the (N, H) vectors are read once per block.
MIN_ROWS_PER_BLOCK = 4


def _rows_per_block(num_samples: int, seq_len: int, target_programs: int) -> int:
    blocks = max(1, min(triton.cdiv(seq_len, MIN_ROWS_PER_BLOCK), triton.cdiv(target_programs, num_samples)))
    return triton.cdiv(seq_len, blocks)


def _strides(t: Tensor | None, ndim: int) -> tuple[int, ...]:
    return (0,) * ndim if t is None else t.stride()


def adaln_forward_triton(x, y, gate, shift, scale, eps):
    """(h, x_new, mean, rstd); x_new is an empty tensor without the residual."""
    num_samples, seq_len, hidden = x.shape
    has_residual = y is not None
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x_new = torch.empty_like(h) if has_residual else x.new_empty(0)
    mean = torch.empty((num_samples, seq_len), dtype=compute_dtype(x.dtype), device=x.device)
    rstd = torch.empty_like(mean)
    if mean.numel() == 0:
        return h, x_new, mean, rstd
    rows_per_block = _rows_per_block(num_samples, seq_len, programs_on(x.device, FORWARD_PROGRAMS_PER_SM))
    config = _launch_config(hidden, (x, y) if has_residual else (x,))
    _adaln_fwd_kernel[(triton.cdiv(seq_len, rows_per_block), num_samples)](
        x,
        *x.stride(),
        y if has_residual else x,
        *_strides(y, 3),
        gate if has_residual else x,
        *_strides(gate, 2),
        shift,
        *shift.stride(),
        scale,
        *scale.stride(),
        h,
        x_new,
        mean,
        rstd,
        seq_len,
        hidden,
        eps,
        rows_per_block,
        HAS_RESIDUAL=has_residual,
        **config,
    )
    return h, x_new, mean, rstd


def adaln_backward_triton(grad_h, grad_x_new, x, y, gate, scale, mean, rstd):
    """(dx, dy, dmod): dmod is (N, 3, H) in the compute dtype, rows d shift, d scale, d gate;
    without the residual, dy is empty and dmod (N, 2, H).
    """
    num_samples, seq_len, hidden = x.shape
    has_residual = y is not None
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device) if has_residual else x.new_empty(0)
    num_sums = 3 if has_residual else 2
    if mean.numel() == 0:
        return dx, dy, torch.zeros((num_samples, num_sums, hidden), dtype=mean.dtype, device=x.device)
    rows_per_block = _rows_per_block(num_samples, seq_len, programs_on(x.device, BACKWARD_PROGRAMS_PER_SM))
    num_blocks = triton.cdiv(seq_len, rows_per_block)
    partial = torch.empty((num_samples, num_blocks, num_sums, hidden), dtype=mean.dtype, device=x.device)
    has_dres = grad_x_new is not None
    streamed = (grad_h, x) + ((y,) if has_residual else ()) + ((grad_x_new,) if has_dres else ())
    _adaln_bwd_kernel[(num_blocks, num_samples)](
        grad_h,
        *grad_h.stride(),
        grad_x_new if has_dres else grad_h,
        *_strides(grad_x_new, 3),
        x,
        *x.stride(),
        y if has_residual else x,
        *_strides(y, 3),
        gate if has_residual else x,
        *_strides(gate, 2),
        scale,
        *scale.stride(),
        mean,
        rstd,
        dx,
        dy,
        partial,
        seq_len,
        hidden,
        rows_per_block,
        HAS_RESIDUAL=has_residual,
        HAS_DRES=has_dres,
        **_launch_config(hidden, streamed),
    )
    # A fixed-order sum over the blocks: bitwise the same on every run.
    return dx, dy, partial.sum(dim=1)


# ----------------------------------------------------------------------------
# Custom ops and autograd
# ----------------------------------------------------------------------------


@torch.library.custom_op("imm_kernels::adaln_forward", mutates_args=())
def adaln_forward(
    x: Tensor, y: Tensor | None, gate: Tensor | None, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (h, x_new, mean, rstd); x_new is empty without the residual (y and gate None)."""
    return adaln_forward_triton(x, y, gate, shift, scale, eps)


@adaln_forward.register_fake
def _(x, y, gate, shift, scale, eps):
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x_new = torch.empty_like(h) if y is not None else x.new_empty(0)
    mean = x.new_empty(x.shape[:2], dtype=compute_dtype(x.dtype))
    return h, x_new, mean, torch.empty_like(mean)


@torch.library.custom_op("imm_kernels::adaln_backward", mutates_args=())
def adaln_backward(
    grad_h: Tensor,
    grad_x_new: Tensor | None,
    x: Tensor,
    y: Tensor | None,
    gate: Tensor | None,
    scale: Tensor,
    mean: Tensor,
    rstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dx, dy, dmod) as in `adaln_backward_triton`; x is x_new with the residual."""
    return adaln_backward_triton(grad_h, grad_x_new, x, y, gate, scale, mean, rstd)


@adaln_backward.register_fake
def _(grad_h, grad_x_new, x, y, gate, scale, mean, rstd):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device) if y is not None else x.new_empty(0)
    return dx, dy, x.new_empty((x.shape[0], 3 if y is not None else 2, x.shape[2]), dtype=mean.dtype)


def _setup_context(ctx, inputs, output):
    x, y, gate, shift, scale, _eps = inputs
    _h, x_new, mean, rstd = output
    has_residual = y is not None
    ctx.mark_non_differentiable(mean, rstd)
    if not has_residual:
        ctx.mark_non_differentiable(x_new)
    # Without materialised grads, an unused x_new costs no zero-filled (N, L, H) gradient.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x_new if has_residual else x, y, gate, scale, mean, rstd)
    ctx.dtypes = (x.dtype, shift.dtype, scale.dtype, gate.dtype if has_residual else None)


def _backward(ctx, grad_h, grad_x_new, _grad_mean, _grad_rstd):
    x, y, gate, scale, mean, rstd = ctx.saved_tensors
    x_dtype, shift_dtype, scale_dtype, gate_dtype = ctx.dtypes
    if grad_h is None and grad_x_new is None:
        return None, None, None, None, None, None
    if grad_h is None:  # only x_new was used: h's gradient is zero
        grad_h = torch.zeros(x.shape, dtype=x_dtype, device=x.device)
    dx, dy, dmod = adaln_backward(grad_h, grad_x_new if y is not None else None, x, y, gate, scale, mean, rstd)
    need_dx, need_dy, need_dgate, need_dshift, need_dscale = ctx.needs_input_grad[:5]
    return (
        dx if need_dx else None,
        dy if need_dy else None,
        dmod[:, 2].to(gate_dtype) if need_dgate else None,
        dmod[:, 0].to(shift_dtype) if need_dshift else None,
        dmod[:, 1].to(scale_dtype) if need_dscale else None,
        None,
    )


adaln_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------
# Public functions: checks, then Triton or the reference
# ----------------------------------------------------------------------------


def _check_tensor(t, name: str, shape: tuple[int, ...], x: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; they must be on one device")
    if tuple(t.shape) != shape:
        expected = "(N, L, H)" if len(shape) == 3 else "(N, H)"
        raise ValueError(f"{name} must have shape {expected} = {shape} to match x, got {tuple(t.shape)}")


def _check_args(x, others: dict, eps, backend) -> None:
    """Raises TypeError/ValueError naming the bad argument."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 3 or x.shape[2] == 0:
        raise ValueError(f"x must be (N, L, H) with H >= 1, got shape {tuple(x.shape)}")
    num_samples, seq_len, hidden = x.shape
    for name, t in others.items():
        shape = (num_samples, seq_len, hidden) if name == "y" else (num_samples, hidden)
        _check_tensor(t, name, shape, x)
    if not isinstance(eps, Real) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    check_choice("backend", backend, TRITON_BACKEND_NAMES)


def kernel_limit(x: Tensor) -> str | None:
    """Why these Triton kernels cannot take x's shape, or None when they can."""
    if x.shape[-1] > MAX_HIDDEN:
        return f"H={x.shape[-1]} exceeds its one-row-per-program limit of {MAX_HIDDEN}"
    if x.shape[0] > MAX_SAMPLES:
        return f"N={x.shape[0]} exceeds its grid limit of {MAX_SAMPLES}"
    return None


def _uses_reference(backend: str, x: Tensor) -> bool:
    return choose_backend(backend, x.device, TRITON_AUTO, limit=kernel_limit(x)) is TORCH


def adaln_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, *, backend: str = "auto") -> Tensor:
    """LayerNorm over H without affine, then LN(x) * (1 + scale) + shift, in one pass.

    Args:
        x: (N, L, H) floating tensor, any strides.
        shift, scale: (N, H) floating tensors on x's device, any strides (views of a
            `chunk(6, dim=1)`, stride-0 expanded); used as if cast to x's dtype.
        eps: added to the variance, > 0.
        backend: "auto" (Triton on CUDA tensors, or on CPU tensors under
            TRITON_INTERPRET=1; else the reference), "triton" or "torch" (the reference).

    Returns:
        h, (N, L, H) contiguous in x's dtype; differentiable in x, shift and scale.
    """
    _check_args(x, {"shift": shift, "scale": scale}, eps, backend)
    if _uses_reference(backend, x):
        return adaln_modulate_reference(x, shift, scale, eps)
    return adaln_forward(x, None, None, shift, scale, float(eps))[0]


def adaln_residual_modulate(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, *, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """x_new = x + gate * y, then h = LN(x_new) * (1 + scale) + shift, in one pass.

    Args:
        x, y: (N, L, H) floating tensors, any strides; y used as if cast to x's dtype.
        gate, shift, scale: (N, H), as `shift` in `adaln_modulate`.
        eps, backend: as in `adaln_modulate`.

    Returns:
        (h, x_new), both (N, L, H) in x's dtype; differentiable in all five tensors
        (the backward adds the gradient through h to the one flowing into x_new).
    """
    _check_args(x, {"y": y, "gate": gate, "shift": shift, "scale": scale}, eps, backend)
    if _uses_reference(backend, x):
        return adaln_residual_modulate_reference(x, y, gate, shift, scale, eps)
    h, x_new, _mean, _rstd = adaln_forward(x, y, gate, shift, scale, float(eps))
    return h, x_new
