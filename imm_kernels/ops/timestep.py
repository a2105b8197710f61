"""DiT's sinusoidal timestep embedding, computed to float32 accuracy.

    emb[n] = [cos(t_n f_0), ..., cos(t_n f_{half-1}), sin(t_n f_0), ..., sin(t_n f_{half-1})] (+ 0 if dim odd)
    f_i = max_period^(-i / half),  half = dim // 2

IMM feeds 1000 t, so angles reach 1000 rad. The DiT's own fp32 formula rounds
f_i and t f_i to fp32 (an angle error of ~6e-5 rad at 1000 rad) and loses about
1e-4 of accuracy; this kernel forms f_i, t f_i, cos and sin in float64 (one
program per sample and block of frequencies: a few thousand values, so fp64's
lower rate costs nothing measurable) and rounds once to the output dtype.

Output: float32, or float64 for float64 t. Autograd: d/dt is implemented (in
PyTorch, from the saved output), so the op composes with anything that
differentiates through time; dim and max_period are not differentiable.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
import torch
from torch import Tensor

from ..validation import check_choice
from .backends import TORCH, TRITON_AUTO, TRITON_BACKEND_NAMES, choose_backend
from .reference import timestep_embedding_reference
from .utils import jit, tl, triton

# ----------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------


@jit
def _timestep_embedding_kernel(
    t_ptr,
    stride_t,
    out_ptr,  # out: contiguous (N, dim)
    half,
    dim,
    log_period_hi,
    log_period_lo,  # log(max_period) = hi + lo: Triton passes floats as fp32
    BLOCK: tl.constexpr,
    ODD_DIM: tl.constexpr,
):
    """Program (n, block): frequencies [block * BLOCK, ...) of sample n."""
    n = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    in_half = cols < half
    t = tl.load(t_ptr + n * stride_t).to(tl.float64)
    log_period = tl.cast(log_period_hi, tl.float64) + tl.cast(log_period_lo, tl.float64)
    freqs = tl.exp(-log_period * cols.to(tl.float64) / half)
    args = t * freqs
    row = out_ptr + n * dim
    out_dtype = out_ptr.dtype.element_ty
    tl.store(row + cols, tl.cos(args).to(out_dtype), mask=in_half)
    tl.store(row + half + cols, tl.sin(args).to(out_dtype), mask=in_half)
    if ODD_DIM:  # the trailing zero column (every block writes the same 0)
        tl.store(row + dim - 1, 0.0)


# ----------------------------------------------------------------------------
# Host launcher
# ----------------------------------------------------------------------------


def _output_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _split_fp32(value: float) -> tuple[float, float]:
    """value = hi + lo with hi, lo float32: ~48 bits of value survive fp32 kernel arguments."""
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


def timestep_embedding_triton(t: Tensor, dim: int, max_period: float) -> Tensor:
    out = torch.empty((t.shape[0], dim), dtype=_output_dtype(t), device=t.device)
    half = dim // 2
    if t.shape[0] == 0 or half == 0:  # nothing to compute, or only the zero column (dim = 1)
        return out.zero_()
    block = min(1024, max(16, triton.next_power_of_2(half)))
    _timestep_embedding_kernel[(t.shape[0], max(1, triton.cdiv(half, block)))](
        t,
        t.stride(0),
        out,
        half,
        dim,
        *_split_fp32(math.log(max_period)),
        BLOCK=block,
        ODD_DIM=dim % 2 == 1,
    )
    return out


# ----------------------------------------------------------------------------
# Custom op and autograd
# ----------------------------------------------------------------------------


@torch.library.custom_op("imm_kernels::timestep_embedding", mutates_args=())
def timestep_embedding_op(t: Tensor, dim: int, max_period: float) -> Tensor:
    return timestep_embedding_triton(t, dim, max_period)


@timestep_embedding_op.register_fake
def _(t, dim, max_period):
    return t.new_empty((t.shape[0], dim), dtype=_output_dtype(t))


def _setup_context(ctx, inputs, output):
    t, dim, max_period = inputs
    ctx.save_for_backward(output)
    ctx.max_period, ctx.t_dtype = max_period, t.dtype


def _backward(ctx, grad):
    """d emb / dt: d cos(t f)/dt = -f sin(t f), d sin(t f)/dt = f cos(t f), from the saved output."""
    (emb,) = ctx.saved_tensors
    half = emb.shape[1] // 2
    exponents = torch.arange(half, dtype=torch.float64, device=emb.device) / half
    freqs = torch.exp(-math.log(ctx.max_period) * exponents).to(emb.dtype)
    cos, sin = emb[:, :half], emb[:, half : 2 * half]
    grad_t = (freqs * (grad[:, half : 2 * half] * cos - grad[:, :half] * sin)).sum(dim=1)
    return grad_t.to(ctx.t_dtype), None, None


timestep_embedding_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------


def _check_args(t, dim, max_period, backend) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"t must be a real floating-point or integer tensor, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"t must be a 1-D tensor of N times, got shape {tuple(t.shape)}")
    if not isinstance(dim, Integral) or isinstance(dim, bool):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if not isinstance(max_period, Real) or isinstance(max_period, bool) or not 0 < max_period < math.inf:
        raise ValueError(f"max_period must be a positive finite number, got {max_period!r}")
    check_choice("backend", backend, TRITON_BACKEND_NAMES)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000, *, backend: str = "auto") -> Tensor:
    """DiT's sinusoidal embedding of N (scaled) times, accurate to the output dtype.

    Args:
        t: (N,) floating or integer tensor, any stride (IMM passes 1000 t).
        dim: embedding width; odd widths get a final zero column.
        max_period: the longest period, 10000 as in DiT.
        backend: "auto" (Triton on CUDA tensors, or on CPU tensors under
            TRITON_INTERPRET=1; else the reference), "triton" or "torch" (the reference).

    Returns:
        (N, dim) float32 (float64 for float64 t): [cos(t f), sin(t f)], f_i = max_period^(-i/half);
        differentiable in t.
    """
    _check_args(t, dim, max_period, backend)
    if choose_backend(backend, t.device, TRITON_AUTO) is TORCH:
        return timestep_embedding_reference(t, int(dim), float(max_period))
    return timestep_embedding_op(t, int(dim), float(max_period))
