"""Runs the benchmark matrix: workload x mode x dtype x implementation, one result dict per case.

Implementations (``impl``):

* ``naive``: the naive twin in eager PyTorch (the baseline).
* ``compiled``: ``torch.compile`` of that same naive module (default options); compilation happens in
  the first, untimed call and is reported as ``compile_s``.
* any msfused backend name (``cpu``, ``cuda``, ``triton``, also ``auto`` and ``reference``): the fused
  module under ``msfused.use_backend(name)``. By default, every fused backend that
  ``msfused.availability`` reports usable for the device: ``cpu`` on a CPU; ``cuda`` and ``triton`` on
  a GPU.

Modes: ``inference`` (norms in eval mode, under ``torch.inference_mode()``) and ``train`` (norms in train
mode; forward plus backward with a fixed random upstream gradient; ``x`` and every parameter get a
gradient through ``torch.autograd.grad``, so nothing accumulates between calls).

The implementations of one (workload, mode, dtype) are warmed up one after the other, then timed
interleaved (one call of each in turn): a change in the machine's load hits them alike. A case that
raises (an implementation that refuses a dtype, a compiler error, ...) gives a row with ``error`` set
instead of stopping the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.metadata
import logging
import os
import platform
import statistics
import time
import traceback
from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import torch

import msfused

from . import floor as floor_mod
from . import timing
from .workloads import Built, Workload, build

MODES = ("inference", "train")
BASELINES = ("naive", "compiled")
# The msfused backends that run on each device type, in the order they are reported.
_DEVICE_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}

# Default repetitions per device type: (warm-up calls, timed calls, seconds one case's timed calls may
# take). A slow case gets fewer timed calls (at least timing.repetitions' min_reps) rather than a long run.
DEFAULT_TIMING = {"cpu": (2, 20, 3.0), "cuda": (10, 100, 10.0)}


def fused_impls(device: Union[str, torch.device]) -> List[str]:
    """The msfused backends usable for ``device`` on this machine (``msfused.availability``)."""
    return [name for name, why in fused_backends(device).items() if not why]


def default_impls(device: Union[str, torch.device], compile: Optional[bool] = None) -> List[str]:
    """``naive``, ``compiled`` (by default only off a CPU: compiling every case there takes minutes) and
    every usable fused backend."""
    if compile is None:
        compile = torch.device(device).type != "cpu"
    return ["naive"] + (["compiled"] if compile else []) + fused_impls(device)


def check_impls(impls: Sequence[str]) -> None:
    """Raises ``ValueError`` for a name that is neither a baseline nor an msfused backend."""
    known = BASELINES + tuple(msfused.BACKENDS)
    unknown = [i for i in impls if i not in known]
    if unknown:
        raise ValueError(f"unknown implementation(s) {', '.join(unknown)}; known: {', '.join(known)}")


def versions() -> Dict[str, Optional[str]]:
    """torch, triton (None if not installed) and msfused versions."""
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    return {"torch": torch.__version__, "triton": triton, "msfused": msfused.__version__}


def device_name(device: Union[str, torch.device]) -> str:
    """A human name for the device: the GPU's name, or the CPU's model and the threads torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"{model} ({threads} thread{'s' if threads != 1 else ''})"


def environment(device: Union[str, torch.device]) -> Dict[str, Any]:
    """What a result depends on besides the code: device, versions, threads, load."""
    device = torch.device(device)
    return {
        "device": str(device),
        "device_name": device_name(device),
        **versions(),
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg": _loadavg(),
    }


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _cpu_usage() -> Optional[tuple]:
    """(wall seconds, CPU seconds every process used, CPU seconds this process used), or None where
    /proc/stat cannot be read (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: all but idle and iowait is a busy CPU (steal:
    # another virtual machine had it).
    busy = sum(fields[:3]) + sum(fields[5:8])
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()


def _other_cpu_load(before: Optional[tuple], after: Optional[tuple]) -> Optional[float]:
    """How many CPUs other processes kept busy on average between two :func:`_cpu_usage` readings."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    others = (after[1] - before[1]) - (after[2] - before[2])
    return round(max(0.0, others) / (after[0] - before[0]), 2)


def is_fused(impl: str) -> bool:
    """Whether ``impl`` runs msfused's fused kernels (not a baseline, not the reference composition)."""
    return impl not in BASELINES and impl != "reference"


def fused_backends(device: Union[str, torch.device]) -> Dict[str, str]:
    """Each fused backend for ``device``'s type: '' when usable here, else why not."""
    device_type = torch.device(device).type
    return {name: msfused.availability(name)[1] for name in _DEVICE_BACKENDS.get(device_type, ())}


@dataclasses.dataclass
class Step:
    """One call to time: ``fn()`` runs the forward (inference) or forward plus backward (train) of one
    implementation and returns the output. Call it inside ``active()``, which selects the msfused backend
    for fused implementations (the timing loops enter it outside the timed region)."""

    fn: Callable[[], torch.Tensor]
    backend: Optional[str] = None

    def __call__(self) -> torch.Tensor:
        return self.fn()

    def active(self) -> ContextManager[None]:
        return msfused.use_backend(self.backend) if self.backend else contextlib.nullcontext()


def set_mode(built: Built, mode: str) -> None:
    """Norms in eval mode for ``inference``, in train mode for ``train`` (both modules)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    built.naive.train(mode == "train")
    built.fused.train(mode == "train")


def upstream_gradient(built: Built, seed: int = 1) -> torch.Tensor:
    """A fixed random gradient of the block's output, for training steps."""
    N, _, H, W = built.x.shape
    shape = (N, built.naive.out_channels, H, W)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return grad.to(device=built.x.device, dtype=built.x.dtype)


def make_step(built: Built, mode: str, impl: str, grad_out: Optional[torch.Tensor] = None,
              compile_backend: str = "inductor") -> Step:
    """The callable to time for ``impl`` in ``mode`` (call :func:`set_mode` first). ``compiled`` resets
    torch._dynamo and wraps the naive module in ``torch.compile`` (``compile_backend``): the first call
    compiles."""
    check_impls([impl])
    if impl == "naive":
        module, backend = built.naive, None
    elif impl == "compiled":
        torch._dynamo.reset()  # a fresh cache per case: no recompilation limits, no automatic dynamic shapes
        module, backend = torch.compile(built.naive, backend=compile_backend), None
    else:
        module, backend = built.fused, impl

    if mode == "inference":
        x = built.x

        def step() -> torch.Tensor:
            with torch.inference_mode():
                return module(x)

        return Step(step, backend)

    x = built.x.detach().requires_grad_(True)
    inputs = [x, *(built.fused if module is built.fused else built.naive).parameters()]
    if grad_out is None:
        grad_out = upstream_gradient(built)

    def train_step() -> torch.Tensor:
        out = module(x)
        torch.autograd.grad(out, inputs, grad_out)
        return out.detach()

    return Step(train_step, backend)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """SPEC.md's norm-wise error of ``out`` against ``ref``, in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return float(torch.linalg.vector_norm(out - ref) / max(float(torch.linalg.vector_norm(ref)), 1e-30))


def error_text(e: BaseException) -> str:
    """One line saying what went wrong in a case. A torch.compile failure names the phase (compiling the
    forward or the backward graph), the compiler's own error and where it was raised: Inductor's messages
    are often empty ("AssertionError: ") and its tracebacks pages long."""
    if isinstance(e, getattr(torch._dynamo.exc, "BackendCompilerFailed", ())):
        return _compile_error_text(e)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _compile_error_text(e: BaseException) -> str:
    inner = getattr(e, "inner_exception", None) or e.__cause__ or e.__context__ or e
    outer_frames = traceback.extract_tb(e.__traceback__)
    inner_frames = traceback.extract_tb(inner.__traceback__) if inner is not e else []
    backward = any(f.name in ("bw_compiler", "compile_fx_backward", "_backward_impl")
                   for f in outer_frames + inner_frames)
    message = str(inner).strip().splitlines()
    where = ""
    marker = f"{os.sep}torch{os.sep}"
    torch_frames = [f for f in (inner_frames or outer_frames) if marker in f.filename]
    if torch_frames:  # where the compiler raised: the innermost frame inside torch
        f = torch_frames[-1]
        path = f.filename[f.filename.rindex(marker) + 1:]
        where = f" at {path}:{f.lineno} ({f.name}" + (f": {f.line.strip()}" if f.line else "") + ")"
    phase = "backward" if backward else "forward"
    return (f"torch.compile fails (a torch error): Inductor cannot compile the naive block's {phase} graph: "
            f"{type(inner).__name__}{': ' + message[0] if message else ''}{where}")[:400]


@contextlib.contextmanager
def quiet_compiler_errors() -> Iterator[None]:
    """Keeps Inductor from logging a failed compilation itself (a line of a few thousand characters on
    stderr, between the progress lines): the failure still raises, and :func:`error_text` reports it."""
    logger = logging.getLogger("torch._inductor")
    previous = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _row(workload: Workload, n: int, mode: str, dtype: torch.dtype, impl: str, env: dict) -> Dict[str, Any]:
    return {
        "workload": workload.name,
        "n": n,
        "n_full": workload.n,
        "mode": mode,
        "dtype": floor_mod.dtype_name(dtype),
        "impl": impl,
        "device": env["device"],
        "device_name": env["device_name"],
        "median_ms": None,
        "min_ms": None,
        "reps": 0,
        "peak_mem_bytes": None,
        "speedup_vs_naive": None,
        "speedup_vs_compiled": None,
        "floor_ms": None,
        "time_over_floor": None,
        "gbps": None,
        "tflops": None,
        "bytes": None,
        "read_bytes": None,
        "write_bytes": None,
        "flops": None,
        "err_vs_naive": None,
        "compile_s": None,
        "error": None,
        "torch": env["torch"],
        "triton": env["triton"],
        "msfused": env["msfused"],
        "threads": env["threads"],
    }


def _measure_group(
    steps: Dict[str, Step],
    rows: Dict[str, Dict[str, Any]],
    device: torch.device,
    warmup: int,
    reps: int,
    max_seconds: Optional[float],
    memory: bool,
) -> None:
    """Measures the steps of one (workload, mode, dtype) into their rows.

    Each step (naive first: the others' outputs are compared with its) gets ``warmup`` untimed calls, at
    least one; the first also compiles, for ``compiled``, and its time is ``compile_s``. Then the steps
    that ran are timed interleaved, ``reps`` rounds cut to about ``max_seconds`` per step, and each is
    called once more for its peak memory. A step that raises gets ``error`` in its row and leaves the rest.
    """
    reference: Optional[torch.Tensor] = None
    seconds_per_call: Dict[str, float] = {}
    for impl in sorted(steps, key=lambda i: i != "naive"):
        step, row = steps[impl], rows[impl]
        try:
            with step.active(), quiet_compiler_errors() if impl == "compiled" else contextlib.nullcontext():
                start = time.perf_counter()
                out = step()
                timing.synchronize(device)
                first_s = time.perf_counter() - start
                seconds_per_call[impl] = timing.warm_up(step, device, warmup - 1) if warmup > 1 else first_s
        except Exception as e:
            row["error"] = error_text(e)
            continue
        if impl == "compiled":
            row["compile_s"] = first_s
        if impl == "naive":
            reference = out
        if reference is not None:
            row["err_vs_naive"] = relative_error(out, reference)
        del out
    del reference

    ready = [impl for impl in steps if impl in seconds_per_call]
    if not ready:
        return
    budget = None if max_seconds is None else max_seconds * len(ready)
    rounds = timing.repetitions(reps, budget, sum(seconds_per_call.values()))
    try:
        times = timing.time_interleaved(
            [steps[i] for i in ready], device, rounds, contexts=[steps[i].active for i in ready]
        )
    except Exception as e:  # rare: a step that ran in warm-up and fails later
        for impl in ready:
            rows[impl]["error"] = error_text(e)
        return
    for impl, ms in zip(ready, times):
        row = rows[impl]
        row["median_ms"], row["min_ms"], row["reps"] = statistics.median(ms), min(ms), len(ms)
        if memory:
            with steps[impl].active():
                row["peak_mem_bytes"] = timing.peak_memory_bytes(steps[impl], device)


def _fill_derived(row: Dict[str, Any], work: floor_mod.Work, rates: Optional[floor_mod.Rates]) -> None:
    ms = row["median_ms"]
    row["bytes"], row["flops"] = work.bytes, work.flops
    row["read_bytes"], row["write_bytes"] = work.read_bytes, work.write_bytes
    if rates is not None:
        row["floor_ms"] = floor_mod.floor_ms(work, rates)
    if ms:
        row["gbps"] = work.bytes / (ms * 1e-3) / 1e9
        row["tflops"] = work.flops / (ms * 1e-3) / 1e12
        if row["floor_ms"]:
            row["time_over_floor"] = ms / row["floor_ms"]


def _fill_speedups(rows: List[Dict[str, Any]]) -> None:
    """speedup_vs_naive / _vs_compiled = baseline time / this time, within one (workload, mode, dtype)."""
    baseline = {r["impl"]: r["median_ms"] for r in rows if r["impl"] in BASELINES and r["median_ms"]}
    for r in rows:
        if r["median_ms"]:
            if "naive" in baseline:
                r["speedup_vs_naive"] = baseline["naive"] / r["median_ms"]
            if "compiled" in baseline:
                r["speedup_vs_compiled"] = baseline["compiled"] / r["median_ms"]


def run(
    workloads: Sequence[Workload],
    modes: Sequence[str] = MODES,
    dtypes: Sequence[torch.dtype] = (torch.float32,),
    impls: Optional[Sequence[str]] = None,
    device: Union[str, torch.device] = "cpu",
    n: Union[None, int, Mapping[str, int]] = None,
    full_n: bool = False,
    warmup: Optional[int] = None,
    reps: Optional[int] = None,
    max_seconds: Optional[float] = None,
    memory: bool = True,
    progress: Optional[Callable[[str], None]] = None,
    rates: Optional[Dict[torch.dtype, floor_mod.Rates]] = None,
    compile_backend: str = "inductor",
) -> Dict[str, Any]:
    """Runs every case and returns ``{"environment": ..., "rates": [...], "rows": [...]}`` (plain dicts).

    Batch size: ``n`` if given (one for every workload, or {workload name: N}, the others as if not given),
    else the workload's full ``n`` with ``full_n``, else its default for the device (``cpu_n`` on a CPU). ``warmup`` / ``reps`` / ``max_seconds`` default per device type
    (:data:`DEFAULT_TIMING`). ``progress`` gets a line of text before and after each group of cases
    (one workload, mode and dtype: the implementations compared are measured together). ``rates``: the
    floor's rates per dtype from an earlier run on the same device (measured here when missing);
    ``compile_backend``: the ``torch.compile`` backend of ``compiled``.
    """
    device = torch.device(device)
    impls = list(impls) if impls is not None else default_impls(device)
    check_impls(impls)
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    default_warmup, default_reps, default_seconds = DEFAULT_TIMING.get(device.type, DEFAULT_TIMING["cuda"])
    warmup = default_warmup if warmup is None else warmup
    reps = default_reps if reps is None else reps
    max_seconds = default_seconds if max_seconds is None else max_seconds
    say = progress or (lambda message: None)

    env = environment(device)
    env["fused_backends"] = fused_backends(device)
    usage_before = _cpu_usage()
    rates = dict(rates or {})
    if any(dtype not in rates for dtype in dtypes):
        say("measuring the device's read, write and matmul rates for the floor")
        for dtype in dtypes:
            if dtype not in rates:
                rates[dtype] = floor_mod.measure_rates(device, dtype, memory_from=next(iter(rates.values()), None))

    groups = len(workloads) * len(modes) * len(dtypes)
    index = 0
    rows: List[Dict[str, Any]] = []
    for workload in workloads:
        given = n.get(workload.name) if isinstance(n, Mapping) else n
        batch = given if given is not None else (workload.n if full_n else workload.default_n(device))
        for dtype in dtypes:
            try:
                built: Optional[Built] = build(workload, batch, dtype, device)
                build_error = None
            except Exception as e:  # e.g. out of memory: every case of this workload and dtype says so
                built, build_error = None, error_text(e)
            for mode in modes:
                index += 1
                label = f"[{index}/{groups}] {workload.name} N={batch} {mode} {floor_mod.dtype_name(dtype)}"
                say(f"{label}: {', '.join(impls)} ...")
                group = {impl: _row(workload, batch, mode, dtype, impl, env) for impl in impls}
                if built is None:
                    for row in group.values():
                        row["error"] = build_error
                else:
                    _run_group(built, mode, group, device, warmup, reps, max_seconds, memory, compile_backend)
                work = floor_mod.count_work(workload, batch, mode, dtype)
                for row in group.values():
                    _fill_derived(row, work, rates[dtype])
                _fill_speedups(list(group.values()))
                rows.extend(group.values())
                say(f"{label}: {_summary(group.values())}")
            del built
            _release_memory(device)
    if "compiled" in impls:
        torch._dynamo.reset()
    env["loadavg_after"] = _loadavg()
    env["other_cpu_load"] = _other_cpu_load(usage_before, _cpu_usage())
    return {"environment": env, "rates": [dataclasses.asdict(rates[d]) for d in dtypes], "rows": rows}


def _run_group(
    built: Built,
    mode: str,
    rows: Dict[str, Dict[str, Any]],
    device: torch.device,
    warmup: int,
    reps: int,
    max_seconds: Optional[float],
    memory: bool,
    compile_backend: str = "inductor",
) -> None:
    """Every implementation in ``rows`` (impl -> row) on ``built`` in ``mode``, measured into the rows."""
    try:
        set_mode(built, mode)
        grad_out = upstream_gradient(built) if mode == "train" else None
    except Exception as e:
        for row in rows.values():
            row["error"] = error_text(e)
        return
    steps: Dict[str, Step] = {}
    for impl, row in rows.items():
        try:
            steps[impl] = make_step(built, mode, impl, grad_out, compile_backend)
        except Exception as e:
            row["error"] = error_text(e)
    _measure_group(steps, rows, device, warmup, reps, max_seconds, memory)


def _summary(rows: Iterable[Dict[str, Any]]) -> str:
    """One group's results in a few words: each implementation's time and speedup over naive."""
    parts = []
    for r in rows:
        if r["error"]:
            parts.append(f"{r['impl']} error")
        else:
            speedup = f" ({r['speedup_vs_naive']:.2f}x)" if r["impl"] != "naive" and r["speedup_vs_naive"] else ""
            parts.append(f"{r['impl']} {r['median_ms']:.3g} ms{speedup}")
    return ", ".join(parts)


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def iter_cases(
    workloads: Iterable[Workload], modes: Iterable[str], dtypes: Iterable[torch.dtype], impls: Iterable[str]
) -> List[tuple]:
    """Every (workload, dtype, mode, impl), in the order :func:`run` measures them (the pytest suite
    parametrises over this)."""
    impls = list(impls)
    modes = list(modes)
    dtypes = list(dtypes)
    return [(w, d, m, i) for w in workloads for d in dtypes for m in modes for i in impls]
