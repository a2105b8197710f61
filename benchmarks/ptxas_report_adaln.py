"""Compile the adaLN and timestep-embedding kernels for sm_90 ahead of time; print register use.

Needs no GPU: Triton's bundled ptxas compiles, its cuobjdump reads the resource
usage. Launch configurations are the ones the launchers ship. Run with
TRITON_INTERPRET unset (interpreted kernels cannot be compiled):

    python benchmarks/ptxas_report_adaln.py          # table
    python benchmarks/ptxas_report_adaln.py --json   # the same as JSON
    python benchmarks/ptxas_report_adaln.py --json --hidden 1152   # one width (what the tests read)
"""

from __future__ import annotations

import inspect
import json
import os
import sys

import triton
from triton.compiler import ASTSource

from imm_kernels.ops import adaln, timestep
from ptxas_report import TARGET, _resource_usage

HIDDEN_SIZES = (384, 1152, 4096)  # DiT-S, DiT-XL, and a wide one


def _signature(kernel, pointers: dict, constexprs: dict) -> dict:
    """Pointers as given, constexprs, strides i64 (as large tensors pass them), floats fp32, other ints i32."""
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        elif name.startswith("stride"):
            signature[name] = "i64"
        elif name == "eps" or name.startswith("log_period"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _compile(kernel, pointers: dict, constexprs: dict, num_warps: int) -> tuple[int, int]:
    source = ASTSource(fn=kernel, signature=_signature(kernel, pointers, constexprs), constexprs=constexprs)
    return _resource_usage(triton.compile(source, target=TARGET, options={"num_warps": num_warps}))


def report(hidden_sizes=HIDDEN_SIZES) -> list[dict]:
    rows = []
    for io, acc in (("bf16", "fp32"), ("fp32", "fp32"), ("fp64", "fp64")):
        for hidden in hidden_sizes:
            for has_residual in (False, True):
                block_h, warps = adaln._launch_config(hidden, adaln.FORWARD_ELEMENTS_PER_THREAD)
                pointers = {name: f"*{io}" for name in ("x_ptr", "y_ptr", "gate_ptr", "shift_ptr", "scale_ptr",
                                                         "h_ptr", "x_new_ptr")}
                pointers.update(mean_ptr=f"*{acc}", rstd_ptr=f"*{acc}")
                constexprs = {"BLOCK_H": block_h, "HAS_RESIDUAL": has_residual}
                regs, stack = _compile(adaln._adaln_fwd_kernel, pointers, constexprs, warps)
                rows.append(dict(kernel="adaln_forward", dtype=io, H=hidden, residual=has_residual, grad_x_new=None,
                                 num_warps=warps, registers=regs, stack_bytes=stack))

                block_h, warps = adaln._launch_config(hidden, adaln.BACKWARD_ELEMENTS_PER_THREAD)
                pointers = {name: f"*{io}" for name in ("dh_ptr", "dres_ptr", "x_ptr", "y_ptr", "gate_ptr",
                                                         "scale_ptr", "dx_ptr", "dy_ptr")}
                pointers.update(mean_ptr=f"*{acc}", rstd_ptr=f"*{acc}", partial_ptr=f"*{acc}")
                for has_dres in (False, True) if has_residual else (False,):
                    constexprs = {"BLOCK_H": block_h, "HAS_RESIDUAL": has_residual, "HAS_DRES": has_dres}
                    regs, stack = _compile(adaln._adaln_bwd_kernel, pointers, constexprs, warps)
                    rows.append(dict(kernel="adaln_backward", dtype=io, H=hidden, residual=has_residual,
                                     grad_x_new=has_dres, num_warps=warps, registers=regs, stack_bytes=stack))
    for t_dtype in ("fp32", "i64", "fp64"):
        out = "*fp64" if t_dtype == "fp64" else "*fp32"
        constexprs = {"BLOCK": 128, "ODD_DIM": True}
        regs, stack = _compile(timestep._timestep_embedding_kernel, {"t_ptr": f"*{t_dtype}", "out_ptr": out},
                               constexprs, 4)
        rows.append(dict(kernel="timestep_embedding", dtype=t_dtype, H=256, residual=None, grad_x_new=None,
                         num_warps=4, registers=regs, stack_bytes=stack))
    return rows


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    hidden_sizes = (int(sys.argv[sys.argv.index("--hidden") + 1]),) if "--hidden" in sys.argv else HIDDEN_SIZES
    rows = report(hidden_sizes)
    if "--json" in sys.argv:
        print(json.dumps(rows))
    else:
        columns = list(rows[0])
        print("  ".join(f"{c:>18}" for c in columns))
        for row in rows:
            print("  ".join(f"{str(row[c]):>18}" for c in columns))
