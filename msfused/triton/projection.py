"""The block with its projection on the Triton backend (SPEC.md, "The projection"): the operators
``msfused::multi_scale_project_forward_triton`` / ``_backward_triton``, with the C++ operators' arguments and
results (absent per-branch tensors as empty ones, as ``ops.py`` says why), and their kernels.

The concatenation is never built. ``conv(cat)`` is ``conv(x, W_x)`` plus, per branch, its part: at a small
level one 1x1 convolution to ``k * k * P`` channels (the per-tap maps), read resized up and shifted by each tap
(zero outside the map); a branch close to full size (x itself, or ``k * k`` per-tap maps larger than one
full-size map: the CPU and CUDA backends' rule, ``csrc/projection.h``) convolved directly after its resize. The
convolutions are torch's (cuDNN on a GPU, deterministic algorithms); the Triton kernels here do the rest:

* ``project_epilogue_kernel``: the one fused pass over the output: ``conv(x, W_x)`` + bias + every part
  (resized up and shifted per tap) + norm + activation, the output written once (with the projection's batch
  statistics: the pre-activation and each tile's partial (mean, M2) of it, combined in tile order by the
  block's ``stats_combine_kernel`` (``launch.combine_statistics``; no torch op reads the full-size
  pre-activation), then a second pass of the same kernel applies norm and activation). The same kernel with
  no parts is the branches' norm and activation at their levels.
* ``gather_kernel`` / ``adjoint_kernel``: a separable resize as a gather over ``tables.py``'s tap tables (ATen's
  own index math), deterministic (no atomics). ``gather_kernel`` onto full-size maps: a direct branch's resize
  back up in the forward, and ``dx`` (the down-resizes' adjoints, branch after branch). ``adjoint_kernel``
  onto a level (``K._run_gather``: a level column's readers are a run of columns, read along the warp's
  lanes): each per-tap map's gradient (the shifted up-resize's readers of a level pixel) and a direct branch's
  up-resize adjoint; one whose program would loop over more than ``launch.ADJOINT_STEPS`` tap vectors (a small
  level's adjoint reads most of the map) runs in chunks of its reader rows, their partial sums summed in
  chunk order by a second launch (``_reduce``).
* ``act_grad_kernel``: the activation's backward through a norm, ``d = g * act'(mul * pre + add)``, with
  per-tile partial sums of the norm's gradients (sum d, sum d * u), added in a fixed order by the block's
  ``column_sums_kernel`` (``launch._column_sums``); without batch statistics it also writes the gradient at
  the pre-activation (one full-size pass). ``norm_grad_kernel``: with batch statistics, that gradient once the
  sums are known (d recomputed: nothing full-size is stored in between). Deterministic, no atomics.

The levels come from the block's ``pool_kernel`` / ``levels_kernel`` (``launch._launch_levels``: the bin levels of
up to 4 branches pooled from one read of x, factor levels gathered; a map or a long pooling window split in
chunks where the GPU would not fill, +1 launch sums their partials in a fixed order).

Launches per call ("torch" = cuDNN and reductions): forward: 1 levels launch per 4 levels (+1 where the
pooling is split into chunks); per branch its convolution (torch), [its batch statistics
(torch)], 1 epilogue pass (its activation at its level), [1 gather: resized up, direct branches], its part's
convolution (torch); ``conv(x, W_x)`` (torch); **1** accumulation pass per 4 parts (``MAX_PARTS``); with the
projection's batch statistics the last accumulation pass also writes the partial statistics, + 1
``stats_combine_kernel`` + 1 epilogue pass. Backward: the projection's epilogue
backward, 1 ``act_grad_kernel`` + 1 ``column_sums_kernel`` (+ 1 ``norm_grad_kernel`` with batch statistics);
``conv(x, W_x)``'s backward (torch); per branch: 1 epilogue pass (its activation again; + 1 gather for a direct
one), 1 adjoint (its maps' gradient, or its up-resize's adjoint; +1 where split), its part's convolution
backward (torch), its epilogue backward (as the projection's), its convolution backward (torch); 1 gather per
branch writes ``dx``. ``python -m msfused explain`` plans them all (``plan.py``; each kernel's cost model below
its launchers).
"""

from __future__ import annotations

import contextlib
import threading
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .. import _ops
from ..functional import PARAM_CACHE
from . import kernels as K
from . import launch
from .plan import Part, cdiv, cost_model, nbytes
from .tables import AxisTaps, axis_taps, stacked_taps

#: Parts (per-tap maps, direct convolutions) one accumulation launch adds; more take further launches.
MAX_PARTS = 4


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _at(n, q, oy, ox, s_n, s_h, s_w, FLAT: tl.constexpr):
    """Offsets of pixels (n, oy, ox) of a tensor with strides s_*; q = oy * W + ox. FLAT: the tensor's rows are
    dense, so the offset is linear in q: the compiler then sees runs of consecutive pixels (coalesced along them
    in NCHW) where from (oy, ox) it proves nothing and orders a tile's lanes along the channels."""
    if FLAT:
        return n * s_n + q * s_w
    else:
        return n * s_n + oy * s_h + ox * s_w


@triton.jit
def _add_part(acc, t, t_n, t_c, t_h, t_w, ty_idx, ty_w, TY, tx_idx, tx_w, TX, KS, n, oy, ox, p, pm, cm, P, H, W):
    """acc += one part at output pixels (n, oy, ox) and channels p: for each tap (ky, kx) of a KS x KS
    kernel, the map of channel (ky * KS + kx) * P + p resized up (the up tables' taps of row oy + ky - KS // 2,
    column ox + kx - KS // 2) and so shifted, zero outside the map (as the convolution's padding)."""
    for ky in range(KS):
        r = oy + ky - KS // 2
        ok_r = pm & (r >= 0) & (r < H)
        for kx in range(KS):
            c = ox + kx - KS // 2
            ok = ok_r & (c >= 0) & (c < W)
            ch = ((ky * KS + kx) * P + p) * t_c
            for ty in range(TY):
                iy = tl.load(ty_idx + r * TY + ty, mask=ok, other=-1)
                wy = tl.load(ty_w + r * TY + ty, mask=ok, other=0.0).to(acc.dtype)
                ok_y = ok & (iy >= 0)
                for tx in range(TX):
                    ix = tl.load(tx_idx + c * TX + tx, mask=ok_y, other=-1)
                    wx = tl.load(tx_w + c * TX + tx, mask=ok_y, other=0.0).to(acc.dtype)
                    m = (ok_y & (ix >= 0))[:, None] & cm[None, :]
                    v = tl.load(t + (n * t_n + iy * t_h + ix * t_w)[:, None] + ch[None, :], mask=m, other=0.0)
                    acc += (wy * wx)[:, None] * v.to(acc.dtype)
    return acc


@triton.jit
def project_epilogue_kernel(
        acc_in, a_n, a_c, a_h, a_w, pre, p_n, p_c, p_h, p_w, out, o_n, o_c, o_h, o_w,
        bias, norm_a, norm_b, gamma, beta, eps: tl.float64, part_mean, part_m2,
        t0, t0_n, t0_c, t0_h, t0_w, ty0_idx, ty0_w, TY0, tx0_idx, tx0_w, TX0, KS0,
        t1, t1_n, t1_c, t1_h, t1_w, ty1_idx, ty1_w, TY1, tx1_idx, tx1_w, TX1, KS1,
        t2, t2_n, t2_c, t2_h, t2_w, ty2_idx, ty2_w, TY2, tx2_idx, tx2_w, TX2, KS2,
        t3, t3_n, t3_c, t3_h, t3_w, ty3_idx, ty3_w, TY3, tx3_idx, tx3_w, TX3, KS3,
        N, P, H, W,
        PARTS: tl.constexpr, HAS_ACC: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
        HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, STORE_PRE: tl.constexpr, STORE_OUT: tl.constexpr,
        STATS: tl.constexpr, ACT: tl.constexpr, FLAT: tl.constexpr, F64: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr):
    """Grid: (tiles of BLOCK_P of the N * H * W output pixels, tiles of BLOCK_C of the P channels). One
    program: its tile's sum acc_in + bias + parts 0 .. PARTS - 1 (``_add_part``), rounded to the tensor's
    dtype and stored as the pre-activation (STORE_PRE); then the norm (K._channel_affine: NORM_AFFINE from
    (norm_a, norm_b) = (scale, shift), NORM_BATCH from (mean, var) and the affine (gamma, beta)) and the
    activation, stored as the output (STORE_OUT). STATS: the tile's per-channel mean and M2 of the stored
    (rounded) pre-activation, as the reference's norm sees it, into row pid 0 of part_mean / part_m2 (T, P) in
    the accumulation dtype (the block's conv epilogue's partials, combined in tile order by
    K.stats_combine_kernel). Each element is read and written once. FLAT: acc_in's, pre's and out's rows are
    dense (``_at``)."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    e = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = e < N * H * W
    n = e // (H * W)
    q = e % (H * W)
    oy = q // W
    ox = q % W
    p = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = p < P
    m2 = pm[:, None] & cm[None, :]
    acc = K._zeros(BLOCK_P, BLOCK_C, F64)
    if HAS_ACC:
        acc += tl.load(acc_in + _at(n, q, oy, ox, a_n, a_h, a_w, FLAT)[:, None] + p[None, :] * a_c, mask=m2,
                       other=0.0).to(acc.dtype)
    if HAS_BIAS:
        acc += tl.load(bias + p, mask=cm, other=0.0).to(acc.dtype)[None, :]
    if PARTS > 0:
        acc = _add_part(acc, t0, t0_n, t0_c, t0_h, t0_w, ty0_idx, ty0_w, TY0, tx0_idx, tx0_w, TX0, KS0,
                        n, oy, ox, p, pm, cm, P, H, W)
    if PARTS > 1:
        acc = _add_part(acc, t1, t1_n, t1_c, t1_h, t1_w, ty1_idx, ty1_w, TY1, tx1_idx, tx1_w, TX1, KS1,
                        n, oy, ox, p, pm, cm, P, H, W)
    if PARTS > 2:
        acc = _add_part(acc, t2, t2_n, t2_c, t2_h, t2_w, ty2_idx, ty2_w, TY2, tx2_idx, tx2_w, TX2, KS2,
                        n, oy, ox, p, pm, cm, P, H, W)
    if PARTS > 3:
        acc = _add_part(acc, t3, t3_n, t3_c, t3_h, t3_w, ty3_idx, ty3_w, TY3, tx3_idx, tx3_w, TX3, KS3,
                        n, oy, ox, p, pm, cm, P, H, W)
    v = K._cast(acc, pre.dtype.element_ty)  # the pre-activation as a tensor of its dtype holds it
    if STORE_PRE:
        tl.store(pre + _at(n, q, oy, ox, p_n, p_h, p_w, FLAT)[:, None] + p[None, :] * p_c, v, mask=m2)
    if STATS:
        K._store_tile_moments(v.to(acc.dtype), m2, tl.minimum(N * H * W - pid_p * BLOCK_P, BLOCK_P),
                              part_mean + pid_p * P, part_m2 + pid_p * P, p, cm)
    if STORE_OUT:
        mul, add = K._channel_affine(p, cm, norm_a, norm_b, eps, gamma, beta, NORM, HAS_GAMMA, HAS_BETA, F64)
        y = K._activate(v.to(acc.dtype) * mul[None, :] + add[None, :], ACT)
        tl.store(out + _at(n, q, oy, ox, o_n, o_h, o_w, FLAT)[:, None] + p[None, :] * o_c,
                 K._cast(y, out.dtype.element_ty), mask=m2)


@triton.jit
def gather_kernel(src, s_n, s_c, s_h, s_w, dst, d_n, d_c, d_h, d_w, ty_idx, ty_w, TY, tx_idx, tx_w, TX,
                  N, CD, HD, WD, P, HS, WS, KS, HT, R,
                  ACCUMULATE: tl.constexpr, FLAT: tl.constexpr, F64: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """The gather onto a map at least as large as its source (an up-resize, a down-resize's adjoint;
    ``adjoint_kernel`` reduces onto smaller maps). FLAT: dst's rows are dense (``_at``).
    Grid: (tiles of BLOCK_P of dst's N * HD * WD pixels, tiles of BLOCK_C of its CD channels). dst's rows
    are HD // HT chunks of HT rows (the y table's rows); row r of chunk j = r // HT sums the y taps
    j * R .. j * R + R - 1 of table row r % HT (one chunk, R = TY: every tap). One program: dst[n, ch, r, x]
    (+ its old value with ACCUMULATE) = sum over its chunk's y taps and every x tap (in table order:
    deterministic) of w_y * w_x * src[n, ch % P, iy - dy, ix - dx], where (dy, dx) is the shift of tap
    ch // P of a KS x KS kernel (KS = 1: none), zero outside src's HS x WS. A long gather so split into
    chunks (partial sums stacked along dst's rows) is finished by a second launch over ``stacked_taps``."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    e = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = e < N * HD * WD
    n = e // (HD * WD)
    q = e % (HD * WD)
    row = q // WD
    oy = row % HT
    y0 = (row // HT) * R  # the chunk's first y tap
    ox = q % WD
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = ch < CD
    tap = ch // P
    dy = tap // KS - KS // 2
    dx = tap % KS - KS // 2
    base = n[:, None] * s_n + (ch % P)[None, :] * s_c
    # Separable, as the CPU kernels sum: per y tap the row's x taps, then that row sum times w_y. Rounding
    # error grows with TY + TX terms instead of TY * TX: these adjoints are often cancelling sums (under a
    # batch-statistics norm the map's gradient sums to zero).
    acc = K._zeros(BLOCK_P, BLOCK_C, F64)
    for t in range(R):
        ty = y0 + t
        ok_t = pm & (ty < TY)
        iy = tl.load(ty_idx + oy * TY + ty, mask=ok_t, other=-1)
        wy = tl.load(ty_w + oy * TY + ty, mask=ok_t, other=0.0).to(acc.dtype)
        sy = iy[:, None] - dy[None, :]
        ok_y = (ok_t & (iy >= 0))[:, None] & cm[None, :] & (sy >= 0) & (sy < HS)
        x_sum = K._zeros(BLOCK_P, BLOCK_C, F64)
        for tx in range(TX):
            ix = tl.load(tx_idx + ox * TX + tx, mask=pm, other=-1)
            wx = tl.load(tx_w + ox * TX + tx, mask=pm, other=0.0).to(acc.dtype)
            sx = ix[:, None] - dx[None, :]
            ok = ok_y & (ix >= 0)[:, None] & (sx >= 0) & (sx < WS)
            v = tl.load(src + base + sy * s_h + sx * s_w, mask=ok, other=0.0)
            x_sum += wx[:, None] * v.to(acc.dtype)
        acc += wy[:, None] * x_sum
    dptr = dst + _at(n, q, row, ox, d_n, d_h, d_w, FLAT)[:, None] + ch[None, :] * d_c
    m2 = pm[:, None] & cm[None, :]
    if ACCUMULATE:
        acc += tl.load(dptr, mask=m2, other=0.0).to(acc.dtype)
    tl.store(dptr, K._cast(acc, dst.dtype.element_ty), mask=m2)


@triton.jit
def adjoint_kernel(src, s_n, s_c, s_h, s_w, dst, d_n, d_c, d_h, d_w, ty_idx, ty_w, TY, ty_cnt, tx_idx, tx_w, TX,
                   tx_cnt, N, CD, HD, WD, P, HS, WS, KS, HT, R,
                   ACCUMULATE: tl.constexpr, SHIFT: tl.constexpr, X_IDENTITY: tl.constexpr, F64: tl.constexpr,
                   BLOCK_X: tl.constexpr, TAPS: tl.constexpr, BLOCK_C: tl.constexpr):
    """The gather onto a map smaller than its source (an up-resize's adjoint: each destination pixel reads a
    run of source columns per source row, ``K._run_gather``). Grid: (N * HD * tiles of BLOCK_X of a row's WD
    pixels, tiles of BLOCK_C of dst's CD channels); dst's rows are HD // HT chunks of HT rows (the y table's
    rows): row r of chunk j = r // HT sums the reader rows j * R .. j * R + R - 1 of table row r % HT (one
    chunk, R = TY: all of them). One program: dst[n, ch, r, x] (+ its old value with ACCUMULATE) = the gather
    of src[n, ch % P, iy - dy, ix - dx], (dy, dx) the shift of tap ch // P of a KS x KS kernel (SHIFT; zero
    outside src's HS x WS). Separable, as the CPU kernels sum: per reader row its weight times the row's
    values, then the column weights (these adjoints are often cancelling sums: rounding error grows with the
    rows plus the columns instead of their product). A long gather so split into chunks (partial sums
    stacked along dst's rows) is finished by a second launch over ``stacked_taps``."""
    pid = tl.program_id(0)
    nx = tl.cdiv(WD, BLOCK_X)
    x0 = (pid % nx) * BLOCK_X
    row = (pid // nx) % HD
    n = pid // (nx * HD)
    oy = row % HT
    r0 = (row // HT) * R
    r1 = tl.minimum(tl.load(ty_cnt + oy), r0 + R)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = ch < CD
    tap = ch // P
    dy = tap // KS - KS // 2
    dx = tap % KS - KS // 2
    acc = K._run_gather(src, s_n, s_h, s_w, (ch % P) * s_c, cm, dy, dx, HS, WS, n, oy, r0, r1, ty_idx, ty_w, TY,
                        x0, WD, tx_idx, tx_w, TX, tx_cnt, SHIFT, X_IDENTITY, BLOCK_C, BLOCK_X, TAPS, F64)
    x = x0 + tl.arange(0, BLOCK_X)
    m2 = cm[:, None] & (x < WD)[None, :]
    dptr = dst + n * d_n + row * d_h + (x * d_w)[None, :] + (ch * d_c)[:, None]
    if ACCUMULATE:
        acc += tl.load(dptr, mask=m2, other=0.0).to(acc.dtype)
    tl.store(dptr, K._cast(acc, dst.dtype.element_ty), mask=m2)


@triton.jit
def _act_grad_tile(g, g_n, g_c, g_h, g_w, pre, p_n, p_c, p_h, p_w, norm_a, norm_b, gamma, beta, eps, N, C, H, W,
                   NORM: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACT: tl.constexpr,
                   FLAT: tl.constexpr, F64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (pid 0, pid 1)'s tile of the activation's backward through a norm: d = g * act'(mul * pre + add)
    (zero outside the tensor), with u, the norm's input as it multiplies its weight (pre for a folded norm,
    the normalised value with batch statistics), the norm's mul and the tile's pixels (FLAT: g's, pre's and
    dy's rows are dense, ``_at``)."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    e = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = e < N * H * W
    n = e // (H * W)
    q = e % (H * W)
    oy = q // W
    ox = q % W
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    m2 = pm[:, None] & cm[None, :]
    one = K._zeros(BLOCK_P, BLOCK_C, F64) + 1.0
    gv = tl.load(g + _at(n, q, oy, ox, g_n, g_h, g_w, FLAT)[:, None] + c[None, :] * g_c, mask=m2, other=0.0)
    pv = tl.load(pre + _at(n, q, oy, ox, p_n, p_h, p_w, FLAT)[:, None] + c[None, :] * p_c, mask=m2, other=0.0)
    gv = gv.to(one.dtype)
    pv = pv.to(one.dtype)
    mul, add = K._channel_affine(c, cm, norm_a, norm_b, eps, gamma, beta, NORM, HAS_GAMMA, HAS_BETA, F64)
    d = tl.where(m2, K._activate_grad(gv, pv * mul[None, :] + add[None, :], ACT), 0.0)
    if NORM == 2:
        mean = tl.load(norm_a + c, mask=cm, other=0.0).to(one.dtype)
        rstd = K._rstd(tl.load(norm_b + c, mask=cm, other=1.0).to(one.dtype), eps)
        u = (pv - mean[None, :]) * rstd[None, :]
    else:
        u = pv
        rstd = mul
    return d, u, mul, rstd, n, q, oy, ox, c, cm, m2


@triton.jit
def act_grad_kernel(g, g_n, g_c, g_h, g_w, pre, p_n, p_c, p_h, p_w, dy, y_n, y_c, y_h, y_w, part,
                    norm_a, norm_b, gamma, beta, eps: tl.float64, N, C, H, W,
                    NORM: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACT: tl.constexpr,
                    STORE: tl.constexpr, FLAT: tl.constexpr, F64: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """Grid: (tiles of BLOCK_P of the N * H * W pixels, tiles of BLOCK_C of the C channels). One program:
    d = g * act'(mul * pre + add) on its tile (the norm's (mul, add) as project_epilogue_kernel's), and the
    tile's partial sums of the norm's gradients in row pid 0 of part (T, 2C), in the accumulation dtype:
    sum d | sum d * u (u: pre for a folded norm, the normalised value with batch statistics), each a fixed-order
    tree sum over the tile's pixels (``launch._column_sums`` adds the rows in a fixed order). STORE (no batch
    statistics: the norm's derivative is per channel): dy = d * mul, the gradient at pre, rounded to dy's
    dtype; with batch statistics nothing full-size is stored (norm_grad_kernel recomputes d once the sums are
    known)."""
    d, u, mul, _rstd, n, q, oy, ox, c, cm, m2 = _act_grad_tile(
        g, g_n, g_c, g_h, g_w, pre, p_n, p_c, p_h, p_w, norm_a, norm_b, gamma, beta, eps, N, C, H, W,
        NORM, HAS_GAMMA, HAS_BETA, ACT, FLAT, F64, BLOCK_P, BLOCK_C)
    if STORE:
        tl.store(dy + _at(n, q, oy, ox, y_n, y_h, y_w, FLAT)[:, None] + c[None, :] * y_c,
                 K._cast(d * mul[None, :], dy.dtype.element_ty), mask=m2)
    row = part + tl.program_id(0) * 2 * C
    tl.store(row + c, tl.sum(d, axis=0), mask=cm)
    tl.store(row + C + c, tl.sum(tl.where(m2, d * u, 0.0), axis=0), mask=cm)


@triton.jit
def norm_grad_kernel(g, g_n, g_c, g_h, g_w, pre, p_n, p_c, p_h, p_w, dy, y_n, y_c, y_h, y_w, sums,
                     mean, var, gamma, beta, eps: tl.float64, N, C, H, W,
                     HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACT: tl.constexpr, FLAT: tl.constexpr,
                     F64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid: as act_grad_kernel's. One program: the gradient at pre through a norm with batch statistics,
    dy = gamma * rstd * (d - sum d / M - xhat * sum d * xhat / M) (M = N * H * W), with d recomputed as
    act_grad_kernel's and the sums (sum d | sum d * xhat) the column sums of its partials; rounded to dy's
    dtype."""
    d, xhat, _mul, rstd, n, q, oy, ox, c, cm, m2 = _act_grad_tile(
        g, g_n, g_c, g_h, g_w, pre, p_n, p_c, p_h, p_w, mean, var, gamma, beta, eps, N, C, H, W,
        2, HAS_GAMMA, HAS_BETA, ACT, FLAT, F64, BLOCK_P, BLOCK_C)
    total = N * H * W
    ma = tl.load(sums + c, mask=cm, other=0.0).to(d.dtype) / total
    mb = tl.load(sums + C + c, mask=cm, other=0.0).to(d.dtype) / total
    w = rstd
    if HAS_GAMMA:
        w = w * tl.load(gamma + c, mask=cm, other=1.0).to(d.dtype)
    r = w[None, :] * (d - ma[None, :] - xhat * mb[None, :])
    tl.store(dy + _at(n, q, oy, ox, y_n, y_h, y_w, FLAT)[:, None] + c[None, :] * y_c,
             K._cast(r, dy.dtype.element_ty), mask=m2)


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------
_ACT = {"none": K.ACT_NONE, "relu": K.ACT_RELU, "silu": K.ACT_SILU, "gelu": K.ACT_GELU}


def _tiles(pixels: int, channels: int) -> Tuple[int, int, Tuple[int, int]]:
    """(BLOCK_P, BLOCK_C, grid) of the elementwise and gather kernels (the interpreter gets few, large
    tiles: it pays per operation, not per element)."""
    block_p = 1024 if launch.interpreting() else 64
    block_c = launch._pow2(channels, 4, 64 if launch.interpreting() else 32)
    return block_p, block_c, (cdiv(pixels, block_p), cdiv(channels, block_c))


class _Norm:
    """A norm as the kernels take it (K._channel_affine): NORM_AFFINE with the folded (scale, shift), or
    NORM_BATCH with (mean, var), eps and the affine (gamma, beta); any of them may be absent."""

    def __init__(self, scale: Optional[Tensor], shift: Optional[Tensor], mean: Optional[Tensor] = None,
                 var: Optional[Tensor] = None, eps: float = 0.0, batch: bool = False):
        self.batch, self.eps = batch, float(eps)
        if batch:
            self.kind, self.a, self.b, self.gamma, self.beta = K.NORM_BATCH, mean, var, scale, shift
        else:
            self.kind, self.a, self.b, self.gamma, self.beta = K.NORM_AFFINE, scale, shift, None, None

    def args(self, like: Tensor) -> list:
        d = like
        return [self.a if self.a is not None else d, self.b if self.b is not None else d,
                self.gamma if self.gamma is not None else d, self.beta if self.beta is not None else d, self.eps]

    def meta(self) -> dict:
        if self.batch:
            return dict(NORM=K.NORM_BATCH, HAS_GAMMA=self.gamma is not None, HAS_BETA=self.beta is not None)
        return dict(NORM=K.NORM_AFFINE, HAS_GAMMA=self.a is not None, HAS_BETA=self.b is not None)


def _launch(kernel, grid, *args, **meta) -> None:
    """A launch with the kernels' register limit (``launch._pinned``: without it Triton 3.7 and later let ptxas
    spill project_epilogue_kernel at 40 registers)."""
    launch._launch(launch._pinned(kernel), grid, *args, **meta)


def _epilogue(acc: Optional[Tensor], parts: list, bias: Optional[Tensor], norm: Optional[_Norm], act: str,
              pre: Optional[Tensor], out: Optional[Tensor], like: Tensor,
              stats: Optional[Tuple[Tensor, Tensor]] = None) -> None:
    """project_epilogue_kernel over ``like``'s shape: the sum of ``acc`` (None: 0), ``bias`` and the parts
    (each (maps, its up taps (y, x), KS)) stored in ``pre`` (if given), then ``norm`` (None: none) and ``act``
    applied into ``out`` (if given). One launch per MAX_PARTS parts: a later launch adds its parts to the sum
    the previous one stored (in ``pre``, else in ``out``; in float16 / bfloat16 in a float32 buffer instead, so
    that the sum is rounded once); each element is read and written by one program, so ``acc``, ``pre`` and
    ``out`` may be one tensor. ``stats``: (part_mean, part_m2), (tiles, P) buffers the last launch writes its
    tiles' partial statistics of the stored ``pre`` into (``_sum_with_statistics``)."""
    N, P, H, W = like.shape
    if N * P * H * W == 0:
        return
    block_p, block_c, grid = _tiles(N * H * W, P)
    chunks = [parts[i:i + MAX_PARTS] for i in range(0, len(parts), MAX_PARTS)] or [[]]
    d = like  # stands in for absent pointers (never read)
    nrm = norm if norm is not None else _Norm(None, None)
    sums = pre if pre is not None else out
    if len(chunks) > 1 and launch._acc_dtype(like.dtype) != like.dtype:  # the sums between launches unrounded
        sums = launch._empty(like.shape, launch._acc_dtype(like.dtype), like.device, launch._fmt(like))
    part_mean, part_m2 = stats if stats is not None else (d, d)
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        src = acc if i == 0 else sums
        into = pre if last else sums
        slots = []
        for s in range(MAX_PARTS):
            t, (ty, tx), ks = chunk[s] if s < len(chunk) else (d, _identity_pair(1, d), 1)
            slots += [t, *t.stride(), ty.idx, ty.w, ty.taps, tx.idx, tx.w, tx.taps, ks]
        a, q, o = (t if t is not None else d for t in (src, into, out if last else None))
        _launch(project_epilogue_kernel, grid, a, *a.stride(), q, *q.stride(), o, *o.stride(),
                bias if bias is not None else d, *nrm.args(d), part_mean, part_m2, *slots, N, P, H, W,
                PARTS=len(chunk), HAS_ACC=src is not None, HAS_BIAS=bias is not None and i == 0,
                STORE_PRE=into is not None, STORE_OUT=last and out is not None,
                STATS=last and stats is not None and into is not None, ACT=_ACT[act],
                FLAT=all(launch._dense_rows(t) for t in (a, q, o)), F64=like.dtype == torch.float64,
                BLOCK_P=block_p, BLOCK_C=block_c, **nrm.meta())


def _sum_with_statistics(acc: Optional[Tensor], parts: list, bias: Optional[Tensor], pre: Tensor
                         ) -> Tuple[Tensor, Tensor]:
    """The projection's pre-activation (``_epilogue``'s sum) stored in ``pre``, and its batch mean and biased
    variance over (N, H, W) in the accumulation dtype: the last epilogue launch writes each tile's (mean, M2) of
    the stored values, the block's stats_combine_kernel combines them in tile order (``launch.combine_statistics``:
    parameter-sized, deterministic; a one-signed Inf keeps the mean Inf as ATen's sum / count, NaN propagates).
    No torch op reads the full-size ``pre``."""
    N, P, H, W = pre.shape
    if pre.numel() == 0:
        return _batch_statistics(pre)
    block_p, _, grid = _tiles(N * H * W, P)
    sdt = launch._acc_dtype(pre.dtype)
    stats = (launch._empty((grid[0], P), sdt, pre.device), launch._empty((grid[0], P), sdt, pre.device))
    _epilogue(acc, parts, bias, None, "none", pre, None, pre, stats)
    return launch.combine_statistics(*stats, N * H * W, block_p)


def _gather(src: Tensor, dst: Tensor, ty: "_Taps", tx: "_Taps", ks: int = 1, p: Optional[int] = None,
            accumulate: bool = False) -> None:
    """dst (+)= the separable gather of src over the tables ty, tx (per destination row / column), shifted per
    tap of a ks x ks kernel (channel tap * p + q of dst reads channel q of src). Onto a smaller map whose
    columns read runs of source columns (an up-resize's adjoint): ``_reduce``; else one gather_kernel launch
    (an up-resize, a down-resize's adjoint: a handful of taps per destination pixel)."""
    N, CD, HD, WD = dst.shape
    if dst.numel() == 0:
        return
    if tx.run and HD * WD < src.shape[2] * src.shape[3]:
        _reduce(src, dst, ty, tx, ks, p, accumulate)
        return
    block_p, block_c, grid = _tiles(N * HD * WD, CD)
    _launch(gather_kernel, grid, src, *src.stride(), dst, *dst.stride(), *ty[:3], *tx[:3],
            N, CD, HD, WD, p if p is not None else CD, src.shape[2], src.shape[3], ks, HD, ty.taps,
            ACCUMULATE=accumulate, FLAT=launch._dense_rows(dst), F64=dst.dtype == torch.float64,
            BLOCK_P=block_p, BLOCK_C=block_c)


def _reduce(src: Tensor, dst: Tensor, ty: "_Taps", tx: "_Taps", ks: int, p: Optional[int], accumulate: bool) -> None:
    """``_gather`` onto a smaller map: one adjoint_kernel launch; or, where one program would loop over more than
    ``launch.ADJOINT_STEPS`` tap vectors (a small level's adjoint reads most of the map), two, as the block's
    split reductions: the reader rows in chunks, their partial sums stacked along the rows of one buffer in
    the accumulation dtype, then summed in chunk order (``stacked_taps``; no atomics, bit-identical run to
    run)."""
    N, CD, HD, WD = dst.shape
    block_c = _tiles(1, CD)[1]
    tile = launch._run_tile(tx.typical, WD, block_c, False)
    rows = max(1, launch.ADJOINT_STEPS // cdiv(tx.taps, tile["TAPS"]))  # reader rows per chunk
    if ty.taps <= rows:
        _reduce_launch(src, dst, ty, tx, HD, ty.taps, ks, p, accumulate, tile, block_c)
        return
    chunks = cdiv(ty.taps, rows)
    part = launch._empty((N, CD, chunks * HD, WD), launch._acc_dtype(dst.dtype), dst.device, launch._fmt(dst))
    _reduce_launch(src, part, ty, tx, HD, rows, ks, p, False, tile, block_c)
    sums = _fwd(stacked_taps(HD, chunks, 0, dst.dtype, dst.device))
    ident = _fwd(axis_taps("identity", WD, WD, 0, False, dst.dtype, dst.device))
    _reduce_launch(part, dst, sums, ident, HD, chunks, 1, None, accumulate,
                   launch._run_tile(1, WD, block_c, True), block_c)


def _reduce_launch(src: Tensor, dst: Tensor, ty: "_Taps", tx: "_Taps", rows: int, per_chunk: int, ks: int,
                   p: Optional[int], accumulate: bool, tile: dict, block_c: int) -> None:
    """One adjoint_kernel launch: dst's rows are chunks of ``rows`` rows, each summing ``per_chunk`` reader rows."""
    N, CD, HD, WD = dst.shape
    grid = (N * HD * cdiv(WD, tile["BLOCK_X"]), cdiv(CD, block_c))
    _launch(adjoint_kernel, grid, src, *src.stride(), dst, *dst.stride(), ty.idx, ty.w, ty.taps, ty.count,
            tx.idx, tx.w, tx.taps, tx.count, N, CD, HD, WD, p if p is not None else CD, src.shape[2],
            src.shape[3], ks, rows, per_chunk, ACCUMULATE=accumulate, SHIFT=ks > 1,
            F64=dst.dtype == torch.float64, BLOCK_C=block_c, **tile)


@cost_model(project_epilogue_kernel)
def _epilogue_cost(a):
    """Plan model (estimates): a (BLOCK_P output pixels, BLOCK_C channels) tile per program; its sum read
    (HAS_ACC), then each part's taps in turn (KS x KS shifts times the up-resize's y and x taps: the loops of
    one program add up), the pre-activation and / or the output stored; STATS: each tile's row of partial
    statistics (mean, M2) too."""
    N, P, H, W, bp, bc = a["N"], a["P"], a["H"], a["W"], a["BLOCK_P"], a["BLOCK_C"]
    px = N * H * W
    parts = range(a["PARTS"])
    serial = max(1, sum(a[f"KS{s}"] ** 2 * a[f"TY{s}"] * a[f"TX{s}"] for s in parts))
    read = (nbytes(a["acc_in"], px * P) if a["HAS_ACC"] else 0) + sum(nbytes(a[f"t{s}"]) for s in parts)
    written = nbytes(a["pre"], px * P) * int(a["STORE_PRE"]) + nbytes(a["out"], px * P) * int(a["STORE_OUT"])
    written += 2 * nbytes(a["part_mean"], cdiv(px, bp) * P) * int(a["STATS"])
    what = f"sum of {a['PARTS']} parts" if a["PARTS"] else ("norm, activation" if a["STORE_OUT"] else "sum")
    what += ", partial statistics" if a["STATS"] else ""
    return [Part(what, cdiv(px, bp) * cdiv(P, bc), min(bp, px) * min(bc, P), serial, read, written)]


@cost_model(gather_kernel)
def _gather_cost(a):
    """Plan model (estimates): a (BLOCK_P destination pixels, BLOCK_C channels) tile per program, looping over
    its chunk's R y taps times every x tap; each source element read once at most."""
    src, dst, N, CD, HD, WD, bp, bc = a["src"], a["dst"], a["N"], a["CD"], a["HD"], a["WD"], a["BLOCK_P"], a["BLOCK_C"]
    px, chunks = N * HD * WD, HD // a["HT"]
    taps = a["R"] * a["TX"]
    src_elements = N * min(a["P"], CD) * a["HS"] * a["WS"]
    read = nbytes(src, min(src_elements, px * CD * taps)) + (nbytes(dst, px * CD) if a["ACCUMULATE"] else 0)
    what = f"gather {a['HS']}x{a['WS']} -> {a['HT']}x{WD}" + (f" in {chunks} chunks" if chunks > 1 else "")
    return [Part(what, cdiv(px, bp) * cdiv(CD, bc), min(bp, px) * min(bc, CD), taps, read, nbytes(dst, px * CD))]


@cost_model(adjoint_kernel)
def _adjoint_cost(a):
    """Plan model (estimates): a (BLOCK_C channels, BLOCK_X destination columns of a row, TAPS readers) tile per
    program, looping over its chunk's R reader rows times the tap vectors; each source element read once at
    most."""
    src, dst, N, CD, HD, WD, bc = a["src"], a["dst"], a["N"], a["CD"], a["HD"], a["WD"], a["BLOCK_C"]
    px, chunks, bx = N * HD * WD, HD // a["HT"], a["BLOCK_X"]
    src_elements = N * min(a["P"], CD) * a["HS"] * a["WS"]
    read = nbytes(src, min(src_elements, px * CD * a["R"] * a["TX"])) + (nbytes(dst, px * CD) if a["ACCUMULATE"] else 0)
    what = f"adjoint {a['HS']}x{a['WS']} -> {a['HT']}x{WD}" + (f" in {chunks} chunks" if chunks > 1 else "")
    return [Part(what, N * HD * cdiv(WD, bx) * cdiv(CD, bc), min(bc, CD) * min(bx, WD) * min(a["TAPS"], a["TX"]),
                 min(a["R"], a["TY"]) * cdiv(a["TX"], a["TAPS"]), read, nbytes(dst, px * CD))]


@cost_model(act_grad_kernel)
def _act_grad_cost(a):
    """Plan model (estimates): an elementwise (BLOCK_P pixels, BLOCK_C channels) tile per program reading g and
    pre; its row of partial sums written, and (STORE) the gradient at pre."""
    N, C, H, W, bp, bc = a["N"], a["C"], a["H"], a["W"], a["BLOCK_P"], a["BLOCK_C"]
    px = N * H * W
    written = nbytes(a["part"], cdiv(px, bp) * 2 * C) + (nbytes(a["dy"], px * C) if a["STORE"] else 0)
    return [Part("activation gradient" + (", partial sums" if a["STORE"] else ": partial sums"),
                 cdiv(px, bp) * cdiv(C, bc), min(bp, px) * min(bc, C), 1,
                 nbytes(a["g"], px * C) + nbytes(a["pre"], px * C), written)]


@cost_model(norm_grad_kernel)
def _norm_grad_cost(a):
    """Plan model (estimates): an elementwise (BLOCK_P pixels, BLOCK_C channels) tile per program reading g, pre
    and the column sums, writing the gradient at pre."""
    N, C, H, W, bp, bc = a["N"], a["C"], a["H"], a["W"], a["BLOCK_P"], a["BLOCK_C"]
    px = N * H * W
    return [Part("norm gradient", cdiv(px, bp) * cdiv(C, bc), min(bp, px) * min(bc, C), 1,
                 nbytes(a["g"], px * C) + nbytes(a["pre"], px * C) + nbytes(a["sums"]), nbytes(a["dy"], px * C))]


class _Taps(NamedTuple):
    """One axis's tables as a gather reads them (``AxisTaps``' forward or adjoint side): per destination
    index its source indices and weights (``taps`` wide), their count, whether they are runs, the median count."""

    idx: Tensor
    w: Tensor
    taps: int
    count: Tensor
    run: bool
    typical: int


def _fwd(t: AxisTaps) -> _Taps:
    return _Taps(t.idx, t.w, t.taps, t.count, t.run, t.typical)


def _adj(t: AxisTaps) -> _Taps:
    return _Taps(t.adj_idx, t.adj_w, t.adj_taps, t.adj_count, t.adj_run, t.adj_typical)


def _identity_pair(n: int, like: Tensor) -> Tuple[AxisTaps, AxisTaps]:
    t = axis_taps("identity", n, n, 0, False, like.dtype, like.device)
    return t, t


# ---------------------------------------------------------------------------------------------------
# The composition
# ---------------------------------------------------------------------------------------------------
def _level_size(factor: int, bins: List[int], b: int, H: int, W: int) -> Tuple[int, int]:
    return (H // factor, W // factor) if factor > 0 else (bins[2 * b], bins[2 * b + 1])


def _down(factor: int, down_mode: str, H: int, W: int, h: int, w: int, ac: bool, like: Tensor):
    kind = "adaptive" if factor == 0 else down_mode
    return (axis_taps(kind, H, h, factor, ac, like.dtype, like.device),
            axis_taps(kind, W, w, factor, ac, like.dtype, like.device))


def _up(up_mode: str, h: int, w: int, H: int, W: int, ac: bool, like: Tensor):
    return (axis_taps("identity" if h == H else up_mode, h, H, 0, ac, like.dtype, like.device),
            axis_taps("identity" if w == W else up_mode, w, W, 0, ac, like.dtype, like.device))


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _batch_statistics(pre: Tensor) -> Tuple[Tensor, Tensor]:
    """Batch mean and biased variance over (N, H, W), as the CPU backend's batch_statistics: where var_mean's
    running mean of a channel is not finite (one-signed Inf), the mean as ATen's batch norm takes it."""
    p = pre.to(_stats_dtype(pre.dtype))
    var, mean = torch.var_mean(p, dim=(0, 2, 3), correction=0)
    return torch.where(torch.isfinite(mean), mean, p.mean((0, 2, 3))), var


_cudnn_flag_lock = threading.Lock()


@contextlib.contextmanager
def _deterministic_convolutions():
    """cuDNN asked for deterministic algorithms for the convolutions (gradients bit-identical run to run),
    whatever torch.backends.cudnn.deterministic says; TF32 and benchmarking as the user set them. The flag is
    global: the lock keeps concurrent calls from restoring it under each other (as the CUDA backend's
    DeterministicConvolutions)."""
    with _cudnn_flag_lock:
        saved = torch.backends.cudnn.deterministic
        torch.backends.cudnn.deterministic = True
        try:
            yield
        finally:
            torch.backends.cudnn.deterministic = saved


def _conv(z: Tensor, w: Tensor, bias: Optional[Tensor], pad: int, fmt) -> Tensor:
    return F.conv2d(z, w, bias, padding=pad).contiguous(memory_format=fmt)


def _tap_weight(pw: Tensor, offset: int, count: int, cached: bool = False) -> Tensor:
    """The projection weight's part for channels [offset, offset + count) as one 1x1 convolution to k * k * P
    channels in the per-tap maps' dtype (``_ops.tap_weight`` / ``tap_maps_dtype``: a view of pw for k = 1 in
    float32 / float64, else a copy). ``cached`` (a call no gradient flows through: the forward without save_pre)
    takes the copy from the functional layer's parameter cache, made once per version of pw (as the block's
    packed weights, ``launch._packed_weight``); a training call copies."""
    view = pw.shape[2] == 1 and _ops.tap_maps_dtype(pw.dtype) == pw.dtype
    if view or not cached:
        return _ops.tap_weight(pw, offset, count).to(_ops.tap_maps_dtype(pw.dtype))

    def copy():
        t = _ops.tap_weight(pw, offset, count).to(_ops.tap_maps_dtype(pw.dtype))
        return t.clone() if t._base is not None else t  # (P = 1: a view, which would keep pw alive)

    return PARAM_CACHE.get(pw, f"triton.tap_weight.{offset}.{count}", (pw,), (), copy)


def _slice_weight(pw: Tensor, offset: int, count: int, cached: bool = False) -> Tensor:
    """The projection weight's slice for channels [offset, offset + count) of the concatenation (P, count, k, k),
    as its own convolution takes it: a view of pw, which the convolution copies into a dense weight (cuDNN),
    unless ``cached`` (a call no gradient flows through): then that dense copy from the functional layer's
    parameter cache, made once per version of pw."""
    view = pw[:, offset:offset + count]
    if not cached:
        return view
    fmt = launch._fmt(pw)
    return PARAM_CACHE.get(pw, f"triton.slice.{offset}.{count}", (pw,), (),
                           lambda: view.clone(memory_format=fmt))


def _offsets(weight: List[Tensor], C: int, input_position: str) -> Tuple[List[int], int]:
    offsets, o = [], C if input_position == "first" else 0
    for w in weight:
        offsets.append(o)
        o += w.shape[0]
    return offsets, 0 if input_position == "first" else (o if input_position == "last" else -1)


class _Branch:
    """One branch's geometry within a call."""

    def __init__(self, b, factor, bins, H, W, k):
        self.h, self.w = _level_size(factor[b], bins, b, H, W)
        self.identity = factor[b] == 1
        self.whole = _ops.convolves_resized(self.identity, self.h, self.w, k, H, W)


def _activation(pre_b: Tensor, norm: _Norm, act: str, up, fmt) -> Tuple[Tensor, Optional[Tensor]]:
    """A branch's activation at its level, and (``up``: its up tables, for a direct branch) resized up."""
    a = launch._empty(pre_b.shape, pre_b.dtype, pre_b.device, fmt)
    _epilogue(pre_b, [], None, norm, act, None, a, pre_b)
    if up is None:
        return a, None
    N, Cb = pre_b.shape[:2]
    full = launch._empty((N, Cb, up[0].idx.shape[0], up[1].idx.shape[0]), pre_b.dtype, pre_b.device, fmt)
    _gather(a, full, _fwd(up[0]), _fwd(up[1]))
    return a, full


def project_forward(x, weight, bias, scale, shift, batch_stats, eps, factor, bins, down_mode, up_mode, align_corners,
                    activation, input_position, pw, p_bias, p_scale, p_shift, p_batch_stats, p_eps, p_activation,
                    save_pre):
    """The block and its projection (see ``msfused::multi_scale_project_forward``): absent tensors None."""
    N, C, H, W = x.shape
    P, k = pw.shape[0], pw.shape[2]
    pad = k // 2
    launch.check_index_limit(x, P)  # the per-tap maps are smaller than the output (_ops.convolves_resized)
    fmt = launch._fmt(x)
    x = x.contiguous(memory_format=fmt)
    dt, dev = x.dtype, x.device
    offsets, x_off = _offsets(weight, C, input_position)
    B = len(weight)
    level, pre, mean, var, parts = [], [], [], [], []
    sdt, tdt = _stats_dtype(dt), _ops.tap_maps_dtype(dt)
    # Every level other than x itself: the block's pool_kernel (bins) / levels_kernel (factors), up to 4 levels
    # per launch, split into chunks that fill the GPU (+1 launch sums their partials in a fixed order).
    pooled = [b for b in range(B) if factor[b] != 1]
    levels = {}
    for i in range(0, len(pooled), K.MAX_SLOTS):
        made = launch._launch_levels(x, x, 0, False, pooled[i:i + K.MAX_SLOTS], factor, bins, down_mode,
                                     align_corners)
        levels.update({b: lev for b, (lev, _) in made.items()})
    with _deterministic_convolutions():
        for b in range(B):
            g = _Branch(b, factor, bins, H, W, k)
            z = x if g.identity else levels[b]
            level.append(x.new_empty(0) if g.identity else z)
            pre_b = _conv(z, weight[b], bias[b], weight[b].shape[2] // 2, fmt)
            pre.append(pre_b)
            if batch_stats[b]:
                m, v = _batch_statistics(pre_b)
            else:
                m, v = x.new_empty(0, dtype=sdt), x.new_empty(0, dtype=sdt)
            mean.append(m)
            var.append(v)
            norm = _Norm(scale[b], shift[b], m, v, eps[b], batch_stats[b])
            up = _up(up_mode, g.h, g.w, H, W, align_corners, x) if g.whole and not g.identity else None
            a, full = _activation(pre_b, norm, activation, up, fmt)
            cb, off = weight[b].shape[0], offsets[b]
            if g.whole:
                parts.append((_conv(full if full is not None else a, _slice_weight(pw, off, cb, not save_pre), None,
                                    pad, fmt),
                              _identity_pair(H, x)[:1] + _identity_pair(W, x)[:1], 1))
            else:  # the per-tap maps in opmath (_ops.tap_maps_dtype: partial sums, not rounded to x's dtype)
                parts.append((_conv(a.to(tdt), _tap_weight(pw, off, cb, cached=not save_pre), None, 0, fmt),
                              _up(up_mode, g.h, g.w, H, W, align_corners, x), k))
        acc = _conv(x, _slice_weight(pw, x_off, C, not save_pre), None, pad, fmt) if x_off >= 0 else None
    p_pre = launch._empty((N, P, H, W), dt, dev, fmt)
    fused = not p_batch_stats  # the norm is known before the sum: one pass writes the output
    out = launch._empty((N, P, H, W), dt, dev, fmt) if save_pre else p_pre  # else in place of the sum
    if fused:
        _epilogue(acc, parts, p_bias, _Norm(p_scale, p_shift), p_activation, p_pre if save_pre else None, out, p_pre)
        p_mean, p_var = x.new_empty(0, dtype=sdt), x.new_empty(0, dtype=sdt)
    else:
        p_mean, p_var = _sum_with_statistics(acc, parts, p_bias, p_pre)
        _epilogue(p_pre, [], None, _Norm(p_scale, p_shift, p_mean, p_var, p_eps, True), p_activation, None, out, p_pre)
    return out, level, pre, mean, var, (p_pre if save_pre else x.new_empty(0)), p_mean, p_var


def _epilogue_backward(grad: Tensor, pre_b: Tensor, norm: _Norm, act: str, fmt):
    """The backward of act(norm(pre)) (bias before the norm): the gradient at pre and of the norm's scale and
    shift and of the bias (csrc/norm.h's batch_norm_grad), deterministic: act_grad_kernel's per-tile partial
    sums (sum d | sum d * u, d = g * act') added in a fixed order by the block's column_sums_kernel. Without
    batch statistics one full-size pass (it also writes the gradient at pre, d * scale); with them two: the
    partials, then norm_grad_kernel once the sums are known. The bias gradient is sum d * scale (exactly 0
    before batch statistics, as the block's backward has it)."""
    N, C, H, W = pre_b.shape
    dy = launch._empty(pre_b.shape, pre_b.dtype, pre_b.device, fmt)
    acc = launch._acc_dtype(pre_b.dtype)
    sums = (launch._empty if dy.numel() else torch.zeros)((2 * C,), dtype=acc, device=pre_b.device)
    if dy.numel():
        block_p, block_c, grid = _tiles(N * H * W, C)
        part = launch._empty((grid[0], 2 * C), acc, pre_b.device)
        gs, ps, ys = grad.stride(), pre_b.stride(), dy.stride()
        common = dict(ACT=_ACT[act], FLAT=all(launch._dense_rows(t) for t in (grad, pre_b, dy)),
                      F64=pre_b.dtype == torch.float64, BLOCK_P=block_p, BLOCK_C=block_c)
        _launch(act_grad_kernel, grid, grad, *gs, pre_b, *ps, dy, *ys, part, *norm.args(pre_b), N, C, H, W,
                STORE=not norm.batch, **common, **norm.meta())
        launch._column_sums([(part, sums)])
        if norm.batch:
            a, b, gamma, beta, eps = norm.args(pre_b)
            _launch(norm_grad_kernel, grid, grad, *gs, pre_b, *ps, dy, *ys, sums, a, b, gamma, beta, eps,
                    N, C, H, W, HAS_GAMMA=norm.gamma is not None, HAS_BETA=norm.beta is not None, **common)
    sum_d, sum_du = sums[:C], sums[C:]
    scale_t, shift_t = (norm.gamma, norm.beta) if norm.batch else (norm.a, norm.b)
    # copies: an operator's outputs must not share storage (sums holds both)
    grad_scale = sum_du.to(scale_t.dtype, copy=True) if scale_t is not None else pre_b.new_empty(0)
    grad_shift = sum_d.to(shift_t.dtype, copy=True) if shift_t is not None else pre_b.new_empty(0)
    if norm.batch:
        grad_bias = torch.zeros((C,), dtype=pre_b.dtype, device=pre_b.device)
    else:
        grad_bias = (sum_d * norm.a.to(acc) if norm.a is not None else sum_d).to(pre_b.dtype, copy=True)
    return dy, grad_scale, grad_shift, grad_bias


def project_backward(grad_out, x, weight, scale, shift, level, pre, mean, var, batch_stats, eps, factor, bins,
                     down_mode, up_mode, align_corners, activation, input_position, pw, p_scale, p_shift, p_pre,
                     p_mean, p_var, p_batch_stats, p_eps, p_activation, output_mask):
    """Gradients of the block and its projection (see ``msfused::multi_scale_project_backward``)."""
    if p_pre.shape != grad_out.shape:
        raise ValueError("msfused: the projection's pre-activation was not saved (forward with save_pre=False), "
                         "so there is no backward")
    N, C, H, W = x.shape
    P, k = pw.shape[0], pw.shape[2]
    pad = k // 2
    fmt = launch._fmt(x)
    x = x.contiguous(memory_format=fmt)
    grad = grad_out.to(x.dtype).contiguous(memory_format=fmt)
    need_x, need_w = bool(output_mask[0]), bool(output_mask[1])
    offsets, x_off = _offsets(weight, C, input_position)
    B = len(weight)
    tdt = _ops.tap_maps_dtype(x.dtype)
    # The projection's epilogue backward: the gradient of its pre-activation (bias included).
    pnorm = _Norm(p_scale, p_shift, p_mean, p_var, p_eps, p_batch_stats)
    dpre, grad_p_scale, grad_p_shift, grad_p_bias = _epilogue_backward(grad, p_pre.contiguous(memory_format=fmt),
                                                                       pnorm, p_activation, fmt)
    grad_pw = torch.zeros_like(pw) if need_w else x.new_empty(0)
    dx = None
    grad_weight, grad_bias, grad_scale, grad_shift, dz = [], [], [], [], []
    with _deterministic_convolutions():
        if x_off >= 0 and (need_x or need_w):
            gx, gw, _ = torch.ops.aten.convolution_backward(
                dpre, x, pw[:, x_off:x_off + C].contiguous(), None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1,
                [need_x, need_w, False])
            if need_x:
                dx = gx.contiguous(memory_format=fmt)
            if need_w:
                grad_pw[:, x_off:x_off + C] = gw
        for b in range(B):
            g = _Branch(b, factor, bins, H, W, k)
            cb, off = weight[b].shape[0], offsets[b]
            pre_b = pre[b].to(x.dtype).contiguous(memory_format=fmt)
            norm = _Norm(scale[b], shift[b], mean[b], var[b], eps[b], batch_stats[b])
            up = _up(up_mode, g.h, g.w, H, W, align_corners, x)
            a, full = _activation(pre_b, norm, activation, up if g.whole and not g.identity else None, fmt)
            if g.whole:
                gz, gw, _ = torch.ops.aten.convolution_backward(
                    dpre, full if full is not None else a, pw[:, off:off + cb].contiguous(), None, [1, 1],
                    [pad, pad], [1, 1], False, [0, 0], 1, [True, need_w, False])
                if full is not None:  # the up-resize's adjoint, a gather at the level
                    da = launch._empty(a.shape, a.dtype, a.device, fmt)
                    _gather(gz.contiguous(memory_format=fmt), da, _adj(up[0]), _adj(up[1]))
                else:
                    da = gz.contiguous(memory_format=fmt)
                if need_w:
                    grad_pw[:, off:off + cb] = gw
            else:  # the per-tap maps' gradient: the adjoint of the shifted up-resize, a gather at the level, in
                # opmath as the maps (_ops.tap_maps_dtype); a's gradient rounded once to its dtype, the weight's
                # part's once into grad_pw
                dt_b = launch._empty((N, k * k * P, g.h, g.w), tdt, x.device, fmt)
                _gather(dpre, dt_b, _adj(up[0]), _adj(up[1]), ks=k, p=P)
                gz, gw, _ = torch.ops.aten.convolution_backward(
                    dt_b, a.to(tdt), _tap_weight(pw, off, cb), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                    [True, need_w, False])
                da = gz.to(a.dtype).contiguous(memory_format=fmt)
                if need_w:  # (k * k * P, Cb, 1, 1) back to the (P, Cb, k, k) slice
                    grad_pw[:, off:off + cb] = gw.reshape(k, k, P, cb).permute(2, 3, 0, 1)
            dconv, gs, gt, _ = _epilogue_backward(da, pre_b, norm, activation, fmt)
            grad_scale.append(gs)
            grad_shift.append(gt)
            z = x if g.identity else level[b].to(x.dtype).contiguous(memory_format=fmt)
            kb = weight[b].shape[2]
            gz, gw, gb = torch.ops.aten.convolution_backward(
                dconv, z, weight[b], [cb], [1, 1], [kb // 2, kb // 2], [1, 1], False, [0, 0], 1,
                [need_x, need_w, True])
            dz.append(gz.contiguous(memory_format=fmt) if need_x else None)
            grad_weight.append(gw.contiguous(memory_format=launch._fmt(weight[b])) if need_w else x.new_empty(0))
            grad_bias.append(gb)
    grad_x = x.new_empty(0)
    if need_x:
        # dx written branch after branch (a fixed order): the x part's gradient, then each branch's adjoint
        # down-resize (a gather), x itself's gradient added as it is.
        grad_x = dx if dx is not None else torch.zeros((N, C, H, W), dtype=x.dtype, device=x.device).contiguous(
            memory_format=fmt)
        for b in range(B):
            g = _Branch(b, factor, bins, H, W, k)
            if g.identity:
                grad_x = grad_x + dz[b]
                continue
            ty, tx = _down(factor[b], down_mode, H, W, g.h, g.w, align_corners, x)
            _gather(dz[b], grad_x, _adj(ty), _adj(tx), accumulate=True)
        grad_x = grad_x.contiguous(memory_format=fmt)
    if not need_w:
        grad_pw = x.new_empty(0)
    return grad_x, grad_weight, grad_bias, grad_scale, grad_shift, grad_pw, grad_p_bias, grad_p_scale, grad_p_shift


# ---------------------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------------------
_FORWARD = "msfused::multi_scale_project_forward_triton"
_BACKWARD = "msfused::multi_scale_project_backward_triton"


def _opt(tensors: List[Tensor]) -> List[Optional[Tensor]]:
    return [t if t.numel() else None for t in tensors]


@torch.library.triton_op(_FORWARD, mutates_args=())
def multi_scale_project_forward_triton(
    x: Tensor, weight: List[Tensor], bias: List[Tensor], scale: List[Tensor], shift: List[Tensor],
    batch_stats: List[bool], eps: List[float], factor: List[int], bins: List[int], down_mode: str, up_mode: str,
    align_corners: bool, activation: str, input_position: str, project_weight: Tensor,
    project_bias: Optional[Tensor], project_scale: Optional[Tensor], project_shift: Optional[Tensor],
    project_batch_stats: bool, project_eps: float, project_activation: str, save_pre: bool,
) -> Tuple[Tensor, List[Tensor], List[Tensor], List[Tensor], List[Tensor], Tensor, Tensor, Tensor]:
    """The block and its projection in Triton kernels and torch's convolutions; see
    ``msfused::multi_scale_project_forward`` for the arguments (absent per-branch tensors: empty ones)."""
    return project_forward(x, weight, _opt(bias), _opt(scale), _opt(shift), batch_stats, eps, factor, bins,
                           down_mode, up_mode, align_corners, activation, input_position, project_weight, project_bias,
                           project_scale, project_shift, project_batch_stats, project_eps, project_activation,
                           save_pre)


@torch.library.triton_op(_BACKWARD, mutates_args=())
def multi_scale_project_backward_triton(
    grad_out: Tensor, x: Tensor, weight: List[Tensor], scale: List[Tensor], shift: List[Tensor],
    level: List[Tensor], pre: List[Tensor], mean: List[Tensor], var: List[Tensor], batch_stats: List[bool],
    eps: List[float], factor: List[int], bins: List[int], down_mode: str, up_mode: str, align_corners: bool,
    activation: str, input_position: str, project_weight: Tensor, project_scale: Optional[Tensor],
    project_shift: Optional[Tensor], project_pre: Tensor, project_mean: Tensor, project_var: Tensor,
    project_batch_stats: bool, project_eps: float, project_activation: str, output_mask: List[bool],
) -> Tuple[Tensor, List[Tensor], List[Tensor], List[Tensor], List[Tensor], Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the block and its projection; see ``msfused::multi_scale_project_backward``."""
    return project_backward(grad_out, x, weight, _opt(scale), _opt(shift), level, pre, mean, var, batch_stats, eps,
                            factor, bins, down_mode, up_mode, align_corners, activation, input_position,
                            project_weight, project_scale, project_shift, project_pre, project_mean, project_var,
                            project_batch_stats, project_eps, project_activation, output_mask)


@multi_scale_project_forward_triton.register_fake
def _forward_fake(x, weight, bias, scale, shift, *config):
    return _ops.multi_scale_project_forward_fake(x, weight, _opt(bias), _opt(scale), _opt(shift), *config)


@multi_scale_project_backward_triton.register_fake
def _backward_fake(grad_out, x, weight, scale, shift, *rest):
    return _ops.multi_scale_project_backward_fake(grad_out, x, weight, _opt(scale), _opt(shift), *rest)


_BLOCK_CONFIG = 9  # batch_stats .. input_position: the arguments between the branches' tensors and the projection's


def _setup_context(ctx, inputs, output):
    # Only the block's output has a gradient (the other outputs are what backward needs): autograd passes None
    # for theirs instead of a zero tensor of each one's shape (an allocation and a fill apiece, per step).
    ctx.set_materialize_grads(False)
    x, weight, bias, scale, shift, *rest = inputs
    config = rest[:_BLOCK_CONFIG]
    pw, p_bias, p_scale, p_shift, p_stats, p_eps, p_act, _save_pre = rest[_BLOCK_CONFIG:]
    _out, level, pre, mean, var, p_pre, p_mean, p_var = output
    ctx.config, ctx.p_config, ctx.B = config, (p_stats, p_eps, p_act), len(weight)
    ctx.has = tuple([t.numel() > 0 for t in ts] for ts in (bias, scale, shift))
    ctx.p_has = (p_bias is not None, p_scale is not None, p_shift is not None)
    ctx.save_for_backward(x, pw, p_scale, p_shift, p_pre, p_mean, p_var, *weight, *scale, *shift, *level, *pre, *mean,
                          *var)


def _backward(ctx, grad_out, *_unused):
    if grad_out is None:  # (only the saved outputs reached the loss: they carry no gradient to the inputs)
        return (None,) + tuple([None] * ctx.B for _ in range(4)) + (None,) * (_BLOCK_CONFIG + 8)
    saved = list(ctx.saved_tensors)
    if torch.is_grad_enabled() and (grad_out.requires_grad or any(t is not None and t.requires_grad for t in saved)):
        raise RuntimeError("msfused: second-order gradients through the multi-scale block are not supported "
                           "(backward with create_graph=True)")
    (x, pw, p_scale, p_shift, p_pre, p_mean, p_var), saved = saved[:7], saved[7:]
    B = ctx.B
    weight, scale, shift, level, pre, mean, var = (saved[i * B:(i + 1) * B] for i in range(7))
    needs = ctx.needs_input_grad
    need_w = any(needs[1]) or needs[14]
    gx, gw, gb, gs, gt, gpw, gpb, gps, gpt = torch.ops.msfused.multi_scale_project_backward_triton(
        grad_out, x, weight, scale, shift, level, pre, mean, var, *ctx.config, pw, p_scale, p_shift, p_pre, p_mean,
        p_var, *ctx.p_config, [bool(needs[0]), bool(need_w)])
    none_if_absent = lambda gs_, flags: [g if f else None for g, f in zip(gs_, flags)]  # noqa: E731
    has_bias, has_scale, has_shift = ctx.has
    p_has_bias, p_has_scale, p_has_shift = ctx.p_has
    return ((gx if needs[0] else None), [g if n else None for g, n in zip(gw, needs[1])],
            none_if_absent(gb, has_bias), none_if_absent(gs, has_scale), none_if_absent(gt, has_shift),
            *(None,) * _BLOCK_CONFIG, gpw if needs[14] else None, gpb if p_has_bias else None,
            gps if p_has_scale else None, gpt if p_has_shift else None, None, None, None, None)


multi_scale_project_forward_triton.register_autograd(_backward, setup_context=_setup_context)
