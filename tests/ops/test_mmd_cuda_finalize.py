"""The CUDA forward's per-group finalisation, run on the CPU.

csrc/mmd_cuda_finalize.h holds the finalisation's indexing and order of additions as
host-and-device functions; tests/ops/mmd_cuda_finalize_host.cpp runs them for the 32 lanes
of a warp in turn and adds the lane sums in the shuffle tree's order (built here with
g++, loaded with ctypes). Without a GPU this checks which entries of S each lane reads,
the split order, the eps and NaN semantics, and the sums against the native backend and
the reference maths. On a GPU, the last test also compares the CUDA forward itself with
the emulation (CUDA's exp and sqrt are a few ulp from glibc's) and checks x == y there.
"""

import ctypes
import math
import pathlib
import shutil
import subprocess

import pytest
import torch

import imm_kernels
from imm_kernels.ops.reference import laplace_distance

ROOT = pathlib.Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float64]


def plan_max_m(group_size: int) -> int:
    """The MAX_M instantiation mmd_forward_cuda runs a group size with."""
    return next(m for m in (1, 2, 4, 8) if group_size <= m)


@pytest.fixture(scope="module")
def host_finalize(tmp_path_factory):
    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ not found")
    library = tmp_path_factory.mktemp("finalize") / "mmd_cuda_finalize_host.so"
    command = [
        compiler,
        "-std=c++17",
        "-O3",
        "-ffp-contract=off",
        "-shared",
        "-fPIC",
        "-w",
        f"-I{ROOT / 'csrc'}",
        *(f"-I{path}" for path in include_paths()),
        str(ROOT / "tests" / "ops" / "mmd_cuda_finalize_host.cpp"),
        "-o",
        str(library),
    ]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return ctypes.CDLL(str(library))


def finalize(library, partial, group_size, bandwidth, eps, num_features, max_m=None):
    """(S, MMD^2, dMMD^2/db) of one group from its partial sums (num_splits, PAIRS), as the CUDA forward makes them."""
    dtype = partial.dtype
    scalar = ctypes.c_float if dtype == torch.float32 else ctypes.c_double
    function = library.finalize_group_float if dtype == torch.float32 else library.finalize_group_double
    function.restype = ctypes.c_bool
    function.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int,
        ctypes.c_int,
        scalar,
        ctypes.c_double,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    partial = partial.contiguous()
    rows = 2 * group_size
    sqdist, result = torch.empty(rows, rows, dtype=dtype), torch.empty(2, dtype=dtype)
    max_m = max_m or plan_max_m(group_size)
    assert function(
        partial.data_ptr(),
        partial.shape[0],
        group_size,
        max_m,
        bandwidth,
        eps,
        num_features,
        sqdist.data_ptr(),
        result.data_ptr(),
    )
    return sqdist, result[0], result[1]


def packed(sqdist, max_m):
    """The (PAIRS,) upper triangle of S among 2 MAX_M rows, as the forward kernel writes it (unused rows 0)."""
    rows = 2 * max_m
    padded = sqdist.new_zeros(rows, rows)
    padded[: sqdist.shape[0], : sqdist.shape[1]] = sqdist
    i, j = torch.triu_indices(rows, rows)
    return padded[i, j]


# (i, j) -> the index of pair i <= j in the packed upper triangle, per number of rows.
PAIR_INDEX = {
    rows: {tuple(ij): p for p, ij in enumerate(torch.triu_indices(rows, rows).T.tolist())} for rows in (2, 4, 8, 16)
}


def random_sqdist(group_size, dtype, seed=0, scale=1.0):
    """S of 2M random points in 5 dimensions: symmetric, zero diagonal."""
    points = torch.randn(2 * group_size, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (scale * ((points[:, None] - points[None]) ** 2).sum(-1)).to(dtype)


def reference_mmd(sqdist, group_size, bandwidth, eps, num_features):
    """(MMD^2, dMMD^2/db) from S by reference.py's maths, in float64."""
    sqdist = sqdist.double()
    sign = torch.ones(2 * group_size, dtype=torch.float64)
    sign[group_size:] = -1
    signs = sign[:, None] * sign[None]
    dist = laplace_distance(sqdist, eps)
    kern = torch.exp(-bandwidth * dist / num_features)
    pairs = group_size**2
    return (signs * kern).sum() / pairs, -(signs * kern * dist).sum() / pairs / num_features


def tolerances(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(imm_kernels.backends()["native"] is not None, reason="the native backend is not built")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [1, 2, 3, 5, 8])
def test_matches_native_backend(host_finalize, dtype, group_size):
    """From the S the native forward computes, the same MMD^2 and dMMD^2/db (up to the order of additions)."""
    from imm_kernels import _C

    num_groups, num_features, eps = 3, 37, 1e-4
    gen = torch.Generator().manual_seed(group_size)
    x = torch.randn(group_size * num_groups, num_features, generator=gen, dtype=dtype)
    y = 0.8 * torch.randn(group_size * num_groups, num_features, generator=gen, dtype=dtype) + 0.3
    y[0] = x[0]  # a pair at distance 0 < eps
    bandwidth = math.sqrt(num_features) * (0.5 + torch.rand(num_groups, generator=gen, dtype=torch.float64))
    bandwidth, weight = bandwidth.to(dtype), torch.ones(num_groups, dtype=dtype)
    _, sqdist, mmd2, dmmd_db = _C.mmd_forward_cpu(x, y, bandwidth, weight, group_size, eps)
    for group in range(num_groups):
        for max_m in {plan_max_m(group_size), 8}:
            got_sqdist, got_mmd2, got_dmmd_db = finalize(
                host_finalize,
                packed(sqdist[group], max_m)[None],
                group_size,
                bandwidth[group].item(),
                eps,
                num_features,
                max_m,
            )
            assert torch.equal(got_sqdist, sqdist[group])
            torch.testing.assert_close(got_mmd2, mmd2[group], **tolerances(dtype))
            torch.testing.assert_close(got_dmmd_db, dmmd_db[group], **tolerances(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_partials_are_added_in_split_order(host_finalize, dtype):
    """S_ij = ((0 + P_0) + P_1) + P_2 to the bit; the result then depends on S alone, not on the splits."""
    group_size, num_features, bandwidth, eps = 4, 100, 7.0, 1e-8
    gen = torch.Generator().manual_seed(1)
    scales = 10.0 ** torch.randint(-4, 4, (3, 36), generator=gen)
    partial = (torch.rand(3, 36, generator=gen, dtype=torch.float64) * scales).to(dtype)
    total = torch.zeros(36, dtype=dtype)
    for split in partial:
        total = total + split
    sqdist, mmd2, dmmd_db = finalize(host_finalize, partial, group_size, bandwidth, eps, num_features)
    i, j = torch.triu_indices(8, 8)
    assert torch.equal(sqdist[i, j], total) and torch.equal(sqdist[j, i], total)
    unsplit = finalize(host_finalize, total[None], group_size, bandwidth, eps, num_features)
    assert torch.equal(unsplit[1], mmd2) and torch.equal(unsplit[2], dmmd_db)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [1, 2, 3, 4, 5, 8])
def test_identical_halves_cancel_exactly(host_finalize, dtype, group_size):
    """x == y makes S = [[A, A], [A, A]]: MMD^2 and dMMD^2/db are exactly 0, whatever M.

    Each lane takes the four entries of a position together, (k_xx - k_xy) + (k_yy - k_yx), and rounds
    each k d before subtracting; a running sum over S row by row leaves rounding residues from M = 2 on.
    """
    block = random_sqdist(group_size, dtype, seed=group_size)[:group_size, :group_size]
    sqdist = block.repeat(2, 2)
    _, mmd2, dmmd_db = finalize(host_finalize, packed(sqdist, plan_max_m(group_size))[None], group_size, 3.0, 1e-8, 5)
    assert mmd2.item() == 0.0 and dmmd_db.item() == 0.0


def test_eps_close_pairs_have_distance_eps(host_finalize):
    """S <= eps^2 gives d = eps (S = eps^2 too), S just above it d = sqrt(S), as reference.laplace_distance."""
    eps, bandwidth, num_features = 0.1, 2.0, 3
    for s, close in [(0.0, True), (0.5 * eps**2, True), (eps**2, True), (4 * eps**2, False)]:
        sqdist = torch.tensor([[0.0, s], [s, 0.0]], dtype=torch.float64)
        _, mmd2, dmmd_db = finalize(host_finalize, packed(sqdist, 1)[None], 1, bandwidth, eps, num_features)
        assert (mmd2.item() == 0.0 and dmmd_db.item() == 0.0) == close, s
        want = reference_mmd(sqdist, 1, bandwidth, eps, num_features)
        torch.testing.assert_close((mmd2, dmmd_db), want, rtol=1e-14, atol=0)
    sqdist = random_sqdist(5, torch.float64, seed=2, scale=1e-3)  # about half the pairs within eps
    sqdist[1, 7] = sqdist[7, 1] = eps**2
    assert ((sqdist <= eps**2).sum() - 10) // 2 > 10
    _, mmd2, dmmd_db = finalize(host_finalize, packed(sqdist, 8)[None], 5, bandwidth, eps, num_features)
    torch.testing.assert_close(
        (mmd2, dmmd_db), reference_mmd(sqdist, 5, bandwidth, eps, num_features), rtol=1e-12, atol=1e-15
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("entry", [(0, 0), (1, 6), (5, 2), (7, 7)])
def test_non_finite_entries_propagate(host_finalize, dtype, entry):
    """A NaN partial sum makes S_ij, S_ji, MMD^2 and dMMD^2/db NaN; an infinite S_ij gives k = 0, so a finite
    MMD^2, and k d = 0 * inf = NaN in dMMD^2/db, as reference.py's maths."""
    group_size, bandwidth, eps, num_features = 4, 2.0, 1e-8, 5
    i, j = entry
    for bad in (float("nan"), float("inf")):
        sqdist = random_sqdist(group_size, dtype, seed=3)
        partial = packed(sqdist, group_size).repeat(2, 1) / 2  # two splits of S / 2
        partial[1, PAIR_INDEX[8][min(i, j), max(i, j)]] = bad
        got_sqdist, mmd2, dmmd_db = finalize(host_finalize, partial, group_size, bandwidth, eps, num_features)
        sqdist[i, j] = sqdist[j, i] = bad
        assert torch.equal(got_sqdist.isnan(), sqdist.isnan()) and torch.equal(got_sqdist.isinf(), sqdist.isinf())
        want = reference_mmd(sqdist, group_size, bandwidth, eps, num_features)
        torch.testing.assert_close((mmd2.double(), dmmd_db.double()), want, equal_nan=True, **tolerances(dtype))
        assert dmmd_db.isnan() and mmd2.isnan() == math.isnan(bad)


@pytest.mark.skipif(imm_kernels.backends()["cuda"] is not None, reason="the cuda backend is not available")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "group_size,num_groups,num_features",
    [(3, 2, 300), (8, 1, 20000), (5, 700, 40)],  # unsplit, D split (finalize kernel), many groups
)
def test_cuda_forward_matches_host_emulation(host_finalize, dtype, group_size, num_groups, num_features):
    """On a GPU: from the S the CUDA forward returns, the emulation gives its MMD^2 and dMMD^2/db (up to
    CUDA's exp and sqrt), and x == y gives exactly 0 there too."""
    from imm_kernels import _C

    eps = 1e-6
    gen = torch.Generator().manual_seed(group_size)
    x = torch.randn(group_size * num_groups, num_features, generator=gen, dtype=dtype).cuda()
    y = (0.8 * torch.randn(group_size * num_groups, num_features, generator=gen, dtype=dtype) + 0.3).cuda()
    bandwidth = math.sqrt(num_features) * (0.5 + torch.rand(num_groups, generator=gen, dtype=torch.float64))
    bandwidth, weight = bandwidth.to(dtype).cuda(), torch.ones(num_groups, dtype=dtype, device="cuda")
    _, sqdist, mmd2, dmmd_db = (t.cpu() for t in _C.mmd_forward_cuda(x, y, bandwidth, weight, group_size, eps))
    for group in range(min(num_groups, 4)):
        got = finalize(
            host_finalize,
            packed(sqdist[group], plan_max_m(group_size))[None],
            group_size,
            bandwidth[group].item(),
            eps,
            num_features,
        )
        assert torch.equal(got[0], sqdist[group])
        torch.testing.assert_close((got[1], got[2]), (mmd2[group], dmmd_db[group]), **tolerances(dtype))
    _, _, mmd2, dmmd_db = _C.mmd_forward_cuda(x, x.clone(), bandwidth, weight, group_size, eps)
    assert (mmd2 == 0).all() and (dmmd_db == 0).all()
