"""Compile csrc/mmd_cuda.cu for sm_90 (or any arch) with nvcc and report what each kernel's code does.

Needs nvcc, not a GPU, so the CUDA backend is compile-checked on CPU machines
too. A CPU build of torch ships every header the file uses except the
build-generated c10/cuda/impl/cuda_cmake_macros.h; a one-line stand-in is
supplied for this compile-only check (a real build uses torch's own).

Per kernel: registers, spill bytes and static shared memory (ptxas), then from the
object's SASS and ELF (sass_stats.py, Triton's cuobjdump): occupancy on sm_90 for the
kernel's __launch_bounds__ block, the instructions of the whole kernel that shuffle,
load or store global memory or touch thread-local memory (static counts: each
instruction once, however often it runs), and the instructions per iteration of its
hottest loop (the one issuing the most global loads: the column loop, or the split sum
of the finalize kernel).

    python benchmarks/nvcc_report.py             # table
    python benchmarks/nvcc_report.py --json      # the same as JSON (the tests read it)
    python benchmarks/nvcc_report.py --arch 80   # another compute capability
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sass_stats  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# mmd_forward_kernel<float, float, 4, 4> and friends, as c++filt prints them.
KERNEL = re.compile(r"(mmd_\w+_kernel)<([^>]*)>")


def _compile(arch: int, workdir: Path) -> tuple[str, bytes]:
    """-> (ptxas's -v log, the object file)."""
    torch_include = Path(torch.__file__).parent / "include"
    stub = workdir / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    command = [
        "nvcc",
        "-c",
        str(REPO / "csrc" / "mmd_cuda.cu"),
        "-o",
        str(workdir / "mmd_cuda.o"),
        "-std=c++17",
        "-O3",
        "-DIMM_KERNELS_WITH_CUDA",
        "--expt-relaxed-constexpr",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-Xptxas",
        "-v",
        "-Xcompiler",
        "-fPIC",
        "-I",
        str(REPO / "csrc"),
        "-I",
        str(torch_include),
        "-I",
        str(torch_include / "torch" / "csrc" / "api" / "include"),
        "-I",
        str(workdir / "stub"),
        "-I",
        sysconfig.get_paths()["include"],
    ]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"nvcc failed:\n{run.stderr[-4000:]}")
    return run.stderr, (workdir / "mmd_cuda.o").read_bytes()


def _ptxas_resources(log: str) -> dict[str, dict]:
    """{mangled kernel name: registers, spill bytes, static shared bytes} from ptxas -v."""
    resources, kernel, spill = {}, None, 0
    for line in log.splitlines():
        if match := re.search(r"Compiling entry function '(\S+)'", line):
            kernel = match.group(1)
        elif match := re.search(r"(\d+) bytes spill stores", line):
            spill = int(match.group(1))
        elif (match := re.search(r"Used (\d+) registers", line)) and kernel:
            shared = re.search(r"(\d+) bytes smem", line)
            resources[kernel] = {
                "registers": int(match.group(1)),
                "spill_bytes": spill,
                "shared_bytes": int(shared.group(1)) if shared else 0,
            }
            kernel = None
    return resources


def report(arch: int = 90) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        log, binary = _compile(arch, Path(tmp))
    resources = _ptxas_resources(log)
    functions = sass_stats.split_functions(sass_stats.cuobjdump(binary, "-sass", kernel_object=False))
    threads = sass_stats.max_threads_per_block(binary, kernel_object=False)
    mangled = list(resources)
    demangled = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True).stdout
    rows = []
    for kernel, readable in zip(mangled, demangled.splitlines()):
        name, params = KERNEL.search(readable).groups()
        params = [p.strip().replace("c10::", "") for p in params.split(",")]
        instructions = functions[kernel]
        counts = sass_stats.function_counts(instructions)
        block = threads.get(kernel)  # None for a kernel declared without __launch_bounds__
        occupancy = (
            sass_stats.occupancy(resources[kernel]["registers"], block // 32, resources[kernel]["shared_bytes"])
            if arch == 90 and block
            else {}
        )
        rows.append(
            {
                "kernel": name.removeprefix("mmd_").removesuffix("_kernel"),
                "dtype": params[0] if name != "mmd_finalize_kernel" else params[0] + " (acc)",
                "max_m": int(params[-2] if name != "mmd_finalize_kernel" else params[-1]),
                "vec": int(params[-1]) if name != "mmd_finalize_kernel" else 0,
                **resources[kernel],
                "threads": block,
                "warps_per_sm": occupancy.get("warps_per_sm"),  # on sm_90; None for another arch or no bounds
                "shuffles": counts["shuffles"],
                "global_loads": counts["global_loads"],
                "global_stores": counts["global_stores"],
                "local": counts["local"],
                "loop_instructions": sass_stats.loop_counts(instructions).get("instructions", 0),
            }
        )
    return sorted(rows, key=lambda r: (r["kernel"], r["dtype"], r["max_m"], r["vec"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("nvcc") is None:
        sys.exit("nvcc not found")
    rows = report(args.arch)
    if args.json:
        print(json.dumps(rows))
        return
    print(
        f"{'kernel':9s} {'dtype':13s} {'MAX_M':>5s} {'VEC':>3s} {'regs':>5s} {'spill B':>7s} {'smem B':>6s} "
        f"{'warps/SM':>8s} {'SHFL':>4s} {'LDG':>4s} {'STG':>4s} {'LDL/STL':>7s} {'loop':>5s}"
    )
    for r in rows:
        warps = "-" if r["warps_per_sm"] is None else str(r["warps_per_sm"])
        print(
            f"{r['kernel']:9s} {r['dtype']:13s} {r['max_m']:5d} {r['vec']:3d} {r['registers']:5d} "
            f"{r['spill_bytes']:7d} {r['shared_bytes']:6d} {warps:>8s} {r['shuffles']:4d} {r['global_loads']:4d} "
            f"{r['global_stores']:4d} {r['local']:7d} {r['loop_instructions']:5d}"
        )
    print(
        "\nwarps/SM: occupancy on sm_90 for the kernel's __launch_bounds__ block (- if none); "
        "SHFL, LDG, STG, LDL/STL: instructions in the kernel's SASS; loop: instructions per iteration "
        "of its hottest loop"
    )


if __name__ == "__main__":
    main()
