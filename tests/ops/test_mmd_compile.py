"""mmd_loss compiled: a torch.compile training step without graph breaks, and the GPU kernels
compiled for sm_90 without a GPU (Triton's ptxas, nvcc) and what their code does.
"""

import os
import subprocess
import sys

import pytest
import torch

from imm_kernels import mmd_loss

from helpers import (
    ALL_BACKENDS,
)


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

    script = pathlib.Path(__file__).parents[2] / "benchmarks" / "ptxas_report.py"
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
    script = pathlib.Path(__file__).parents[2] / "benchmarks" / "nvcc_report.py"
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
