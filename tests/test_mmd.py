"""mmd_loss: every backend against the reference, the reference against float64.

Without a GPU the Triton backend runs in Triton's interpreter (see conftest.py),
so shapes stay small but cover odd D, D not a multiple of the block, the split-D
path (few groups) and M in {1, 2, 3, 4, 8, 16}. The native backend runs the same
grid on CPU tensors; the CUDA backend, where built and a GPU is present, on CUDA
tensors with M <= 8.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import imm_kernels
from imm_kernels import BackendUnavailableError, mmd_loss
from imm_kernels.ops import reference
from imm_kernels.ops.reference import mmd_loss_reference

from conftest import DEVICE

REASONS = imm_kernels.backends()


def _needs(backend):
    reason = REASONS[backend]
    return pytest.mark.skipif(reason is not None, reason=f"{backend} unavailable: {reason}")


needs_triton, needs_native, needs_cuda = _needs("triton"), _needs("native"), _needs("cuda")
KERNEL_BACKENDS = [
    pytest.param("triton", marks=needs_triton),
    pytest.param("native", marks=needs_native),
    pytest.param("cuda", marks=needs_cuda),
]
ALL_BACKENDS = ["torch", *KERNEL_BACKENDS]
CUDA_MAX_GROUP_SIZE = 8


@pytest.fixture
def device(request) -> str:
    """The device a test's `backend` runs on: native is CPU-only, cuda CUDA-only."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec else None
    return {"native": "cpu", "cuda": "cuda"}.get(backend, DEVICE)


def skip_beyond_cuda_limit(backend, group_size):
    if backend == "cuda" and group_size > CUDA_MAX_GROUP_SIZE:
        pytest.skip(f"the cuda backend takes group_size <= {CUDA_MAX_GROUP_SIZE}")


def make_inputs(group_size, num_groups, num_features, dtype=torch.float32, device="cpu", seed=0):
    """x ~ N(0, 1), y ~ N(0.3, 0.8^2) and per-group bandwidths that keep k in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    batch = group_size * num_groups
    x = torch.randn(batch, num_features, generator=gen, dtype=torch.float64)
    y = 0.8 * torch.randn(batch, num_features, generator=gen, dtype=torch.float64) + 0.3
    # Typical distance ~ sqrt(2D): bandwidth ~ sqrt(D) puts b*d/D near 1.
    bandwidth = math.sqrt(num_features) * (0.3 + 1.2 * torch.rand(num_groups, generator=gen, dtype=torch.float64))
    weight = 0.5 + torch.rand(num_groups, generator=gen, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (x, y)] + [t.to(device) for t in (bandwidth, weight)]


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def loss_and_grads(x, y, group_size, bandwidth, weight, backend, reduction="mean", **kw):
    """The loss and its gradients in x, y, bandwidth, weight (all four require grad)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, y, bandwidth, weight)]
    loss = mmd_loss(leaves[0], leaves[1], group_size, leaves[2], leaves[3], reduction=reduction, backend=backend, **kw)
    grads = torch.autograd.grad(loss.sum(), leaves)
    return loss.detach(), [g.detach() for g in grads]


# ----------------------------------------------------------------------------
# The reference itself
# ----------------------------------------------------------------------------


def hand_mmd(x, y, group_size, bandwidth, weight, eps=1e-8):
    """The V-statistic, one pair at a time, in numpy float64: independent of torch."""
    x = x.double().numpy().reshape(x.shape[0], -1)
    y = y.double().numpy().reshape(y.shape[0], -1)
    num_features = x.shape[1]
    losses = []
    for g in range(x.shape[0] // group_size):
        z = np.concatenate([x[g * group_size : (g + 1) * group_size], y[g * group_size : (g + 1) * group_size]])
        sign = np.array([1.0] * group_size + [-1.0] * group_size)
        total = 0.0
        for i in range(2 * group_size):
            for j in range(2 * group_size):
                dist = max(np.sqrt(np.sum((z[i] - z[j]) ** 2)), eps)
                total += sign[i] * sign[j] * np.exp(-float(bandwidth[g]) * dist / num_features)
        losses.append(float(weight[g]) * total / group_size**2)
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("group_size", [1, 2, 3, 4])
def test_reference_matches_hand_computation(group_size):
    x, y, bandwidth, weight = make_inputs(group_size, 3, 7, torch.float64, seed=group_size)
    got = mmd_loss_reference(x, y, group_size, bandwidth, weight, reduction="none")
    torch.testing.assert_close(got, hand_mmd(x, y, group_size, bandwidth, weight), rtol=1e-12, atol=1e-14)


def test_reference_fp32_close_to_fp64():
    x, y, bandwidth, weight = make_inputs(4, 5, 301)
    got = mmd_loss_reference(x, y, 4, bandwidth, weight, reduction="none")
    expected = mmd_loss_reference(x.double(), y.double(), 4, bandwidth, weight, reduction="none")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_cdist_provider_matches_reference():
    x, y, bandwidth, weight = make_inputs(4, 3, 50, torch.float64)
    torch.testing.assert_close(
        reference.mmd_loss_cdist(x, y, 4, bandwidth, weight, reduction="none"),
        mmd_loss_reference(x, y, 4, bandwidth, weight, reduction="none"),
        rtol=1e-10,
        atol=1e-12,
    )


# ----------------------------------------------------------------------------
# Kernel backends against the reference and float64
# ----------------------------------------------------------------------------

# (group_size, num_groups, D): odd D, D not a multiple of any block size, and
# num_groups below the interpreter's target of 4 programs so D is split too.
PARITY_CASES = [
    (1, 5, 37), (1, 2, 1001),
    (2, 4, 37), (2, 1, 1001),
    (3, 3, 37), (3, 2, 515),
    (4, 4, 37), (4, 1, 1001),
    (8, 2, 37), (8, 1, 515),
    (16, 2, 37), (16, 1, 203),
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("group_size,num_groups,num_features", PARITY_CASES)
def test_fp32_parity_with_float64(backend, group_size, num_groups, num_features, device):
    skip_beyond_cuda_limit(backend, group_size)
    x, y, bandwidth, weight = make_inputs(group_size, num_groups, num_features, device=device, seed=num_features)
    loss, grads = loss_and_grads(x, y, group_size, bandwidth, weight, backend, reduction="none")
    ref_loss, ref_grads = loss_and_grads(x, y, group_size, bandwidth, weight, "torch", reduction="none")
    exact_loss, exact_grads = loss_and_grads(x.double(), y.double(), group_size, bandwidth, weight, "torch", reduction="none")
    assert loss.dtype == torch.float32 and loss.shape == (num_groups,)
    # float32 accumulation over D <= 1001 terms: far under 1e-5 relative.
    torch.testing.assert_close(loss.double(), exact_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, got, ref, exact in zip("x y bandwidth weight".split(), grads, ref_grads, exact_grads):
        assert got.shape == ref.shape, name
        assert rel_err(got, exact) < 1e-5, name
        assert rel_err(got, ref) < 1e-5, name


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("group_size,num_groups,num_features", [(3, 2, 37), (4, 1, 1001), (16, 1, 41)])
def test_fp64_matches_reference_to_rounding(backend, group_size, num_groups, num_features, device):
    skip_beyond_cuda_limit(backend, group_size)
    x, y, bandwidth, weight = make_inputs(group_size, num_groups, num_features, torch.float64, device)
    loss, grads = loss_and_grads(x, y, group_size, bandwidth, weight, backend, reduction="none")
    ref_loss, ref_grads = loss_and_grads(x, y, group_size, bandwidth, weight, "torch", reduction="none")
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    for got, ref in zip(grads, ref_grads):
        assert rel_err(got, ref) < 1e-12


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(backend, reduction, device):
    x, y, bandwidth, weight = make_inputs(4, 3, 29, device=device)
    per_group = mmd_loss_reference(x.double(), y.double(), 4, bandwidth, weight, reduction="none")
    expected = {"mean": per_group.mean(), "sum": per_group.sum(), "none": per_group}[reduction]
    got = mmd_loss(x, y, 4, bandwidth, weight, reduction=reduction, backend=backend)
    assert got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_scalar_bandwidth_and_weight_forms(backend, device):
    """float, 0-dim tensor and (G,) tensor give the same loss; weight=None means 1."""
    x, y, _, _ = make_inputs(2, 3, 20, torch.float64, device)
    as_float = mmd_loss(x, y, 2, 3.0, 2.0, backend=backend)
    as_scalar = mmd_loss(x, y, 2, torch.tensor(3.0, dtype=torch.float64), torch.tensor(2.0), backend=backend)
    as_vector = mmd_loss(x, y, 2, torch.full((3,), 3.0), torch.full((3,), 2.0), backend=backend)
    torch.testing.assert_close(as_float, as_scalar)
    torch.testing.assert_close(as_float, as_vector)
    torch.testing.assert_close(mmd_loss(x, y, 2, 3.0, backend=backend) * 2.0, as_float)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_scalar_bandwidth_tensor_gets_summed_gradient(backend, device):
    x, y, bandwidth, _ = make_inputs(2, 3, 20, torch.float64, device)
    b = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(mmd_loss(x, y, 2, b, backend=backend, reduction="sum"), b)
    b_vec = torch.full((3,), 2.5, dtype=torch.float64, requires_grad=True)
    (grad_vec,) = torch.autograd.grad(mmd_loss(x, y, 2, b_vec, backend=backend, reduction="sum"), b_vec)
    torch.testing.assert_close(grad, grad_vec.sum())


# ----------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------


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
    """DESIGN §3's dL/dz_i = sum_j A_ij (z_i - z_j), and dL/db, dL/dw, written out in float64."""
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


# ----------------------------------------------------------------------------
# Accuracy when a group's outputs converge (late training)
# ----------------------------------------------------------------------------


def nearly_equal_group(group_size, num_groups, num_features, spread, device):
    """Rows = a shared centre of norm ~ sqrt(D) plus perturbations of relative size `spread`."""
    gen = torch.Generator().manual_seed(7)
    centre = 3.0 + torch.randn(num_groups, 1, num_features, generator=gen, dtype=torch.float64)
    noise = lambda: spread * 3.0 * torch.randn(num_groups, group_size, num_features, generator=gen, dtype=torch.float64)  # noqa: E731
    x = (centre + noise()).reshape(-1, num_features).float()
    y = (centre + noise()).reshape(-1, num_features).float()
    typical = spread * 3.0 * math.sqrt(2 * num_features)  # typical pair distance
    bandwidth = torch.full((num_groups,), num_features / typical, dtype=torch.float64)
    return x.to(device), y.to(device), bandwidth.to(device)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nearly_equal_outputs_are_accurate(backend, device):
    """Distances 1e-3 of the norms: direct differences keep fp32 within 1e-5 of float64.

    The Gram expansion |a|^2 + |b|^2 - 2ab loses ~6 digits here; the last check
    shows it, so this case really separates the two formulations.
    """
    group_size, num_groups, num_features = 4, 2, 257
    x, y, bandwidth = nearly_equal_group(group_size, num_groups, num_features, 1e-3, device)
    weight = torch.ones(num_groups, dtype=torch.float64, device=device)
    loss, grads = loss_and_grads(x, y, group_size, bandwidth, weight, backend, reduction="none")
    exact_loss, exact_grads = loss_and_grads(x.double(), y.double(), group_size, bandwidth, weight, "torch", reduction="none")
    assert rel_err(loss, exact_loss) < 1e-5
    for got, exact in zip(grads, exact_grads):
        assert rel_err(got, exact) < 1e-4

    z = x.reshape(num_groups, group_size, -1)
    gram_sq = (z.square().sum(-1)[:, :, None] + z.square().sum(-1)[:, None, :] - 2 * z @ z.transpose(1, 2))
    exact_sq = (z.double()[:, :, None] - z.double()[:, None, :]).square().sum(-1)
    off_diag = ~torch.eye(group_size, dtype=torch.bool, device=device)
    assert rel_err(gram_sq[:, off_diag], exact_sq[:, off_diag]) > 1e-3


# ----------------------------------------------------------------------------
# Layouts: non-contiguous inputs, stride-0 grad_output, feature shapes
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_inputs(backend, device):
    group_size, num_groups, num_features = 4, 2, 24
    x, y, bandwidth, weight = make_inputs(group_size, num_groups, num_features, device=device)
    layouts = {
        # chunk of a wider activation: row stride 2D, unit column stride (no copy)
        "chunk": (torch.cat([x, y], dim=1).chunk(2, dim=1)[0], torch.cat([y, x], dim=1).chunk(2, dim=1)[0]),
        # transposed storage: column stride B (copied to rows first)
        "transposed": (x.t().contiguous().t(), y.t().contiguous().t()),
        # every other row of a taller tensor
        "strided rows": (torch.repeat_interleave(x, 2, dim=0)[::2], torch.repeat_interleave(y, 2, dim=0)[::2]),
        # image-shaped features (B, C, H, W), y a permuted (channels-last-like) view
        "4-d": (x.reshape(-1, 2, 3, 4), y.reshape(-1, 4, 3, 2).permute(0, 3, 2, 1)),
    }
    for name, (xv, yv) in layouts.items():
        loss, grads = loss_and_grads(xv, yv, group_size, bandwidth, weight, backend)
        ref_loss, ref_grads = loss_and_grads(xv, yv, group_size, bandwidth, weight, "torch")
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=name)
        for got, ref in zip(grads, ref_grads):
            assert got.shape == ref.shape, name
            assert rel_err(got, ref) < 1e-5, name


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_expanded_stride0_inputs(backend, device):
    """y broadcast from one row per batch (stride 0 over B) works without materializing."""
    x, y, bandwidth, weight = make_inputs(4, 2, 16, device=device)
    y_expanded = y[:1].expand_as(y)
    assert y_expanded.stride(0) == 0
    loss, grads = loss_and_grads(x, y_expanded, 4, bandwidth, weight, backend)
    ref_loss, ref_grads = loss_and_grads(x, y_expanded.contiguous(), 4, bandwidth, weight, "torch")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for got, ref in zip(grads, ref_grads):
        assert rel_err(got, ref) < 1e-5


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
# Low precision: the tolerance policy
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_policy(backend, dtype, device):
    """Kernel error <= 2x the same-dtype PyTorch error against fp32, plus a small atol.

    "fp32" is the reference on the float32 copy of the same low-precision values.
    Both paths compute in fp32, so the loss errors are fp32-sized; the gradients
    are rounded to `dtype` on output, in the reference (autograd of the upcast)
    as in the kernel. atol: 1e-6 for the loss, half an ulp of `dtype` at 1 for grads.
    """
    group_size, num_groups, num_features = 4, 3, 301
    x, y, bandwidth, weight = make_inputs(group_size, num_groups, num_features, dtype, device)
    loss, grads = loss_and_grads(x, y, group_size, bandwidth, weight, backend, reduction="none")
    same_dtype_loss, same_dtype_grads = loss_and_grads(x, y, group_size, bandwidth, weight, "torch", reduction="none")
    fp32_loss, fp32_grads = loss_and_grads(x.float(), y.float(), group_size, bandwidth, weight, "torch", reduction="none")
    assert loss.dtype == torch.float32
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    loss_err = (loss - fp32_loss).abs().max().item()
    assert loss_err <= 2 * (same_dtype_loss - fp32_loss).abs().max().item() + 1e-6
    grad_atol = torch.finfo(dtype).eps / 2
    for got, same, fp32 in zip(grads, same_dtype_grads, fp32_grads):
        err = (got.double() - fp32.double()).abs().max().item()
        ref_err = (same.double() - fp32.double()).abs().max().item()
        assert err <= 2 * ref_err + grad_atol * fp32.abs().max().item()


# ----------------------------------------------------------------------------
# Determinism, NaN/Inf, large offsets
# ----------------------------------------------------------------------------


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


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["x", "y"])
def test_non_finite_input_gives_nan(backend, bad, where, device):
    x, y, bandwidth, weight = make_inputs(3, 2, 9, device=device)
    (x if where == "x" else y)[4, 5] = bad  # group 1
    x.requires_grad_(True)
    per_group = mmd_loss(x, y, 3, bandwidth, weight, reduction="none", backend=backend)
    assert torch.isfinite(per_group[0]) and torch.isnan(per_group[1])
    assert torch.isnan(per_group.mean())
    (dx,) = torch.autograd.grad(per_group.sum(), x)
    assert torch.isfinite(dx[:3]).all() and torch.isnan(dx[3:]).any()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_overflowing_distances_are_not_taken_for_non_finite_input(backend, device):
    """Finite rows so far apart that fp32 S_ij overflows to Inf: k_ij = 0, the loss stays finite.

    (The native forward sums the diagonal S_ii only when an off-diagonal S_ij is not finite;
    here it must find every row finite, and agree with the float64 reference.)
    """
    x, y, bandwidth, weight = make_inputs(2, 2, 9, device=device)
    x[2:] *= 1e19  # group 1: the squares of its differences overflow fp32
    loss, grads = loss_and_grads(x, y, 2, bandwidth, weight, backend, reduction="none")
    expected, expected_grads = loss_and_grads(x.double(), y.double(), 2, bandwidth, weight, "torch", reduction="none")
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads[:2], expected_grads[:2]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_row_offsets_beyond_int32(backend, device):
    """Rows 2^29 elements apart: element offsets pass 2^31, as when B*D > 2^31.

    The storage is allocated but only the used rows are ever touched, so this
    costs a few KB of real memory on a CPU (lazy pages) and ~7.5 GB on a GPU.
    """
    group_size, num_groups, num_features, row_stride = 4, 2, 40, 2**29
    batch = group_size * num_groups
    try:
        storage = torch.empty((batch - 1) * row_stride + num_features, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError) as err:  # pragma: no cover - depends on the machine
        pytest.skip(f"cannot reserve {(batch * row_stride * 2) / 2**30:.1f} GiB: {err}")
    x, y, bandwidth, weight = make_inputs(group_size, num_groups, num_features, torch.float16, device)
    far = storage.as_strided((batch, num_features), (row_stride, 1))
    far.copy_(x)
    assert (batch - 1) * row_stride > 2**31
    loss, grads = loss_and_grads(far, y, group_size, bandwidth, weight, backend)
    ref_loss, ref_grads = loss_and_grads(x, y, group_size, bandwidth, weight, "torch")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert rel_err(grads[0], ref_grads[0]) < 1e-2  # fp16 gradients


# ----------------------------------------------------------------------------
# The native backend: thread-count independence, real B*D > 2^31, own guards
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# The Triton backend: forward with gradient, the device-side upstream test, grid sizing
# ----------------------------------------------------------------------------


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
def test_triton_forward_with_grad_equals_forward_then_backward(dtype, group_size, num_groups, num_features,
                                                               need_dy, device):
    """The forward that also writes the gradient gives, to the bit, what the forward and the backward give."""
    from imm_kernels.ops import mmd_triton

    x, y, bandwidth, weight = make_inputs(group_size, num_groups, num_features, dtype, device)
    cdtype = reference.compute_dtype(dtype)
    bandwidth, weight = bandwidth.to(cdtype), weight.to(cdtype)
    grad_loss = torch.rand(num_groups, dtype=cdtype, device=device) - 0.5
    fused = mmd_triton.mmd_forward_with_grad_triton(x, y, bandwidth, weight, group_size, 1e-8, grad_loss, True, need_dy)
    forward = mmd_triton.mmd_forward_triton(x, y, bandwidth, weight, group_size, 1e-8)
    backward = mmd_triton.mmd_backward_triton(grad_loss, x, y, forward[1], bandwidth, weight, group_size, 1e-8,
                                              True, need_dy)
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
    loss, (dx, dy, dbandwidth, dweight) = loss_and_grads(x, x.clone(), group_size, bandwidth, weight, "triton",
                                                         reduction="none")
    assert (loss == 0).all()
    assert (dx == 0).all() and (dy == 0).all() and (dweight == 0).all()
    torch.testing.assert_close(dbandwidth, torch.zeros_like(dbandwidth), rtol=0, atol=1e-9)


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
    want_dx, want_dy = mmd_triton.mmd_backward_triton(grad_loss, x, y, sqdist, bandwidth, weight, 4, 1e-8,
                                                      True, True)
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
    upstreams.append(torch.linspace(-1, 2, 6, dtype=torch.float64, device=device) if reduction == "none"
                     else torch.tensor(3.0, dtype=torch.float64, device=device))

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

    hopper = SimpleNamespace(regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                             shared_memory_per_multiprocessor=233472)
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


# ----------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------


def test_backends_report():
    report = imm_kernels.backends()
    assert set(report) == {"triton", "native", "cuda", "torch"}
    assert report["torch"] is None
    assert all(reason is None or isinstance(reason, str) for reason in report.values())


def test_pure_python_install_falls_back_to_the_reference():
    """Without imm_kernels._C (IMM_KERNELS_BUILD_NATIVE=0), native says why and auto uses torch."""
    code = (
        "import sys; sys.modules['imm_kernels._C'] = None\n"  # makes `from . import _C` raise ImportError
        "import torch, imm_kernels\n"
        "from imm_kernels.ops.backends import MMD_AUTO, choose_backend\n"
        "x = torch.randn(4, 3)\n"
        "print(imm_kernels.backends()['native'])\n"
        "print(choose_backend('auto', x.device, MMD_AUTO, group_size=2).name, float(imm_kernels.mmd_loss(x, x + 1, 2)) > 0)\n"
        "try:\n"
        "    imm_kernels.mmd_loss(x, x, 2, backend='native')\n"
        "except imm_kernels.BackendUnavailableError as err:\n"
        "    print(err)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    reason, picked, error = run.stdout.strip().splitlines()
    assert "imm_kernels._C is not built" in reason and "--no-build-isolation" in reason
    assert picked == "torch True"
    assert error.startswith("backend='native' is not available: the C++ extension imm_kernels._C")


@needs_native
def test_native_needs_cpu_tensors_and_cuda_explains_itself():
    x, y, *_ = make_inputs(2, 1, 4)
    if torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="backend='native' is not available: it runs on CPU"):
            mmd_loss(x.cuda(), y.cuda(), 2, backend="native")
    if REASONS["cuda"] is not None:
        with pytest.raises(BackendUnavailableError, match="backend='cuda' is not available: "):
            mmd_loss(x, y, 2, backend="cuda")


@needs_cuda
def test_cuda_rejects_too_large_group():
    x = torch.randn(18, 3, device="cuda")
    with pytest.raises(BackendUnavailableError, match="group_size=9 exceeds its limit of 8"):
        mmd_loss(x, x, 9, backend="cuda")


def test_auto_picks_by_device():
    from imm_kernels.ops.backends import MMD_AUTO, choose_backend

    def auto(x, group_size):
        return choose_backend("auto", x.device, MMD_AUTO, dtype=x.dtype, group_size=group_size).name

    x, *_ = make_inputs(2, 1, 4)
    expected_cpu = "native" if REASONS["native"] is None else "torch"
    assert auto(x, 2) == expected_cpu
    if torch.cuda.is_available():
        fused_gpu = "triton" if REASONS["triton"] is None else "cuda" if REASONS["cuda"] is None else "torch"
        assert auto(x.cuda(), 2) == fused_gpu
        assert auto(x.cuda(), 33) == "torch"  # beyond every kernel's M limit


@needs_triton
def test_triton_rejects_too_large_group(device):
    x = torch.randn(66, 3, device=device)
    with pytest.raises(BackendUnavailableError, match="group_size=33 exceeds"):
        mmd_loss(x, x, 33, backend="triton")


# ----------------------------------------------------------------------------
# Bad input: every error names the argument
# ----------------------------------------------------------------------------

X = torch.randn(8, 3)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(x=X.tolist()), TypeError, "x must be a torch.Tensor"),
        (dict(y="nope"), TypeError, "y must be a torch.Tensor"),
        (dict(x=X.long(), y=X.long()), TypeError, "x must be float16, bfloat16, float32 or float64"),
        (dict(x=X.to(torch.complex64), y=X.to(torch.complex64)), TypeError, "x must be float16"),
        (dict(y=X.double()), TypeError, "y has dtype torch.float64 but x has torch.float32"),
        (dict(y=torch.randn(8, 4)), ValueError, r"same shape, got x \(8, 3\) and y \(8, 4\)"),
        (dict(x=torch.tensor(1.0), y=torch.tensor(1.0)), ValueError, "x must be"),
        (dict(x=torch.randn(0, 3), y=torch.randn(0, 3)), ValueError, "B >= 1"),
        (dict(x=torch.randn(8, 0), y=torch.randn(8, 0)), ValueError, "at least one feature"),
        (dict(group_size=3), ValueError, "batch size 8 of x is not divisible by group_size=3"),
        (dict(group_size=0), ValueError, "group_size must be >= 1"),
        (dict(group_size=2.0), TypeError, "group_size must be an int"),
        (dict(group_size=True), TypeError, "group_size must be an int"),
        (dict(bandwidth=torch.ones(3)), ValueError, r"bandwidth must be a float or a tensor of shape \(2,\)"),
        (dict(bandwidth=torch.ones(2, 1)), ValueError, "bandwidth must be a float or a tensor of shape"),
        (dict(bandwidth=torch.ones(2, dtype=torch.long)), TypeError, "bandwidth must be a floating-point tensor"),
        (dict(bandwidth="wide"), TypeError, "bandwidth must be a float or a tensor"),
        (dict(bandwidth=-1.0), ValueError, "bandwidth must be non-negative"),
        (dict(weight=torch.ones(4)), ValueError, r"weight must be a float or a tensor of shape \(2,\)"),
        (dict(weight=[1.0, 2.0]), TypeError, "weight must be a float or a tensor"),
        (dict(eps=-1e-3), ValueError, "eps must be a non-negative float"),
        (dict(eps="small"), ValueError, "eps must be a non-negative float"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(backend="cuda-graph"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input_raises(kwargs, error, match):
    args = dict(x=X, y=X + 1, group_size=4)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        mmd_loss(args.pop("x"), args.pop("y"), args.pop("group_size"), **args)


def test_mixed_devices_raise():
    if not torch.cuda.is_available():
        meta = torch.empty(8, 3, device="meta")
        with pytest.raises(ValueError, match="y is on meta but x is on cpu"):
            mmd_loss(X, meta, 4)
        with pytest.raises(ValueError, match="bandwidth is on meta but x is on cpu"):
            mmd_loss(X, X, 4, torch.ones(2, device="meta"))
    else:
        with pytest.raises(ValueError, match="y is on cuda:0 but x is on cpu"):
            mmd_loss(X, X.cuda(), 4)


# ----------------------------------------------------------------------------
# torch.compile: a whole training step, no graph breaks
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_compiled_training_step_fullgraph(backend, device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.SiLU(), torch.nn.Linear(16, 10)).to(device)
    inputs = torch.randn(8, 6, device=device)
    target = torch.randn(8, 10, device=device)
    bandwidth = torch.rand(2, device=device) + 1.0

    def step(inputs, target, bandwidth):
        out = net(inputs)
        return mmd_loss(out, target, 4, bandwidth, 0.5, backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(inputs, target, bandwidth)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    eager_loss = step(inputs, target, bandwidth)
    eager_grads = torch.autograd.grad(eager_loss, list(net.parameters()))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, eager_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------
# IMM's extreme shapes, and the GPU build (checked without a GPU)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_huge_feature_dimension(backend, device):
    """D = 2^20 in one group: the D loop and the split across programs."""
    x, y, bandwidth, weight = make_inputs(4, 1, 2**20, device=device)
    loss, grads = loss_and_grads(x, y, 4, bandwidth, weight, backend)
    exact_loss, exact_grads = loss_and_grads(x.double(), y.double(), 4, bandwidth, weight, "torch")
    torch.testing.assert_close(loss.double(), exact_loss, rtol=1e-5, atol=1e-6)
    for got, exact in zip(grads, exact_grads):
        assert rel_err(got, exact) < 1e-5


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_thousands_of_groups(backend, device):
    x, y, bandwidth, weight = make_inputs(2, 1024, 3, device=device)
    loss, grads = loss_and_grads(x, y, 2, bandwidth, weight, backend, reduction="none")
    exact_loss, exact_grads = loss_and_grads(x.double(), y.double(), 2, bandwidth, weight, "torch", reduction="none")
    torch.testing.assert_close(loss.double(), exact_loss, rtol=1e-5, atol=1e-6)
    for got, exact in zip(grads, exact_grads):
        assert rel_err(got, exact) < 1e-5


def test_triton_kernels_compiled_for_sm90():
    """Every shipped tile compiles for Hopper as the JIT specializes a launch (no GPU needed:
    Triton ships ptxas), and the compiled code does what the kernels' layout promises:

    - fp32/bf16: no spills in the kernels an IMM training step runs (forward, forward with dx,
      dx backward) up to M = 8; at most 48 bytes in the dx+dy backward (three M x M coefficient
      blocks live at once: Triton 3.6 spills 40 bytes at M = 8 in fp32) and at M >= 16, where
      the pairs spread over the threads (8 bytes here and there, by Triton version; the
      narrower tiles that avoid it cost 40-100% more instructions per element). fp64, a
      correctness path, may spill;
    - no shuffles in any S loop: pair sums are accumulated element-wise and reduced after it;
    - where a tile puts all of a column's rows in one thread (M <= 8), the S loop's
      floating-point work per element streamed is 2M: the pairs i < j of xx and yy, all of
      xy and one op per diagonal entry (all 4M^2 pairs would be 4M per element);
    - the dx-only backward does at most ~half the arithmetic of the dx+dy one (x's rows only);
    - the headline case, M = 4 bf16, streams at most 16 instructions per element in its S loop
      (the kernel before this layout issued 80, 28 of them shuffles).
    """
    import json
    import pathlib

    pytest.importorskip("triton.backends.nvidia")
    import imm_kernels.ops.mmd_triton as mmd_triton

    script = pathlib.Path(__file__).parents[1] / "benchmarks" / "ptxas_report.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script), "--json"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(run.stdout)
    tiles = mmd_triton._TILE_CONFIG
    assert len(rows) == 6 * (2 * len(tiles[False]) + len(tiles[True]))
    fp_work = {}
    for row in rows:
        in_training_step = row["kernel"] != "backward_dxdy" and row["M"] <= 8
        allowed_spill = None if row["dtype"] == "fp64" else 0 if in_training_step else 48
        if allowed_spill is not None:
            assert row["stack_bytes"] <= allowed_spill, row
        loops = row["loops"]
        fp = {name: loop["fp32"] + loop["fp64"] for name, loop in loops.items()}
        fp_work[row["kernel"], row["dtype"], row["M"]] = sum(fp.values())
        if "S" in loops:
            assert loops["S"]["shuffles"] == 0, row
            if row["M"] <= 8 and row["BLOCK_D"] >= 32 * row["num_warps"]:
                assert fp["S"] == 2 * row["M"], row
    for (kernel, dtype, group_size), work in fp_work.items():
        if kernel == "backward_dx":
            assert work <= 0.55 * fp_work["backward_dxdy", dtype, group_size]
    (headline,) = [r for r in rows if (r["kernel"], r["dtype"], r["M"]) == ("forward", "bf16", 4)]
    assert headline["loops"]["S"]["instructions"] <= 16, headline


def test_cuda_kernels_compile_for_sm90():
    """csrc/mmd_cuda.cu compiles for Hopper with nvcc (no GPU needed); fp32 kernels never spill;
    the finalize kernel (a warp per group) never touches thread-local memory.

    The CUDA backend cannot run on a CPU machine, so this is what CI can check of it.
    """
    import json
    import pathlib
    import shutil

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found")
    script = pathlib.Path(__file__).parents[1] / "benchmarks" / "nvcc_report.py"
    run = subprocess.run([sys.executable, str(script), "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = json.loads(run.stdout)
    kernels = {(r["kernel"], r["dtype"], r["max_m"]) for r in rows}
    for dtype in ("float", "double", "Half", "BFloat16"):
        for max_m in (1, 2, 4, 8):
            assert {("forward", dtype, max_m), ("backward", dtype, max_m)} <= kernels
    for max_m in (1, 2, 4, 8):
        assert {("finalize", "float (acc)", max_m), ("finalize", "double (acc)", max_m)} <= kernels
    for row in rows:
        if row["dtype"] == "float":
            assert row["spill_bytes"] == 0, row
        if row["kernel"] == "finalize":  # a warp per group: no thread-local arrays, shuffles
            assert row["spill_bytes"] == 0 and row["local"] == 0 and row["shuffles"] > 0, row


@needs_native
def test_interleaved_cpu_benchmark_runs():
    """benchmarks/mmd_cpu_interleaved.py, which BENCHMARKS.md cites, runs and checks native against compiled."""
    import pathlib

    script = pathlib.Path(__file__).parents[1] / "benchmarks" / "mmd_cpu_interleaved.py"
    run = subprocess.run(
        [sys.executable, str(script), "--rounds", "4", "--shape", "16,4,64"], capture_output=True, text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "16x4x64 float32 forward+backward" in run.stdout
    assert "compiled / native, per round: median" in run.stdout
