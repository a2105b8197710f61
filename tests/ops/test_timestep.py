"""timestep_embedding: the Triton kernel against the reference, the reference against
an independent float64 computation (Python's math), at IMM's times (1000 t, t in [0, 1])."""

import math

import pytest
import torch

import imm_kernels
from imm_kernels import timestep_embedding
from imm_kernels.ops.backends import TRITON
from imm_kernels.ops.reference import timestep_embedding_reference

from helpers import DEVICE

TRITON_REASON = TRITON.unavailable(torch.device(DEVICE))
needs_triton = pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton unavailable: {TRITON_REASON}")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
FP32_HALF_ULP_AT_1 = 2.0**-24


def imm_times(n=64, seed=0):
    """1000 t for t ~ U(0, 1), with the ends 0 and 1000 and a value just below 1000."""
    gen = torch.Generator().manual_seed(seed)
    t = 1000 * torch.rand(n, generator=gen)
    t[:3] = torch.tensor([0.0, 1000.0, 999.99])
    return t.to(DEVICE)


def exact_embedding(t, dim, max_period=10000):
    """Python floats (IEEE double, correctly rounded libm) for every entry."""
    half = dim // 2
    freqs = [math.exp(-math.log(max_period) * i / half) for i in range(half)]
    rows = []
    for time in t.tolist():
        args = [time * f for f in freqs]
        rows.append([math.cos(a) for a in args] + [math.sin(a) for a in args] + [0.0] * (dim % 2))
    return torch.tensor(rows, dtype=torch.float64, device=t.device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [256, 257, 33, 2, 1])
def test_matches_float64_to_fp32_rounding(backend, dim):
    """Every entry within one half-ulp of 1 of the float64 value: the output's own rounding."""
    t = imm_times()
    emb = timestep_embedding(t, dim, backend=backend)
    assert emb.shape == (t.shape[0], dim) and emb.dtype == torch.float32
    err = (emb.double() - exact_embedding(t, dim)).abs().max().item()
    assert err <= FP32_HALF_ULP_AT_1, err


def test_dit_fp32_formula_is_less_accurate():
    """Why the embedding is computed in float64: DiT's fp32 formula loses ~1e-4 at t ~ 1000."""
    t = imm_times()
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    naive = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    assert (naive.double() - exact_embedding(t, 256)).abs().max().item() > 1e-5


@needs_triton
@pytest.mark.parametrize("max_period", [10000, 10, 12345.678])
def test_triton_matches_reference(max_period):
    t = imm_times()
    torch.testing.assert_close(
        timestep_embedding(t, 160, max_period, backend="triton"),
        timestep_embedding_reference(t, 160, max_period),
        rtol=0,
        atol=FP32_HALF_ULP_AT_1,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes_and_layouts(backend):
    """float64 t -> float64 output; integer and bf16 t; a strided t."""
    t = imm_times(32)
    t64 = timestep_embedding(t.double(), 64, backend=backend)
    assert t64.dtype == torch.float64
    torch.testing.assert_close(t64, exact_embedding(t, 64), rtol=0, atol=1e-12)
    steps = torch.arange(0, 1000, 37, device=DEVICE)
    torch.testing.assert_close(
        timestep_embedding(steps, 64, backend=backend), exact_embedding(steps.double(), 64).float()
    )
    t_low = t.bfloat16()
    torch.testing.assert_close(
        timestep_embedding(t_low, 64, backend=backend), exact_embedding(t_low.double(), 64).float()
    )
    strided = t[::3]
    torch.testing.assert_close(timestep_embedding(strided, 64, backend=backend), exact_embedding(strided, 64).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64(backend):
    t = (imm_times(6).double() / 100).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: timestep_embedding(t, 9, backend=backend), (t,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_nan_out(backend):
    t = imm_times(4)
    t[2] = float("nan")
    emb = timestep_embedding(t, 16, backend=backend)
    assert emb[2].isnan().all() and emb[[0, 1, 3]].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    assert timestep_embedding(torch.empty(0, device=DEVICE), 8, backend=backend).shape == (0, 8)


def test_bad_input_raises_naming_the_argument():
    t = imm_times(4)
    with pytest.raises(ValueError, match="t must be a 1-D tensor"):
        timestep_embedding(t[:, None], 8)
    with pytest.raises(TypeError, match="t must be a torch.Tensor"):
        timestep_embedding([1.0, 2.0], 8)
    with pytest.raises(TypeError, match="t must be a real floating-point or integer tensor"):
        timestep_embedding(t > 1, 8)
    with pytest.raises(TypeError, match="dim must be an int"):
        timestep_embedding(t, 8.0)
    with pytest.raises(ValueError, match="dim must be >= 1"):
        timestep_embedding(t, 0)
    with pytest.raises(ValueError, match="max_period must be a positive finite number"):
        timestep_embedding(t, 8, max_period=0)
    with pytest.raises(ValueError, match="max_period must be a positive finite number"):
        timestep_embedding(t, 8, max_period=float("inf"))
    with pytest.raises(ValueError, match="backend must be one of"):
        timestep_embedding(t, 8, backend="native")


@needs_triton
def test_compiled_fullgraph():
    """The custom op traces through its fake under torch.compile(fullgraph=True), d/dt included."""
    torch._dynamo.reset()
    t = imm_times(8).requires_grad_()

    def embed(t):
        return timestep_embedding(t, 32, backend="triton").square().sum() + timestep_embedding(t, 7).sum()

    out = torch.compile(embed, fullgraph=True)(t)
    (grad,) = torch.autograd.grad(out, t)
    eager = embed(t)
    (eager_grad,) = torch.autograd.grad(eager, t)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad, eager_grad)


def test_public_export():
    assert imm_kernels.timestep_embedding is timestep_embedding
