"""imm_kernels.mmd_loss against its PyTorch references: `pytest benchmarks/ --benchmark-only`.

Providers: `eager` (the community formulation: three (G, M, M, D) broadcast
differences), `compiled` (torch.compile of it), `cdist`, and each fused backend
that can run here: `imm_kernels[triton]` and `imm_kernels[cuda]` on a GPU,
`imm_kernels[native]` on a CPU (Triton's CPU interpreter is not timed).
Each case stores device time, GB/s against the byte floor, % of the measured
copy bandwidth and peak extra memory in benchmark.extra_info; conftest.py
prints them as a table and writes them to $IMM_BENCH_OUT.

Run as a script with a JSON case, this file measures that case's peak CPU
memory in a fresh process (see `cpu_peak_memory_mib`).
"""

from __future__ import annotations

import functools
import gc
import itertools
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch

import imm_kernels
from imm_kernels import BackendUnavailableError
from imm_kernels.ops.backends import MMD_AUTO, choose_backend
from imm_kernels.ops.reference import mmd_loss_cdist, mmd_loss_reference

from timing import ON_CUDA, cuda_peak_memory_mib, device_time_ms

DEVICE = "cuda" if ON_CUDA else "cpu"
REPO_ROOT = Path(__file__).resolve().parents[1]

MODES = ("forward", "forward+backward")
FUSED_BACKENDS = ("triton", "cuda") if ON_CUDA else ("native",)
PROVIDERS = ("eager", "compiled", "cdist", *(f"imm_kernels[{b}]" for b in FUSED_BACKENDS))
BACKEND_OF_REFERENCE = {"eager": "torch", "compiled": "inductor", "cdist": "torch"}
CPU_MEMORY_LIMIT_GIB = 8


@dataclass(frozen=True)
class Case:
    batch: int
    group_size: int
    features: int
    dtype: str  # a torch dtype name, so that a case travels as JSON to the memory subprocess

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def num_groups(self) -> int:
        return self.batch // self.group_size

    @property
    def shape(self) -> str:
        return f"{self.batch}x{self.group_size}x{self.features}"

    def floor_bytes(self, mode: str) -> int:
        """Bytes any implementation must move: read x and y, and for the gradient also write dx.

        (A forward and a separate backward read x and y twice, 5 passes; the native backend
        computes dx in its forward, 3 passes: the floor is the smaller.)
        """
        passes = 2 if mode == "forward" else 3
        return passes * self.batch * self.features * self.torch_dtype.itemsize


CUDA_CASES = [
    Case(4096, 4, 4096, "float32"),
    Case(4096, 4, 4096, "bfloat16"),
    Case(1024, 8, 3072, "float32"),
    Case(256, 16, 65536, "float32"),
    Case(64, 4, 2**20, "float32"),
]
# Small enough that the whole suite, torch.compile warm-ups included, takes minutes on 2 cores.
CPU_CASES = [
    Case(1024, 4, 3072, "float32"),  # the native backend's targets (issue 3)
    Case(256, 4, 768, "float32"),
    Case(256, 4, 768, "bfloat16"),
    Case(64, 8, 3072, "float32"),
]
CASES = CUDA_CASES if ON_CUDA else CPU_CASES


def make_inputs(case: Case, mode: str):
    """Distinct random-normal x and y and a positive per-group bandwidth.

    Only x requires grad: in IMM, y is the stop-gradient target.
    """
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    like = dict(generator=generator, device=DEVICE, dtype=case.torch_dtype)
    x = torch.randn(case.batch, case.features, **like)
    y = torch.randn(case.batch, case.features, **like)
    bandwidth = torch.rand(case.num_groups, generator=generator, device=DEVICE) + 0.5
    return x.requires_grad_(mode != "forward"), y, bandwidth


_compiled_reference: dict[Case, object] = {}


def compiled_reference(case: Case):
    """torch.compile of the reference, compiled once per case and shared by both modes.

    Dynamo keeps its graphs per code object, so every torch.compile of
    mmd_loss_reference shares them: after a few shapes it would hit the
    recompile limit (silently running eager) or switch to dynamic shapes.
    Resetting on each new case keeps one static-shape compilation per case.
    """
    if case not in _compiled_reference:
        torch.compiler.reset()
        _compiled_reference.clear()
        _compiled_reference[case] = torch.compile(mmd_loss_reference, dynamic=False)
    return _compiled_reference[case]


def loss_function(provider: str, case: Case):
    if provider == "eager":
        return mmd_loss_reference
    if provider == "compiled":
        return compiled_reference(case)
    if provider == "cdist":
        return mmd_loss_cdist
    return functools.partial(imm_kernels.mmd_loss, backend=backend_of(provider, None, case))


def make_step(provider: str, case: Case, mode: str, x, y, bandwidth):
    """The callable that is timed: the loss, or the loss and dx."""
    loss_fn = loss_function(provider, case)

    def loss():
        return loss_fn(x, y, case.group_size, bandwidth, None, reduction="mean")

    if mode == "forward":
        return loss
    # autograd.grad returns dx instead of accumulating into x.grad: no grads to clear, no extra add.
    return lambda: torch.autograd.grad(loss(), x)[0]


def backend_of(provider: str, x, case: Case) -> str:
    if provider.startswith("imm_kernels["):
        return provider[len("imm_kernels[") : -1]
    return BACKEND_OF_REFERENCE[provider]


def unavailable(backend: str, x, case: Case) -> str | None:
    """Why a fused backend cannot time this case here, or None."""
    if backend not in FUSED_BACKENDS:
        return None
    try:
        choose_backend(backend, x.device, MMD_AUTO, dtype=x.dtype, group_size=case.group_size)
    except BackendUnavailableError as err:
        return str(err)
    return None


def estimated_cpu_gib(provider: str, backend: str, case: Case, mode: str) -> float:
    """Upper estimate of the broadcast formulation's (G, M, M, D) fp32 temporaries.

    About 3 are live in the forward; the backward keeps the three differences
    and adds their gradients (about 5). Compiled code may fuse them away, so for
    it this is an upper bound; cdist and the fused kernels need no such tensors.
    """
    if provider == "cdist" or backend not in ("torch", "inductor"):
        return 0.0
    live = 3 if mode == "forward" else 5
    return live * case.num_groups * case.group_size**2 * case.features * 4 / 2**30


def warm_up(step, provider: str, backend: str, case: Case, mode: str) -> str | None:
    """Run once untimed (compilation, autotuning); returns an OOM note instead when it does not fit."""
    if not ON_CUDA:
        need_gib = estimated_cpu_gib(provider, backend, case, mode)
        if need_gib > CPU_MEMORY_LIMIT_GIB:  # never risk the OOM killer on a shared CPU machine
            return f"OOM (estimated {need_gib:.3g} GiB > {CPU_MEMORY_LIMIT_GIB} GiB limit)"
        step()
        return None
    try:
        step()
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError as err:
        return f"OOM: {str(err).splitlines()[0]}"
    return None


def cpu_peak_memory_mib(case: Case, mode: str, provider: str) -> tuple[float | None, str | None]:
    """(RSS growth of one call in a fresh process, or None, and why None).

    A fresh process holds no memory freed by earlier cases, and glibc is told to
    mmap every block of 64 KiB or more, so freed tensors leave the RSS at once
    and the measured call's tensors enter it.
    """
    python_path = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": os.pathsep.join(python_path)}
    spec = json.dumps({"case": asdict(case), "mode": mode, "provider": provider})
    proc = subprocess.run([sys.executable, __file__, spec], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.splitlines()[-1])
    return result["peak_mem_mib"], result["note"]


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_rss_growth(spec: dict) -> dict:
    """The subprocess side of `cpu_peak_memory_mib`.

    Not ru_maxrss: it cannot be reset after the warm-up (whose torch.compile
    would dominate it) and, after a vfork-based spawn, it can carry the
    parent's peak. VmHWM is this process's own peak and can be reset.
    """
    case, mode = Case(**spec["case"]), spec["mode"]
    x, y, bandwidth = make_inputs(case, mode)
    step = make_step(spec["provider"], case, mode, x, y, bandwidth)
    step()  # compilation and one-time initialisation are not the loss's memory
    gc.collect()
    imm_kernels.empty_native_cache()  # else the native dx would reuse the warm-up's kept block
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        baseline_kib = _proc_status_kib("VmRSS")
    except OSError as err:
        return {"peak_mem_mib": None, "note": f"cannot reset the RSS peak here: {err}"}
    step()
    return {"peak_mem_mib": (_proc_status_kib("VmHWM") - baseline_kib) / 1024, "note": None}


@pytest.mark.parametrize(
    "case,mode,provider",
    [
        pytest.param(case, mode, provider, id=f"{case.shape}-{case.dtype}-{mode}-{provider}")
        for case, mode, provider in itertools.product(CASES, MODES, PROVIDERS)
    ],
)
def test_mmd_loss(benchmark, copy_bandwidth_gbps, record_result, case, mode, provider):
    if not benchmark.enabled:
        pytest.skip("pytest-benchmark is disabled")
    x, y, bandwidth = make_inputs(case, mode)
    backend = backend_of(provider, x, case)
    reason = unavailable(backend, x, case)
    if reason is not None:
        pytest.skip(reason)
    info = benchmark.extra_info
    info.update(
        provider=provider,
        backend=backend,
        shape=case.shape,
        dtype=case.dtype,
        mode=mode,
        floor_bytes=case.floor_bytes(mode),
    )
    benchmark.group = f"{case.shape} {case.dtype} {mode}"
    step = make_step(provider, case, mode, x, y, bandwidth)

    oom = warm_up(step, provider, backend, case, mode)
    if oom is not None:
        del step, x, y, bandwidth
        if ON_CUDA:
            gc.collect()
            torch.cuda.empty_cache()
        info.update(status=oom, device_ms=None, gbps=None, pct_copy_bw=None, peak_mem_mib=None)
        record_result(dict(info))
        pytest.skip(oom)

    if ON_CUDA:
        peak_mib, peak_note = cuda_peak_memory_mib(step), None
    else:
        peak_mib, peak_note = cpu_peak_memory_mib(case, mode, provider)
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


if __name__ == "__main__":
    print(json.dumps(measure_rss_growth(json.loads(sys.argv[1]))))
