#!/usr/bin/env bash
# The GPU stages, on a CUDA machine from a plain checkout: each builds imm_kernels._C in place
# (installs nothing), then runs tests and/or benchmarks. Every stage but `all` fits one 9-minute call.
#
# Usage: bash benchmarks/run_gpu.sh [--dry-run] [STAGE [ARGS]]
#   first-contact [OUT_DIR]  environment, build, the GPU tests of mmd, adaln, timestep, sampling and
#                            dit, then the headline benchmarks (benchmarks/first_contact.py, no pytest)
#   tests [OUT_DIR]          build, then the whole test suite
#   bench-full N [OUT_DIR]   build, then chunk N of `pytest benchmarks/ --benchmark-only`
#                            (`bench-full list` prints the chunks and their estimated times)
#   bench [PYTEST ARGS]      build, then `pytest --benchmark-only` on what you name (default benchmarks/)
#   train-check [OUT_DIR]    build, then benchmarks/train_check.py: 200 DiT-S/2 steps on random latents
#                            per training path (fp32, bf16, bf16 + compile, bf16 FSDP on one rank):
#                            the loss falls and the paths agree
#   all (the default)        build, the whole test suite, every benchmark: longer than one device call
#   --dry-run                print what the stage would run (commands, test selection, benchmarks)
#                            and check that every file it names exists; needs no GPU, writes nothing
# Tests run without Triton's interpreter and leave out the tests marked cpu_only (tests/conftest.py).
# Output: OUT_DIR, else $OUT, else bench-out/. Limits in seconds, from the environment:
#   STAGE_BUDGET_S  the whole stage, build included (520; `all`: 0, no limit). A step still running
#                   then gets SIGINT: pytest stops and still writes the tables of what finished.
#   BUILD_LIMIT_S (300), TESTS_LIMIT_S (first-contact's tests: 210), HEADLINE_MIN_S (first-contact:
#   200, kept for the headline benchmarks however long the build took).
# Build: MAX_JOBS (ninja; default every core), IMM_KERNELS_CUDA_ARCHS (default 90: the H100/H200).
# TEST_WORKERS (8): pytest-xdist processes for the tests where it is installed; 0 for one process.
set -uo pipefail
cd "$(dirname "$0")/.."

FIRST_CONTACT_TESTS=(tests/ops tests/sampling/test_sampling.py tests/models/test_dit.py)
HEADLINE_SCRIPT=benchmarks/first_contact.py
BENCH_SUPPORT=(benchmarks/conftest.py benchmarks/timing.py)
TEST_TIMEOUT_S=150  # per test, where pytest-timeout is installed: one hung test cannot take the stage

# bench-full: `pytest benchmarks/ --benchmark-only` in chunks that should each fit one 9-minute
# call, the build included (about 1.5 min cold). The estimates are guesses from compile times on
# other machines until a GPU run measures them: first-contact records how long torch.compile took
# for the MMD and adaLN references and the 8-step DiT-XL/2 sampler. A chunk stopped at the budget
# keeps its finished rows; run the rest with `bench` and -k.
BENCH_CHUNKS=14
bench_chunk() {  # bench_chunk N: sets chunk_env, chunk_args, chunk_estimate; fails for an unknown N
    chunk_env=()
    case "$1" in
        1) chunk_estimate="6 min: 10 reference compiles"; chunk_args=(benchmarks/bench_mmd.py benchmarks/bench_timestep.py) ;;
        2) chunk_estimate="6.5 min: 32 small compiles"; chunk_args=(benchmarks/bench_adaln.py) ;;
        3) chunk_estimate="6 min: no torch.compile"; chunk_env=(IMM_BENCH_SAMPLING_COMPILE=none)
           chunk_args=(benchmarks/bench_dit.py benchmarks/bench_sampling.py -k "not compiled") ;;
        4) chunk_estimate="6.5 min: 8 DiT-B/2 compiles"; chunk_args=(benchmarks/bench_dit.py -k "compiled and DiT-B/2") ;;
        5) chunk_estimate="5.5 min: 4 DiT-XL/2 inference compiles"
           chunk_args=(benchmarks/bench_dit.py -k "compiled and DiT-XL/2 and inference") ;;
        6) chunk_estimate="5.5 min: 2 DiT-XL/2 training compiles"
           chunk_args=(benchmarks/bench_dit.py -k "DiT-XL/2 and training-compiled") ;;
        7) chunk_estimate="5.5 min: 2 DiT-XL/2 training compiles"
           chunk_args=(benchmarks/bench_dit.py -k "DiT-XL/2 and training-imm_kernels[compiled]") ;;
        8) chunk_estimate="5.5 min: 4 DiT-S/2 sampler compiles"
           chunk_args=(benchmarks/bench_sampling.py -k "dit-s2-1-1- or dit-s2-1-8-") ;;
        9) chunk_estimate="4.5 min: 2 one-step DiT-XL/2 sampler compiles"; chunk_args=(benchmarks/bench_sampling.py -k "dit-xl2-1-1-") ;;
        10) chunk_estimate="6.5 min: 1 eight-step DiT-XL/2 sampler compile"
            chunk_args=(benchmarks/bench_sampling.py -k "dit-xl2-1-8-no-cfg") ;;
        11) chunk_estimate="6.5 min: 1 eight-step DiT-XL/2 sampler compile"
            chunk_args=(benchmarks/bench_sampling.py -k "dit-xl2-1-8-cfg") ;;
        12) chunk_estimate="5.5 min: 2 DiT-S/2 training-step compiles"
            chunk_args=(benchmarks/bench_train.py -k "not DiT-XL/2") ;;
        13) chunk_estimate="5.5 min: 1 DiT-XL/2 training-step compile"
            chunk_args=(benchmarks/bench_train.py -k "DiT-XL/2 and not imm_kernels") ;;
        14) chunk_estimate="5.5 min: 1 DiT-XL/2 training-step compile"
            chunk_args=(benchmarks/bench_train.py -k "DiT-XL/2 and imm_kernels") ;;
        *) return 1 ;;
    esac
}

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
quoted() { printf '%q ' "$@"; }
show() { printf '    %s\n' "$*"; }

dry_run=0
positional=()
for arg in "$@"; do
    if [ "$arg" = --dry-run ]; then dry_run=1; else positional+=("$arg"); fi
done
set -- ${positional[@]+"${positional[@]}"}
stage="${1:-all}"
[ $# -gt 0 ] && shift

list_chunks() {
    local n
    for n in $(seq 1 "$BENCH_CHUNKS"); do
        bench_chunk "$n"
        printf '%2d  ~%s\n    %s\n' "$n" "$chunk_estimate" \
            "$(quoted ${chunk_env[@]+"${chunk_env[@]}"} python3 -m pytest "${chunk_args[@]}" --benchmark-only)"
    done
}

bench_args=()
case "$stage" in
    first-contact|tests|train-check) out="${1:-${OUT:-bench-out}}" ;;
    bench-full)
        chunk="${1:-}"
        out="${2:-${OUT:-bench-out}}"
        if [ "$chunk" = list ]; then list_chunks; exit 0; fi
        if [ -z "$chunk" ] && [ "$dry_run" = 0 ]; then
            echo "bench-full needs a chunk number, 1 to $BENCH_CHUNKS:" >&2; list_chunks >&2; exit 2
        fi
        if [ -n "$chunk" ] && ! bench_chunk "$chunk"; then
            echo "no chunk '$chunk': chunks are 1 to $BENCH_CHUNKS" >&2; exit 2
        fi ;;
    bench) out="${OUT:-bench-out}"; bench_args=("${@:-benchmarks/}") ;;
    all) out="${OUT:-bench-out}" ;;
    -h|--help|help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
esac

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 IMM_BENCH_OUT="$out"
unset TRITON_INTERPRET  # the compiled kernels on the GPU, not Triton's CPU interpreter

stage_start=$(date +%s)
if [ "$stage" = all ]; then budget="${STAGE_BUDGET_S:-0}"; else budget="${STAGE_BUDGET_S:-520}"; fi
left() {  # seconds left of the stage budget, less $1 (a million when there is no budget)
    if [ "$budget" -le 0 ]; then echo 1000000; else echo $(( stage_start + budget - $(date +%s) - ${1:-0} )); fi
}
at_most() { echo $(( $1 < $2 ? $1 : $2 )); }
# limited SECONDS CMD...: CMD, sent SIGINT after SECONDS (pytest then still writes its summary),
# killed 30 s later; exit status 124 when it was stopped.
limited() { local seconds=$1; shift; timeout --foreground -s INT -k 30 "$seconds" "$@"; }

check_files() {  # every file the stage runs must be there; a dry run checks nothing else first
    local missing=0 file
    for file in "$@"; do
        if [ ! -e "$file" ]; then echo "missing: $file" >&2; missing=1; fi
    done
    return "$missing"
}

# collect ::LABEL[:FLAGS] PYTEST_ARGS... [::LABEL ...]: each group's pytest collection on this machine,
# in one process. FLAGS: ids (print the node ids), all (the set every other group must cover).
collect() {
    python3 - "$@" <<'EOF'
import contextlib
import io
import sys
from collections import Counter

import pytest


class Collected:
    def __init__(self):
        self.ids = []

    def pytest_collection_finish(self, session):
        self.ids = [item.nodeid for item in session.items]


groups = []
for token in sys.argv[1:]:
    if token.startswith("::"):
        label, _, flags = token[2:].partition(":")
        groups.append((label, flags.split(","), []))
    else:
        groups[-1][2].append(token)
ok, everything, covered = True, set(), set()
for label, flags, args in groups:
    plugin = Collected()
    with contextlib.redirect_stdout(io.StringIO()) as output:
        status = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args], plugins=[plugin])
    if status != 0 or not plugin.ids:
        ok = False
        print(f"    {label}: pytest exit {status}, {len(plugin.ids)} collected:\n{output.getvalue()[-3000:]}")
        continue
    per_file = Counter(nodeid.split("::")[0] for nodeid in plugin.ids)
    print(f"    {label}: {len(plugin.ids)} collected here ("
          + ", ".join(f"{name} {count}" for name, count in sorted(per_file.items())) + ")")
    if "ids" in flags:
        print("\n".join(f"      {nodeid}" for nodeid in plugin.ids))
    (everything if "all" in flags else covered).update(plugin.ids)
if everything:
    missing = sorted(everything - covered)
    if missing:
        ok = False
        print("    in no chunk:\n" + "\n".join(f"      {nodeid}" for nodeid in missing))
    else:
        print(f"    each of the {len(everything)} benchmarks collected here is in a chunk")
sys.exit(0 if ok else 1)
EOF
}

write_environment() {
    if [ "$dry_run" = 1 ]; then
        echo "environment -> $out/environment.txt: GPU, torch, triton, CUDA, driver, nvcc, CPUs, pytest plugins"
        return
    fi
    python3 - <<'EOF' 2>&1 | tee "$out/environment.txt"
import os, platform, shutil, subprocess
from importlib import metadata

import torch


def version(distribution):
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def first_line(*command):
    if shutil.which(command[0]) is None:
        return f"{command[0]} not found"
    run = subprocess.run(command, capture_output=True, text=True)
    lines = (run.stdout or run.stderr).strip().splitlines()
    return lines[-1] if command[0] == "nvcc" else lines[0]


gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CUDA unavailable)"
print(f"GPU: {gpu} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {version('triton')} "
      f"| python {platform.python_version()} | {os.cpu_count()} CPUs")
print("nvidia-smi (driver, memory, SM clock, max SM clock):",
      first_line("nvidia-smi", "--query-gpu=driver_version,memory.total,clocks.sm,clocks.max.sm", "--format=csv,noheader"))
print("nvcc:", first_line("nvcc", "--version"))
print(" | ".join(f"{name} {version(name)}" for name in ("pytest", "pytest-benchmark", "pytest-xdist", "pytest-timeout")))
EOF
}

build_status=0
build() {
    local cmd=(env "MAX_JOBS=${MAX_JOBS:-$(nproc)}" "IMM_KERNELS_CUDA_ARCHS=${IMM_KERNELS_CUDA_ARCHS:-90}"
               python3 setup.py build_ext --inplace)
    local backends=(python3 -c "import imm_kernels; print('backends:', imm_kernels.backends())")
    if [ "$dry_run" = 1 ]; then
        echo "build (limit ${BUILD_LIMIT_S:-300} s) -> $out/build.log:"
        show "$(quoted "${cmd[@]}")"
        echo "backends -> $out/environment.txt:"
        show "$(quoted "${backends[@]}")"
        return
    fi
    local start limit
    start=$(date +%s)
    limit=$(at_most "${BUILD_LIMIT_S:-300}" "$(left)")
    limited "$limit" "${cmd[@]}" > "$out/build.log" 2>&1
    build_status=$?
    echo "build_ext --inplace (sm_${IMM_KERNELS_CUDA_ARCHS:-90}): exit $build_status in $(( $(date +%s) - start )) s" \
        | tee -a "$out/environment.txt"
    [ "$build_status" -ne 0 ] && tail -40 "$out/build.log"
    "${backends[@]}" 2>&1 | tee -a "$out/environment.txt"
}

tests_status=0
run_tests() {  # run_tests LIMIT_S FILES...
    local cap=$1
    shift
    local cmd=(python3 -m pytest "$@" -m "not cpu_only" -q -p no:cacheprovider -rfE --durations=15)
    if [ "$dry_run" = 1 ]; then
        echo "tests ($([ "$cap" -ge 1000000 ] && echo "no limit" || echo "limit $cap s")) -> $out/tests.log:"
        show "$(quoted "${cmd[@]}")"
        show "plus -n ${TEST_WORKERS:-8} (with TORCHINDUCTOR_COMPILE_THREADS=1) where pytest-xdist is installed,"
        show "--timeout $TEST_TIMEOUT_S where pytest-timeout is"
        collect "::selected" "$@" -m "not cpu_only" "::left out, marked cpu_only:ids" "$@" -m cpu_only || tests_status=1
        return
    fi
    if ! python3 -c "import pytest" 2>/dev/null; then
        echo "tests: skipped, pytest is not installed here" | tee "$out/tests.log" | tee -a "$out/environment.txt"
        tests_status=1
        return
    fi
    if [ "${TEST_WORKERS:-8}" -gt 0 ] && python3 -c "import xdist" 2>/dev/null; then
        # Each worker compiles on its own: one compile thread each keeps the cores from oversubscription.
        cmd=(env TORCHINDUCTOR_COMPILE_THREADS=1 "${cmd[@]}" -n "${TEST_WORKERS:-8}")
    fi
    python3 -c "import pytest_timeout" 2>/dev/null && cmd+=(--timeout "$TEST_TIMEOUT_S")
    local start limit
    limit=$(at_most "$cap" "$(left)")
    if [ "$limit" -lt 30 ]; then
        echo "tests: skipped, $limit s left of the stage budget" | tee "$out/tests.log" | tee -a "$out/environment.txt"
        tests_status=1
        return
    fi
    start=$(date +%s)
    limited "$limit" "${cmd[@]}" 2>&1 | tee "$out/tests.log"
    tests_status=${PIPESTATUS[0]}
    local stopped=""
    [ "$tests_status" -eq 124 ] && stopped=", stopped at its limit"
    echo "tests: $(tail -1 "$out/tests.log") (exit $tests_status in $(( $(date +%s) - start )) s, limit $limit s$stopped)" \
        | tee -a "$out/environment.txt"
}

bench_status=0
run_benchmarks() {  # run_benchmarks [VAR=VALUE...] -- PYTEST_ARGS...
    local vars=()
    while [ "$1" != -- ]; do vars+=("$1"); shift; done
    shift
    local cmd=(env ${vars[@]+"${vars[@]}"} python3 -m pytest "$@" --benchmark-only -q -p no:cacheprovider)
    if [ "$dry_run" = 1 ]; then
        show "$(quoted "${cmd[@]}")"
        return
    fi
    if ! python3 -c "import pytest_benchmark" 2>/dev/null; then
        echo "benchmarks: skipped, pytest-benchmark is not installed here (first-contact's headline needs none)"
        bench_status=1
        return
    fi
    local limit
    limit=$(left 5)
    if [ "$limit" -lt 30 ]; then
        echo "benchmarks: skipped, $limit s left of the stage budget"
        bench_status=1
        return
    fi
    limited "$limit" "${cmd[@]}" 2>&1 | tee "$out/benchmarks.log"
    bench_status=${PIPESTATUS[0]}
    if [ "$bench_status" -eq 124 ]; then
        echo "benchmarks: stopped at the stage budget ($budget s); the tables above hold what finished"
    fi
}

headline_status=0
run_headline() {
    local cmd=(python3 "$HEADLINE_SCRIPT" --out "$out" --budget)
    if [ "$dry_run" = 1 ]; then
        echo "headline benchmarks (the rest of the budget) -> $out/headline.{jsonl,json,md,log}:"
        show "$(quoted "${cmd[@]}") SECONDS_LEFT"
        python3 "$HEADLINE_SCRIPT" --list | sed 's/^/    /'
        headline_status=${PIPESTATUS[0]}
        return
    fi
    local seconds
    seconds=$(left 10)
    # The script keeps to its budget (each section has a limit); the 30 s more only catch a hang.
    limited $(( (seconds > 0 ? seconds : 0) + 30 )) "${cmd[@]}" "$(( seconds > 0 ? seconds : 0 ))"
    headline_status=$?
}

# The files each stage runs, checked before anything starts.
files=(setup.py CMakeLists.txt)
case "$stage" in
    first-contact) files+=(tests/conftest.py "${FIRST_CONTACT_TESTS[@]}" "$HEADLINE_SCRIPT") ;;
    tests) files+=(tests/conftest.py) ;;
    train-check) files+=(benchmarks/train_check.py) ;;
    bench-full)
        files+=("${BENCH_SUPPORT[@]}")
        for n in ${chunk:-$(seq 1 "$BENCH_CHUNKS")}; do
            bench_chunk "$n"
            for arg in "${chunk_args[@]}"; do [[ "$arg" == *.py ]] && files+=("$arg"); done
        done ;;
    bench)
        files+=("${BENCH_SUPPORT[@]}")
        for arg in "${bench_args[@]}"; do [[ "$arg" == *.py* ]] && files+=("${arg%%::*}"); done ;;
    all) files+=(tests/conftest.py "${BENCH_SUPPORT[@]}") ;;
esac
check_files "${files[@]}" || { echo "run_gpu.sh $stage: files missing, nothing run" >&2; exit 1; }

if [ "$dry_run" = 1 ]; then
    echo "dry run of stage $stage (budget: $([ "$budget" -le 0 ] && echo none || echo "$budget s")); output folder $out"
else
    mkdir -p "$out"
fi
write_environment
build

case "$stage" in
    first-contact)
        tests_limit=$(at_most "${TESTS_LIMIT_S:-210}" "$(left "${HEADLINE_MIN_S:-200}")")
        run_tests "$tests_limit" "${FIRST_CONTACT_TESTS[@]}"
        run_headline ;;  # last: its table is the last thing printed
    tests) run_tests "$(left)" tests ;;
    train-check)
        cmd=(python3 benchmarks/train_check.py --out "$out" --steps 200)
        if [ "$dry_run" = 1 ]; then
            echo "train check (the rest of the budget) -> $out/train_check.json, $out/train_check.log:"
            show "$(quoted "${cmd[@]}")"
        else
            limited "$(left 5)" "${cmd[@]}" 2>&1 | tee "$out/train_check.log"
            bench_status=${PIPESTATUS[0]}
        fi ;;
    bench-full)
        if [ "$dry_run" = 1 ]; then
            echo "benchmarks (the rest of the budget) -> $out/benchmarks.log, $out/<op>.{json,md};"
            echo "(a GPU collects more cases of bench_mmd, bench_adaln and bench_timestep than a CPU does)"
            groups=()
            [ -z "$chunk" ] && groups+=("::all benchmarks:all" benchmarks/)
            for n in ${chunk:-$(seq 1 "$BENCH_CHUNKS")}; do
                bench_chunk "$n"
                echo "chunk $n (~$chunk_estimate):"
                run_benchmarks ${chunk_env[@]+"${chunk_env[@]}"} -- "${chunk_args[@]}"
                groups+=("::chunk $n" "${chunk_args[@]}")
            done
            collect "${groups[@]}" || bench_status=1
        else
            run_benchmarks ${chunk_env[@]+"${chunk_env[@]}"} -- "${chunk_args[@]}"
        fi ;;
    bench)
        [ "$dry_run" = 1 ] && echo "benchmarks (the rest of the budget) -> $out/benchmarks.log, $out/<op>.{json,md}:"
        run_benchmarks -- "${bench_args[@]}"
        [ "$dry_run" = 1 ] && { collect "::selected" "${bench_args[@]}" || bench_status=1; } ;;
    all)
        run_tests "$(left)" tests
        [ "$dry_run" = 1 ] && echo "benchmarks -> $out/benchmarks.log, $out/<op>.{json,md}:"
        run_benchmarks -- benchmarks/
        [ "$dry_run" = 1 ] && { collect "::benchmarks" benchmarks/ || bench_status=1; } ;;
esac

if [ "$dry_run" = 0 ]; then
    echo "$stage: $(( $(date +%s) - stage_start )) s in all" >> "$out/environment.txt"
elif [ $(( tests_status || bench_status || headline_status )) -ne 0 ]; then
    echo "dry run of stage $stage: a check above failed" >&2
fi
exit $(( build_status || tests_status || bench_status || headline_status ))
