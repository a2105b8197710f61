"""timestep_embedding against its PyTorch reference: `pytest benchmarks/ --benchmark-only`.

The (N, dim) sinusoidal embedding of the DiT's time embedders, forward only
(times are not learned), at dim = 256 (the DiT's frequency size) and
N in {1, 64, 256, 4096}. Providers: `eager` (the float64 reference),
`compiled` (torch.compile of it), `dit_fp32` (DiT's own float32 formula,
less accurate: the baseline a user replaces) and `imm_kernels[triton]`
(GPU only: Triton's CPU interpreter is not timed). On a CPU only N = 256 runs.
Rows go to the table "timestep" (bench-out/timestep.{json,md}).
"""

from __future__ import annotations

import math

import pytest
import torch

from imm_kernels.ops.reference import timestep_embedding_reference
from imm_kernels.ops.timestep import timestep_embedding

from timing import ON_CUDA, device_time_ms

DEVICE = "cuda" if ON_CUDA else "cpu"
DIM = 256
BATCHES = (1, 64, 256, 4096) if ON_CUDA else (256,)
PROVIDERS = ("eager", "compiled", "dit_fp32", "imm_kernels[triton]")
FLOOR_NOTE = "floor bytes: read t (N x 4), write the (N, dim) float32 embedding"


def dit_fp32_embedding(t, dim, max_period=10000):
    """DiT's formula, all in float32 (cos half, then sin half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def embedding_function(provider: str):
    if provider == "imm_kernels[triton]":
        return lambda t: timestep_embedding(t, DIM, backend="triton")
    if provider == "dit_fp32":
        return lambda t: dit_fp32_embedding(t, DIM)
    if provider == "compiled":
        torch.compiler.reset()  # one static-shape compilation per case
        return torch.compile(lambda t: timestep_embedding_reference(t, DIM), dynamic=False)
    return lambda t: timestep_embedding_reference(t, DIM)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_timestep_embedding(benchmark, copy_bandwidth_gbps, record_result, batch, provider):
    if not benchmark.enabled:
        pytest.skip("pytest-benchmark is disabled")
    if provider.startswith("imm_kernels") and not ON_CUDA:
        pytest.skip("the Triton kernels are timed on a GPU only (the CPU interpreter is not timed)")
    t = 1000 * torch.rand(batch, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    floor_bytes = batch * 4 + batch * DIM * 4
    info = benchmark.extra_info
    info.update(
        op="timestep",
        shape_label="NxDIM",
        floor_note=FLOOR_NOTE,
        provider=provider,
        backend={"eager": "torch", "compiled": "inductor", "dit_fp32": "torch"}.get(provider, "triton"),
        shape=f"{batch}x{DIM}",
        dtype="float32",
        mode="forward",
        floor_bytes=floor_bytes,
        peak_mem_mib=None,
    )
    benchmark.group = f"{batch}x{DIM}"
    function = embedding_function(provider)
    step = lambda: function(t)  # noqa: E731
    step()  # compilation, first-launch JIT: not timed
    ms = device_time_ms(benchmark, step)
    gbps = floor_bytes / (ms * 1e-3) / 1e9
    info.update(status="ok", device_ms=ms, gbps=gbps, pct_copy_bw=100 * gbps / copy_bandwidth_gbps)
    record_result(dict(info))
