"""Compile csrc/mmd_cuda.cu for sm_90 (or any arch) with nvcc and print each kernel's registers and spills.

Needs nvcc, not a GPU, so the CUDA backend is compile-checked on CPU machines
too. A CPU build of torch ships every header the file uses except the
build-generated c10/cuda/impl/cuda_cmake_macros.h; a one-line stand-in is
supplied for this compile-only check (a real build uses torch's own).

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

REPO = Path(__file__).resolve().parents[1]
# mmd_forward_kernel<float, float, 4, 4> and friends, as c++filt prints them.
KERNEL = re.compile(r"(mmd_\w+_kernel)<([^>]*)>")


def _compile(arch: int, workdir: Path) -> str:
    torch_include = Path(torch.__file__).parent / "include"
    stub = workdir / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    command = [
        "nvcc", "-c", str(REPO / "csrc" / "mmd_cuda.cu"), "-o", str(workdir / "mmd_cuda.o"),
        "-std=c++17", "-O3", "-DIMM_KERNELS_WITH_CUDA", "--expt-relaxed-constexpr",
        f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-Xcompiler", "-fPIC",
        "-I", str(REPO / "csrc"), "-I", str(torch_include), "-I", str(torch_include / "torch" / "csrc" / "api" / "include"),
        "-I", str(workdir / "stub"), "-I", sysconfig.get_paths()["include"],
    ]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"nvcc failed:\n{run.stderr[-4000:]}")
    return run.stderr


def report(arch: int = 90) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        log = _compile(arch, Path(tmp))
    rows, kernel, spill = [], None, 0
    for line in log.splitlines():
        if match := re.search(r"Compiling entry function '(\S+)'", line):
            kernel = subprocess.run(["c++filt", match.group(1)], capture_output=True, text=True).stdout
        elif match := re.search(r"(\d+) bytes spill stores", line):
            spill = int(match.group(1))
        elif (match := re.search(r"Used (\d+) registers", line)) and kernel:
            name, params = KERNEL.search(kernel).groups()
            params = [p.strip().replace("c10::", "") for p in params.split(",")]
            rows.append({
                "kernel": name.removeprefix("mmd_").removesuffix("_kernel"),
                "dtype": params[0] if name != "mmd_finalize_kernel" else params[0] + " (acc)",
                "max_m": int(params[-2] if name != "mmd_finalize_kernel" else params[-1]),
                "vec": int(params[-1]) if name != "mmd_finalize_kernel" else 0,
                "registers": int(match.group(1)),
                "spill_bytes": spill,
            })
            kernel = None
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
    print(f"{'kernel':9s} {'dtype':13s} {'MAX_M':>5s} {'VEC':>3s} {'regs':>5s} {'spill B':>7s}")
    for r in rows:
        print(f"{r['kernel']:9s} {r['dtype']:13s} {r['max_m']:5d} {r['vec']:3d} {r['registers']:5d} {r['spill_bytes']:7d}")


if __name__ == "__main__":
    main()
