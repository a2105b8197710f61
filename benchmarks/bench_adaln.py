"""Fused adaLN against its PyTorch references: `pytest benchmarks/ --benchmark-only`.

Ops: `modulate` (LayerNorm without affine, then * (1 + scale) + shift) and
`residual` (x_new = x + gate * y first, returning h and x_new), at DiT-XL's
width H = 1152 and L = 256 tokens, forward and forward+backward (gradients
for every input, the modulation as chunk(6) views of one (N, 6H) tensor, the
output gradients given: no reduction is timed).

Providers: `eager` (the reference), `compiled` (torch.compile of it) and
`imm_kernels[triton]` (GPU only: Triton's CPU interpreter is not timed).
On a CPU only one small case runs (N = 8, fp32, eager and compiled), so that
`pytest benchmarks/` stays minutes long; its peak memory is not measured.
Rows go to the table "adaln" (bench-out/adaln.{json,md}).
"""

from __future__ import annotations

import gc
import itertools
from dataclasses import dataclass

import pytest
import torch

from imm_kernels.ops.adaln import adaln_modulate, adaln_residual_modulate
from imm_kernels.ops.reference import adaln_modulate_reference, adaln_residual_modulate_reference

from timing import ON_CUDA, cuda_peak_memory_mib, device_time_ms

DEVICE = "cuda" if ON_CUDA else "cpu"

OPS = ("modulate", "residual")
MODES = ("forward", "forward+backward")
PROVIDERS = ("eager", "compiled", "imm_kernels[triton]")
SEQ_LEN, HIDDEN = 256, 1152
FLOOR_NOTE = (
    "floor bytes x N*L*H*itemsize: modulate fwd 2 (x, h), fwd+bwd 5 (+ x, dh, dx); "
    "residual fwd 4 (x, y, h, x_new), fwd+bwd 10 (+ x_new, y, dh, dx_new, dx, dy); + the (N, H) vectors"
)


@dataclass(frozen=True)
class Case:
    op: str
    batch: int
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def shape(self) -> str:
        return f"{self.op} {self.batch}x{SEQ_LEN}x{HIDDEN}"

    def floor_bytes(self, mode: str) -> int:
        """What any implementation must move (see FLOOR_NOTE); the modulation vectors count once each way."""
        rows = {
            ("modulate", "forward"): 2,
            ("modulate", "forward+backward"): 5,
            ("residual", "forward"): 4,
            ("residual", "forward+backward"): 10,
        }[self.op, mode]
        vectors = 2 if self.op == "modulate" else 3
        per_vector_passes = 1 if mode == "forward" else 3  # read; backward reads scale/gate again and writes grads
        itemsize = self.torch_dtype.itemsize
        return (rows * self.batch * SEQ_LEN + vectors * per_vector_passes * self.batch) * HIDDEN * itemsize


CUDA_CASES = [Case(op, n, dtype) for op, n, dtype in itertools.product(OPS, (1, 8, 64, 256), ("bfloat16", "float32"))]
CPU_CASES = [Case(op, 8, "float32") for op in OPS]
CASES = CUDA_CASES if ON_CUDA else CPU_CASES


def make_inputs(case: Case, mode: str):
    """x, y, the (N, 6H) modulation, and the output gradients for the backward."""
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    like = dict(generator=generator, device=DEVICE, dtype=case.torch_dtype)
    needs_grad = mode != "forward"
    x = torch.randn(case.batch, SEQ_LEN, HIDDEN, **like).requires_grad_(needs_grad)
    y = torch.randn(case.batch, SEQ_LEN, HIDDEN, **like).requires_grad_(needs_grad)
    modulation = (0.1 * torch.randn(case.batch, 6 * HIDDEN, **like)).requires_grad_(needs_grad)
    outputs = 1 if case.op == "modulate" else 2
    grads = tuple(torch.randn(case.batch, SEQ_LEN, HIDDEN, **like) for _ in range(outputs))
    return x, y, modulation, grads


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def op_function(case: Case, provider: str):
    """f(x, y, modulation) -> tuple of outputs, as the provider computes it."""
    if provider == "imm_kernels[triton]":
        modulate = lambda x, shift, scale: adaln_modulate(x, shift, scale, backend="triton")  # noqa: E731
        residual = lambda *args: adaln_residual_modulate(*args, backend="triton")  # noqa: E731
    else:
        modulate, residual = adaln_modulate_reference, adaln_residual_modulate_reference

    def function(x, y, modulation):
        shift, scale, gate, *_ = modulation.chunk(6, dim=1)
        if case.op == "modulate":
            return _as_tuple(modulate(x, shift, scale))
        return _as_tuple(residual(x, y, gate, shift, scale))

    if provider == "compiled":
        # Dynamo keeps graphs per code object: reset so each case gets its own static-shape compilation.
        torch.compiler.reset()
        return torch.compile(function, dynamic=False)
    return function


def make_step(case: Case, provider: str, mode: str, x, y, modulation, grads):
    function = op_function(case, provider)
    if mode == "forward":
        return lambda: function(x, y, modulation)
    inputs = (x, modulation) if case.op == "modulate" else (x, y, modulation)
    return lambda: torch.autograd.grad(function(x, y, modulation), inputs, grads)


@pytest.mark.parametrize(
    "case,mode,provider",
    [
        pytest.param(case, mode, provider, id=f"{case.op}-{case.batch}-{case.dtype}-{mode}-{provider}")
        for case, mode, provider in itertools.product(CASES, MODES, PROVIDERS)
    ],
)
def test_adaln(benchmark, copy_bandwidth_gbps, record_result, case, mode, provider):
    if not benchmark.enabled:
        pytest.skip("pytest-benchmark is disabled")
    if provider.startswith("imm_kernels") and not ON_CUDA:
        pytest.skip("the Triton kernels are timed on a GPU only (the CPU interpreter is not timed)")
    x, y, modulation, grads = make_inputs(case, mode)
    info = benchmark.extra_info
    info.update(
        op="adaln",
        shape_label="op NxLxH",
        floor_note=FLOOR_NOTE,
        provider=provider,
        backend={"eager": "torch", "compiled": "inductor"}.get(provider, "triton"),
        shape=case.shape,
        dtype=case.dtype,
        mode=mode,
        floor_bytes=case.floor_bytes(mode),
    )
    benchmark.group = f"{case.shape} {case.dtype} {mode}"
    step = make_step(case, provider, mode, x, y, modulation, grads)
    step()  # compilation, first-launch JIT: not timed
    if ON_CUDA:
        torch.cuda.synchronize()
        peak_mib, peak_note = cuda_peak_memory_mib(step), None
    else:
        peak_mib, peak_note = None, "CPU peak memory not measured"
    ms = device_time_ms(benchmark, step)
    gbps = case.floor_bytes(mode) / (ms * 1e-3) / 1e9
    info.update(
        status="ok",
        device_ms=ms,
        gbps=gbps,
        pct_copy_bw=100 * gbps / copy_bandwidth_gbps,
        peak_mem_mib=peak_mib,
        **({"peak_mem_note": peak_note} if peak_note else {}),
    )
    record_result(dict(info))
    del step
    gc.collect()
