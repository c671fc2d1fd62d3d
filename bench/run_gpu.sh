#!/usr/bin/env bash
# Builds msfused, runs the tests, and benchmarks the workloads on a CUDA machine.
#
#   bash bench/run_gpu.sh OUTDIR
#
# For a fresh GPU machine with torch, triton and ninja preinstalled and no network: nothing is
# downloaded (pip runs with --no-index --no-deps --no-build-isolation). Everything lands in OUTDIR:
#   env.txt        nvidia-smi, versions, commit
#   build.log      pip install --no-build-isolation -e . (verbose: the build configuration is in it)
#   info.txt       python -m msfused info (the build, and which backends are available)
#   tests.log      pytest tests -x -q
#   bench.log      the benchmark's progress and table; table.txt, results.json, speedups.png beside it
#                  (speedups.png only where matplotlib is installed)
# The benchmark runs even when a test fails (its err_vs_naive column still tells a wrong result);
# the exit status is non-zero if the build, the tests or the benchmark failed.
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: bash bench/run_gpu.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUTDIR=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2  # the repository root
PYTHON=${PYTHON:-python}

log() { echo "[run_gpu $(date +%H:%M:%S)] $*" >&2; }

log "writing to $OUTDIR"
{
    nvidia-smi || echo "nvidia-smi: not available"
    "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "CUDA", torch.version.cuda, "devices", torch.cuda.device_count())'
    "$PYTHON" -c 'import triton; print("triton", triton.__version__)' || echo "triton: not importable"
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git status --porcelain 2>/dev/null | grep -q . && echo ' (with local changes)')"
    echo "CPUs $(nproc)"
} > "$OUTDIR/env.txt" 2>&1

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    log "torch sees no CUDA device; see $OUTDIR/env.txt"
    exit 1
fi

log "building (pip install --no-build-isolation -e .) -> build.log"
if ! MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -v -e . \
        > "$OUTDIR/build.log" 2>&1; then
    log "build failed; the end of build.log:"
    tail -n 40 "$OUTDIR/build.log" >&2
    exit 1
fi

"$PYTHON" -m msfused info 2>&1 | tee "$OUTDIR/info.txt"

log "tests (pytest tests -x -q) -> tests.log"
"$PYTHON" -m pytest tests -x -q 2>&1 | tee "$OUTDIR/tests.log"
tests_status=${PIPESTATUS[0]}
log "tests exit status: $tests_status"

log "benchmark -> bench.log, table.txt, results.json"
"$PYTHON" -m msfused bench --device cuda --dtype bfloat16,float32 --mode inference,train --full-n \
    --out "$OUTDIR" 2>&1 | tee "$OUTDIR/bench.log"
bench_status=${PIPESTATUS[0]}
log "benchmark exit status: $bench_status"

log "done: build ok, tests $tests_status, benchmark $bench_status; results in $OUTDIR"
if [[ $tests_status -ne 0 || $bench_status -ne 0 ]]; then
    exit 1
fi
