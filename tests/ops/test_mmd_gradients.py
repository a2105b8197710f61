"""mmd_loss gradients: gradcheck in float64, the closed form, zero gradient for close pairs,
only the gradients asked for, stride-0 upstream gradients; second-order gradients
(create_graph=True) on every path of every backend.
"""

import pytest
import torch

from imm_kernels import mmd_loss
from imm_kernels.ops import mmd as mmd_module
from imm_kernels.ops.backends import BACKENDS
from imm_kernels.ops.reference import mmd_loss_reference
from imm_kernels.ops.utils import as_rows

from helpers import (
    ALL_BACKENDS,
    loss_and_grads,
    make_inputs,
    rel_err,
    skip_beyond_cuda_limit,
)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_scalar_bandwidth_tensor_gets_summed_gradient(backend, device):
    x, y, bandwidth, _ = make_inputs(2, 3, 20, torch.float64, device)
    b = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(mmd_loss(x, y, 2, b, backend=backend, reduction="sum"), b)
    b_vec = torch.full((3,), 2.5, dtype=torch.float64, requires_grad=True)
    (grad_vec,) = torch.autograd.grad(mmd_loss(x, y, 2, b_vec, backend=backend, reduction="sum"), b_vec)
    torch.testing.assert_close(grad, grad_vec.sum())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("group_size,num_groups,num_features", [(1, 2, 5), (3, 2, 5), (4, 1, 19)])
def test_gradcheck_float64(backend, group_size, num_groups, num_features, device):
    skip_beyond_cuda_limit(backend, group_size)
    x, y, bandwidth, weight = make_inputs(group_size, num_groups, num_features, torch.float64, device)
    inputs = [t.clone().requires_grad_(True) for t in (x, y, bandwidth, weight)]

    def fn(x, y, bandwidth, weight):
        return mmd_loss(x, y, group_size, bandwidth, weight, reduction="none", backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradient_matches_closed_form(backend, device):
    """docs/design.md §3.2's dL/dz_i = sum_j A_ij (z_i - z_j), and dL/db, dL/dw, written out in float64."""
    group_size, num_features = 3, 11
    x, y, bandwidth, weight = make_inputs(group_size, 1, num_features, torch.float64, device)
    _, (dx, dy, db, dw) = loss_and_grads(x, y, group_size, bandwidth, weight, backend, reduction="sum")
    z = torch.cat([x, y])
    sign = torch.tensor([1.0] * group_size + [-1.0] * group_size, dtype=torch.float64, device=device)
    dist = torch.cdist(z, z).clamp_min(1e-8)
    kern = torch.exp(-bandwidth * dist / num_features)
    ss = sign[:, None] * sign[None, :]
    coeff = -(2 * weight * bandwidth / (group_size**2 * num_features)) * ss * kern / dist
    coeff.fill_diagonal_(0.0)
    dz = coeff.sum(1, keepdim=True) * z - coeff @ z
    torch.testing.assert_close(torch.cat([dx, dy]), dz, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(db, -(weight / (group_size**2 * num_features)) * (ss * kern * dist).sum().reshape(1))
    torch.testing.assert_close(dw, ((ss * kern).sum() / group_size**2).reshape(1))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_duplicate_rows_have_zero_pair_gradient(backend, device):
    """Pairs closer than eps contribute exactly nothing (the diagonal, and duplicates)."""
    x, y, bandwidth, weight = make_inputs(2, 1, 6, torch.float64, device)
    x = torch.stack([x[0], x[0]])  # two identical particles
    y = x.clone()  # y == x: MMD^2 is exactly 0
    loss, grads = loss_and_grads(x, y, 2, bandwidth, weight, backend, reduction="sum")
    assert loss.item() == 0.0
    for g in grads[:3]:
        assert torch.isfinite(g).all()
        assert g.abs().max().item() == 0.0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_only_requested_gradients(backend, device):
    """y without requires_grad (the IMM target) gets no gradient; x alone is computed."""
    x, y, bandwidth, weight = make_inputs(4, 2, 33, device=device)
    x = x.requires_grad_(True)
    loss = mmd_loss(x, y, 4, bandwidth, weight, backend=backend)
    (dx,) = torch.autograd.grad(loss, x)
    _, ref_grads = loss_and_grads(x.detach(), y, 4, bandwidth, weight, "torch")
    assert rel_err(dx, ref_grads[0]) < 1e-5
    assert y.grad is None


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_stride0_grad_output(backend, device):
    x, y, bandwidth, weight = make_inputs(3, 4, 10, device=device)
    x.requires_grad_(True)
    per_group = mmd_loss(x, y, 3, bandwidth, weight, reduction="none", backend=backend)
    grad_output = torch.tensor(0.7, device=device).expand(4)
    assert grad_output.stride() == (0,)
    (dx,) = torch.autograd.grad(per_group, x, grad_output)
    (dx_ref,) = torch.autograd.grad(0.7 * mmd_loss_reference(x, y, 3, bandwidth, weight, reduction="sum"), x)
    assert rel_err(dx, dx_ref) < 1e-5


# ----------------------------------------------------------------------------
# Second-order gradients
# ----------------------------------------------------------------------------

# "fused": what mmd_loss takes (triton and native: the forward that also computes dx);
# "custom_ops": the plain forward and backward ops alone, the cuda backend's path and torch.compile's.
PATHS = ["fused", "custom_ops"]


def take_path(backend, path, monkeypatch):
    if path == "custom_ops":
        if backend == "torch":
            pytest.skip("the torch backend has no custom ops")
        chosen = BACKENDS[backend]
        monkeypatch.setattr(chosen, "mmd", chosen.mmd._replace(forward_with_grad=None, refresh_grad=None))


def second_order(x, y, group_size, bandwidth, weight, backend, reduction, requires=(True,) * 4):
    """(first-order gradients, second-order gradients) in the inputs marked in `requires`: the
    gradients of the loss with create_graph=True, then the gradients of a random linear function
    of them (a Hessian-vector product, which also covers the mixed x/bandwidth/weight terms).
    materialize_grads: a gradient that lost its graph shows as 0, not as an autograd error."""
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip((x, y, bandwidth, weight), requires)]
    wrt = [t for t in leaves if t.requires_grad]
    loss = mmd_loss(*leaves[:2], group_size, *leaves[2:], reduction=reduction, backend=backend)
    grads = torch.autograd.grad(loss.sum(), wrt, create_graph=True)
    gen = torch.Generator().manual_seed(1)
    probe = sum((g * torch.randn(g.shape, generator=gen, dtype=g.dtype).to(g.device)).sum() for g in grads)
    second = torch.autograd.grad(probe, wrt, materialize_grads=True)
    return [g.detach() for g in grads], [h.detach() for h in second]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "reduction,requires",
    [
        pytest.param("mean", (True,) * 4, id="mean-all"),
        pytest.param("none", (True,) * 4, id="none-all"),
        pytest.param("sum", (True, False, False, False), id="sum-x"),
        pytest.param("sum", (False, False, True, False), id="sum-bandwidth"),
    ],
)
def test_double_backward_matches_reference(backend, path, reduction, requires, device, monkeypatch):
    """float32 against the reference's own double backward in float32 (the project's fp32 gradient
    tolerance, 1e-5): every backend and path, with every input or only x (the IMM case: y is the
    target) or only the bandwidth differentiable."""
    take_path(backend, path, monkeypatch)
    inputs = make_inputs(3, 2, 7, device=device)
    grads, second = second_order(*inputs[:2], 3, *inputs[2:], backend, reduction, requires)
    ref_grads, ref_second = second_order(*inputs[:2], 3, *inputs[2:], "torch", reduction, requires)
    for got, want in zip(grads + second, ref_grads + ref_second):
        assert want.abs().max() > 0
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradgradcheck_float64(backend, path, reduction, device, monkeypatch):
    """Second-order gradients in every input and in the upstream gradient, against finite
    differences of the first-order ones (the gradcheck tolerances)."""
    take_path(backend, path, monkeypatch)
    x, y, bandwidth, weight = make_inputs(2, 2, 3, torch.float64, device)
    inputs = [t.clone().requires_grad_(True) for t in (x, y, bandwidth, weight)]

    def fn(x, y, bandwidth, weight):
        return mmd_loss(x, y, 2, bandwidth, weight, reduction=reduction, backend=backend)

    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("path", PATHS)
def test_double_backward_with_one_tensor_as_bandwidth_and_weight(backend, path, device, monkeypatch):
    """Each argument gets only its own gradient when one tensor fills two of them."""
    take_path(backend, path, monkeypatch)
    x, y, bandwidth, _ = make_inputs(2, 2, 5, torch.float64, device)

    def grads_and_hessian(backend):
        shared = bandwidth.clone().requires_grad_(True)
        loss = mmd_loss(x, y, 2, shared, shared, reduction="sum", backend=backend)
        (grad,) = torch.autograd.grad(loss, shared, create_graph=True)
        (hessian_sum,) = torch.autograd.grad(grad.sum(), shared)
        return grad.detach(), hessian_sum

    for got, want in zip(grads_and_hessian(backend), grads_and_hessian("torch")):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b != "torch"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_first_order_gradients_come_from_the_kernels(backend, path, reduction, device, monkeypatch):
    """Without create_graph the backward is the fused kernels' alone, bitwise, and never the
    reference (which a create_graph=True backward runs)."""
    take_path(backend, path, monkeypatch)
    kernels = BACKENDS[backend].mmd
    monkeypatch.setattr(mmd_module, "grouped_mmd_reference", None)  # calling it would raise
    x, y, bandwidth, weight = make_inputs(3, 2, 7, device=device)
    x.requires_grad_(True)
    loss = mmd_loss(x, y, 3, bandwidth, weight, reduction=reduction, backend=backend)
    (dx,) = torch.autograd.grad(loss.sum(), x)
    upstream = torch.full((2,), 0.5 if reduction == "mean" else 1.0, device=device)  # 1/G for "mean"
    rows = (as_rows(x.detach()), as_rows(y), bandwidth.float(), weight.float(), 3, 1e-8)
    if kernels.forward_with_grad is not None:
        expected = kernels.forward_with_grad(*rows, upstream, True, False)[4]
    else:
        _, sqdist, _, _ = kernels.forward(*rows)
        expected, _ = kernels.backward(upstream, *rows[:2], sqdist, *rows[2:], True, False)
    assert torch.equal(dx, expected.view_as(dx))
