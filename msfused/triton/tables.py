"""Per-axis tap tables for every resize of the block, taken from ATen itself.

A 2-D resize of SPEC.md (avg pooling by a factor, adaptive average pooling, bilinear, nearest) is
separable: ``out[dy, dx] = sum w_y(dy, iy) * w_x(dx, ix) * in[iy, ix]``. The Triton kernels read the taps
``(index, weight)`` of each destination row and column from small tables instead of re-deriving
ATen's index formulas in a third place (the C++ kernels share theirs in ``csrc/resize.h``): the tables
are obtained by running the reference operator on one-hot rows, so the indices and weights are ATen's
own, in ATen's arithmetic (float32 weights for float32 and half inputs, float64 for float64).

Each table lists every source ATen *reads* for a destination, zero weights included (bilinear reads
both neighbours even where one weight is 0, so an Inf or NaN there propagates as in the reference);
padding entries have index -1. The adjoint table lists, for each source index, the destinations that
read it: the gather form of the resize's backward (no atomics).
"""

from __future__ import annotations

import bisect
import dataclasses
import threading
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes


@dataclasses.dataclass(frozen=True)
class AxisTaps:
    """Forward taps ``idx/w`` of shape (out, taps), adjoint taps ``adj_idx/adj_w`` of shape (in, adj_taps), and
    ``first`` (in + 1,): first[l] is the first destination whose first tap is source l or later (a tile of
    sources [l0, l1) is the first tap of destinations [first[l0], first[l1])). ``count`` (out,) and
    ``adj_count`` (in,): each row's number of entries; ``run`` / ``adj_run``: every row's indices are
    consecutive (``idx[d, 0] + j``, j < count[d]: a gather over them reads a run); ``typical`` /
    ``adj_typical``: the median entry count (kernels size their tap vectors by it)."""

    idx: torch.Tensor
    w: torch.Tensor
    adj_idx: torch.Tensor
    adj_w: torch.Tensor
    first: torch.Tensor
    count: torch.Tensor
    adj_count: torch.Tensor
    run: bool
    adj_run: bool
    typical: int
    adj_typical: int

    @property
    def taps(self) -> int:
        return self.idx.shape[1]

    @property
    def adj_taps(self) -> int:
        return self.adj_idx.shape[1]


def _resize_1d(v: torch.Tensor, kind: str, out: int, factor: int, align_corners: bool) -> torch.Tensor:
    """Resize the rows (dim 2) of ``v`` (1, C, in, 1) to ``out`` rows the way the reference does."""
    if kind == "identity":
        return v
    if kind == "avg":
        return F.avg_pool2d(v, kernel_size=(factor, 1), stride=(factor, 1))
    if kind == "adaptive":
        return F.adaptive_avg_pool2d(v, (out, 1))
    if kind == "bilinear":
        return F.interpolate(v, size=(out, 1), mode="bilinear", align_corners=align_corners)
    if kind == "nearest":
        return F.interpolate(v, size=(out, 1), mode="nearest")
    if kind == "stacked":  # the sum of ``factor`` stacked blocks of ``out`` rows, the last rows of v
        rows = v[:, :, v.shape[2] - factor * out:]
        return rows.reshape(v.shape[0], v.shape[1], factor, out, v.shape[3]).sum(2)
    raise ValueError(f"unknown resize kind {kind!r}")


def _pack(rows) -> Tuple[torch.Tensor, torch.Tensor, list]:
    width = max(1, max(len(r) for r in rows))
    idx = [[i for i, _ in r] + [-1] * (width - len(r)) for r in rows]
    w = [[x for _, x in r] + [0.0] * (width - len(r)) for r in rows]
    return idx, w, width


def _build(kind: str, n_in: int, n_out: int, factor: int, align_corners: bool, dtype: torch.dtype):
    eye = torch.eye(n_in, dtype=dtype).reshape(1, n_in, n_in, 1)
    weights = _resize_1d(eye, kind, n_out, factor, align_corners)[0, :, :, 0].t()  # (out, in)
    poison = torch.where(eye > 0, torch.tensor(float("nan"), dtype=dtype), eye)
    reads = torch.isnan(_resize_1d(poison, kind, n_out, factor, align_corners)[0, :, :, 0].t())
    assert weights.shape == (n_out, n_in), (kind, n_in, n_out, weights.shape)
    w, r = weights.tolist(), reads.tolist()
    fwd = [[(i, w[d][i]) for i in range(n_in) if r[d][i]] for d in range(n_out)]
    adj = [[(d, w[d][i]) for d in range(n_out) if r[d][i]] for i in range(n_in)]
    first_taps = [row[0][0] if row else n_in for row in fwd]  # ascending: resizes keep the order
    first = [bisect.bisect_left(first_taps, src) for src in range(n_in + 1)]
    return _pack(fwd), _pack(adj), first, (_shape(fwd), _shape(adj))


def _shape(rows) -> Tuple[list, bool, int]:
    """(entry count per row, whether every row's indices are consecutive, the median count) of a tap list."""
    counts = [len(row) for row in rows]
    run = all([i for i, _ in row] == list(range(row[0][0], row[0][0] + len(row))) for row in rows if row)
    return counts, run, sorted(counts)[len(counts) // 2] if counts else 0


def _tracing() -> bool:
    """Whether a fake mode is active (torch.compile / export tracing): torch._guards.detect_fake_mode's
    answer without its walk over inputs (it runs for every table a launcher asks for, dozens a call)."""
    context = torch._guards.TracingContext.try_get()
    if context is not None and context.fake_mode is not None:
        return True
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


_cache: Dict[tuple, tuple] = {}
_lock = threading.Lock()


def _lists(kind: str, n_in: int, n_out: int, factor: int, align_corners: bool, wdtype: torch.dtype):
    """(cache key, the table's lists as ``_build`` gives them), built once per key."""
    key = (kind, n_in, n_out, factor, bool(align_corners) if kind == "bilinear" else False, wdtype)
    with _lock:
        lists = _cache.get(key)
    if lists is None:
        with _disable_current_modes(), torch.no_grad():
            lists = _build(kind, n_in, n_out, factor, align_corners, wdtype)
        with _lock:
            _cache[key] = lists
    return key, lists


def _on_device(key: tuple, make):
    """``make()``'s device tensors, cached under ``key`` unless a fake mode traces (torch.compile / export: the
    tables are then built from real tensors each time and enter the graph as constants)."""
    tracing = _tracing()
    if not tracing:
        with _lock:
            hit = _cache.get(key)
        if hit is not None:
            return hit
    value = make()
    if not tracing:
        with _lock:
            _cache[key] = value
    return value


def axis_taps(kind: str, n_in: int, n_out: int, factor: int, align_corners: bool, dtype: torch.dtype,
              device: torch.device) -> AxisTaps:
    """The taps of one axis of a resize from ``n_in`` to ``n_out`` (``kind`` in 'identity', 'avg', 'adaptive',
    'bilinear', 'nearest', 'stacked': see ``stacked_taps``), weights in ``dtype``, on ``device``. Cached; safe to
    call while torch.compile traces (the tables are built from real tensors and enter the graph as constants)."""
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    key, lists = _lists(kind, n_in, n_out, factor, align_corners, wdtype)

    def make():
        (idx, w, _), (adj_idx, adj_w, _), first, ((count, run, typical), (adj_count, adj_run, adj_typical)) = lists
        tensor = lambda v, dt: torch.tensor(v, dtype=dt, device=device)  # noqa: E731
        return AxisTaps(tensor(idx, torch.int32), tensor(w, wdtype), tensor(adj_idx, torch.int32),
                        tensor(adj_w, wdtype), tensor(first, torch.int32), tensor(count, torch.int32),
                        tensor(adj_count, torch.int32), run, adj_run, typical, adj_typical)

    return _on_device(key + (str(device),), make)


def stacked_taps(n_out: int, count: int, offset: int, dtype: torch.dtype, device: torch.device) -> AxisTaps:
    """The taps that sum ``count`` partial results stacked along an axis from ``offset``: destination ``o``
    reads ``offset + k * n_out + o`` for k = 0 .. count - 1, in that order, with weight 1 (a chunked
    reduction's fixed-order combine)."""
    return axis_taps("stacked", offset + count * n_out, n_out, count, False, dtype, device)


def pool_cells(H: int, W: int, levels: Tuple[Tuple[int, int], ...], block_l: int, device: torch.device) -> torch.Tensor:
    """The pooling windows of every cell of ``levels`` (bin levels (h, w) of an H x W map, adaptive average
    pooling, each level's cells row-major, the levels one after another): int32 rows y0, y1, x0, x1 of
    ``block_l`` entries each (a window is [y0, y1) x [x0, x1); padding entries are empty), from the tap tables
    of ATen's own pooling (each window is the run of sources its taps read). Cached as ``axis_taps``."""

    def make():
        rows = [[0] * block_l for _ in range(4)]
        cell = 0
        for h, w in levels:
            (ys, _, _), *_ = _lists("adaptive", H, h, 0, False, torch.float32)[1]
            (xs, _, _), *_ = _lists("adaptive", W, w, 0, False, torch.float32)[1]
            spans = [[(min(i for i in r if i >= 0), max(r) + 1) for r in taps] for taps in (ys, xs)]
            for y0, y1 in spans[0]:
                for x0, x1 in spans[1]:
                    rows[0][cell], rows[1][cell], rows[2][cell], rows[3][cell] = y0, y1, x0, x1
                    cell += 1
        assert cell <= block_l, (levels, block_l)
        return torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1)

    return _on_device(("cells", H, W, tuple(levels), block_l, str(device)), make)
