"""mmd_loss values: the reference against a hand computation and float64, every kernel
backend against the reference, across group sizes, layouts, dtypes and IMM's extreme shapes.
"""

import math

import numpy as np
import pytest
import torch

from imm_kernels import mmd_loss
from imm_kernels.ops import reference
from imm_kernels.ops.reference import mmd_loss_reference

from helpers import (
    ALL_BACKENDS,
    KERNEL_BACKENDS,
    loss_and_grads,
    make_inputs,
    rel_err,
    skip_beyond_cuda_limit,
)


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


# (group_size, num_groups, D): odd D, D not a multiple of any block size, and
# num_groups below the interpreter's target of 4 programs so D is split too.
PARITY_CASES = [
    (1, 5, 37),
    (1, 2, 1001),
    (2, 4, 37),
    (2, 1, 1001),
    (3, 3, 37),
    (3, 2, 515),
    (4, 4, 37),
    (4, 1, 1001),
    (8, 2, 37),
    (8, 1, 515),
    (16, 2, 37),
    (16, 1, 203),
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("group_size,num_groups,num_features", PARITY_CASES)
def test_fp32_parity_with_float64(backend, group_size, num_groups, num_features, device):
    skip_beyond_cuda_limit(backend, group_size)
    x, y, bandwidth, weight = make_inputs(group_size, num_groups, num_features, device=device, seed=num_features)
    loss, grads = loss_and_grads(x, y, group_size, bandwidth, weight, backend, reduction="none")
    ref_loss, ref_grads = loss_and_grads(x, y, group_size, bandwidth, weight, "torch", reduction="none")
    exact_loss, exact_grads = loss_and_grads(
        x.double(), y.double(), group_size, bandwidth, weight, "torch", reduction="none"
    )
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
    exact_loss, exact_grads = loss_and_grads(
        x.double(), y.double(), group_size, bandwidth, weight, "torch", reduction="none"
    )
    assert rel_err(loss, exact_loss) < 1e-5
    for got, exact in zip(grads, exact_grads):
        assert rel_err(got, exact) < 1e-4

    z = x.reshape(num_groups, group_size, -1)
    gram_sq = z.square().sum(-1)[:, :, None] + z.square().sum(-1)[:, None, :] - 2 * z @ z.transpose(1, 2)
    exact_sq = (z.double()[:, :, None] - z.double()[:, None, :]).square().sum(-1)
    off_diag = ~torch.eye(group_size, dtype=torch.bool, device=device)
    assert rel_err(gram_sq[:, off_diag], exact_sq[:, off_diag]) > 1e-3


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
    fp32_loss, fp32_grads = loss_and_grads(
        x.float(), y.float(), group_size, bandwidth, weight, "torch", reduction="none"
    )
    assert loss.dtype == torch.float32
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    loss_err = (loss - fp32_loss).abs().max().item()
    assert loss_err <= 2 * (same_dtype_loss - fp32_loss).abs().max().item() + 1e-6
    grad_atol = torch.finfo(dtype).eps / 2
    for got, same, fp32 in zip(grads, same_dtype_grads, fp32_grads):
        err = (got.double() - fp32.double()).abs().max().item()
        ref_err = (same.double() - fp32.double()).abs().max().item()
        assert err <= 2 * ref_err + grad_atol * fp32.abs().max().item()


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
