"""Timing a zero-argument callable on a CPU or a CUDA device, and the peak memory of one call.

CPU: ``time.perf_counter`` around each call. CUDA: a pair of CUDA events around each call on the current
stream, with the L2 cache flushed (a large buffer zeroed) before each one so that a small workload is not
timed out of a warm cache, and the device synchronised before each call: a call's events then span its
host-side work too (Python, launches) as a user's loop of that one implementation sees it. Without that
sync, interleaved implementations queue behind each other, and a host-bound call's launch time hid behind
the previous implementation's GPU work (the first H200 runs: Triton training steps timed at 0.9 ms whose
host side took 12 ms per call). Either way the figure is the
median over the repetitions, after warm-up calls that are not timed. Implementations that are compared
are timed interleaved (one call of each in turn), so that a change in the machine's load during the run
does not favour one of them.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from typing import Any, Callable, ContextManager, Iterator, List, Optional, Sequence, Union

import torch

# Flushing the L2 cache: larger than any current GPU's L2 (H100: 50 MiB, B200: 126 MiB).
_L2_FLUSH_BYTES = 256 * 2**20
_flush_buffers: dict = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _flush_buffers:
        _flush_buffers[key] = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    return _flush_buffers[key]


def synchronize(device: Union[str, torch.device]) -> None:
    """Waits for the device's queued work (a no-op on a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(fn: Callable[[], Any], device: Union[str, torch.device], calls: int) -> Optional[float]:
    """Calls ``fn`` ``calls`` times (at least once) untimed for the figures; returns the last call's wall
    time in seconds (device synchronised), which callers use to size the timed runs."""
    last = None
    for _ in range(max(1, calls)):
        start = time.perf_counter()
        fn()
        synchronize(device)
        last = time.perf_counter() - start
    return last


def repetitions(reps: int, max_seconds: Optional[float], seconds_per_round: Optional[float], min_reps: int = 5) -> int:
    """``reps``, cut so that the timed calls take about ``max_seconds`` when one round of them takes
    ``seconds_per_round``, but never below ``min_reps``: a slow case gets fewer repetitions rather than
    making the run long."""
    if max_seconds is not None and seconds_per_round:
        reps = min(reps, max(min_reps, int(max_seconds / seconds_per_round)))
    return max(1, reps)


def time_interleaved(
    fns: Sequence[Callable[[], Any]],
    device: Union[str, torch.device],
    reps: int,
    contexts: Optional[Sequence[Callable[[], ContextManager[Any]]]] = None,
) -> List[List[float]]:
    """Milliseconds of ``reps`` timed calls of each of ``fns`` (already warmed up), one call of each in
    turn, so that a change in the machine's load (another process taking a core) hits every function
    alike instead of the one that happened to run then. The turn starts one function later each round
    (:func:`round_order`): what ran just before a call (the caches and the allocator it leaves) is then the
    same mix for every function, not always its fixed predecessor. ``contexts[i]()`` is entered around
    each call of ``fns[i]``, outside the timed region. Garbage collection is paused while timing."""
    device = torch.device(device)
    contexts = contexts or [contextlib.nullcontext] * len(fns)
    times: List[List[float]] = [[] for _ in fns]
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if device.type == "cuda":
            _time_cuda(fns, contexts, device, reps, times)
        else:
            for r in range(reps):
                for i in round_order(len(fns), r):
                    with contexts[i]():
                        start = time.perf_counter()
                        fns[i]()
                        times[i].append((time.perf_counter() - start) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def round_order(count: int, round_index: int) -> List[int]:
    """The order of the functions in round ``round_index``: all of them, starting ``round_index`` places
    on (0, 1, 2; then 1, 2, 0; then 2, 0, 1; ...)."""
    start = round_index % count if count else 0
    return list(range(start, count)) + list(range(start))


def time_calls(fn: Callable[[], Any], device: Union[str, torch.device], reps: int) -> List[float]:
    """Milliseconds of each of ``reps`` timed calls of ``fn`` (already warmed up)."""
    return time_interleaved([fn], device, reps)[0]


def _time_cuda(fns, contexts, device: torch.device, reps: int, times: List[List[float]]) -> None:
    flush = _l2_flush_buffer(device)
    events = [
        [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for _ in fns
    ]
    with torch.cuda.device(device):
        synchronize(device)
        for r in range(reps):
            for i in round_order(len(fns), r):
                with contexts[i]():
                    flush.zero_()  # a cold L2 for every call
                    synchronize(device)  # from an idle device: the events span the call's host work too
                    start, end = events[i][r]
                    start.record()
                    fns[i]()
                    end.record()
        synchronize(device)
    for out, pairs in zip(times, events):
        out.extend(start.elapsed_time(end) for start, end in pairs)


def median_ms(fn: Callable[[], Any], device: Union[str, torch.device], warmup: int = 2, reps: int = 10) -> float:
    """Median milliseconds of ``fn`` after ``warmup`` untimed calls."""
    warm_up(fn, device, warmup)
    return statistics.median(time_calls(fn, device, reps))


def peak_memory_bytes(fn: Callable[[], Any], device: Union[str, torch.device]) -> Optional[int]:
    """Peak bytes of tensor memory one call of ``fn`` allocates above what was allocated before it
    (its output included).

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the allocation
    before the call. CPU: torch has no allocator statistics there, so the call runs once under
    ``torch.profiler`` with ``profile_memory=True`` and the peak is that of the running sum of its
    allocation and free events; None if the profiler cannot give it.
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    if device.type == "cpu":
        return _cpu_peak_bytes(fn)
    return None


def _cpu_peak_bytes(fn: Callable[[], Any]) -> Optional[int]:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = [
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
        ]
    except Exception:  # a profiler that cannot give memory events: no figure rather than a failed run
        return None
    current = peak = 0
    for _, nbytes in sorted(events):
        current += nbytes
        peak = max(peak, current)
    return int(peak)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Sends file descriptor 2 to /dev/null: the profiler's C++ side logs a line to it at every start and
    stop, which would break into the progress lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
