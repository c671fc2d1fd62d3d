"""Launchers: the operator's arguments turned into Triton launches (kernels in ``kernels.py``).

Launches per call (none for an empty input), for blocks of up to four branches (each further four
branches repeat the per-chunk launches):

inference (``inference``: no gradient needed, norms folded into scale/shift or absent):
    factor pyramids: 1 -- block_kernel: the copy of x and, per branch and level tile, the level computed
        from x inside the convolution's operand load, the convolution, bias, norm, activation and the
        up-resize, stored into the branch's slice.
    with bins: 2 -- pool_kernel pools x to every bin level from one read and copies x; then block_kernel.
forward (``forward``: the training forward, which also returns level, pre and the batch statistics):
    3 -- pool_kernel / levels_kernel (x copied, every level other than x itself: bin levels pooled from one
    read, factor levels gathered), convs_kernel (every convolution, its
    output stored; the epilogue straight into the output slice where the level is the input's size and
    no batch statistics are needed; per-tile statistics where they are), ups_kernel (the up-resize into the
    remaining slices); a launch with nothing to do is skipped. With batch statistics, one more ups_kernel
    launch before the last applies the norm and the activation at the levels, and each such branch adds a
    parameter-sized combine of its per-tile statistics.
backward, per 4 branches: 1 launch of every up-resize adjoint fused with the activation's backward and,
    without batch statistics, the norm's (it writes the conv-output gradient); 1 of the fixed-order
    column sums of their per-tile partials; with batch statistics 1 of the conv-output gradients; then
    per branch 1 weight gradient (if asked) and 1 level gradient (if dx is asked); 1 of the column sums of
    the weight gradients' pixel-range partials (where a long reduction was split to fill the GPU); a few
    parameter-sized ops. Then 1 launch writes dx (the x slice of the output gradient plus every branch's down-resize
    adjoint).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton

from ..functional import PARAM_CACHE
from . import kernels as K
from .plan import Part, cdiv, cost_model, nbytes
from .slots import strided
from .tables import axis_taps, pool_cells, stacked_taps

INT32_LIMIT = 2**31 - 1
_ACT = {"none": K.ACT_NONE, "relu": K.ACT_RELU, "silu": K.ACT_SILU, "gelu": K.ACT_GELU}


def interpreting() -> bool:
    """Whether the kernels were defined under Triton's interpreter (TRITON_INTERPRET=1 at import): they
    then run on CPU tensors, and only there."""
    return type(K.levels_kernel).__name__ == "InterpretedFunction"


#: Tests set this: every buffer a kernel must fill starts as NaN, so an element left unwritten shows.
POISON = False


def _empty(shape, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if POISON and t.is_floating_point():
        t.fill_(float("nan"))
    return t


try:
    from torch._library.triton import is_wrap_triton_enabled as _wrap_enabled
except ImportError:  # a torch without it: always wrap
    def _wrap_enabled() -> bool:
        return True


def _launch(kernel, grid, *args, **meta):
    # wrap_triton makes the launch visible to torch.compile and export. Where it is off (the eager body of a
    # torch.library.triton_op: the wrapper would only call the kernel) the kernel is called as it is, which
    # spares building the wrapper per launch (~5 us of a launch's ~15-80 us host time, bench/triton_host_cost.py).
    # Interpreted kernels too: nothing can trace them (fake tensors hold no data), and torch before 2.13
    # refuses to wrap them ("wrap_triton only works on functions annotated with triton.jit").
    (kernel if interpreting() or not _wrap_enabled() else torch.library.wrap_triton(kernel))[grid](*args, **meta)


#: ptxas's register limit for every kernel (``.maxnreg``): without it ptxas may cap a kernel below what it
#: needs and spill (seen for sm_90: 8 bytes at 40 registers, 12 at 128), with it the kernels take what they
#: need up to the hardware's 255 (tests/test_triton_compile.py reads ptxas's report).
MAXNREG = 255


def _config(kwargs: dict, **options) -> "triton.Config":
    """An autotune configuration with the kernels' register limit."""
    return triton.Config(kwargs, maxnreg=MAXNREG, **options)


class _Autotuner(triton.runtime.autotuner.Autotuner):
    """``triton.autotune``'s tuner with its per-call key found in one pass over the arguments: Triton's own
    ``run`` filters them with a list membership test per argument (quadratic: about 200 us a call here for
    block_kernel's ~150 arguments, as much as the rest of its launch). The key is Triton's (the ``key``
    arguments' values, then every tensor argument's dtype), so a key Triton's ``run`` tuned and cached is
    found here; a new one goes to Triton's ``run`` (which benchmarks it)."""

    def run(self, *args, **kwargs):
        if len(self.configs) > 1:
            named = dict(zip(self.arg_names, args))
            named.update((k, v) for k, v in kwargs.items() if k in self.names)
            key = tuple([named[k] for k in self.keys if k in named] +
                        [str(v.dtype) for v in named.values() if isinstance(v, torch.Tensor)])
            config = self.cache.get(key)
            if config is not None and config.pre_hook is None:
                self.best_config = config
                return self.fn.run(*args, **kwargs, **config.all_kwargs())
        return super().run(*args, **kwargs)


def _autotune(configs: List["triton.Config"], key: List[str]):
    """``triton.autotune(configs, key)`` with ``_Autotuner``'s per-call key."""
    def wrap(kernel):
        tuner = triton.autotune(configs=configs, key=key)(kernel)
        tuner.__class__ = _Autotuner
        tuner.names = frozenset(tuner.arg_names)
        return tuner
    return wrap


_PINNED: dict = {}


def _pinned(kernel, num_warps: int = 4):
    """``kernel`` with its one launch configuration (``num_warps`` warps, 3 stages, MAXNREG) as a one-entry
    autotune list, which Triton runs without measuring; the kernel itself under the interpreter."""
    if interpreting():
        return kernel
    if (kernel, num_warps) not in _PINNED:
        _PINNED[kernel, num_warps] = triton.autotune(configs=[_config({}, num_warps=num_warps, num_stages=3)],
                                                     key=[])(kernel)
    return _PINNED[kernel, num_warps]


def _pow2(n: int, lo: int, hi: int) -> int:
    """The power of two at or above n, clamped to [lo, hi] (triton.next_power_of_2's value, without its
    constexpr-function call)."""
    return max(lo, min(hi, 1 << (max(int(n), 1) - 1).bit_length()))


# Tile sizes of the gather / elementwise kernels: pixels per program and channels per program. The
# interpreter pays per operation, not per element, so it gets few, large tiles.
def _block_p() -> int:
    return 1024 if interpreting() else 64


def _block_c(c: int, f64: bool = False) -> int:
    # float64 tiles of 32 channels spilled over 1 KB in up_adjoints_kernel for sm_90: 16
    return _pow2(c, 4, 64 if interpreting() else (16 if f64 else 32))


def _fill_programs() -> int:
    """Programs a long reduction is split into at least, to fill the GPU: twice an H100's 132 SMs (the
    interpreter, paying per program, gets one)."""
    return 1 if interpreting() else 2 * 132


#: The longest serial loop a split reduction leaves to one program.
SPLIT_STEPS = 256
#: The same for the run gathers (up_adjoints_kernel, the projection's adjoint_kernel), whose steps are tap
#: vectors (TAPS readers of BLOCK_X columns at once).
ADJOINT_STEPS = 32


def _run_budget() -> int:
    """Values in a run gather's (channels, columns x taps) tile: 2048 on a GPU (16 per thread at 4 warps:
    48-135 registers for sm_90, no spills), 16384 under the interpreter (it pays per operation)."""
    return 16384 if interpreting() else 2048


def _run_tile(typical: int, w: int, block_c: int, identity: bool) -> Dict[str, int]:
    """The tile of a run gather (``kernels._run_gather``: levels_kernel, up_adjoints_kernel, the projection's
    adjoint_kernel) along a destination row w wide whose columns typically have ``typical`` readers each:
    TAPS readers per load, the power of two at or below the typical reader count (an integer factor's
    interior columns then take one load, its edge columns two), up to 32; BLOCK_X level columns, the
    (channels, columns, taps) tile holding up to ``_run_budget()`` values; X_IDENTITY where ``identity``:
    the x axis is not resized."""
    n_taps = 1 << (min(max(typical, 1), 32).bit_length() - 1)
    budget = _run_budget() // (block_c * n_taps)
    return dict(BLOCK_X=_pow2(w, 1, max(1, budget)), TAPS=n_taps, X_IDENTITY=identity)


def _stats_block() -> int:
    return 1024 if interpreting() else 128


def _strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    return tuple(t.stride())


def _fmt(x: torch.Tensor) -> torch.memory_format:
    return torch._prims_common.suggest_memory_format(x)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot_mode(x: torch.Tensor) -> int:
    if x.dtype == torch.float64:
        return K.DOT_FMA
    if x.dtype in (torch.float16, torch.bfloat16):
        return K.DOT_HALF
    # float32: TF32 only where the naive module's cuDNN convolution would use it (meta tensors: the launch
    # plan of a call on a GPU, plan.py).
    if (x.is_cuda or x.is_meta) and torch.backends.cudnn.allow_tf32:
        return K.DOT_TF32
    return K.DOT_IEEE


def _upcast(x: torch.Tensor) -> bool:
    return interpreting() and x.dtype == torch.bfloat16


def _span(t: torch.Tensor) -> int:
    """The largest element offset ``t`` reaches from its first element."""
    return sum(s * (d - 1) for s, d in zip(t.stride(), t.shape)) if t.numel() else 0


def check_index_limit(x: torch.Tensor, out_channels: int, others: Sequence[Tuple[str, torch.Tensor]] = ()) -> None:
    """The kernels index with int32 offsets: refuse, before allocating anything, an ``x``, an output of
    ``out_channels`` channels, or another tensor that they cannot address."""
    N, _, H, W = x.shape
    sizes = [("x", x.numel(), _span(x)), ("the output", N * out_channels * H * W, 0)]
    sizes += [(name, t.numel(), _span(t)) for name, t in others]
    for name, numel, span in sizes:
        if max(numel, span) > INT32_LIMIT:
            raise ValueError(
                f"{name} of the multi-scale block has {numel} elements (shape {tuple(x.shape)} for x), more "
                f"than the Triton kernels index (2**31 - 1); use backend 'cpu' or 'reference'"
            )


def _level(factor: int, bins: Sequence[int], b: int, H: int, W: int) -> Tuple[int, int]:
    return (H // factor, W // factor) if factor > 0 else (bins[2 * b], bins[2 * b + 1])


def _down_taps(factor: int, down_mode: str, H: int, W: int, h: int, w: int, align: bool, dtype, device):
    kind = "adaptive" if factor == 0 else ("identity" if factor == 1 else down_mode)
    return (axis_taps(kind, H, h, factor, align, dtype, device), axis_taps(kind, W, w, factor, align, dtype, device))


def _up_taps(up_mode: str, h: int, w: int, H: int, W: int, align: bool, dtype, device):
    kind = "identity" if (h, w) == (H, W) else up_mode
    return (axis_taps(kind, h, H, 0, align, dtype, device), axis_taps(kind, w, W, 0, align, dtype, device))


def _conv_kind(dtype: torch.dtype) -> str:
    """Which autotune list the convolution kernels use for operands of ``dtype`` (float64 is not tuned):
    'f32' or 'half'."""
    return "f32" if dtype == torch.float32 else "half"


def _conv_configs(kind: str):
    """Tile shapes of conv_kernel (pixels, output channels, input channels per step). Every one compiles for
    sm_90 without spilling registers (ptxas -v, tests/test_triton_compile.py): float32 operands take 16 input
    channels per step and 8 warps for 64 x 64 tiles or more (an IEEE float32 dot holds its operand tiles in
    registers: 32 channels, 4 warps on 64 x 64, or 128 x 128 tiles spill); half-precision operands no 128 x 128
    tiles and 8 warps for 128 pixels (4 warps on 128 x 64, 128 x 128 tiles spilled 0.3 - 0.9 KB)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 256, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
    shapes = {
        "f32": ((64, 64, 16, 8, 3), (128, 64, 16, 8, 3), (64, 128, 16, 8, 3), (64, 32, 16, 4, 4), (32, 32, 16, 2, 4)),
        "half": ((64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 4, 3), (64, 128, 64, 8, 3), (64, 32, 32, 4, 4),
                 (32, 32, 32, 2, 4)),
    }[kind]
    return [_config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


# Block shapes per problem shape: pixels, channels in and out, kernel size, how the dot multiplies.
conv_tuned = {kind: _autotune(configs=_conv_configs(kind), key=["N", "H", "W", "C", "CO", "KS", "DOT"])(
    K.conv_kernel) for kind in ("f32", "half")}


def _taps_in_k(c: int) -> bool:
    """Whether a convolution of ``c`` input channels reduces over (tap, channel) flattened (``_conv_program``'s
    TAPS_IN_K): below 16 channels, where a step per tap would be mostly padding (tl.dot's K is 16 at least)."""
    return c < 16


def _conv(src: torch.Tensor, wk: torch.Tensor, ks: int, co: int, bias: Optional[torch.Tensor],
          pre: Optional[torch.Tensor], out: Optional[torch.Tensor], scale: Optional[torch.Tensor] = None,
          shift: Optional[torch.Tensor] = None, act: int = K.ACT_NONE) -> None:
    N, C, H, W = src.shape
    if N * H * W == 0 or co == 0:
        return
    dummy = wk
    pre_t = pre if pre is not None else src
    out_t = out if out is not None else src
    f64 = src.dtype == torch.float64
    dot = K.DOT_FMA if f64 else _dot_mode(src)
    grid = lambda meta: (cdiv(N * H * W, meta["BLOCK_M"]), cdiv(co, meta["BLOCK_N"]))  # noqa: E731
    if f64:  # multiply-and-sum: a fixed small block keeps the 3-D product in registers
        _launch(_pinned(K.conv_kernel), grid, src, *_strides(src), wk, bias if bias is not None else dummy,
                pre_t, *_strides(pre_t), out_t, *_strides(out_t),
                scale if scale is not None else dummy, shift if shift is not None else dummy,
                N, C, H, W, co, ks,
                HAS_BIAS=bias is not None, STORE_PRE=pre is not None, STORE_OUT=out is not None,
                HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, ACT=act, DOT=dot, UPCAST=False,
                F64=True, TAPS_IN_K=_taps_in_k(C), **(dict(BLOCK_M=128, BLOCK_N=16, BLOCK_K=16) if interpreting()
                             else dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=8)))
        return
    _launch(conv_tuned[_conv_kind(src.dtype)], grid, src, *_strides(src), wk, bias if bias is not None else dummy,
            pre_t, *_strides(pre_t), out_t, *_strides(out_t),
            scale if scale is not None else dummy, shift if shift is not None else dummy,
            N, C, H, W, co, ks,
            HAS_BIAS=bias is not None, STORE_PRE=pre is not None, STORE_OUT=out is not None,
            HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, ACT=act, DOT=dot, UPCAST=_upcast(src),
            F64=False, TAPS_IN_K=_taps_in_k(C))


@cost_model(K.conv_kernel)
def _conv_cost(a):
    """Plan model (estimates): a (BLOCK_M pixels, BLOCK_N channels) tile per program, K loop over taps x C."""
    N, C, H, W, CO, KS, src = a["N"], a["C"], a["H"], a["W"], a["CO"], a["KS"], a["src"]
    bm, bn, bk, px = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"], N * H * W
    programs = cdiv(px, bm) * cdiv(CO, bn)
    stores = int(a["STORE_PRE"]) + int(a["STORE_OUT"])
    steps = _k_steps(KS, C, bk, a["TAPS_IN_K"])
    return [Part("conv", programs, min(bm, px) * min(bn, CO), steps,
                 nbytes(src, px * C) + nbytes(a["wk"]), nbytes(src, px * CO * stores),
                 2 * programs * bm * bn * steps * bk)]


def _k_steps(ks: int, c: int, bk: int, taps_in_k: bool) -> int:
    """_conv_program's reduction steps of BLOCK_K: over (tap, channel) flattened, or per tap over its channels."""
    return cdiv(ks * ks * c, bk) if taps_in_k else ks * ks * cdiv(c, bk)


def _pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(CO, C, k, k) -> wk[(ky * k + kx) * C + c, co], contiguous (parameter-sized work)."""
    co, c, k, _ = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(k * k * c, co).contiguous()


def _packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """``_pack_weight(weight)`` for the inference launcher, from the functional layer's parameter cache: packed
    once per version of the parameter (a copy, never a view that would keep the parameter alive); per call
    inside a trace. The training operators pack per call: the cache sees a parameter's changes through its
    version counter, which in-place writes through ``.data`` bypass (gradcheck perturbs its inputs so), and
    inside an operator it cannot tell whether a gradient is being taken."""
    def pack():
        wk = _pack_weight(weight)
        return wk if wk._base is None else wk.clone()

    return PARAM_CACHE.get(weight, "triton.packed_weight", (weight,), (), pack)


def _offsets(weight: Sequence[torch.Tensor], C: int, input_position: str) -> Tuple[List[int], int, int]:
    """Channel offset of each branch in the output, of x (-1 if absent), and the output's channels."""
    offsets, o = [], C if input_position == "first" else 0
    for w in weight:
        offsets.append(o)
        o += w.shape[0]
    x_off = 0 if input_position == "first" else (o if input_position == "last" else -1)
    return offsets, x_off, o + (C if input_position == "last" else 0)


def _conv_grid(sizes, N, block_m):
    return lambda meta: (sum(cdiv(N * h * w, block_m) * cdiv(co, meta["BLOCK_N"]) for h, w, co in sizes),)


def _convs_configs(kind: str):
    """Tile shapes of convs_kernel (output channels, input channels per step; the pixels are fixed): float32
    operands take 16 input channels per step. Every entry compiles without register spills for sm_90 with
    Triton 3.6 to 3.9 (.ci/triton-versions-check): from 3.7 on, 4 warps on 64-channel tiles spilled up to
    2.4 KB in half precision, every 128-channel tile spilled, and so did float32's 64-channel ones."""
    if interpreting():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
    shapes = {"f32": ((32, 16, 8, 3), (32, 16, 8, 4), (16, 16, 4, 3)),
              "half": ((64, 32, 8, 3), (32, 32, 4, 4), (64, 64, 8, 3), (64, 32, 8, 4))}[kind]
    return [_config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in shapes]


def _convs_block_m(f64: bool) -> int:
    """Pixels per program of convs_kernel: fixed (not tuned), as the batch statistics' tiles follow it."""
    return (128 if interpreting() else 32) if f64 else (256 if interpreting() else 64)


_CONVS_KEY = ["N", "C"] + K.CONVS.per_slot("h", "w", "CO", "KS") + ["SLOTS", "DOT"]
convs_tuned = {kind: _autotune(configs=_convs_configs(kind), key=_CONVS_KEY)(K.convs_kernel)
               for kind in ("f32", "half")}


def _rows(buf: torch.Tensor, first: int, rows: int, width: int) -> torch.Tensor:
    """buf[:, :, first:first + rows, :width] as one view op (a host op fewer per call than two slices)."""
    return buf.as_strided((buf.shape[0], buf.shape[1], rows, width), buf.stride(),
                          buf.storage_offset() + first * buf.stride(2))


def _gather_levels(x, out, x_c0: int, copy: bool, slots: list) -> None:
    """One levels_kernel launch: x copied into ``out``'s channels from ``x_c0`` (if ``copy``), then for each
    slot (dst, h, w, y taps, y taps per chunk, x taps, whether x taps are the identity) dst gathered from x (its
    chunks' partial sums stacked along dst's rows)."""
    N, C, H, W = x.shape
    block_p, block_c = _block_p(), _block_c(C)
    ends, args = [cdiv(N * H * W, block_p) * cdiv(C, block_c) if copy else 0], []
    for dst, h, wd, ty, r, tx, x_identity in slots:
        assert tx.run, "levels_kernel reads each level column's source columns as a run"
        flags = K.LevelFlags(**_run_tile(tx.typical, wd, block_c, x_identity))
        args.append((dict(**strided("d", dst), h=h, w=wd, y=ty.idx, yw=ty.w, Y=ty.taps, yc=ty.count, R=r,
                          xt=tx.idx, xw=tx.w, X=tx.taps, xc=tx.count), flags))
        ends.append(ends[-1] + cdiv(ty.taps, r) * N * h * cdiv(wd, flags.BLOCK_X) * cdiv(C, block_c))
    if ends[-1] > 0:
        filler = None if args else dict(d=x, d_n=0, d_c=0, d_h=0, d_w=0, h=1, w=1, y=x, yw=x, Y=0, yc=x, R=1, xt=x,
                                        xw=x, X=0, xc=x)  # (the copy alone)
        flat, consts = K.LEVELS.pack(args, ends, filler)
        _launch(_pinned(K.levels_kernel), (ends[-1],), x, *_strides(x), out, *_strides(out), x_c0, N, C, H, W,
                *flat,
                **consts, F64=x.dtype == torch.float64, BLOCK_P=block_p, BLOCK_C=block_c)


#: The most cells (pixels of the bin levels of one launch together) a pool_kernel program holds.
MAX_POOL_CELLS = 128


def _pool_blocks(dtype: torch.dtype) -> Tuple[int, int]:
    """pool_kernel's pixels per step and channels per program: the largest that compile without spilling
    registers at 128 cells (sm_90 and sm_80, tests/test_triton_compile.py; float32's three TF32 products need
    more registers than half precision's one; float64 multiplies and sums a 3-D product in registers)."""
    if interpreting():  # (float64's 3-D product at most Triton's 2**20 elements)
        return (32, 64) if dtype == torch.float64 else (256, 64)
    return {torch.float64: (2, 16), torch.float32: (32, 32)}.get(dtype, (32, 64))


def _pool_mode(x: torch.Tensor) -> int:
    """How pool_kernel multiplies: as the convolutions (``_dot_mode``), but float32 on a GPU in three TF32
    products whatever the TF32 flags say (ATen's pooling never rounds to TF32)."""
    if x.dtype == torch.float32 and not interpreting():  # (the interpreter: IEEE, exact on the CPU)
        return K.DOT_TF32X3
    return _dot_mode(x)


#: A pixel chunk of pool_kernel holds at least this many pixels per cell: a chunk's partials (every cell, for
#: its channels) then cost at most 1/4 of its read.
POOL_PIXELS_PER_CELL = 4


def _pool_chunks(N: int, C: int, HW: int, cells: int, block_k: int, block_c: int) -> Tuple[int, int]:
    """(chunks S, pixels per chunk) of pool_kernel: unsplit where the (plane, channel block) programs give every
    SM one (a split costs a launch that sums the chunks in training and in large blocks' inference), else
    enough chunks to fill the GPU where they stay POOL_PIXELS_PER_CELL pixels per cell or more; no chunk over
    SPLIT_STEPS steps."""
    steps = cdiv(HW, block_k)
    programs = N * cdiv(C, block_c)
    most = max(1, steps // max(1, cdiv(POOL_PIXELS_PER_CELL * cells, block_k)))
    wanted = 1 if 2 * programs >= _fill_programs() else cdiv(_fill_programs(), programs)
    split = min(steps, max(min(most, wanted), cdiv(steps, SPLIT_STEPS)))
    per = cdiv(steps, split) * block_k
    return cdiv(HW, per), per


def _dense_rows(t: torch.Tensor) -> bool:
    """Whether t's pixel (h, w) sits at offset (h * W + w) * stride(3) (pool_kernel's linear addressing)."""
    return t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3)


def _pool_levels(x, out, x_c0: int, copy: bool, group: Sequence[Tuple[int, int, int]], combine: bool) -> dict:
    """pool_kernel: x pooled to the bin levels ``group`` ((branch, h, w), MAX_POOL_CELLS cells in all) from one
    read, copied into ``out``'s channels from ``x_c0`` where ``copy``; returns {branch: (level, its taps as a
    source)} as ``_launch_levels``. A map long enough to be split into pixel chunks leaves per-chunk partials
    stacked along the rows of one buffer (accumulation dtype), summed as ``_launch_levels`` says."""
    N, C, H, W = x.shape
    dt, dev, fmt = x.dtype, x.device, _fmt(x)
    block_k, block_c = _pool_blocks(dt)
    cells = sum(h * wd for _, h, wd in group)
    block_l = _pow2(cells, 16, MAX_POOL_CELLS)
    chunks, per = _pool_chunks(N, C, H * W, cells, block_k, block_c)
    windows = pool_cells(H, W, tuple((h, wd) for _, h, wd in group), block_l, dev)
    ident = lambda n: axis_taps("identity", n, n, 0, False, dt, dev)  # noqa: E731
    levels, slots, combined, l0 = {}, [], [], 0
    buf = None
    if chunks > 1:
        buf = _empty((N, C, chunks * sum(h for _, h, _ in group), max(wd for _, _, wd in group)),
                     dtype=_acc_dtype(dt), device=dev, memory_format=fmt)
    first = 0
    for b, h, wd in group:
        if buf is None:
            dst = _empty((N, C, h, wd), dtype=dt, device=dev, memory_format=fmt)
            levels[b] = (dst, (ident(h), ident(wd)))
        else:
            dst = _rows(buf, first, chunks * h, wd)
            sums = stacked_taps(h, chunks, first if combine else 0, dt, dev)
            if combine:
                lev = _empty((N, C, h, wd), dtype=dt, device=dev, memory_format=fmt)
                combined.append((lev, h, wd, sums, chunks, ident(wd), True))
                levels[b] = (lev, (ident(h), ident(wd)))
            else:
                levels[b] = (dst, (sums, ident(wd)))
            first += chunks * h
        slots.append((dict(**strided("d", dst), l0=l0, h=h, w=wd), K.NoFlags()))
        l0 += h * wd
    assert not copy or _dense_rows(out), out.stride()
    flat, consts = K.POOL.pack(slots)
    if N * C * H * W == 0:
        return levels
    # 8 warps: with 4, ptxas for sm_90 needed up to 255 registers and spilled in float32
    _launch(_pinned(K.pool_kernel, num_warps=8), (N * cdiv(C, block_c) * chunks,), x, *_strides(x), out, out.stride(0),
            out.stride(1), out.stride(3), x_c0, windows, N, C, W, chunks, per, H * W, *flat, **consts, COPY=copy,
            FLAT=_dense_rows(x), DOT=_pool_mode(x), UPCAST=_upcast(x), F64=dt == torch.float64, BLOCK_L=block_l,
            BLOCK_K=block_k, BLOCK_C=block_c)
    if combined:
        _gather_levels(buf, buf, 0, False, combined)
    return levels


@cost_model(K.pool_kernel)
def _pool_cost(a):
    """Plan model (estimates): N * channel blocks * S programs, each looping over its chunk's pixels BLOCK_K at a
    time: x read once (and copied where COPY), every cell of the launch's levels per program from a (BLOCK_L
    cells, BLOCK_K pixels) mask times (BLOCK_K pixels, BLOCK_C channels) product (three of them in TF32 for
    float32)."""
    x, N, C, S, pk, hw = a["x"], a["N"], a["C"], a["S"], a["PK"], a["HW"]
    bl, bk, bc = a["BLOCK_L"], a["BLOCK_K"], a["BLOCK_C"]
    programs = N * cdiv(C, bc) * S
    steps = cdiv(min(pk, hw), bk)
    levels = K.POOL.slots(a)
    written = sum(nbytes(sl["d"], N * C * S * sl["h"] * sl["w"]) for sl in levels)
    copy = nbytes(x, N * C * hw) if a["COPY"] else 0
    what = "pool " + ", ".join(f"{sl['h']}x{sl['w']}" for sl in levels) + (" + copy x" if a["COPY"] else "") + \
        (f" in {S} chunks" if S > 1 else "")
    products = 3 if a["DOT"] == K.DOT_TF32X3 else 1
    return [Part(what, programs, min(bk, hw) * min(bc, C), steps, nbytes(x, N * C * hw) + nbytes(a["cells"]),
                 copy + written, 2 * products * programs * steps * bl * bk * bc)]


def _pool_groups(branches: Sequence[int], factor, bins, H: int, W: int) -> List[List[Tuple[int, int, int]]]:
    """The bin levels of ``branches`` that pool_kernel takes, in launches of at most MAX_POOL_CELLS cells (in
    order, each launch as full as it goes); a larger level is left to levels_kernel's gather."""
    groups: List[List[Tuple[int, int, int]]] = []
    for b in branches:
        if factor[b] != 0:
            continue
        h, wd = _level(0, bins, b, H, W)
        if h * wd > MAX_POOL_CELLS:
            continue
        if groups and sum(hh * ww for _, hh, ww in groups[-1]) + h * wd <= MAX_POOL_CELLS:
            groups[-1].append((b, h, wd))
        else:
            groups.append([(b, h, wd)])
    return groups


def _launch_levels(x, out, x_c0: int, copy: bool, branches: Sequence[int], factor, bins, down_mode, align_corners,
                   combine: bool = True) -> dict:
    """x copied into ``out``'s channels from ``x_c0`` (if ``copy``) and brought to the level of each of
    ``branches`` (at most MAX_SLOTS); returns {branch: (level, its taps as a source)}.

    Bin levels of up to MAX_POOL_CELLS cells in all are pooled by pool_kernel from one read of x (which
    also copies x); the other levels are gathered by one levels_kernel launch. A long reduction (a map
    split into pixel chunks, or a pooling window looping over more than SPLIT_STEPS taps) is computed in
    chunks, their partial sums stacked along the rows of one buffer in the accumulation dtype; with
    ``combine`` a second launch sums them in chunk order into the level (identity taps), without it the
    partials are returned with the taps that sum them (the inference block kernel's down taps, so that it
    stays one launch after this one)."""
    N, C, H, W = x.shape
    dt, dev, fmt = x.dtype, x.device, _fmt(x)
    levels = {}
    for group in _pool_groups(branches, factor, bins, H, W):
        levels.update(_pool_levels(x, out, x_c0, copy, group, combine))
        copy = False
    slots, chunked = [], []
    for b in branches:
        if b in levels:
            continue
        h, wd = _level(factor[b], bins, b, H, W)
        ty, tx = _down_taps(factor[b], down_mode, H, W, h, wd, align_corners, dt, dev)
        rows = max(1, SPLIT_STEPS // tx.taps)  # window rows per chunk
        if ty.taps <= rows:
            lev = _empty((N, C, h, wd), dtype=dt, device=dev, memory_format=fmt)
            levels[b] = (lev, (axis_taps("identity", h, h, 0, False, dt, dev),
                               axis_taps("identity", wd, wd, 0, False, dt, dev)))
            slots.append((lev, h, wd, ty, ty.taps, tx, False))
        else:
            chunked.append((b, h, wd, ty, rows, tx, cdiv(ty.taps, rows)))
    if chunked:
        buf = _empty((N, C, sum(k * h for _, h, _, _, _, _, k in chunked), max(c[2] for c in chunked)),
                     dtype=_acc_dtype(dt), device=dev, memory_format=fmt)
        first, combined = 0, []
        for b, h, wd, ty, rows, tx, k in chunked:
            stack = _rows(buf, first, k * h, wd)
            slots.append((stack, h, wd, ty, rows, tx, False))
            sums = stacked_taps(h, k, first if combine else 0, dt, dev)
            ident = axis_taps("identity", wd, wd, 0, False, dt, dev)
            if combine:
                lev = _empty((N, C, h, wd), dtype=dt, device=dev, memory_format=fmt)
                combined.append((lev, h, wd, sums, k, ident, True))
                levels[b] = (lev, (axis_taps("identity", h, h, 0, False, dt, dev), ident))
            else:
                levels[b] = (stack, (sums, ident))
            first += k * h
    _gather_levels(x, out, x_c0, copy, slots)  # (no launch when it has nothing to do)
    if chunked and combine:
        _gather_levels(buf, buf, 0, False, combined)
    return levels


@cost_model(K.levels_kernel)
def _levels_cost(a):
    """Plan model (estimates): copy programs, then per level a (BLOCK_C channels, BLOCK_X pixels of a row, TAPS
    source columns) tile per program looping over its chunk of window rows (R of Y) times its tap vectors."""
    x, N, C, H, W, bp, bc = a["x"], a["N"], a["C"], a["H"], a["W"], a["BLOCK_P"], a["BLOCK_C"]
    parts = [Part("copy x", a["E0"], min(bp, N * H * W) * min(bc, C), 1, nbytes(x, N * C * H * W),
                  nbytes(x, N * C * H * W))]
    for sl in K.LEVELS.slots(a):
        px, taps = N * sl["h"] * sl["w"], sl["Y"] * sl["X"]
        chunks = cdiv(sl["Y"], sl["R"])
        parts.append(Part(f"level {sl['h']}x{sl['w']}" + (f" in {chunks} chunks" if chunks > 1 else ""),
                          sl["end"] - sl["start"], min(bc, C) * min(sl["BLOCK_X"], sl["w"]) * min(sl["TAPS"], sl["X"]),
                          min(sl["R"], sl["Y"]) * cdiv(sl["X"], sl["TAPS"]),
                          nbytes(x, C * min(px * taps, N * H * W)), nbytes(sl["d"], chunks * px * C)))
    return parts


def forward(x, weight, bias, scale, shift, batch_stats, eps, factor, bins, down_mode, up_mode, align_corners,
            activation, input_position, save=True):
    """The training forward: the output and what backward and the running statistics need (per branch the
    level, the conv output ``pre``, the batch mean and biased variance; ``save=False``, the inference of a large
    block: the conv outputs of branches without batch statistics not stored, empty). Launches, per four branches:
    levels_kernel (x copied, every level other than x), convs_kernel (every convolution; the epilogue stored
    straight into the output where the level is the input's size and no batch statistics are needed),
    ups_kernel (the rest: with batch statistics the norm and activation at the levels first, then the
    up-resize), plus a parameter-sized combine of each batch-statistics branch's per-tile statistics."""
    N, C, H, W = x.shape
    fmt = _fmt(x)
    dev, dt = x.device, x.dtype
    f64 = dt == torch.float64
    stats_dt = _acc_dtype(dt)
    offsets, x_off, c_out = _offsets(weight, C, input_position)
    check_index_limit(x, c_out)
    out = _empty((N, c_out, H, W), dtype=dt, device=dev, memory_format=fmt)
    act = _ACT[activation]
    B = len(weight)
    levels = [torch.empty((0,), dtype=dt, device=dev) for _ in range(B)]
    pres = [None] * B
    means = [torch.empty((0,), dtype=stats_dt, device=dev) for _ in range(B)]
    variances = [torch.empty((0,), dtype=stats_dt, device=dev) for _ in range(B)]
    block_p = _block_p()
    block_m = _convs_block_m(f64)
    for first in range(0, B, K.MAX_SLOTS):
        chunk = list(range(first, min(B, first + K.MAX_SLOTS)))
        # 1. x's slice and every level other than x itself
        copy = first == 0 and x_off >= 0
        made = _launch_levels(x, out, max(x_off, 0), copy, [b for b in chunk if factor[b] != 1], factor, bins,
                              down_mode, align_corners)
        for b, (lev, _) in made.items():
            levels[b] = lev
        # 2. every convolution of the chunk
        conv_slots, sizes, partials, ups = [], [], {}, []
        for b in chunk:
            co, _, k, _ = weight[b].shape
            h, wd = _level(factor[b], bins, b, H, W)
            src = x if factor[b] == 1 else levels[b]
            dst = out[:, offsets[b]:offsets[b] + co]
            direct = (h, wd) == (H, W) and not batch_stats[b]
            keep = save or batch_stats[b]  # (the inference's conv output goes straight through the epilogue)
            pre = _empty((N, co, h, wd) if keep else (0,), dtype=dt, device=dev,
                         memory_format=fmt if keep else torch.contiguous_format)
            pres[b] = pre
            if batch_stats[b]:
                T = cdiv(N * h * wd, block_m)
                part = (_empty((T, co), dtype=stats_dt, device=dev), _empty((T, co), dtype=stats_dt, device=dev))
                partials[b] = part
                epi = pre  # unused
            else:
                part = (pre, pre)  # unused
                epi = dst if direct else _empty((N, co, h, wd), dtype=dt, device=dev, memory_format=fmt)
                pre = pre if keep else epi  # (never written)
            if not direct:
                ups.append((b, epi if not batch_stats[b] else pre))
            s_, t_ = (None, None) if batch_stats[b] else (scale[b], shift[b])
            wk = _pack_weight(weight[b])
            given = lambda t: wk if t is None else t  # noqa: E731  (an absent tensor is never read)
            conv_slots.append((
                dict(**strided("l", src), wk=wk, b=given(bias[b]), **strided("pr", pre), **strided("o", epi),
                     sc=given(s_), sh=given(t_), pm=part[0], pq=part[1], h=h, w=wd, CO=co, KS=k),
                K.ConvFlags(HAS_BIAS=bias[b] is not None, STORE_PRE=keep, HAS_SCALE=s_ is not None,
                            HAS_SHIFT=t_ is not None, STORE_OUT=not batch_stats[b], STATS=batch_stats[b])))
            sizes.append((h, wd, co))
        if N > 0:
            # float64 multiplies and sums a 3-D product: fixed small blocks, no tuning
            kernel, blocks = ((_pinned(K.convs_kernel), dict(BLOCK_N=16, BLOCK_K=16)) if f64
                              else (convs_tuned[_conv_kind(dt)], {}))
            flat, consts = K.CONVS.pack(conv_slots)
            _launch(kernel, _conv_grid(sizes, N, block_m), N, C, *flat, **consts, ACT=act,
                    DOT=K.DOT_FMA if f64 else _dot_mode(x), UPCAST=_upcast(x), F64=f64, TAPS_IN_K=_taps_in_k(C),
                    BLOCK_M=block_m, **blocks)
        # 3. batch statistics: the tiles' (count, mean, M2) combined in order (parameter-sized)
        for b, (part_mean, part_m2) in partials.items():
            h, wd = _level(factor[b], bins, b, H, W)
            means[b], variances[b] = combine_statistics(part_mean, part_m2, N * h * wd, block_m)
        # 4. the remaining output slices. A branch with batch statistics first gets its norm and activation at
        #    its level (a small pass, rounded to x's dtype as the reference's norm and activation outputs are),
        #    so that the up-resize into the output only gathers (per tap it applied norm and activation: ~4x the
        #    instructions per output element)
        level_slots, up_slots = [], []
        up_bc = max((_block_c(weight[b].shape[0]) for b, _ in ups), default=4)
        for b, src in ups:
            co = weight[b].shape[0]
            h, wd = _level(factor[b], bins, b, H, W)
            if batch_stats[b]:
                activated = _empty((N, co, h, wd), dtype=dt, device=dev, memory_format=fmt)
                flags = K.UpFlags(NORM=K.NORM_BATCH, HAS_GAMMA=scale[b] is not None, HAS_BETA=shift[b] is not None,
                                  APPLY_ACT=True)
                level_slots.append((_up_slot_args(src, activated, co, h, wd, *_up_taps("identity", h, wd, h, wd,
                                                                                        False, dt, dev),
                                                  (means[b], variances[b], scale[b], shift[b]), eps[b]), flags))
                src = activated
            ty, tx = _up_taps(up_mode, h, wd, H, W, align_corners, dt, dev)
            up_slots.append((_up_slot_args(src, out[:, offsets[b]:offsets[b] + co], co, H, W, ty, tx,
                                           (None,) * 4, eps[b]), K.UpFlags()))
        for slots_ in (level_slots, up_slots):
            ends = [0]
            for args, _ in slots_:
                ends.append(ends[-1] + N * cdiv(args["H"] * args["W"], block_p) * cdiv(args["C"], up_bc))
            if slots_ and ends[-1] > 0:
                flat, consts = K.UPS.pack(slots_, ends)
                _launch(_pinned(K.ups_kernel), (ends[-1],), N, *flat, **consts, ACT=act, F64=f64, BLOCK_P=block_p,
                        BLOCK_C=up_bc)
    return out, levels, pres, means, variances


def combine_statistics(part_mean: torch.Tensor, part_m2: torch.Tensor, total: int,
                       block_p: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batch mean and biased variance per channel from per-tile partials (T, C): each tile's mean and M2 over
    block_p of the ``total`` pixels (the last tile's rest), combined in tile order by stats_combine_kernel
    (one launch, parameter-sized; deterministic). No pixels: uninitialised (never read)."""
    T, C = part_mean.shape
    mean = torch.empty((C,), dtype=part_mean.dtype, device=part_mean.device)
    var = torch.empty((C,), dtype=part_mean.dtype, device=part_mean.device)
    bc = _block_c(C)
    if total and C:
        _launch(_pinned(K.stats_combine_kernel), (cdiv(C, bc),), part_mean, part_m2, T, total, C, mean, var,
                BLOCK_P=block_p, BLOCK_C=bc)
    return mean, var


@cost_model(K.convs_kernel)
def _convs_cost(a):
    """Plan model (estimates): per branch slot conv_kernel's tiles (pre stored where STORE_PRE; the epilogue where
    STORE_OUT)."""
    N, C, bm, bn, bk = a["N"], a["C"], a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"]
    parts = []
    for sl in K.CONVS.slots(a):
        px, co, ks, src = N * sl["h"] * sl["w"], sl["CO"], sl["KS"], sl["l"]
        programs = cdiv(px, bm) * cdiv(co, bn)
        stores = int(sl["STORE_PRE"]) + int(sl["STORE_OUT"])
        steps = _k_steps(ks, C, bk, a["TAPS_IN_K"])
        parts.append(Part(f"conv {sl['h']}x{sl['w']}", programs, min(bm, px) * min(bn, co), steps,
                          nbytes(src, px * C) + nbytes(sl["wk"]), nbytes(src, px * co * stores),
                          2 * programs * bm * bn * steps * bk))
    return parts


@cost_model(K.stats_combine_kernel)
def _stats_combine_cost(a):
    """Plan model (estimates): BLOCK_C channels per program, a loop over every tile's statistics."""
    T, C, pm = a["T"], a["C"], a["part_mean"]
    return [Part("statistics", cdiv(C, a["BLOCK_C"]), min(a["BLOCK_C"], C), T, 2 * nbytes(pm, T * C),
                 2 * nbytes(a["mean_out"], C))]


def _up_slot_args(src, dst, co: int, H: int, W: int, ty, tx, norm: tuple, eps: float) -> dict:
    """One slot of ups_kernel: ``src`` resized over the taps ty / tx into ``dst`` (N, co, H, W); ``norm``: the
    batch mean, variance, gamma and beta applied per tap (None: absent)."""
    given = lambda t: ty.w if t is None else t  # noqa: E731  (an absent tensor is never read)
    a_, b_, g_, be_ = norm
    assert _dense_rows(dst), dst.stride()  # (ups_kernel addresses a plane's pixels linearly)
    return dict(**strided("s", src), **strided("d", dst), C=co, H=H, W=W, y=ty.idx, yw=ty.w, Y=ty.taps, xt=tx.idx,
                xw=tx.w, X=tx.taps, a=given(a_), b=given(b_), eps=float(eps), g=given(g_), be=given(be_))


@cost_model(K.ups_kernel)
def _ups_cost(a):
    """Plan model (estimates): per branch slot a (BLOCK_P output pixels, BLOCK_C channels) tile per
    program, looping over the up-resize taps."""
    N, bp, bc = a["N"], a["BLOCK_P"], a["BLOCK_C"]
    parts = []
    for sl in K.UPS.slots(a):
        src, co, H, W = sl["s"], sl["C"], sl["H"], sl["W"]
        what = "norm, activation" if tuple(src.shape[2:]) == (H, W) else f"up {tuple(src.shape[2:])}"
        parts.append(Part(what, sl["end"] - sl["start"], min(bp, H * W) * min(bc, co), sl["Y"] * sl["X"],
                          nbytes(src), nbytes(sl["d"], N * co * H * W)))
    return parts


def _wgrad(src: torch.Tensor, dpre: torch.Tensor, ks: int, co: int, acc_dt: torch.dtype):
    """The weight gradient as wk[(ky * k + kx) * C + c, co] in ``acc_dt``, and None; or, when the pixels are
    split into ranges, the gradient's buffer and (partials, the buffer flattened) for the caller's
    column-sums launch to fill it in a fixed order."""
    N, C, H, W = src.shape
    total = N * H * W
    if total == 0:
        return torch.zeros((ks * ks * C, co), dtype=acc_dt, device=src.device), None
    dwk = _empty((ks * ks * C, co), dtype=acc_dt, device=src.device)
    f64 = src.dtype == torch.float64
    if interpreting():  # (tests shrink _block_p to make the pixel ranges split)
        bm, bc, bn = max(16, _block_p() // 2), 32, 32
    elif f64:
        bm, bc, bn = 16, 8, 8
    else:
        bm, bc, bn = 64, _pow2(C, 16, 64), _pow2(co, 16, 64)
    programs = ks * ks * cdiv(C, bc) * cdiv(co, bn)
    steps = cdiv(total, bm)
    # ranges of at least 16 steps: a shorter loop is not worth a partial's round trip
    split = max(1, min(steps // 16, max(cdiv(steps, SPLIT_STEPS), cdiv(_fill_programs(), programs))))
    m_split = cdiv(steps, split) * bm
    split = cdiv(total, m_split)
    part = dwk if split == 1 else _empty((split, ks * ks * C * co), dtype=acc_dt, device=src.device)
    grid = (ks * ks * split, cdiv(C, bc), cdiv(co, bn))
    _launch(_pinned(K.wgrad_kernel), grid, src, *_strides(src), dpre, part, N, C, H, W, co, ks, split, m_split,
            DOT=K.DOT_FMA if f64 else _dot_mode(src), UPCAST=_upcast(src), BLOCK_M=bm, BLOCK_C=bc, BLOCK_N=bn)
    return dwk, (None if split == 1 else (part, dwk.view(-1)))


#: The most rows one column_sums_kernel program sums (16 steps of 64): a matrix of more than twice as many (the
#: up-resize adjoints' per-tile partials of a large map: 28,672 rows for stem_pyramid's factor-1 branch, once
#: on 3 programs) is summed in chunks of that many rows by as many programs, their sums by a second launch.
COLUMN_CHUNK_ROWS = 1024


def _column_sums(pairs) -> None:
    """out[c] = sum over rows of part[r, c] for each (part, out) of ``pairs``, in a fixed order: one launch
    per MAX_SLOTS pairs (column_sums_kernel); long matrices first in chunks of rows (a launch more: the
    chunks' sums, in chunk order)."""
    first, second = [], []
    for part, out in pairs:
        T, C = part.shape
        rows = COLUMN_CHUNK_ROWS
        if T > 2 * rows:
            sums = _empty((cdiv(T, rows), C), dtype=part.dtype, device=part.device)
            first.append((part, rows, sums))
            second.append((sums, sums.shape[0], out))
        else:
            first.append((part, T, out))
    for level in (first, second):
        for i in range(0, len(level), K.MAX_SLOTS):
            group = level[i:i + K.MAX_SLOTS]
            bc = _pow2(max(part.shape[1] for part, _, _ in group), 4, 64)
            # rows per step: a chunk in about 16 steps (more where a matrix of over 1024 rows is not chunked)
            br = _pow2(cdiv(max(min(rows, part.shape[0]) for part, rows, _ in group), 16), 8, 64)
            slots, ends = [], [0]
            for part, rows, out in group:
                T, C = part.shape
                slots.append((dict(pt=part, T=T, C=C, R=rows, o=out), K.NoFlags()))
                ends.append(ends[-1] + cdiv(C, bc) * cdiv(T, rows))
            flat, consts = K.COLUMN_SUMS.pack(slots, ends)
            _launch(_pinned(K.column_sums_kernel), (ends[-1],), *flat, **consts, BLOCK_R=br, BLOCK_C=bc)


@cost_model(K.wgrad_kernel)
def _wgrad_cost(a):
    """Plan model (estimates): a (BLOCK_C, BLOCK_N) block of one tap's weight gradient per program, looping
    over its range of M_SPLIT pixels BLOCK_M at a time."""
    N, C, H, W, CO, KS, src = a["N"], a["C"], a["H"], a["W"], a["CO"], a["KS"], a["src"]
    bm, bc, bn, px, split = a["BLOCK_M"], a["BLOCK_C"], a["BLOCK_N"], N * H * W, a["SPLIT"]
    programs = KS * KS * split * cdiv(C, bc) * cdiv(CO, bn)
    return [Part("weight gradient", programs, min(bc, C) * min(bn, CO), cdiv(min(px, a["M_SPLIT"]), bm),
                 nbytes(src, px * C) + nbytes(a["dpre"], px * CO), nbytes(a["dwk"], split * KS * KS * C * CO),
                 2 * KS * KS * cdiv(C, bc) * cdiv(CO, bn) * bc * bn * cdiv(px, bm) * bm)]


def _norm_of(b, batch_stats, scale, shift, mean, var):
    """(NORM_*, per-channel a, b, gamma, beta) of branch b as the backward kernels read them: the batch
    statistics with the optional affine, or the folded (scale, shift)."""
    if batch_stats[b]:
        return K.NORM_BATCH, mean[b], var[b], scale[b], shift[b]
    if scale[b] is not None or shift[b] is not None:
        return K.NORM_AFFINE, scale[b], shift[b], None, None
    return K.NORM_NONE, None, None, None, None


def backward(grad_out, x, weight, scale, shift, level, pre, mean, var, batch_stats, eps, factor, bins, down_mode,
             up_mode, align_corners, activation, input_position, output_mask):
    N, C, H, W = x.shape
    fmt = _fmt(x)
    dev, dt = x.device, x.dtype
    acc_dt = _acc_dtype(dt)
    f64 = acc_dt == torch.float64
    act = _ACT[activation]
    offsets, x_off, c_out = _offsets(weight, C, input_position)
    check_index_limit(x, c_out, [("grad_out", grad_out)])
    empty = lambda: torch.empty((0,), dtype=dt, device=dev)  # noqa: E731  (results must not alias)
    nb = len(weight)
    grad_w, grad_b, grad_scale, grad_shift = [empty() for _ in range(nb)], [None] * nb, [None] * nb, [None] * nb
    slots, block_p = [], _block_p()
    for chunk in [range(i, min(i + K.MAX_SLOTS, nb)) for i in range(0, nb, K.MAX_SLOTS)]:
        block_c = max(_block_c(weight[b].shape[0], f64) for b in chunk)
        # 1. every up-resize adjoint with the activation's and norm's backward -> gy, per-tile partials
        #    (without batch statistics gy is already the conv output's gradient, in x's dtype); adjoints
        #    over more than SPLIT_STEPS taps (small levels of large maps) gather in chunks of taps first,
        #    their partial sums stacked along the rows of one buffer, summed in chunk order by a second launch
        adj, gys, parts, chunked = [], {}, {}, []
        for b in chunk:
            co = weight[b].shape[0]
            h, wd = _level(factor[b], bins, b, H, W)
            total = N * h * wd
            norm, a_t, b_t, g_t, be_t = _norm_of(b, batch_stats, scale, shift, mean, var)
            final = norm != K.NORM_BATCH
            gys[b] = _empty((total, co), dtype=dt if final else acc_dt, device=dev)
            g = grad_out[:, offsets[b]:offsets[b] + co]
            ty, tx = _up_taps(up_mode, h, wd, H, W, align_corners, dt, dev)
            given = lambda t: gys[b] if t is None else t  # noqa: E731  (an absent tensor is never read)
            tail = dict(a=given(a_t), b=given(b_t), eps=float(eps[b]), ga=given(g_t), be=given(be_t))
            # the norm's multiplier and offset are scale / shift: folded, or the batch norm's gamma / beta
            flags = K.AdjointFlags(NORM=norm, HAS_GAMMA=scale[b] is not None, HAS_BETA=shift[b] is not None,
                                   FINAL=final, **_run_tile(tx.adj_typical, wd, block_c, wd == W))
            assert tx.adj_run, "up_adjoints_kernel reads each level column's readers as a run"
            steps = cdiv(tx.adj_taps, flags.TAPS)  # tap vectors per reader row, at most
            rows = max(1, ADJOINT_STEPS // steps)  # reader rows per chunk
            ytaps = (ty.adj_idx, ty.adj_w, ty.adj_taps, ty.adj_count)
            if ty.adj_taps <= rows or not total:
                adj.append((b, g, pre[b], ytaps, ty.adj_taps, tx, tail, flags, 1))
            else:
                chunked.append((b, g, ytaps, rows, tx, tail, flags, cdiv(ty.adj_taps, rows)))
        if chunked:
            buf = _empty((N, max(weight[b].shape[0] for b, *_ in chunked),
                          sum(k * _level(factor[b], bins, b, H, W)[0] for b, *_, k in chunked),
                          max(_level(factor[b], bins, b, H, W)[1] for b, *_ in chunked)), dtype=acc_dt, device=dev)
            first, finish = 0, []
            for b, g, ytaps, rows, tx, tail, flags, k in chunked:
                co = weight[b].shape[0]
                h, wd = _level(factor[b], bins, b, H, W)
                stack = buf[:, :co, first:first + k * h, :wd]
                adj.append((b, g, stack, ytaps, rows, tx, tail, dataclasses.replace(flags, PARTIAL=True), k))
                sums = stacked_taps(h, k, 0, dt, dev)  # level row y: the chunks' rows i * h + y, i < k
                ident = axis_taps("identity", wd, wd, 0, False, dt, dev)
                finish.append((b, stack, pre[b], (sums.idx, sums.w, sums.taps, sums.count), k, ident, tail,
                               dataclasses.replace(flags, **_run_tile(1, wd, block_c, True)), 1))
                first += k * h
        for launch_slots in ([adj, finish] if chunked else [adj]):
            slot_args, ends = [], [0]
            for b, g, p, (yi, yw, ytaps_n, yc), rows, tx, tail, flags, k in launch_slots:
                co = weight[b].shape[0]
                h, wd = _level(factor[b], bins, b, H, W)
                tiles = N * h * cdiv(wd, flags.BLOCK_X)
                if not flags.PARTIAL:  # per tile: sum gy | sum gy * u; an empty level launches nothing, sums 0
                    parts[b] = (_empty if tiles else torch.zeros)((max(tiles, 1), 2 * co), dtype=acc_dt, device=dev)
                slot_args.append((dict(**strided("g", g), **strided("p", p), gy=gys[b], pt=parts.get(b, gys[b]), C=co,
                                       h=h, w=wd, y=yi, yw=yw, Y=ytaps_n, yc=yc, R=rows,
                                       xt=tx.adj_idx, xw=tx.adj_w, X=tx.adj_taps, xc=tx.adj_count, **tail), flags))
                ends.append(ends[-1] + k * tiles * cdiv(co, block_c))
            if ends[-1] > 0:
                flat, consts = K.UP_ADJOINTS.pack(slot_args, ends)
                _launch(_pinned(K.up_adjoints_kernel), (ends[-1],), N, *flat, **consts, ACT=act, F64=f64,
                        BLOCK_C=block_c)
        # 2. the partials' column sums, each in a fixed order, in one launch
        sums = {b: _empty((parts[b].shape[1],), dtype=acc_dt, device=dev) for b in chunk}
        _column_sums([(parts[b], sums[b]) for b in chunk])
        # 3. parameter gradients of the norm and the bias (dbias is exactly 0 before batch statistics);
        #    copies, as an operator's outputs must not share storage (sums holds both, dbias may be sum_gy)
        for b in chunk:
            co = weight[b].shape[0]
            sum_gy, sum_gyu = sums[b][:co], sums[b][co:]
            grad_shift[b] = sum_gy.to(shift[b].dtype, copy=True) if shift[b] is not None else empty()
            grad_scale[b] = sum_gyu.to(scale[b].dtype, copy=True) if scale[b] is not None else empty()
            if batch_stats[b]:
                dbias = torch.zeros((co,), dtype=acc_dt, device=dev)
            elif scale[b] is not None:
                dbias = sum_gy * scale[b].to(acc_dt)
            else:
                dbias = sum_gy
            grad_b[b] = dbias.to(dt)
        # 4. with batch statistics, the conv outputs' gradients now that the sums are known
        dpres, dp_slots, dp_ends = {}, [], [0]
        for b in chunk:
            if not batch_stats[b]:
                dpres[b] = gys[b]
                continue
            co = weight[b].shape[0]
            h, wd = _level(factor[b], bins, b, H, W)
            dpres[b] = _empty((N * h * wd, co), dtype=dt, device=dev)
            p = pre[b]
            dp_slots.append((dict(gy=gys[b], **strided("p", p), d=dpres[b], C=co, h=h, w=wd, m=mean[b], v=var[b],
                                  eps=float(eps[b]), ga=scale[b] if scale[b] is not None else p, s=sums[b]),
                             K.DpreFlags(HAS_GAMMA=scale[b] is not None)))
            dp_ends.append(dp_ends[-1] + cdiv(N * h * wd, block_p) * cdiv(co, block_c))
        if dp_ends[-1] > 0:
            flat, consts = K.DPRES.pack(dp_slots, dp_ends)
            _launch(_pinned(K.dpres_kernel), (dp_ends[-1],), N, *flat, **consts, BLOCK_P=block_p, BLOCK_C=block_c)
        # 5. per branch: the weight gradient (split over pixel ranges where long: their partials summed by
        #    one launch for the chunk) and the level gradient (the convolution with flipped weights)
        dwks, pending = {}, []
        for b in chunk:
            w = weight[b]
            co, _, k, _ = w.shape
            h, wd = _level(factor[b], bins, b, H, W)
            dpre = dpres[b]
            if output_mask[1]:
                src = x if factor[b] == 1 else level[b]
                dwks[b], partials = _wgrad(src, dpre, k, co, acc_dt)
                pending += [partials] if partials is not None else []
            if output_mask[0]:
                dpre4 = dpre.view(N, h, wd, co).permute(0, 3, 1, 2)
                wt = _pack_weight(w.flip(2, 3).transpose(0, 1))
                dlev = _empty((N, h, wd, C), dtype=acc_dt, device=dev).permute(0, 3, 1, 2)
                _conv(dpre4, wt, k, C, None, dlev, None)
                slots.append((dlev, _down_taps(factor[b], down_mode, H, W, h, wd, align_corners, dt, dev)))
        _column_sums(pending)
        for b, dwk in dwks.items():
            co, _, k, _ = weight[b].shape
            gw = dwk.reshape(k, k, C, co).permute(3, 2, 0, 1).to(weight[b].dtype)
            grad_w[b] = gw.contiguous(memory_format=_fmt(weight[b]))
    grad_x = empty()
    if output_mask[0]:
        grad_x = _dx(grad_out, x, x_off, slots, fmt, acc_dt)
    return grad_x, grad_w, grad_b, grad_scale, grad_shift


@cost_model(K.up_adjoints_kernel)
def _up_adjoints_cost(a):
    """Plan model (estimates): per branch slot a (BLOCK_C channels, BLOCK_X level columns of a row, TAPS readers)
    tile per program, looping over a chunk of R of the adjoint's reader rows times its tap vectors; PARTIAL
    slots store their partial sums only."""
    N, bc = a["N"], a["BLOCK_C"]
    parts = []
    for sl in K.UP_ADJOINTS.slots(a):
        g, co, px, partial = sl["g"], sl["C"], N * sl["h"] * sl["w"], sl["PARTIAL"]
        chunks = cdiv(sl["Y"], sl["R"])
        written = nbytes(sl["p"], chunks * px * co) if partial else nbytes(sl["gy"]) + nbytes(sl["pt"])
        read = nbytes(g, N * co * g.shape[2] * g.shape[3]) + (0 if partial else nbytes(sl["p"], px * co))
        lanes = min(bc, co) * min(sl["BLOCK_X"], sl["w"]) * min(sl["TAPS"], sl["X"])
        parts.append(Part(f"up adjoint {sl['h']}x{sl['w']}" + (f" in {chunks} chunks" if partial else ""),
                          sl["end"] - sl["start"], lanes, min(sl["R"], sl["Y"]) * cdiv(sl["X"], sl["TAPS"]), read,
                          written))
    return parts


@cost_model(K.column_sums_kernel)
def _column_sums_cost(a):
    """Plan model (estimates): per slot BLOCK_C columns of a chunk of R rows per program, a loop over the rows
    BLOCK_R at a time."""
    parts = []
    for sl in K.COLUMN_SUMS.slots(a):
        T, C, R = sl["T"], sl["C"], sl["R"]
        parts.append(Part("column sums" + (f" in {cdiv(T, R)} chunks" if R < T else ""), sl["end"] - sl["start"],
                          min(a["BLOCK_C"], C) * min(a["BLOCK_R"], T), cdiv(min(R, T), a["BLOCK_R"]),
                          nbytes(sl["pt"], T * C), nbytes(sl["o"], cdiv(T, R) * C)))
    return parts


@cost_model(K.dpres_kernel)
def _dpres_cost(a):
    """Plan model (estimates): per branch slot an elementwise (BLOCK_P, BLOCK_C) tile per program."""
    N, bp, bc = a["N"], a["BLOCK_P"], a["BLOCK_C"]
    parts = []
    for sl in K.DPRES.slots(a):
        co, px = sl["C"], N * sl["h"] * sl["w"]
        parts.append(Part("conv-output gradient", sl["end"] - sl["start"], min(bp, px) * min(bc, co), 1,
                          nbytes(sl["gy"]) + nbytes(sl["p"]), nbytes(sl["d"])))
    return parts


def _dx(grad_out, x, x_off, slots, fmt, acc_dt):
    N, C, H, W = x.shape
    dx = _empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    if dx.numel() == 0:
        return dx
    g = grad_out[:, x_off:x_off + C] if x_off >= 0 else None
    block_c, block_p = _block_c(C), _block_p()
    grid = (N * cdiv(H * W, block_p), cdiv(C, block_c))  # (a program's pixels in one plane)
    chunks = [slots[i:i + K.MAX_SLOTS] for i in range(0, len(slots), K.MAX_SLOTS)] or [[]]
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        dst = dx if last else _empty(x.shape, dtype=acc_dt, device=x.device, memory_format=fmt)
        args = [(dict(**strided("l", lev), yi=ty.adj_idx, yw=ty.adj_w, Y=ty.adj_taps, xi=tx.adj_idx, xw=tx.adj_w,
                      X=tx.adj_taps), K.NoFlags()) for lev, (ty, tx) in chunk]
        filler = dict(l=dst, l_n=0, l_c=0, l_h=0, l_w=0, yi=dst, yw=dst, Y=0, xi=dst, xw=dst, X=0)  # unused slots
        flat, consts = K.DX.pack(args, filler=filler)
        gt = g if g is not None else dst
        assert _dense_rows(dst), dst.stride()
        _launch(_pinned(K.dx_kernel), grid, dst, *_strides(dst), N, C, H, W, gt, *_strides(gt), *flat, **consts,
                HAS_G=g is not None, G_FLAT=_dense_rows(gt), F64=acc_dt == torch.float64, BLOCK_P=block_p,
                BLOCK_C=block_c)
        g = dst
    return dx


@cost_model(K.dx_kernel)
def _dx_cost(a):
    """Plan model (estimates): a (BLOCK_P pixels of one plane, BLOCK_C channels) tile of dx per program, each
    level's adjoint taps in turn."""
    N, C, H, W, bp, bc, dx = a["N"], a["C"], a["H"], a["W"], a["BLOCK_P"], a["BLOCK_C"], a["dx"]
    px = N * H * W
    slots = K.DX.slots(a)
    serial = max([sl["Y"] * sl["X"] for sl in slots], default=1)
    read = sum(nbytes(sl["l"]) for sl in slots) + (nbytes(a["g"], px * C) if a["HAS_G"] else 0)
    return [Part("dx", N * cdiv(H * W, bp) * cdiv(C, bc), min(bp, H * W) * min(bc, C), serial, read,
                 nbytes(dx, px * C))]


# ---------------------------------------------------------------------------------------------------
# Inference: no saved tensors, the branch's whole chain in one launch (tile_kernel).
# ---------------------------------------------------------------------------------------------------


def _block_kind(dtype: torch.dtype) -> str:
    """Which autotune list block_kernel uses for x of ``dtype``: 'f64', 'f32' or 'half'."""
    return {torch.float64: "f64", torch.float32: "f32"}.get(dtype, "half")


def _block_configs(kind: str) -> List[triton.Config]:
    """Tile shapes of block_kernel: level tile RH x RW, output channels and input channels per step. Every
    one compiles for sm_90 without spilling registers (ptxas -v, tests/test_triton_compile.py): float32
    operands take 16 input channels per step (the unrolled down-resize gathers hold several (RH * RW,
    BLOCK_K) tiles at once), no software pipelining (num_stages=1: with 2, 8 x 8 tiles spill 44 bytes
    when the strides carry no 16-divisibility) and 8 warps on 8 x 8 tiles (4 spilled 24 bytes)."""
    if interpreting():
        return [triton.Config({"RH": 16, "RW": 16, "BLOCK_N": 16 if kind == "f64" else 32,
                               "BLOCK_K": 16 if kind == "f64" else 32})]
    if kind == "f64":  # multiply-and-sum: a 3-D product in registers, so small tiles
        return [_config({"RH": rh, "RW": rw, "BLOCK_N": 16, "BLOCK_K": 8}, num_warps=4)
                for rh, rw in ((4, 8), (8, 8))]
    f32 = kind == "f32"
    return [_config({"RH": rh, "RW": rw, "BLOCK_N": bn, "BLOCK_K": 16 if f32 else bk},
                          num_warps=8 if f32 and rh * rw == 64 else wp, num_stages=1 if f32 else st)
            for rh, rw, bn, bk, wp, st in ((8, 8, 64, 32, 4, 2), (8, 16, 64, 32, 4, 2), (16, 16, 64, 32, 8, 2),
                                           (8, 16, 128, 32, 8, 2), (16, 16, 32, 32, 8, 2), (4, 16, 64, 64, 4, 2))]


_BLOCK_KEY = ["N", "C", "H", "W"] + K.BLOCK.per_slot("h", "w", "CO", "KS", "HALO", "DY", "DX", "UY", "UX") + \
    ["SLOTS", "DOT"]
block_tuned = {kind: _autotune(configs=_block_configs(kind), key=_BLOCK_KEY)(K.block_kernel)
               for kind in ("f64", "f32", "half")}


def _tile_programs(N: int, h: int, w: int, co: int, halo: int, cfg: dict) -> int:
    """block_kernel's program count for one branch (K._tile_programs, on the host)."""
    return N * cdiv(h, cfg["RH"] - halo) * cdiv(w, cfg["RW"] - halo) * cdiv(co, cfg["BLOCK_N"])


def _tile_slot(src, down, wk, ks, co, bias, scale, shift, out, c0, up, direct):
    """One branch's arguments of block_kernel (it writes channels [c0, c0 + co) of ``out``; its scratch, scr
    and so, are the caller's), its flags and its sizes (h, w, co, halo, direct)."""
    (dy, dx), (uy, ux) = down, up
    h, w = dy.idx.shape[0], dx.idx.shape[0]
    halo = 0 if direct else max(0, max(uy.taps, ux.taps) - 1)
    rows, cols = (dy.idx, dy.idx) if direct else (uy.first, ux.first)  # (direct: unused)
    given = lambda t: wk if t is None else t  # noqa: E731  (an absent tensor is never read)
    args = dict(**strided("l", src), dy=dy.idx, dyw=dy.w, dx=dx.idx, dxw=dx.w, wk=wk, b=given(bias), sc=given(scale),
                sh=given(shift), out=out, q_n=out.stride(0), q_c=out.stride(1), q_h=out.stride(2), q_w=out.stride(3),
                oc=c0, uy=uy.idx, uyw=uy.w, ux=ux.idx, uxw=ux.w, fr=rows, fc=cols, h=h, w=w, CO=co, KS=ks, HALO=halo)
    flags = K.TileFlags(HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
                        DIRECT=direct, DY=dy.taps, DX=dx.taps, UY=uy.taps, UX=ux.taps)
    return args, flags, (h, w, co, halo, direct)


#: Output pixels per step of block_kernel's up-resize loop (each a gather of the tile's taps and a store of
#: BLOCK_N channels): the most that compile without spilling for sm_90 in every variant (64 spilled 24 bytes
#: in float32); it was 16, four times the serial steps per tile.
BLOCK_Q = 32

#: Blocks whose branches write at least this many output elements run the inference as the training forward
#: does without batch statistics (below).
SPLIT_OUTPUTS = 1 << 22


def inference(x, weight, bias, scale, shift, factor, bins, down_mode, up_mode, align_corners, activation,
              input_position):
    """The block's output only (norms folded or absent; nothing saved for backward). Launches, for up to
    four branches: one (factor pyramids: the copy of x and every branch from x), or two with bins (x
    pooled to every bin level and copied; then every branch from its level). Every further four
    branches add one launch (two with bins).

    Large blocks (their branches' outputs SPLIT_OUTPUTS elements or more) instead run the training forward's
    launches with the folded norms (the levels, convolutions at the levels with their epilogue, up-resize:
    three). block_kernel's program for a bin level's tile, the whole level, convolves it and then writes the
    whole map for its channels in a serial loop (the H200: 622 us for ``psp_mmseg`` against a ~60 us bytes
    floor, 256 programs), where the up-resize pass spreads the map over every program; for a factor level it
    recomputes the level's pixels from ``x`` at every tap of the convolution and up-resizes through a scratch
    tile: on the H200 block_kernel took 1002 / 856 / 1617 us on ``pyramid_seed`` / ``pyramid_wide`` /
    ``stem_pyramid``, where the training forward's three launches took 424 / 211 / 1160 us for the same
    shapes. Small blocks keep the launch fewer (host time bounds them)."""
    N, C, H, W = x.shape
    if N * sum(w.shape[0] for w in weight) * H * W >= SPLIT_OUTPUTS:
        B = len(weight)
        return forward(x, weight, bias, scale, shift, [False] * B, [0.0] * B, factor, bins, down_mode, up_mode,
                       align_corners, activation, input_position, save=False)[0]
    fmt = _fmt(x)
    dev, dt = x.device, x.dtype
    offsets, x_off, c_out = _offsets(weight, C, input_position)
    check_index_limit(x, c_out)
    out = _empty((N, c_out, H, W), dtype=dt, device=dev, memory_format=fmt)
    if out.numel() == 0:
        return out
    act = _ACT[activation]
    f64 = dt == torch.float64
    block_p, block_c = _block_p(), _block_c(C)
    copy_programs = cdiv(N * H * W, block_p) * cdiv(C, block_c)
    B = len(weight)
    for first in range(0, B, K.MAX_SLOTS):
        chunk = list(range(first, min(B, first + K.MAX_SLOTS)))
        copy_here = first == 0 and x_off >= 0
        sources, downs = {}, {}
        pooled = [b for b in chunk if factor[b] == 0]
        if pooled:  # bins: pool x to every level in one launch (adaptive windows are too wide to redo per tap)
            made = _launch_levels(x, out, max(x_off, 0), copy_here, pooled, factor, bins, down_mode, align_corners,
                                  combine=False)
            sources = {b: src for b, (src, _) in made.items()}
            downs = {b: taps for b, (_, taps) in made.items()}
            copy_here = False
        slots = []
        for b in chunk:
            co, _, k, _ = weight[b].shape
            h, wd = _level(factor[b], bins, b, H, W)
            src = sources.get(b, x)
            down = downs.get(b) or _down_taps(factor[b], down_mode, H, W, h, wd, align_corners, dt, dev)
            up = _up_taps(up_mode, h, wd, H, W, align_corners, dt, dev)
            slots.append(_tile_slot(src, down, _packed_weight(weight[b]), k, co, bias[b], scale[b], shift[b], out,
                                    offsets[b], up, (h, wd) == (H, W)))
        # Scratch for the tiles of the up-resizing branches, enough for any tuned tile shape.
        configs = [c.kwargs for c in _block_configs(_block_kind(dt))]
        need = [max(_tile_programs(N, h, w, co, halo, c) * c["RH"] * c["RW"] * c["BLOCK_N"] for c in configs)
                if not direct else 0 for _, _, (h, w, co, halo, direct) in slots]
        scratch = _empty((max(1, sum(need)),), dtype=_acc_dtype(dt), device=dev)
        e0 = copy_programs if copy_here else 0
        for s, (args, _, _) in enumerate(slots):  # each slot's tiles from its offset into the scratch
            args.update(scr=scratch, so=sum(need[:s]))
        flat, consts = K.BLOCK.pack([(args, flags) for args, flags, _ in slots], [e0])
        sizes = [size for _, _, size in slots]
        grid = lambda meta: (e0 + sum(_tile_programs(N, h, w, co, halo, meta)  # noqa: E731
                                      for h, w, co, halo, _ in sizes),)
        _launch(block_tuned[_block_kind(dt)], grid, x, *_strides(x), out, *_strides(out), max(x_off, 0), N, C, H, W,
                *flat, **consts, ACT=act, DOT=K.DOT_FMA if f64 else _dot_mode(x), UPCAST=_upcast(x), F64=f64,
                BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_Q=block_p if interpreting() else BLOCK_Q)
    return out


@cost_model(*block_tuned.values())
def _block_cost(a):
    """Plan model (estimates): copy programs, then per branch slot one (RH x RW level pixels, BLOCK_N
    channels) tile per program: its K loop over taps x C / BLOCK_K, each step gathering the level from the
    source over DY x DX down taps (unrolled); then the up-resize loop over the tile's output pixels,
    BLOCK_Q at a time (UY x UX taps, unrolled)."""
    x, N, C, H, W = a["x"], a["N"], a["C"], a["H"], a["W"]
    rh, rw, bn, bk, bp, bc = a["RH"], a["RW"], a["BLOCK_N"], a["BLOCK_K"], a["BLOCK_P"], a["BLOCK_C"]
    parts = [Part("copy x", a["E0"], min(bp, N * H * W) * min(bc, C), 1, nbytes(x, N * C * H * W),
                  nbytes(x, N * C * H * W))]
    for sl in K.BLOCK.slots(a):
        h, w, co, ks, halo, src = sl["h"], sl["w"], sl["CO"], sl["KS"], sl["HALO"], sl["l"]
        down = sl["DY"] * sl["DX"]
        programs = _tile_programs(N, h, w, co, halo, a)
        direct = sl["DIRECT"]
        k_loop = ks * ks * cdiv(C, bk)  # (the down taps are unrolled)
        # output pixels per tile: the tile's own level pixels times the up-resize's magnification
        own = min(H, cdiv((rh - halo) * H, h)) * min(W, cdiv((rw - halo) * W, w))
        up_loop = 0 if direct else cdiv(own, a["BLOCK_Q"])  # (the up taps are unrolled)
        scratch = 0 if direct else programs * rh * rw * bn * 4
        read = nbytes(src, N * C * min(h * w * down, src.shape[2] * src.shape[3])) + nbytes(sl["wk"]) + scratch
        parts.append(Part(f"branch {h}x{w}", programs, min(rh, h) * min(rw, w) * min(bn, co), max(k_loop, up_loop),
                          read, nbytes(x, N * co * H * W) + scratch,
                          2 * programs * rh * rw * bn * ks * ks * cdiv(C, bk) * bk))
    return parts
