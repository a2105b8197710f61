#!/usr/bin/env bash
# Build imm_kernels._C in place (C++ and CUDA), then tests, then benchmarks, on a CUDA
# machine from a plain checkout (installs nothing).
# Usage: bash benchmarks/run_gpu.sh [all|tests|bench] [benchmark files or pytest options]
#   all (default): build, tests, every benchmark. The whole run can exceed one 10-minute device
#   call: split it, e.g. `tests`, then `bench benchmarks/bench_mmd.py benchmarks/bench_adaln.py`,
#   then `bench benchmarks/bench_dit.py`, then `bench benchmarks/bench_sampling.py`.
# Output folder: $OUT, else bench-out/ (logs, JSON, markdown).
set -uo pipefail
cd "$(dirname "$0")/.."

stage="${1:-all}"
[ $# -gt 0 ] && shift
case "$stage" in all|tests|bench) ;; *) echo "usage: $0 [all|tests|bench] [benchmark files or pytest options]"; exit 2;; esac
out="${OUT:-bench-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 IMM_BENCH_OUT="$out"
unset TRITON_INTERPRET  # the compiled kernels on the GPU, not Triton's CPU interpreter

python3 - <<'EOF' 2>&1 | tee "$out/environment.txt"
import torch, triton
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CUDA unavailable)"
print(f"GPU: {gpu} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {triton.__version__}")
EOF

# The extension against this machine's torch; its build time goes into the log.
start=$(date +%s)
python3 setup.py build_ext --inplace > "$out/build.log" 2>&1
build_status=$?
echo "build_ext --inplace: exit $build_status in $(( $(date +%s) - start )) s" | tee -a "$out/environment.txt"
[ "$build_status" -ne 0 ] && tail -40 "$out/build.log"
python3 -c "import imm_kernels; print(imm_kernels.backends())" | tee -a "$out/environment.txt"

tests_status=0
if [ "$stage" != bench ]; then
    python3 -m pytest tests -q 2>&1 | tee "$out/tests.log"
    tests_status=${PIPESTATUS[0]}
    if [ "$tests_status" -ne 0 ]; then
        echo "WARNING: tests failed (exit $tests_status, see $out/tests.log)"
    fi
fi

# Last, so that its summary table is the last thing printed.
bench_status=0
if [ "$stage" != tests ]; then
    python3 -m pytest "${@:-benchmarks/}" --benchmark-only -q 2>&1 | tee "$out/benchmarks.log"
    bench_status=${PIPESTATUS[0]}
fi
exit $(( tests_status || bench_status ))
