"""How every benchmark times a call and measures its GPU memory (imported by the bench_* files)."""

from __future__ import annotations

import torch

ON_CUDA = torch.cuda.is_available()
CPU_ROUNDS = 20  # pytest-benchmark rounds; on the CPU their median is the device time
CUDA_ROUNDS = 10  # host-side rounds for pytest-benchmark's table; do_bench gives the device time


def cuda_peak_memory_mib(step) -> float:
    """Memory allocated at the peak of one call, above what was allocated before it (weights, inputs)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / 2**20


def device_time_ms(benchmark, step) -> float:
    """Median time of one call: CUDA events (triton's do_bench) on the GPU, wall time on the CPU."""
    if ON_CUDA:
        import triton.testing

        benchmark.pedantic(lambda: (step(), torch.cuda.synchronize()), rounds=CUDA_ROUNDS)
        return triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
    benchmark.pedantic(step, rounds=CPU_ROUNDS)
    return benchmark.stats.stats.median * 1e3
