"""Fixtures and the summary for `pytest benchmarks/ --benchmark-only`.

Each benchmark records one row (its extra_info). At the end, one table per op
(a row's "op", default "mmd_loss") is printed last, and each op's rows are
written as <op>.json and <op>.md to the folder $IMM_BENCH_OUT (default:
bench-out/ in the repository root). A row may name its shape column
("shape_label", default "BxMxD") and say how its byte floor is counted ("floor_note").
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = pytest.StashKey[dict]()
COLUMNS = (
    "shape",
    "dtype",
    "mode",
    "provider",
    "ms",
    "GB/s",
    "% copy BW",
    "peak MiB",
    "vs eager",
    "vs compiled",
    "note",
)


def pytest_configure(config):
    config.stash[RESULTS] = {"rows": [], "copy_gbps": None}


@pytest.fixture
def record_result(pytestconfig):
    """Appends one result row (a dict like benchmark.extra_info) for the summary."""
    return pytestconfig.stash[RESULTS]["rows"].append


@pytest.fixture(scope="session")
def copy_bandwidth_gbps(pytestconfig) -> float:
    """Bandwidth of a large same-device copy, bytes read + written: the practical ceiling."""
    if torch.cuda.is_available():
        import triton.testing

        src = torch.ones(2**28, device="cuda")  # 1 GiB
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    else:
        src = torch.ones(2**26)  # 256 MiB
        dst = torch.zeros_like(src)  # zeros, not empty: pages already mapped, so no page faults are timed
        ms = statistics.median(_wall_ms(lambda: dst.copy_(src)) for _ in range(10))
    gbps = 2 * src.nbytes / (ms * 1e-3) / 1e9
    pytestconfig.stash[RESULTS]["copy_gbps"] = gbps
    return gbps


def _wall_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _triton_version() -> str:
    try:
        import triton
    except ImportError:  # imm_kernels runs without Triton (torch backend), so may this summary
        return "not installed"
    return triton.__version__


def _environment(config, copy_gbps: float | None) -> dict:
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name()
        if cuda
        else f"CPU {platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["pytest", *config.invocation_params.args]),
        "device_time": "median of triton.testing.do_bench" if cuda else "median wall time of pytest-benchmark rounds",
        "copy_bandwidth_gbps": copy_gbps,
    }


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _speedup(reference_ms, ms) -> str:
    return "" if reference_ms is None or ms is None else f"{reference_ms / ms:.2f}x"


def _table_cells(rows: list[dict]) -> list[list[str]]:
    """One line per row; imm_kernels rows get their speed-up over eager and compiled."""
    ms_of = {(r["shape"], r["dtype"], r["mode"], r["provider"]): r["device_ms"] for r in rows}
    cells = []
    for r in rows:
        case = (r["shape"], r["dtype"], r["mode"])
        is_ours = r["provider"].startswith("imm_kernels")
        oom = r["status"] != "ok"
        cells.append(
            [
                r["shape"],
                r["dtype"],
                r["mode"],
                r["provider"],
                "OOM" if oom else _fmt(r["device_ms"], ".4g"),
                _fmt(r["gbps"], ".1f"),
                _fmt(r["pct_copy_bw"], ".1f"),
                _fmt(r["peak_mem_mib"], ".1f"),
                _speedup(ms_of.get((*case, "eager")), r["device_ms"]) if is_ours else "",
                _speedup(ms_of.get((*case, "compiled")), r["device_ms"]) if is_ours else "",
                r["status"] if oom else r.get("peak_mem_note", ""),
            ]
        )
    return cells


MMD_FLOOR_NOTE = "floor bytes (fwd 2, fwd+bwd 3 x B*D*itemsize)"


def _header_lines(env: dict, floor_note: str) -> list[str]:
    copy = env["copy_bandwidth_gbps"]
    return [
        f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date_utc']} UTC",
        f"measured copy bandwidth: {_fmt(copy, '.1f') or 'n/a'} GB/s (read + write) | "
        f"device time: {env['device_time']} | GB/s: {floor_note} / time",
        f"command: {env['command']}",
    ]


def _plain_table(columns: tuple[str, ...], cells: list[list[str]]) -> list[str]:
    used = [i for i in range(len(columns)) if i < len(columns) - 1 or any(c[i] for c in cells)]
    widths = {i: max(len(columns[i]), *(len(c[i]) for c in cells)) for i in used}
    numeric = set(range(4, 10))

    def line(values):
        return "  ".join(
            v.rjust(widths[i]) if i in numeric else v.ljust(widths[i]) for i, v in zip(used, values)
        ).rstrip()

    head = line([columns[i] for i in used])
    return [head, "-" * len(head), *(line([c[i] for i in used]) for c in cells)]


def _markdown_table(columns: tuple[str, ...], cells: list[list[str]]) -> list[str]:
    align = ["---" if i < 4 or i == 10 else "--:" for i in range(len(columns))]
    return [f"| {' | '.join(row)} |" for row in (columns, align, *cells)]


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, config):
    results = config.stash[RESULTS]
    rows = results["rows"]
    if not rows:
        return
    env = _environment(config, results["copy_gbps"])
    out_dir = Path(os.environ.get("IMM_BENCH_OUT") or REPO_ROOT / "bench-out")
    out_dir.mkdir(parents=True, exist_ok=True)
    by_op: dict[str, list[dict]] = {}
    for row in rows:
        by_op.setdefault(row.get("op", "mmd_loss"), []).append(row)
    for op, op_rows in by_op.items():
        header = _header_lines(env, op_rows[0].get("floor_note", MMD_FLOOR_NOTE))
        columns = (op_rows[0].get("shape_label", "BxMxD"), *COLUMNS[1:])
        cells = _table_cells(op_rows)
        (out_dir / f"{op}.json").write_text(json.dumps({"environment": env, "results": op_rows}, indent=2) + "\n")
        markdown = [f"# {op} benchmarks", "", *(f"- {line}" for line in header), "", *_markdown_table(columns, cells)]
        (out_dir / f"{op}.md").write_text("\n".join(markdown) + "\n")

        terminalreporter.section(f"imm_kernels {op} benchmarks")
        for line in [*header, "", *_plain_table(columns, cells), "", f"written to {out_dir}/{op}.{{json,md}}"]:
            terminalreporter.write_line(line)
