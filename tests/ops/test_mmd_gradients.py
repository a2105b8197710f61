"""mmd_loss gradients: gradcheck in float64, the closed form, zero gradient for close pairs,
only the gradients asked for, stride-0 upstream gradients.
"""

import pytest
import torch

from imm_kernels import mmd_loss
from imm_kernels.ops.reference import mmd_loss_reference

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
