"""The native CPU MMD against torch.compile, calls alternating in one process.

    python benchmarks/mmd_cpu_interleaved.py [--rounds 60] [--shape 1024,4,3072]

pytest-benchmark times each provider in its own window of 20 calls. On a shared
VM the host's load moves between windows (torch.compile's calls here switch
between about 3.5 and 7 ms), which moves their ratio. Here every round times one
call of each provider in random order. The median of the per-round ratios is far
less sensitive to that drift. Each compiled call also evicts the caches, as the
rest of a training step would.

Rows:
- native: `mmd_loss(backend="native")` forward plus `autograd.grad`, as the pytest benchmark times it.
- kernel: the C++ call alone (`_C.mmd_forward_with_grad_cpu`), with no autograd and no Python layer.
  The gap between the two is what the Python layer costs once the kernel has streamed
  36 MiB through the caches.
- compiled: `torch.compile` of the reference, forward plus `autograd.grad`.

fp32, 2 threads (the machine's), x and y random normal, only x requires grad.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mmd  # noqa: E402  (the pytest benchmark's inputs and steps, so both time the same calls)

import imm_kernels  # noqa: E402
from imm_kernels.ops.backends import _C  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--shape", default="1024,4,3072", help="B,M,D")
    args = parser.parse_args()
    if _C is None:
        sys.exit(f"the native backend is unavailable: {imm_kernels.backends()['native']}")
    batch, group_size, features = (int(v) for v in args.shape.split(","))
    case = bench_mmd.Case(batch, group_size, features, "float32")
    x, y, bandwidth = bench_mmd.make_inputs(case, "forward+backward")
    weight = torch.ones_like(bandwidth)
    grad_loss = torch.full_like(bandwidth, 1.0 / case.num_groups)  # what the mean's backward sends each group
    x_data = x.detach()
    steps = {
        "native": bench_mmd.make_step("imm_kernels[native]", case, "forward+backward", x, y, bandwidth),
        "kernel": lambda: _C.mmd_forward_with_grad_cpu(
            x_data, y, bandwidth, weight, group_size, 1e-8, grad_loss, True, False
        )[4],
        "compiled": bench_mmd.make_step("compiled", case, "forward+backward", x, y, bandwidth),
    }
    # dx is tiny at large B*D (about 4e-8 at the default shape): the tolerance scales with it.
    expected = steps["compiled"]()
    torch.testing.assert_close(steps["native"](), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    for step in steps.values():  # compilation, and the native backend's kept gradient block
        step()
        step()

    times: dict[str, list[float]] = {name: [] for name in steps}
    ratios = []
    for _ in range(args.rounds):
        round_ms = {}
        for name in random.sample(list(steps), len(steps)):
            start = time.perf_counter()
            steps[name]()
            round_ms[name] = (time.perf_counter() - start) * 1e3
            times[name].append(round_ms[name])
        ratios.append(round_ms["compiled"] / round_ms["native"])

    print(f"{case.shape} float32 forward+backward, {torch.get_num_threads()} threads, {args.rounds} rounds")
    for name, values in times.items():
        q = statistics.quantiles(values, n=10)
        print(f"  {name:9s} median {statistics.median(values):7.3f} ms   p10 {q[0]:7.3f}   p90 {q[-1]:7.3f}")
    q = statistics.quantiles(ratios, n=4)
    print(f"  compiled / native, per round: median {statistics.median(ratios):.2f}x  (quartiles {q[0]:.2f}-{q[2]:.2f})")
    overhead = statistics.median(times["native"]) - statistics.median(times["kernel"])
    print(f"  native - kernel (autograd and the Python layer): {overhead:.3f} ms")


if __name__ == "__main__":
    main()
