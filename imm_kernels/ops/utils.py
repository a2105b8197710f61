"""What the ops share: dtype rules, per-group arguments and reductions, the guarded
Triton import, and how many programs fill a GPU."""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    TRITON_MISSING = None
except ImportError as err:  # a platform without Triton wheels: every call takes the reference
    triton = tl = None
    TRITON_MISSING = f"triton could not be imported ({err})"

# Triton decides at decoration time whether kernels run in its CPU interpreter.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def jit(fn):
    """triton.jit, or the plain function where Triton is missing (then it is never launched)."""
    return fn if triton is None else triton.jit(fn)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


# ----------------------------------------------------------------------------
# Dtypes, per-group arguments, reductions
# ----------------------------------------------------------------------------


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_per_group(value, num_groups: int, dtype: torch.dtype, device) -> Tensor:
    """A float or a 0-dim / (G,) tensor as a (G,) tensor of `dtype`, keeping autograd."""
    if isinstance(value, Tensor):
        if value.dtype == dtype and value.shape == (num_groups,) and value.device == device:
            return value  # already so: skip two dispatches, a visible share of a small call
        return value.to(device=device, dtype=dtype).expand(num_groups)
    return torch.full((num_groups,), float(value), dtype=dtype, device=device)


def reduce_groups(per_group: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_group.mean()
    if reduction == "sum":
        return per_group.sum()
    return per_group


def as_rows(t: Tensor) -> Tensor:
    """(B, *feature) -> (B, D) with unit column stride; a view whenever possible.

    Any row stride works (chunked views, stride-0 expanded rows); only a
    non-unit stride inside a sample forces a copy.
    """
    rows = t if t.dim() == 2 else t.reshape(t.shape[0], -1)
    return rows if rows.stride(1) == 1 or rows.shape[1] == 1 else rows.contiguous()


# ----------------------------------------------------------------------------
# Grid sizing: how many programs of a compiled Triton kernel fill the GPU
# ----------------------------------------------------------------------------

# In the interpreter: few, so that CPU tests exercise the paths for few programs (split D, partial sums).
INTERPRETER_PROGRAMS = 4
# Programs the GPU holds at once, per (device, kernel variant): from the compiled kernel.
_RESIDENT_PROGRAMS: dict[tuple, int] = {}


def programs_on(device: torch.device, programs_per_sm: int) -> int:
    """programs_per_sm on every SM of the device (INTERPRETER_PROGRAMS off CUDA)."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return programs_per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def programs_per_sm(compiled, num_warps: int, props) -> int:
    """Occupancy of a compiled kernel: its blocks resident per SM (registers, threads, shared memory)."""
    compiled._init_handles()  # loads the binary, which sets n_regs
    registers_per_warp = -(-max(compiled.n_regs, 1) * 32 // 256) * 256  # allocated in units of 256
    by_registers = getattr(props, "regs_per_multiprocessor", 65536) // registers_per_warp // num_warps
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * num_warps)
    # Each block also takes 1 KiB of shared memory reserved by the system (sm_80 and later).
    by_shared = getattr(props, "shared_memory_per_multiprocessor", 233472) // (compiled.metadata.shared + 1024)
    return max(1, min(by_registers, by_threads, by_shared))


def resident_programs(kernel, device: torch.device, args: tuple, constexprs: dict, num_warps: int) -> int:
    """How many programs of `kernel`, launched with these arguments, fill the device once.

    On CUDA it compiles the kernel (without launching) and reads its occupancy.
    """
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    key = (device.index, kernel.fn.__name__, args[0].dtype, num_warps, tuple(sorted(constexprs.items())))
    if key not in _RESIDENT_PROGRAMS:
        compiled = kernel.warmup(*args, grid=(1,), num_warps=num_warps, **constexprs)
        props = torch.cuda.get_device_properties(device)
        _RESIDENT_PROGRAMS[key] = props.multi_processor_count * programs_per_sm(compiled, num_warps, props)
    return _RESIDENT_PROGRAMS[key]
