"""Grouped Laplace-kernel MMD: the op every fused backend shares.

Two `torch.library` custom ops (with fake implementations, so they work under
`torch.compile`) and one autograd formula; a `backend` argument picks the
kernels: `triton` (ops/mmd_triton.py), `native` (C++ in csrc/, CPU) or `cuda`
(CUDA C++ in csrc/). Each backend registers an `MMDKernels` here (see
`imm_kernels.backends`); the op itself knows nothing backend-specific.

Forward: (loss_g, S, MMD^2_g, dMMD^2_g/db) with S_ij = ||z_i - z_j||^2 over each
group's stacked z = [x_g; y_g]. Only S (a few KB per group) and the two
per-group scalars are saved; the backward reads x and y once more.

Gradients for bandwidth and weight follow from the saved scalars:
dL/db_g = w_g dMMD^2_g/db,  dL/dw_g = MMD^2_g.

A backend may also offer `forward_with_grad`: the forward plus (dx, dy) for the
upstream gradient a loss's `.backward()` sends (1 into the reduced loss), computed
while each group is still in cache. Its backward returns those when that is the
gradient that arrives, and otherwise computes them again: never a wrong gradient,
only a wasted pass. A GPU backend makes that test on the device (`refresh_grad`
rewrites, in place, only the groups whose gradient differs): no host sync; CPU
backends test on the host, which costs nothing there. The path also applies the
reduction itself, which saves an autograd node per call. Eager mode only; under
torch.compile the plain op is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .reference import compute_dtype, reduce_groups


class MMDKernels(NamedTuple):
    """One backend's kernels; both take (B, D) row views with unit column stride.

    forward(x_rows, y_rows, bandwidth, weight, group_size, eps) -> (loss_g, S, MMD^2_g, dMMD^2_g/db)
    backward(grad_loss, x_rows, y_rows, S, bandwidth, weight, group_size, eps, need_dx, need_dy)
        -> (dx, dy), contiguous (B, D), an empty tensor where not asked for
    saved_rows(group_size) -> the side of the saved (G, rows, rows) S
    forward_with_grad(x_rows, y_rows, bandwidth, weight, group_size, eps, grad_loss, need_dx, need_dy)
        -> forward's four outputs, then backward's (dx, dy) for grad_loss; None if not offered
    refresh_grad(grad_loss, expected, x_rows, y_rows, S, bandwidth, weight, group_size, eps, dx, dy)
        -> None; rewrites in place the groups of forward_with_grad's (B, D) dx/dy (empty where not
        computed) whose grad_loss differs from the `expected` one they hold, deciding on the device;
        None if not offered (the backward then tests on the host)
    bandwidth, weight and grad_loss arrive as (G,) tensors of the compute dtype;
    bandwidth and weight contiguous, grad_loss possibly stride-0.
    """

    forward: Callable
    backward: Callable
    saved_rows: Callable[[int], int]
    forward_with_grad: Callable | None = None
    refresh_grad: Callable | None = None


_KERNELS: dict[str, MMDKernels] = {}


def register_kernels(backend: str, kernels: MMDKernels) -> None:
    _KERNELS[backend] = kernels


def stacked_rows(group_size: int) -> int:
    """2M: the side of S for backends that save it unpadded."""
    return 2 * group_size


def as_rows(t: Tensor) -> Tensor:
    """(B, *feature) -> (B, D) with unit column stride; a view whenever possible.

    Any row stride works (chunked views, stride-0 expanded rows); only a
    non-unit stride inside a sample forces a copy.
    """
    rows = t if t.dim() == 2 else t.reshape(t.shape[0], -1)
    return rows if rows.stride(1) == 1 or rows.shape[1] == 1 else rows.contiguous()


@torch.library.custom_op("imm_kernels::mmd_forward", mutates_args=())
def mmd_forward(
    x: Tensor, y: Tensor, bandwidth: Tensor, weight: Tensor, group_size: int, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (loss_g, S, MMD^2_g, dMMD^2_g/db): the last three are saved for the backward."""
    return _KERNELS[backend].forward(
        as_rows(x), as_rows(y), bandwidth.contiguous(), weight.contiguous(), group_size, eps
    )


@mmd_forward.register_fake
def _(x, y, bandwidth, weight, group_size, eps, backend):
    num_groups, rows = x.shape[0] // group_size, _KERNELS[backend].saved_rows(group_size)
    cdtype = compute_dtype(x.dtype)
    per_group = [x.new_empty(num_groups, dtype=cdtype) for _ in range(3)]
    return per_group[0], x.new_empty((num_groups, rows, rows), dtype=cdtype), per_group[1], per_group[2]


@torch.library.custom_op("imm_kernels::mmd_backward", mutates_args=())
def mmd_backward(
    grad_loss: Tensor, x: Tensor, y: Tensor, sqdist: Tensor, bandwidth: Tensor, weight: Tensor,
    group_size: int, eps: float, need_dx: bool, need_dy: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    """-> (dx, dy) shaped like x and y; an empty tensor stands for a gradient not asked for."""
    dx, dy = _KERNELS[backend].backward(
        grad_loss.to(sqdist.dtype), as_rows(x), as_rows(y), sqdist, bandwidth.contiguous(), weight.contiguous(),
        group_size, eps, need_dx, need_dy,
    )
    return (dx.view(x.shape) if need_dx else dx), (dy.view(y.shape) if need_dy else dy)


@mmd_backward.register_fake
def _(grad_loss, x, y, sqdist, bandwidth, weight, group_size, eps, need_dx, need_dy, backend):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty(0)
    dy = torch.empty_like(y, memory_format=torch.contiguous_format) if need_dy else y.new_empty(0)
    return dx, dy


def _input_grads(ctx, grad_loss, dx, dy, weight, mmd2, dmmd_db):
    """The gradients mmd_forward returns, x and y's already computed."""
    need_dx, need_dy, need_db, need_dw = ctx.needs_input_grad[:4]
    return (
        dx if need_dx else None,
        dy if need_dy else None,
        grad_loss * weight * dmmd_db if need_db else None,
        grad_loss * mmd2 if need_dw else None,
    )


def _setup_context(ctx, inputs, output):
    x, y, bandwidth, weight, group_size, eps, backend = inputs
    _, sqdist, mmd2, dmmd_db = output
    ctx.mark_non_differentiable(sqdist, mmd2, dmmd_db)
    ctx.save_for_backward(x, y, sqdist, bandwidth, weight, mmd2, dmmd_db)
    ctx.group_size, ctx.eps, ctx.backend = group_size, eps, backend


def _recomputed_grads(ctx, grad_loss, x, y, sqdist, bandwidth, weight, mmd2, dmmd_db):
    """The gradients mmd_forward returns, dx and dy computed from x, y and the saved S."""
    need_dx, need_dy = ctx.needs_input_grad[:2]
    dx, dy = mmd_backward(
        grad_loss, x, y, sqdist, bandwidth, weight, ctx.group_size, ctx.eps, need_dx, need_dy, ctx.backend
    )
    return _input_grads(ctx, grad_loss, dx, dy, weight, mmd2, dmmd_db)


def _backward(ctx, grad_loss, *_grads_of_saved_outputs):
    return (*_recomputed_grads(ctx, grad_loss, *ctx.saved_tensors), None, None, None)


mmd_forward.register_autograd(_backward, setup_context=_setup_context)


def _per_group_grad(grad_out: Tensor, num_groups: int, reduction: str) -> Tensor:
    """The gradient each group's loss receives when the reduced loss receives grad_out."""
    if reduction == "none":
        return grad_out
    grad = grad_out.expand(num_groups)
    return grad / num_groups if reduction == "mean" else grad


def _flat(grad: Tensor) -> Tensor:
    """A gradient as (B, D) rows (it is contiguous); an empty tensor stays empty."""
    return grad.view(grad.shape[0], -1) if grad.numel() else grad


class _MMDWithGrad(torch.autograd.Function):
    """mmd_forward, reduced, whose forward also computes (dx, dy) for an upstream gradient of 1.

    Eager mode only (grouped_mmd never takes it while compiling), so a plain autograd
    Function: it skips the custom-op dispatch, a large share of the call at small sizes.
    """

    @staticmethod
    def forward(ctx, x, y, bandwidth, weight, group_size, eps, reduction, backend):
        need_dx, need_dy = ctx.needs_input_grad[:2]
        num_groups = bandwidth.shape[0]
        # What each group's loss receives when the reduced loss receives 1.
        ones = torch.ones((num_groups,) if reduction == "none" else (), dtype=bandwidth.dtype, device=bandwidth.device)
        expected = _per_group_grad(ones, num_groups, reduction)
        loss, sqdist, mmd2, dmmd_db, dx, dy = _KERNELS[backend].forward_with_grad(
            as_rows(x), as_rows(y), bandwidth.contiguous(), weight.contiguous(), group_size, eps,
            expected, need_dx, need_dy,
        )
        dx, dy = (dx.view(x.shape) if need_dx else dx), (dy.view(y.shape) if need_dy else dy)
        ctx.save_for_backward(x, y, sqdist, bandwidth, weight, mmd2, dmmd_db, dx, dy)
        ctx.group_size, ctx.eps, ctx.reduction, ctx.backend = group_size, eps, reduction, backend
        ctx.expected, ctx.grads_returned = expected, False
        return reduce_groups(loss, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        x, y, sqdist, bandwidth, weight, mmd2, dmmd_db, dx, dy = ctx.saved_tensors
        num_groups = bandwidth.shape[0]
        refresh_grad = _KERNELS[ctx.backend].refresh_grad
        if refresh_grad is not None:
            grad_loss = _per_group_grad(grad_out, num_groups, ctx.reduction)
            if ctx.grads_returned:  # a second backward (retain_graph): never overwrite what the first returned
                grads = _recomputed_grads(ctx, grad_loss, x, y, sqdist, bandwidth, weight, mmd2, dmmd_db)
            else:
                refresh_grad(grad_loss.to(sqdist.dtype), ctx.expected, as_rows(x), as_rows(y), sqdist, bandwidth,
                             weight, ctx.group_size, ctx.eps, _flat(dx), _flat(dy))
                ctx.grads_returned = True
                grads = _input_grads(ctx, grad_loss, dx, dy, weight, mmd2, dmmd_db)
            return (*grads, None, None, None, None)
        if ctx.reduction == "none":
            grad_loss, precomputed = grad_out, bool((grad_out == 1).all())
        else:
            # A reduced loss's gradient is one number: one op tests it where the (G,) test takes three.
            precomputed = grad_out.item() == 1
            grad_loss = None  # unused unless recomputing or asked for the bandwidth/weight gradients
            if not precomputed or any(ctx.needs_input_grad[2:4]):
                grad_loss = _per_group_grad(grad_out, num_groups, ctx.reduction)
        if precomputed:
            grads = _input_grads(ctx, grad_loss, dx, dy, weight, mmd2, dmmd_db)
        else:  # not the precomputed upstream gradient: compute dx and dy from x and y
            grads = _recomputed_grads(ctx, grad_loss, x, y, sqdist, bandwidth, weight, mmd2, dmmd_db)
        return (*grads, None, None, None, None)


def grouped_mmd(
    x: Tensor, y: Tensor, group_size: int, bandwidth: Tensor, weight: Tensor, eps: float, *, backend: str,
    reduction: str = "none",
) -> Tensor:
    """weight_g * MMD^2_g per group through `backend`'s kernels, reduced as asked ("none": (G,))."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    if needs_grad and _KERNELS[backend].forward_with_grad is not None and not torch.compiler.is_compiling():
        return _MMDWithGrad.apply(x, y, bandwidth, weight, group_size, float(eps), reduction, backend)
    return reduce_groups(mmd_forward(x, y, bandwidth, weight, group_size, float(eps), backend)[0], reduction)
