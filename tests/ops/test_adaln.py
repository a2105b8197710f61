"""adaln_modulate / adaln_residual_modulate: the Triton kernels against the reference,
the reference against float64.

Without a GPU the kernels run in Triton's interpreter (see conftest.py): shapes
stay small but cover H not a power of two (24, 1152, 10: a row in two segments;
22: the second one padded) and a power of two (32: one segment), odd L, the
modulation as `chunk(6)` views of an (N, 6H) tensor and as stride-0 expansions,
and several L blocks (the interpreter's target of 4 programs splits L).
"""

import os
import subprocess
import sys

import pytest
import torch

import imm_kernels
from imm_kernels import adaln_modulate, adaln_residual_modulate
from imm_kernels.ops.adaln import (
    BACKWARD_PROGRAMS_PER_SM,
    MAX_HIDDEN,
    _rows_per_block,
    _segments,
)
from imm_kernels.ops.backends import TRITON
from imm_kernels.ops.reference import adaln_modulate_reference
from imm_kernels.ops.utils import programs_on

from helpers import DEVICE

TRITON_REASON = TRITON.unavailable(torch.device(DEVICE))
needs_triton = pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton unavailable: {TRITON_REASON}")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


def make_inputs(n, seq_len, hidden, dtype=torch.float32, seed=0):
    """x, y ~ N(0, 1) with a per-row offset (LayerNorm must remove it) and the six
    modulation vectors as `chunk(6, dim=1)` views of one (N, 6H) tensor, as in DiT."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, seq_len, hidden, generator=gen) + 3 * torch.randn(n, seq_len, 1, generator=gen)
    y = torch.randn(n, seq_len, hidden, generator=gen)
    modulation = 0.5 * torch.randn(n, 6 * hidden, generator=gen)
    as_leaf = lambda t: t.to(device=DEVICE, dtype=dtype).requires_grad_()  # noqa: E731
    return as_leaf(x), as_leaf(y), as_leaf(modulation)


def run(op, x, y, modulation, backend, eps=1e-6, seed=1):
    """Outputs and gradients of a random linear functional of them (h and, for the residual op, x_new)."""
    shift, scale, gate, *_ = modulation.chunk(6, dim=1)
    if op == "modulate":
        outputs = (adaln_modulate(x, shift, scale, eps, backend=backend),)
        inputs = (x, modulation)
    else:
        outputs = adaln_residual_modulate(x, y, gate, shift, scale, eps, backend=backend)
        inputs = (x, y, modulation)
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=gen).to(o) for o in outputs]
    loss = sum((o.float() * w.float()).sum() for o, w in zip(outputs, weights))
    return outputs, torch.autograd.grad(loss, inputs)


def assert_all_close(got, expected, **tol):
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape
        torch.testing.assert_close(g, e, **tol)


# ----------------------------------------------------------------------------
# Parity with the reference, and the reference with float64
# ----------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("op", ["modulate", "residual"])
@pytest.mark.parametrize("shape", [(2, 5, 24), (1, 13, 24), (2, 3, 1152), (3, 1, 10), (2, 5, 32), (2, 3, 22)])
def test_triton_matches_reference_fp32(op, shape):
    x, y, modulation = make_inputs(*shape)
    outputs, grads = run(op, x, y, modulation, "triton")
    ref_outputs, ref_grads = run(op, x, y, modulation, "torch")
    assert_all_close(outputs, ref_outputs, rtol=1e-5, atol=1e-5)
    # dshift/dscale/dgate sum L rows in different orders: a few more ulps.
    assert_all_close(grads, ref_grads, rtol=1e-5, atol=5e-5)


@needs_triton
@pytest.mark.parametrize("op", ["modulate", "residual"])
def test_triton_matches_reference_fp64(op):
    x, y, modulation = make_inputs(2, 5, 24, torch.float64)
    outputs, grads = run(op, x, y, modulation, "triton")
    ref_outputs, ref_grads = run(op, x, y, modulation, "torch")
    assert_all_close(outputs, ref_outputs, rtol=1e-12, atol=1e-12)
    assert_all_close(grads, ref_grads, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["modulate", "residual"])
def test_reference_fp32_matches_fp64(op):
    x, y, modulation = make_inputs(2, 5, 1152)
    outputs, grads = run(op, x, y, modulation, "torch")
    exact = [t.detach().double().requires_grad_() for t in (x, y, modulation)]
    exact_outputs, exact_grads = run(op, *exact, "torch")
    assert_all_close([o.double() for o in outputs], exact_outputs, rtol=1e-5, atol=1e-5)
    assert_all_close([g.double() for g in grads], exact_grads, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["modulate", "residual"])
def test_gradcheck_fp64(op, backend):
    """Every input, the modulation as chunk(3) views of one tensor, both outputs of the
    residual op; H = 5 (odd). Full (not fast-mode) gradcheck: fast mode's random
    projections missed a 1e-4 relative error in dgate. Tiny, so the interpreter takes seconds."""
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randn(2, 2, 5, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_() for _ in range(2))
    modulation = (0.5 * torch.randn(2, 15, generator=gen, dtype=torch.float64)).to(DEVICE).requires_grad_()

    def function(x, y, modulation):
        shift, scale, gate = modulation.chunk(3, dim=1)
        if op == "modulate":
            return adaln_modulate(x, shift, scale, backend=backend)
        return adaln_residual_modulate(x, y, gate, shift, scale, backend=backend)

    inputs = (x, modulation) if op == "modulate" else (x, y, modulation)
    wrapped = function if op == "residual" else (lambda x, modulation: function(x, None, modulation))
    assert torch.autograd.gradcheck(wrapped, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


# ----------------------------------------------------------------------------
# bf16 / fp16: kernel error <= 2x the same-dtype PyTorch error against fp32, plus one ulp at 1
# ----------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 2**-7), (torch.float16, 2**-10)])
@pytest.mark.parametrize("op", ["modulate", "residual"])
def test_low_precision_policy(op, dtype, atol):
    """The reference in the low dtype rounds after LayerNorm, after 1 + scale, after the
    product and the sum; the kernel computes in fp32 and rounds once. Both are compared
    with the fp32 reference on the same (rounded) inputs; the atol is one ulp at 1."""
    x, y, modulation = make_inputs(2, 5, 1152, dtype)
    outputs, grads = run(op, x, y, modulation, "triton")
    assert_within_policy(x, y, modulation, outputs, grads, atol, op)


def assert_within_policy(x, y, modulation, outputs, grads, atol, op="residual"):
    """Each output and gradient: error vs the fp32 reference <= 2x the low-dtype reference's + atol."""
    low_outputs, low_grads = run(op, x, y, modulation, "torch")
    exact = [t.detach().float().requires_grad_() for t in (x, y, modulation)]
    exact_outputs, exact_grads = run(op, *exact, "torch")
    for got, pytorch, fp32 in zip([*outputs, *grads], [*low_outputs, *low_grads], [*exact_outputs, *exact_grads]):
        assert got.dtype == x.dtype
        pytorch_err = (pytorch.float() - fp32).abs().max().item()
        kernel_err = (got.float() - fp32).abs().max().item()
        assert kernel_err <= 2 * pytorch_err + atol, (kernel_err, pytorch_err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_fp32_stream_bf16_modulation(backend):
    """Under autocast a DiT's residual stream is fp32 and its modulation bf16: outputs
    are fp32, each gradient has its input's dtype, and the result equals the fp32
    computation on the bf16 values (the cast is exact)."""
    x, y, modulation = make_inputs(2, 5, 24)
    modulation = modulation.detach().bfloat16().requires_grad_()
    y_low = y.detach().bfloat16().requires_grad_()
    outputs, grads = run("residual", x, y_low, modulation, backend)
    as_fp32 = [x, y_low.detach().float().requires_grad_(), modulation.detach().float().requires_grad_()]
    exact_outputs, exact_grads = run("residual", *as_fp32, "torch")
    assert [o.dtype for o in outputs] == [torch.float32, torch.float32]
    assert [g.dtype for g in grads] == [torch.float32, torch.bfloat16, torch.bfloat16]
    assert_all_close(outputs, exact_outputs, rtol=1e-5, atol=1e-5)
    assert_all_close(
        [g.float() for g in grads], [g.to(o.dtype).float() for g, o in zip(exact_grads, grads)], rtol=1e-2, atol=1e-2
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_keeps_x_dtype(backend):
    """Under bf16 autocast both backends return x's dtype (autocast runs layer_norm in fp32),
    within the low-precision policy against the fp32 reference."""
    x, y, modulation = make_inputs(2, 3, 24, torch.bfloat16)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        outputs, grads = run("residual", x, y, modulation, backend)
    assert [o.dtype for o in outputs] == [torch.bfloat16] * 2
    assert_within_policy(x, y, modulation, outputs, grads, atol=2**-7)


# ----------------------------------------------------------------------------
# Layouts, partial use of the outputs, edge sizes, determinism
# ----------------------------------------------------------------------------


@needs_triton
def test_strided_and_expanded_inputs():
    """x and y as transposed views, shift as a stride-0 expansion of one (H,) vector,
    scale and gate with stride-0 rows, h's gradient a stride-0 expansion (from .sum())."""
    n, seq_len, hidden = 3, 5, 24
    gen = torch.Generator().manual_seed(0)
    leaf = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_()  # noqa: E731
    x_base, y_base = leaf(seq_len, n, hidden), leaf(seq_len, n, hidden)
    shift_vec, scale_vec, gate_base = leaf(hidden), leaf(hidden), leaf(1, hidden)

    def outputs(backend):
        x, y = x_base.transpose(0, 1), y_base.transpose(0, 1)
        shift, scale, gate = shift_vec.expand(n, hidden), scale_vec.expand(n, hidden), gate_base.expand(n, hidden)
        h, x_new = adaln_residual_modulate(x, y, gate, shift, scale, backend=backend)
        h2 = adaln_modulate(x, shift, scale, backend=backend)
        loss = h.sum() + 2 * h2.sum() + (x_new * x_new).sum()
        return (h, x_new, h2), torch.autograd.grad(loss, (x_base, y_base, shift_vec, scale_vec, gate_base))

    got, got_grads = outputs("triton")
    expected, expected_grads = outputs("torch")
    assert_all_close(got, expected, rtol=1e-5, atol=1e-5)
    assert_all_close(got_grads, expected_grads, rtol=1e-5, atol=5e-5)


@needs_triton
@pytest.mark.parametrize("used", ["h", "x_new"])
def test_residual_with_one_output_used(used):
    x, y, modulation = make_inputs(2, 3, 24)

    def grads(backend):
        shift, scale, gate, *_ = modulation.chunk(6, dim=1)
        h, x_new = adaln_residual_modulate(x, y, gate, shift, scale, backend=backend)
        out = h if used == "h" else x_new
        return torch.autograd.grad((out * out).sum(), (x, y, modulation))

    assert_all_close(grads("triton"), grads("torch"), rtol=1e-5, atol=5e-5)


@needs_triton
@pytest.mark.parametrize("shape", [(0, 3, 24), (2, 0, 24)])
def test_empty_batch_or_sequence(shape):
    x, y, modulation = make_inputs(*shape)
    outputs, grads = run("residual", x, y, modulation, "triton")
    assert [o.shape for o in outputs] == [x.shape, x.shape]
    assert all((g == 0).all() for g in grads)


@needs_triton
def test_backward_is_deterministic():
    """L = 13 in blocks of 4 rows, so dshift/dscale/dgate sum 4 partials; two runs agree bitwise."""
    assert _rows_per_block(1, 13, programs_on(torch.device(DEVICE), BACKWARD_PROGRAMS_PER_SM)) == 4
    x, y, modulation = make_inputs(1, 13, 1152)
    _, first = run("residual", x, y, modulation, "triton")
    _, second = run("residual", x, y, modulation, "triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_nan_out(backend):
    x, y, modulation = make_inputs(2, 3, 24)
    x = x.detach().clone()
    modulation = modulation.detach().clone()
    x[0, 1, 5] = float("nan")
    modulation[1, 7] = float("nan")  # shift[1, 7]
    shift, scale, _, *_ = modulation.chunk(6, dim=1)
    h = adaln_modulate(x, shift, scale, backend=backend)
    assert h[0, 1].isnan().all()  # the row's statistics are NaN
    assert h[1, :, 7].isnan().all()  # the shifted column
    finite = torch.ones_like(h, dtype=torch.bool)
    finite[0, 1] = False
    finite[1, :, 7] = False
    assert h[finite].isfinite().all()


# ----------------------------------------------------------------------------
# Bad input, dispatch, torch.compile
# ----------------------------------------------------------------------------


def test_bad_input_raises_naming_the_argument():
    x, y, modulation = (t.detach() for t in make_inputs(2, 3, 24))
    shift, scale, gate = modulation[:, :24], modulation[:, 24:48], modulation[:, 48:72]
    with pytest.raises(ValueError, match=r"x must be \(N, L, H\)"):
        adaln_modulate(x[0], shift, scale)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        adaln_modulate(x.long(), shift, scale)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        adaln_modulate(x.tolist(), shift, scale)
    with pytest.raises(ValueError, match=r"shift must have shape \(N, H\) = \(2, 24\)"):
        adaln_modulate(x, shift[:1], scale)
    with pytest.raises(ValueError, match="scale must have shape"):
        adaln_modulate(x, shift, scale[:, :, None])
    with pytest.raises(TypeError, match="scale must be a floating-point tensor, got torch.int32"):
        adaln_modulate(x, shift, scale.int())
    with pytest.raises(ValueError, match=r"y must have shape \(N, L, H\)"):
        adaln_residual_modulate(x, y[:, :2], gate, shift, scale)
    with pytest.raises(ValueError, match="gate must have shape"):
        adaln_residual_modulate(x, y, gate.T, shift, scale)
    with pytest.raises(ValueError, match="shift is on meta but x is on"):
        adaln_modulate(x, shift.to("meta"), scale)
    with pytest.raises(ValueError, match="eps must be a positive float"):
        adaln_modulate(x, shift, scale, 0.0)
    with pytest.raises(ValueError, match="eps must be a positive float"):
        adaln_residual_modulate(x, y, gate, shift, scale, eps=-1e-6)
    with pytest.raises(ValueError, match="backend must be one of"):
        adaln_modulate(x, shift, scale, backend="cuda")


@needs_triton
def test_rows_wider_than_the_kernel_take_the_reference():
    """H > MAX_HIDDEN: 'auto' falls back to the reference, 'triton' says why it cannot run."""
    x = torch.randn(1, 2, MAX_HIDDEN + 1, device=DEVICE)
    shift, scale = torch.randn(2, 1, MAX_HIDDEN + 1, device=DEVICE)
    torch.testing.assert_close(adaln_modulate(x, shift, scale), adaln_modulate_reference(x, shift, scale))
    with pytest.raises(imm_kernels.BackendUnavailableError, match="H=16385 exceeds"):
        adaln_modulate(x, shift, scale, backend="triton")


def test_cpu_without_interpreter_uses_the_reference():
    """Plain CPU (no TRITON_INTERPRET): 'auto' takes the reference, 'triton' says why it cannot run."""
    code = (
        "import torch, imm_kernels\n"
        "from imm_kernels.ops.reference import adaln_modulate_reference\n"
        "x, m = torch.randn(2, 3, 8), torch.randn(2, 16)\n"
        "shift, scale = m[:, :8], m[:, 8:]\n"
        "assert torch.equal(imm_kernels.adaln_modulate(x, shift, scale), adaln_modulate_reference(x, shift, scale))\n"
        "assert imm_kernels.timestep_embedding(torch.tensor([1.0, 500.0]), 8).shape == (2, 8)\n"
        "try:\n"
        "    imm_kernels.adaln_modulate(x, m[:, :8], m[:, 8:], backend='triton')\n"
        "except imm_kernels.BackendUnavailableError as err:\n"
        "    assert 'needs CUDA tensors' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@needs_triton
def test_compiled_block_fullgraph():
    """A DiT-like block (adaLN Linear -> chunk(6) -> both ops) under torch.compile(fullgraph=True):
    the custom ops trace through their fakes, forward and backward. (Compiling the reference
    is the benchmarks' `compiled` provider; on this CPU it takes a minute, so not here.)"""
    backend = "triton"
    torch._dynamo.reset()
    torch.manual_seed(0)
    hidden = 24
    ada = torch.nn.Linear(8, 6 * hidden).to(DEVICE)
    mlp = torch.nn.Linear(hidden, hidden).to(DEVICE)
    x = torch.randn(2, 5, hidden, device=DEVICE, requires_grad=True)
    cond = torch.randn(2, 8, device=DEVICE)

    def block(x, cond):
        shift1, scale1, gate1, shift2, scale2, gate2 = ada(torch.nn.functional.silu(cond)).chunk(6, dim=1)
        h = adaln_modulate(x, shift1, scale1, backend=backend)
        h, x = adaln_residual_modulate(x, mlp(h), gate1, shift2, scale2, backend=backend)
        return x + gate2[:, None] * mlp(h)

    params = [x, *ada.parameters(), *mlp.parameters()]
    out = torch.compile(block, fullgraph=True)(x, cond)
    grads = torch.autograd.grad(out.square().sum(), params)
    eager = block(x, cond)
    eager_grads = torch.autograd.grad(eager.square().sum(), params)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, eager_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_public_exports():
    assert imm_kernels.adaln_modulate is adaln_modulate
    assert imm_kernels.adaln_residual_modulate is adaln_residual_modulate


def test_row_segments_cover_every_width_with_under_a_quarter_padded():
    """Each row is held as two power-of-two segments: the first never passes H, together they
    cover it, and under a quarter of their lanes are padding (none at DiT's 384 and 1152)."""
    for hidden in range(1, MAX_HIDDEN + 1):
        block_main, block_tail = _segments(hidden)
        assert block_main & (block_main - 1) == 0 and block_tail & (block_tail - 1) == 0
        assert block_main <= hidden <= block_main + block_tail
        assert 1 - hidden / (block_main + block_tail) < 0.25, hidden
    assert _segments(384) == (256, 128) and _segments(1152) == (1024, 128) and _segments(4096) == (4096, 0)


# At most this fraction of a row's lanes may hold no element at the shipped widths; one block
# of next_power_of_2(H) left 44% idle at H = 1152.
MAX_MASKED_LANES = 0.25


def test_kernels_compile_for_sm90_without_spills():
    """Every shipped launch configuration compiles for Hopper (ptxas runs here without a GPU).
    bf16/fp32 keep everything in registers at H = 384, 1152 and 4096; fp64 (a correctness
    path) may spill a little; the timestep kernel's fp64 sin/cos keep a small local array for
    libdevice's slow argument reduction (|angle| > ~1e5, not IMM's). No shipped width leaves
    more than MAX_MASKED_LANES of a row's lanes idle, and at DiT's widths every grid (at
    N = 64, L = 256 on 132 SMs) fits on the GPU at once."""
    import json
    import pathlib

    pytest.importorskip("triton.backends.nvidia")
    script = pathlib.Path(__file__).parents[2] / "benchmarks" / "ptxas_report_adaln.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's default until 3.10; set to silence its warning
    run = subprocess.run([sys.executable, str(script), "--json"], capture_output=True, text=True, env=env, timeout=1200)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(run.stdout)
    assert {r["kernel"] for r in rows} == {"adaln_forward", "adaln_backward", "timestep_embedding"}
    # dtypes x widths x (fwd, bwd, fwd residual, bwd residual +- dx_new), + the timestep kernel's 3
    assert len(rows) == 3 * 3 * (1 + 1 + 1 + 2) + 3
    for row in rows:
        if row["kernel"] == "timestep_embedding":
            continue
        assert row["masked_lanes"] <= MAX_MASKED_LANES, row
        if row["dtype"] in ("bf16", "fp32"):
            assert row["stack_bytes"] == 0, row
            if row["H"] <= 1152:
                assert row["launched_per_sm"] <= row["blocks_per_sm"], row
