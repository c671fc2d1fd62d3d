"""Out-of-bounds accesses of Triton kernels, caught in Triton's interpreter.

On a GPU, a load or store whose lane is active (unmasked) and whose address lies outside every tensor the
kernel was given reads another allocation or faults ("an illegal memory access"), which ends the process's
CUDA context. Triton's interpreter performs the same access on the CPU's memory without a word: a wrong
address there reads whatever lies beside the tensor and, when the value is never used (a lane masked later,
a multiply by a zero weight), the results still come out right. So the suite's comparisons alone cannot
catch it.

``checking()`` wraps the interpreter's loads, stores and atomics (every memory access goes through them,
block pointers and tensor descriptors included): each active lane's bytes must lie inside the extent of one
tensor argument of the running launch (its view's first to last element, not the whole storage). A stray
access raises ``OutOfBounds``, naming the kernel, the program and the nearest argument with the offset in
elements.

Relies on the interpreter's module layout (``triton.runtime.interpreter``: ``InterpreterBuilder`` and
``GridExecutor``; written against Triton 3.6).
"""

from __future__ import annotations

import contextlib
import threading
from typing import List, Optional, Tuple

import numpy as np
import torch

try:
    from triton.runtime import interpreter as _interp
except ImportError:  # pragma: no cover - Triton missing: nothing to wrap
    _interp = None


class OutOfBounds(AssertionError):
    """A Triton kernel touched memory outside every tensor it was given."""


_state = threading.local()


def _extent(name: str, t: torch.Tensor) -> Optional[Tuple[int, int, str, int]]:
    """(first byte, one past the last byte, name, element size) of a tensor view; None when empty."""
    if t.numel() == 0:
        return None
    size = t.element_size()
    lo = t.data_ptr()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s > 0)
    first = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s < 0)
    return lo + first * size, lo + (last + 1) * size, name, size


def _arguments(fn, args, kwargs) -> List[Tuple[str, torch.Tensor]]:
    names = list(getattr(fn, "arg_names", [])) or [f"arg{i}" for i in range(len(args))]
    pairs = list(zip(names, args)) + list(kwargs.items())
    found = []
    for name, value in pairs:
        if isinstance(value, torch.Tensor):
            found.append((name, value))
        elif isinstance(value, tuple):
            found += [(f"{name}[{i}]", v) for i, v in enumerate(value) if isinstance(v, torch.Tensor)]
    return found


def _merged(ranges) -> Tuple[np.ndarray, np.ndarray]:
    """The union of the (first, end) byte ranges as sorted, disjoint, non-touching intervals (starts, ends)."""
    starts, ends = [], []
    for lo, hi in sorted((lo, hi) for lo, hi, _, _ in ranges):
        if starts and lo <= ends[-1]:
            ends[-1] = max(ends[-1], hi)
        else:
            starts.append(lo)
            ends.append(hi)
    return np.array(starts, dtype=np.uint64), np.array(ends, dtype=np.uint64)


def _check(ptrs, mask, what: str) -> None:
    ranges = getattr(_state, "ranges", None)
    if ranges is None:  # a launch not seen by the wrapper (should not happen): nothing to check against
        return
    addr = np.asarray(ptrs.data, dtype=np.uint64).reshape(-1)
    if mask is not None:
        addr = addr[np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data)).reshape(-1)]
    if addr.size == 0:
        return
    nbytes = np.uint64(max(1, ptrs.get_element_ty().primitive_bitwidth // 8))
    starts, ends = _state.merged
    # each access [a, a + nbytes) must lie in one interval of the union: the one starting at or before a
    first = addr.min()
    i = int(np.searchsorted(starts, first, side="right")) - 1
    if i >= 0 and addr.max() + nbytes <= ends[i]:  # (the usual case: every lane in one tensor)
        return
    j = np.searchsorted(starts, addr, side="right") - 1
    inside = (j >= 0) & (addr + nbytes <= ends[np.maximum(j, 0)])
    if inside.all():
        return
    bad = int(addr[~inside][0])
    where = []
    for lo, hi, name, size in ranges:
        offset = (bad - lo) // size if bad >= lo else -((lo - bad + size - 1) // size)
        span = (hi - lo) // size
        where.append((min(abs(bad - lo), abs(bad - hi)), f"{name}: element {offset} of an extent of {span}"))
    nearest = min(where)[1] if where else "no tensor arguments"
    raise OutOfBounds(f"{_state.kernel}: program {tuple(_interp.interpreter_builder.grid_idx)} {what} "
                      f"{int((~inside).sum())} active lane(s) outside every tensor argument; the first at "
                      f"{nearest}")


@contextlib.contextmanager
def checking():
    """Within this context, every interpreted Triton launch checks its memory accesses (see the module)."""
    if _interp is None:
        yield
        return
    builder, executor = _interp.InterpreterBuilder, _interp.GridExecutor
    saved = {name: getattr(builder, name) for name in
             ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")}
    saved_call = executor.__call__

    def masked_load(self, ptrs, mask, other, *rest):
        _check(ptrs, mask, "loads from")
        return saved["create_masked_load"](self, ptrs, mask, other, *rest)

    def masked_store(self, ptrs, value, mask, *rest):
        _check(ptrs, mask, "stores to")
        return saved["create_masked_store"](self, ptrs, value, mask, *rest)

    def atomic_rmw(self, op, ptr, val, mask, *rest):
        _check(ptr, mask, "updates (atomic)")
        return saved["create_atomic_rmw"](self, op, ptr, val, mask, *rest)

    def atomic_cas(self, ptr, cmp, val, *rest):
        _check(ptr, None, "updates (atomic)")
        return saved["create_atomic_cas"](self, ptr, cmp, val, *rest)

    def call(self, *args, **kwargs):
        outer = tuple(getattr(_state, k, None) for k in ("ranges", "merged", "kernel"))
        tensors = _arguments(self, args, kwargs)
        _state.ranges = [e for e in (_extent(n, t) for n, t in tensors) if e is not None]
        _state.merged = _merged(_state.ranges)
        _state.kernel = getattr(self.fn, "__name__", "kernel")
        try:
            return saved_call(self, *args, **kwargs)
        finally:
            _state.ranges, _state.merged, _state.kernel = outer

    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    builder.create_atomic_rmw, builder.create_atomic_cas = atomic_rmw, atomic_cas
    executor.__call__ = call
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(builder, name, fn)
        executor.__call__ = saved_call
