// The fused multi-scale block on CUDA: the kernels behind backend 'cuda'. Needs only CUDA's own headers
// and the shared csrc/*.h helpers (the resize index math of csrc/resize.h is the CPU kernels' too); the
// torch binding is multi_scale_cuda.cpp.
//
// Launches per call (kernels that read or write activation-sized data; per-channel parameter work such as
// folding a norm into alpha/beta is a few tiny ATen ops in the binding and is not counted):
//
//   forward, factor pyramids, inference (no batch statistics) ........ 1  tile_forward<ConvEpilogue>
//       each block: one (n, branch, 16x16 level tile, 8 output channels); samples the level tile plus the
//       halo the convolution and the upsample need straight from x (the down-resize) into shared memory,
//       8 input channels at a time, convolves (fp32 accumulation; fp64 for double), adds the bias, applies
//       alpha/beta and the activation, and upsamples from shared memory into the branch's channel slice
//       of out. It also writes the level and pre (returned for backward), and extra blocks of the same
//       launch copy x into its slice.
//   forward, pyramid pooling, inference .............................. 2  pool_levels, tile_forward<ConvEpilogue>
//       pool_levels reads x once: every bin of every bins branch (column sums in shared memory, then the
//       bins), and x's slice of the output. Bins branches whose tables do not fit in shared memory are
//       sampled by the tile kernel from x instead (correct, slower).
//   forward with batch statistics (training BatchNorm) ......... +1  tile_forward<ConvOnly>, merge_stats,
//                                                                     tile_forward<EpilogueOnly>
//       i.e. 2 for factor pyramids, 3 for pyramid pooling, plus merge_stats, which touches only
//       per-channel partials: the conv pass also writes each tile's (count, mean, M2) per channel (double,
//       two passes over the values in registers, fixed-shape block sums); merge_stats merges them in
//       tile order (one thread per channel); the epilogue pass needs the whole batch's statistics.
//   backward: own kernels up_grad and dx read and write the activation-sized tensors (grad, dx); the rest
//   is level-sized or per-channel:
//       up_grad (upsample adjoint as a gather, activation and norm backward, per-(channel, chunk) partial
//       sums), reduce_partials (per-channel, fixed chunk order), [norm_grad: the batch-statistics
//       correction on the level], then per branch deterministic ATen work on the level-sized tensors: grad
//       bias (sum), grad weight (im2col + GEMM), grad of the level (a forward conv2d with the flipped
//       kernel); finally dx (only if x needs a gradient), written once: x's slice of grad + every
//       branch's down-resize adjoint (a gather, branches in order). For a factor-1 branch the "level" is
//       x itself, so its ATen work is activation-sized.
//   more than kMaxBranches (8) branches: the per-branch launches above repeat per group of 8.
//
// Determinism: no atomics anywhere; every reduction is a fixed-order loop or a fixed-shape tree.
// Without a GPU: tests/test_cuda_build.py compiles this file with nvcc (no spills), and
// tests/test_cuda_emulation.py compiles it (and the binding) for the CPU (-DMSFUSED_CUDA_EMULATION,
// emulation.h) and compares every output with the CPU kernels.
// Registers: every kernel is __launch_bounds__(256, 1): with the default occupancy target ptxas spilled
// around the 64-bit integer division and float division slow-path calls in the gathers; one block per SM
// is all the kernels need to be resident, and the build test checks that no kernel spills.
// Indexing: int64 offsets and element counts throughout (tensors may pass 2^31 elements); every tensor is
// addressed through its strides, so NCHW and channels_last share the kernels.
#include "multi_scale_kernels.h"

#ifdef MSFUSED_CUDA_EMULATION
#include "emulation.h"  // host-compiler build for tests without a GPU (tests/test_cuda_emulation.py)
#define MSFUSED_LAUNCH(kernel, blocks, shared_bytes, stream, ...) \
  ::msfused::cuda::emu::launch(static_cast<unsigned>(blocks), kThreads, shared_bytes, [&] { kernel(__VA_ARGS__); })
#define MSFUSED_DYNAMIC_SHARED(name) unsigned char* name = ::msfused::cuda::emu::dynamic_shared().data()
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
// Launches kernel (a pointer to a __global__ function) and returns the launch's error.
#define MSFUSED_LAUNCH(kernel, blocks, shared_bytes, stream, ...) \
  ((kernel)<<<static_cast<unsigned>(blocks), kThreads, shared_bytes, stream>>>(__VA_ARGS__), cudaGetLastError())
#define MSFUSED_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

#include <cstdint>

#include "../activation.h"
#include "../resize.h"

namespace msfused {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 16;  // pre tile side (threads: one pixel each)
constexpr int kOwn = 15;  // level rows / columns a tile owns (the 16th is the upsample's halo)
constexpr int kCob = 8;  // output channels per block
constexpr int kMaxPad = kMaxKernelSize / 2;
constexpr int kLsMax = kTile + 2 * kMaxPad;  // level tile side with the convolution's halo
constexpr int64_t kMaxCopyBlocks = 2048;
constexpr int64_t kUpGradMaxChunks = 64;
constexpr int64_t kUpGradChunkElems = 4096;

// ---- dtypes: opmath (accumulation) type and explicit conversions (no implicit half conversions). ----
template <typename S>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename S>
using acc_t = typename Acc<S>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename S>
__device__ __forceinline__ S from_acc(acc_t<S> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// v rounded to S and back: the value a tensor of dtype S holds (the reference rounds every op's output).
template <typename S>
__device__ __forceinline__ acc_t<S> round_to(acc_t<S> v) {
  return to_acc(from_acc<S>(v));
}

template <typename S>
__device__ __forceinline__ int64_t off4(const View4& v, int64_t n, int64_t c, int64_t i, int64_t j) {
  return n * v.stride[0] + c * v.stride[1] + i * v.stride[2] + j * v.stride[3];
}

template <typename S>
__device__ __forceinline__ const S* cptr(const View4& v) {
  return static_cast<const S*>(v.data);
}
template <typename S>
__device__ __forceinline__ S* mptr(const View4& v) {
  return static_cast<S*>(v.data);
}

// Fixed-shape tree sum over the block (blockDim.x == kThreads): deterministic.
__device__ double block_sum(double v, double* sm) {
  const int t = threadIdx.x;
  sm[t] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (t < s) sm[t] += sm[t + s];
    __syncthreads();
  }
  const double r = sm[0];
  __syncthreads();
  return r;
}

// Element e of an (N, C, H, W) tensor in memory order (channels_last: n, i, j, c; else n, c, i, j).
__device__ __forceinline__ void unflatten(int64_t e, int64_t C, int64_t H, int64_t W, bool cl, int64_t* n, int64_t* c,
                                          int64_t* i, int64_t* j) {
  if (cl) {
    *c = e % C;
    e /= C;
    *j = e % W;
    e /= W;
    *i = e % H;
    *n = e / H;
  } else {
    *j = e % W;
    e /= W;
    *i = e % H;
    e /= H;
    *c = e % C;
    *n = e / C;
  }
}

// x into out[:, x_offset : x_offset + C], grid-stride over `blocks` blocks starting at block `blk`.
template <typename S>
__device__ void copy_x_slice(const TileArgs& a, int64_t blk) {
  const int64_t total = a.N * a.C * a.H * a.W;
  const S* x = cptr<S>(a.x);
  S* out = mptr<S>(a.out);
  for (int64_t e = blk * kThreads + threadIdx.x; e < total; e += a.copy_blocks * kThreads) {
    int64_t n, c, i, j;
    unflatten(e, a.C, a.H, a.W, a.x_channels_last, &n, &c, &i, &j);
    out[off4<S>(a.out, n, a.x_offset + c, i, j)] = x[off4<S>(a.x, n, c, i, j)];
  }
}

// Level value (n, c, y, x) of a branch: src read as it is, or down-resized from it with the taps of
// resize.h in the CPU kernel's order (height taps summed per column tap), rounded to S as the
// reference's level tensor is.
template <typename S>
__device__ acc_t<S> sample_level(const TileBranch& br, int64_t n, int64_t c, int64_t y, int64_t x,
                                 bool align_corners, acc_t<S> scale_h, acc_t<S> scale_w) {
  using A = acc_t<S>;
  const S* base = cptr<S>(br.src) + n * br.src.stride[0] + c * br.src.stride[1];
  const int64_t sh = br.src.stride[2], sw = br.src.stride[3];
  const ResizeKind kh = static_cast<ResizeKind>(br.down_h), kw = static_cast<ResizeKind>(br.down_w);
  if (kh == ResizeKind::Identity && kw == ResizeKind::Identity) return to_acc(base[y * sh + x * sw]);
  A acc = A(0);
  for_each_tap<A>(kw, x, br.src_w, br.level_w, br.factor, align_corners, scale_w, [&](int64_t j, A ww) {
    A col = A(0);
    for_each_tap<A>(kh, y, br.src_h, br.level_h, br.factor, align_corners, scale_h,
                    [&](int64_t i, A wh) { col += wh * to_acc(base[i * sh + j * sw]); });
    acc += ww * col;
  });
  return round_to<S>(acc);
}

// Input channels per shared-memory chunk: 4 for double keeps the static shared memory under 48 KB.
template <typename A>
struct ChannelsPerChunk {
  static constexpr int value = sizeof(A) == 8 ? 4 : 8;
};

// ---------------------------------------------------------------------------------------------------
// Forward: the tile kernel (see the top of the file).
// ---------------------------------------------------------------------------------------------------
template <typename S, int kMode>
__global__ void __launch_bounds__(kThreads, 1) tile_forward_kernel(const __grid_constant__ TileArgs a) {
  using A = acc_t<S>;
  constexpr int CK = ChannelsPerChunk<A>::value;
  constexpr bool kConv = kMode != static_cast<int>(TileMode::EpilogueOnly);
  constexpr bool kEpilogue = kMode != static_cast<int>(TileMode::ConvOnly);
  __shared__ A s_lvl[CK * kLsMax * kLsMax];  // level chunk [ci][ly][lx], row length LS
  __shared__ A s_w[CK * kMaxKernelSize * kMaxKernelSize * kCob];  // weights [ci][ky][kx][co]
  __shared__ A s_act[kCob * kTile * kTile];  // activated tile [co][py][px]

  const int t = threadIdx.x;
  int64_t blk = blockIdx.x;
  if (blk < a.copy_blocks) {
    copy_x_slice<S>(a, blk);
    return;
  }
  blk -= a.copy_blocks;
  int b = 0;
  for (int k = 1; k < a.num_branches; ++k)
    if (blk >= a.br[k].block_begin) b = k;
  const TileBranch& br = a.br[b];
  int64_t r = blk - br.block_begin;
  const int64_t co_chunk = r % br.co_chunks;
  r /= br.co_chunks;
  const int64_t tx = r % br.tiles_w;
  r /= br.tiles_w;
  const int64_t ty = r % br.tiles_h;
  const int64_t n = r / br.tiles_h;

  const int64_t C = a.C, h = br.level_h, w = br.level_w, Cb = br.out_channels;
  const int64_t ly0 = ty * kOwn, lx0 = tx * kOwn, co0 = co_chunk * kCob;
  const int cob = static_cast<int>(Cb - co0 < kCob ? Cb - co0 : kCob);
  const int py = t / kTile, px = t % kTile;
  const int64_t gy = ly0 + py, gx = lx0 + px;
  const bool in_level = gy < h && gx < w;
  const bool owned = in_level && py < kOwn && px < kOwn;
  const bool ac = a.align_corners;

  A v[kCob];  // this thread's pre values (conv + bias, rounded to S)
  if constexpr (kConv) {
    const int k = static_cast<int>(br.kernel_size), p = k / 2, LS = kTile + 2 * p, kk = k * k;
    const S* wgt = static_cast<const S*>(br.weight);
    const A scale_h = linear_scale<A>(br.src_h, h, ac), scale_w = linear_scale<A>(br.src_w, w, ac);
    const bool write_level = br.level_out.data != nullptr && co_chunk == 0;
    A acc[kCob];
#pragma unroll
    for (int co = 0; co < kCob; ++co) acc[co] = A(0);
    for (int64_t c0 = 0; c0 < C; c0 += CK) {
      __syncthreads();  // the previous chunk's reads are done
      for (int idx = t; idx < CK * LS * LS; idx += kThreads) {
        const int ci = idx / (LS * LS), rem = idx % (LS * LS), ly = rem / LS, lx = rem % LS;
        const int64_t c = c0 + ci, yy = ly0 - p + ly, xx = lx0 - p + lx;
        A val = A(0);  // the convolution's zero padding
        if (c < C && yy >= 0 && yy < h && xx >= 0 && xx < w) {
          val = sample_level<S>(br, n, c, yy, xx, ac, scale_h, scale_w);
          if (write_level && ly >= p && ly - p < kOwn && lx >= p && lx - p < kOwn)
            mptr<S>(br.level_out)[off4<S>(br.level_out, n, c, yy, xx)] = from_acc<S>(val);
        }
        s_lvl[idx] = val;
      }
      for (int idx = t; idx < CK * kk * kCob; idx += kThreads) {
        const int co = idx % kCob, rest = idx / kCob, tap = rest % kk, ci = rest / kk;
        const int64_t c = c0 + ci, o = co0 + co;
        s_w[idx] = (c < C && o < Cb) ? to_acc(wgt[(o * C + c) * kk + tap]) : A(0);
      }
      __syncthreads();
      for (int ci = 0; ci < CK; ++ci) {
        for (int ky = 0; ky < k; ++ky) {
          for (int kx = 0; kx < k; ++kx) {
            const A xv = s_lvl[ci * LS * LS + (py + ky) * LS + px + kx];
            const A* wp = s_w + (ci * kk + ky * k + kx) * kCob;
#pragma unroll
            for (int co = 0; co < kCob; ++co) acc[co] += wp[co] * xv;
          }
        }
      }
    }
    const S* bias = static_cast<const S*>(br.bias);
    S* pre = mptr<S>(br.pre);
#pragma unroll
    for (int co = 0; co < kCob; ++co) {
      v[co] = A(0);
      if (co < cob) {
        v[co] = round_to<S>(acc[co] + (bias != nullptr ? to_acc(bias[co0 + co]) : A(0)));
        if (owned) pre[off4<S>(br.pre, n, co0 + co, gy, gx)] = from_acc<S>(v[co]);
      }
    }
    if constexpr (kMode == static_cast<int>(TileMode::ConvOnly)) {
      // Batch statistics: this tile's (count, mean, M2) of pre per channel over its owned pixels, in
      // double (two passes over the values in registers, fixed-shape tree sums); merged by merge_stats.
      if (br.stats_partial != nullptr) {  // uniform over the block: the barriers inside are too
        __shared__ double s_red[kThreads];
        const int64_t tiles = a.N * br.tiles_h * br.tiles_w, tile = (n * br.tiles_h + ty) * br.tiles_w + tx;
        const double count = block_sum(owned ? 1.0 : 0.0, s_red);  // >= 1: a tile owns its first pixel
#pragma unroll
        for (int co = 0; co < kCob; ++co) {
          if (co < cob) {
            const double mean = block_sum(owned ? static_cast<double>(v[co]) : 0.0, s_red) / count;
            const double d = owned ? static_cast<double>(v[co]) - mean : 0.0;
            const double m2 = block_sum(d * d, s_red);
            if (t == 0) {
              double* dst = br.stats_partial + ((co0 + co) * tiles + tile) * 3;
              dst[0] = count;
              dst[1] = mean;
              dst[2] = m2;
            }
          }
        }
      }
    }
  } else {
    const S* pre = cptr<S>(br.pre);
#pragma unroll
    for (int co = 0; co < kCob; ++co)
      v[co] = (co < cob && in_level) ? to_acc(pre[off4<S>(br.pre, n, co0 + co, gy, gx)]) : A(0);
  }

  if constexpr (kEpilogue) {
    const A* alpha = static_cast<const A*>(br.alpha);
    const A* beta = static_cast<const A*>(br.beta);
    const Activation act = static_cast<Activation>(a.activation);
#pragma unroll
    for (int co = 0; co < kCob; ++co) {
      A y = A(0);
      if (co < cob && in_level) y = round_to<S>(activate<A>(act, alpha[co0 + co] * v[co] + beta[co0 + co]));
      s_act[co * kTile * kTile + t] = y;
    }
    __syncthreads();
    // The output pixels this tile owns: those whose first up-tap lies in its own level rows / columns.
    const ResizeKind uh = static_cast<ResizeKind>(br.up_h), uw = static_cast<ResizeKind>(br.up_w);
    const A sh = linear_scale<A>(h, a.H, ac), sw = linear_scale<A>(w, a.W, ac);
    int64_t I0, I1, J0, J1;
    outputs_starting_in<A>(uh, ly0, ly0 + kOwn < h ? ly0 + kOwn : h, h, a.H, 1, ac, sh, &I0, &I1);
    outputs_starting_in<A>(uw, lx0, lx0 + kOwn < w ? lx0 + kOwn : w, w, a.W, 1, ac, sw, &J0, &J1);
    const int64_t nJ = J1 - J0, per = (I1 - I0) * nJ;
    S* out = mptr<S>(a.out);
    for (int64_t idx = t; idx < cob * per; idx += kThreads) {
      const int co = static_cast<int>(idx / per);
      const int64_t rem = idx % per, I = I0 + rem / nJ, J = J0 + rem % nJ;
      const A* tile = s_act + co * kTile * kTile;
      A val = A(0);
      for_each_tap<A>(uw, J, w, a.W, 1, ac, sw, [&](int64_t jj, A ww) {
        A col = A(0);
        for_each_tap<A>(uh, I, h, a.H, 1, ac, sh,
                        [&](int64_t ii, A wh) { col += wh * tile[(ii - ly0) * kTile + (jj - lx0)]; });
        val += ww * col;
      });
      out[off4<S>(a.out, n, br.channel_offset + co0 + co, I, J)] = from_acc<S>(val);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Forward: every bins level from one read of x (and x's slice of the output).
// Block: one n and CG channels; threads: CG channels x TJ columns (channels fastest for channels_last,
// columns fastest for NCHW, so the reads coalesce). Per column chunk each thread sums its column over
// every bin row it falls in (shared memory, a slot per thread), then the bins add their columns.
// Shared memory: colsum [rows][kThreads], bins [bins][CG], row table [H][branches] (int2).
// ---------------------------------------------------------------------------------------------------
__host__ __device__ inline int pool_group(bool cl) { return cl ? 32 : 4; }

template <typename S>
__global__ void __launch_bounds__(kThreads, 1) pool_levels_kernel(const __grid_constant__ PoolArgs a) {
  using A = acc_t<S>;
  MSFUSED_DYNAMIC_SHARED(smem_raw);
  const bool cl = a.x_channels_last;
  const int CG = pool_group(cl), TJ = kThreads / CG;
  const int t = threadIdx.x;
  const int g = cl ? t % CG : t / TJ;
  const int jj = cl ? t / CG : t % TJ;
  const int64_t groups = (a.C + CG - 1) / CG;
  const int64_t n = blockIdx.x / groups, c0 = (blockIdx.x % groups) * CG, c = c0 + g;
  const int nb = a.num_branches;
  const PoolBranch& last = a.br[nb - 1];
  const int64_t R = last.row_base + last.level_h, Bt = last.bin_base + last.level_h * last.level_w;
  A* colsum = reinterpret_cast<A*>(smem_raw);
  A* bins = colsum + R * kThreads;
  int2* rows = reinterpret_cast<int2*>(bins + Bt * CG);

  for (int64_t idx = t; idx < a.H * nb; idx += kThreads) {
    const int64_t i = idx / nb;
    const PoolBranch& pb = a.br[idx % nb];
    int64_t r0, r1;
    readers_of<A>(ResizeKind::Adaptive, i, a.H, pb.level_h, 1, false, A(0), &r0, &r1);
    rows[idx] = make_int2(static_cast<int>(r0), static_cast<int>(r1));
  }
  for (int64_t idx = t; idx < Bt * CG; idx += kThreads) bins[idx] = A(0);
  __syncthreads();

  const S* x = cptr<S>(a.x);
  S* out = mptr<S>(a.out);
  for (int64_t j0 = 0; j0 < a.W; j0 += TJ) {
    const int64_t j = j0 + jj;
    for (int64_t rr = 0; rr < R; ++rr) colsum[rr * kThreads + t] = A(0);
    if (j < a.W && c < a.C) {
      for (int64_t i = 0; i < a.H; ++i) {
        const S xv = x[off4<S>(a.x, n, c, i, j)];
        if (a.x_offset >= 0) out[off4<S>(a.out, n, a.x_offset + c, i, j)] = xv;
        const A val = to_acc(xv);
        for (int b = 0; b < nb; ++b) {
          const int2 span = rows[i * nb + b];
          const int64_t base = a.br[b].row_base;
          for (int rr = span.x; rr < span.y; ++rr) colsum[(base + rr) * kThreads + t] += val;
        }
      }
    }
    __syncthreads();
    for (int64_t idx = t; idx < Bt * CG; idx += kThreads) {
      const int gg = static_cast<int>(idx % CG);
      const int64_t k = idx / CG;
      int b = 0;
      for (int q = 1; q < nb; ++q)
        if (k >= a.br[q].bin_base) b = q;
      const PoolBranch& pb = a.br[b];
      const int64_t q = k - pb.bin_base, row = pb.row_base + q / pb.level_w, col = q % pb.level_w;
      const int64_t cs = adaptive_start(col, pb.level_w, a.W), ce = adaptive_end(col, pb.level_w, a.W);
      const int64_t lo = cs > j0 ? cs : j0, hi = ce < j0 + TJ ? ce : j0 + TJ;
      A s = A(0);
      for (int64_t jx = lo; jx < hi; ++jx) s += colsum[row * kThreads + (cl ? (jx - j0) * CG + gg : gg * TJ + (jx - j0))];
      bins[idx] += s;
    }
    __syncthreads();
  }
  for (int64_t idx = t; idx < Bt * CG; idx += kThreads) {
    const int gg = static_cast<int>(idx % CG);
    const int64_t k = idx / CG, cc = c0 + gg;
    if (cc >= a.C) continue;
    int b = 0;
    for (int q = 1; q < nb; ++q)
      if (k >= a.br[q].bin_base) b = q;
    const PoolBranch& pb = a.br[b];
    const int64_t q = k - pb.bin_base, row = q / pb.level_w, col = q % pb.level_w;
    const int64_t ch = adaptive_end(row, pb.level_h, a.H) - adaptive_start(row, pb.level_h, a.H);
    const int64_t cw = adaptive_end(col, pb.level_w, a.W) - adaptive_start(col, pb.level_w, a.W);
    const A val = bins[idx] * (A(1) / static_cast<A>(ch)) * (A(1) / static_cast<A>(cw));
    mptr<S>(pb.level)[off4<S>(pb.level, n, cc, row, col)] = from_acc<S>(val);
  }
}

// ---------------------------------------------------------------------------------------------------
// Forward: batch statistics from the tile kernel's per-(channel, tile) partials, one thread per channel.
// ---------------------------------------------------------------------------------------------------
template <typename S>
__global__ void __launch_bounds__(kThreads, 1) merge_stats_kernel(const __grid_constant__ MergeStatsArgs a) {
  using Stat = acc_t<S>;  // float, double for double (msfused::stats_dtype)
  int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  int b = 0;
  while (b < a.num_branches && c >= a.br[b].channels) c -= a.br[b++].channels;
  if (b >= a.num_branches) return;
  const MergeStatsBranch& mb = a.br[b];
  const double* p = mb.partial + c * mb.partials_per_channel * 3;
  double count = 0, mean = 0, m2 = 0;
  for (int64_t k = 0; k < mb.partials_per_channel; ++k) {  // fixed order: deterministic
    const double nb = p[3 * k], mean_b = p[3 * k + 1], m2_b = p[3 * k + 2];
    const double n = count + nb, delta = mean_b - mean;
    mean += delta * (nb / n);
    m2 += m2_b + delta * delta * (count * nb / n);
    count = n;
  }
  static_cast<Stat*>(mb.mean)[c] = static_cast<Stat>(mean);
  static_cast<Stat*>(mb.var)[c] = static_cast<Stat>(m2 / count);
}

// ---------------------------------------------------------------------------------------------------
// Backward 1: upsample adjoint (gather) + activation backward + partial sums, per (branch, channel, chunk).
// ---------------------------------------------------------------------------------------------------
template <typename S>
__global__ void __launch_bounds__(kThreads, 1) up_grad_kernel(const __grid_constant__ UpGradArgs a) {
  using A = acc_t<S>;
  __shared__ double sm[kThreads];
  const int64_t blk = blockIdx.x;
  int b = 0;
  for (int k = 1; k < a.num_branches; ++k)
    if (blk >= a.br[k].block_begin) b = k;
  const UpGradBranch& ub = a.br[b];
  const int64_t c = (blk - ub.block_begin) / ub.chunks, chunk = (blk - ub.block_begin) % ub.chunks;
  const int64_t h = ub.h, w = ub.w, hw = h * w, M = a.N * hw;
  const int64_t per = (M + ub.chunks - 1) / ub.chunks;
  const int64_t e0 = chunk * per, e1 = e0 + per < M ? e0 + per : M;
  const bool ac = a.align_corners;
  const ResizeKind kh = static_cast<ResizeKind>(ub.up_h), kw = static_cast<ResizeKind>(ub.up_w);
  const A sh = linear_scale<A>(h, a.H, ac), sw = linear_scale<A>(w, a.W, ac);
  const A alpha = static_cast<const A*>(ub.alpha)[c], beta = static_cast<const A*>(ub.beta)[c];
  const double ps = ub.pre_scale[c], center = ub.center[c];
  const Activation act = static_cast<Activation>(a.activation);
  const S* grad = cptr<S>(a.grad);
  const S* pre = cptr<S>(ub.pre);
  S* dconv = mptr<S>(ub.dconv);
  const int64_t gc = ub.channel_offset + c;
  double s1 = 0, s2 = 0;
  for (int64_t e = e0 + threadIdx.x; e < e1; e += kThreads) {
    const int64_t n = e / hw, rem = e % hw, i = rem / w, j = rem % w;
    A da = A(0);
    if (kh == ResizeKind::Identity && kw == ResizeKind::Identity) {
      da = to_acc(grad[off4<S>(a.grad, n, gc, i, j)]);
    } else {
      int64_t I0, I1, J0, J1;
      readers_of<A>(kh, i, h, a.H, 1, ac, sh, &I0, &I1);
      readers_of<A>(kw, j, w, a.W, 1, ac, sw, &J0, &J1);
      // As the CPU kernel: the height adjoint per output column, then the width adjoint.
      for (int64_t J = J0; J < J1; ++J) {
        for_each_weight_of<A>(kw, J, j, w, a.W, 1, ac, sw, [&](A ww) {
          A col = A(0);
          for (int64_t I = I0; I < I1; ++I)
            for_each_weight_of<A>(kh, I, i, h, a.H, 1, ac, sh,
                                  [&](A wh) { col += wh * to_acc(grad[off4<S>(a.grad, n, gc, I, J)]); });
          da += ww * col;
        });
      }
    }
    const int64_t po = off4<S>(ub.pre, n, c, i, j);
    const A pv = to_acc(pre[po]);
    // The reference rounds the activation's incoming gradient to the dtype.
    const A dy = round_to<S>(da) * activate_grad<A>(act, alpha * pv + beta);
    s1 += static_cast<double>(dy);
    s2 += static_cast<double>(dy) * (static_cast<double>(pv) - center);
    dconv[off4<S>(ub.dconv, n, c, i, j)] = from_acc<S>(static_cast<A>(static_cast<double>(dy) * ps));
  }
  const double t1 = block_sum(s1, sm);
  const double t2 = block_sum(s2, sm);
  if (threadIdx.x == 0) {
    double* dst = a.partial + ((ub.channel_base + c) * a.max_chunks + chunk) * 2;
    dst[0] = t1;
    dst[1] = t2;
  }
}

__global__ void reduce_partials_kernel(const double* partial, int64_t rows, int64_t chunks, double* sums) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  double s1 = 0, s2 = 0;
  for (int64_t k = 0; k < chunks; ++k) {  // fixed order: deterministic
    s1 += partial[(row * chunks + k) * 2];
    s2 += partial[(row * chunks + k) * 2 + 1];
  }
  sums[row * 2] = s1;
  sums[row * 2 + 1] = s2;
}

// ---------------------------------------------------------------------------------------------------
// Backward 2 (batch statistics only): dconv = p * dconv + q * pre + r, per channel.
// ---------------------------------------------------------------------------------------------------
template <typename S>
__global__ void __launch_bounds__(kThreads, 1) norm_grad_kernel(const __grid_constant__ NormGradArgs a) {
  const int64_t blk = blockIdx.x;
  int b = 0;
  for (int k = 1; k < a.num_branches; ++k)
    if (blk >= a.br[k].block_begin) b = k;
  const NormGradBranch& nb = a.br[b];
  const int64_t total = a.N * nb.channels * nb.h * nb.w;
  const S* pre = cptr<S>(nb.pre);
  S* dconv = mptr<S>(nb.dconv);
  for (int64_t e = (blk - nb.block_begin) * kThreads + threadIdx.x; e < total; e += nb.blocks * kThreads) {
    int64_t n, c, i, j;
    unflatten(e, nb.channels, nb.h, nb.w, false, &n, &c, &i, &j);
    const int64_t od = off4<S>(nb.dconv, n, c, i, j);
    const double d = static_cast<double>(to_acc(dconv[od]));
    const double pv = static_cast<double>(to_acc(pre[off4<S>(nb.pre, n, c, i, j)]));
    dconv[od] = from_acc<S>(static_cast<acc_t<S>>(nb.p[c] * d + nb.q[c] * pv + nb.r[c]));
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward 3: dx, one thread per element, written once (per group of kMaxBranches branches).
// ---------------------------------------------------------------------------------------------------
template <typename S>
__global__ void __launch_bounds__(kThreads, 1) dx_kernel(const __grid_constant__ DxArgs a) {
  using A = acc_t<S>;
  const int64_t total = a.N * a.C * a.H * a.W;
  const bool ac = a.align_corners;
  const S* grad = cptr<S>(a.grad);
  S* dx = mptr<S>(a.dx);
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e < total) {
    int64_t n, c, i, j;
    unflatten(e, a.C, a.H, a.W, a.channels_last, &n, &c, &i, &j);
    const int64_t ox = off4<S>(a.dx, n, c, i, j);
    A val = a.accumulate ? to_acc(dx[ox]) : A(0);
    if (a.x_offset >= 0) val += to_acc(grad[off4<S>(a.grad, n, a.x_offset + c, i, j)]);
    for (int b = 0; b < a.num_branches; ++b) {
      const DxBranch& db = a.br[b];
      const S* dz = cptr<S>(db.dz);
      const ResizeKind kh = static_cast<ResizeKind>(db.down_h), kw = static_cast<ResizeKind>(db.down_w);
      if (kh == ResizeKind::Identity && kw == ResizeKind::Identity) {
        val += to_acc(dz[off4<S>(db.dz, n, c, i, j)]);
        continue;
      }
      const A sh = linear_scale<A>(a.H, db.level_h, ac), sw = linear_scale<A>(a.W, db.level_w, ac);
      int64_t O0, O1, P0, P1;
      readers_of<A>(kh, i, a.H, db.level_h, db.factor, ac, sh, &O0, &O1);
      readers_of<A>(kw, j, a.W, db.level_w, db.factor, ac, sw, &P0, &P1);
      // As the CPU kernel: the width adjoint per level row, then the height adjoint row by row.
      for (int64_t oh = O0; oh < O1; ++oh) {
        for_each_weight_of<A>(kh, oh, i, a.H, db.level_h, db.factor, ac, sh, [&](A wh) {
          A row = A(0);
          for (int64_t ow = P0; ow < P1; ++ow)
            for_each_weight_of<A>(kw, ow, j, a.W, db.level_w, db.factor, ac, sw,
                                  [&](A ww) { row += ww * to_acc(dz[off4<S>(db.dz, n, c, oh, ow)]); });
          val += wh * row;
        });
      }
    }
    dx[ox] = from_acc<S>(val);
  }
}

// ---------------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------------
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int64_t kMaxGrid = 2147483647;

template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float: return f(float{});
    case DType::Double: return f(double{});
    case DType::Half: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

size_t acc_size(DType dtype) { return dtype == DType::Double ? 8 : 4; }

}  // namespace

cudaError_t launch_tile_forward(DType dtype, TileMode mode, TileArgs args, cudaStream_t stream) {
  if (args.num_branches < 1 || args.num_branches > kMaxBranches) return cudaErrorInvalidValue;
  const int64_t copy_total = args.N * args.C * args.H * args.W;
  args.copy_blocks = (args.x_offset >= 0 && mode != TileMode::EpilogueOnly && copy_total > 0)
                         ? (ceil_div(copy_total, kThreads) < kMaxCopyBlocks ? ceil_div(copy_total, kThreads) : kMaxCopyBlocks)
                         : 0;
  int64_t blocks = args.copy_blocks;
  for (int b = 0; b < args.num_branches; ++b) {
    TileBranch& br = args.br[b];
    if (br.kernel_size < 1 || br.kernel_size > kMaxKernelSize || br.kernel_size % 2 == 0) return cudaErrorInvalidValue;
    br.tiles_h = ceil_div(br.level_h, kOwn);
    br.tiles_w = ceil_div(br.level_w, kOwn);
    br.co_chunks = ceil_div(br.out_channels, kCob);
    br.block_begin = blocks - args.copy_blocks;
    blocks += args.N * br.tiles_h * br.tiles_w * br.co_chunks;
  }
  if (blocks == 0) return cudaSuccess;
  if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
  return dispatch(dtype, [&](auto s) {
    using S = decltype(s);
    void (*kernel)(TileArgs) = mode == TileMode::ConvEpilogue ? tile_forward_kernel<S, 0>
                               : mode == TileMode::ConvOnly   ? tile_forward_kernel<S, 1>
                                                              : tile_forward_kernel<S, 2>;
    return MSFUSED_LAUNCH(kernel, blocks, 0, stream, args);
  });
}

size_t pool_shared_limit() { return 48 * 1024; }

size_t pool_shared_bytes(DType dtype, PoolArgs* args) {
  int64_t rows = 0, bins = 0;
  for (int b = 0; b < args->num_branches; ++b) {
    args->br[b].row_base = rows;
    args->br[b].bin_base = bins;
    rows += args->br[b].level_h;
    bins += args->br[b].level_h * args->br[b].level_w;
  }
  // A table entry is an int2 of bin-row indices: levels must fit in int.
  for (int b = 0; b < args->num_branches; ++b)
    if (args->br[b].level_h >= (int64_t{1} << 30)) return SIZE_MAX;
  const size_t acc = acc_size(dtype);
  const size_t bytes = static_cast<size_t>(rows) * kThreads * acc +
                       static_cast<size_t>(bins) * pool_group(args->x_channels_last) * acc;
  const size_t aligned = (bytes + 7) / 8 * 8;  // int2 table after the accumulators
  return aligned + static_cast<size_t>(args->H) * args->num_branches * sizeof(int2);
}

cudaError_t launch_pool_levels(DType dtype, const PoolArgs& args, cudaStream_t stream) {
  if (args.num_branches < 1 || args.num_branches > kMaxBranches) return cudaErrorInvalidValue;
  PoolArgs a = args;
  const size_t smem = pool_shared_bytes(dtype, &a);
  if (smem > pool_shared_limit()) return cudaErrorInvalidValue;
  const int64_t blocks = a.N * ceil_div(a.C, pool_group(a.x_channels_last));
  if (blocks == 0) return cudaSuccess;
  if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
  return dispatch(dtype, [&](auto s) {
    using S = decltype(s);
    void (*kernel)(PoolArgs) = pool_levels_kernel<S>;
    return MSFUSED_LAUNCH(kernel, blocks, smem, stream, a);
  });
}

int64_t tiles_per_image(int64_t h, int64_t w) { return ceil_div(h, kOwn) * ceil_div(w, kOwn); }

cudaError_t launch_merge_stats(DType dtype, const MergeStatsArgs& args, cudaStream_t stream) {
  if (args.num_branches < 1 || args.num_branches > kMaxBranches) return cudaErrorInvalidValue;
  int64_t channels = 0;
  for (int b = 0; b < args.num_branches; ++b) channels += args.br[b].channels;
  if (channels == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(channels, kThreads);
  if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
  return dispatch(dtype, [&](auto s) {
    using S = decltype(s);
    void (*kernel)(MergeStatsArgs) = merge_stats_kernel<S>;
    return MSFUSED_LAUNCH(kernel, blocks, 0, stream, args);
  });
}

int64_t up_grad_max_chunks() { return kUpGradMaxChunks; }

cudaError_t launch_up_grad(DType dtype, UpGradArgs args, cudaStream_t stream) {
  if (args.num_branches < 1 || args.num_branches > kMaxBranches) return cudaErrorInvalidValue;
  if (args.max_chunks != kUpGradMaxChunks) return cudaErrorInvalidValue;
  int64_t blocks = 0;
  for (int b = 0; b < args.num_branches; ++b) {
    UpGradBranch& ub = args.br[b];
    const int64_t M = args.N * ub.h * ub.w;
    int64_t chunks = ceil_div(M, kUpGradChunkElems);
    ub.chunks = chunks < 1 ? 1 : (chunks > kUpGradMaxChunks ? kUpGradMaxChunks : chunks);
    ub.block_begin = blocks;
    blocks += ub.channels * ub.chunks;
  }
  if (blocks == 0 || args.N == 0) return cudaSuccess;
  if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
  return dispatch(dtype, [&](auto s) {
    using S = decltype(s);
    void (*kernel)(UpGradArgs) = up_grad_kernel<S>;
    return MSFUSED_LAUNCH(kernel, blocks, 0, stream, args);
  });
}

cudaError_t launch_reduce_partials(const double* partial, int64_t total_channels, int64_t max_chunks, double* sums,
                                   cudaStream_t stream) {
  if (total_channels == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(total_channels, kThreads);
  if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
  void (*kernel)(const double*, int64_t, int64_t, double*) = reduce_partials_kernel;
  return MSFUSED_LAUNCH(kernel, blocks, 0, stream, partial, total_channels, max_chunks, sums);
}

cudaError_t launch_norm_grad(DType dtype, NormGradArgs args, cudaStream_t stream) {
  if (args.num_branches < 1 || args.num_branches > kMaxBranches) return cudaErrorInvalidValue;
  int64_t blocks = 0;
  for (int b = 0; b < args.num_branches; ++b) {
    NormGradBranch& nb = args.br[b];
    const int64_t total = args.N * nb.channels * nb.h * nb.w;
    int64_t need = ceil_div(total, kThreads);
    nb.blocks = need < 1 ? 1 : (need > 4096 ? 4096 : need);
    nb.block_begin = blocks;
    blocks += nb.blocks;
  }
  if (blocks == 0 || args.N == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto s) {
    using S = decltype(s);
    void (*kernel)(NormGradArgs) = norm_grad_kernel<S>;
    return MSFUSED_LAUNCH(kernel, blocks, 0, stream, args);
  });
}

cudaError_t launch_dx(DType dtype, const DxArgs& args, cudaStream_t stream) {
  if (args.num_branches < 0 || args.num_branches > kMaxBranches) return cudaErrorInvalidValue;
  const int64_t total = args.N * args.C * args.H * args.W;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(total, kThreads);  // one thread per element
  if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
  return dispatch(dtype, [&](auto s) {
    using S = decltype(s);
    void (*kernel)(DxArgs) = dx_kernel<S>;
    return MSFUSED_LAUNCH(kernel, blocks, 0, stream, args);
  });
}

}  // namespace cuda
}  // namespace msfused
