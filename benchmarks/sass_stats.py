"""What a compiled sm_90 kernel does, read from its cubin without a GPU.

Shared by the compile reports (ptxas_report.py, ptxas_report_adaln.py, nvcc_report.py):
cuobjdump (bundled with Triton) gives the resource usage and the SASS; from the SASS
we count instructions in the hottest loop (the backward branch whose body issues the
most global loads), so a report can give shuffles and loads per element streamed, and
an occupancy from the registers and shared memory a block takes on Hopper.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

# Hopper (sm_90) per-SM limits: the CUDA occupancy calculator's figures.
REGISTERS_PER_SM = 65536
REGISTER_ALLOCATION_UNIT = 256  # registers per warp are allocated in these
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SHARED_BYTES_PER_SM = 228 * 1024
SHARED_RESERVED_PER_BLOCK = 1024

GLOBAL_LOADS = ("LDG", "LDGSTS", "UTMALDG", "UBLKCP")
GLOBAL_STORES = ("STG", "UTMASTG")
SHUFFLES = ("SHFL",)
SHARED_ACCESS = ("LDS", "STS", "LDSM")
BARRIERS = ("BAR",)

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)([^;]*);")


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # without modifiers: "LDG" for LDG.E.128
    operands: str


def cuobjdump(cubin: bytes, *flags: str, kernel_object: bool = True) -> str:
    """cuobjdump's output for a cubin (or, kernel_object=False, a host object file's bytes)."""
    suffix = ".cubin" if kernel_object else ".o"
    with tempfile.NamedTemporaryFile(suffix=suffix) as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([CUOBJDUMP, *flags, file.name], capture_output=True, text=True, check=True).stdout


def resources(cubin: bytes) -> dict:
    """{'registers', 'stack_bytes', 'shared_bytes'} per thread / block, of the cubin's one kernel."""
    line = next(row for row in cuobjdump(cubin, "-res-usage").splitlines() if "REG:" in row)
    fields = dict(item.split(":") for item in line.split() if ":" in item)
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]), "shared_bytes": int(fields["SHARED"])}


def parse_sass(sass: str) -> list[Instruction]:
    out = []
    for match in _LINE.finditer(sass):
        address, opcode, operands = match.groups()
        out.append(Instruction(int(address, 16), opcode, operands.strip()))
    return out


def split_functions(sass: str) -> dict[str, list[Instruction]]:
    """SASS of a multi-kernel object, per function name (as cuobjdump prints it)."""
    parts = re.split(r"\n\s+Function : (\S+)\n", sass)
    return {parts[i]: parse_sass(parts[i + 1]) for i in range(1, len(parts) - 1, 2)}


def _count(instructions, opcodes) -> int:
    return sum(1 for ins in instructions if ins.opcode in opcodes)


def loop_bodies(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The bodies of the loops (backward branches) that issue global loads, in address order."""
    by_address = {ins.address: i for i, ins in enumerate(instructions)}
    bodies = []
    for i, ins in enumerate(instructions):
        if ins.opcode != "BRA":
            continue
        target = re.search(r"0x([0-9a-f]+)", ins.operands)
        start = by_address.get(int(target.group(1), 16)) if target else None
        if start is not None and start <= i and _count(instructions[start : i + 1], GLOBAL_LOADS):
            bodies.append(instructions[start : i + 1])
    return bodies


def hot_loop(instructions: list[Instruction]) -> list[Instruction]:
    """The body of the backward-branch loop that issues the most global loads (else the longest)."""
    by_address = {ins.address: i for i, ins in enumerate(instructions)}
    best: list[Instruction] = []
    for i, ins in enumerate(instructions):
        if ins.opcode != "BRA":
            continue
        target = re.search(r"0x([0-9a-f]+)", ins.operands)
        if target is None:
            continue
        start = by_address.get(int(target.group(1), 16))
        if start is None or start > i:
            continue
        body = instructions[start : i + 1]
        key = (_count(body, GLOBAL_LOADS), len(body))
        if key > (_count(best, GLOBAL_LOADS), len(best)):
            best = body
    return best


def loop_counts(instructions: list[Instruction], body: list[Instruction] | None = None) -> dict:
    """Instruction counts (per thread, per iteration) of a loop body (default: the hot loop);
    empty when there is none."""
    body = hot_loop(instructions) if body is None else body
    if not body:
        return {}
    opcodes = Counter(ins.opcode for ins in body)
    return {
        "instructions": len(body),
        "global_loads": _count(body, GLOBAL_LOADS),
        "global_stores": _count(body, GLOBAL_STORES),
        "shuffles": _count(body, SHUFFLES),
        "shared": _count(body, SHARED_ACCESS),
        "barriers": _count(body, BARRIERS),
        "fp32": opcodes["FADD"] + opcodes["FMUL"] + opcodes["FFMA"],
        "fp64": opcodes["DADD"] + opcodes["DMUL"] + opcodes["DFMA"],
    }


def occupancy(registers: int, num_warps: int, shared_bytes: int) -> dict:
    """Blocks and warps per SM on sm_90 for a block of num_warps with these resources."""
    registers_per_warp = -(-max(registers, 1) * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    by_registers = (REGISTERS_PER_SM // registers_per_warp) // num_warps
    by_warps = MAX_WARPS_PER_SM // num_warps
    by_shared = SHARED_BYTES_PER_SM // (shared_bytes + SHARED_RESERVED_PER_BLOCK)
    blocks = min(by_registers, by_warps, by_shared, MAX_BLOCKS_PER_SM)
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps}


def triton_kernel_stats(compiled) -> dict:
    """Resources, occupancy and hot-loop counts of a kernel from triton.compile."""
    cubin = compiled.asm["cubin"]
    stats = resources(cubin)
    # Triton allocates all of a kernel's shared memory dynamically, at launch: its metadata holds
    # the size (cuobjdump's SHARED for a Triton cubin is the system's 1 KiB reservation).
    stats["shared_bytes"] = compiled.metadata.shared
    num_warps = compiled.metadata.num_warps
    stats.update(occupancy(stats["registers"], num_warps, stats["shared_bytes"]))
    stats["loop"] = loop_counts(parse_sass(cuobjdump(cubin, "-sass")))
    return stats


def compile_like_jit(
    kernel, args: dict, constexprs: dict, *, num_warps: int, num_stages: int | None = None, target: GPUTarget = HOPPER
):
    """triton.compile of `kernel` as its JIT specializes a real launch, without a GPU.

    args maps each runtime argument to a pointer type ("*bf16": the JIT sees torch's
    allocations 16-byte aligned), a float type ("fp32"), or an example int value: ints
    divisible by 16 get the divisibility hint and ints equal to 1 become constants, as
    the JIT does for the values a launch passes.
    """
    signature, attrs, constants = {}, {}, dict(constexprs)
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, str):
            signature[name] = value
            if value.startswith("*"):
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif value == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=target, options=options)


LOCAL_ACCESS = ("LDL", "STL")  # thread-local memory: spilled registers, arrays indexed at run time


def function_counts(instructions: list[Instruction]) -> dict:
    """Static counts over a whole function (each instruction once, however often it runs)."""
    return {
        "instructions": len(instructions),
        "global_loads": _count(instructions, GLOBAL_LOADS),
        "global_stores": _count(instructions, GLOBAL_STORES),
        "shuffles": _count(instructions, SHUFFLES),
        "local": _count(instructions, LOCAL_ACCESS),
    }


def max_threads_per_block(binary: bytes, kernel_object: bool = True) -> dict[str, int]:
    """Each kernel's __launch_bounds__ (threads per block) by function name, read from the
    ELF's .nv.info.<function> sections; a kernel declared without bounds is absent."""
    elf = cuobjdump(binary, "-elf", kernel_object=kernel_object)
    parts = re.split(r"^\.nv\.info\.(\S+)$", elf, flags=re.M)
    bounds = {}
    for name, section in zip(parts[1::2], parts[2::2]):
        match = re.search(r"EIATTR_MAX_THREADS\s+Format:\s+\S+\s+Value:\s+((?:0x[0-9a-f]+\s+)+)", section)
        if match:
            bounds[name] = math.prod(int(v, 16) for v in match.group(1).split())
    return bounds
