"""mmd_loss on bad input (every error names the argument), on non-finite input (NaN out,
never a silent number), and the backend choice (what is available, what auto picks, why not).
"""

import subprocess
import sys

import pytest
import torch

import imm_kernels
from imm_kernels import BackendUnavailableError, mmd_loss

from helpers import (
    ALL_BACKENDS,
    REASONS,
    loss_and_grads,
    make_inputs,
    needs_cuda,
    needs_native,
    needs_triton,
)


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
        "picked = choose_backend('auto', x.device, MMD_AUTO, group_size=2).name\n"
        "print(picked, float(imm_kernels.mmd_loss(x, x + 1, 2)) > 0)\n"
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
        (dict(bandwidth=-1.0), ValueError, "bandwidth must be >= 0, got -1.0"),
        (dict(weight=torch.ones(4)), ValueError, r"weight must be a float or a tensor of shape \(2,\)"),
        (dict(weight=[1.0, 2.0]), TypeError, "weight must be a float or a tensor"),
        (dict(eps=-1e-3), ValueError, "eps must be >= 0, got -0.001"),
        (dict(eps="small"), ValueError, "eps must be a finite number, got 'small'"),
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


# Every backend name, available here or not: arguments are checked before a backend is chosen.
@pytest.mark.parametrize("backend", ["torch", "triton", "native", "cuda"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["bandwidth", "weight", "eps"])
def test_non_finite_number_arguments_raise(name, bad, backend):
    """A NaN or infinite Python number would silently give NaN, 0 or inf: it is refused up front."""
    with pytest.raises(ValueError, match=f"^{name} must be a finite number, got {bad}$"):
        mmd_loss(X, X + 1, 4, backend=backend, **{name: bad})


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name", ["bandwidth", "weight"])
def test_nan_in_a_per_group_tensor_gives_that_group_nan(name, backend, device):
    """Tensor values are not read (that would wait for the device): NaN in, NaN out, per group."""
    x, y, bandwidth, weight = make_inputs(3, 2, 9, device=device)
    args = dict(bandwidth=bandwidth, weight=weight)
    args[name] = args[name].clone()
    args[name][1] = float("nan")
    per_group = mmd_loss(x, y, 3, **args, reduction="none", backend=backend)
    assert torch.isfinite(per_group[0]) and torch.isnan(per_group[1])
