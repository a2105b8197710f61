"""Test setup: with no GPU, Triton kernels run in its CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, so this runs
before anything imports imm_kernels.
"""

import fnmatch
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import DEVICE  # noqa: E402

# Tests that check nothing GPU-specific: the CPU backend, CLI plumbing, compile reports (ptxas/nvcc
# need no GPU), CPU benchmark scripts. They get the `cpu_only` marker, which the GPU test stage of
# benchmarks/run_gpu.sh deselects (-m "not cpu_only") so that a short GPU session spends its minutes
# on the GPU. Test function names (fnmatch patterns) per file (its path under tests/), kept here so the
# test files need no edit; tests/test_run_gpu_script.py checks that every pattern still names a test.
CPU_ONLY_TESTS = {
    "ops/test_mmd_determinism.py": (
        "test_native_bitwise_equal_for_any_thread_count",
        "test_native_forward_with_grad_equals_forward_then_backward",
    ),
    "ops/test_mmd_backends.py": (
        "test_native_large_gradients_reuse_freed_memory_and_never_live_memory",
        "test_native_backward_uses_the_precomputed_gradient_only_when_it_applies",
        "test_native_batch_beyond_int32_elements",
        "test_native_extension_guards_its_own_inputs",
        "test_interleaved_cpu_benchmark_runs",
    ),
    # not test_native_needs_cpu_tensors_and_cuda_explains_itself: it checks CUDA tensors
    "ops/test_mmd_errors.py": ("test_pure_python_install_falls_back_to_the_reference",),
    "ops/test_mmd_compile.py": ("test_*for_sm90*",),  # the ptxas and nvcc compile reports
    "ops/test_adaln.py": (
        "test_*for_sm90*",
        "test_cpu_without_interpreter_uses_the_reference",
    ),
    "sampling/test_sampling.py": (
        "test_cli_*",
        "test_graphed_sampler_on_cpu_is_the_eager_sampler",
    ),
}
CPU_ONLY_BACKENDS = ("native",)
TESTS_DIR = Path(__file__).parent  # a GPU test's cases on a CPU-only backend


def is_cpu_only(item) -> bool:
    name = getattr(item, "originalname", item.name)  # the function's name, without parameters
    path = item.path.relative_to(TESTS_DIR).as_posix()
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in CPU_ONLY_TESTS.get(path, ())):
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("backend") in CPU_ONLY_BACKENDS


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_cpu_only(item):
            item.add_marker(pytest.mark.cpu_only)


@pytest.fixture
def device(request) -> str:
    """The device a test runs on; with a `backend` parameter, that backend's: native is
    CPU-only, cuda CUDA-only."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec else None
    return {"native": "cpu", "cuda": "cuda"}.get(backend, DEVICE)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models gain little from more, and on a shared CPU a
    thread whose core is busy stalls every parallel region (tens of times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
