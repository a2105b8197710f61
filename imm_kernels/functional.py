"""Public functional API: argument checks, then one dispatch to a backend."""

from __future__ import annotations

from numbers import Integral, Real

import torch
from torch import Tensor

from .backends import BACKEND_NAMES, resolve_mmd_backend
from .ops.reference import as_per_group, compute_dtype, reduce_groups

REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_per_group(value, name: str, num_groups: int, device: torch.device, *, non_negative: bool) -> None:
    """A float, or a floating 0-dim / (G,) tensor on x's device.

    Only Python numbers have their sign checked: reading a tensor's values would
    sync with the device (and break CUDA-graph capture).
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
        if non_negative and value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")
    else:
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")


def _check_mmd_args(x, y, group_size, bandwidth, weight, eps, reduction, backend) -> int:
    """Raises TypeError/ValueError naming the bad argument; returns the number of groups."""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
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
    if not isinstance(eps, Real) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    return num_groups


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
        backend: "auto", "triton", "native" or "torch" (see `imm_kernels.backends()`).

    Returns:
        weight_g * MMD^2_g reduced as asked, in float32 (float64 for float64 inputs),
        differentiable in x, y, bandwidth and weight.
    """
    num_groups = _check_mmd_args(x, y, group_size, bandwidth, weight, eps, reduction, backend)
    name, grouped_mmd = resolve_mmd_backend(backend, x, group_size)
    cdtype = compute_dtype(x.dtype)
    bandwidth = as_per_group(bandwidth, num_groups, cdtype, x.device)
    weight = as_per_group(1.0 if weight is None else weight, num_groups, cdtype, x.device)
    if name == "torch":
        return reduce_groups(grouped_mmd(x, y, int(group_size), bandwidth, weight, float(eps)), reduction)
    # Fused backends reduce themselves, and may compute dx up front for what `loss.backward()` sends.
    return grouped_mmd(x, y, int(group_size), bandwidth, weight, float(eps), reduction=reduction)
