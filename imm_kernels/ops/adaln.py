"""Fused adaLN: LayerNorm without affine + per-sample modulation, optionally after a gated residual.

    adaln_modulate(x, shift, scale)                    h = LN(x) * (1 + scale) + shift
    adaln_residual_modulate(x, y, gate, shift, scale)  x_new = x + gate * y,  h = LN(x_new) * (1 + scale) + shift

x, y are (N, L, H); gate, shift, scale are (N, H), broadcast over L. One kernel
family with a HAS_RESIDUAL constexpr; one program per row of H in the forward,
statistics in fp32 (fp64 for fp64 x). Any strides work (the `chunk(6)` views
of a DiT's modulation output, stride-0 expanded tensors, stride-0 gradients):
nothing is copied.

Besides its inputs (x_new instead of x for the residual form), the forward
saves only the per-row mean and 1/std. The backward, with
xhat = (x_new - mean) * rstd and g = dh * (1 + scale):

    dx_new = rstd * (g - mean_H(g) - xhat * mean_H(g * xhat)) + (grad flowing into x_new)
    dx = dx_new,   dy = gate * dx_new
    dshift = sum_L dh,   dscale = sum_L dh * xhat,   dgate = sum_L dx_new * y

The sums over L are deterministic without atomics: program (block, n) sums its
block of rows in registers and writes a partial; the partials are summed in a
fixed order afterwards.

Mixed dtypes: y, gate, shift and scale may have any floating dtype; they are
used as if cast to x's dtype (the kernels read them as they are and compute
in fp32), h and x_new have x's dtype, and each gradient has its input's dtype.
"""

from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor

from .reference import adaln_modulate_reference, adaln_residual_modulate_reference, compute_dtype
from .triton_support import check_backend, device_unavailable, jit, tl, triton, use_triton

# One row of H per program, in registers; wider rows take the reference.
MAX_HIDDEN = 16384
# N is the grid's second axis, which CUDA limits to 65535 blocks.
MAX_SAMPLES = 65535


# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------


@jit
def _adaln_fwd_kernel(
    x_ptr, stride_xn, stride_xl, stride_xh,
    y_ptr, stride_yn, stride_yl, stride_yh,
    gate_ptr, stride_gate_n, stride_gate_h,
    shift_ptr, stride_shift_n, stride_shift_h,
    scale_ptr, stride_scale_n, stride_scale_h,
    h_ptr, x_new_ptr,  # contiguous (N, L, H); x_new unused without the residual
    mean_ptr, rstd_ptr,  # contiguous (N, L), the compute dtype
    seq_len, hidden, eps,
    BLOCK_H: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    """Program (l, n): one row of H."""
    pos = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    cdtype = mean_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_H)
    in_h = cols < hidden
    row = (n * seq_len + pos) * hidden

    x = tl.load(x_ptr + n * stride_xn + pos * stride_xl + cols * stride_xh, mask=in_h, other=0.0)
    if HAS_RESIDUAL:
        y = tl.load(y_ptr + n * stride_yn + pos * stride_yl + cols * stride_yh, mask=in_h, other=0.0)
        gate = tl.load(gate_ptr + n * stride_gate_n + cols * stride_gate_h, mask=in_h, other=0.0)
        # Normalise x_new as stored (rounded to x's dtype), so h is exactly LN of the returned x_new.
        x = (x.to(cdtype) + gate.to(cdtype) * y.to(cdtype)).to(x_new_ptr.dtype.element_ty)
        tl.store(x_new_ptr + row + cols, x, mask=in_h)
    x = x.to(cdtype)

    mean = tl.sum(x, axis=0) / hidden
    centred = tl.where(in_h, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / hidden + eps)
    tl.store(mean_ptr + n * seq_len + pos, mean)
    tl.store(rstd_ptr + n * seq_len + pos, rstd)

    shift = tl.load(shift_ptr + n * stride_shift_n + cols * stride_shift_h, mask=in_h, other=0.0).to(cdtype)
    scale = tl.load(scale_ptr + n * stride_scale_n + cols * stride_scale_h, mask=in_h, other=0.0).to(cdtype)
    h = centred * rstd * (1.0 + scale) + shift
    tl.store(h_ptr + row + cols, h.to(h_ptr.dtype.element_ty), mask=in_h)


@jit
def _adaln_bwd_kernel(
    dh_ptr, stride_dhn, stride_dhl, stride_dhh,
    dres_ptr, stride_dresn, stride_dresl, stride_dresh,  # grad flowing into x_new; unused without HAS_DRES
    x_ptr, stride_xn, stride_xl, stride_xh,  # the normalised input: x, or x_new with the residual
    y_ptr, stride_yn, stride_yl, stride_yh,
    gate_ptr, stride_gate_n, stride_gate_h,
    scale_ptr, stride_scale_n, stride_scale_h,
    mean_ptr, rstd_ptr,
    dx_ptr, dy_ptr,  # contiguous (N, L, H)
    partial_ptr,  # contiguous (N, num_blocks, 2 + HAS_RESIDUAL, H): per-block sums for dshift, dscale (, dgate)
    seq_len, hidden, rows_per_block,
    BLOCK_H: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DRES: tl.constexpr,
):
    """Program (block, n): rows [block * rows_per_block, ...) of sample n."""
    block = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    cdtype = mean_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_H)
    in_h = cols < hidden

    scale = tl.load(scale_ptr + n * stride_scale_n + cols * stride_scale_h, mask=in_h, other=0.0).to(cdtype)
    if HAS_RESIDUAL:
        gate = tl.load(gate_ptr + n * stride_gate_n + cols * stride_gate_h, mask=in_h, other=0.0).to(cdtype)
    sum_dshift = tl.zeros((BLOCK_H,), dtype=cdtype)
    sum_dscale = tl.zeros((BLOCK_H,), dtype=cdtype)
    sum_dgate = tl.zeros((BLOCK_H,), dtype=cdtype)

    start = block * rows_per_block
    end = tl.minimum(start + rows_per_block, seq_len)
    for pos in range(start, end):
        x = tl.load(x_ptr + n * stride_xn + pos * stride_xl + cols * stride_xh, mask=in_h, other=0.0).to(cdtype)
        dh = tl.load(dh_ptr + n * stride_dhn + pos * stride_dhl + cols * stride_dhh, mask=in_h, other=0.0)
        dh = dh.to(cdtype)
        mean = tl.load(mean_ptr + n * seq_len + pos)
        rstd = tl.load(rstd_ptr + n * seq_len + pos)
        xhat = tl.where(in_h, (x - mean) * rstd, 0.0)
        g = dh * (1.0 + scale)
        mean_g = tl.sum(g, axis=0) / hidden
        mean_gx = tl.sum(g * xhat, axis=0) / hidden
        dx = (g - mean_g - xhat * mean_gx) * rstd
        if HAS_DRES:
            dres = tl.load(
                dres_ptr + n * stride_dresn + pos * stride_dresl + cols * stride_dresh, mask=in_h, other=0.0
            )
            dx += dres.to(cdtype)
        row = (n * seq_len + pos) * hidden
        tl.store(dx_ptr + row + cols, dx.to(dx_ptr.dtype.element_ty), mask=in_h)
        sum_dshift += dh
        sum_dscale += dh * xhat
        if HAS_RESIDUAL:
            y = tl.load(y_ptr + n * stride_yn + pos * stride_yl + cols * stride_yh, mask=in_h, other=0.0)
            tl.store(dy_ptr + row + cols, (dx * gate).to(dy_ptr.dtype.element_ty), mask=in_h)
            sum_dgate += dx * y.to(cdtype)

    partial = partial_ptr + ((n * tl.num_programs(0) + block) * (2 + HAS_RESIDUAL)) * hidden + cols
    tl.store(partial, sum_dshift, mask=in_h)
    tl.store(partial + hidden, sum_dscale, mask=in_h)
    if HAS_RESIDUAL:
        tl.store(partial + 2 * hidden, sum_dgate, mask=in_h)


# ----------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------


def _launch_config(hidden: int, elements_per_thread: int) -> tuple[int, int]:
    """(BLOCK_H, num_warps): the whole row in one block.

    sm_90 ptxas reports (H = 1152, bf16/fp32): the forward at 8 elements per thread
    uses 48 registers; the backward at 8 uses ~180 (one block per SM), at 4 ~100,
    no spills either way. GPU timing of the alternatives is still to be done.
    """
    block_h = max(16, triton.next_power_of_2(hidden))
    return block_h, min(max(block_h // (32 * elements_per_thread), 1), 16)


FORWARD_ELEMENTS_PER_THREAD, BACKWARD_ELEMENTS_PER_THREAD = 8, 4


def _target_programs(device: torch.device) -> int:
    """How many backward programs fill the device; fewer samples than this split L into blocks."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: small, but enough that CPU tests sum several partials


# Each block writes a (2 or 3, H) fp32 partial that is read back once; at 4+ rows per block
# that traffic stays under a quarter of the rows' own (bf16).
MIN_ROWS_PER_BLOCK = 4


def _rows_per_block(num_samples: int, seq_len: int, device: torch.device) -> int:
    blocks = max(1, min(triton.cdiv(seq_len, MIN_ROWS_PER_BLOCK), triton.cdiv(_target_programs(device), num_samples)))
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
    block_h, num_warps = _launch_config(hidden, FORWARD_ELEMENTS_PER_THREAD)
    _adaln_fwd_kernel[(seq_len, num_samples)](
        x, *x.stride(), y if has_residual else x, *_strides(y, 3), gate if has_residual else x, *_strides(gate, 2),
        shift, *shift.stride(), scale, *scale.stride(), h, x_new, mean, rstd,
        seq_len, hidden, eps, BLOCK_H=block_h, HAS_RESIDUAL=has_residual, num_warps=num_warps,
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
    rows_per_block = _rows_per_block(num_samples, seq_len, x.device)
    num_blocks = triton.cdiv(seq_len, rows_per_block)
    partial = torch.empty((num_samples, num_blocks, num_sums, hidden), dtype=mean.dtype, device=x.device)
    block_h, num_warps = _launch_config(hidden, BACKWARD_ELEMENTS_PER_THREAD)
    has_dres = grad_x_new is not None
    _adaln_bwd_kernel[(num_blocks, num_samples)](
        grad_h, *grad_h.stride(), grad_x_new if has_dres else grad_h, *_strides(grad_x_new, 3),
        x, *x.stride(), y if has_residual else x, *_strides(y, 3), gate if has_residual else x, *_strides(gate, 2),
        scale, *scale.stride(), mean, rstd, dx, dy, partial, seq_len, hidden, rows_per_block,
        BLOCK_H=block_h, HAS_RESIDUAL=has_residual, HAS_DRES=has_dres, num_warps=num_warps,
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
    grad_h: Tensor, grad_x_new: Tensor | None, x: Tensor, y: Tensor | None, gate: Tensor | None,
    scale: Tensor, mean: Tensor, rstd: Tensor,
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
    check_backend(backend)


def triton_unavailable(x: Tensor) -> str | None:
    """Why the Triton kernels cannot take x, or None when they can."""
    reason = device_unavailable(x.device)
    if reason is None and x.shape[-1] > MAX_HIDDEN:
        reason = f"H={x.shape[-1]} exceeds its one-row-per-program limit of {MAX_HIDDEN}"
    if reason is None and x.shape[0] > MAX_SAMPLES:
        reason = f"N={x.shape[0]} exceeds its grid limit of {MAX_SAMPLES}"
    return reason


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
    if not use_triton(backend, triton_unavailable(x)):
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
    if not use_triton(backend, triton_unavailable(x)):
        return adaln_residual_modulate_reference(x, y, gate, shift, scale, eps)
    h, x_new, _mean, _rstd = adaln_forward(x, y, gate, shift, scale, float(eps))
    return h, x_new
