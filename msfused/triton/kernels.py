"""Triton kernels of the multi-scale block (launched from ``launch.py``).

Every tensor is addressed through its four strides, so NCHW and channels_last inputs run the same code.
Accumulation is float32 (float64 for float64 tensors, ``F64``). Offsets are int32: the launchers refuse
tensors of 2**31 elements or more up front.

Kernels (each branch-specific part is a ``_*_program`` / ``_*_slot`` function, called from the launch that
runs it):

* ``levels_kernel``: ``x`` copied into its slice of the output and brought to up to four levels (the
  separable gather ``dst = sum w_y * w_x * src`` over tap tables, ``tables.py``); long pooling windows
  in chunks whose partial sums a later gather adds in a fixed order.
* ``pool_kernel``: ``x`` read once, coalesced, and pooled to up to four bin levels at once (each program a
  (cells, pixels) 0/1 window mask times a (pixels, channels) tile of ``x`` on ``tl.dot``), copied into its
  slice of the output on the way; long maps in pixel chunks whose partials a later gather adds in order.
* ``block_kernel``: the inference forward of up to four branches and the copy of ``x`` in one launch; each
  branch's programs (``_tile_program``) compute a tile of the level from its source inside the
  convolution's operand load, convolve (implicit GEMM on ``tl.dot``; float64 multiplies and sums),
  apply bias, folded norm and activation, and write the up-resized tile into the branch's slice.
* ``convs_kernel``: the training forward's convolutions of up to four branches (``_conv_program``): the
  conv output stored, the epilogue stored where no batch statistics are needed, per-tile statistics
  where they are. ``conv_kernel`` is the same for one branch (the backward's level gradient, with
  flipped weights).
* ``stats_combine_kernel``: batch mean and biased variance per channel from the per-tile (count, mean,
  M2), combined in tile order (Chan et al.): deterministic; a non-finite mean as ATen's sum / count. Also the
  projection's batch statistics (``projection.py``).
* ``ups_kernel``: the training forward's up-resizes of up to four branches (and, before them, the norm with
  batch statistics and the activation at the levels, the same kernel with identity taps).
* ``up_adjoints_kernel``: for up to four branches, the backward of the up-resize as a gather, fused with
  the activation's backward and, without batch statistics, the norm's (it then writes the conv output's
  gradient); per-tile partial sums for the norm's gradients.
* ``column_sums_kernel``: fixed-order sums of those per-tile partials (and of the weight gradients'
  partials), up to four branches.
* ``dpres_kernel``: the conv outputs' gradients through norms with batch statistics, up to four branches.
* ``wgrad_kernel``: weight gradients, each program reducing one range of pixels in a fixed order (the
  ranges' partials summed by ``column_sums_kernel``).
* ``dx_kernel``: the gradient of ``x`` written once: the output gradient's ``x`` slice plus, for up to
  ``MAX_SLOTS`` branches, the down-resize adjoint (gather) of each level's gradient.

Branches of different shapes share a launch through argument "slots" (the program id picks the slot):
each slotted kernel is described once (``Slotted``, ``slots.py``: its shared and named per-slot arguments,
a dataclass of per-slot compile-time values shared with the launcher, and the call of one slot's
program), and generated from that description with each slot's arguments unrolled.
"""

from __future__ import annotations

import dataclasses
import os

import triton
import triton.language as tl

from .slots import MAX_SLOTS, NoFlags, Slotted  # noqa: F401  (MAX_SLOTS, NoFlags: the launchers read them here)

# Triton's interpreter (3.6) converts to bfloat16 by truncation, not by rounding to nearest even as the
# GPU (and torch) do; under it, _cast rounds first. Read as Triton reads it when defining the kernels.
INTERPRETER = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))

# Activation codes shared with launch.py.
ACT_NONE, ACT_RELU, ACT_SILU, ACT_GELU = 0, 1, 2, 3
# Per-channel transform applied to a conv output before the activation.
NORM_NONE, NORM_AFFINE, NORM_BATCH = 0, 1, 2
# How conv_kernel multiplies: multiply-and-sum (float64), tl.dot on half operands, on float32 operands
# with IEEE precision or with TF32; pool_kernel also in three TF32 products (about float32's accuracy).
DOT_FMA, DOT_HALF, DOT_IEEE, DOT_TF32, DOT_TF32X3 = 0, 1, 2, 3, 4


@triton.jit
def _cast(v, dtype: tl.constexpr):
    """v.to(dtype), rounding to nearest even (also under the interpreter, see INTERPRETER)."""
    if INTERPRETER:
        if dtype == tl.bfloat16:
            bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _activate(y, ACT: tl.constexpr):
    if ACT == 1:  # relu; NaN stays NaN as in F.relu
        y = tl.where(y < 0, 0.0, y)
    elif ACT == 2:  # silu
        y = y / (1.0 + tl.exp(-y))
    elif ACT == 3:  # gelu, exact erf form
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    return y


@triton.jit
def _activate_grad(g, y, ACT: tl.constexpr):
    """d act(y) / dy * g, with y the activation's input."""
    if ACT == 1:
        g = tl.where(y <= 0, 0.0, g)
    elif ACT == 2:
        s = 1.0 / (1.0 + tl.exp(-y))
        g = g * s * (1.0 + y * (1.0 - s))
    elif ACT == 3:
        cdf = 0.5 * (1.0 + tl.math.erf(y * 0.7071067811865476))
        pdf = tl.exp(-0.5 * y * y) * 0.3989422804014327
        g = g * (cdf + y * pdf)
    return g


@triton.jit
def _zeros(BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, F64: tl.constexpr):
    if F64:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    return acc


@triton.jit
def _plane_pixels(tile, H, W, BLOCK_P: tl.constexpr):
    """Program ``tile``'s pixels, BLOCK_P consecutive ones of one plane (tiles of a plane, plane by plane): the
    plane n, the pixels' flat indices q (h * W + w, so that an address linear in q coalesces), their mask,
    rows and columns."""
    blocks = tl.cdiv(H * W, BLOCK_P)
    n = tile // blocks
    q = (tile % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    return n, q, q < H * W, q // W, q % W


@triton.jit
def _rstd(var, eps):
    """1 / sqrt(var + eps) in var's dtype. ``eps`` arrives as a float64 scalar (the kernels annotate it
    ``tl.float64``: Triton passes a Python float as float32, and a float64 norm would then add a rounded eps,
    ~1e-10 off at a small variance); the sum is formed in float64 and rounded once to var's dtype. (Under the
    interpreter eps stays a Python float, which joins var in var's dtype.)"""
    return 1.0 / tl.sqrt((var + eps).to(var.dtype))


@triton.jit
def _channel_affine(c, cm, a_ptr, b_ptr, eps, gamma, beta, NORM: tl.constexpr, HAS_GAMMA: tl.constexpr,
                    HAS_BETA: tl.constexpr, F64: tl.constexpr):
    """Per-channel (mul, add) of the norm: NORM_AFFINE reads them (scale, shift); NORM_BATCH derives
    them from (mean, var) and the optional affine (gamma, beta)."""
    one = tl.full(c.shape, 1.0, tl.float64 if F64 else tl.float32)
    mul = one
    add = one * 0.0
    if NORM == 1:
        if HAS_GAMMA:
            mul = tl.load(a_ptr + c, mask=cm, other=1.0).to(one.dtype)
        if HAS_BETA:
            add = tl.load(b_ptr + c, mask=cm, other=0.0).to(one.dtype)
    elif NORM == 2:
        mean = tl.load(a_ptr + c, mask=cm, other=0.0).to(one.dtype)
        var = tl.load(b_ptr + c, mask=cm, other=1.0).to(one.dtype)
        rstd = _rstd(var, eps)
        g = one
        if HAS_GAMMA:
            g = tl.load(gamma + c, mask=cm, other=1.0).to(one.dtype)
        mul = rstd * g
        add = -mean * mul
        if HAS_BETA:
            add = add + tl.load(beta + c, mask=cm, other=0.0).to(one.dtype)
    return mul, add


@triton.jit
def _gather(acc, src, s_n, s_c, s_h, s_w, n, oy, ox, c, pm, cm, ty_idx, ty_w, TY, tx_idx, tx_w, TX,
            mul, add, NORM: tl.constexpr, ACT: tl.constexpr, ty0, ty1):
    """acc += sum over taps of w_y * w_x * act(mul * src + add) at destination pixels (n, oy, ox), over
    the y taps [ty0, ty1) of the table's TY (0, TY: all of them)."""
    col = c[None, :] * s_c
    for ty in range(ty0, ty1):
        iy = tl.load(ty_idx + oy * TY + ty, mask=pm, other=-1)
        wy = tl.load(ty_w + oy * TY + ty, mask=pm, other=0.0).to(acc.dtype)
        row_y = n * s_n + iy * s_h
        ok_y = pm & (iy >= 0)
        for tx in range(TX):
            ix = tl.load(tx_idx + ox * TX + tx, mask=pm, other=-1)
            wx = tl.load(tx_w + ox * TX + tx, mask=pm, other=0.0)
            m2 = (ok_y & (ix >= 0))[:, None] & cm[None, :]
            v = tl.load(src + (row_y + ix * s_w)[:, None] + col, mask=m2, other=0.0).to(acc.dtype)
            if NORM != 0:  # masked lanes hold 0, which the norm's shift would move
                v = tl.where(m2, _activate(v * mul[None, :] + add[None, :], ACT), 0.0)
            else:  # act(0) == 0 and padding taps weigh 0
                v = _activate(v, ACT)
            acc += (wy * wx)[:, None] * v
    return acc


@triton.jit
def conv_kernel(src, s_n, s_c, s_h, s_w, wk, bias, pre, p_n, p_c, p_h, p_w, out, o_n, o_c, o_h, o_w,
                scale, shift, N, C, H, W, CO, KS,
                HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, STORE_OUT: tl.constexpr,
                HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr, DOT: tl.constexpr,
                UPCAST: tl.constexpr, F64: tl.constexpr, TAPS_IN_K: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """pre = conv2d(src, weight, bias, padding=KS // 2) on an (N, C, H, W) map, weight packed as
    wk[(ky * KS + kx) * C + c, co]; out = act(pre * scale + shift). One branch per launch (the backward's
    level gradient: the convolution with flipped weights)."""
    _conv_program(tl.program_id(0), tl.program_id(1), src, s_n, s_c, s_h, s_w, wk, bias, pre, p_n, p_c, p_h, p_w,
                  out, o_n, o_c, o_h, o_w, scale, shift, pre, pre, N, C, H, W, CO, KS, HAS_BIAS, STORE_PRE,
                  STORE_OUT, HAS_SCALE, HAS_SHIFT, False, ACT, DOT, UPCAST, F64, TAPS_IN_K, BLOCK_M, BLOCK_N,
                  BLOCK_K)


@triton.jit
def _store_tile_moments(v, m2, count, row_mean, row_m2, c, cm):
    """A tile's per-channel (mean, M2) of v (pixels x channels, valid where m2; count valid pixels) stored at
    row_mean[c], row_m2[c]: the per-tile partials stats_combine_kernel combines."""
    u = tl.where(m2, v, 0.0)
    mean = tl.sum(u, axis=0) / count.to(u.dtype)
    d = tl.where(m2, u - mean[None, :], 0.0)
    tl.store(row_mean + c, mean, mask=cm)
    tl.store(row_m2 + c, tl.sum(d * d, axis=0), mask=cm)


@triton.jit
def stats_combine_kernel(part_mean, part_m2, T, total, C, mean_out, var_out,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Combines the tiles' (count, mean, M2) in tile order: batch mean and biased variance. Where a channel's
    combined (Chan et al.) mean is not finite (a one-signed Inf turns it into NaN: Inf - Inf), the mean is the
    tiles' sum / count instead, as ATen's batch norm (sum / count) and the CPU backend take it: a one-signed
    Inf stays Inf, NaN stays NaN."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    mean = tl.zeros([BLOCK_C], dtype=mean_out.dtype.element_ty)
    m2 = tl.zeros([BLOCK_C], dtype=mean_out.dtype.element_ty)
    count = tl.zeros([BLOCK_C], dtype=mean_out.dtype.element_ty)
    total_sum = tl.zeros([BLOCK_C], dtype=mean_out.dtype.element_ty)
    for t in range(T):
        nb = tl.minimum(total - t * BLOCK_P, BLOCK_P).to(mean.dtype)
        mb = tl.load(part_mean + t * C + c, mask=cm, other=0.0)
        m2b = tl.load(part_m2 + t * C + c, mask=cm, other=0.0)
        n_new = count + nb
        delta = mb - mean
        mean = mean + delta * (nb / n_new)
        m2 = m2 + m2b + delta * delta * (count * nb / n_new)
        count = n_new
        total_sum = total_sum + mb * nb
    mean = tl.where(tl.abs(mean) < float("inf"), mean, total_sum / count)
    tl.store(mean_out + c, mean, mask=cm)
    tl.store(var_out + c, m2 / count, mask=cm)


@triton.jit
def _run_gather(src, s_n, s_h, s_w, chan, cm, dy, dx, HS, WS, n, y, r0, r1, ty_idx, ty_w, TY, x0, W, tx_idx, tx_w,
                TX, tx_cnt, SHIFT: tl.constexpr, X_IDENTITY: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_X: tl.constexpr, TAPS: tl.constexpr, F64: tl.constexpr):
    """(BLOCK_C channels, BLOCK_X columns x0 + i of a W-wide row y): the gather of src (plane n, channel offsets
    ``chan``, valid where cm) over reader rows r0 <= r < r1 of table row y (ty_idx[y, r], weight ty_w) and each
    column's run of readers (from tx_idx[x, 0], tx_cnt[x] of them, weights tx_w; X_IDENTITY: the column itself)
    of w_y * w_x * src[iy - dy, ix - dx] (SHIFT: dy, dx per channel, zero outside HS x WS; else none).
    A column's readers are read TAPS at a time as the second axis of a (channels, columns x taps) tile, the
    warp's lanes: consecutive addresses along a row in NCHW, channel vectors in channels_last. Per reader row
    the tile is summed with the row's weight; the column weights multiply once after the rows (the same
    products' sum; a zero weight still turns an Inf or NaN into NaN, as ATen's adjoint does)."""
    xt = tl.arange(0, BLOCK_X * TAPS)
    col = x0 + xt // TAPS
    colm = col < W
    if X_IDENTITY:  # (known to be the column itself: the compiler then sees a run along the lanes)
        col_first = col
    else:
        col_first = tl.load(tx_idx + col * TX, mask=colm, other=0)
    col_count = tl.load(tx_cnt + col, mask=colm, other=0)
    base = src + n * s_n + chan[:, None]
    acc = _zeros(BLOCK_C, BLOCK_X, F64)
    for j0 in range(0, tl.max(col_count, axis=0), TAPS):
        j = j0 + xt % TAPS
        jm = j < col_count
        wx = tl.load(tx_w + col * TX + j, mask=jm, other=0.0).to(acc.dtype)
        if SHIFT:
            sx = (col_first + j)[None, :] - dx[:, None]
            m2t = cm[:, None] & jm[None, :] & (sx >= 0) & (sx < WS)
        else:
            sx = (col_first + j)[None, :]
            m2t = cm[:, None] & jm[None, :]
        at = base + sx * s_w
        rows_sum = _zeros(BLOCK_C, BLOCK_X * TAPS, F64)
        for r in range(r0, r1):
            iy = tl.load(ty_idx + y * TY + r)
            wy = tl.load(ty_w + y * TY + r).to(acc.dtype)
            if SHIFT:
                sy = iy - dy
                v = tl.load(at + (sy * s_h)[:, None], mask=m2t & ((sy >= 0) & (sy < HS))[:, None], other=0.0)
            else:
                v = tl.load(at + iy * s_h, mask=m2t, other=0.0)
            rows_sum += wy * v.to(acc.dtype)
        acc += tl.sum(tl.reshape(rows_sum * wx[None, :], (BLOCK_C, BLOCK_X, TAPS)), axis=2)
    return acc


@triton.jit
def _up_adjoint_slot(t, g, g_n, g_c, g_h, g_w, pre, p_n, p_c, p_h, p_w, gy, part, N, C, H, W,
                     ty_idx, ty_w, TY, ty_cnt, R, tx_idx, tx_w, TX, tx_cnt, a_ptr, b_ptr, eps, gamma, beta,
                     NORM: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, FINAL: tl.constexpr,
                     PARTIAL: tl.constexpr, BLOCK_X: tl.constexpr, TAPS: tl.constexpr, X_IDENTITY: tl.constexpr,
                     ACT: tl.constexpr,
                     F64: tl.constexpr, BLOCK_C: tl.constexpr):
    """A branch's share of up_adjoints_kernel, program t: (tile t // channel blocks, its channel block), a tile
    being BLOCK_X consecutive level pixels of one level row y of plane n (H x W: the level's sizes).
    At each level pixel: the up-resize's adjoint (gather of the output gradient over the pixels that read
    it), times the activation's derivative: gy (stored as a (pixels, C) matrix). Per tile, in the row
    part[tile, :2C]: sum gy, then sum gy * u with u the norm's input as it multiplies its weight (pre for
    a folded norm, the normalised value with batch statistics).
    The gather: ``_run_gather`` (a level column's readers are a run of output columns).
    NORM: the norm (NORM_*), with HAS_GAMMA / HAS_BETA its multiplier and offset. FINAL: no batch
    statistics, so the norm's derivative is per channel and gy holds the conv output's gradient itself
    (gy * scale, in the convolution's dtype); with batch statistics gy stays in the accumulation dtype for
    dpres_kernel. PARTIAL: only the gather, over the y taps of chunk k of R (program t: chunk, then tile), its
    partial sums stored into rows k * H + y of ``pre`` (a long adjoint split so that the grid fills the
    GPU; a second launch sums the chunks as its gather, taps ``stacked_taps``, and finishes)."""
    nc = tl.cdiv(C, BLOCK_C)
    nx = tl.cdiv(W, BLOCK_X)
    if PARTIAL:
        per_chunk = N * H * nx * nc
        k = t // per_chunk
        t = t % per_chunk
    else:
        k = 0
    tile = t // nc
    c = (t % nc) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    x = (tile % nx) * BLOCK_X + tl.arange(0, BLOCK_X)
    xm = x < W
    y = (tile // nx) % H
    n = tile // (nx * H)
    rows = tl.minimum(tl.load(ty_cnt + y), (k + 1) * R)
    # (channels, level columns); no tap shift (dy, dx, HS, WS unread)
    acc = _run_gather(g, g_n, g_h, g_w, c * g_c, cm, c, c, 0, 0, n, y, k * R, rows, ty_idx, ty_w, TY,
                      (tile % nx) * BLOCK_X, W, tx_idx, tx_w, TX, tx_cnt, False, X_IDENTITY, BLOCK_C, BLOCK_X, TAPS,
                      F64)
    m2 = cm[:, None] & xm[None, :]
    if PARTIAL:
        tl.store(pre + n * p_n + (k * H + y) * p_h + (x * p_w)[None, :] + (c * p_c)[:, None], acc, mask=m2)
    else:
        v = tl.load(pre + n * p_n + y * p_h + (x * p_w)[None, :] + (c * p_c)[:, None], mask=m2, other=0.0)
        v = v.to(acc.dtype)
        mul, add = _channel_affine(c, cm, a_ptr, b_ptr, eps, gamma, beta, NORM, HAS_GAMMA, HAS_BETA, F64)
        z = v * mul[:, None] + add[:, None]
        d = tl.where(m2, _activate_grad(acc, z, ACT), 0.0)
        at = gy + ((n * H + y) * W + x)[None, :] * C + c[:, None]
        if FINAL:
            tl.store(at, _cast(d * mul[:, None], gy.dtype.element_ty), mask=m2)
        else:
            tl.store(at, d, mask=m2)
        if NORM == 2:
            mean = tl.load(a_ptr + c, mask=cm, other=0.0).to(acc.dtype)
            rstd = _rstd(tl.load(b_ptr + c, mask=cm, other=1.0).to(acc.dtype), eps)
            u = (v - mean[:, None]) * rstd[:, None]
        else:
            u = v
        tl.store(part + tile * 2 * C + c, tl.sum(d, axis=1), mask=cm)
        tl.store(part + tile * 2 * C + C + c, tl.sum(tl.where(m2, d * u, 0.0), axis=1), mask=cm)


@dataclasses.dataclass(frozen=True)
class NormFlags:
    """A branch's norm as a kernel slot applies it: NORM_*, with or without its multiplier and offset."""

    NORM: int = NORM_NONE
    HAS_GAMMA: bool = False
    HAS_BETA: bool = False


@dataclasses.dataclass(frozen=True)
class AdjointFlags(NormFlags):
    """up_adjoints_kernel's per-slot compile-time values (see _up_adjoint_slot): BLOCK_X level pixels of a row
    per program, TAPS readers of a level column per load; X_IDENTITY: the x axis is not resized."""

    FINAL: bool = False
    PARTIAL: bool = False
    BLOCK_X: int = 1
    TAPS: int = 1
    X_IDENTITY: bool = False


UP_ADJOINTS = Slotted(
    name="up_adjoints_kernel",
    doc="""The backward's first launch for up to four branches (slot s runs programs [E_s, E_s+1)): the
    up-resize adjoint fused with the activation's (and, without batch statistics, the norm's) backward.""",
    shared="N",
    slot="g, g_n, g_c, g_h, g_w, p, p_n, p_c, p_h, p_w, gy, pt, C, h, w, y, yw, Y, yc, R, xt, xw, X, xc, a, b, eps, "
         "ga, be",
    flags=AdjointFlags,
    constexprs="ACT, F64, BLOCK_C",
    program="""_up_adjoint_slot(t, g, g_n, g_c, g_h, g_w, p, p_n, p_c, p_h, p_w, gy, pt, N, C, h, w, y, yw, Y, yc, R,
        xt, xw, X, xc, a, b, eps, ga, be, NORM, HAS_GAMMA, HAS_BETA, FINAL, PARTIAL, BLOCK_X, TAPS, X_IDENTITY, ACT,
        F64, BLOCK_C)""",
)
up_adjoints_kernel = UP_ADJOINTS.jit(globals())


@triton.jit
def _column_sum_slot(t, part, T, C, R, out, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[k, c] = sum over the rows r of chunk k (rows [k * R, k * R + R) of T) of part[r, c], for program t's
    chunk and block of columns: BLOCK_R rows at a time into per-row-lane sums, then one tree sum over those
    lanes (a fixed order: the same bits every run). One chunk (R >= T): out[c], the columns' sums."""
    nc = tl.cdiv(C, BLOCK_C)
    k = t // nc
    c = (t % nc) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    rows = tl.arange(0, BLOCK_R)
    end = tl.minimum(T, k * R + R)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=out.dtype.element_ty)
    for r0 in range(k * R, end, BLOCK_R):
        r = r0 + rows
        acc += tl.load(part + r[:, None] * C + c[None, :], mask=(r < end)[:, None] & cm[None, :], other=0.0)
    tl.store(out + k * C + c, tl.sum(acc, axis=0), mask=cm)


COLUMN_SUMS = Slotted(
    name="column_sums_kernel",
    doc="""Fixed-order column sums of up to four (rows, columns) matrices of partials: the backward's per-tile
    partials of the norm's gradients, the weight gradients' per-pixel-range partials (slot s: programs
    [E_s, E_s+1), BLOCK_C columns of a chunk of R rows each: a long matrix's chunks, summed by a second launch).""",
    shared="",
    slot="pt, T, C, R, o",
    constexprs="BLOCK_R, BLOCK_C",
    program="_column_sum_slot(t, pt, T, C, R, o, BLOCK_R, BLOCK_C)",
)
column_sums_kernel = COLUMN_SUMS.jit(globals())


@triton.jit
def _dpre_slot(t, gy, pre, p_n, p_c, p_h, p_w, dpre, N, C, H, W, mean_ptr, var_ptr, eps, gamma, sums,
               HAS_GAMMA: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """A branch's share of dpres_kernel: the conv output's gradient (a (pixels, C) matrix) through a norm
    with batch statistics, ``gamma * rstd * (gy - mean(gy) - xhat * mean(gy * xhat))``, from the column
    sums (sum gy | sum gy * xhat) of up_adjoints_kernel's partials."""
    nc = tl.cdiv(C, BLOCK_C)
    p = (t // nc) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = (t % nc) * BLOCK_C + tl.arange(0, BLOCK_C)
    total = N * H * W
    pm = p < total
    cm = c < C
    m2 = pm[:, None] & cm[None, :]
    d = tl.load(gy + p[:, None] * C + c[None, :], mask=m2, other=0.0)
    x = p % W
    y = (p // W) % H
    n = p // (W * H)
    v = tl.load(pre + (n * p_n + y * p_h + x * p_w)[:, None] + c[None, :] * p_c, mask=m2, other=0.0)
    mean = tl.load(mean_ptr + c, mask=cm, other=0.0).to(d.dtype)
    rstd = _rstd(tl.load(var_ptr + c, mask=cm, other=1.0).to(d.dtype), eps)
    xhat = (v.to(d.dtype) - mean[None, :]) * rstd[None, :]
    g = tl.full([BLOCK_C], 1.0, d.dtype)
    if HAS_GAMMA:
        g = tl.load(gamma + c, mask=cm, other=1.0).to(d.dtype)
    ma = tl.load(sums + c, mask=cm, other=0.0) / total
    mb = tl.load(sums + C + c, mask=cm, other=0.0) / total
    d = (g * rstd)[None, :] * (d - ma[None, :] - xhat * mb[None, :])
    tl.store(dpre + p[:, None] * C + c[None, :], _cast(d, dpre.dtype.element_ty), mask=m2)


@dataclasses.dataclass(frozen=True)
class DpreFlags:
    """dpres_kernel's per-slot compile-time values: whether the norm has a multiplier (gamma)."""

    HAS_GAMMA: bool = False


DPRES = Slotted(
    name="dpres_kernel",
    doc="""The conv-output gradients of up to four branches with batch statistics (slot s: [E_s, E_s+1)).""",
    shared="N",
    slot="gy, p, p_n, p_c, p_h, p_w, d, C, h, w, m, v, eps, ga, s",
    flags=DpreFlags,
    constexprs="BLOCK_P, BLOCK_C",
    program="_dpre_slot(t, gy, p, p_n, p_c, p_h, p_w, d, N, C, h, w, m, v, eps, ga, s, HAS_GAMMA, BLOCK_P, BLOCK_C)",
)
dpres_kernel = DPRES.jit(globals())


@triton.jit
def _dot(acc, a, b, DOT: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a @ b in the multiply mode DOT (DOT_*; the operands in the dtypes that mode multiplies): float64
    multiply-and-sum, tl.dot on half-precision operands, or float32 ones in IEEE, TF32 or three-TF32 products.
    UPCAST: both operands to float32 in IEEE first (the 3.6 interpreter's tl.dot is wrong on bfloat16)."""
    if DOT == 0:  # DOT_FMA
        acc += tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
    elif UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT == 1:  # DOT_HALF
        acc = tl.dot(a, b, acc)
    elif DOT == 2:  # DOT_IEEE
        acc = tl.dot(a, b, acc, input_precision="ieee")
    elif DOT == 3:  # DOT_TF32
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:  # DOT_TF32X3
        acc = tl.dot(a, b, acc, input_precision="tf32x3")
    return acc


@triton.jit
def wgrad_kernel(src, s_n, s_c, s_h, s_w, dpre, dwk, N, C, H, W, CO, KS, SPLIT, M_SPLIT,
                 DOT: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """dwk[part, (ky * KS + kx) * C + c, co] = sum over the pixels of range ``part`` (M_SPLIT pixels from
    part * M_SPLIT) of src[c] (shifted by the tap) * dpre[co]. Grid (SPLIT x taps, C blocks, CO blocks):
    the pixel ranges split the long reduction over N * H * W so that the grid fills the GPU; each program
    sums its range in one fixed order, and the launcher sums the SPLIT partials in a fixed order too
    (deterministic, no atomics). A range's taps are neighbouring programs, which run together: the KS * KS
    reads of the range's src and dpre tiles mostly hit L2 instead of streaming the maps KS * KS times."""
    tap = tl.program_id(0) % (KS * KS)
    part = tl.program_id(0) // (KS * KS)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    co = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = c < C
    com = co < CO
    pad = KS // 2
    dy = tap // KS - pad
    dx = tap % KS - pad
    total = N * H * W
    end = tl.minimum(total, (part + 1) * M_SPLIT)
    acc = _zeros(BLOCK_C, BLOCK_N, DOT == 0)
    for m0 in range(part * M_SPLIT, end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        mm = m < end
        x = m % W
        y = (m // W) % H
        n = m // (W * H)
        iy = y + dy
        ix = x + dx
        ok = mm & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        a = tl.load(src + (n * s_n + iy * s_h + ix * s_w)[:, None] + c[None, :] * s_c,
                    mask=ok[:, None] & cm[None, :], other=0.0)
        b = tl.load(dpre + m[:, None] * CO + co[None, :], mask=mm[:, None] & com[None, :], other=0.0)
        acc = _dot(acc, tl.trans(a), b, DOT, UPCAST)
    tl.store(dwk + ((part * KS * KS + tap) * C + c)[:, None] * CO + co[None, :], _cast(acc, dwk.dtype.element_ty),
             mask=cm[:, None] & com[None, :])


DX = Slotted(
    name="dx_kernel",
    doc="""dx = g + sum over the slots of the down-resize adjoint of each level gradient l_s (gathered with
    the adjoint taps yi_s / xi_s), written once. Grid (N * pixel blocks of a plane, channel blocks): a program's
    pixels are consecutive in one plane, so dx (dense rows) and g (where G_FLAT: dense rows) are addressed
    linearly in the pixel and load and store coalesced in NCHW as in channels_last.""",
    shared="dx, d_n, d_c, d_h, d_w, N, C, H, W, g, g_n, g_c, g_h, g_w",
    slot="l, l_n, l_c, l_h, l_w, yi, yw, Y, xi, xw, X",
    constexprs="HAS_G, G_FLAT, F64, BLOCK_P, BLOCK_C",
    together=True,
    before="""
        n, q, pm, y, x = _plane_pixels(tl.program_id(0), H, W, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        m2 = pm[:, None] & cm[None, :]
        acc = _zeros(BLOCK_P, BLOCK_C, F64)
        if HAS_G:
            if G_FLAT:
                g_at = n * g_n + q * g_w
            else:
                g_at = n * g_n + y * g_h + x * g_w
            acc += tl.load(g + g_at[:, None] + c[None, :] * g_c, mask=m2, other=0.0).to(acc.dtype)
        one = acc * 0.0
    """,
    program="acc = _gather(acc, l, l_n, l_c, l_h, l_w, n, y, x, c, pm, cm, yi, yw, Y, xi, xw, X, one, one, 0, 0, 0, Y)",
    after="""
        tl.store(dx + (n * d_n + q * d_w)[:, None] + c[None, :] * d_c, _cast(acc, dx.dtype.element_ty), mask=m2)
    """,
)
dx_kernel = DX.jit(globals())


@triton.jit
def _tile_program(t, x, s_n, s_c, s_h, s_w, dy_idx, dy_w, DY: tl.constexpr, dx_idx, dx_w, DX: tl.constexpr,
                  wk, bias, scale, shift, out, o_n, o_c, o_h, o_w, out_c0, scratch, scratch_off,
                  uy_idx, uy_w, UY: tl.constexpr, ux_idx, ux_w, UX: tl.constexpr, first_row, first_col,
                  C, h, w, CO, KS, HALO,
                  HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
                  DOT: tl.constexpr, UPCAST: tl.constexpr, F64: tl.constexpr, DIRECT: tl.constexpr,
                  RH: tl.constexpr, RW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_P: tl.constexpr):
    """One branch of the inference forward in one pass, per tile of its level: the level pixels of the
    tile (RH x RW from (ty * RHO, tx * RWO), RHO = RH - HALO; RHO x RWO of them are the tile's own) are
    computed from ``x`` inside the convolution's operand load (the down-resize taps dy / dx), convolved (implicit GEMM, ``tl.dot``), passed through bias, the
    folded norm and the activation; then the output pixels whose first up-resize tap lies in the tile
    (from ``first_row`` / ``first_col``) are gathered from the tile (kept in this
    program's private ``scratch``) with the up taps uy / ux and stored into the branch's output slice.
    DIRECT: the level is the output's size (identity up-resize): the epilogue stores straight out. The
    branch's slice of ``out`` starts at channel ``out_c0``, its part of ``scratch`` at ``scratch_off``.
    ``t``: the program's index among this branch's programs (tile, then block of output channels)."""
    out += out_c0 * o_c  # the branch's channel slice of the output
    pid_n = t % tl.cdiv(CO, BLOCK_N)
    pid = t // tl.cdiv(CO, BLOCK_N)
    RHO = RH - HALO  # the level rows (columns) a tile owns; HALO more are read for a bilinear second tap
    RWO = RW - HALO
    TILES_Y = tl.cdiv(h, RHO)
    TILES_X = tl.cdiv(w, RWO)
    tx_ = pid % TILES_X
    ty_ = (pid // TILES_X) % TILES_Y
    n = pid // (TILES_X * TILES_Y)
    # A tile owns RHO x RWO level pixels and reaches RH - RHO rows (RW - RWO columns) further for the
    # second tap of a bilinear up-resize.
    ly0 = ty_ * RHO
    lx0 = tx_ * RWO
    m = tl.arange(0, RH * RW)
    ly = ly0 + m // RW
    lx = lx0 + m % RW
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    com = co < CO
    pad = KS // 2
    acc = _zeros(RH * RW, BLOCK_N, F64)
    kk = tl.arange(0, BLOCK_K)
    for tap in range(KS * KS):
        ry = ly + tap // KS - pad  # the level pixel this tap reads
        rx = lx + tap % KS - pad
        ok = (ry >= 0) & (ry < h) & (rx >= 0) & (rx < w)
        for c0 in range(0, C, BLOCK_K):
            ck = c0 + kk
            km = ck < C
            # the level value at (ry, rx): the down-resize of x, computed here; its taps unrolled (DY, DX
            # are compile-time), so their gathers are independent loads, not a chain of loop steps
            a = _zeros(RH * RW, BLOCK_K, F64)
            for a_y in tl.static_range(DY):
                iy = tl.load(dy_idx + ry * DY + a_y, mask=ok, other=-1)
                wy = tl.load(dy_w + ry * DY + a_y, mask=ok, other=0.0).to(a.dtype)
                for a_x in tl.static_range(DX):
                    ix = tl.load(dx_idx + rx * DX + a_x, mask=ok, other=-1)
                    wx = tl.load(dx_w + rx * DX + a_x, mask=ok, other=0.0)
                    mm = ((iy >= 0) & (ix >= 0))[:, None] & km[None, :]
                    v = tl.load(x + (n * s_n + iy * s_h + ix * s_w)[:, None] + ck[None, :] * s_c, mask=mm,
                                other=0.0)
                    a += (wy * wx)[:, None] * v.to(a.dtype)
            b = tl.load(wk + (tap * C + ck)[:, None] * CO + co[None, :], mask=km[:, None] & com[None, :],
                        other=0.0)
            if DOT == 1 or UPCAST:  # the level values rounded to the operand dtype, as the reference's level
                a = _cast(a, b.dtype)
            acc = _dot(acc, a, b, DOT, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias + co, mask=com, other=0.0).to(acc.dtype)[None, :]
    if HAS_SCALE:
        acc = acc * tl.load(scale + co, mask=com, other=1.0).to(acc.dtype)[None, :]
    if HAS_SHIFT:
        acc = acc + tl.load(shift + co, mask=com, other=0.0).to(acc.dtype)[None, :]
    acc = _activate(acc, ACT)
    if DIRECT:
        mm = ((ly < h) & (lx < w))[:, None] & com[None, :]
        tl.store(out + (n * o_n + ly * o_h + lx * o_w)[:, None] + co[None, :] * o_c,
                 _cast(acc, out.dtype.element_ty), mask=mm)
    else:
        # The level activation is rounded to the output dtype before the up-resize, as the reference does.
        act_t = _cast(acc, out.dtype.element_ty).to(acc.dtype)
        base = scratch + scratch_off + t * (RH * RW * BLOCK_N)
        cols = tl.arange(0, BLOCK_N)
        tl.store(base + m[:, None] * BLOCK_N + cols[None, :], act_t)
        tl.debug_barrier()  # the tile is read back below by other threads of this program
        # the output rows whose first up tap is one of the tile's own level rows: first_row[l] is the first
        # output row whose first tap is at or after level row l
        oy0 = tl.load(first_row + ty_ * RHO)
        ny = tl.load(first_row + tl.minimum((ty_ + 1) * RHO, h)) - oy0
        ox0 = tl.load(first_col + tx_ * RWO)
        nx = tl.load(first_col + tl.minimum((tx_ + 1) * RWO, w)) - ox0
        for q0 in range(0, ny * nx, BLOCK_P):
            q = q0 + tl.arange(0, BLOCK_P)
            qm = q < ny * nx
            oy = oy0 + q // nx
            ox = ox0 + q % nx
            res = _zeros(BLOCK_P, BLOCK_N, F64)
            for u_y in tl.static_range(UY):  # (unrolled: independent gathers)
                iy = tl.load(uy_idx + oy * UY + u_y, mask=qm, other=-1)
                wy = tl.load(uy_w + oy * UY + u_y, mask=qm, other=0.0).to(res.dtype)
                for u_x in tl.static_range(UX):
                    ix = tl.load(ux_idx + ox * UX + u_x, mask=qm, other=-1)
                    wx = tl.load(ux_w + ox * UX + u_x, mask=qm, other=0.0)
                    ok = (iy >= 0) & (ix >= 0)
                    at = (iy - ly0) * RW + (ix - lx0)  # the tap's pixel in the tile
                    v = tl.load(base + at[:, None] * BLOCK_N + cols[None, :], mask=ok[:, None] & com[None, :],
                                other=0.0)
                    res += (wy * wx)[:, None] * v
            tl.store(out + (n * o_n + oy * o_h + ox * o_w)[:, None] + co[None, :] * o_c,
                     _cast(res, out.dtype.element_ty), mask=qm[:, None] & com[None, :])


@triton.jit
def _copy_program(t, x, s_n, s_c, s_h, s_w, out, o_n, o_c, o_h, o_w, C, H, W, total,
                  F64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Copies a (BLOCK_P pixels, BLOCK_C channels) tile of x into x's slice of the output."""
    pid_c = t % tl.cdiv(C, BLOCK_C)
    p = (t // tl.cdiv(C, BLOCK_C)) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m2 = (p < total)[:, None] & (c < C)[None, :]
    px = p % W
    py = (p // W) % H
    n = p // (W * H)
    v = tl.load(x + (n * s_n + py * s_h + px * s_w)[:, None] + c[None, :] * s_c, mask=m2)
    tl.store(out + (n * o_n + py * o_h + px * o_w)[:, None] + c[None, :] * o_c, v, mask=m2)


@triton.jit
def _tile_programs(N, h, w, CO, HALO, RH: tl.constexpr, RW: tl.constexpr, BLOCK_N: tl.constexpr):
    """How many programs _tile_program needs for one branch with these tile shapes."""
    return N * tl.cdiv(h, RH - HALO) * tl.cdiv(w, RW - HALO) * tl.cdiv(CO, BLOCK_N)


@dataclasses.dataclass(frozen=True)
class TileFlags:
    """block_kernel's per-slot compile-time values: bias, scale and shift present; DIRECT: the level is the
    output's size (identity up-resize); the down-resize's taps per level pixel (DY x DX) and the up-resize's
    per output pixel (UY x UX), unrolled."""

    HAS_BIAS: bool = False
    HAS_SCALE: bool = False
    HAS_SHIFT: bool = False
    DIRECT: bool = False
    DY: int = 1
    DX: int = 1
    UY: int = 1
    UX: int = 1


BLOCK = Slotted(
    name="block_kernel",
    doc="""The inference forward of up to four branches and the copy of x, in one launch: programs
    [0, E0) copy x into its slice (channels from x_c0 of xo; none if E0 == 0), then each branch slot's
    programs in turn (``_tile_program``; its source l_s is x itself for a factor branch, the pooled level
    for bins; it writes channels from oc_s of out_s and its tiles from so_s of scr_s). The tile shape (RH,
    RW, BLOCK_N, BLOCK_K) is autotuned, so each slot's program count is computed here. The copy moves
    BLOCK_P pixels per program, the up-resize BLOCK_Q output pixels per step (small: its gathered
    (BLOCK_Q, BLOCK_N) tiles and their addresses must fit in registers beside the tile's).""",
    shared="x, s_n, s_c, s_h, s_w, xo, xo_n, xo_c, xo_h, xo_w, x_c0, N, C, H, W",
    slot="""l, l_n, l_c, l_h, l_w, dy, dyw, dx, dxw, wk, b, sc, sh, out, q_n, q_c, q_h, q_w, oc, scr, so, uy, uyw, ux,
        uxw, fr, fc, h, w, CO, KS, HALO""",
    flags=TileFlags,
    constexprs="ACT, DOT, UPCAST, F64, RH, RW, BLOCK_N, BLOCK_K, BLOCK_P, BLOCK_C, BLOCK_Q",
    ends="_tile_programs(N, h, w, CO, HALO, RH, RW, BLOCK_N)",
    prologue="""_copy_program(pid, x, s_n, s_c, s_h, s_w, xo + x_c0 * xo_c, xo_n, xo_c, xo_h, xo_w, C, H, W, N * H * W,
            F64, BLOCK_P, BLOCK_C)""",
    program="""_tile_program(t, l, l_n, l_c, l_h, l_w, dy, dyw, DY, dx, dxw, DX, wk, b, sc, sh, out, q_n, q_c, q_h, q_w,
            oc, scr, so, uy, uyw, UY, ux, uxw, UX, fr, fc, C, h, w, CO, KS, HALO, HAS_BIAS, HAS_SCALE, HAS_SHIFT,
            ACT, DOT, UPCAST, F64, DIRECT, RH, RW, BLOCK_N, BLOCK_K, BLOCK_Q)""",
)
block_kernel = BLOCK.jit(globals())


@triton.jit
def _level_program(t, x, s_n, s_c, s_h, s_w, dst, d_n, d_c, d_h, d_w, N, C, Hd, Wd, ty_idx, ty_w, TY, ty_cnt, R,
                   tx_idx, tx_w, TX, tx_cnt, BLOCK_X: tl.constexpr, TAPS: tl.constexpr, X_IDENTITY: tl.constexpr,
                   F64: tl.constexpr, BLOCK_C: tl.constexpr):
    """One (BLOCK_C channels, BLOCK_X pixels of a level row) tile of x brought to a level (``_run_gather``: a
    level column reads a run of x's columns), over the rows of one chunk of R of its taps (all when R == TY):
    chunk k's partial sums go to rows k * Hd + y of dst, summed later in chunk order (long pooling windows
    split so that the grid fills the GPU). Program t: chunk, then tile, then channel block."""
    nc = tl.cdiv(C, BLOCK_C)
    nx = tl.cdiv(Wd, BLOCK_X)
    per_chunk = N * Hd * nx * nc
    k = t // per_chunk
    t = t % per_chunk
    c = (t % nc) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    tile = t // nc
    x0 = (tile % nx) * BLOCK_X
    y = (tile // nx) % Hd
    n = tile // (nx * Hd)
    rows = tl.minimum(tl.load(ty_cnt + y), (k + 1) * R)
    # (channels, level columns); no tap shift (dy, dx, HS, WS unread)
    acc = _run_gather(x, s_n, s_h, s_w, c * s_c, cm, c, c, 0, 0, n, y, k * R, rows, ty_idx, ty_w, TY, x0, Wd,
                      tx_idx, tx_w, TX, tx_cnt, False, X_IDENTITY, BLOCK_C, BLOCK_X, TAPS, F64)
    xs = x0 + tl.arange(0, BLOCK_X)
    tl.store(dst + n * d_n + (k * Hd + y) * d_h + (xs * d_w)[None, :] + (c * d_c)[:, None],
             _cast(acc, dst.dtype.element_ty), mask=cm[:, None] & (xs < Wd)[None, :])


@dataclasses.dataclass(frozen=True)
class LevelFlags:
    """levels_kernel's per-slot compile-time values (see _level_program): BLOCK_X level pixels of a row per
    program, TAPS source columns per load; X_IDENTITY: the x axis is not resized."""

    BLOCK_X: int = 1
    TAPS: int = 1
    X_IDENTITY: bool = False


LEVELS = Slotted(
    name="levels_kernel",
    doc="""x into its slice of the output (channels from x_c0 of xo; programs [0, E0)) and to up to four
    levels (programs [E_s, E_s+1): slot s, a separable gather over the tap tables y_s / xt_s: adaptive
    pooling for bins, the factor down-resize otherwise, its y taps in chunks of R_s) in one launch.""",
    shared="x, s_n, s_c, s_h, s_w, xo, xo_n, xo_c, xo_h, xo_w, x_c0, N, C, H, W",
    slot="d, d_n, d_c, d_h, d_w, h, w, y, yw, Y, yc, R, xt, xw, X, xc",
    flags=LevelFlags,
    constexprs="F64, BLOCK_P, BLOCK_C",
    prologue="""_copy_program(pid, x, s_n, s_c, s_h, s_w, xo + x_c0 * xo_c, xo_n, xo_c, xo_h, xo_w, C, H, W, N * H * W,
            F64, BLOCK_P, BLOCK_C)""",
    program="""_level_program(t, x, s_n, s_c, s_h, s_w, d, d_n, d_c, d_h, d_w, N, C, h, w, y, yw, Y, yc, R, xt, xw, X,
            xc, BLOCK_X, TAPS, X_IDENTITY, F64, BLOCK_C)""",
)
levels_kernel = LEVELS.jit(globals())




@triton.jit
def _pool_dot(acc, member, v, DOT: tl.constexpr, UPCAST: tl.constexpr):
    """acc += member @ v, member a (cells, pixels) 0/1 mask and v a (pixels, channels) tile of x: exact products
    (0/1 times x), summed in acc's dtype. float32 x: three TF32 products (x split into two TF32 parts; the mask
    is exact in TF32), about float32's accuracy, as ATen's pooling has whatever the TF32 flags say."""
    # (pool_kernel never takes DOT_TF32: the sums would round x; the 3.6 interpreter's bool -> bfloat16 is wrong)
    if DOT == 1 and not UPCAST:
        member = member.to(v.dtype)
    else:
        member = member.to(tl.float32)
    return _dot(acc, member, v, DOT, UPCAST)


@triton.jit
def _pool_sums(x, s_n, s_c, s_h, s_w, xo, xo_n, xo_c, xo_w, n, c, cm, W, start, end, y0, y1, x0, x1, kind,
               COPY: tl.constexpr, FIX: tl.constexpr, FLAT: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr,
               F64: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum over pixels [start, end) of plane n of x (flattened h * W + w) of (cells, channels c): the cells'
    windows [y0, y1) x [x0, x1) as a 0/1 mask built per step, times the pixels' tile of x (copied to xo where
    COPY). FIX: instead of x, by ``kind`` (a runtime value: one loop for every kind) 0: x with its non-finite
    values as 0, 1, 2, 3: indicators of +Inf, -Inf, NaN (so counts per window). FLAT: x's rows are dense (h
    stride = W * w stride): a tile's address is linear in the pixel and the load coalesces along pixels
    (NCHW) or channels (channels_last)."""
    acc = _zeros(BLOCK_L, BLOCK_C, F64)
    base = x + n * s_n
    for p0 in range(start, end, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K)
        pm = p < end
        py = p // W
        px = p % W
        if FLAT:
            off = p * s_w
        else:
            off = py * s_h + px * s_w
        m2 = pm[:, None] & cm[None, :]
        v = tl.load(base + off[:, None] + c[None, :] * s_c, mask=m2, other=0.0)
        if COPY:
            tl.store(xo + n * xo_n + (p * xo_w)[:, None] + c[None, :] * xo_c, v, mask=m2)
        if FIX:  # (tested in acc's dtype: the 3.6 interpreter's bfloat16 NaN equals itself)
            u = v.to(acc.dtype)
            finite = tl.abs(u) < float("inf")
            hit = tl.where(kind == 1, u == float("inf"), tl.where(kind == 2, u == -float("inf"), u != u))
            v = tl.where(kind == 0, tl.where(finite, u, 0.0), tl.where(hit, 1.0, 0.0)).to(v.dtype)
        member = ((py[None, :] >= y0[:, None]) & (py[None, :] < y1[:, None]) &
                  (px[None, :] >= x0[:, None]) & (px[None, :] < x1[:, None]))
        acc = _pool_dot(acc, member, v, DOT, UPCAST)
    return acc


@triton.jit
def _pool_means(x, s_n, s_c, s_h, s_w, xo, xo_n, xo_c, xo_w, cells, N, C, W, S, PK, HW,
                COPY: tl.constexpr, FLAT: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr,
                F64: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program of pool_kernel: plane n, channels c, pixel chunk k (of S, PK pixels each): every cell's
    sum over the chunk divided by the cell's window size (the chunks' partials add up to the mean). A window
    holding a non-finite value: NaN if it holds a NaN or both infinities, else that infinity (ATen's sum);
    such programs (their sums then non-finite) sum their chunk again, a path finite inputs never take."""
    pid = tl.program_id(0)
    k = pid % S
    cb = (pid // S) % tl.cdiv(C, BLOCK_C)
    n = pid // (S * tl.cdiv(C, BLOCK_C))
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    lane = tl.arange(0, BLOCK_L)
    y0 = tl.load(cells + lane)
    y1 = tl.load(cells + BLOCK_L + lane)
    x0 = tl.load(cells + 2 * BLOCK_L + lane)
    x1 = tl.load(cells + 3 * BLOCK_L + lane)
    start = k * PK
    end = tl.minimum(HW, start + PK)
    acc = _pool_sums(x, s_n, s_c, s_h, s_w, xo, xo_n, xo_c, xo_w, n, c, cm, W, start, end, y0, y1, x0, x1, 0,
                     COPY, False, FLAT, DOT, UPCAST, F64, BLOCK_L, BLOCK_K, BLOCK_C)
    # a masked product 0 * Inf is NaN: any non-finite value in x leaves a non-finite sum in its channel
    if tl.sum((tl.abs(acc) < float("inf")).to(tl.int32)) < BLOCK_L * BLOCK_C:
        for kind in range(4):  # the finite values' sums, then per kind of non-finite value a count overriding them
            part = _pool_sums(x, s_n, s_c, s_h, s_w, xo, xo_n, xo_c, xo_w, n, c, cm, W, start, end, y0, y1, x0,
                              x1, kind, False, True, FLAT, DOT, UPCAST, F64, BLOCK_L, BLOCK_K, BLOCK_C)
            over = tl.where(kind == 1, float("inf"),
                            tl.where(kind == 3, float("nan"), tl.where(acc == float("inf"), float("nan"),
                                                                       -float("inf"))))
            acc = tl.where(kind == 0, part, tl.where(part > 0, over, acc))
    size = ((y1 - y0) * (x1 - x0)).to(acc.dtype)
    return acc / tl.where(size > 0, size, 1.0)[:, None], n, c, cm, k


@triton.jit
def _pool_store(mean, d, d_n, d_c, d_h, d_w, l0, h, w, n, c, cm, k, BLOCK_L: tl.constexpr):
    """The rows of ``mean`` that are one level's cells [l0, l0 + h * w) (row-major) into that level's chunk k
    (rows k * h + i of d)."""
    cell = tl.arange(0, BLOCK_L) - l0
    lm = (cell >= 0) & (cell < h * w)
    i = cell // w
    j = cell % w
    tl.store(d + n * d_n + ((k * h + i) * d_h + j * d_w)[:, None] + c[None, :] * d_c,
             _cast(mean, d.dtype.element_ty), mask=lm[:, None] & cm[None, :])


POOL = Slotted(
    name="pool_kernel",
    doc="""x pooled to up to four bin levels (adaptive average pooling) from one read, and copied into its
    slice of the output (channels from x_c0 of xo) where COPY. Grid N * cdiv(C, BLOCK_C) * S: a program sums a
    chunk of PK pixels of one plane for BLOCK_C channels into every cell of every level at once (the cells'
    windows in ``cells``: rows y0, y1, x0, x1 of BLOCK_L entries; a (cells, pixels) mask times the pixels'
    tile, on tl.dot), then stores each level's cells (slot s: cells [l0_s, l0_s + h_s * w_s)) as chunk k of
    d_s; S chunks' partials are summed later in chunk order.""",
    shared="x, s_n, s_c, s_h, s_w, xo, xo_n, xo_c, xo_w, x_c0, cells, N, C, W, S, PK, HW",
    slot="d, d_n, d_c, d_h, d_w, l0, h, w",
    constexprs="COPY, FLAT, DOT, UPCAST, F64, BLOCK_L, BLOCK_K, BLOCK_C",
    together=True,
    before="""
        mean, n, c, cm, k = _pool_means(x, s_n, s_c, s_h, s_w, xo + x_c0 * xo_c, xo_n, xo_c, xo_w, cells, N, C,
                                        W, S, PK, HW, COPY, FLAT, DOT, UPCAST, F64, BLOCK_L, BLOCK_K, BLOCK_C)
    """,
    program="_pool_store(mean, d, d_n, d_c, d_h, d_w, l0, h, w, n, c, cm, k, BLOCK_L)",
)
pool_kernel = POOL.jit(globals())


@triton.jit
def _conv_program(pid_m, pid_n, src, s_n, s_c, s_h, s_w, wk, bias, pre, p_n, p_c, p_h, p_w, out, o_n, o_c, o_h,
                  o_w, scale, shift, part_mean, part_m2, N, C, H, W, CO, KS,
                  HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, STORE_OUT: tl.constexpr,
                  HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, STATS: tl.constexpr, ACT: tl.constexpr,
                  DOT: tl.constexpr, UPCAST: tl.constexpr, F64: tl.constexpr, TAPS_IN_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (BLOCK_M pixels, BLOCK_N output channels) tile of pre = conv2d(src, weight, bias, padding=KS // 2)
    on an (N, C, H, W) map, weight packed as wk[(ky * KS + kx) * C + c, co]; out = act(pre * scale + shift);
    STATS: the tile's per-channel mean and M2 of pre (as stored) into row pid_m of part_mean / part_m2.
    The reduction runs over k = (ky * KS + kx) * C + c, BLOCK_K at a time: per tap over its channels, or, where
    TAPS_IN_K (few channels: a stem's 3), over the flattened index itself, so that one step covers several taps
    instead of padding each tap's 3 channels to BLOCK_K (9 steps of 3 useful in 32 become one of 27)."""
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = m < N * H * W
    com = co < CO
    lx = m % W
    ly = (m // W) % H
    n = m // (W * H)
    pad = KS // 2
    acc = _zeros(BLOCK_M, BLOCK_N, F64)
    kk = tl.arange(0, BLOCK_K)
    if TAPS_IN_K:
        for k0 in range(0, KS * KS * C, BLOCK_K):
            k = k0 + kk
            km = k < KS * KS * C
            tap = k // C
            iy = ly[:, None] + (tap // KS - pad)[None, :]
            ix = lx[:, None] + (tap % KS - pad)[None, :]
            ok = mm[:, None] & km[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            a = tl.load(src + (n * s_n)[:, None] + iy * s_h + ix * s_w + ((k - tap * C) * s_c)[None, :], mask=ok,
                        other=0.0)
            b = tl.load(wk + k[:, None] * CO + co[None, :], mask=km[:, None] & com[None, :], other=0.0)
            acc = _dot(acc, a, b, DOT, UPCAST)
    else:
        for tap in range(KS * KS):
            iy = ly + tap // KS - pad
            ix = lx + tap % KS - pad
            ok = mm & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            row = n * s_n + iy * s_h + ix * s_w
            for c0 in range(0, C, BLOCK_K):
                ck = c0 + kk
                km = ck < C
                a = tl.load(src + row[:, None] + ck[None, :] * s_c, mask=ok[:, None] & km[None, :], other=0.0)
                b = tl.load(wk + (tap * C + ck)[:, None] * CO + co[None, :], mask=km[:, None] & com[None, :],
                            other=0.0)
                acc = _dot(acc, a, b, DOT, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias + co, mask=com, other=0.0).to(acc.dtype)[None, :]
    m2 = mm[:, None] & com[None, :]
    if STORE_PRE:
        tl.store(pre + (n * p_n + ly * p_h + lx * p_w)[:, None] + co[None, :] * p_c,
                 _cast(acc, pre.dtype.element_ty), mask=m2)
    if STATS:  # of the stored (rounded) values, as the reference's norm sees them
        _store_tile_moments(_cast(acc, pre.dtype.element_ty).to(acc.dtype), m2,
                            tl.minimum(N * H * W - pid_m * BLOCK_M, BLOCK_M), part_mean + pid_m * CO,
                            part_m2 + pid_m * CO, co, com)
    if STORE_OUT:
        y = acc
        if HAS_SCALE:
            y = y * tl.load(scale + co, mask=com, other=1.0).to(acc.dtype)[None, :]
        if HAS_SHIFT:
            y = y + tl.load(shift + co, mask=com, other=0.0).to(acc.dtype)[None, :]
        y = _activate(y, ACT)
        tl.store(out + (n * o_n + ly * o_h + lx * o_w)[:, None] + co[None, :] * o_c,
                 _cast(y, out.dtype.element_ty), mask=m2)


@triton.jit
def _conv_slot(t, src, s_n, s_c, s_h, s_w, wk, bias, pre, p_n, p_c, p_h, p_w, out, o_n, o_c, o_h, o_w, scale, shift,
               part_mean, part_m2, N, C, H, W, CO, KS, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr,
               HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, STORE_OUT: tl.constexpr, STATS: tl.constexpr,
               ACT: tl.constexpr,
               DOT: tl.constexpr, UPCAST: tl.constexpr, F64: tl.constexpr, TAPS_IN_K: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A branch's share of convs_kernel: program t's (pixel tile, output channel block) of _conv_program."""
    nb = tl.cdiv(CO, BLOCK_N)
    _conv_program(t // nb, t % nb, src, s_n, s_c, s_h, s_w, wk, bias, pre, p_n, p_c, p_h, p_w, out, o_n, o_c, o_h,
                  o_w, scale, shift, part_mean, part_m2, N, C, H, W, CO, KS, HAS_BIAS, STORE_PRE, STORE_OUT,
                  HAS_SCALE, HAS_SHIFT, STATS, ACT, DOT, UPCAST, F64, TAPS_IN_K, BLOCK_M, BLOCK_N, BLOCK_K)


@dataclasses.dataclass(frozen=True)
class ConvFlags:
    """convs_kernel's per-slot compile-time values: bias, scale and shift present, the conv output stored
    (STORE_PRE: for the backward), the epilogue stored (STORE_OUT), the tile's batch statistics stored (STATS)."""

    HAS_BIAS: bool = False
    STORE_PRE: bool = True
    HAS_SCALE: bool = False
    HAS_SHIFT: bool = False
    STORE_OUT: bool = False
    STATS: bool = False


CONVS = Slotted(
    name="convs_kernel",
    doc="""The training forward's convolutions of up to four branches in one launch (each slot's programs follow
    the previous slot's; their count depends on the autotuned BLOCK_N, so it is computed here): pre stored,
    the epilogue stored where the branch needs no batch statistics, per-tile statistics where it does.""",
    shared="N, C",
    slot="l, l_n, l_c, l_h, l_w, wk, b, pr, pr_n, pr_c, pr_h, pr_w, o, o_n, o_c, o_h, o_w, sc, sh, pm, pq, h, w, CO,"
         " KS",
    flags=ConvFlags,
    constexprs="ACT, DOT, UPCAST, F64, TAPS_IN_K, BLOCK_M, BLOCK_N, BLOCK_K",
    ends="tl.cdiv(N * h * w, BLOCK_M) * tl.cdiv(CO, BLOCK_N)",
    program="""_conv_slot(t, l, l_n, l_c, l_h, l_w, wk, b, pr, pr_n, pr_c, pr_h, pr_w, o, o_n, o_c, o_h, o_w, sc, sh,
            pm, pq, N, C, h, w, CO, KS, HAS_BIAS, STORE_PRE, HAS_SCALE, HAS_SHIFT, STORE_OUT, STATS, ACT, DOT, UPCAST,
            F64, TAPS_IN_K, BLOCK_M, BLOCK_N, BLOCK_K)""",
)
convs_kernel = CONVS.jit(globals())


@triton.jit
def _up_slot(t, src, s_n, s_c, s_h, s_w, dst, d_n, d_c, d_h, d_w, N, C, H, W, ty_idx, ty_w, TY, tx_idx, tx_w, TX,
             a_ptr, b_ptr, eps, gamma, beta, NORM: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
             APPLY_ACT: tl.constexpr, ACT: tl.constexpr, F64: tl.constexpr, BLOCK_P: tl.constexpr,
             BLOCK_C: tl.constexpr):
    """A branch's share of ups_kernel: (BLOCK_P output pixels of one plane, BLOCK_C channels) of its slice,
    the up-resize of act(norm(src)) (NORM: NORM_*, with HAS_GAMMA / HAS_BETA; the activation if APPLY_ACT).
    ``dst``'s rows are dense: the tile's pixels are consecutive, addressed linearly (coalesced stores in NCHW
    as in channels_last)."""
    pid_c = t % tl.cdiv(C, BLOCK_C)
    n, q, pm, oy, ox = _plane_pixels(t // tl.cdiv(C, BLOCK_C), H, W, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    mul, add = _channel_affine(c, cm, a_ptr, b_ptr, eps, gamma, beta, NORM, HAS_GAMMA, HAS_BETA, F64)
    acc = _zeros(BLOCK_P, BLOCK_C, F64)
    if APPLY_ACT:
        acc = _gather(acc, src, s_n, s_c, s_h, s_w, n, oy, ox, c, pm, cm, ty_idx, ty_w, TY, tx_idx, tx_w, TX,
                      mul, add, NORM, ACT, 0, TY)
    else:
        acc = _gather(acc, src, s_n, s_c, s_h, s_w, n, oy, ox, c, pm, cm, ty_idx, ty_w, TY, tx_idx, tx_w, TX,
                      mul, add, NORM, 0, 0, TY)
    tl.store(dst + (n * d_n + q * d_w)[:, None] + c[None, :] * d_c, _cast(acc, dst.dtype.element_ty),
             mask=pm[:, None] & cm[None, :])


@dataclasses.dataclass(frozen=True)
class UpFlags(NormFlags):
    """ups_kernel's per-slot compile-time values (see _up_slot)."""

    APPLY_ACT: bool = False


UPS = Slotted(
    name="ups_kernel",
    doc="""Up to four branches' resizes of a (N, C, h, w) source into an (N, C, H, W) destination (each slot's
    own sizes): programs [E_s, E_s+1) write slot s's destination, the source gathered over the taps with the
    norm and the activation applied per tap where NORM / APPLY_ACT (identity taps: the norm and activation at
    the level alone).""",
    shared="N",
    slot="s, s_n, s_c, s_h, s_w, d, d_n, d_c, d_h, d_w, C, H, W, y, yw, Y, xt, xw, X, a, b, eps, g, be",
    flags=UpFlags,
    constexprs="ACT, F64, BLOCK_P, BLOCK_C",
    program="""_up_slot(t, s, s_n, s_c, s_h, s_w, d, d_n, d_c, d_h, d_w, N, C, H, W, y, yw, Y, xt, xw, X, a, b, eps, g,
            be, NORM, HAS_GAMMA, HAS_BETA, APPLY_ACT, ACT, F64, BLOCK_P, BLOCK_C)""",
)
ups_kernel = UPS.jit(globals())
