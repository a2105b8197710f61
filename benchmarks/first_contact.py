"""The headline GPU numbers in one plain script (no pytest): the last stage of
`bash benchmarks/run_gpu.sh first-contact OUT_DIR`.

    python benchmarks/first_contact.py --list                   # sections and rows; no GPU needed
    python benchmarks/first_contact.py --out DIR --budget 300   # every section, 300 s in all
    python benchmarks/first_contact.py --out DIR --section mmd  # one section (what --budget starts)

Rows:
- MMD forward+backward, `loss.backward()` into x (x requires grad, y is the stop-gradient target, as
  in IMM training), at (B, M, D) = (4096, 4, 4096) bf16 and (64, 4, 2^20) fp32: `mmd_loss` with
  backend "triton" and "cuda", the eager reference (backend "torch") and torch.compile of the
  reference (`imm_kernels.ops.reference.mmd_loss_reference`).
- adaLN: `adaln_residual_modulate` forward+backward (gradients of x, y and the (N, 6H) modulation
  whose chunk(6) views feed it; both output gradients given) at (N, L, H) = (64, 256, 1152) bf16:
  the Triton kernels, the eager reference and torch.compile of it.
- Sampling: 8-step pushforward with guidance (w = 1.5) of DiT-XL/2 (random weights stored in bf16,
  4x32x32 latents) at batch 1 and 16: GraphedSampler, the eager sampler and
  torch.compile(mode="reduce-overhead") of its loop, built as benchmarks/bench_sampling.py builds them
  (`imm_kernels.sampling.latency`).
- The device-to-device copy of 1 GiB: the bandwidth the "% copy" column divides by.

Each row has two times: the median of triton.testing.do_bench (CUDA events around each call, the
L2 flushed in between, at least 7 timed calls), and the same for a replay of the call captured as
one CUDA graph. Their difference is the host's share (Python, launches, autograd). A call that
cannot be captured says why in its row. GB/s is the row's byte floor over the do_bench time.
"1st call s" is the first call's wall time: compilation, Triton JIT, graph capture.

Sections run one after another, each in its own process with its own time limit, the quickest and
most important first; torch.compile of the 8-step DiT-XL/2 sampler can take minutes and comes last
(the B=16 compile is skipped when the B=1 compile shows it cannot finish in the time left). Every
measurement is appended to DIR/headline.jsonl as soon as it is made, and DIR/headline.json and
DIR/headline.md are rewritten after each section: a section stopped at its limit keeps its finished
rows, and the table says which rows were not run and why.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.testing

import imm_kernels
from imm_kernels.ops.reference import adaln_residual_modulate_reference, mmd_loss_reference
from imm_kernels.sampling import time_grid
from imm_kernels.sampling.latency import bench_net, sampling_inputs, sampling_providers

DEVICE = "cuda"
GROUP_SIZE = 4
MMD_SHAPES = ((4096, 4096, "bfloat16"), (64, 2**20, "float32"))  # (B, D, dtype); M = GROUP_SIZE
ADALN_SHAPE, ADALN_DTYPE = (64, 256, 1152), "bfloat16"  # (N, L, H)
SAMPLING_MODEL, SAMPLING_LABEL, SAMPLING_STEPS, CFG_SCALE = "dit-xl2", "DiT-XL/2", 8, 1.5
SAMPLING_BATCHES = (1, 16)
COPY_ELEMENTS = 2**28  # float32: 1 GiB

FUSED_MMD_BACKENDS = ("triton", "cuda")
COMPILED_SAMPLER = "torch.compile(reduce-overhead)"  # its key in sampling_providers

# Section -> time limit in seconds; None: whatever is left of the budget. In the order they run.
SECTION_LIMITS = {
    "copy": 30,
    "mmd": 150,
    "adaln": 90,
    "sampling": 150,
    "sampling-compile-b1": None,
    "sampling-compile-b16": None,
}
MIN_SECTION_S = 20  # a section is not started with less than this left
REPORT_RESERVE_S = 5  # kept back from the budget for the last report
KILL_GRACE_S = 10  # between SIGTERM and SIGKILL of a section stopped at its limit

WARMUP_MS, REP_MS, MIN_TIMED_CALLS = 25, 100, 7
CAPTURE_WARMUP_CALLS = 3

ROWS_FILE, LOG_FILE, JSON_FILE, MD_FILE = "headline.jsonl", "headline.log", "headline.json", "headline.md"


# ---------------------------------------------------------------------------------------------
# What runs: sections, cases, providers and their byte floors (no GPU needed)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """One row of the table."""

    section: str
    case: str
    provider: str
    floor_bytes: int | None  # bytes any implementation must move; None: latency, no floor
    floor: str  # how floor_bytes is counted


def itemsize(dtype: str) -> int:
    return getattr(torch, dtype).itemsize


def mmd_case(batch: int, features: int, dtype: str) -> str:
    return f"mmd fwd+bwd {batch}x{GROUP_SIZE}x{features} {dtype}"


def mmd_floor_bytes(batch: int, features: int, dtype: str) -> int:
    """Read x, read y, write dx: 3 passes of B*D elements (as benchmarks/bench_mmd.py counts fwd+bwd)."""
    return 3 * batch * features * itemsize(dtype)


def adaln_case() -> str:
    return f"adaln_residual fwd+bwd {'x'.join(map(str, ADALN_SHAPE))} {ADALN_DTYPE}"


def adaln_floor_bytes() -> int:
    """10 passes of N*L*H (forward: read x, y, write h, x_new; backward: read x_new, y, dh, dx_new,
    write dx, dy) and 9 of N*H (shift, scale, gate: read, read again, write the gradient), as
    benchmarks/bench_adaln.py counts the residual op's forward+backward."""
    batch, seq_len, hidden = ADALN_SHAPE
    return (10 * batch * seq_len + 9 * batch) * hidden * itemsize(ADALN_DTYPE)


def sampling_case(batch: int) -> str:
    return f"{SAMPLING_LABEL} {SAMPLING_STEPS} steps cfg {CFG_SCALE} B={batch}"


COPY_CASE = "copy 1 GiB float32"


def planned_rows() -> list[Planned]:
    rows = [Planned("copy", COPY_CASE, "copy_", 2 * COPY_ELEMENTS * 4, "read + write 2^28 x 4 B")]
    for batch, features, dtype in MMD_SHAPES:
        floor = f"3 x B*D x {itemsize(dtype)} B (read x, y; write dx)"
        for provider in (*(f"imm_kernels[{b}]" for b in FUSED_MMD_BACKENDS), "eager", "compiled"):
            rows.append(
                Planned(
                    "mmd", mmd_case(batch, features, dtype), provider, mmd_floor_bytes(batch, features, dtype), floor
                )
            )
    for provider in ("imm_kernels[triton]", "eager", "compiled"):
        rows.append(
            Planned(
                "adaln",
                adaln_case(),
                provider,
                adaln_floor_bytes(),
                f"(10 x N*L*H + 9 x N*H) x {itemsize(ADALN_DTYPE)} B",
            )
        )
    for batch in SAMPLING_BATCHES:
        for provider in ("imm_kernels[graphed]", "eager"):
            rows.append(Planned("sampling", sampling_case(batch), provider, None, "none (latency)"))
    for batch in SAMPLING_BATCHES:
        rows.append(Planned(f"sampling-compile-b{batch}", sampling_case(batch), "compiled", None, "none (latency)"))
    return rows


def print_plan() -> None:
    print(f"imm_kernels {imm_kernels.__version__} | torch {torch.__version__} | triton {triton.__version__}")
    print(
        f"references: {mmd_loss_reference.__module__}.{mmd_loss_reference.__name__}, "
        f"{adaln_residual_modulate_reference.__name__}; sampling: {sampling_providers.__module__}"
    )
    rows = planned_rows()
    width = max(len(r.case) for r in rows)
    for section, limit in SECTION_LIMITS.items():
        print(f"section {section} (limit: {'the rest of the budget' if limit is None else f'{limit} s'})")
        for row in rows:
            if row.section == section:
                floor = "" if row.floor_bytes is None else f"{row.floor_bytes / 1e6:.1f} MB = "
                print(f"    {row.case:<{width}}  {row.provider:<20}  floor {floor}{row.floor}")


# ---------------------------------------------------------------------------------------------
# Measuring (inside a section's process, on the GPU)
# ---------------------------------------------------------------------------------------------


class Recorder:
    """Appends one JSON record per line to the rows file; a later record of a row updates its fields."""

    def __init__(self, path: Path, section: str) -> None:
        self.path, self.section = path, section

    def write(self, kind: str, **fields) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "section": self.section, **fields}) + "\n")

    def row(self, case: str, provider: str, **fields) -> None:
        self.write("row", case=case, provider=provider, **fields)


def describe(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:240]


def synchronized_s(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def median_ms(fn) -> float:
    """triton.testing.do_bench's median, with at least MIN_TIMED_CALLS timed calls however slow fn is."""
    estimate_ms = 1e3 * synchronized_s(fn)
    rep_ms = max(REP_MS, MIN_TIMED_CALLS * estimate_ms)
    return triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=rep_ms, return_mode="median")


def captured(fn) -> torch.cuda.CUDAGraph:
    """fn captured as one CUDA graph, after warm-up calls on a side stream (which torch's CUDA-graph
    docs ask for, backward passes included)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(CAPTURE_WARMUP_CALLS):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        graph.capture_begin()
        try:
            fn()
        except BaseException:
            # End the broken capture (it raises in turn) so the process can go on; report fn's error.
            with contextlib.suppress(RuntimeError):
                graph.capture_end()
            raise
        graph.capture_end()
    return graph


def time_row(rec: Recorder, case: str, provider: str, fn, **fields) -> bool:
    """First call (compilation, JIT), one more warm-up, then the do_bench median; False if it failed."""
    rec.row(case, provider, status="running", started=time.time())
    try:
        first_call_s = synchronized_s(fn)
        fn()
        rec.row(case, provider, status="ok", first_call_s=first_call_s, ms=median_ms(fn), **fields)
        return True
    except Exception as err:  # an OOM or a failing backend: say so in the row, go on with the next
        rec.row(case, provider, status=f"failed: {describe(err)}", **fields)
        torch.cuda.empty_cache()
        return False


def time_graph_replay(rec: Recorder, case: str, provider: str, fn) -> None:
    try:
        graph = captured(fn)
    except Exception as err:
        rec.row(case, provider, graph_note=f"not capturable as a CUDA graph: {describe(err)}")
        torch.cuda.empty_cache()
        return
    try:
        rec.row(case, provider, graph_ms=median_ms(graph.replay))
    except Exception as err:
        rec.row(case, provider, graph_note=f"graph replay failed: {describe(err)}")
    del graph
    torch.cuda.empty_cache()


def record_environment(rec: Recorder) -> None:
    props = torch.cuda.get_device_properties(0)
    rec.write(
        "environment",
        device=torch.cuda.get_device_name(),
        multiprocessors=props.multi_processor_count,
        memory_gib=round(props.total_memory / 2**30, 1),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=triton.__version__,
        python=platform.python_version(),
        backends=imm_kernels.backends(),
        date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    )


def random_tensor(*shape, dtype: str = "float32", generator=None, requires_grad: bool = False) -> torch.Tensor:
    """Random normal data: never zeros, which can hide unwritten outputs and time faster."""
    data = torch.randn(*shape, generator=generator, device=DEVICE, dtype=getattr(torch, dtype))
    return data.requires_grad_(requires_grad)


def run_copy(rec: Recorder) -> None:
    src = random_tensor(COPY_ELEMENTS)
    dst = torch.empty_like(src)
    step = functools.partial(dst.copy_, src)
    if time_row(rec, COPY_CASE, "copy_", step):
        time_graph_replay(rec, COPY_CASE, "copy_", step)


def mmd_step(loss_fn, x, y, bandwidth):
    """One training step's loss: forward, then loss.backward() writes dx into x.grad (freshly, as
    in training where x is the network output and its gradient flows on)."""

    def step():
        x.grad = None
        loss_fn(x, y, GROUP_SIZE, bandwidth).backward()

    return step


def run_mmd(rec: Recorder) -> None:
    reasons = imm_kernels.backends()
    compiled_reference = torch.compile(mmd_loss_reference, dynamic=False)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    steps: dict[tuple[str, str], object] = {}
    for batch, features, dtype in MMD_SHAPES:
        x = random_tensor(batch, features, dtype=dtype, generator=generator, requires_grad=True)
        y = random_tensor(batch, features, dtype=dtype, generator=generator)
        bandwidth = torch.rand(batch // GROUP_SIZE, generator=generator, device=DEVICE) + 0.5
        case = mmd_case(batch, features, dtype)
        for backend in FUSED_MMD_BACKENDS:
            if reasons[backend] is not None:
                rec.row(case, f"imm_kernels[{backend}]", status=f"unavailable: {reasons[backend]}")
                continue
            loss_fn = functools.partial(imm_kernels.mmd_loss, backend=backend)
            steps[case, f"imm_kernels[{backend}]"] = mmd_step(loss_fn, x, y, bandwidth)
        steps[case, "eager"] = mmd_step(functools.partial(imm_kernels.mmd_loss, backend="torch"), x, y, bandwidth)
        steps[case, "compiled"] = mmd_step(compiled_reference, x, y, bandwidth)
    # Every shape's quick rows before the slow compilations, and all timings before the first
    # capture: a capture that fails cannot cost a timing.
    by_compile_last = sorted(steps, key=lambda key: key[1] == "compiled")
    timed = [key for key in by_compile_last if time_row(rec, *key, steps[key])]
    for key in timed:
        time_graph_replay(rec, *key, steps[key])


def run_adaln(rec: Recorder) -> None:
    batch, seq_len, hidden = ADALN_SHAPE
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    make = dict(dtype=ADALN_DTYPE, generator=generator)
    x = random_tensor(batch, seq_len, hidden, **make, requires_grad=True)
    y = random_tensor(batch, seq_len, hidden, **make, requires_grad=True)
    modulation = (0.1 * random_tensor(batch, 6 * hidden, **make)).requires_grad_()
    output_grads = (random_tensor(batch, seq_len, hidden, **make), random_tensor(batch, seq_len, hidden, **make))

    def block(residual_modulate):
        def function(x, y, modulation):  # as a DiT block feeds it (benchmarks/bench_adaln.py)
            shift, scale, gate, *_ = modulation.chunk(6, dim=1)
            return residual_modulate(x, y, gate, shift, scale)

        return function

    functions = {
        "imm_kernels[triton]": block(functools.partial(imm_kernels.adaln_residual_modulate, backend="triton")),
        "eager": block(adaln_residual_modulate_reference),
        "compiled": torch.compile(block(adaln_residual_modulate_reference), dynamic=False),
    }

    def gradients_of(function):
        return lambda: torch.autograd.grad(function(x, y, modulation), (x, y, modulation), output_grads)

    steps = {provider: gradients_of(function) for provider, function in functions.items()}
    timed = [provider for provider, step in steps.items() if time_row(rec, adaln_case(), provider, step)]
    for provider in timed:
        time_graph_replay(rec, adaln_case(), provider, steps[provider])


def sampling_net():
    """(net, sample_shape, times): DiT-XL/2 with random weights stored in bf16, and the 8-step grid."""
    net, sample_shape = bench_net(SAMPLING_MODEL, DEVICE, "bf16")
    return net, sample_shape, time_grid("uniform", SAMPLING_STEPS, net.T, net.eps).tolist()


def run_sampling(rec: Recorder) -> None:
    net, sample_shape, times = sampling_net()
    eager_calls = {}
    for batch in SAMPLING_BATCHES:
        noise, labels = sampling_inputs(net, batch, sample_shape, CFG_SCALE)
        case = sampling_case(batch)
        rec.row(case, "imm_kernels[graphed]", status="running", started=time.time())
        try:  # building the sampler captures its graph: that is its first-call time
            start = time.perf_counter()
            graphed = sampling_providers(net, noise, labels, times, CFG_SCALE, ("GraphedSampler",))["GraphedSampler"]
            torch.cuda.synchronize()
            capture_s = time.perf_counter() - start
            rec.row(
                case,
                "imm_kernels[graphed]",
                status="ok",
                first_call_s=capture_s,
                ms=median_ms(graphed),
                graph_note="the call is a CUDA-graph replay (with noise and labels copied in, the sample out)",
            )
        except Exception as err:
            rec.row(case, "imm_kernels[graphed]", status=f"failed: {describe(err)}")
        graphed = None  # frees its graphs before the eager rows
        eager = sampling_providers(net, noise, labels, times, CFG_SCALE, ("eager",))["eager"]
        if time_row(rec, case, "eager", eager):
            eager_calls[case] = eager
        torch.cuda.empty_cache()
    for case, eager in eager_calls.items():  # captures after all timings, as in the other sections
        time_graph_replay(rec, case, "eager", eager)


def run_sampling_compile(rec: Recorder, batch: int) -> None:
    net, sample_shape, times = sampling_net()
    noise, labels = sampling_inputs(net, batch, sample_shape, CFG_SCALE)
    compiled = sampling_providers(net, noise, labels, times, CFG_SCALE, (COMPILED_SAMPLER,))[COMPILED_SAMPLER]
    time_row(
        rec,
        sampling_case(batch),
        "compiled",
        compiled,
        graph_note="not captured: reduce-overhead replays CUDA graphs of its own, and captures do not nest",
    )


SECTION_RUNS = {
    "copy": run_copy,
    "mmd": run_mmd,
    "adaln": run_adaln,
    "sampling": run_sampling,
    **{
        f"sampling-compile-b{batch}": functools.partial(run_sampling_compile, batch=batch) for batch in SAMPLING_BATCHES
    },
}


def run_section(name: str, out: Path) -> None:
    if not torch.cuda.is_available():
        sys.exit("first_contact.py --section measures on a CUDA GPU, and none is available here")
    rec = Recorder(out / ROWS_FILE, name)
    record_environment(rec)
    SECTION_RUNS[name](rec)


# ---------------------------------------------------------------------------------------------
# Running the sections within a budget, and the report
# ---------------------------------------------------------------------------------------------


def run_limited(command: list[str], limit_s: float, log) -> str:
    """Runs command in a session of its own; stops it and everything it started at limit_s.
    Returns "ok", "exit code N" or "stopped at its N s limit"."""
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout=limit_s)
        return "ok" if code == 0 else f"exit code {code}"
    except subprocess.TimeoutExpired:
        return f"stopped at its {limit_s:.0f} s limit"
    finally:  # also on KeyboardInterrupt: never leave a section running
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def last_line(path: Path, offset: int) -> str:
    """The last non-empty line written to path after offset (a crashed section's error)."""
    with open(path, "rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").strip().splitlines()
    return lines[-1][:240] if lines else "no output"


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut off when its section was killed
            records.append(json.loads(line))
    return records


def merged_rows(records: list[dict]) -> dict[tuple[str, str], dict]:
    rows: dict[tuple[str, str], dict] = {}
    for record in records:
        if record["kind"] == "row":
            rows.setdefault((record["case"], record["provider"]), {}).update(record)
    return rows


def compile_skip_reason(records: list[dict], left_s: float) -> str | None:
    """Why not to start the B=16 sampler compile: the B=1 compile (same graph, other shapes) did not
    finish, or took longer than the time left."""
    first = merged_rows(records).get((sampling_case(SAMPLING_BATCHES[0]), "compiled"), {})
    if first.get("status") != "ok":
        return f"the B={SAMPLING_BATCHES[0]} compile did not finish"
    needed = 1.25 * first["first_call_s"] + 60  # its compile, plus the model build and the timing
    if needed > left_s:
        return f"the B={SAMPLING_BATCHES[0]} compile took {first['first_call_s']:.0f} s; {left_s:.0f} s left"
    return None


def run_sections(out: Path, budget_s: float) -> None:
    deadline = time.monotonic() + budget_s
    rows_path = out / ROWS_FILE
    rows_path.write_text("")
    (out / LOG_FILE).write_text("")
    with open(out / LOG_FILE, "a") as log:  # appends, as the sections' output does
        try:
            for name, limit in SECTION_LIMITS.items():
                left = deadline - time.monotonic() - REPORT_RESERVE_S
                reason = f"budget spent ({max(left, 0):.0f} s left)" if left < MIN_SECTION_S else None
                if reason is None and name == f"sampling-compile-b{SAMPLING_BATCHES[-1]}":
                    reason = compile_skip_reason(read_records(rows_path), left)
                if reason is not None:
                    status, wall, limit_s = f"skipped: {reason}", 0.0, 0.0
                else:
                    limit_s = left if limit is None else min(limit, left)
                    print(f"[first-contact] {name}: started, limit {limit_s:.0f} s", flush=True)
                    log.write(f"==== section {name} (limit {limit_s:.0f} s)\n")
                    log.flush()
                    log_start, start = os.fstat(log.fileno()).st_size, time.monotonic()
                    status = run_limited([sys.executable, __file__, "--section", name, "--out", str(out)], limit_s, log)
                    wall = time.monotonic() - start
                    if status.startswith("exit code"):  # say why in the table: the section's last words
                        status += f": {last_line(out / LOG_FILE, log_start)}"
                Recorder(rows_path, name).write(
                    "section", status=status, wall_s=round(wall, 1), limit_s=round(limit_s, 1), ended=time.time()
                )
                print(f"[first-contact] {name}: {status} ({wall:.0f} s)", flush=True)
                write_report(out)
        finally:
            print("\n".join(write_report(out)))


def row_status(planned: Planned, fields: dict, sections: dict[str, dict]) -> str:
    section = sections.get(planned.section)
    if not fields:
        return f"not run: section {planned.section} {section['status']}" if section else "not run"
    status = fields["status"]
    if status == "running":
        ended = section["ended"] if section else time.time()
        why = section["status"] if section else "did not finish"
        return f"unfinished: section {why}, {ended - fields['started']:.0f} s into this row"
    return status


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def speedup(reference: dict | None, row: dict) -> str:
    if reference is None or reference is row or reference.get("ms") is None or row.get("ms") is None:
        return ""
    return f"{reference['ms'] / row['ms']:.2f}x"


COLUMNS = (
    "case",
    "provider",
    "ms",
    "graph ms",
    "GB/s",
    "% copy",
    "floor",
    "vs eager",
    "vs compiled",
    "1st call s",
    "note",
)


def report_rows(records: list[dict]) -> tuple[list[dict], float | None]:
    """One dict per planned row (fields and derived numbers), and the copy bandwidth in GB/s."""
    fields = merged_rows(records)
    sections = {r["section"]: r for r in records if r["kind"] == "section"}
    rows = []
    for planned in planned_rows():
        found = fields.get((planned.case, planned.provider), {})
        status = row_status(planned, found, sections)
        ms = found.get("ms") if status == "ok" else None
        gbps = planned.floor_bytes / (ms * 1e-3) / 1e9 if ms and planned.floor_bytes else None
        graph_note = found.get("graph_note")
        if status == "ok" and found.get("graph_ms") is None and graph_note is None:
            graph_note = "graph replay not timed: the section stopped first"
        rows.append(
            {
                "section": planned.section,
                "case": planned.case,
                "provider": planned.provider,
                "status": status,
                "ms": ms,
                "graph_ms": found.get("graph_ms"),
                "graph_note": graph_note,
                "gbps": gbps,
                "floor_bytes": planned.floor_bytes,
                "floor": planned.floor,
                "first_call_s": found.get("first_call_s"),
            }
        )
    copy = next(r for r in rows if r["case"] == COPY_CASE)
    copy_gbps = copy["gbps"]
    for row in rows:
        row["pct_copy_bw"] = 100 * row["gbps"] / copy_gbps if row["gbps"] and copy_gbps else None
    return rows, copy_gbps


def table_cells(rows: list[dict]) -> list[list[str]]:
    by_case = {(r["case"], r["provider"]): r for r in rows if r["status"] == "ok"}
    cells = []
    for r in rows:
        floor = "" if r["floor_bytes"] is None else f"{r['floor_bytes'] / 1e6:.1f} MB: {r['floor']}"
        note = r["status"] if r["status"] != "ok" else (r["graph_note"] or "")
        cells.append(
            [
                r["case"],
                r["provider"],
                fmt(r["ms"], ".4g"),
                fmt(r["graph_ms"], ".4g"),
                fmt(r["gbps"], ".1f"),
                fmt(r["pct_copy_bw"], ".1f"),
                floor or r["floor"],
                speedup(by_case.get((r["case"], "eager")), r),
                speedup(by_case.get((r["case"], "compiled")), r),
                fmt(r["first_call_s"], ".1f"),
                note,
            ]
        )
    return cells


def markdown_table(cells: list[list[str]]) -> list[str]:
    """A markdown table padded to align, so that it reads as plain text too."""
    numeric = {2, 3, 4, 5, 7, 8, 9}
    widths = [max(len(COLUMNS[i]), *(len(c[i]) for c in cells)) for i in range(len(COLUMNS))]

    def line(values):
        return (
            "| "
            + " | ".join(v.rjust(w) if i in numeric else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))
            + " |"
        )

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if i in numeric else "-" * w for i, w in enumerate(widths)) + " |"
    return [line(COLUMNS), rule, *(line(c) for c in cells)]


def write_report(out: Path) -> list[str]:
    """Writes headline.json and headline.md from the records so far; returns the markdown lines."""
    records = read_records(out / ROWS_FILE)
    rows, copy_gbps = report_rows(records)
    environment = next((r for r in reversed(records) if r["kind"] == "environment"), {})
    sections = [r for r in records if r["kind"] == "section"]
    (out / JSON_FILE).write_text(
        json.dumps(
            {"environment": environment, "copy_bandwidth_gbps": copy_gbps, "sections": sections, "rows": rows}, indent=2
        )
        + "\n"
    )
    if environment:
        device = (
            f"{environment.get('device')} | torch {environment.get('torch')} (CUDA {environment.get('cuda')}) "
            f"| triton {environment.get('triton')} | {environment.get('date_utc')} UTC"
        )
    else:
        device = "unknown: no section reached the GPU"
    lines = [
        "# First contact: headline benchmarks",
        "",
        f"- device: {device}",
        f"- copy bandwidth (1 GiB device-to-device, read + write): {fmt(copy_gbps, '.1f') or 'n/a'} GB/s",
        "- ms: median of triton.testing.do_bench; graph ms: the same for a CUDA-graph replay of the call; "
        "GB/s: floor / ms; vs eager, vs compiled: their ms over this row's ms; 1st call s: compile, JIT, capture",
        "- sections: " + "; ".join(f"{s['section']} {s['status']} ({s['wall_s']:.0f} s)" for s in sections),
        "- command: bash benchmarks/run_gpu.sh first-contact (benchmarks/first_contact.py)",
        "",
        *markdown_table(table_cells(rows)),
    ]
    (out / MD_FILE).write_text("\n".join(lines) + "\n")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the sections and rows, measure nothing")
    parser.add_argument("--out", type=Path, help="folder for headline.{jsonl,json,md,log}")
    parser.add_argument("--budget", type=float, help="seconds for all sections together")
    parser.add_argument("--section", choices=SECTION_LIMITS, help="run one section in this process")
    args = parser.parse_args()
    if args.list:
        print_plan()
    elif args.out is None or (args.budget is None) == (args.section is None):
        parser.error("give --list, or --out with either --budget or --section")
    elif args.section is not None:
        run_section(args.section, args.out)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        run_sections(args.out, args.budget)


if __name__ == "__main__":
    main()
