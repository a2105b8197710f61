"""Which backends exist here, and the one place that picks one for a call.

- ``torch``:  the readable PyTorch reference (always available).
- ``triton``: fused Triton kernels; CUDA tensors, or CPU tensors when Triton's
  interpreter is on (``TRITON_INTERPRET=1`` before import: how CI tests them).
- ``native``: the C++ extension ``imm_kernels._C`` on CPU tensors
  (at::parallel_for, bitwise the same for any thread count).
- ``cuda``:   the CUDA C++ kernels of ``imm_kernels._C`` (group_size <= 8), built
  when the package was compiled against a CUDA build of torch.
- ``auto``:   CUDA tensors: triton (group_size <= 32), else cuda, else torch;
  CPU tensors: native, else torch.

The fused backends share one custom op and autograd formula (`ops/mmd.py`);
this module registers their kernels with it. The choice is made before any
autograd node is recorded, so forward and backward run on the same backend.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from .ops.mmd import MMDKernels, grouped_mmd, register_kernels, stacked_rows
from .ops.reference import grouped_mmd_reference

BACKEND_NAMES = ("auto", "triton", "native", "cuda", "torch")

try:
    from .ops import mmd_triton as _triton_mmd

    _TRITON_MISSING = None
    register_kernels("triton", _triton_mmd.KERNELS)
except ImportError as err:  # e.g. a platform without Triton wheels
    _triton_mmd = None
    _TRITON_MISSING = f"triton could not be imported ({err})"


def _load_native():
    """(the _C module, None) or (None, why it cannot be used)."""
    try:
        from . import _C
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


_C, _NATIVE_MISSING = _load_native()
if _C is not None:
    register_kernels(
        "native", MMDKernels(_C.mmd_forward_cpu, _C.mmd_backward_cpu, stacked_rows, _C.mmd_forward_with_grad_cpu)
    )
    if _C.cuda_built:
        register_kernels("cuda", MMDKernels(_C.mmd_forward_cuda, _C.mmd_backward_cuda, stacked_rows))
        CUDA_MAX_GROUP_SIZE = _C.cuda_max_group_size


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def _cuda_build_reason() -> str | None:
    if _NATIVE_MISSING is not None:
        return _NATIVE_MISSING
    if not _C.cuda_built:
        return "imm_kernels._C was built without CUDA (it needs a CUDA build of torch and a CUDA toolkit at build time)"
    return None


def empty_native_cache() -> int:
    """Frees the memory the native backend keeps for large gradients; returns the bytes freed.

    Native gradients of 1 MiB or more come from blocks kept between calls (at most
    4 freed blocks, 1 GiB), so that a training loop does not fault in fresh pages
    for every dx. Like torch.cuda.empty_cache, this returns only memory no tensor uses.
    """
    return 0 if _C is None else _C.release_cached_gradients_cpu()


def backends() -> dict[str, str | None]:
    """Each concrete backend mapped to None when usable here, else the reason it is not."""
    no_device = None if torch.cuda.is_available() else "no CUDA device"
    if _TRITON_MISSING is not None:
        triton_reason = _TRITON_MISSING
    elif _triton_mmd.INTERPRETING:
        triton_reason = None
    else:
        triton_reason = no_device and f"{no_device} (set TRITON_INTERPRET=1 before import to run kernels on the CPU)"
    return {
        "triton": triton_reason,
        "native": _NATIVE_MISSING,
        "cuda": _cuda_build_reason() or no_device,
        "torch": None,
    }


GroupedMMD = Callable[[Tensor, Tensor, int, Tensor, Tensor, float], Tensor]


def _triton_reason(x: Tensor, group_size: int) -> str | None:
    """Why the Triton backend cannot take this call, or None when it can."""
    if _TRITON_MISSING is not None:
        return _TRITON_MISSING
    if x.device.type != "cuda" and not (x.device.type == "cpu" and _triton_mmd.INTERPRETING):
        return f"it needs CUDA tensors (got {x.device}; set TRITON_INTERPRET=1 before import for the CPU)"
    if group_size > _triton_mmd.MAX_GROUP_SIZE:
        return f"group_size={group_size} exceeds its limit of {_triton_mmd.MAX_GROUP_SIZE}"
    return None


def _native_reason(x: Tensor) -> str | None:
    if _NATIVE_MISSING is not None:
        return _NATIVE_MISSING
    if x.device.type != "cpu":
        return f"it runs on CPU tensors (got {x.device}; backend='cuda' is its CUDA counterpart)"
    return None


def _cuda_reason(x: Tensor, group_size: int) -> str | None:
    reason = _cuda_build_reason()
    if reason is not None:
        return reason
    if x.device.type != "cuda":
        return f"it needs CUDA tensors (got {x.device})"
    if group_size > CUDA_MAX_GROUP_SIZE:
        return f"group_size={group_size} exceeds its limit of {CUDA_MAX_GROUP_SIZE}"
    return None


_REASONS = {
    "triton": _triton_reason,
    "native": lambda x, group_size: _native_reason(x),
    "cuda": _cuda_reason,
}


def _fused(backend: str) -> GroupedMMD:
    return functools.partial(grouped_mmd, backend=backend)


def resolve_mmd_backend(backend: str, x: Tensor, group_size: int) -> tuple[str, GroupedMMD]:
    """(name, per-group MMD function) for `backend` on tensors like `x`."""
    if backend == "torch":
        return "torch", grouped_mmd_reference
    if backend != "auto":
        reason = _REASONS[backend](x, group_size)
        if reason is not None:
            raise BackendUnavailableError(f"backend={backend!r} is not available: {reason}")
        return backend, _fused(backend)
    # auto: the fastest backend that can take this call.
    candidates = ("triton", "cuda") if x.device.type == "cuda" else ("native",)
    for name in candidates:
        if _REASONS[name](x, group_size) is None:
            return name, _fused(name)
    return "torch", grouped_mmd_reference
