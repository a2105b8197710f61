"""benchmarks/run_gpu.sh and benchmarks/first_contact.py without a GPU.

Each stage's --dry-run prints what it would run and checks that every file it names exists (here:
the files in this repository, so a renamed script, test or benchmark fails CI); the parts of the
headline script that need no GPU (its table, its time limits) run on synthetic records.
"""

import ast
import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CPU_ONLY_TESTS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "run_gpu.sh"
FIRST_CONTACT_TESTS = ("ops", "sampling/test_sampling.py", "models/test_dit.py")


def dry_run(*args: str, script: Path = SCRIPT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "STAGE_BUDGET_S")}
    return subprocess.run(
        ["bash", str(script), "--dry-run", *args], capture_output=True, text=True, env=env, timeout=600
    )


def succeeded(run: subprocess.CompletedProcess) -> bool:
    if run.returncode != 0:
        print(run.stdout[-4000:], run.stderr[-4000:], sep="\n")
    return run.returncode == 0


def load_benchmark_module(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the bench files import `timing`
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def first_contact(monkeypatch):
    return load_benchmark_module("first_contact", monkeypatch)


def test_first_contact_dry_run_shows_build_tests_and_headline_rows(tmp_path):
    out = tmp_path / "out"
    run = dry_run("first-contact", str(out))
    assert succeeded(run)
    text = run.stdout
    assert "IMM_KERNELS_CUDA_ARCHS=90 python3 setup.py build_ext --inplace" in text
    assert all(f"tests/{name}" in text for name in FIRST_CONTACT_TESTS)
    assert "-m not\\ cpu_only" in text
    assert "left out, marked cpu_only" in text and "tests/ops/test_mmd_backends.py::test_native_" in text
    assert "python3 benchmarks/first_contact.py --out" in text
    for row in (
        "mmd fwd+bwd 4096x4x4096 bfloat16",
        "mmd fwd+bwd 64x4x1048576 float32",
        "imm_kernels[cuda]",
        "adaln_residual fwd+bwd 64x256x1152 bfloat16",
        "DiT-XL/2 8 steps cfg 1.5 B=16",
    ):
        assert row in text
    assert not out.exists()  # a dry run writes nothing


@pytest.mark.parametrize("stage", [["tests"], ["bench", "benchmarks/bench_dit.py", "-k", "inference"], ["all"]])
def test_dry_runs_of_the_other_stages(stage):
    run = dry_run(*stage)
    assert succeeded(run)
    assert "setup.py build_ext --inplace" in run.stdout
    assert "collected here" in run.stdout


def test_bench_full_chunks_cover_every_benchmark():
    run = dry_run("bench-full")
    assert succeeded(run)
    chunks = int(re.search(r"^BENCH_CHUNKS=(\d+)$", SCRIPT.read_text(), re.MULTILINE).group(1))
    assert all(f"chunk {n}:" in run.stdout for n in range(1, chunks + 1))
    assert "benchmarks collected here is in a chunk" in run.stdout
    assert succeeded(dry_run("bench-full", str(chunks)))
    assert dry_run("bench-full", str(chunks + 1)).returncode == 2


# Every file some stage runs, as placeholders: the dry run must stop at the one that is missing.
STAGE_FILES = [
    "setup.py",
    "CMakeLists.txt",
    "tests/conftest.py",
    *(f"tests/{name}" for name in FIRST_CONTACT_TESTS),
    "benchmarks/conftest.py",
    "benchmarks/timing.py",
    "benchmarks/first_contact.py",
    *(f"benchmarks/bench_{op}.py" for op in ("mmd", "timestep", "adaln", "dit", "sampling", "train")),
]


@pytest.mark.parametrize(
    "stage, missing",
    [
        (["first-contact"], "benchmarks/first_contact.py"),
        (["first-contact"], "tests/models/test_dit.py"),
        (["tests"], "tests/conftest.py"),
        (["bench-full", "9"], "benchmarks/bench_sampling.py"),
        (["bench-full"], "benchmarks/bench_adaln.py"),
        (["bench", "benchmarks/bench_timestep.py"], "benchmarks/timing.py"),
        (["all"], "setup.py"),
    ],
)
def test_dry_run_fails_when_a_file_it_runs_is_missing(tmp_path, stage, missing):
    for name in STAGE_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    shutil.copy(SCRIPT, tmp_path / "benchmarks" / "run_gpu.sh")
    (tmp_path / missing).unlink()
    run = dry_run(*stage, script=tmp_path / "benchmarks" / "run_gpu.sh")
    assert run.returncode == 1
    assert f"missing: {missing}" in run.stderr
    assert "collected" not in run.stdout  # stopped before anything ran


def test_every_cpu_only_pattern_still_names_a_test():
    """A renamed test would otherwise drop out of the list silently (and run in the GPU stage)."""
    for file_name, patterns in CPU_ONLY_TESTS.items():
        tree = ast.parse((REPO / "tests" / file_name).read_text())
        names = [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
        for pattern in patterns:
            assert fnmatch.filter(names, pattern), f"{file_name}: no test matches {pattern!r}"


def test_headline_byte_floors_are_the_benchmarks_floors(first_contact, monkeypatch):
    bench_mmd = load_benchmark_module("bench_mmd", monkeypatch)
    bench_adaln = load_benchmark_module("bench_adaln", monkeypatch)
    for batch, features, dtype in first_contact.MMD_SHAPES:
        case = bench_mmd.Case(batch, first_contact.GROUP_SIZE, features, dtype)
        assert first_contact.mmd_floor_bytes(batch, features, dtype) == case.floor_bytes("forward+backward")
    batch, seq_len, hidden = first_contact.ADALN_SHAPE
    assert (seq_len, hidden) == (bench_adaln.SEQ_LEN, bench_adaln.HIDDEN)
    case = bench_adaln.Case("residual", batch, first_contact.ADALN_DTYPE)
    assert first_contact.adaln_floor_bytes() == case.floor_bytes("forward+backward")


def test_report_from_partial_records(first_contact, tmp_path):
    """Finished, failed, unfinished (section stopped mid-row) and never-run rows, and the derived numbers."""
    fc = first_contact
    now = time.time()
    copy = fc.Recorder(tmp_path / fc.ROWS_FILE, "copy")
    copy.write("environment", device="Fake GPU", torch="2.11", cuda="13.0", triton="3.6", date_utc="2026-12-01 00:00")
    copy.row(fc.COPY_CASE, "copy_", status="ok", ms=0.5, graph_ms=0.5, first_call_s=0.1)
    copy.write("section", status="ok", wall_s=4.0, limit_s=30.0, ended=now)
    mmd = fc.Recorder(tmp_path / fc.ROWS_FILE, "mmd")
    case = fc.mmd_case(*fc.MMD_SHAPES[0])
    mmd.row(case, "imm_kernels[triton]", status="running", started=now - 30)
    mmd.row(case, "imm_kernels[triton]", status="ok", ms=0.05, first_call_s=2.0)
    mmd.row(case, "imm_kernels[triton]", graph_ms=0.04)
    mmd.row(case, "imm_kernels[cuda]", status="unavailable: not built")
    mmd.row(case, "eager", status="ok", ms=1.0, first_call_s=0.2, graph_note="not capturable as a CUDA graph: X")
    mmd.row(case, "compiled", status="ok", ms=0.2, first_call_s=20.0)
    mmd.row(fc.mmd_case(*fc.MMD_SHAPES[1]), "imm_kernels[triton]", status="running", started=now - 12)
    mmd.write("section", status="stopped at its 150 s limit", wall_s=150.0, limit_s=150.0, ended=now)

    lines = fc.write_report(tmp_path)
    report = json.loads((tmp_path / fc.JSON_FILE).read_text())
    rows = {(r["case"], r["provider"]): r for r in report["rows"]}
    assert report["copy_bandwidth_gbps"] == pytest.approx(2 * 2**30 / 0.5e-3 / 1e9)
    triton = rows[case, "imm_kernels[triton]"]
    assert triton["status"] == "ok" and triton["graph_ms"] == 0.04
    assert triton["gbps"] == pytest.approx(fc.mmd_floor_bytes(*fc.MMD_SHAPES[0]) / 0.05e-3 / 1e9)
    assert triton["pct_copy_bw"] == pytest.approx(100 * triton["gbps"] / report["copy_bandwidth_gbps"])
    assert rows[case, "imm_kernels[cuda]"]["status"] == "unavailable: not built"
    assert rows[case, "compiled"]["graph_note"] == "graph replay not timed: the section stopped first"
    cut = rows[fc.mmd_case(*fc.MMD_SHAPES[1]), "imm_kernels[triton]"]
    assert cut["status"] == "unfinished: section stopped at its 150 s limit, 12 s into this row"
    assert rows[fc.mmd_case(*fc.MMD_SHAPES[1]), "eager"]["status"] == "not run: section mmd stopped at its 150 s limit"
    assert rows[fc.adaln_case(), "eager"]["status"] == "not run"
    (triton_line,) = [line for line in lines if "| imm_kernels[triton]" in line and case in line]
    assert "20.00x" in triton_line and "4.00x" in triton_line  # vs eager (1 / 0.05), vs compiled (0.2 / 0.05)
    assert (tmp_path / fc.MD_FILE).read_text().splitlines() == lines


def test_compile_of_the_second_batch_is_skipped_when_the_first_shows_it_cannot_finish(first_contact, tmp_path):
    fc = first_contact
    rec = fc.Recorder(tmp_path / fc.ROWS_FILE, "sampling-compile-b1")
    assert fc.compile_skip_reason(fc.read_records(tmp_path / fc.ROWS_FILE), 500) == "the B=1 compile did not finish"
    rec.row(fc.sampling_case(1), "compiled", status="ok", ms=40.0, first_call_s=200.0)
    records = fc.read_records(tmp_path / fc.ROWS_FILE)
    assert fc.compile_skip_reason(records, 400) is None
    assert fc.compile_skip_reason(records, 250) == "the B=1 compile took 200 s; 250 s left"


def process_gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "\nState:\tZ" in status.read_text()  # gone, or a zombie nobody reaped


def test_a_section_is_stopped_at_its_limit_with_everything_it_started(first_contact, tmp_path):
    grandchild = (
        "import subprocess, sys, time; "
        "print(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']).pid, flush=True); "
        "time.sleep(60)"
    )
    log_path = tmp_path / "log"
    with open(log_path, "w") as log:
        start = time.monotonic()
        status = first_contact.run_limited([sys.executable, "-c", grandchild], 3, log)
        assert time.monotonic() - start < 20
        assert first_contact.run_limited([sys.executable, "-c", "raise SystemExit(3)"], 30, log) == "exit code 3"
    assert status == "stopped at its 3 s limit"
    pid = int(log_path.read_text().split()[0])
    deadline = time.monotonic() + 10
    while not process_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process_gone(pid)


def test_train_check_dry_run_and_a_tiny_run_on_the_cpu(tmp_path):
    run = dry_run("train-check", str(tmp_path / "dry"))
    assert succeeded(run)
    assert "benchmarks/train_check.py --out" in run.stdout

    out = tmp_path / "check"
    command = [sys.executable, str(REPO / "benchmarks" / "train_check.py"), "--out", str(out), "--tiny"]
    command += ["--steps", "8", "--paths", "fp32,bf16,bf16+fsdp(1 rank)"]
    # Without Triton's interpreter (the tests' default here): the script runs the CPU kernels, as a user's would.
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "train_check.json").read_text())
    paths = {entry["path"]: entry for entry in report["paths"]}
    assert set(paths) == {"fp32", "bf16", "bf16+fsdp(1 rank)"}
    assert all(entry["falls"] and entry["agrees"] for entry in paths.values())
    # FSDP on one rank computes what the unsharded path computes
    assert paths["bf16+fsdp(1 rank)"]["first_rel_to_bf16"] <= 1e-3

    bad = subprocess.run([*command[:-2], "--paths", "fp32"], capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "--paths must name bf16" in bad.stderr
