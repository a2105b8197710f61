"""Each fused backend's own machinery: the native extension's kept gradient blocks, host-side
upstream test, B*D > 2^31 and input guards; Triton's device-side upstream test (no host sync),
second backward and occupancy-sized grid.
"""

import subprocess
import sys

import pytest
import torch

import imm_kernels
from imm_kernels import mmd_loss

from helpers import (
    make_inputs,
    needs_native,
    needs_triton,
    rel_err,
)


@needs_native
def test_native_large_gradients_reuse_freed_memory_and_never_live_memory():
    """Gradients of 1 MiB or more come from kept blocks: a freed dx's memory serves the next call
    of its size (no fresh pages to fault in), and a dx still alive is never overwritten."""
    x, y, bandwidth, weight = make_inputs(4, 16, 4096)  # dx: 64 x 4096 fp32 = 1 MiB
    x.requires_grad_(True)

    def dx_of(inputs):
        (dx,) = torch.autograd.grad(mmd_loss(inputs, y, 4, bandwidth, weight, backend="native"), inputs)
        return dx

    kept = dx_of(x)
    kept_copy = kept.clone()
    other = dx_of((x + 1).detach().requires_grad_(True))
    assert other.data_ptr() != kept.data_ptr()
    assert torch.equal(kept, kept_copy)
    freed_at = other.data_ptr()
    del other
    again = dx_of(x)
    assert again.data_ptr() == freed_at
    torch.testing.assert_close(again, kept, rtol=0, atol=0)
    torch.testing.assert_close(again, dx_of(x.detach().clone().requires_grad_(True)), rtol=0, atol=0)
    again.mul_(2)  # an ordinary tensor: in-place updates and accumulation work
    torch.testing.assert_close(again, 2 * kept_copy, rtol=0, atol=0)
    del kept, again
    assert imm_kernels.empty_native_cache() >= 2 * 2**20
    assert imm_kernels.empty_native_cache() == 0


@needs_native
def test_native_backward_uses_the_precomputed_gradient_only_when_it_applies(monkeypatch):
    """`.backward()` of the mean takes dx from the forward; any other upstream gradient recomputes it."""
    from imm_kernels.ops.backends import NATIVE

    kernels = NATIVE.mmd
    backward_calls = []

    def counting_backward(*args):
        backward_calls.append(args)
        return kernels.backward(*args)

    monkeypatch.setattr(NATIVE, "mmd", kernels._replace(backward=counting_backward))
    x, y, bandwidth, weight = make_inputs(4, 6, 33, torch.float64)
    x.requires_grad_(True)

    def grads(backend, upstream):
        x.grad = None
        upstream(mmd_loss(x, y, 4, bandwidth, weight, backend=backend)).backward(retain_graph=False)
        return x.grad.clone()

    for upstream, recomputes in [(lambda loss: loss, False), (lambda loss: 3 * loss, True)]:
        calls_before = len(backward_calls)
        torch.testing.assert_close(grads("native", upstream), grads("torch", upstream), rtol=1e-12, atol=0)
        assert len(backward_calls) - calls_before == int(recomputes)
    per_group = mmd_loss(x, y, 4, bandwidth, weight, reduction="none", backend="native")
    (dx,) = torch.autograd.grad(per_group, x, torch.arange(6.0, dtype=torch.float64), retain_graph=True)
    (again,) = torch.autograd.grad(per_group.sum(), x)  # the graph kept: its saved dx is reused intact
    ref = mmd_loss(x, y, 4, bandwidth, weight, reduction="none", backend="torch")
    (ref_dx,) = torch.autograd.grad((ref * torch.arange(6.0, dtype=torch.float64)).sum(), x, retain_graph=True)
    (ref_again,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-12, atol=0)
    torch.testing.assert_close(again, ref_again, rtol=1e-12, atol=0)


def _available_memory_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) / 2**20


@needs_native
def test_native_batch_beyond_int32_elements():
    """A real (B, D) fp16 tensor with B*D > 2^31 elements (4 GiB; dx another 4 GiB).

    Only the last two groups hold random values (the rest are constant rows, so
    filling stays cheap); they sit past element 2^31 and must match the reference
    computed on those groups alone.
    """
    group_size, num_features = 4, 2**16
    batch = 2**31 // num_features + 2 * group_size
    needed_gib = 2 * batch * num_features * 2 / 2**30 + 1
    if not sys.platform.startswith("linux") or _available_memory_gib() < needed_gib:
        pytest.skip(f"needs {needed_gib:.1f} GiB of free memory")
    tail_x, tail_y, bandwidth, weight = make_inputs(group_size, 2, num_features, torch.float16, seed=7)
    x = torch.full((batch, num_features), 0.25, dtype=torch.float16)
    x[-2 * group_size :] = tail_x
    y = tail_y[:1].expand(batch, num_features)  # stride-0 rows: no memory
    y_tail = y[-2 * group_size :]
    num_groups = batch // group_size
    assert batch * num_features > 2**31
    full_bandwidth = torch.cat([torch.ones(num_groups - 2), bandwidth.float()])
    x.requires_grad_(True)
    per_group = mmd_loss(x, y, group_size, full_bandwidth, reduction="none", backend="native")
    (dx,) = torch.autograd.grad(per_group[-2:].sum(), x)
    del x
    ref_x = tail_x.clone().requires_grad_(True)
    ref = mmd_loss(ref_x, y_tail, group_size, bandwidth.float(), reduction="none", backend="torch")
    (ref_dx,) = torch.autograd.grad(ref.sum(), ref_x)
    torch.testing.assert_close(per_group[-2:], ref, rtol=1e-5, atol=1e-6)
    assert rel_err(dx[-2 * group_size :], ref_dx) < 1e-2  # fp16 gradients
    assert not dx[: -2 * group_size].any()


@needs_native
def test_native_extension_guards_its_own_inputs():
    """imm_kernels._C does not trust its caller: malformed tensors raise, never read out of bounds."""
    from imm_kernels import _C

    x, y, bandwidth, weight = make_inputs(2, 3, 8)
    bandwidth, weight = bandwidth.float(), weight.float()
    cases = [
        ((x.t().contiguous().t(), y, bandwidth, weight, 2, 1e-8), "unit column stride"),
        ((x, y[:, :4], bandwidth, weight, 2, 1e-8), "x and y must be"),
        ((x, y, bandwidth, weight, 4, 1e-8), "group_size must divide B"),
        ((x, y, bandwidth.double(), weight, 2, 1e-8), "bandwidth and weight must be contiguous"),
        ((x, y, bandwidth[:2], weight, 2, 1e-8), "bandwidth and weight must be contiguous"),
        ((x, y.double(), bandwidth, weight, 2, 1e-8), "share a dtype"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            _C.mmd_forward_cpu(*args)
    _, sqdist, _, _ = _C.mmd_forward_cpu(x, y, bandwidth, weight, 2, 1e-8)
    with pytest.raises(RuntimeError, match="sqdist must be"):
        _C.mmd_backward_cpu(torch.ones(3), x, y, sqdist[:, :2], bandwidth, weight, 2, 1e-8, True, False)


@needs_triton
@pytest.mark.parametrize("num_groups,num_features", [(6, 33), (2, 3000)])  # unsplit and split D
def test_triton_refresh_rewrites_only_groups_whose_gradient_differs(num_groups, num_features, device):
    """The backward's device-side test: groups whose upstream gradient is the one the forward
    assumed keep what it wrote (here marked, to see it untouched); the others get theirs anew."""
    from imm_kernels.ops import mmd_triton

    x, y, bandwidth, weight = make_inputs(4, num_groups, num_features, device=device)
    bandwidth, weight = bandwidth.float(), weight.float()
    expected = torch.full((num_groups,), 1 / num_groups, device=device)
    forward = mmd_triton.mmd_forward_with_grad_triton(x, y, bandwidth, weight, 4, 1e-8, expected, True, True)
    sqdist = forward[1]
    grad_loss = expected.clone()
    grad_loss[1] = -2.5
    dx, dy = torch.full_like(x, 7.0), torch.full_like(y, 7.0)
    mmd_triton.mmd_refresh_grad_triton(grad_loss, expected, x, y, sqdist, bandwidth, weight, 4, 1e-8, dx, dy)
    want_dx, want_dy = mmd_triton.mmd_backward_triton(grad_loss, x, y, sqdist, bandwidth, weight, 4, 1e-8, True, True)
    rewritten = slice(4, 8)  # group 1's rows
    for got, want in ((dx, want_dx), (dy, want_dy)):
        assert torch.equal(got[rewritten], want[rewritten])
        kept = torch.cat([got[:4], got[8:]])
        assert (kept == 7.0).all()


class _HostSync(AssertionError):
    pass


@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triton_backward_needs_no_host_sync(reduction, device, monkeypatch):
    """The forward-with-gradient path decides on the device whether its dx applies: the
    backward never reads a tensor on the host (no .item(), no bool()), for the upstream
    gradient .backward() sends and for any other, and its gradients are right for both."""
    x, y, bandwidth, weight = make_inputs(4, 6, 33, torch.float64, device)
    upstreams = [torch.ones((6,) if reduction == "none" else (), dtype=torch.float64, device=device)]
    upstreams.append(
        torch.linspace(-1, 2, 6, dtype=torch.float64, device=device)
        if reduction == "none"
        else torch.tensor(3.0, dtype=torch.float64, device=device)
    )

    def host_sync(*_args, **_kwargs):
        raise _HostSync("the backward read a tensor on the host")

    for upstream in upstreams:
        x_leaf = x.clone().requires_grad_(True)
        loss = mmd_loss(x_leaf, y, 4, bandwidth, weight, reduction=reduction, backend="triton")
        with monkeypatch.context() as patch:
            for method in ("item", "__bool__", "tolist"):
                patch.setattr(torch.Tensor, method, host_sync)
            (dx,) = torch.autograd.grad(loss, x_leaf, upstream)
        ref_leaf = x.clone().requires_grad_(True)
        ref = mmd_loss(ref_leaf, y, 4, bandwidth, weight, reduction=reduction, backend="torch")
        (ref_dx,) = torch.autograd.grad(ref, ref_leaf, upstream)
        torch.testing.assert_close(dx, ref_dx, rtol=1e-12, atol=1e-15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("num_groups,num_features", [(64, 256), (2, 2**16)])  # one program per group; D split
def test_triton_training_step_never_syncs_on_gpu(num_groups, num_features):
    """Forward and backward of the loss, as a training step runs them, with CUDA's sync check on."""
    x, y, bandwidth, weight = make_inputs(4, num_groups, num_features, torch.bfloat16, "cuda")
    bandwidth, weight = bandwidth.float(), weight.float()
    x.requires_grad_(True)
    mmd_loss(x, y, 4, bandwidth, weight, backend="triton").backward()  # compiles and sizes the grid first
    expected = x.grad.clone()
    x.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        mmd_loss(x, y, 4, bandwidth, weight, backend="triton").backward()
        (2 * mmd_loss(x, y, 4, bandwidth, weight, backend="triton")).backward()  # another upstream gradient
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(x.grad, 3 * expected, rtol=2e-2, atol=1e-6)  # bf16 dx accumulated


@needs_triton
def test_triton_second_backward_leaves_the_first_gradient_intact(device):
    """With retain_graph, a second backward with another upstream gradient must not rewrite the
    gradient the first one returned (which was the forward's own buffer)."""
    x, y, bandwidth, weight = make_inputs(4, 6, 33, torch.float64, device)
    x.requires_grad_(True)
    per_group = mmd_loss(x, y, 4, bandwidth, weight, reduction="none", backend="triton")
    (first,) = torch.autograd.grad(per_group.sum(), x, retain_graph=True)
    first_copy = first.clone()
    upstream = torch.arange(6.0, dtype=torch.float64, device=device)
    (second,) = torch.autograd.grad(per_group, x, upstream)
    assert torch.equal(first, first_copy)
    ref = mmd_loss(x, y, 4, bandwidth, weight, reduction="none", backend="torch")
    (ref_first,) = torch.autograd.grad(ref.sum(), x, retain_graph=True)
    (ref_second,) = torch.autograd.grad(ref, x, upstream)
    torch.testing.assert_close(first, ref_first, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(second, ref_second, rtol=1e-12, atol=1e-15)


@needs_triton
def test_triton_split_grid_sized_from_occupancy():
    """D is split across programs only as far as the compiled kernel's occupancy needs."""
    from types import SimpleNamespace

    from imm_kernels.ops import mmd_triton
    from imm_kernels.ops.utils import programs_per_sm

    class Compiled:  # what triton's compiled kernel offers once its binary is loaded
        n_regs, metadata = 128, SimpleNamespace(shared=16384)

        def _init_handles(self):
            pass

    hopper = SimpleNamespace(
        regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048, shared_memory_per_multiprocessor=233472
    )
    assert programs_per_sm(Compiled(), 4, hopper) == 4  # registers: 128 x 128 threads, 4 blocks
    Compiled.n_regs = 32
    assert programs_per_sm(Compiled(), 4, hopper) == 13  # shared memory: 228 KiB / (16 + 1) KiB
    Compiled.metadata = SimpleNamespace(shared=0)
    assert programs_per_sm(Compiled(), 4, hopper) == 16  # threads: 2048 / 128
    Compiled.n_regs = 40
    assert programs_per_sm(Compiled(), 4, hopper) == 12  # registers: 65536 / (40 x 32) = 51 warps
    # Enough groups to fill the device: no split. Too few: just enough splits (whole blocks each).
    assert mmd_triton._column_split(1024, 4096, 256, resident=132 * 4) == (1, 4096)
    assert mmd_triton._column_split(64, 2**20, 256, resident=132 * 4) == (9, 456 * 256)
    assert mmd_triton._column_split(1, 300, 256, resident=528) == (2, 256)


@needs_native
def test_interleaved_cpu_benchmark_runs():
    """benchmarks/mmd_cpu_interleaved.py, which BENCHMARKS.md cites, runs and checks native against compiled."""
    import pathlib

    script = pathlib.Path(__file__).parents[2] / "benchmarks" / "mmd_cpu_interleaved.py"
    run = subprocess.run(
        [sys.executable, str(script), "--rounds", "4", "--shape", "16,4,64"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "16x4x64 float32 forward+backward" in run.stdout
    assert "compiled / native, per round: median" in run.stdout
