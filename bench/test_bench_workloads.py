"""pytest-benchmark over the workloads of WORKLOADS.md: workload x dtype x mode x implementation.

With benchmarking on, each case is warmed up (``torch.compile`` compiles in the first, untimed call),
timed by pytest-benchmark, and its device, dtype, versions, batch size, peak memory and floor go into
``benchmark.extra_info``. With ``--benchmark-disable`` each case runs exactly once at batch
:data:`DISABLED_N`, and ``compiled`` only in :data:`COMPILED_SMOKE_CASE` (compiling every case would
take minutes on a small CPU). No assertion on speed.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from msfused.bench import floor, runner, timing

# Importing Inductor (torch.compile) warns about torch internals; nothing msfused can act on.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

# Batch size when benchmarking is disabled: small, and >= 2 so that a training-mode BatchNorm at bin 1
# sees more than one value per channel.
DISABLED_N = 2
# The one (workload, mode) that runs torch.compile when benchmarking is disabled.
COMPILED_SMOKE_CASE = ("psp_small", "inference")


def _synchronized(step: runner.Step, device: torch.device) -> Callable[[], Any]:
    """``step`` followed by a device synchronisation, so that pytest-benchmark's wall clock sees the
    device's work (a no-op on a CPU)."""
    if device.type != "cuda":
        return step

    def call() -> Any:
        out = step()
        torch.cuda.synchronize(device)
        return out

    return call


def _first_call(fn: Callable[[], Any], impl: str) -> Any:
    """Calls ``fn``; a torch.compile failure of the baseline skips the case with one line saying what
    failed (torch's problem, not msfused's), anything else fails it."""
    if impl != "compiled":
        return fn()
    try:
        with runner.quiet_compiler_errors():
            return fn()
    except Exception as e:  # e.g. an Inductor codegen error
        pytest.skip(runner.error_text(e))


def test_workload(benchmark, case, device, environment, rates, built_workload) -> None:
    workload, dtype, mode, impl = case
    disabled = benchmark.disabled
    if disabled and impl == "compiled" and (workload.name, mode) != COMPILED_SMOKE_CASE:
        pytest.skip("compiled runs one smoke case when benchmarking is disabled (compiling takes seconds a case)")
    n = DISABLED_N if disabled else workload.default_n(device)
    built = built_workload(workload, n, dtype)
    runner.set_mode(built, mode)
    step = runner.make_step(built, mode, impl)
    fn = _synchronized(step, device)
    benchmark.group = f"{workload.name} {mode} {floor.dtype_name(dtype)}"

    peak = None
    with step.active():
        if disabled:
            _first_call(lambda: benchmark(fn), impl)  # benchmark() runs fn once, untimed
        else:
            _first_call(fn, impl)
            timing.warm_up(fn, device, runner.DEFAULT_TIMING.get(device.type, runner.DEFAULT_TIMING["cuda"])[0])
            peak = timing.peak_memory_bytes(step, device)
            benchmark(fn)

    work = floor.count_work(workload, n, mode, dtype)
    benchmark.extra_info.update(
        workload=workload.name,
        n=n,
        mode=mode,
        impl=impl,
        dtype=floor.dtype_name(dtype),
        device=environment["device"],
        device_name=environment["device_name"],
        torch=environment["torch"],
        triton=environment["triton"],
        msfused=environment["msfused"],
        threads=environment["threads"],
        peak_mem_bytes=peak,
        bytes=work.bytes,
        flops=work.flops,
        floor_ms=None if disabled else floor.floor_ms(work, rates(dtype)),
    )
