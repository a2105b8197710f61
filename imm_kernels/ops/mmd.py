"""Grouped Laplace-kernel MMD, the op whole, in reading order:

1. `mmd_loss` and its argument checks;
2. the backend choice (`ops/backends.py` holds one record per backend);
3. per fused backend, two `torch.library` custom ops (forward, backward) with fake
   implementations, so they work under `torch.compile`, and one autograd formula;
4. the kernels they launch: Triton in `ops/mmd_triton.py`, C++ and CUDA C++ in
   `csrc/` (reached as `imm_kernels._C`); the PyTorch reference in `ops/reference.py`.

Forward: (loss_g, S, MMD^2_g, dMMD^2_g/db) with S_ij = ||z_i - z_j||^2 over each
group's stacked z = [x_g; y_g]. Only S (a few KB per group) and the two per-group
scalars are saved; the backward reads x and y once more. Gradients for bandwidth
and weight follow from the saved scalars: dL/db_g = w_g dMMD^2_g/db, dL/dw_g = MMD^2_g.

A backend may also offer `forward_with_grad`: the forward plus (dx, dy) for the
upstream gradient a loss's `.backward()` sends (1 into the reduced loss), computed
while each group is still in cache. Its backward returns those when that is the
gradient that arrives, and otherwise computes them again: never a wrong gradient,
only a wasted pass. A GPU backend makes that test on the device (`refresh_grad`
rewrites, in place, only the groups whose gradient differs): no host sync; CPU
backends test on the host, which costs nothing there. The path also applies the
reduction itself, which saves an autograd node per call. Eager mode only; under
torch.compile the plain ops are used.

Second-order gradients: the kernels' gradients are plain numbers, with no graph to
differentiate again. A backward that must build one (`create_graph=True`, the only time
autograd runs a backward with grad mode on) computes the gradients through the PyTorch
reference instead; every other backward is the kernels' alone.
"""

from __future__ import annotations

from numbers import Integral, Real

import torch
from torch import Tensor

from ..validation import check_choice, check_finite
from .backends import BACKEND_NAMES, CUDA, MMD_AUTO, NATIVE, TRITON, Backend, choose_backend
from .reference import grouped_mmd_reference
from .utils import FLOAT_DTYPES, as_per_group, as_rows, compute_dtype, reduce_groups

REDUCTIONS = ("mean", "sum", "none")

# ----------------------------------------------------------------------------
# Public function and argument checks
# ----------------------------------------------------------------------------


def mmd_loss(
    x: Tensor,
    y: Tensor,
    group_size: int,
    bandwidth: float | Tensor = 1.0,
    weight: float | Tensor | None = None,
    *,
    eps: float = 1e-8,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Grouped Laplace-kernel MMD^2 (the V-statistic over all M^2 pairs) between x and y.

    Args:
        x, y: (B, *feature) tensors of one dtype (fp16/bf16/fp32/fp64) and device;
            groups are consecutive runs of `group_size` rows, D = prod(feature).
        group_size: M, particles per group; B must be a multiple of it.
        bandwidth: w~ per group: a float or a (G,) tensor; k(a, b) = exp(-w~ max(|a-b|, eps) / D).
        weight: None (1), a float or a (G,) tensor multiplying each group's MMD^2.
        eps: distances below it are clamped, with exactly zero gradient.
        reduction: "mean" over groups, "sum", or "none" for the (G,) per-group values.
        backend: "auto", "triton", "native", "cuda" or "torch" (see `imm_kernels.backends()`).

    Returns:
        weight_g * MMD^2_g reduced as asked, in float32 (float64 for float64 inputs),
        differentiable in x, y, bandwidth and weight.
    """
    num_groups = _check_mmd_args(x, y, group_size, bandwidth, weight, eps, reduction, backend)
    chosen = choose_backend(backend, x.device, MMD_AUTO, dtype=x.dtype, group_size=group_size)
    cdtype = compute_dtype(x.dtype)
    bandwidth = as_per_group(bandwidth, num_groups, cdtype, x.device)
    weight = as_per_group(1.0 if weight is None else weight, num_groups, cdtype, x.device)
    if chosen.mmd is None:
        return reduce_groups(grouped_mmd_reference(x, y, int(group_size), bandwidth, weight, float(eps)), reduction)
    # Fused backends reduce themselves, and may compute dx up front for what `loss.backward()` sends.
    return _FUSED[chosen](x, y, int(group_size), bandwidth, weight, float(eps), reduction)


def _check_per_group(value, name: str, num_groups: int, device: torch.device, *, non_negative: bool) -> None:
    """A finite float (>= 0 if non_negative), or a floating 0-dim / (G,) tensor on x's device.

    Only Python numbers have their values checked: reading a tensor's values would
    sync with the device (and break CUDA-graph capture); NaN in a tensor gives NaN.
    """
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but x is on {device}")
        if value.shape not in (torch.Size([]), torch.Size([num_groups])):
            raise ValueError(
                f"{name} must be a float or a tensor of shape ({num_groups},) (one per group), "
                f"got shape {tuple(value.shape)}"
            )
    elif isinstance(value, Real) and not isinstance(value, bool):
        check_finite(name, value, nonnegative=non_negative)
    else:
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")


def _check_mmd_args(x, y, group_size, bandwidth, weight, eps, reduction, backend) -> int:
    """Raises TypeError/ValueError naming the bad argument; returns the number of groups."""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if y.dtype != x.dtype:
        raise TypeError(f"y has dtype {y.dtype} but x has {x.dtype}; they must match")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}; they must be on one device")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if x.dim() == 0 or x.numel() == 0:  # (numel, not x[0]: no view op on every call)
        raise ValueError(f"x must be (B, *feature) with B >= 1 and at least one feature, got {tuple(x.shape)}")
    if not isinstance(group_size, Integral) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if x.shape[0] % group_size != 0:
        raise ValueError(f"the batch size {x.shape[0]} of x is not divisible by group_size={group_size}")
    num_groups = x.shape[0] // group_size
    _check_per_group(bandwidth, "bandwidth", num_groups, x.device, non_negative=True)
    if weight is not None:
        _check_per_group(weight, "weight", num_groups, x.device, non_negative=False)
    check_finite("eps", eps, nonnegative=True)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKEND_NAMES)
    return num_groups


# ----------------------------------------------------------------------------
# Custom ops and autograd, one pair of ops per fused backend
# ----------------------------------------------------------------------------


def _per_group_grad(grad_out: Tensor, num_groups: int, reduction: str) -> Tensor:
    """The gradient each group's loss receives when the reduced loss receives grad_out."""
    if reduction == "none":
        return grad_out
    grad = grad_out.expand(num_groups)
    return grad / num_groups if reduction == "mean" else grad


def _flat(grad: Tensor) -> Tensor:
    """A gradient as (B, D) rows (it is contiguous); an empty tensor stays empty."""
    return grad.view(grad.shape[0], -1) if grad.numel() else grad


def _graph_building_grads(ctx, grad_out, reduction, x, y, bandwidth, weight):
    """The gradients of (x, y, bandwidth, weight) through the differentiable PyTorch reference,
    for a backward under create_graph=True: they carry the graph of a second differentiation.

    Each argument gets its own view, hence only its own gradient (one tensor may fill two).
    """
    needs = ctx.needs_input_grad[:4]
    own = [t.view_as(t) for t in (x, y, bandwidth, weight)]
    loss = reduce_groups(grouped_mmd_reference(*own[:2], ctx.group_size, *own[2:], ctx.eps), reduction)
    grads = iter(torch.autograd.grad(loss, [t for t, need in zip(own, needs) if need], grad_out, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


def _input_grads(ctx, grad_loss, dx, dy, weight, mmd2, dmmd_db):
    """The gradients of (x, y, bandwidth, weight), x and y's already computed."""
    need_dx, need_dy, need_db, need_dw = ctx.needs_input_grad[:4]
    return (
        dx if need_dx else None,
        dy if need_dy else None,
        grad_loss * weight * dmmd_db if need_db else None,
        grad_loss * mmd2 if need_dw else None,
    )


class FusedMMD:
    """One fused backend's MMD: its custom ops `imm_kernels::mmd_{forward,backward}_<name>`,
    their fake implementations and autograd, and the forward-with-gradient path.

    The ops read `backend.mmd` when they run, so the kernels are always the record's.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

        def forward(
            x: Tensor, y: Tensor, bandwidth: Tensor, weight: Tensor, group_size: int, eps: float
        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            """-> (loss_g, S, MMD^2_g, dMMD^2_g/db): the last three are saved for the backward."""
            return backend.mmd.forward(
                as_rows(x), as_rows(y), bandwidth.contiguous(), weight.contiguous(), group_size, eps
            )

        def forward_fake(x, y, bandwidth, weight, group_size, eps):
            num_groups, rows = x.shape[0] // group_size, backend.mmd.saved_rows(group_size)
            cdtype = compute_dtype(x.dtype)
            per_group = [x.new_empty(num_groups, dtype=cdtype) for _ in range(3)]
            return per_group[0], x.new_empty((num_groups, rows, rows), dtype=cdtype), per_group[1], per_group[2]

        def backward(
            grad_loss: Tensor,
            x: Tensor,
            y: Tensor,
            sqdist: Tensor,
            bandwidth: Tensor,
            weight: Tensor,
            group_size: int,
            eps: float,
            need_dx: bool,
            need_dy: bool,
        ) -> tuple[Tensor, Tensor]:
            """-> (dx, dy) shaped like x and y; an empty tensor stands for a gradient not asked for."""
            dx, dy = backend.mmd.backward(
                grad_loss.to(sqdist.dtype),
                as_rows(x),
                as_rows(y),
                sqdist,
                bandwidth.contiguous(),
                weight.contiguous(),
                group_size,
                eps,
                need_dx,
                need_dy,
            )
            return (dx.view(x.shape) if need_dx else dx), (dy.view(y.shape) if need_dy else dy)

        def backward_fake(grad_loss, x, y, sqdist, bandwidth, weight, group_size, eps, need_dx, need_dy):
            dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty(0)
            dy = torch.empty_like(y, memory_format=torch.contiguous_format) if need_dy else y.new_empty(0)
            return dx, dy

        self.forward_op = torch.library.custom_op(f"imm_kernels::mmd_forward_{backend.name}", forward, mutates_args=())
        self.forward_op.register_fake(forward_fake)
        self.backward_op = torch.library.custom_op(
            f"imm_kernels::mmd_backward_{backend.name}", backward, mutates_args=()
        )
        self.backward_op.register_fake(backward_fake)
        self.forward_op.register_autograd(self._backward, setup_context=self._setup_context)

    def __call__(self, x, y, group_size: int, bandwidth: Tensor, weight: Tensor, eps: float, reduction: str):
        """weight_g * MMD^2_g per group, reduced as asked ("none": (G,))."""
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
        if needs_grad and self.backend.mmd.forward_with_grad is not None and not torch.compiler.is_compiling():
            return _MMDWithGrad.apply(x, y, bandwidth, weight, group_size, eps, reduction, self)
        return reduce_groups(self.forward_op(x, y, bandwidth, weight, group_size, eps)[0], reduction)

    @staticmethod
    def _setup_context(ctx, inputs, output):
        x, y, bandwidth, weight, group_size, eps = inputs
        _, sqdist, mmd2, dmmd_db = output
        ctx.mark_non_differentiable(sqdist, mmd2, dmmd_db)
        ctx.save_for_backward(x, y, sqdist, bandwidth, weight, mmd2, dmmd_db)
        ctx.group_size, ctx.eps = group_size, eps

    def _backward(self, ctx, grad_loss, *_grads_of_saved_outputs):
        if torch.is_grad_enabled():  # create_graph=True
            x, y, _, bandwidth, weight, *_ = ctx.saved_tensors
            return (*_graph_building_grads(ctx, grad_loss, "none", x, y, bandwidth, weight), None, None)
        return (*self.recomputed_grads(ctx, grad_loss, *ctx.saved_tensors), None, None)

    def recomputed_grads(self, ctx, grad_loss, x, y, sqdist, bandwidth, weight, mmd2, dmmd_db):
        """The gradients of (x, y, bandwidth, weight), dx and dy computed from x, y and the saved S."""
        need_dx, need_dy = ctx.needs_input_grad[:2]
        dx, dy = self.backward_op(grad_loss, x, y, sqdist, bandwidth, weight, ctx.group_size, ctx.eps, need_dx, need_dy)
        return _input_grads(ctx, grad_loss, dx, dy, weight, mmd2, dmmd_db)


class _MMDWithGrad(torch.autograd.Function):
    """The forward op, reduced, whose forward also computes (dx, dy) for an upstream gradient of 1.

    Eager mode only (FusedMMD never takes it while compiling), so a plain autograd
    Function: it skips the custom-op dispatch, a large share of the call at small sizes.
    """

    @staticmethod
    def forward(ctx, x, y, bandwidth, weight, group_size, eps, reduction, fused):
        need_dx, need_dy = ctx.needs_input_grad[:2]
        num_groups = bandwidth.shape[0]
        # What each group's loss receives when the reduced loss receives 1.
        ones = torch.ones((num_groups,) if reduction == "none" else (), dtype=bandwidth.dtype, device=bandwidth.device)
        expected = _per_group_grad(ones, num_groups, reduction)
        loss, sqdist, mmd2, dmmd_db, dx, dy = fused.backend.mmd.forward_with_grad(
            as_rows(x),
            as_rows(y),
            bandwidth.contiguous(),
            weight.contiguous(),
            group_size,
            eps,
            expected,
            need_dx,
            need_dy,
        )
        dx, dy = (dx.view(x.shape) if need_dx else dx), (dy.view(y.shape) if need_dy else dy)
        ctx.save_for_backward(x, y, sqdist, bandwidth, weight, mmd2, dmmd_db, dx, dy)
        ctx.group_size, ctx.eps, ctx.reduction, ctx.fused = group_size, eps, reduction, fused
        ctx.expected, ctx.grads_returned = expected, False
        return reduce_groups(loss, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        x, y, sqdist, bandwidth, weight, mmd2, dmmd_db, dx, dy = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            grads = _graph_building_grads(ctx, grad_out, ctx.reduction, x, y, bandwidth, weight)
            return (*grads, None, None, None, None)
        num_groups = bandwidth.shape[0]
        fused = ctx.fused
        refresh_grad = fused.backend.mmd.refresh_grad
        if refresh_grad is not None:
            grad_loss = _per_group_grad(grad_out, num_groups, ctx.reduction)
            if ctx.grads_returned:  # a second backward (retain_graph): never overwrite what the first returned
                grads = fused.recomputed_grads(ctx, grad_loss, x, y, sqdist, bandwidth, weight, mmd2, dmmd_db)
            else:
                refresh_grad(
                    grad_loss.to(sqdist.dtype),
                    ctx.expected,
                    as_rows(x),
                    as_rows(y),
                    sqdist,
                    bandwidth,
                    weight,
                    ctx.group_size,
                    ctx.eps,
                    _flat(dx),
                    _flat(dy),
                )
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
            grads = fused.recomputed_grads(ctx, grad_loss, x, y, sqdist, bandwidth, weight, mmd2, dmmd_db)
        return (*grads, None, None, None, None)


# The custom ops of every fused backend this installation has (registered once, at import).
_FUSED = {backend: FusedMMD(backend) for backend in (TRITON, NATIVE, CUDA) if backend.mmd is not None}
