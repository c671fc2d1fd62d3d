#!/usr/bin/env bash
# The GPU check: build, correctness of every GPU backend, speed, in about 4-5 minutes (estimate) on one
# H100/H200 with 16 cores (torch, triton, ninja, nvcc preinstalled; no network: nothing is downloaded).
#
#   bash bench/gpu_check.sh OUTDIR            # on the GPU machine, from a clean checkout
#   bash bench/gpu_check.sh --smoke OUTDIR    # dry run on a CPU (CI: tests/test_gpu_check.py): every phase,
#                                             # tiny sizes, Triton under its interpreter, no build
#
# Phases are independent (each runs whatever the previous one gave: the Triton phases run even if the C++
# build fails; Triton's correctness and kernel compilation run *during* the build, which they do not need)
# and each writes its answer into OUTDIR as soon as it has it:
#   env.txt            nvidia-smi, python, torch, triton, CUDA, commit, CPUs
#   build.log/.status  1. the extension for this GPU's own arch only (TORCH_CUDA_ARCH_LIST from
#                         torch.cuda.get_device_capability()), python setup.py build_ext --inplace, MAX_JOBS=16;
#                         a rerun reuses the build (ninja recompiles only what changed); info.txt after it
#   correctness/<backend>-<dtype>-<chunk>.txt (live), correctness.txt/.json (gathered)
#                      2. python -m msfused.bench.gpu_check correctness: 'triton' (2a, during the build), then
#                         'cuda' and 'auto' (2b) on 24 seeded random configurations x float64, float32 (TF32 off),
#                         bfloat16 x NCHW, channels_last, forward and backward (and the no-grad path in eval
#                         mode), NaN-poisoned outputs, SPEC.md's rules; one line per case, never stopping at a
#                         failure; cases a budget does not reach get SKIP lines
#   pytest-gpu.log     2c. the suite's tests that need a GPU (GPU_TESTS), beside 2b (GPU_CHECK_TESTS=1)
#   prewarm.log        the workloads' Triton kernels compiled and autotuned (during the build, for phase 3)
#   results.json, table.txt, profile.txt, host_profile.txt (rewritten after each workload)
#                      3. python -m msfused.bench.gpu_check speed: every workload at its full N in bfloat16,
#                         inference and training: naive, 'cuda', 'triton', 'auto'; torch.compile of the naive
#                         block in inference for psp_mmseg, pyramid_seed, psp_small (last); a torch.profiler
#                         breakdown of one call per workload, mode and implementation; a cProfile of 20
#                         training steps of each fused backend on the first workload (host_profile.txt);
#                         an implementation that breaks the device (a sticky CUDA error) costs its group
#                         only: the phase restarts itself without it ("broken" in results.json)
#   summary.txt        each phase's exit status and seconds
#
# Budget per phase. "Budget": no new case or group starts after it; "cap": `timeout` stops the phase, and what
# it measured is still written. Order: 2a (and 2a') start with the build; 2b (and 2c) start when the build
# ends, beside what remains of 2a; 3 runs alone once 1-2 are done (it times).
# Measured on the H200 runs of 2026-11-30 (16 cores; commits a038b1c, 64116e0), with the budgets of then:
#   1. build 123 s and 167 s: the critical path was the slowest C++ file, csrc/cpu/multi_scale_cpu.cpp
#      (75 s alone here; ninja's log, 2 jobs: 75-116 s). It is now five files of 6-23 s each (csrc/cpu/);
#      the slowest are csrc/autograd/multi_scale_autograd.cpp (24 s) and csrc/cuda/multi_scale_cuda.cpp
#      (20-44 s): ~45-60 s expected on 16 cores (estimate). A rerun without C++ changes: ~10 s (estimate).
#   2a. Triton correctness beside the build: 146 s (budget 110 s: 40 of 144 cases unreached), 197 s (budget
#      160 s: 36 unreached). Triton compiles ~1000 kernel variants for the 24 configurations x 3 dtypes.
#   2b. 'cuda' and 'auto': 54 s (budget 40 s: 77 'auto' cases unreached), 100 s (cap, with 2c beside it).
#   3. speed: 123 s (budget 110 s; psp_decoder_smp and the torch.compile groups unreached), then 2 x 10 s
#      per workload at 5 warm-up and 30 timed calls, Triton's autotuning 32 s.
#   Those runs took 329 s and 430+ s (cut): too long for a 15-minute window with a rerun.
# Now (estimates, not yet run on a GPU): 2a budget 130 s (cap 160 s); 2b budget 70 s (cap 90 s) from the
# build's end; 3 budget 110 s (cap 140 s) at 3 warm-up and 15 timed calls (at most 0.5 s) per case. With a
# build of ~60 s, 2a (130 s) ends after 2b (60 + 70 s): ~130 + 110 = ~240-260 s with the processes' start,
# about 4 minutes; at the old build's ~150 s it would be ~330 s.
# 2c (GPU_CHECK_TESTS=1): the suite's GPU tests (GPU_TESTS) beside 2b, capped with it.

# Environment: PYTHON (default python), MAX_JOBS (default: the CPU count), GPU_CHECK_BUILD=0 to skip the
# build (use the extension as it is), GPU_CHECK_TESTS=1 to run phase 2c.
set -uo pipefail

SMOKE=0
if [[ ${1:-} == "--smoke" ]]; then
    SMOKE=1
    shift
fi
if [[ $# -ne 1 ]]; then
    echo "usage: bash bench/gpu_check.sh [--smoke] OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUTDIR=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2  # the repository root
PYTHON=${PYTHON:-python}
START=$(date +%s)
: > "$OUTDIR/summary.txt"

log() { echo "[gpu_check $(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" >&2; }
record() {  # phase, exit status, seconds
    echo "$1: exit status $2, $3 s" >> "$OUTDIR/summary.txt"
    log "$1: exit status $2 ($3 s)"
}

if [[ $SMOKE -eq 1 ]]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    DEVICE=cpu
    # Under Triton's interpreter a kernel runs ~1e4 times slower: one tiny configuration, and the speed phase
    # on the CPU backend (its code path is the one a GPU run takes, with other implementation names).
    CORRECTNESS_ARGS=(--configs 1 --max-hw 9 --dtypes float64 --chunks 1 --jobs 2)
    TRITON_ARGS=()
    OTHER_ARGS=(--backends auto)  # 'cpu' is what 'auto' runs on a CPU
    SPEED_ARGS=(--workloads psp_small --n 2 --dtype float32 --backends cpu,auto --compile-workloads psp_small --compile-backend eager
                --warmup 1 --reps 2 --max-seconds 0.2)
    CAPS=(60 240 240 240)
else
    DEVICE=cuda
    CORRECTNESS_ARGS=()
    TRITON_ARGS=(--budget 130)
    OTHER_ARGS=(--budget 70)
    SPEED_ARGS=(--budget 110 --warmup 3 --reps 15 --max-seconds 0.5)
    CAPS=(240 160 90 140)
    # The tests of the suite that only run on a GPU (the CUDA backend, CUDA graphs, autocast on CUDA).
    GPU_TESTS=(tests/test_cuda_backend.py tests/test_cuda_graphs.py tests/test_autocast.py)
fi

log "writing to $OUTDIR ($DEVICE)"
{
    nvidia-smi || echo "nvidia-smi: not available"
    "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "CUDA", torch.version.cuda, "devices", torch.cuda.device_count())
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)'
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo ' (with local changes)')"
    echo "CPUs $(nproc)"
} > "$OUTDIR/env.txt" 2>&1

# 2a. Triton correctness, and compiling the workloads' Triton kernels for phase 3, run during the build: they
# need no compiled code (MSFUSED_NO_EXTENSION=1: the extension is not loaded while it is being rebuilt).
t2=$(date +%s)
log "2a. correctness of 'triton' -> correctness/triton-*.txt; the workloads' Triton kernels compiled (background)"
MSFUSED_NO_EXTENSION=1 timeout "${CAPS[1]}" "$PYTHON" -m msfused.bench.gpu_check correctness --device "$DEVICE" \
    --out "$OUTDIR" --backends triton "${CORRECTNESS_ARGS[@]}" "${TRITON_ARGS[@]}" 2> "$OUTDIR/correctness-triton.log" &
triton_pid=$!
if [[ $DEVICE == cuda ]]; then
    MSFUSED_NO_EXTENSION=1 timeout "${CAPS[1]}" "$PYTHON" -m msfused.bench.gpu_check prewarm --device "$DEVICE" \
        > "$OUTDIR/prewarm.log" 2>&1 &
    prewarm_pid=$!
fi

# 1. Build for this GPU's arch only.
t0=$(date +%s)
if [[ $SMOKE -eq 1 || ${GPU_CHECK_BUILD:-1} == 0 ]]; then
    echo "build skipped ($([[ $SMOKE -eq 1 ]] && echo '--smoke' || echo 'GPU_CHECK_BUILD=0')): using the extension as it is" \
        | tee "$OUTDIR/build.log" >&2
    build_status=0
else
    ARCH=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>>"$OUTDIR/build.log")
    log "1. build for arch ${ARCH:-?} (MAX_JOBS=${MAX_JOBS:-$(nproc)}) -> build.log"
    if [[ -z $ARCH ]]; then
        echo "torch sees no CUDA device" >> "$OUTDIR/build.log"
        build_status=1
    else
        TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=${MAX_JOBS:-$(nproc)} timeout "${CAPS[0]}" \
            "$PYTHON" setup.py build_ext --inplace >> "$OUTDIR/build.log" 2>&1
        build_status=$?
        [[ $build_status -ne 0 ]] && tail -n 30 "$OUTDIR/build.log" >&2
    fi
fi
echo "$build_status" > "$OUTDIR/build.status"
record "1. build" "$build_status" $(( $(date +%s) - t0 ))
"$PYTHON" -m msfused info > "$OUTDIR/info.txt" 2>&1
cat "$OUTDIR/info.txt" >&2

# 2c. The suite's GPU tests, beside 2b (both only check values: sharing the GPU does not matter; done before 3).
if [[ $DEVICE == cuda && $build_status -eq 0 && ${GPU_CHECK_TESTS:-0} == 1 ]]; then
    log "2c. the suite's GPU tests (${GPU_TESTS[*]}) -> pytest-gpu.log (background)"
    t3=$(date +%s)
    timeout "${CAPS[2]}" "$PYTHON" -m pytest "${GPU_TESTS[@]}" -q -p no:cacheprovider --benchmark-disable \
        > "$OUTDIR/pytest-gpu.log" 2>&1 &
    pytest_pid=$!
fi

# 2b. Correctness of the other GPU backends ('cuda', 'auto') as soon as the build is done, beside what remains
# of 2a (both only check values). Each gathers correctness.txt from every shard's lines when it ends: the last
# to end writes the whole file.
t0=$(date +%s)
log "2b. correctness of the other backends -> correctness/*.txt (beside 2a)"
timeout "${CAPS[2]}" "$PYTHON" -m msfused.bench.gpu_check correctness --device "$DEVICE" --out "$OUTDIR" \
    --skip-backends triton "${CORRECTNESS_ARGS[@]}" "${OTHER_ARGS[@]}"
record "2b. correctness (others)" $? $(( $(date +%s) - t0 ))
wait "$triton_pid"
record "2a. correctness (triton)" $? $(( $(date +%s) - t2 ))
if [[ -n ${prewarm_pid:-} ]]; then
    wait "$prewarm_pid"
    record "2a. Triton kernels of the workloads compiled" $? $(( $(date +%s) - t2 ))
fi
if [[ -n ${pytest_pid:-} ]]; then
    wait "$pytest_pid"
    pytest_status=$?
    record "2c. GPU tests ($(tail -n 1 "$OUTDIR/pytest-gpu.log"))" "$pytest_status" $(( $(date +%s) - t3 ))
fi

# 3. Speed.
t0=$(date +%s)
log "3. speed -> results.json, table.txt, profile.txt, host_profile.txt"
timeout "${CAPS[3]}" "$PYTHON" -m msfused.bench.gpu_check speed --device "$DEVICE" --out "$OUTDIR" "${SPEED_ARGS[@]}"
record "3. speed" $? $(( $(date +%s) - t0 ))

log "done in $(( $(date +%s) - START )) s; $OUTDIR/summary.txt:"
cat "$OUTDIR/summary.txt" >&2
! grep -qv "exit status 0," "$OUTDIR/summary.txt"
