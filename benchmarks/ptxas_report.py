"""Compile the MMD kernels for sm_90 ahead of time and print their register use.

Needs no GPU: Triton's bundled ptxas compiles, its cuobjdump reads the resource
usage. Run with TRITON_INTERPRET unset (interpreted kernels cannot be compiled):

    python benchmarks/ptxas_report.py          # table of registers / spill bytes
    python benchmarks/ptxas_report.py --json   # the same as JSON (the tests read it)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from imm_kernels.ops import mmd_triton as mmd

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _pointers(dtype: str, *names: str) -> dict:
    return {name: f"*{dtype}" for name in names}


def _signatures(io: str, acc: str) -> dict:
    """Argument types of each kernel for input dtype `io` and compute dtype `acc`."""
    scalars = {"num_features": "i32", "cols_per_split": "i32", "eps": "fp32"}
    saved = ("bandwidth_ptr", "weight_ptr")
    outputs = ("loss_ptr", "sqdist_ptr", "mmd2_ptr", "dmmd_db_ptr")
    rows = {**_pointers(io, "x_ptr", "y_ptr"), "stride_x": "i32", "stride_y": "i32"}
    return {
        "forward": {**rows, **_pointers(acc, "partial_ptr", *saved, *outputs), **scalars,
                    "M": "constexpr", "R": "constexpr", "BLOCK_D": "constexpr", "FINALIZE": "constexpr"},
        "finalize": {**_pointers(acc, "partial_ptr", *saved, *outputs), "num_splits": "i32",
                     "num_features": "i32", "eps": "fp32", "M": "constexpr", "R": "constexpr"},
        "backward": {**rows, **_pointers(io, "dx_ptr", "dy_ptr"), "grad_ptr": f"*{acc}", "stride_grad": "i32",
                     **_pointers(acc, "sqdist_ptr", *saved), **scalars, "M": "constexpr", "R": "constexpr",
                     "BLOCK_D": "constexpr", "STORE_DX": "constexpr", "STORE_DY": "constexpr"},
    }


def _resource_usage(compiled) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) from the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        out = subprocess.run([CUOBJDUMP, "-res-usage", cubin.name], capture_output=True, text=True, check=True)
    fields = dict(item.split(":") for item in next(l for l in out.stdout.splitlines() if "REG:" in l).split())
    return int(fields["REG"]), int(fields["STACK"])


def report() -> list[dict]:
    kernels = {"forward": mmd._mmd_fwd_kernel, "finalize": mmd._mmd_finalize_kernel, "backward": mmd._mmd_bwd_kernel}
    rows = []
    for fp64, table in mmd._TILE_CONFIG.items():
        io, acc = ("fp64", "fp64") if fp64 else ("bf16", "fp32")
        signatures = _signatures(io, acc)
        for padded, (block_d, num_warps) in table.items():
            constexprs = {
                "forward": {"M": padded // 2, "R": padded, "BLOCK_D": block_d, "FINALIZE": True},
                "finalize": {"M": padded // 2, "R": padded},
                "backward": {"M": padded // 2, "R": padded, "BLOCK_D": block_d, "STORE_DX": True, "STORE_DY": True},
            }
            for name, kernel in kernels.items():
                source = ASTSource(fn=kernel, signature=signatures[name], constexprs=constexprs[name])
                warps = 4 if name == "finalize" else num_warps
                regs, stack = _resource_usage(triton.compile(source, target=TARGET, options={"num_warps": warps}))
                rows.append(dict(kernel=name, dtype=io, R=padded, BLOCK_D=block_d, num_warps=warps,
                                 registers=regs, stack_bytes=stack))
    return rows


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    results = report()
    if "--json" in sys.argv:
        print(json.dumps(results))
    else:
        print(f"{'kernel':<9} {'dtype':<5} {'R':>3} {'BLOCK_D':>7} {'warps':>5} {'regs':>5} {'spill B':>7}")
        for r in results:
            print(f"{r['kernel']:<9} {r['dtype']:<5} {r['R']:>3} {r['BLOCK_D']:>7} {r['num_warps']:>5} "
                  f"{r['registers']:>5} {r['stack_bytes']:>7}")
