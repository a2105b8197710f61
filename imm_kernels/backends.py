"""Which backends exist here, and the one place that picks one for a call.

- ``torch``:  the readable PyTorch reference (always available).
- ``triton``: fused Triton kernels; CUDA tensors, or CPU tensors when Triton's
  interpreter is on (``TRITON_INTERPRET=1`` before import: how CI tests them).
- ``native``: the C++ extension ``imm_kernels._C`` (CPU). Not part of the build
  yet: requesting it raises `BackendUnavailableError` saying so.
- ``auto``:   triton for CUDA tensors (group_size <= 32), else torch; once the
  native backend exists, it takes CPU tensors here.

The choice is made before any autograd node is recorded, so forward and
backward always run on the same backend.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .ops.reference import grouped_mmd_reference

BACKEND_NAMES = ("auto", "triton", "native", "torch")

try:
    from .ops import mmd as _triton_mmd

    _TRITON_MISSING = None
except ImportError as err:  # e.g. a platform without Triton wheels
    _triton_mmd = None
    _TRITON_MISSING = f"triton could not be imported ({err})"

_NATIVE_MISSING = "the C++ extension imm_kernels._C is not part of this build yet"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def backends() -> dict[str, str | None]:
    """Each concrete backend mapped to None when usable here, else the reason it is not."""
    if _TRITON_MISSING is not None:
        triton_reason = _TRITON_MISSING
    elif _triton_mmd.INTERPRETING:
        triton_reason = None
    else:
        import torch

        triton_reason = None if torch.cuda.is_available() else (
            "no CUDA device (set TRITON_INTERPRET=1 before import to run kernels on the CPU)"
        )
    return {"triton": triton_reason, "native": _NATIVE_MISSING, "torch": None}


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


def resolve_mmd_backend(backend: str, x: Tensor, group_size: int) -> tuple[str, GroupedMMD]:
    """(name, per-group MMD function) for `backend` on tensors like `x`."""
    if backend == "torch":
        return "torch", grouped_mmd_reference
    if backend == "triton":
        reason = _triton_reason(x, group_size)
        if reason is not None:
            raise BackendUnavailableError(f"backend='triton' is not available: {reason}")
        return "triton", _triton_mmd.grouped_mmd_triton
    if backend == "native":
        raise BackendUnavailableError(f"backend='native' is not available: {_NATIVE_MISSING}")
    # auto: the fastest backend that can take this call.
    if x.device.type == "cuda" and _triton_reason(x, group_size) is None:
        return "triton", _triton_mmd.grouped_mmd_triton
    return "torch", grouped_mmd_reference
