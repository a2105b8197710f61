"""The backends, one record each, and the one place that picks one for a call.

- ``torch``:  the readable PyTorch references (always available).
- ``triton``: fused Triton kernels; CUDA tensors, or CPU tensors when Triton's
  interpreter is on (``TRITON_INTERPRET=1`` before import: how CI tests them).
- ``native``: the C++ extension ``imm_kernels._C`` on CPU tensors
  (at::parallel_for, bitwise the same for any thread count). MMD only.
- ``cuda``:   the CUDA C++ kernels of ``imm_kernels._C`` (group_size <= 8), built
  when the package was compiled against a CUDA build of torch. MMD only.

Each op names the backends it offers and which ``auto`` tries first per device
(MMD: triton then cuda on CUDA tensors, native on CPU tensors; the adaLN and
timestep ops: triton), falling back to ``torch``. The choice is made before any
autograd node is recorded, so forward and backward run on the same backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import NamedTuple

import torch

from .utils import FLOAT_DTYPES, INTERPRETING, TRITON_MISSING, BackendUnavailableError


class MMDKernels(NamedTuple):
    """A backend's MMD kernels; they take (B, D) row views with unit column stride.

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


@dataclass(eq=False)
class Backend:
    """One backend: where it runs, what it takes, why it cannot run here, its MMD kernels."""

    name: str
    devices: tuple[str, ...]  # the device types whose tensors it takes
    wrong_device: str  # why it refuses a tensor on another device ({device} filled in)
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    max_group_size: int | None = None  # the largest MMD group it takes
    missing: str | None = None  # why this installation cannot run it at all
    mmd: MMDKernels | None = None  # None: the PyTorch reference

    def unavailable(
        self, device: torch.device, *, dtype: torch.dtype | None = None, group_size: int | None = None
    ) -> str | None:
        """Why this backend cannot take a call on `device` (with inputs of `dtype`, MMD groups of
        `group_size`, where given), or None when it can."""
        if self.missing is not None:
            return self.missing
        if device.type not in self.devices:
            return self.wrong_device.format(device=device)
        if dtype is not None and dtype not in self.dtypes:
            return f"it does not take {dtype}"
        if group_size is not None and self.max_group_size is not None and group_size > self.max_group_size:
            return f"group_size={group_size} exceeds its limit of {self.max_group_size}"
        return None


def _load_native():
    """(the _C module, None) or (None, why it cannot be used)."""
    try:  # by its full name: `from .. import _C` would blame a circular import when it is missing
        _C = import_module("imm_kernels._C")
    except ImportError as err:
        return None, (
            f"the C++ extension imm_kernels._C is not built or does not load ({err}); "
            "`pip install --no-build-isolation -e .` builds it"
        )
    running = ".".join(torch.__version__.split(".")[:2])
    if _C.torch_version != running:
        return None, (
            f"imm_kernels._C was built against torch {_C.torch_version} but torch {running} is running; "
            "rebuild with `pip install --no-build-isolation -e .`"
        )
    return _C, None


def _triton_mmd() -> MMDKernels | None:
    if TRITON_MISSING is not None:
        return None
    from . import mmd_triton

    return MMDKernels(
        mmd_triton.mmd_forward_triton,
        mmd_triton.mmd_backward_triton,
        mmd_triton.saved_rows,
        mmd_triton.mmd_forward_with_grad_triton,
        mmd_triton.mmd_refresh_grad_triton,
    )


def stacked_rows(group_size: int) -> int:
    """2M: the side of S for backends that save it unpadded."""
    return 2 * group_size


_C, _NATIVE_MISSING = _load_native()
_CUDA_MISSING = _NATIVE_MISSING or (
    None
    if _C.cuda_built
    else ("imm_kernels._C was built without CUDA (it needs a CUDA build of torch and a CUDA toolkit at build time)")
)

TORCH = Backend("torch", ("cpu", "cuda"), "")
TRITON = Backend(
    "triton",
    ("cuda", "cpu") if INTERPRETING else ("cuda",),
    "it needs CUDA tensors (got {device}; set TRITON_INTERPRET=1 before import for the CPU)",
    max_group_size=32,
    missing=TRITON_MISSING,
    mmd=_triton_mmd(),
)
NATIVE = Backend(
    "native",
    ("cpu",),
    "it runs on CPU tensors (got {device}; backend='cuda' is its CUDA counterpart)",
    missing=_NATIVE_MISSING,
    mmd=None
    if _C is None
    else MMDKernels(_C.mmd_forward_cpu, _C.mmd_backward_cpu, stacked_rows, _C.mmd_forward_with_grad_cpu),
)
CUDA = Backend(
    "cuda",
    ("cuda",),
    "it needs CUDA tensors (got {device})",
    max_group_size=_C.cuda_max_group_size if _CUDA_MISSING is None else None,
    missing=_CUDA_MISSING,
    mmd=None if _CUDA_MISSING else MMDKernels(_C.mmd_forward_cuda, _C.mmd_backward_cuda, stacked_rows),
)
BACKENDS = {backend.name: backend for backend in (TRITON, NATIVE, CUDA, TORCH)}
BACKEND_NAMES = ("auto", *BACKENDS)  # what the MMD op takes
TRITON_BACKEND_NAMES = ("auto", "triton", "torch")  # what the adaLN and timestep ops take
# What "auto" tries first, per device type, for each family of ops (then torch).
MMD_AUTO = {"cuda": (TRITON, CUDA), "cpu": (NATIVE,)}
TRITON_AUTO = {"cuda": (TRITON,), "cpu": (TRITON,)}


def choose_backend(
    backend: str,
    device: torch.device,
    auto: dict[str, tuple[Backend, ...]],
    *,
    dtype: torch.dtype | None = None,
    group_size: int | None = None,
    limit: str | None = None,
) -> Backend:
    """The backend that runs a call on `device`: `backend` itself, or for "auto" the first of
    auto[device type] that can take the call, else torch.

    limit: why the op's own kernels cannot take this call (e.g. a row too wide), or None.
    Raises BackendUnavailableError when an explicitly named backend cannot take it.
    """
    if backend == "torch":
        return TORCH
    if backend != "auto":
        chosen = BACKENDS[backend]
        reason = chosen.unavailable(device, dtype=dtype, group_size=group_size) or limit
        if reason is not None:
            raise BackendUnavailableError(f"backend={backend!r} is not available: {reason}")
        return chosen
    if limit is None:
        for candidate in auto.get(device.type, ()):
            if candidate.unavailable(device, dtype=dtype, group_size=group_size) is None:
                return candidate
    return TORCH


def backends() -> dict[str, str | None]:
    """Each concrete backend mapped to None when usable here, else the reason it is not."""
    no_device = None if torch.cuda.is_available() else "no CUDA device"
    triton_reason = TRITON.missing
    if triton_reason is None and not INTERPRETING and no_device:
        triton_reason = f"{no_device} (set TRITON_INTERPRET=1 before import to run kernels on the CPU)"
    return {"triton": triton_reason, "native": NATIVE.missing, "cuda": CUDA.missing or no_device, "torch": None}


def empty_native_cache() -> int:
    """Frees the memory the native backend keeps for large gradients; returns the bytes freed.

    Native gradients of 1 MiB or more come from blocks kept between calls (at most
    4 freed blocks, 1 GiB), so that a training loop does not fault in fresh pages
    for every dx. Like torch.cuda.empty_cache, this returns only memory no tensor uses.
    """
    return 0 if _C is None else _C.release_cached_gradients_cpu()
