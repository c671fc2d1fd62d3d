"""The fused kernels of a few workloads under Nsight Compute (ncu), for the next kernel work: memory
throughput against the device's peak, achieved occupancy, launch shape. Not a benchmark (ncu replays each
kernel with its caches flushed and its clocks locked); the GPU check's speed phase gives the timings.

    ncu --section SpeedOfLight --section Occupancy --section LaunchStats --csv \\
        python bench/ncu_kernels.py [psp_mmseg,psp_smp] [inference|train]

Runs each workload in bfloat16 at its full batch with backends 'cuda' then 'triton', one warm-up call each
outside the profiled range (torch.cuda.profiler start/stop: run ncu with --profile-from-start off).
"""

from __future__ import annotations

import sys

import torch

import msfused
from msfused.bench import runner
from msfused.bench.workloads import build, select


def main() -> None:
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else ["psp_mmseg"]
    mode = sys.argv[2] if len(sys.argv) > 2 else "inference"
    for w in select(names):
        built = build(w, w.n, torch.bfloat16, "cuda")
        runner.set_mode(built, mode)
        for backend in ("cuda", "triton"):
            step = runner.make_step(built, mode, backend)
            with step.active():
                step()  # compiles, autotunes, measures nothing under ncu's range
                torch.cuda.synchronize()
                torch.cuda.profiler.start()
                step()
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
        del built
    print("ncu_kernels: done", msfused.__version__)


if __name__ == "__main__":
    main()
