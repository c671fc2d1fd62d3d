"""The pytest-benchmark suite's settings and shared fixtures; the workloads, runner and floor come from
:mod:`msfused.bench` (one copy of each).

    pytest --benchmark                             time every case (pytest-benchmark's own options apply)
    pytest --benchmark -k psp_small                one workload
    pytest bench --benchmark-disable               each case runs once, at a small N (the normal test run)

Environment variables choose what is parametrised:

    MSFUSED_BENCH_DEVICE   cpu or cuda (default: cuda if available, else cpu)
    MSFUSED_BENCH_DTYPES   comma-separated (default: float32 on a CPU, bfloat16,float32 on a GPU)
    MSFUSED_BENCH_IMPLS    comma-separated (default: naive, compiled and every fused backend available)
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Tuple

import pytest
import torch

from msfused.bench import floor, runner, workloads

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def bench_device() -> torch.device:
    return torch.device(os.environ.get("MSFUSED_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def bench_dtypes(device: torch.device) -> List[torch.dtype]:
    names = os.environ.get("MSFUSED_BENCH_DTYPES")
    if names:
        return [_DTYPES[name.strip()] for name in names.split(",") if name.strip()]
    return [torch.float32] if device.type == "cpu" else [torch.bfloat16, torch.float32]


def bench_impls(device: torch.device) -> List[str]:
    names = os.environ.get("MSFUSED_BENCH_IMPLS")
    if names:
        impls = [name.strip() for name in names.split(",") if name.strip()]
        runner.check_impls(impls)
        return impls
    return runner.default_impls(device, compile=True)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrises ``case`` over workload x dtype x mode x impl, in the runner's order (so that one
    built workload serves all its cases in a row)."""
    if "case" in metafunc.fixturenames:
        device = bench_device()
        cases = runner.iter_cases(
            workloads.WORKLOADS.values(), runner.MODES, bench_dtypes(device), bench_impls(device)
        )
        ids = [f"{w.name}-{floor.dtype_name(d)}-{m}-{i}" for w, d, m, i in cases]
        metafunc.parametrize("case", cases, ids=ids)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def environment(device: torch.device) -> dict:
    """Device name and versions, for ``benchmark.extra_info``."""
    return runner.environment(device)


@pytest.fixture(scope="session")
def rates(device: torch.device) -> Callable[[torch.dtype], floor.Rates]:
    """The device's read, write and matmul rates per dtype, measured on first use only (a suite run with
    benchmarking disabled never asks)."""
    measured: Dict[torch.dtype, floor.Rates] = {}

    def get(dtype: torch.dtype) -> floor.Rates:
        if dtype not in measured:
            measured[dtype] = floor.measure_rates(device, dtype, memory_from=next(iter(measured.values()), None))
        return measured[dtype]

    return get


@pytest.fixture(scope="session")
def built_workload(device: torch.device) -> Callable[..., workloads.Built]:
    """``get(workload, n, dtype)``: the naive and fused modules and input, kept for the consecutive cases
    that share them (one at a time, so that memory stays that of one workload)."""
    cache: Dict[Tuple[str, int, torch.dtype], workloads.Built] = {}

    def get(workload: workloads.Workload, n: int, dtype: torch.dtype) -> workloads.Built:
        key = (workload.name, n, dtype)
        if key not in cache:
            cache.clear()  # free the previous workload before building the next
            cache[key] = workloads.build(workload, n, dtype, device)
        return cache[key]

    return get
