"""mmd_loss bit for bit: repeated runs, any thread count, the forward-with-gradient paths
against the forward then the backward, and x == y giving exactly 0.
"""

import pytest
import torch

from imm_kernels.ops import reference

from helpers import (
    KERNEL_BACKENDS,
    loss_and_grads,
    make_inputs,
    needs_native,
    needs_triton,
)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("num_groups,num_features", [(1, 2000), (6, 300)])
def test_bitwise_deterministic(backend, num_groups, num_features, device):
    """Split (1 group) and unsplit paths: two runs agree to the bit."""
    x, y, bandwidth, weight = make_inputs(4, num_groups, num_features, device=device)
    first = loss_and_grads(x, y, 4, bandwidth, weight, backend)
    second = loss_and_grads(x, y, 4, bandwidth, weight, backend)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("num_groups,num_features", [(3, 20000), (100, 300)])
def test_native_bitwise_equal_for_any_thread_count(num_groups, num_features):
    """D split across tasks (3 groups, D = 20000) and many groups: 1 and 2 threads agree to the bit."""
    x, y, bandwidth, weight = make_inputs(4, num_groups, num_features)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = loss_and_grads(x, y, 4, bandwidth, weight, "native", reduction="none")
        torch.set_num_threads(2)
        double = loss_and_grads(x, y, 4, bandwidth, weight, "native", reduction="none")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single[0], double[0])
    for a, b in zip(single[1], double[1]):
        assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize(
    "dtype,group_size,num_groups,num_features",
    [
        (torch.float32, 4, 5, 257),
        (torch.float64, 3, 4, 100),
        (torch.bfloat16, 8, 3, 65),
        (torch.float32, 4, 2, 20000),  # few groups: D is split, forward then backward
        (torch.float32, 4, 130, 4099),  # dx and dy over 8 MiB: streaming stores, rows not 16-byte aligned
    ],
)
def test_native_forward_with_grad_equals_forward_then_backward(dtype, group_size, num_groups, num_features):
    """The one-pass forward+gradient gives, to the bit, what the forward and the backward give."""
    from imm_kernels import _C

    x, y, bandwidth, weight = make_inputs(group_size, num_groups, num_features, dtype)
    cdtype = reference.compute_dtype(dtype)
    bandwidth, weight = bandwidth.to(cdtype), weight.to(cdtype)
    grad_loss = torch.rand(num_groups, dtype=cdtype) - 0.5
    fused = _C.mmd_forward_with_grad_cpu(x, y, bandwidth, weight, group_size, 1e-8, grad_loss, True, True)
    forward = _C.mmd_forward_cpu(x, y, bandwidth, weight, group_size, 1e-8)
    backward = _C.mmd_backward_cpu(grad_loss, x, y, forward[1], bandwidth, weight, group_size, 1e-8, True, True)
    for got, expected in zip(fused, (*forward, *backward)):
        assert torch.equal(got, expected)


@needs_triton
@pytest.mark.parametrize(
    "dtype,group_size,num_groups,num_features",
    [
        (torch.float32, 4, 6, 300),  # one program per group: S, then the gradient, in one kernel
        (torch.float64, 3, 5, 37),  # M not a power of two: padding rows
        (torch.bfloat16, 8, 3, 65),
        (torch.float32, 1, 7, 19),
        (torch.float32, 2, 1, 2000),  # few groups: D split, so the forward then the backward kernel
    ],
)
@pytest.mark.parametrize("need_dy", [False, True])
def test_triton_forward_with_grad_equals_forward_then_backward(
    dtype, group_size, num_groups, num_features, need_dy, device
):
    """The forward that also writes the gradient gives, to the bit, what the forward and the backward give."""
    from imm_kernels.ops import mmd_triton

    x, y, bandwidth, weight = make_inputs(group_size, num_groups, num_features, dtype, device)
    cdtype = reference.compute_dtype(dtype)
    bandwidth, weight = bandwidth.to(cdtype), weight.to(cdtype)
    grad_loss = torch.rand(num_groups, dtype=cdtype, device=device) - 0.5
    fused = mmd_triton.mmd_forward_with_grad_triton(x, y, bandwidth, weight, group_size, 1e-8, grad_loss, True, need_dy)
    forward = mmd_triton.mmd_forward_triton(x, y, bandwidth, weight, group_size, 1e-8)
    backward = mmd_triton.mmd_backward_triton(
        grad_loss, x, y, forward[1], bandwidth, weight, group_size, 1e-8, True, need_dy
    )
    for got, expected in zip(fused, (*forward, *backward)):
        assert torch.equal(got, expected)


@needs_triton
@pytest.mark.parametrize("group_size", [1, 3, 4, 8])
def test_triton_equal_inputs_give_exactly_zero(group_size, device):
    """x == y: S_xx, S_yy and S_xy hold the same sums in the same order, so the signed kernel
    terms cancel exactly: the loss and the gradients in x, y and the weight are 0, not rounding
    noise. (The bandwidth's gradient sums products k * d, which a GPU may contract into FMAs
    unevenly: it is 0 only to rounding there.)"""
    x, _, bandwidth, weight = make_inputs(group_size, 3, 37, device=device)
    loss, (dx, dy, dbandwidth, dweight) = loss_and_grads(
        x, x.clone(), group_size, bandwidth, weight, "triton", reduction="none"
    )
    assert (loss == 0).all()
    assert (dx == 0).all() and (dy == 0).all() and (dweight == 0).all()
    torch.testing.assert_close(dbandwidth, torch.zeros_like(dbandwidth), rtol=0, atol=1e-9)
