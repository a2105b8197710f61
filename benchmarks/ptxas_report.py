"""Compile the Triton MMD kernels for sm_90 as their JIT does and report what the code does.

Needs no GPU: Triton compiles for Hopper here, its bundled cuobjdump reads the cubin
(`sass_stats.py`). Each shipped tile configuration is compiled with the JIT's real
specialization (16-byte aligned pointers, sizes divisible by 16, here D = 4096) for
every kernel variant a training step launches, and the report gives registers, spill
bytes, shared memory, occupancy (blocks per SM) and, per element of x and y streamed
through each D loop, the thread-instructions the loop issues: all of them, shuffles,
global loads, shared-memory accesses and fp32 (fp64) arithmetic. Run with
TRITON_INTERPRET unset (interpreted kernels cannot be compiled):

    python benchmarks/ptxas_report.py          # the table
    python benchmarks/ptxas_report.py --json   # the same as JSON (the tests read it)
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from imm_kernels.ops import mmd_triton as mmd  # noqa: E402

import sass_stats  # noqa: E402

NUM_FEATURES = 4096
DTYPES = (("bf16", "fp32"), ("fp32", "fp32"), ("fp64", "fp64"))  # (input, compute)
# Variant name -> (kernel, constexprs beyond the tile's); "loops" names its D loops in order.
VARIANTS = {
    "forward": (mmd._mmd_fwd_kernel, dict(FINALIZE=True, STORE_DX=False, STORE_DY=False), ("S",)),
    "forward_split": (mmd._mmd_fwd_kernel, dict(FINALIZE=False, STORE_DX=False, STORE_DY=False), ("S",)),
    "forward_dx": (mmd._mmd_fwd_kernel, dict(FINALIZE=True, STORE_DX=True, STORE_DY=False), ("S", "dx")),
    "backward_dx": (mmd._mmd_bwd_kernel, dict(STORE_DX=True, STORE_DY=False, SKIP_EXPECTED=False), ("dx",)),
    "backward_dxdy": (mmd._mmd_bwd_kernel, dict(STORE_DX=True, STORE_DY=True, SKIP_EXPECTED=False), ("dxdy",)),
    "refresh_dx": (mmd._mmd_bwd_kernel, dict(STORE_DX=True, STORE_DY=False, SKIP_EXPECTED=True), ("dx",)),
}


def _arguments(kernel, io: str, acc: str) -> dict:
    """Each runtime argument as the JIT sees a launch at D = NUM_FEATURES: x, y and their
    gradients in the input dtype, every other tensor in the compute dtype; per-group
    tensors read with stride 0 (an expanded upstream gradient), sizes D."""
    args = {}
    for name in kernel.arg_names:
        if name.endswith("_ptr"):
            args[name] = f"*{io}" if name in ("x_ptr", "y_ptr", "dx_ptr", "dy_ptr") else f"*{acc}"
        elif name == "eps":
            args[name] = "fp32"
        elif name in ("stride_grad", "stride_expected"):
            args[name] = 0
        elif name == "num_splits":
            args[name] = 8
        else:  # row strides, num_features, cols_per_split
            args[name] = NUM_FEATURES
    return args


def _row(variant: str, io: str, acc: str, group_size: int) -> dict:
    kernel, flags, loop_names = VARIANTS[variant]
    half = mmd.half_rows(group_size)
    block_d, num_warps = mmd._tile_config(group_size, NUM_FEATURES, torch.float64 if acc == "fp64" else torch.float32)
    constexprs = dict(
        M=group_size, MX=half, BLOCK_D=block_d, NUM_STAGES=mmd.NUM_STAGES, EVEN_D=NUM_FEATURES % block_d == 0, **flags
    )
    compiled = sass_stats.compile_like_jit(kernel, _arguments(kernel, io, acc), constexprs, num_warps=num_warps)
    stats = sass_stats.triton_kernel_stats(compiled)
    stats.pop("loop")
    bodies = sass_stats.loop_bodies(sass_stats.parse_sass(sass_stats.cuobjdump(compiled.asm["cubin"], "-sass")))
    if len(bodies) != len(loop_names):
        raise RuntimeError(f"{variant} {io} M={group_size}: expected loops {loop_names}, found {len(bodies)}")
    # Thread-instructions per element of x and y streamed: count * threads / (2 M BLOCK_D).
    per_element = (32 * num_warps) / (2 * group_size * block_d)
    loops = {}
    for name, body in zip(loop_names, bodies):
        counts = sass_stats.loop_counts([], body)
        loops[name] = {key: round(value * per_element, 2) for key, value in counts.items()}
    return dict(kernel=variant, dtype=io, M=group_size, BLOCK_D=block_d, num_warps=num_warps, **stats, loops=loops)


def report() -> list[dict]:
    """Every variant, dtype and shipped tile (M = MX, the table's row count), compiled in parallel."""
    cases = [
        (variant, io, acc, half)
        for io, acc in DTYPES
        for half in sorted(mmd._TILE_CONFIG[acc == "fp64"])
        for variant in VARIANTS
    ]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        return list(pool.map(_row, *zip(*cases)))


def _print_table(rows: list[dict]) -> None:
    print(
        f"{'kernel':<14} {'dtype':<5} {'M':>2} {'BLOCK_D':>7} {'warps':>5} {'regs':>4} {'spill B':>7} {'smem KB':>7} "
        f"{'blk/SM':>6}  {'loop':<4} {'instr/el':>8} {'shfl/el':>7} {'ldg/el':>6} {'smem/el':>7} {'fp/el':>6}"
    )
    for r in rows:
        for i, (name, loop) in enumerate(r["loops"].items()):
            lead = (
                (
                    f"{r['kernel']:<14} {r['dtype']:<5} {r['M']:>2} {r['BLOCK_D']:>7} {r['num_warps']:>5} "
                    f"{r['registers']:>4} {r['stack_bytes']:>7} {r['shared_bytes'] / 1024:>7.1f} "
                    f"{r['blocks_per_sm']:>6}"
                )
                if i == 0
                else " " * 66
            )
            print(
                f"{lead}  {name:<4} {loop['instructions']:>8.2f} {loop['shuffles']:>7.2f} {loop['global_loads']:>6.2f} "
                f"{loop['shared']:>7.2f} {loop['fp32'] + loop['fp64']:>6.2f}"
            )


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default until 3.10; silences its warning
    results = report()
    if "--json" in sys.argv:
        print(json.dumps(results))
    else:
        _print_table(results)
