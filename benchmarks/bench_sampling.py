"""Latency of one few-step sampling call: `pytest benchmarks/bench_sampling.py --benchmark-only` (GPU only).

DiT-S/2 and DiT-XL/2 on 32×32×4 latents with random weights (stored in bf16; set
IMM_BENCH_SAMPLING_PRECISION=bf16-autocast for float32 weights under autocast), at
batch 1/4/16/64 × steps 1/2/4/8, guidance off and on (w = 1.5, one 2B batch per step).
Providers, all on the same inputs: `eager` (imm_kernels.sampling.pushforward),
`compiled` (torch.compile(mode="reduce-overhead") of the same loop) and
`imm_kernels[graphed]` (GraphedSampler: the whole loop as one CUDA graph). A row's
time is the median wall time of a call, launch to synchronised result, timed
round-robin. The graphed row's note gives the GPU busy fraction: the summed kernel
and copy time of one call (torch.profiler) over its wall time.

torch.compile recompiles every case (minutes each for DiT-XL/2 at 8 steps), so by
default it runs at batch 1 (the launch-bound regime where it competes with CUDA graphs)
and steps 1 and 8; IMM_BENCH_SAMPLING_COMPILE=all compiles every case, =none none.
On a CPU every case skips: the CUDA graph is the point (`imm-kernels bench-sampling`
times a tiny model on a CPU).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from timing import ON_CUDA, cuda_peak_memory_mib

MODELS = ("dit-s2", "dit-xl2")
BATCHES = (1, 4, 16, 64)
STEPS = (1, 2, 4, 8)
CFG_SCALE = 1.5
REPEATS = 5
COMPILE = os.environ.get("IMM_BENCH_SAMPLING_COMPILE", "default")
PRECISION = os.environ.get("IMM_BENCH_SAMPLING_PRECISION", "bf16")
PROVIDER_LABELS = {
    "eager": "eager",
    "torch.compile(reduce-overhead)": "compiled",
    "GraphedSampler": "imm_kernels[graphed]",
}

pytestmark = pytest.mark.skipif(
    not ON_CUDA, reason="sampling latency is a GPU benchmark (CUDA graphs); on a CPU run `imm-kernels bench-sampling`"
)


@functools.lru_cache(maxsize=1)
def cached_net(model: str):
    """One model at a time on the GPU (DiT-XL/2 is 675M parameters)."""
    from imm_kernels.sampling.latency import bench_net

    torch.cuda.empty_cache()
    return bench_net(model, "cuda", PRECISION)


def compiles(batch: int, steps: int) -> bool:
    if COMPILE == "all":
        return True
    return COMPILE != "none" and batch == 1 and steps in (1, 8)


@pytest.mark.parametrize("guided", [False, True], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("model", MODELS)
def test_sampling_latency(benchmark, record_result, model, batch, steps, guided):
    from imm_kernels.sampling import time_grid
    from imm_kernels.sampling.latency import (
        interleaved_medians_ms,
        kernel_time_ms,
        sampling_inputs,
        sampling_providers,
    )

    net, sample_shape = cached_net(model)
    cfg_scale = CFG_SCALE if guided else None
    noise, labels = sampling_inputs(net, batch, sample_shape, cfg_scale)
    times = time_grid("uniform", steps, net.T, net.eps).tolist()
    providers = ("eager", "GraphedSampler") + (("torch.compile(reduce-overhead)",) if compiles(batch, steps) else ())
    try:
        calls = sampling_providers(net, noise, labels, times, cfg_scale, providers)
        medians = interleaved_medians_ms(calls, REPEATS)
    except torch.cuda.OutOfMemoryError as err:
        pytest.skip(f"out of memory: {str(err).splitlines()[0]}")
    busy = kernel_time_ms(calls["GraphedSampler"]) / medians["GraphedSampler"]

    def graphed_call():
        calls["GraphedSampler"]()
        torch.cuda.synchronize()

    benchmark.pedantic(graphed_call, rounds=REPEATS, iterations=1, warmup_rounds=1)
    case = f"{model} B={batch} N={steps}"
    mode = f"cfg {CFG_SCALE}" if guided else "no cfg"
    for provider, call in calls.items():
        row = {
            "op": "sampling",
            "shape_label": "model B= N=",
            "floor_note": "no byte floor (latency)",
            "shape": case,
            "dtype": PRECISION,
            "mode": mode,
            "provider": PROVIDER_LABELS[provider],
            "device_ms": medians[provider],
            "gbps": None,
            "pct_copy_bw": None,
            "peak_mem_mib": cuda_peak_memory_mib(call),
            "status": "ok",
        }
        if provider == "GraphedSampler":
            row["peak_mem_note"] = f"GPU busy {100 * busy:.0f}% of the call"
        record_result(row)
    benchmark.extra_info.update({f"{PROVIDER_LABELS[p]}_ms": ms for p, ms in medians.items()})
    benchmark.extra_info["gpu_busy_fraction"] = busy
    assert busy <= 1.05  # one stream: kernels cannot add up to more than the wall time (plus timer noise)
