"""What the single-backend Triton ops (adaLN, timestep embedding) share: the guarded
Triton import and the choice between Triton and the reference for one call.
"""

from __future__ import annotations

import os

import torch

from ..backends import BackendUnavailableError

try:
    import triton
    import triton.language as tl

    TRITON_MISSING = None
except ImportError as err:  # a platform without Triton wheels: every call takes the reference
    triton = tl = None
    TRITON_MISSING = f"triton could not be imported ({err})"

# Triton decides at decoration time whether kernels run in its CPU interpreter.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
BACKENDS = ("auto", "triton", "torch")


def jit(fn):
    """triton.jit, or the plain function where Triton is missing (then it is never launched)."""
    return fn if triton is None else triton.jit(fn)


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def device_unavailable(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on `device`, or None when they can."""
    if TRITON_MISSING is not None:
        return TRITON_MISSING
    if device.type != "cuda" and not (device.type == "cpu" and INTERPRETING):
        return f"it needs CUDA tensors (got {device}; set TRITON_INTERPRET=1 before import for the CPU)"
    return None


def use_triton(backend: str, reason: str | None) -> bool:
    """True for Triton, False for the reference. `reason` says why Triton cannot take the
    call (None when it can): 'auto' then falls back, 'triton' raises BackendUnavailableError."""
    if backend == "torch":
        return False
    if backend == "triton" and reason is not None:
        raise BackendUnavailableError(f"backend='triton' is not available: {reason}")
    return reason is None
