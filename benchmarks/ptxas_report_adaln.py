"""Compile the adaLN and timestep-embedding kernels for sm_90 ahead of time; report what they do.

Needs no GPU: Triton's bundled ptxas compiles (`sass_stats.compile_like_jit`, specialised as
a launch at N = 64, L = 256 with contiguous x and the modulation as chunk(6) views would be),
cuobjdump gives the resources and the SASS. Launch configurations are the ones the launchers
ship. Run with TRITON_INTERPRET unset (interpreted kernels cannot be compiled):

    python benchmarks/ptxas_report_adaln.py          # tables
    python benchmarks/ptxas_report_adaln.py --json   # the kernel rows as JSON
    python benchmarks/ptxas_report_adaln.py --json --hidden 1152   # one width

Per kernel: the warps and pipeline stages shipped; registers and stack (spill) bytes per
thread, shared memory, and the blocks and warps an SM holds (sm_90 limits), against the
programs per SM a launch at (64, 256) starts on 132 SMs (at most what an SM holds: one wave);
per row of H, from the row loop's SASS, global-load and shuffle instructions x threads / H
("per element"; one stream of 16-byte bf16 loads is 1/8) and barriers; and the fraction of
the lanes a row takes (padded segments, or threads past the row) that hold no element. The
second table models the bytes the kernels move at (64, 256, 1152) bf16 against what any
kernel must move.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from imm_kernels.ops import adaln, timestep

from sass_stats import compile_like_jit, cuobjdump, loop_bodies, loop_counts, parse_sass, triton_kernel_stats

HIDDEN_SIZES = (384, 1152, 4096)  # DiT-S, DiT-XL, and a wide one
NUM_SAMPLES, SEQ_LEN = 64, 256  # a DiT-XL/2 batch at 256 px
SM_COUNT = 132  # H100 / H200 SXM
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
COMPUTE = {"bf16": "fp32", "fp32": "fp32", "fp64": "fp64"}


def _example_args(kernel, io: str, hidden: int, **ints) -> dict:
    """Argument types and values as a launch at (NUM_SAMPLES, SEQ_LEN, hidden) passes them:
    (N, L, H) tensors contiguous, (N, H) vectors chunk(6) views of an (N, 6H) tensor."""
    args = {}
    for name in kernel.arg_names:
        if name in ("mean_ptr", "rstd_ptr", "partial_ptr"):
            args[name] = f"*{COMPUTE[io]}"
        elif name.endswith("_ptr"):
            args[name] = f"*{io}"
        elif name.startswith("stride"):
            vector = name.endswith(("_n", "_h"))
            dim = name[-1]
            args[name] = {"n": 6 * hidden if vector else SEQ_LEN * hidden, "l": hidden, "h": 1}[dim]
    args.update(seq_len=SEQ_LEN, hidden=hidden, eps="fp32", **ints)
    return args


def masked_lane_fraction(hidden: int, blocks: tuple[int, ...], num_warps: int) -> float:
    """Lanes of a row's segments that hold no element: the padding of each block, or the
    threads past a block narrower than the program (they hold copies)."""
    lanes = sum(max(block, 32 * num_warps) for block in blocks if block)
    return round(1 - hidden / lanes, 4)


def _row(kernel: str, dtype: str, hidden: int, compiled, config: dict, programs: int, **labels) -> dict:
    """One kernel's line: `config` as `adaln._launch_config` gives it, `programs` in the grid."""
    stats = triton_kernel_stats(compiled)
    instructions = parse_sass(cuobjdump(compiled.asm["cubin"], "-sass"))
    # The row loop (the loop issuing the most loads); a kernel without one does one row per program.
    per_row = loop_counts(instructions) if loop_bodies(instructions) else loop_counts(instructions, instructions)
    threads = 32 * config["num_warps"]
    return dict(
        kernel=kernel,
        dtype=dtype,
        H=hidden,
        **labels,
        num_warps=config["num_warps"],
        stages=config["NUM_STAGES"],
        registers=stats["registers"],
        stack_bytes=stats["stack_bytes"],
        shared_bytes=stats["shared_bytes"],
        blocks_per_sm=stats["blocks_per_sm"],
        warps_per_sm=stats["warps_per_sm"],
        launched_per_sm=round(programs / SM_COUNT, 2),
        loads_per_element=round(per_row["global_loads"] * threads / hidden, 3),
        shuffles_per_element=round(per_row["shuffles"] * threads / hidden, 3),
        barriers_per_row=per_row["barriers"],
        masked_lanes=masked_lane_fraction(hidden, (config["BLOCK_MAIN"], config["BLOCK_TAIL"]), config["num_warps"]),
    )


def _streamed(dtype: str, count: int) -> tuple[torch.Tensor, ...]:
    return (torch.empty(0, dtype=DTYPES[dtype]),) * count


def _grid_rows(programs_per_sm: int) -> tuple[int, int]:
    """(rows per program, programs) of a grid at (NUM_SAMPLES, SEQ_LEN) on SM_COUNT SMs."""
    rows = adaln._rows_per_block(NUM_SAMPLES, SEQ_LEN, SM_COUNT * programs_per_sm)
    return rows, NUM_SAMPLES * -(-SEQ_LEN // rows)


def report(hidden_sizes=HIDDEN_SIZES) -> list[dict]:
    forward_rows, forward_programs = _grid_rows(adaln.FORWARD_PROGRAMS_PER_SM)
    backward_rows, backward_programs = _grid_rows(adaln.BACKWARD_PROGRAMS_PER_SM)
    rows = []
    for dtype in DTYPES:
        for hidden in hidden_sizes:
            for has_residual in (False, True):
                config = adaln._launch_config(hidden, _streamed(dtype, 1 + has_residual))
                kernel = adaln._adaln_fwd_kernel
                constexprs = {k: v for k, v in config.items() if k != "num_warps"}
                compiled = compile_like_jit(
                    kernel,
                    _example_args(kernel, dtype, hidden, rows_per_program=forward_rows),
                    {**constexprs, "HAS_RESIDUAL": has_residual},
                    num_warps=config["num_warps"],
                )
                rows.append(
                    _row(
                        "adaln_forward",
                        dtype,
                        hidden,
                        compiled,
                        config,
                        forward_programs,
                        residual=has_residual,
                        grad_x_new=None,
                    )
                )
                for has_dres in (False, True) if has_residual else (False,):
                    config = adaln._launch_config(hidden, _streamed(dtype, 2 + has_residual + has_dres))
                    kernel = adaln._adaln_bwd_kernel
                    constexprs = {k: v for k, v in config.items() if k != "num_warps"}
                    compiled = compile_like_jit(
                        kernel,
                        _example_args(kernel, dtype, hidden, rows_per_block=backward_rows),
                        {**constexprs, "HAS_RESIDUAL": has_residual, "HAS_DRES": has_dres},
                        num_warps=config["num_warps"],
                    )
                    rows.append(
                        _row(
                            "adaln_backward",
                            dtype,
                            hidden,
                            compiled,
                            config,
                            backward_programs,
                            residual=has_residual,
                            grad_x_new=has_dres,
                        )
                    )
    for t_dtype in ("fp32", "i64", "fp64"):
        kernel = timestep._timestep_embedding_kernel
        args = {
            "t_ptr": f"*{t_dtype}",
            "stride_t": 1,
            "out_ptr": "*fp64" if t_dtype == "fp64" else "*fp32",
            "half": 128,
            "dim": 257,
            "log_period_hi": "fp32",
            "log_period_lo": "fp32",
        }
        stats = triton_kernel_stats(compile_like_jit(kernel, args, {"BLOCK": 128, "ODD_DIM": True}, num_warps=4))
        rows.append(
            dict(
                kernel="timestep_embedding",
                dtype=t_dtype,
                H=257,
                residual=None,
                grad_x_new=None,
                num_warps=4,
                registers=stats["registers"],
                stack_bytes=stats["stack_bytes"],
            )
        )
    return rows


def bytes_model(
    num_samples: int, seq_len: int, hidden: int, itemsize: int, forward_programs: int, backward_blocks_per_sample: int
) -> list[dict]:
    """Bytes each kernel must move (every input read once, every output written once) and
    bytes it requests: plus the (N, H) vectors once per program, and in the backward the
    fp32 partials written, read back and summed into dmod.

    forward_programs: programs of the forward grid (each reads the vectors once);
    backward_blocks_per_sample: blocks of L per sample in the backward (one partial each).
    """
    rows_bytes = num_samples * seq_len * hidden * itemsize
    vector = hidden * itemsize
    stats = num_samples * seq_len * 2 * 4  # mean, rstd in fp32
    out = []
    for op, streams_fwd, vectors_fwd in (("modulate", 2, 2), ("residual", 4, 3)):
        must = streams_fwd * rows_bytes + num_samples * vectors_fwd * vector + stats
        moved = streams_fwd * rows_bytes + forward_programs * vectors_fwd * vector + stats
        out.append(dict(kernel="adaln_forward", op=op, must_mb=must / 1e6, moved_mb=moved / 1e6))
    for op, streams_bwd, vectors_bwd, sums in (("modulate", 3, 1, 2), ("residual + dx_new", 6, 2, 3)):
        dmod = num_samples * sums * hidden * 4
        must = streams_bwd * rows_bytes + num_samples * vectors_bwd * vector + stats + dmod
        partials = num_samples * backward_blocks_per_sample * sums * hidden * 4
        moved = (
            streams_bwd * rows_bytes
            + num_samples * backward_blocks_per_sample * vectors_bwd * vector
            + stats
            + 2 * partials
            + dmod
        )
        out.append(dict(kernel="adaln_backward", op=op, must_mb=must / 1e6, moved_mb=moved / 1e6))
    for row in out:
        row["extra"] = f"{row['moved_mb'] / row['must_mb'] - 1:+.1%}"
        row["must_mb"], row["moved_mb"] = round(row["must_mb"], 1), round(row["moved_mb"], 1)
    return out


def shipped_bytes_model(hidden: int = 1152) -> list[dict]:
    _, forward_programs = _grid_rows(adaln.FORWARD_PROGRAMS_PER_SM)
    _, backward_programs = _grid_rows(adaln.BACKWARD_PROGRAMS_PER_SM)
    return bytes_model(NUM_SAMPLES, SEQ_LEN, hidden, 2, forward_programs, backward_programs // NUM_SAMPLES)


def print_table(rows: list[dict]) -> None:
    columns = list(dict.fromkeys(c for row in rows for c in row))
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    hidden_sizes = (int(sys.argv[sys.argv.index("--hidden") + 1]),) if "--hidden" in sys.argv else HIDDEN_SIZES
    rows = report(hidden_sizes)
    if "--json" in sys.argv:
        print(json.dumps(rows))
    else:
        print_table(rows)
        print(f"\nBytes at ({NUM_SAMPLES}, {SEQ_LEN}, 1152) bf16, {SM_COUNT} SMs (MB = 1e6 bytes):\n")
        print_table(shipped_bytes_model())
