// The fused multi-scale block on CUDA: the memory passes behind backend 'cuda'. The convolutions are not
// here: the binding (multi_scale_cuda.cpp) runs them through ATen (cuDNN: tensor cores, TF32 as
// torch.backends.cudnn.allow_tf32 says, deterministic algorithms), forward, data and weight gradients, on
// the levels and on x for a factor-1 branch, as the CPU backend does with oneDNN. These kernels do what
// cuDNN cannot: the resizes, the norm, the activation and the concatenation, each activation-sized tensor
// read or written once. Needs only CUDA's own headers and the shared csrc/*.h helpers (the resize index
// math of csrc/resize.h and the norm arithmetic of csrc/norm.h are the CPU kernels' too).
//
// Launches per call (per group of up to kMaxBranches = 8 branches; B = the number of branches):
//
//   forward ............................ levels (1) + B convolutions (ATen) + epilogue_up (1)
//       levels: one read of x computes every level (a gather of the down-resize's taps per level element;
//       a large pooling window, e.g. bin 1, split over up to 256 lanes combined in a fixed tree) and copies
//       x into its slice of the output; for bins branches pool_levels does that instead where its blocks
//       (one per (n, channel group), each walking the whole map once: per thread a column's rows in
//       segments summed in registers, column sums per bin row in shared memory) fill the GPU; a pyramid
//       mixing factor and bins branches may take both (2). epilogue_up: a tile of one
//       branch's outputs per block (the taps tabulated per tile row and column, the level values the tile
//       reads activated once into shared memory): bias is already in the convolution output; norm (alpha,
//       beta), activation and the up-resize's taps, written straight into the branch's channel slice.
//   forward with batch statistics ...... + stats_partial (1) + merge_stats (1, per-channel)
//       stats_partial: (channel, chunk) blocks, enough to fill the GPU, each the (count, sum, M2) of its
//       chunk in double; merge_stats: one thread per channel combines the chunks in chunk order and
//       writes mean, var and the epilogue's alpha, beta.
//   backward ........................... up_grad (1) + reduce_partials (1, per-channel)
//                                        [+ norm_grad (1) with batch statistics]
//                                        + per branch the convolution's backward (ATen: data and weight
//                                        gradients, bias sum) + dx (1)
//       up_grad: (channel, chunk) blocks over the level pixels; a block first tabulates every level row's
//       and column's readers and weights (shared memory); each level pixel's upsample adjoint is a
//       gather over the output pixels that read it, split over `lanes` threads (up to a block: bin 1
//       reads the whole map) and combined in a fixed tree (a factor-1 level reads grad itself); then the
//       activation's (and in eval mode the folded norm's) backward, dconv written, per-chunk partial sums.
//       reduce_partials combines those in chunk order (the parameter gradients and the batch-statistics
//       coefficients, csrc/norm.h).
//       dx: a few blocks per multiprocessor, each tabulating once every x row's and column's readers and
//       every level row's and column's taps, then walking elements in memory order (grid-stride), each
//       written once: x's slice of grad plus every branch's down-resize adjoint (a gather, branches in order).
//
//   with a projection (csrc/projection.h decides which branch goes per tap; the binding's launch counts:
//   docs/BACKENDS.md): project_accumulate: a tile of outputs per block (taps tabulated per tile row and
//   column), each output the sum of conv(x, W_x), the bias,
//   the direct parts and every per-tap map resized up and shifted by its tap, and applies the norm (eval)
//   and activation, the output written once; project_adjoint: each per-tap map's gradient as a gather at
//   its level (the shifted up-resize's readers of a level pixel split over lanes, a fixed tree).
//
// Determinism: no atomics anywhere; every reduction is a fixed-order loop or a fixed-shape tree, so the
// results are bit-identical run to run (the chunking depends only on the shapes and the device).
// Without a GPU: tests/test_cuda_build.py compiles this file with nvcc (no spills), and
// tests/test_cuda_emulation.py compiles it (and the binding) for the CPU (-DMSFUSED_CUDA_EMULATION,
// emulation.h) and compares every output with the CPU kernels. The launch plan (python -m msfused explain
// --backend cuda, msfused/cuda_plan.py) runs that build on meta tensors with a launch recorder installed:
// the launchers record (kernel_cost: each kernel's cost model, at the end of this file) instead of launching.
// Registers: the kernels are __launch_bounds__(256, 1): with the default occupancy target ptxas spilled
// around the 64-bit integer division and float division slow-path calls in the gathers; except
// project_accumulate, (256, 3): its tiled tap loops take 92 registers unbounded (2 blocks per SM), 72 at
// 3 blocks per SM without spilling; and pool_levels, (256, 4): 72 registers unbounded (3 blocks per SM),
// 56-64 at 4 without spilling (more loads in flight per SM; levels<double> spills at 4 on sm_80). The
// build test checks that no kernel spills.
// Indexing: int64 offsets and element counts throughout (tensors may pass 2^31 elements); every tensor is
// addressed through its strides, so NCHW and channels_last share the kernels.
// Not yet measured on a GPU: the (channel, chunk) blocks of stats_partial and up_grad walk one channel's
// pixels, which in channels_last are a channel-count stride apart (neighbouring channels' blocks share
// those sectors through L2); the elementwise kernels run in memory order in both formats.
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

#include <atomic>
#include <cstdint>

#include "../activation.h"
#include "../norm.h"
#include "../resize.h"

namespace msfused {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxCopyBlocks = 2048;
constexpr int64_t kDxBlocksPerSM = 4;  // dx's grid: its blocks tabulate once, then walk many elements
constexpr int kDxUnroll = 4;  // dx: elements per thread at a time
constexpr int64_t kMaxChunks = 64;  // chunks per channel of a whole-map reduction
constexpr int64_t kGpuMinChunkElems = 2048;  // values (thread-steps) per chunk at least: 8 per thread
#ifdef MSFUSED_CUDA_EMULATION
constexpr int64_t kMinChunkElems = 16;  // small, so that the tests' small maps run several chunks
#else
constexpr int64_t kMinChunkElems = kGpuMinChunkElems;
#endif
// dx indexes in int up to this many elements (and offsets below 2^31); small in the emulation build, so that
// its tests run the int64 path too.
#ifdef MSFUSED_CUDA_EMULATION
constexpr int64_t kDxNarrowLimit = 4096;
#else
constexpr int64_t kDxNarrowLimit = INT32_MAX;
#endif
// dx's row tiles hold this many elements at least (else its elements are walked in memory order); small in
// the emulation build, so that its tests' small maps take them too.
constexpr int64_t kGpuDxTileMinElems = kThreads;
#ifdef MSFUSED_CUDA_EMULATION
constexpr int64_t kDxTileMinElems = 16;
#else
constexpr int64_t kDxTileMinElems = kGpuDxTileMinElems;
#endif
// up_grad's tables at most (beside its 3-4 KB of static shared arrays); small in the emulation build, so that
// its tests run the path without them too (the launch plan takes the GPU build's).
constexpr size_t kGpuUpGradTableBytes = 40 * 1024;
#ifdef MSFUSED_CUDA_EMULATION
constexpr size_t kUpGradTableBytes = 2048;
#else
constexpr size_t kUpGradTableBytes = kGpuUpGradTableBytes;
#endif

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

// The G lanes' parts (each group of G consecutive threads: one item) added in a fixed tree; the sum is
// returned to the group's lane 0. Every thread of the block calls it (G is uniform over the block: the
// barriers are block-wide); s_acc is kThreads shared slots, free again when it returns.
template <typename A>
__device__ __forceinline__ A lane_tree_sum(A part, A* s_acc, int t, int lane, int G) {
  s_acc[t] = part;
  for (int s = G / 2; s > 0; s >>= 1) {
    __syncthreads();
    if (lane < s) s_acc[t] += s_acc[t + s];
  }
  __syncthreads();
  part = s_acc[t];
  __syncthreads();  // read before anyone writes s_acc again
  return part;
}

// Element e of an (N, C, H, W) tensor in memory order (channels_last: n, i, j, c; else n, c, i, j).
// Below 2^32 in 32-bit unsigned arithmetic: a 64-bit division is a long software sequence on the GPU, and
// these run once per element in the elementwise kernels (the same quotients either way).
template <typename I>
__device__ __forceinline__ void unflatten_in(I e, I C, I H, I W, bool cl, int64_t* n, int64_t* c, int64_t* i,
                                             int64_t* j) {
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
__device__ __forceinline__ void unflatten(int64_t e, int64_t C, int64_t H, int64_t W, bool cl, int64_t* n, int64_t* c,
                                          int64_t* i, int64_t* j) {
  if (e >= 0 && e <= int64_t{0xFFFFFFFF} && C <= int64_t{0xFFFFFFFF} && H <= int64_t{0xFFFFFFFF} &&
      W <= int64_t{0xFFFFFFFF}) {
    unflatten_in<uint32_t>(static_cast<uint32_t>(e), static_cast<uint32_t>(C), static_cast<uint32_t>(H),
                           static_cast<uint32_t>(W), cl, n, c, i, j);
    return;
  }
  unflatten_in<int64_t>(e, C, H, W, cl, n, c, i, j);
}

// ---------------------------------------------------------------------------------------------------
// Forward: every bins level from one read of x (and x's slice of the output).
// Block: one n and CG channels; threads: CG channels x RG row groups x TJ columns (pool_tile; channels
// fastest for channels_last, columns fastest for NCHW, so the reads coalesce; row groups keep every thread
// busy when W < TJ's most). Per column chunk each thread walks its column down its row group's rows: the
// rows are cut into segments (the runs of rows that lie in the same bin rows of every branch), a segment's
// values are summed in a register (rows in steps of kPoolUnroll independent loads in flight, across segment
// ends: restrict pointers) and the sum is added to each bin row the segment lies in (shared memory, a slot
// per thread); then the bins add their columns of the chunk, row groups in order, columns in order (a fixed
// order: deterministic).
// Shared memory: colsum [rows][kThreads], bins [bins][CG], per row of x: its bin rows per branch (int2)
// and its segment's end (int).
// ---------------------------------------------------------------------------------------------------
__host__ __device__ inline int pool_group(bool cl) { return cl ? 32 : 4; }
constexpr int kPoolUnroll = 8;

// Columns per chunk (TJ, a power of two, up to kThreads / CG) and row groups (RG = kThreads / (CG * TJ)).
__host__ __device__ inline void pool_tile(bool cl, int64_t W, int* TJ, int* RG) {
  const int most = kThreads / pool_group(cl);
  int tj = 1;
  while (tj < most && tj < W) tj *= 2;
  *TJ = tj;
  *RG = most / tj;
}

// floor(p / q) for 0 <= p, 0 < q: 32-bit where both fit (a 64-bit division is a long software sequence).
__device__ __forceinline__ int64_t pool_div(int64_t p, int64_t q) {
  if (p <= int64_t{0xFFFFFFFF} && q <= int64_t{0xFFFFFFFF})
    return static_cast<int64_t>(static_cast<uint32_t>(p) / static_cast<uint32_t>(q));
  return p / q;
}

// A segment's sum added to the slots colsum[row * kThreads] of its bin rows (row `first`'s, every branch's).
template <typename A>
__device__ __forceinline__ void pool_flush(A acc, int64_t first, const int2* rows, int nb, const PoolBranch* br,
                                           A* colsum) {
  for (int b = 0; b < nb; ++b) {
    const int2 span = rows[first * nb + b];
    A* slot = colsum + br[b].row_base * kThreads;
    for (int rr = span.x; rr < span.y; ++rr) slot[rr * kThreads] += acc;
  }
}

// One column's rows [lo, hi) of x (xp: its row 0; sh, osh: the row strides of x and out), copied to out
// (Copy) and summed per segment (in row order), each segment's sum flushed to its bin rows. Rows go in steps
// of kPoolUnroll whatever the segments: every load of a step is issued before the first add (restrict: the
// stores do not alias x), so that many loads are in flight; a step that holds a segment's end checks each row.
template <bool Copy, typename S, typename A>
__device__ __forceinline__ void pool_column(const S* __restrict__ xp, S* __restrict__ op, int64_t sh, int64_t osh,
                                            int64_t lo, int64_t hi, const int2* rows, const int* seg_end, int nb,
                                            const PoolBranch* br, A* colsum) {
  const S* __restrict__ p = xp + lo * sh;
  S* __restrict__ q = op + (Copy ? lo * osh : 0);
  int64_t first = lo, e = lo < hi && seg_end[lo] < hi ? seg_end[lo] : hi;  // the current segment [first, e)
  A acc = A(0);
  for (int64_t i = lo; i < hi; i += kPoolUnroll) {
    const int m = hi - i < kPoolUnroll ? static_cast<int>(hi - i) : kPoolUnroll;  // rows of this step
    S v[kPoolUnroll];
    const S* __restrict__ pk = p;
#pragma unroll
    for (int k = 0; k < kPoolUnroll; ++k) {
      if (k < m) v[k] = *pk;
      pk += sh;
    }
    S* __restrict__ qk = q;
    if (i + kPoolUnroll < e) {  // the whole step inside the segment (m == kPoolUnroll)
#pragma unroll
      for (int k = 0; k < kPoolUnroll; ++k) {
        if (Copy) *qk = v[k];
        acc += to_acc(v[k]);
        qk += osh;
      }
    } else {
#pragma unroll
      for (int k = 0; k < kPoolUnroll; ++k) {
        if (k < m) {
          if (Copy) *qk = v[k];
          acc += to_acc(v[k]);
          if (i + k + 1 == e) {  // the segment ends with this row
            pool_flush(acc, first, rows, nb, br, colsum);
            acc = A(0);
            first = e;
            if (e < hi) e = seg_end[e] < hi ? seg_end[e] : hi;
          }
        }
        qk += osh;
      }
    }
    p += kPoolUnroll * sh;
    q += kPoolUnroll * osh;
  }
}

template <typename S>
__global__ void __launch_bounds__(kThreads, 4) pool_levels_kernel(const __grid_constant__ PoolArgs a) {
  using A = acc_t<S>;
  MSFUSED_DYNAMIC_SHARED(smem_raw);
  const bool cl = a.x_channels_last;
  int TJ, RG;
  pool_tile(cl, a.W, &TJ, &RG);
  const int CG = pool_group(cl);
  const int t = threadIdx.x;
  const int g = cl ? t % CG : t / (RG * TJ);
  const int rg = cl ? t / (CG * TJ) : (t / TJ) % RG;
  const int jj = cl ? (t / CG) % TJ : t % TJ;
  // The slot of column jx (of the chunk), channel gg, row group rgg.
  auto lane_of = [&](int gg, int rgg, int64_t jx) {
    return cl ? (rgg * TJ + static_cast<int>(jx)) * CG + gg : (gg * RG + rgg) * TJ + static_cast<int>(jx);
  };
  const int64_t groups = (a.C + CG - 1) / CG;
  const int64_t n = blockIdx.x / groups, c0 = (blockIdx.x % groups) * CG, c = c0 + g;
  const int nb = a.num_branches;
  const PoolBranch& last = a.br[nb - 1];
  const int64_t R = last.row_base + last.level_h, Bt = last.bin_base + last.level_h * last.level_w;
  A* colsum = reinterpret_cast<A*>(smem_raw);
  A* bins = colsum + R * kThreads;
  int2* rows = reinterpret_cast<int2*>(bins + Bt * CG);
  int* seg_end = reinterpret_cast<int*>(rows + a.H * nb);

  // Per row i of x: the bin rows [r0, r1) of each branch that read it (adaptive windows: r0 = floor(i h / H),
  // r1 = ceil((i + 1) h / H)), and the end of its segment: the next row where some branch's r0 or r1 changes
  // (r0 at end(r0), r1 at start(r1)).
  for (int64_t i = t; i < a.H; i += kThreads) {
    int64_t next = a.H;
    for (int b = 0; b < nb; ++b) {
      const int64_t h = a.br[b].level_h;
      const int64_t r0 = pool_div(i * h, a.H);
      int64_t r1 = pool_div((i + 1) * h + a.H - 1, a.H);
      r1 = r1 < h ? r1 : h;
      rows[i * nb + b] = make_int2(static_cast<int>(r0), static_cast<int>(r1));
      const int64_t e0 = adaptive_end(r0, h, a.H);
      next = e0 < next ? e0 : next;
      if (r1 < h) {
        const int64_t s1 = adaptive_start(r1, h, a.H);
        next = s1 < next ? s1 : next;
      }
    }
    seg_end[i] = static_cast<int>(next);
  }
  for (int64_t idx = t; idx < Bt * CG; idx += kThreads) bins[idx] = A(0);
  __syncthreads();

  // This thread's rows: its row group's share of H.
  const int64_t lo = pool_div(rg * a.H, RG), hi = pool_div((rg + 1) * a.H, RG);
  const S* x = cptr<S>(a.x);
  S* out = mptr<S>(a.out);
  for (int64_t j0 = 0; j0 < a.W; j0 += TJ) {
    const int64_t j = j0 + jj;
    for (int64_t rr = 0; rr < R; ++rr) colsum[rr * kThreads + t] = A(0);  // its own slots
    if (j < a.W && c < a.C) {
      const S* xp = x + n * a.x.stride[0] + c * a.x.stride[1] + j * a.x.stride[3];
      if (a.x_offset >= 0) {
        S* op = out + n * a.out.stride[0] + (a.x_offset + c) * a.out.stride[1] + j * a.out.stride[3];
        pool_column<true>(xp, op, a.x.stride[2], a.out.stride[2], lo, hi, rows, seg_end, nb, a.br, colsum + t);
      } else {
        pool_column<false>(xp, out, a.x.stride[2], 0, lo, hi, rows, seg_end, nb, a.br, colsum + t);
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
      const int64_t jlo = cs > j0 ? cs : j0, jhi = ce < j0 + TJ ? ce : j0 + TJ;
      const A* slots = colsum + row * kThreads;
      A s = A(0);
      for (int rgg = 0; rgg < RG; ++rgg)
        for (int64_t jx = jlo; jx < jhi; ++jx) s += slots[lane_of(gg, rgg, jx - j0)];
      bins[idx] += s;
    }
    __syncthreads();  // colsum read before the next chunk clears it
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

// Per-channel parameter value p[c] in opmath, or `fallback` where the parameter is absent.
template <typename A>
__device__ __forceinline__ A param(const void* p, int64_t c, A fallback) {
  return p != nullptr ? static_cast<const A*>(p)[c] : fallback;
}

// Which of `count` consecutive ranges holds k, given each range's first index (ascending): its index.
template <typename Ranges>
__device__ __forceinline__ int range_of(int64_t k, int count, const Ranges& first) {
  int b = 0;
  for (int q = 1; q < count; ++q)
    if (k >= first(q)) b = q;
  return b;
}

// ---------------------------------------------------------------------------------------------------
// Forward: the levels as gathers from x, and x's slice of the output (extra blocks).
// A level element's taps are read by `lanes` threads (pooling windows: bins on a large map; 1 otherwise)
// whose sums are combined in a fixed tree. With one lane, a thread reads a pooling window in tiles of
// kLevelTile x kLevelTile taps (every load of a tile in flight at once) and finds its element's indices with
// three multiply-high divisions (LevelDivisor). (4 x 4 tiles or 4 elements per thread took 96-118 registers
// against 70 here: fewer resident warps.)
// The copy: x's elements in memory order (16-byte chunks where copy_vec allows), kLevelUnroll per thread and
// step, each one's place in out from one multiply-high division (copy_flat), else from its four indices.
// ---------------------------------------------------------------------------------------------------
constexpr int kLevelTile = 2;  // pooling windows in tiles of kLevelTile x kLevelTile loads (more: registers)
constexpr int kLevelUnroll = 4;
struct alignas(16) LevelChunk {  // the copy's 16-byte unit
  uint32_t word[4];
};

__device__ __forceinline__ uint32_t level_div(uint32_t n, const LevelDivisor& d) {
#ifdef MSFUSED_CUDA_EMULATION
  const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(n) * d.magic) >> 32);
#else
  const uint32_t hi = __umulhi(n, d.magic);
#endif
  return (hi + n) >> d.shift;
}

// Element e (< 2^31) of an (N, C, h, w) tensor in memory order, as unflatten, with the dividers of C, h, w.
__device__ __forceinline__ void level_unflatten(uint32_t e, const LevelDivisor& dc, const LevelDivisor& dh,
                                                const LevelDivisor& dw, bool cl, int64_t* n, int64_t* c,
                                                int64_t* i, int64_t* j) {
  const LevelDivisor& d0 = cl ? dc : dw;  // the fastest index's
  const LevelDivisor& d1 = cl ? dw : dh;
  const LevelDivisor& d2 = cl ? dh : dc;
  const uint32_t q0 = level_div(e, d0), q1 = level_div(q0, d1), q2 = level_div(q1, d2);
  const uint32_t r0 = e - q0 * d0.d, r1 = q0 - q1 * d1.d, r2 = q1 - q2 * d2.d;
  *n = q2;
  if (cl) {
    *c = r0;
    *j = r1;
    *i = r2;
  } else {
    *j = r0;
    *i = r1;
    *c = r2;
  }
}

// One tile of a pooling window: rows [0, ni) x columns [0, nj) (ni, nj <= T) of x at p (strides sh, sw), each
// column's rows weighted by wh and added to col[column] in row order; every load issued before the first add.
template <int T, typename S, typename A>
__device__ __forceinline__ void level_tile(const S* __restrict__ p, int64_t sh, int64_t sw, int ni, int nj, A wh,
                                           A* col) {
  S v[T][T];
#pragma unroll
  for (int jj = 0; jj < T; ++jj)
#pragma unroll
    for (int ii = 0; ii < T; ++ii)
      if (jj < nj && ii < ni) v[jj][ii] = p[ii * sh + jj * sw];
#pragma unroll
  for (int jj = 0; jj < T; ++jj)
#pragma unroll
    for (int ii = 0; ii < T; ++ii)
      if (jj < nj && ii < ni) col[jj] += wh * to_acc(v[jj][ii]);
}

// The pooling window [rs, rs + rc) x [cs, cs + cc) of x at base (strides sh, sw) as the general path sums it
// (each column's rows weighted by wh, then the columns weighted by ww, in order), T x T loads at a time (one
// tile without loops where the window fits it).
template <int T, typename S, typename A>
__device__ __forceinline__ A level_window(const S* __restrict__ base, int64_t sh, int64_t sw, int64_t rs, int64_t rc,
                                          int64_t cs, int64_t cc, A wh, A ww) {
  A acc = A(0);
  A col[T];
  if (rc <= T && cc <= T) {
#pragma unroll
    for (int jj = 0; jj < T; ++jj) col[jj] = A(0);
    level_tile<T>(base + rs * sh + cs * sw, sh, sw, static_cast<int>(rc), static_cast<int>(cc), wh, col);
#pragma unroll
    for (int jj = 0; jj < T; ++jj)
      if (jj < cc) acc += ww * col[jj];
    return acc;
  }
  for (int64_t j0 = 0; j0 < cc; j0 += T) {
#pragma unroll
    for (int jj = 0; jj < T; ++jj) col[jj] = A(0);
    const int nj = cc - j0 < T ? static_cast<int>(cc - j0) : T;
    const S* __restrict__ pc = base + (cs + j0) * sw;
    for (int64_t i0 = 0; i0 < rc; i0 += T)
      level_tile<T>(pc + (rs + i0) * sh, sh, sw, rc - i0 < T ? static_cast<int>(rc - i0) : T, nj, wh, col);
#pragma unroll
    for (int jj = 0; jj < T; ++jj)
      if (jj < nj) acc += ww * col[jj];
  }
  return acc;
}

// x's copy in memory order into the runs of out's slice: item u (vec elements of type T) is element
// e = u * vec, written at dst + (e / run) * gap + e; kLevelUnroll loads in flight per thread, then their
// stores.
template <typename T, typename S>
__device__ __forceinline__ void copy_to_runs(const T* __restrict__ src, S* __restrict__ dst, uint32_t count,
                                             uint32_t vec, uint32_t first, uint32_t step, const LevelDivisor& run,
                                             int64_t gap) {
  for (uint32_t u0 = first; u0 < count; u0 += step) {
    T v[kLevelUnroll];
#pragma unroll
    for (int k = 0; k < kLevelUnroll; ++k)
      if (u0 + k * kThreads < count) v[k] = src[u0 + k * kThreads];
#pragma unroll
    for (int k = 0; k < kLevelUnroll; ++k) {
      const uint32_t e = (u0 + k * kThreads) * vec;
      if (u0 + k * kThreads < count)
        *reinterpret_cast<T*>(dst + static_cast<int64_t>(level_div(e, run)) * gap + e) = v[k];
    }
  }
}

template <typename S>
__global__ void __launch_bounds__(kThreads, 1) levels_kernel(const __grid_constant__ LevelArgs a) {
  using A = acc_t<S>;
  __shared__ A s_acc[kThreads];
  const int64_t blk = blockIdx.x;
  const S* __restrict__ x = cptr<S>(a.x);
  if (blk < a.copy_blocks) {  // x into out[:, x_offset : x_offset + C], grid-stride
    const int64_t total = a.N * a.C * a.H * a.W;
    S* __restrict__ out = mptr<S>(a.out);
    if (a.copy_flat) {  // 32-bit element indices (x below 2^31 elements; the step below 2^21)
      S* __restrict__ dst = out + a.x_offset * a.out.stride[1];
      const int64_t gap = a.copy_run_stride - a.copy_run;
      const uint32_t total32 = static_cast<uint32_t>(total);
      const uint32_t step = static_cast<uint32_t>(a.copy_blocks) * kThreads * kLevelUnroll;
      const uint32_t first = static_cast<uint32_t>(blk) * kThreads * kLevelUnroll + threadIdx.x;
      if (a.copy_vec > 1)  // 16-byte chunks: a chunk never straddles a run (copy_vec divides run and stride)
        copy_to_runs(reinterpret_cast<const LevelChunk*>(x), dst, total32 / a.copy_vec,
                     static_cast<uint32_t>(a.copy_vec), first, step, a.div_run, gap);
      else
        copy_to_runs(x, dst, total32, 1u, first, step, a.div_run, gap);
      return;
    }
    for (int64_t e = blk * kThreads + threadIdx.x; e < total; e += a.copy_blocks * kThreads) {
      int64_t n, c, i, j;
      unflatten(e, a.C, a.H, a.W, a.x_channels_last, &n, &c, &i, &j);
      out[off4<S>(a.out, n, a.x_offset + c, i, j)] = x[off4<S>(a.x, n, c, i, j)];
    }
    return;
  }
  const int64_t lb = blk - a.copy_blocks;
  const int b = range_of(lb, a.num_branches, [&](int q) { return a.br[q].block_begin; });
  const LevelBranch& br = a.br[b];
  const int64_t h = br.level_h, w = br.level_w, elems = a.N * a.C * h * w;
  const int t = threadIdx.x, G = static_cast<int>(br.lanes), lane = t % G;
  const bool ac = a.align_corners, cl = a.x_channels_last;
  const ResizeKind kh = static_cast<ResizeKind>(br.down_h), kw = static_cast<ResizeKind>(br.down_w);
  const bool pool_h = kh == ResizeKind::AvgFactor || kh == ResizeKind::Adaptive;
  const bool pool_w = kw == ResizeKind::AvgFactor || kw == ResizeKind::Adaptive;
  const int64_t sh = a.x.stride[2], sw = a.x.stride[3];
  // Element e's indices (n, c, y, xx) and x's plane of (n, c).
  auto locate = [&](int64_t e, int64_t* n, int64_t* c, int64_t* y, int64_t* xx) {
    if (br.fast)
      level_unflatten(static_cast<uint32_t>(e), a.div_c, br.div_h, br.div_w, cl, n, c, y, xx);
    else
      unflatten(e, a.C, h, w, cl, n, c, y, xx);
    return x + *n * a.x.stride[0] + *c * a.x.stride[1];
  };
  if (G == 1) {  // (G is uniform over the block: no barrier below)
    const A scale_h = kh == ResizeKind::Linear ? linear_scale<A>(a.H, h, ac) : A(0);
    const A scale_w = kw == ResizeKind::Linear ? linear_scale<A>(a.W, w, ac) : A(0);
    const bool window = (pool_h || kh == ResizeKind::Identity) && (pool_w || kw == ResizeKind::Identity);
    const int64_t e = (lb - br.block_begin) * kThreads + t;
    if (e < elems) {
      int64_t n, c, y, xx;
      const S* __restrict__ base = locate(e, &n, &c, &y, &xx);
      A acc = A(0);
      if (window) {
        // Pooling (or identity) on both axes: the window in tiles, the weights as for_each_tap gives them.
        TapRun rows{y, 1}, cols{xx, 1};
        if (pool_h) rows = pooling_run(kh, y, a.H, h, br.factor);
        if (pool_w) cols = pooling_run(kw, xx, a.W, w, br.factor);
        const A wh = pool_h ? A(1) / static_cast<A>(rows.count) : A(1);
        const A ww = pool_w ? A(1) / static_cast<A>(cols.count) : A(1);
        acc = level_window<kLevelTile, S, A>(base, sh, sw, rows.start, rows.count, cols.start, cols.count, wh, ww);
      } else {
        // As the CPU kernel: the height taps summed per width tap.
        for_each_tap<A>(kw, xx, a.W, w, br.factor, ac, scale_w, [&](int64_t j, A ww) {
          A col = A(0);
          for_each_tap<A>(kh, y, a.H, h, br.factor, ac, scale_h,
                          [&](int64_t i, A wh) { col += wh * to_acc(base[i * sh + j * sw]); });
          acc += ww * col;
        });
      }
      // Rounded to S as the reference's level is.
      mptr<S>(br.level)[off4<S>(br.level, n, c, y, xx)] = from_acc<S>(acc);
    }
    return;
  }
  // Pooling on both axes (the launcher's rule), kThreads / G elements per block: the window's sum over the
  // lanes, then the weights.
  const int64_t e = (lb - br.block_begin) * (kThreads / G) + t / G;
  const bool valid = e < elems;  // (uniform control flow below: the lane tree has barriers)
  int64_t n = 0, c = 0, y = 0, xx = 0;
  const S* __restrict__ base = valid ? locate(e, &n, &c, &y, &xx) : x;
  TapRun rows{y, 1}, cols{xx, 1};
  if (kh != ResizeKind::Identity) rows = pooling_run(kh, y, a.H, h, br.factor);
  if (kw != ResizeKind::Identity) cols = pooling_run(kw, xx, a.W, w, br.factor);
  const int64_t total = valid ? rows.count * cols.count : 0;
  A acc = A(0);
  if (lane < total) {
    int64_t i = rows.start + lane / cols.count, j = cols.start + lane % cols.count;
    const int64_t step_i = G / cols.count, step_j = G % cols.count;
    for (int64_t r = lane; r < total; r += G) {
      acc += to_acc(base[i * sh + j * sw]);
      i += step_i;
      j += step_j;
      if (j >= cols.start + cols.count) {
        j -= cols.count;
        ++i;
      }
    }
  }
  acc = lane_tree_sum(acc, s_acc, t, lane, G) * (A(1) / static_cast<A>(rows.count)) *
        (A(1) / static_cast<A>(cols.count));
  // Rounded to S as the reference's level is.
  if (valid && lane == 0) mptr<S>(br.level)[off4<S>(br.level, n, c, y, xx)] = from_acc<S>(acc);
}

// ---------------------------------------------------------------------------------------------------
// Forward, batch statistics: per (branch, channel, chunk) the chunk's (count, sum, M2 about its mean).
// ---------------------------------------------------------------------------------------------------
// The chunk [*e0, *e1) of `elems` values cut into `chunks` (the last ones may be empty).
__device__ __forceinline__ void chunk_range(int64_t chunk, int64_t chunks, int64_t elems, int64_t* e0, int64_t* e1) {
  const int64_t per = (elems + chunks - 1) / chunks;
  *e0 = chunk * per < elems ? chunk * per : elems;
  *e1 = *e0 + per < elems ? *e0 + per : elems;
}

template <typename S>
__global__ void __launch_bounds__(kThreads, 1) stats_partial_kernel(const __grid_constant__ StatsArgs a) {
  __shared__ double sm[kThreads];
  const int64_t blk = blockIdx.x;
  const int b = range_of(blk, a.num_branches, [&](int q) { return a.br[q].block_begin; });
  const StatsBranch& sb = a.br[b];
  const int64_t c = (blk - sb.block_begin) / sb.chunks, chunk = (blk - sb.block_begin) % sb.chunks;
  const int64_t hw = sb.h * sb.w;
  int64_t e0, e1;
  chunk_range(chunk, sb.chunks, a.N * hw, &e0, &e1);
  const S* pre = cptr<S>(sb.pre);
  auto value = [&](int64_t e) {
    const int64_t n = e / hw, rem = e % hw;
    return static_cast<double>(to_acc(pre[off4<S>(sb.pre, n, c, rem / sb.w, rem % sb.w)]));
  };
  double s = 0;
  for (int64_t e = e0 + threadIdx.x; e < e1; e += kThreads) s += value(e);
  const double sum = block_sum(s, sm);
  const double count = static_cast<double>(e1 - e0);
  const double mean = count > 0 ? sum / count : 0.0;
  double m = 0;
  for (int64_t e = e0 + threadIdx.x; e < e1; e += kThreads) {
    const double d = value(e) - mean;
    m += d * d;
  }
  const double m2 = block_sum(m, sm);
  if (threadIdx.x == 0) {
    double* dst = a.partial + ((sb.channel_base + c) * a.max_chunks + chunk) * 3;
    dst[0] = count;
    dst[1] = sum;
    dst[2] = m2;
  }
}

// One thread per channel: the chunks in chunk order. The mean is sum / count (a channel of one-signed
// Inf keeps it, as ATen's batch norm), M2 adds each chunk's own plus its mean's offset. Without partials
// (partial == nullptr) the statistics are given (mean, var read: the backward recomputing a branch's
// activation) and only the epilogue's alpha, beta are written.
template <typename S>
__global__ void __launch_bounds__(kThreads, 1) merge_stats_kernel(const __grid_constant__ MergeStatsArgs a) {
  using Stat = acc_t<S>;  // float, double for double (msfused::stats_dtype); also the opmath type
  int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  int b = 0;
  while (b < a.num_branches && c >= a.br[b].channels) c -= a.br[b++].channels;
  if (b >= a.num_branches) return;
  const MergeStatsBranch& mb = a.br[b];
  Stat mean_s, var_s;
  if (a.partial == nullptr) {
    mean_s = static_cast<const Stat*>(mb.mean)[c];
    var_s = static_cast<const Stat*>(mb.var)[c];
  } else {
    const double* p = a.partial + (mb.channel_base + c) * a.max_chunks * 3;
    double count = 0, sum = 0;
    for (int64_t k = 0; k < mb.chunks; ++k) {  // fixed order: deterministic
      count += p[3 * k];
      sum += p[3 * k + 1];
    }
    const double mean = sum / count;
    double m2 = 0;
    for (int64_t k = 0; k < mb.chunks; ++k) {
      const double nk = p[3 * k];
      if (nk == 0) continue;
      const double d = p[3 * k + 1] / nk - mean;
      m2 += p[3 * k + 2] + nk * d * d;
    }
    mean_s = static_cast<Stat>(mean);
    var_s = static_cast<Stat>(m2 / count);
    static_cast<Stat*>(mb.mean)[c] = mean_s;
    static_cast<Stat*>(mb.var)[c] = var_s;
  }
  double alpha, beta;
  norm_epilogue(true, static_cast<double>(param<Stat>(mb.scale, c, Stat(1))),
                static_cast<double>(param<Stat>(mb.shift, c, Stat(0))), static_cast<double>(mean_s),
                static_cast<double>(var_s), mb.eps, &alpha, &beta);
  static_cast<Stat*>(mb.alpha)[c] = static_cast<Stat>(alpha);
  static_cast<Stat*>(mb.beta)[c] = static_cast<Stat>(beta);
}

// ---------------------------------------------------------------------------------------------------
// Forward: norm, activation and the resize back up, a tile of one branch's outputs per block.
// ---------------------------------------------------------------------------------------------------
// Tiles (OutputTiles): NCHW, rows x cols outputs of one (n, channel) plane (of several small ones);
// channels_last, cols pixels of one output row with every channel of the branch (channels fastest, as in
// memory). What depends on the
// block only (branch, n, channel or row, per-channel parameters, scales, plane pointers) is computed once
// per block, each axis's taps once per tile row and column (shared tables), so that an output element
// costs a few table reads, its level loads and the sums: one thread per output element with all of that
// per element ran ~600 instructions per element on an H200, instruction-bound at 10-30x the bandwidth
// floor (bench/results/cuda-h200-2026-11-30.json).
#ifdef MSFUSED_CUDA_EMULATION
constexpr int64_t kUpTileElems = 64;  // small, so that the tests' small maps run several tiles
#else
constexpr int64_t kUpTileElems = 2048;  // outputs per tile: 8 per thread
#endif
constexpr int64_t kGpuUpTileElems = 2048;
constexpr int64_t kUpTileMaxCols = 512, kUpTileMaxRows = 256;  // the shared tap tables' sizes
#ifdef MSFUSED_CUDA_EMULATION
constexpr int64_t kUpStage = 40;  // small, so that the tests run both the staged and the direct reads
#else
constexpr int64_t kUpStage = 3072;  // the staged level values (A) at most
#endif

// The (n, c, i, j) of a memory-order index of an (N, C, H, W) tensor, advanced by a fixed step with carries
// (no division per element): digits d0 (fastest), d1, d2 of radices r0, r1, r2 (NCHW: j, i, c;
// channels_last: c, j, i) and d3 = n, in I (the flat index's type). C, H, W below 2^30 (a digit plus a step
// digit plus a carry fits int).
template <bool CL, typename I>
struct MemoryOrderCursor {
  int r0, r1, r2, d0, d1, d2, s0, s1, s2;
  I d3, s3;
  __device__ __forceinline__ MemoryOrderCursor(I e, I step, int C, int H, int W)
      : r0(CL ? C : W), r1(CL ? W : H), r2(CL ? H : C) {
    d0 = static_cast<int>(e % r0), e /= r0, d1 = static_cast<int>(e % r1), e /= r1;
    d2 = static_cast<int>(e % r2), d3 = e / r2;
    s0 = static_cast<int>(step % r0), step /= r0, s1 = static_cast<int>(step % r1), step /= r1;
    s2 = static_cast<int>(step % r2), s3 = step / r2;
  }
  __device__ __forceinline__ I n() const { return d3; }
  __device__ __forceinline__ int c() const { return CL ? d0 : d2; }
  __device__ __forceinline__ int i() const { return CL ? d2 : d1; }
  __device__ __forceinline__ int j() const { return CL ? d1 : d0; }
  __device__ __forceinline__ void advance() {
    d0 += s0;
    int carry = d0 >= r0;
    d0 -= carry ? r0 : 0;
    d1 += s1 + carry;
    carry = d1 >= r1;
    d1 -= carry ? r1 : 0;
    d2 += s2 + carry;
    carry = d2 >= r2;
    d2 -= carry ? r2 : 0;
    d3 += s3 + carry;
  }
};

// Tile `tile`'s origin: its first (n, channel, row, column) (OutputTiles' order: columns fastest, then rows,
// then channel groups, then n), and its extent clipped to the output (rows, cols, channels).
struct TileAt {
  int64_t n, c, I0, J0;
  int rows, cols, channels;
};
__device__ __forceinline__ TileAt tile_at(const OutputTiles& ts, int64_t tile, int64_t C, int64_t H, int64_t W) {
  TileAt at;
  at.J0 = (tile % ts.col_tiles) * ts.cols;
  tile /= ts.col_tiles;
  at.I0 = (tile % ts.row_tiles) * ts.rows;
  tile /= ts.row_tiles;
  at.c = (tile % ts.channel_tiles) * ts.channels;
  at.n = tile / ts.channel_tiles;
  at.cols = static_cast<int>(W - at.J0 < ts.cols ? W - at.J0 : ts.cols);
  at.rows = static_cast<int>(H - at.I0 < ts.rows ? H - at.I0 : ts.rows);
  at.channels = static_cast<int>(C - at.c < ts.channels ? C - at.c : ts.channels);
  return at;
}

// One output index's taps on one axis of an up-resize: i0 with weight l0, then (Linear only) i1 with l1.
template <typename A>
struct UpTap {
  int i0, i1;
  A l0, l1;
};

template <typename A>
__device__ __forceinline__ UpTap<A> up_tap(ResizeKind kind, int64_t o, int64_t in, int64_t out, bool ac, A scale) {
  UpTap<A> t{static_cast<int>(o), static_cast<int>(o), A(1), A(0)};  // Identity
  if (kind == ResizeKind::Linear) {
    int64_t i0, i1;
    linear_taps<A>(o, in, scale, ac, &i0, &i1, &t.l0, &t.l1);
    t.i0 = static_cast<int>(i0);
    t.i1 = static_cast<int>(i1);
  } else if (kind == ResizeKind::Nearest) {
    t.i0 = t.i1 = static_cast<int>(nearest_source(o, in, out));
  }
  return t;
}

// val plus the up-resize's value from its taps, as for_each_tap visits them (the CPU kernels' order): per
// width tap, the height taps summed, times the width weight, added to val. level(i, j): the level value.
template <typename A, typename L>
__device__ __forceinline__ void up_accumulate(A& val, const UpTap<A>& th, bool two_h, const UpTap<A>& tw, bool two_w,
                                              L&& level) {
  {
    A col = A(0);
    col += th.l0 * level(th.i0, tw.i0);
    if (two_h) col += th.l1 * level(th.i1, tw.i0);
    val += tw.l0 * col;
  }
  if (two_w) {
    A col = A(0);
    col += th.l0 * level(th.i0, tw.i1);
    if (two_h) col += th.l1 * level(th.i1, tw.i1);
    val += tw.l1 * col;
  }
}

// The up-resized value alone (the block's epilogue: level(i, j) the activated level value rounded to S).
template <typename A, typename L>
__device__ __forceinline__ A up_sum(const UpTap<A>& th, bool two_h, const UpTap<A>& tw, bool two_w, L&& level) {
  A val = A(0);
  up_accumulate(val, th, two_h, tw, two_w, level);
  return val;
}

template <typename S>
__global__ void __launch_bounds__(kThreads, 1) epilogue_up_kernel(const __grid_constant__ EpilogueArgs a) {
  using A = acc_t<S>;
  __shared__ UpTap<A> s_cols[kUpTileMaxCols];
  __shared__ UpTap<A> s_rows[kUpTileMaxRows];
  __shared__ A s_level[kUpStage];
  const int t = threadIdx.x;
  const int64_t blk = blockIdx.x;
  const int b = range_of(blk, a.num_branches, [&](int q) { return a.br[q].block_begin; });
  const EpilogueBranch& eb = a.br[b];
  const bool cl = a.channels_last, ac = a.align_corners;
  const int64_t h = eb.h, w = eb.w;
  const ResizeKind uh = static_cast<ResizeKind>(eb.up_h), uw = static_cast<ResizeKind>(eb.up_w);
  const bool two_h = uh == ResizeKind::Linear, two_w = uw == ResizeKind::Linear;
  const A sh = linear_scale<A>(h, a.H, ac), sw = linear_scale<A>(w, a.W, ac);
  const Activation act = static_cast<Activation>(a.activation);
  // This block's tile: NCHW, rows [I0, I0 + rows) x columns [J0, J0 + cols) of C planes from channel c;
  // channels_last, row I0, columns [J0, J0 + cols), every channel (C of them).
  const TileAt at = tile_at(eb.tiles, blk - eb.block_begin, cl ? 1 : eb.channels, a.H, a.W);
  const int64_t n = at.n, c = at.c, I0 = at.I0, J0 = at.J0;
  const int rows = at.rows, cols = at.cols, C = cl ? static_cast<int>(eb.channels) : at.channels;
  for (int q = t; q < cols; q += kThreads) s_cols[q] = up_tap<A>(uw, J0 + q, w, a.W, ac, sw);
  for (int q = t; q < rows; q += kThreads) s_rows[q] = up_tap<A>(uh, I0 + q, h, a.H, ac, sh);
  __syncthreads();

  const View4& pv = eb.pre;
  const View4& ov = a.out;
  const S* __restrict__ pre = cptr<S>(pv) + n * pv.stride[0] + c * pv.stride[1];
  S* __restrict__ out = mptr<S>(ov) + n * ov.stride[0] + (eb.channel_offset + c) * ov.stride[1] + I0 * ov.stride[2] +
                        J0 * ov.stride[3];
  // Channel cc's activated level value at (i, j), rounded to S (the reference's activation output).
  auto activated = [&](int64_t cc, int64_t i, int64_t j) {
    const A alpha = param<A>(eb.alpha, c + cc, A(1)), beta = param<A>(eb.beta, c + cc, A(0));
    return round_to<S>(
        activate<A>(act, alpha * to_acc(pre[cc * pv.stride[1] + i * pv.stride[2] + j * pv.stride[3]]) + beta));
  };
  // The level rectangle the tile reads (the taps are monotone in the output index), staged in shared
  // memory, activated, when it is smaller than the tile's tap reads and fits: each value then is read and
  // activated once per tile rather than once per tap.
  const int i_lo = s_rows[0].i0, j_lo = s_cols[0].i0;
  const int RH = s_rows[rows - 1].i1 - i_lo + 1, RW = s_cols[cols - 1].i1 - j_lo + 1;
  const int64_t region = static_cast<int64_t>(RH) * RW * C;
  const bool staged =
      region <= kUpStage && region < static_cast<int64_t>(rows) * cols * C * (two_h ? 2 : 1) * (two_w ? 2 : 1);
  if (staged) {
    for (int q = t; q < region; q += kThreads) {
      const int cc = q % C, rc = q / C;
      s_level[q] = activated(cc, i_lo + rc / RW, j_lo + rc % RW);
    }
    __syncthreads();
  }

  // The output (channel cc, tile row r, tile column j) from level_of(cc, i, j).
  auto emit = [&](int cc, int r, int j, auto&& level_of) {
    auto level = [&](int i, int jj) { return level_of(cc, i, jj); };
    out[cc * ov.stride[1] + r * ov.stride[2] + j * ov.stride[3]] =
        from_acc<S>(up_sum(s_rows[r], two_h, s_cols[j], two_w, level));
  };
  // The tile's outputs in memory order (channels_last: (column, channel); NCHW: (channel, row, column)), the
  // next one kThreads further on by carries (MemoryOrderCursor: no division per element).
  auto run = [&](auto&& level_of) {
    auto walk = [&](auto at) {
      for (int e = t; e < C * rows * cols; e += kThreads, at.advance()) emit(at.c(), at.i(), at.j(), level_of);
    };
    if (cl)
      walk(MemoryOrderCursor<true, int>(t, kThreads, C, 1, cols));
    else
      walk(MemoryOrderCursor<false, int>(t, kThreads, C, rows, cols));
  };
  if (staged)
    run([&](int cc, int i, int j) { return s_level[((i - i_lo) * RW + (j - j_lo)) * C + cc]; });
  else
    run([&](int cc, int i, int j) { return activated(cc, i, j); });
}

// ---------------------------------------------------------------------------------------------------
// Backward 1: upsample adjoint (gather) + activation backward + partial sums, per (branch, channel, chunk).
// ---------------------------------------------------------------------------------------------------
// The summed weight with which output o of a resize reads input i (0 if it does not).
template <typename A>
__device__ __forceinline__ A weight_of(ResizeKind kind, int64_t o, int64_t i, int64_t in, int64_t out, bool ac,
                                       A scale) {
  A wsum = A(0);
  for_each_weight_of<A>(kind, o, i, in, out, 1, ac, scale, [&](A wt) { wsum += wt; });
  return wsum;
}

// This lane's share of a sum over the rectangle [I0, I1) x [J0, J1) (a level pixel's readers): the
// entries lane, lane + G, ... in row-major order, f(I, J) each, summed in that order. Index type I: int
// where the rectangle's entries count fits (the adjoints' table paths), else int64_t.
template <typename A, typename I, typename F>
__device__ __forceinline__ A lane_rectangle_sum(int lane, int G, I I0, I I1, I J0, I J1, F&& f) {
  const I nJ = J1 - J0, total = (I1 - I0) * nJ;
  A part = A(0);
  if (lane >= total) return part;
  I I_ = I0 + lane / nJ, J = J0 + lane % nJ;
  const I step_i = G / nJ, step_j = G % nJ;
  for (I r = lane; r < total; r += G) {
    part += f(I_, J);
    I_ += step_i;
    J += step_j;
    if (J >= J1) {
      J -= nJ;
      ++I_;
    }
  }
  return part;
}

// The readers of a level row (column) i of an up-resize from in to out, as up_grad's tables hold them: the
// range [o0, o1) of output rows (columns) and each one's weight_of, at weights[i * width + o - o0].
template <typename A, typename Wt = A>  // A: the resize's arithmetic (the forward's taps), Wt: the weights kept
__device__ __forceinline__ void up_grad_table_entry(ResizeKind kind, int64_t i, int64_t in, int64_t out, bool ac,
                                                    int64_t width, int2* range, Wt* weights) {
  const A scale = linear_scale<A>(in, out, ac);
  int64_t o0, o1;
  readers_of<A>(kind, i, in, out, 1, ac, scale, &o0, &o1);
  range[i] = make_int2(static_cast<int>(o0), static_cast<int>(o1));
  for (int64_t o = o0; o < o1; ++o) weights[i * width + o - o0] = weight_of<A>(kind, o, i, in, out, ac, scale);
}

// The reader tables in the block's dynamic shared memory (up_grad, project_adjoint): the reader ranges of
// the h level rows, then of the w columns (int2), then their weights (table_h per row, table_w per column);
// built by the block's threads where `tables` (uniform over the block), else only laid out.
template <typename Wt>
struct AdjointTables {
  int2* ranges;
  Wt* row_weights;
  Wt* col_weights;
};
template <typename A, typename Wt = A>  // A: the resize's arithmetic, Wt: the weights kept
__device__ __forceinline__ AdjointTables<Wt> build_adjoint_tables(unsigned char* smem, bool tables, ResizeKind kh,
                                                                 ResizeKind kw, int64_t h, int64_t w, int64_t H,
                                                                 int64_t W, bool ac, int64_t table_h, int64_t table_w) {
  AdjointTables<Wt> tb;
  tb.ranges = reinterpret_cast<int2*>(smem);
  tb.row_weights = reinterpret_cast<Wt*>(tb.ranges + (tables ? h + w : 0));
  tb.col_weights = tb.row_weights + (tables ? h * table_h : 0);
  if (tables) {
    for (int64_t q = threadIdx.x; q < h + w; q += kThreads) {
      if (q < h)
        up_grad_table_entry<A, Wt>(kh, q, h, H, ac, table_h, tb.ranges, tb.row_weights);
      else
        up_grad_table_entry<A, Wt>(kw, q - h, w, W, ac, table_w, tb.ranges + h, tb.col_weights);
    }
    __syncthreads();
  }
  return tb;
}

// A block: one channel's chunk of level pixels (n, i, j), kThreads / lanes at a time (rounds), each pixel's
// readers split over its lanes. With the tables (ub.table_h > 0: launch_up_grad found that they fit) the
// block first tabulates, per level row and column, its readers and their weights (weight_of: a float
// resize computation per reader), and the readers' sum reads them (the same products in the same order).
// An identity branch (a factor-1 level) reads grad itself. The pixel's (n, i, j) advance by carries.
template <typename S>
__global__ void __launch_bounds__(kThreads, 1) up_grad_kernel(const __grid_constant__ UpGradArgs a) {
  using A = acc_t<S>;
  __shared__ double s_red[kThreads];  // the lane tree's, then the block sums' slots
  MSFUSED_DYNAMIC_SHARED(smem_raw);
  const int64_t blk = blockIdx.x;
  const int b = range_of(blk, a.num_branches, [&](int q) { return a.br[q].block_begin; });
  const UpGradBranch& ub = a.br[b];
  const int64_t c = (blk - ub.block_begin) / ub.chunks, chunk = (blk - ub.block_begin) % ub.chunks;
  const int64_t h = ub.h, w = ub.w, hw = h * w;
  int64_t e0, e1;
  chunk_range(chunk, ub.chunks, a.N * hw, &e0, &e1);
  const bool ac = a.align_corners;
  const ResizeKind kh = static_cast<ResizeKind>(ub.up_h), kw = static_cast<ResizeKind>(ub.up_w);
  const bool identity = kh == ResizeKind::Identity && kw == ResizeKind::Identity;
  const bool tables = !identity && ub.table_h > 0;
  // The adjoint's sums run in double, as the CPU kernels' (csrc/cpu/backward.cpp): a level value sums about
  // (H / h) * (W / w) * 4 terms, and in float32 their rounding showed in the cancelling sums of the norm's
  // parameter gradients (tests/test_cuda_emulation.py: 20x the CPU kernels' error). The readers and their
  // weights are the forward's (opmath), widened.
  const A sh = linear_scale<A>(h, a.H, ac), sw = linear_scale<A>(w, a.W, ac);
  // This channel's norm: the epilogue's alpha, beta; p (dconv = p * dY) and the center of the sums.
  const double mean = ub.batch_stats ? static_cast<double>(param<A>(ub.mean, c, A(0))) : 0.0;
  const double var = ub.batch_stats ? static_cast<double>(param<A>(ub.var, c, A(0))) : 0.0;
  const double scale = static_cast<double>(param<A>(ub.scale, c, A(1)));
  double alpha_d, beta_d;
  norm_epilogue(ub.batch_stats, scale, static_cast<double>(param<A>(ub.shift, c, A(0))), mean, var, ub.eps, &alpha_d,
                &beta_d);
  const A alpha = static_cast<A>(alpha_d), beta = static_cast<A>(beta_d);
  const double ps = ub.batch_stats ? 1.0 : scale;
  const Activation act = static_cast<Activation>(a.activation);
  const S* __restrict__ grad = cptr<S>(a.grad);
  const S* __restrict__ pre = cptr<S>(ub.pre);
  S* dconv = mptr<S>(ub.dconv);
  const int64_t gc = ub.channel_offset + c;
  const int t = threadIdx.x;
  const int G = static_cast<int>(ub.lanes), lane = t % G, per_round = kThreads / G;
  const AdjointTables<double> tb =
      build_adjoint_tables<A, double>(smem_raw, tables, kh, kw, h, w, a.H, a.W, ac, ub.table_h, ub.table_w);
  int2* ranges = tb.ranges;
  double* row_weights = tb.row_weights;
  double* col_weights = tb.col_weights;
  // This thread's pixel, advanced by per_round pixels a round (by carries where the level's sizes fit the
  // cursor, else divided out).
  const bool small = h < (int64_t{1} << 30) && w < (int64_t{1} << 30);
  MemoryOrderCursor<false, int64_t> at(e0 + t / G, per_round, 1, small ? static_cast<int>(h) : 1,
                                       small ? static_cast<int>(w) : 1);
  double s1 = 0, s2 = 0;
  // Rounds: every thread runs the same number (the barriers of the lane tree are block-wide).
  for (int64_t base = e0; base < e1; base += per_round, at.advance()) {
    const int64_t e = base + t / G;
    const bool valid = e < e1;
    int64_t n = at.n(), i = at.i(), j = at.j();
    if (!small) {
      n = e / hw;
      i = e % hw / w;
      j = e % w;
    }
    double part = 0;
    if (valid) {
      const S* __restrict__ g = grad + n * a.grad.stride[0] + gc * a.grad.stride[1];
      if (identity) {
        part = static_cast<double>(to_acc(g[i * a.grad.stride[2] + j * a.grad.stride[3]]));  // lanes == 1
      } else if (tables) {
        // (int indices and in-plane offsets: adjoint_tables checked that they fit)
        const int2 rows = ranges[i], cols = ranges[h + j];
        const double* wr = row_weights + i * ub.table_h;
        const double* wc = col_weights + j * ub.table_w;
        const int s2 = static_cast<int>(a.grad.stride[2]), s3 = static_cast<int>(a.grad.stride[3]);
        part = lane_rectangle_sum<double>(lane, G, rows.x, rows.y, cols.x, cols.y, [&](int I, int J) {
          return wr[I - rows.x] * wc[J - cols.x] * static_cast<double>(to_acc(g[I * s2 + J * s3]));
        });
      } else {
        int64_t I0, I1, J0, J1;
        readers_of<A>(kh, i, h, a.H, 1, ac, sh, &I0, &I1);
        readers_of<A>(kw, j, w, a.W, 1, ac, sw, &J0, &J1);
        part = lane_rectangle_sum<double>(lane, G, I0, I1, J0, J1, [&](int64_t I, int64_t J) {
          return static_cast<double>(weight_of<A>(kh, I, i, h, a.H, ac, sh)) *
                 static_cast<double>(weight_of<A>(kw, J, j, w, a.W, ac, sw)) *
                 static_cast<double>(to_acc(g[I * a.grad.stride[2] + J * a.grad.stride[3]]));
        });
      }
    }
    if (G > 1) part = lane_tree_sum(part, s_red, t, lane, G);
    if (valid && lane == 0) {
      const A pv = to_acc(pre[off4<S>(ub.pre, n, c, i, j)]);
      // The reference rounds the activation's incoming gradient to the dtype.
      const A dy = round_to<S>(static_cast<A>(part)) * activate_grad<A>(act, alpha * pv + beta);
      s1 += static_cast<double>(dy);
      s2 += static_cast<double>(dy) * (static_cast<double>(pv) - mean);
      dconv[off4<S>(ub.dconv, n, c, i, j)] = from_acc<S>(static_cast<A>(static_cast<double>(dy) * ps));
    }
  }
  const double t1 = block_sum(s1, s_red);
  const double t2 = block_sum(s2, s_red);
  if (t == 0) {
    double* dst = a.partial + ((ub.channel_base + c) * a.max_chunks + chunk) * 2;
    dst[0] = t1;
    dst[1] = t2;
  }
}

// One thread per channel: the chunks' partial sums in chunk order, and the norm's backward from them.
template <typename S>
__global__ void __launch_bounds__(kThreads, 1) reduce_partials_kernel(const __grid_constant__ ReduceArgs a) {
  using A = acc_t<S>;
  int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  int b = 0;
  while (b < a.num_branches && c >= a.br[b].channels) c -= a.br[b++].channels;
  if (b >= a.num_branches) return;
  const ReduceBranch& rb = a.br[b];
  const int64_t row = rb.channel_base + c;
  double s1 = 0, s2 = 0;
  for (int64_t k = 0; k < rb.chunks; ++k) {  // fixed order: deterministic
    s1 += a.partial[(row * a.max_chunks + k) * 2];
    s2 += a.partial[(row * a.max_chunks + k) * 2 + 1];
  }
  double d_scale = s2;  // sum(dY * conv)
  if (rb.batch_stats) {
    double p, q, r;
    batch_norm_grad(static_cast<double>(param<A>(rb.scale, c, A(1))), static_cast<double>(param<A>(rb.mean, c, A(0))),
                    static_cast<double>(param<A>(rb.var, c, A(0))), rb.eps, rb.count, s1, s2, &d_scale, &p, &q, &r);
    rb.coef[c * 3] = p;
    rb.coef[c * 3 + 1] = q;
    rb.coef[c * 3 + 2] = r;
  }
  a.sums[row * 2] = s1;
  a.sums[row * 2 + 1] = d_scale;
}

// ---------------------------------------------------------------------------------------------------
// Backward 2 (batch statistics only): dconv = p * dconv + q * pre + r, per channel.
// ---------------------------------------------------------------------------------------------------
template <typename S>
__global__ void __launch_bounds__(kThreads, 1) norm_grad_kernel(const __grid_constant__ NormGradArgs a) {
  const int64_t blk = blockIdx.x;
  const int b = range_of(blk, a.num_branches, [&](int q) { return a.br[q].block_begin; });
  const NormGradBranch& nb = a.br[b];
  const int64_t total = a.N * nb.channels * nb.h * nb.w;
  const S* pre = cptr<S>(nb.pre);
  S* dconv = mptr<S>(nb.dconv);
  for (int64_t e = (blk - nb.block_begin) * kThreads + threadIdx.x; e < total; e += nb.blocks * kThreads) {
    int64_t n, c, i, j;
    unflatten(e, nb.channels, nb.h, nb.w, a.channels_last, &n, &c, &i, &j);
    const int64_t od = off4<S>(nb.dconv, n, c, i, j);
    const double d = static_cast<double>(to_acc(dconv[od]));
    const double pv = static_cast<double>(to_acc(pre[off4<S>(nb.pre, n, c, i, j)]));
    const double* k = nb.coef + c * 3;
    dconv[od] = from_acc<S>(static_cast<acc_t<S>>(k[0] * d + k[1] * pv + k[2]));
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward 3: dx, written once (per group of kMaxBranches branches): x's slice of grad plus every branch's
// down-resize adjoint, a gather per element (branches in order).
// Which level rows read x's row i (and columns, column j) is a pair of binary searches over the resize's tap
// spans, and their weights are the taps' float math: per element that was most of the kernel's time. Each
// block therefore tabulates once, per branch, the reader range of every x row and column and the taps of
// every level row and column (DxTap) in shared memory (when they fit: dx_tables_bytes), and then walks
// elements in a grid-stride loop (the grid capped at kDxBlocksPerSM blocks per multiprocessor, so that the
// tables serve many elements), in memory order (coalesced), the element's indices advanced by carries
// (MemoryOrderCursor) instead of divided out. Without the tables every element searches its readers.
// ---------------------------------------------------------------------------------------------------
// A level row's (column's) taps as the adjoint reads them for x index i: weight l0 if i0 == i or i0 < 0 (any
// i of its reader range: pooling, nearest, identity), then weight l1 if i1 == i (linear; both when i0 == i1
// at the last row), in for_each_weight_of's order and arithmetic.
template <typename A>
struct DxTap {
  int i0, i1;
  A l0, l1;
};

template <typename A>
__device__ __forceinline__ DxTap<A> dx_tap(ResizeKind kind, int64_t o, int64_t in, int64_t out, int64_t factor,
                                           bool ac) {
  DxTap<A> t{-1, -1, A(1), A(0)};
  if (kind == ResizeKind::AvgFactor || kind == ResizeKind::Adaptive) {
    t.l0 = A(1) / static_cast<A>(pooling_run(kind, o, in, out, factor).count);
  } else if (kind == ResizeKind::Linear) {
    int64_t i0, i1;
    linear_taps<A>(o, in, linear_scale<A>(in, out, ac), ac, &i0, &i1, &t.l0, &t.l1);
    t.i0 = static_cast<int>(i0);
    t.i1 = static_cast<int>(i1);
  }
  return t;
}

// Element offset of (n, c, i, j) in v, in I (int where launch_dx checked that every offset fits).
template <typename I>
__device__ __forceinline__ I dx_offset(const View4& v, I n, I c, I i, I j) {
  return n * static_cast<I>(v.stride[0]) + c * static_cast<I>(v.stride[1]) + i * static_cast<I>(v.stride[2]) +
         j * static_cast<I>(v.stride[3]);
}

// A branch's adjoint at x's (n, c, i, j), added to val, from the block's tables: rows, cols the reader
// ranges of x's row i and column j; th, tw the taps of the level rows and columns; z the branch's dz at (n, c).
template <typename S, typename A, typename I>
__device__ __forceinline__ A dx_branch_tabulated(const S* __restrict__ z, I row_stride, I col_stride, int2 rows,
                                                  int2 cols, const DxTap<A>* th, const DxTap<A>* tw, int i, int j,
                                                  A val) {
  // As the CPU kernel: the width adjoint per level row, then the height adjoint row by row. (Mostly one or
  // two level rows and columns: not unrolled.)
  const S* __restrict__ zr = z + static_cast<I>(rows.x) * row_stride;
#pragma unroll 1
  for (int oh = rows.x; oh < rows.y; ++oh, zr += row_stride) {
    const DxTap<A> ty = th[oh];
    A row = A(0);
    const S* __restrict__ zc = zr + static_cast<I>(cols.x) * col_stride;
#pragma unroll 1
    for (int ow = cols.x; ow < cols.y; ++ow, zc += col_stride) {
      const DxTap<A> tx = tw[ow];
      const A v = to_acc(*zc);
      if (tx.i0 < 0 || tx.i0 == j) row += tx.l0 * v;
      if (tx.i1 == j) row += tx.l1 * v;
    }
    if (ty.i0 < 0 || ty.i0 == i) val += ty.l0 * row;
    if (ty.i1 == i) val += ty.l1 * row;
  }
  return val;
}

__device__ __forceinline__ bool dx_identity(const DxBranch& db) {
  return db.down_h == static_cast<int>(ResizeKind::Identity) && db.down_w == static_cast<int>(ResizeKind::Identity);
}

// A block's grid-stride walk with the tables: kDxUnroll elements per thread at a time (their grad and dx
// loads in flight together; every branch's parameters read once for them), indices in I.
template <typename S, bool CL, typename I>
__device__ __forceinline__ void dx_walk(const DxArgs& a, const int2* readers, const DxTap<acc_t<S>>* taps, I first,
                                        I step) {
  using A = acc_t<S>;
  constexpr int U = kDxUnroll;
  const I total = static_cast<I>(a.N * a.C * a.H * a.W);
  const int H = static_cast<int>(a.H), per = static_cast<int>(a.H + a.W);
  const S* __restrict__ grad = cptr<S>(a.grad);
  S* dx = mptr<S>(a.dx);
  MemoryOrderCursor<CL, I> at(first, step, static_cast<int>(a.C), static_cast<int>(a.H), static_cast<int>(a.W));
  for (I e = first; e < total; e += U * step) {
    I n[U], ox[U];
    int c[U], i[U], j[U];
    bool ok[U];
    A val[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      ok[u] = e + u * step < total;
      n[u] = at.n();
      c[u] = at.c();
      i[u] = at.i();
      j[u] = at.j();
      at.advance();
      ox[u] = ok[u] ? dx_offset<I>(a.dx, n[u], c[u], i[u], j[u]) : I(0);
      val[u] = A(0);
      if (ok[u] && a.accumulate) val[u] = to_acc(dx[ox[u]]);
      if (ok[u] && a.x_offset >= 0)
        val[u] += to_acc(grad[dx_offset<I>(a.grad, n[u], static_cast<I>(a.x_offset + c[u]), i[u], j[u])]);
    }
    for (int b = 0; b < a.num_branches; ++b) {
      const DxBranch& db = a.br[b];
      const S* __restrict__ dz = cptr<S>(db.dz);
      if (dx_identity(db)) {
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (ok[u]) val[u] += to_acc(dz[dx_offset<I>(db.dz, n[u], c[u], i[u], j[u])]);
        continue;
      }
      const int2* rd = readers + b * per;
      const DxTap<A>* th = taps + db.weight_base;
      const DxTap<A>* tw = th + db.level_h;
      const I s0 = static_cast<I>(db.dz.stride[0]), s1 = static_cast<I>(db.dz.stride[1]);
      const I s2 = static_cast<I>(db.dz.stride[2]), s3 = static_cast<I>(db.dz.stride[3]);
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (ok[u])
          val[u] = dx_branch_tabulated<S, A, I>(dz + (n[u] * s0 + c[u] * s1), s2, s3, rd[i[u]], rd[H + j[u]],
                                                th, tw, i[u], j[u], val[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (ok[u]) dx[ox[u]] = from_acc<S>(val[u]);
  }
}

// The same without tables: the readers searched and the weights computed per element.
template <typename S, typename A>
__device__ __forceinline__ A dx_branch_direct(const DxBranch& db, const DxArgs& a, int64_t n, int64_t c, int64_t i,
                                               int64_t j, A val) {
  const S* dz = cptr<S>(db.dz);
  const bool ac = a.align_corners;
  const ResizeKind kh = static_cast<ResizeKind>(db.down_h), kw = static_cast<ResizeKind>(db.down_w);
  const A sh = linear_scale<A>(a.H, db.level_h, ac), sw = linear_scale<A>(a.W, db.level_w, ac);
  int64_t O0, O1, P0, P1;
  readers_of<A>(kh, i, a.H, db.level_h, db.factor, ac, sh, &O0, &O1);
  readers_of<A>(kw, j, a.W, db.level_w, db.factor, ac, sw, &P0, &P1);
  for (int64_t oh = O0; oh < O1; ++oh) {
    auto add_row = [&](A wh) {
      A row = A(0);
      for (int64_t ow = P0; ow < P1; ++ow) {
        const A v = to_acc(dz[off4<S>(db.dz, n, c, oh, ow)]);
        for_each_weight_of<A>(kw, ow, j, a.W, db.level_w, db.factor, ac, sw, [&](A ww) { row += ww * v; });
      }
      val += wh * row;
    };
    for_each_weight_of<A>(kh, oh, i, a.H, db.level_h, db.factor, ac, sh, add_row);
  }
  return val;
}

// val + w * row in one rounding on the GPU: the contraction the gather's `val += w * row` compiles to (here
// the compiler would otherwise share one add between a term's two kinds).
template <typename A>
__device__ __forceinline__ A dx_fma(A w, A row, A val) {
#ifdef __CUDA_ARCH__
  return fma(w, row, val);
#else
  return val + w * row;
#endif
}

// NCHW in row tiles (a.tile_rows > 0): a unit is one (n, c) plane's rows [i_lo, i_lo + tile_rows), units
// dealt to the blocks in turn. The adjoint is separable: per unit, every branch's width adjoint of each level
// row the tile reads, at every x column (its `row` sum in dx_branch_tabulated, the same arithmetic), goes to
// shared memory once, and each tile row's list of terms (which sums, times which height tap); then each
// element adds its row's terms (a few instructions per term, instead of the whole gather per element).
// In-plane offsets fit int (launch_dx).
template <typename S, typename A>
__device__ __forceinline__ void dx_row_tiles(const DxArgs& a, const int2* readers, const DxTap<A>* taps,
                                             unsigned char* smem) {
  const int H = static_cast<int>(a.H), W = static_cast<int>(a.W), per = H + W, TH = static_cast<int>(a.tile_rows);
  const int K = static_cast<int>(a.row_terms);
  A* sums = reinterpret_cast<A*>(smem + a.sums_at);
  A* term_w = reinterpret_cast<A*>(smem + a.terms_at);
  int* term_off = reinterpret_cast<int*>(term_w + TH * K);
  int* term_n = term_off + TH * K;
  const int64_t tiles = (a.H + TH - 1) / TH, units = a.N * a.C * tiles;
  const S* __restrict__ grad = cptr<S>(a.grad);
  S* dx = mptr<S>(a.dx);
  const int t = threadIdx.x;
  for (int64_t unit = blockIdx.x; unit < units; unit += a.blocks) {
    const int64_t plane = unit / tiles, n = plane / a.C, c = plane % a.C;
    const int i_lo = static_cast<int>(unit % tiles) * TH, i_hi = i_lo + TH < H ? i_lo + TH : H;
    __syncthreads();  // the previous unit's sums are read
    for (int b = 0; b < a.num_branches; ++b) {
      const DxBranch& db = a.br[b];
      if (dx_identity(db)) continue;
      const int2* rd = readers + b * per;
      const int oh_lo = rd[i_lo].x, oh_hi = rd[i_hi - 1].y > oh_lo ? rd[i_hi - 1].y : oh_lo;
      const DxTap<A>* tw = taps + db.weight_base + db.level_h;
      const S* __restrict__ z = cptr<S>(db.dz) + n * db.dz.stride[0] + c * db.dz.stride[1];
      const int s2 = static_cast<int>(db.dz.stride[2]), s3 = static_cast<int>(db.dz.stride[3]);
      A* rs = sums + db.sum_base;
      for (int q = t; q < (oh_hi - oh_lo) * W; q += kThreads) {
        const int r = q / W, j = q - r * W;
        const int2 cols = rd[H + j];
        const S* __restrict__ zr = z + (oh_lo + r) * s2;
        A row = A(0);
#pragma unroll 1
        for (int ow = cols.x; ow < cols.y; ++ow) {
          const DxTap<A> tx = tw[ow];
          const A v = to_acc(zr[ow * s3]);
          if (tx.i0 < 0 || tx.i0 == j) row += tx.l0 * v;
          if (tx.i1 == j) row += tx.l1 * v;
        }
        rs[q] = row;
      }
    }
    // Each tile row's terms, in the order the element adds them: per branch its level rows' sums (offset
    // into sums) times their height taps, or (offset < 0) an identity branch's dz itself.
    for (int r = t; r < i_hi - i_lo; r += kThreads) {
      const int i = i_lo + r;
      int count = 0;
      int* to = term_off + r * K;
      A* tw = term_w + r * K;
      for (int b = 0; b < a.num_branches; ++b) {
        const DxBranch& db = a.br[b];
        if (dx_identity(db)) {
          to[count] = -1 - b;
          tw[count++] = A(1);
          continue;
        }
        const int2* rd = readers + b * per;
        const int2 rows = rd[i];
        const DxTap<A>* th = taps + db.weight_base;
        for (int oh = rows.x; oh < rows.y; ++oh) {
          const DxTap<A> ty = th[oh];
          const int off = static_cast<int>(db.sum_base) + (oh - rd[i_lo].x) * W;
          if (ty.i0 < 0 || ty.i0 == i) {
            to[count] = off;
            tw[count++] = ty.l0;
          }
          if (ty.i1 == i) {
            to[count] = off;
            tw[count++] = ty.l1;
          }
        }
      }
      term_n[r] = count;
    }
    __syncthreads();
    const int64_t dx_base = n * a.dx.stride[0] + c * a.dx.stride[1];
    const int64_t grad_base = n * a.grad.stride[0] + (a.x_offset + c) * a.grad.stride[1];
    const int dx2 = static_cast<int>(a.dx.stride[2]), dx3 = static_cast<int>(a.dx.stride[3]);
    const int g2 = static_cast<int>(a.grad.stride[2]), g3 = static_cast<int>(a.grad.stride[3]);
    // This thread's elements p = t, t + kThreads, ... of the tile, kDxUnroll at a time (their grad and dx
    // loads in flight together): (i, j) advanced by carries.
    constexpr int U = kDxUnroll;
    const int di = kThreads / W, dj = kThreads % W, count = (i_hi - i_lo) * W;
    int i = i_lo + t / W, j = t % W;
    for (int p = t; p < count; p += U * kThreads) {
      int ii[U], jj[U];
      bool ok[U];
      S* o[U];
      A val[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        ok[u] = p + u * kThreads < count;
        ii[u] = i;
        jj[u] = j;
        o[u] = ok[u] ? dx + dx_base + (i * dx2 + j * dx3) : dx;
        val[u] = A(0);
        if (ok[u] && a.accumulate) val[u] = to_acc(*o[u]);
        if (ok[u] && a.x_offset >= 0) val[u] += to_acc(grad[grad_base + (i * g2 + j * g3)]);
        i += di;
        j += dj;
        if (j >= W) {
          j -= W;
          ++i;
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (!ok[u]) continue;
        const int r = ii[u] - i_lo, nt = term_n[r];
        const int* to = term_off + r * K;
        const A* tw = term_w + r * K;
#pragma unroll 1
        for (int k = 0; k < nt; ++k) {
          const int off = to[k];
          if (off >= 0) {
            val[u] = dx_fma(tw[k], sums[off + jj[u]], val[u]);
          } else {
            const DxBranch& db = a.br[-1 - off];
            const S* __restrict__ z = cptr<S>(db.dz) + n * db.dz.stride[0] + c * db.dz.stride[1];
            val[u] += to_acc(
                z[ii[u] * static_cast<int>(db.dz.stride[2]) + jj[u] * static_cast<int>(db.dz.stride[3])]);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (ok[u]) *o[u] = from_acc<S>(val[u]);
    }
  }
}

// I: int where launch_dx checked that every index and offset fits (with the tables only), else int64_t.
template <typename S, bool CL, typename I>
__global__ void __launch_bounds__(kThreads, 1) dx_kernel(const __grid_constant__ DxArgs a) {
  using A = acc_t<S>;
  MSFUSED_DYNAMIC_SHARED(smem_raw);
  const I first = static_cast<I>(blockIdx.x) * kThreads + static_cast<I>(threadIdx.x);
  const I step = static_cast<I>(a.blocks * kThreads);
  // x's element (n, c, i, j): its grad slice and the earlier groups' sum (accumulate) into val.
  if (!a.tables) {
    if constexpr (sizeof(I) == sizeof(int)) return;  // launch_dx: never without the tables
    const int64_t total = a.N * a.C * a.H * a.W;
    const S* grad = cptr<S>(a.grad);
    S* dx = mptr<S>(a.dx);
    for (int64_t e = first; e < total; e += step) {
      int64_t n, c, i, j;
      unflatten(e, a.C, a.H, a.W, CL, &n, &c, &i, &j);
      const int64_t ox = off4<S>(a.dx, n, c, i, j);
      A val = a.accumulate ? to_acc(dx[ox]) : A(0);
      if (a.x_offset >= 0) val += to_acc(grad[off4<S>(a.grad, n, a.x_offset + c, i, j)]);
      for (int b = 0; b < a.num_branches; ++b) {
        const DxBranch& db = a.br[b];
        if (dx_identity(db))
          val += to_acc(cptr<S>(db.dz)[off4<S>(db.dz, n, c, i, j)]);
        else
          val = dx_branch_direct<S>(db, a, n, c, i, j, val);
      }
      dx[ox] = from_acc<S>(val);
    }
    return;
  }
  // Tables, per branch b: readers[b * (H + W) + r] (rows r < H, then columns), then the taps of every level
  // row and column of every branch at its weight_base (after the int2 tables).
  int2* readers = reinterpret_cast<int2*>(smem_raw);
  DxTap<A>* taps = reinterpret_cast<DxTap<A>*>(readers + a.num_branches * (a.H + a.W));
  const bool ac = a.align_corners;
  const int per = static_cast<int>(a.H + a.W);
  for (int idx = threadIdx.x; idx < a.num_branches * per; idx += kThreads) {
    const DxBranch& db = a.br[idx / per];
    const int r = idx % per;
    const bool row = r < a.H;
    const ResizeKind kind = static_cast<ResizeKind>(row ? db.down_h : db.down_w);
    const int64_t in = row ? a.H : a.W, out = row ? db.level_h : db.level_w, pos = row ? r : r - a.H;
    int64_t o0 = pos, o1 = pos + 1;  // Identity: itself
    if (kind != ResizeKind::Identity)
      readers_of<A>(kind, pos, in, out, db.factor, ac, linear_scale<A>(in, out, ac), &o0, &o1);
    readers[idx] = make_int2(static_cast<int>(o0), static_cast<int>(o1));
  }
  for (int b = 0; b < a.num_branches; ++b) {
    const DxBranch& db = a.br[b];
    for (int64_t q = threadIdx.x; q < db.level_h + db.level_w; q += kThreads) {
      const bool row = q < db.level_h;
      taps[db.weight_base + q] = dx_tap<A>(static_cast<ResizeKind>(row ? db.down_h : db.down_w),
                                           row ? q : q - db.level_h, row ? a.H : a.W,
                                           row ? db.level_h : db.level_w, db.factor, ac);
    }
  }
  __syncthreads();
  if (!CL && a.tile_rows > 0)
    dx_row_tiles<S, A>(a, readers, taps, smem_raw);
  else
    dx_walk<S, CL, I>(a, readers, taps, first, step);
}

// ---------------------------------------------------------------------------------------------------
// The projection, forward: its pre-activation (and, without batch statistics, its output) from the x
// part, the bias, the direct parts and every per-tap branch's maps resized up and shifted; one thread per
// output element, which reads its few taps of the small maps (L2-resident) and writes once.
// ---------------------------------------------------------------------------------------------------
// A tile of outputs per block, as epilogue_up's: NCHW rows x columns of one (n, p) plane, channels_last
// columns of one row with every p. Each per-tap branch's taps for the tile's shifted rows and columns
// (rows I0 - k/2 .. I0 + rows + k/2, the same for columns; i0 = -1 outside the map) are tabulated once per
// block, so an output's k*k shifted samples per branch are table reads, loads and sums.
template <typename S>
__global__ void __launch_bounds__(kThreads, 3) project_accumulate_kernel(const __grid_constant__ ProjectAccArgs a) {
  using A = acc_t<S>;
  MSFUSED_DYNAMIC_SHARED(smem_raw);
  UpTap<A>* tables = reinterpret_cast<UpTap<A>*>(smem_raw);
  const int t = threadIdx.x;
  const bool cl = a.channels_last, ac = a.align_corners;
  const int k = static_cast<int>(a.k), rh = k / 2;
  const TileAt at = tile_at(a.tiles, blockIdx.x, cl ? 1 : a.P, a.H, a.W);
  const int64_t n = at.n, p0 = at.c, I0 = at.I0, J0 = at.J0;
  const int rows = at.rows, cols = at.cols;
  // Branch b's tables: its rows' taps at b * per (source row I0 - rh + q), then its columns' at + trows.
  const int trows = static_cast<int>(a.tiles.rows) + 2 * rh, per = trows + static_cast<int>(a.tiles.cols) + 2 * rh;
  // The taps of the output row (column) `src` of branch b, or i0 = -1 where src lies outside the map.
  auto tap_of = [&](int b, bool row, int64_t src) {
    const ProjectTapBranch& tb = a.tap[b];
    const int64_t size = row ? a.H : a.W, level = row ? tb.h : tb.w;
    UpTap<A> tap{-1, -1, A(0), A(0)};
    if (src >= 0 && src < size)
      tap = up_tap<A>(static_cast<ResizeKind>(row ? tb.up_h : tb.up_w), src, level, size, ac,
                      linear_scale<A>(level, size, ac));
    return tap;
  };
  if (a.tables) {
    for (int q = t; q < a.num_taps * per; q += kThreads) {
      const int b = q / per, e = q % per;
      tables[q] = e < trows ? tap_of(b, true, I0 - rh + e) : tap_of(b, false, J0 - rh + (e - trows));
    }
    __syncthreads();
  }
  // The output at tile row r (cl: 0), tile column j, channel p.
  auto element = [&](int r, int j, int64_t p) {
    const int64_t I = I0 + r, J = J0 + j;
    A val = a.carry.data != nullptr ? cptr<A>(a.carry)[off4<A>(a.carry, n, p, I, J)]
            : a.acc.data != nullptr ? to_acc(cptr<S>(a.acc)[off4<S>(a.acc, n, p, I, J)])
                                    : A(0);
    val += param<A>(a.bias, p, A(0));
    for (int d = 0; d < a.num_direct; ++d) val += to_acc(cptr<S>(a.direct[d])[off4<S>(a.direct[d], n, p, I, J)]);
    for (int b = 0; b < a.num_taps; ++b) {
      const ProjectTapBranch& tb = a.tap[b];
      const bool two_h = static_cast<ResizeKind>(tb.up_h) == ResizeKind::Linear;
      const bool two_w = static_cast<ResizeKind>(tb.up_w) == ResizeKind::Linear;
      const A* tm = cptr<A>(tb.tmap) + n * tb.tmap.stride[0];  // opmath (tap_maps_dtype)
      const UpTap<A>* rows_b = tables + b * per;
      const UpTap<A>* cols_b = rows_b + trows;
      for (int ky = 0; ky < k; ++ky) {
        const UpTap<A> th = a.tables ? rows_b[r + ky] : tap_of(b, true, I + ky - rh);
        if (th.i0 < 0) continue;
        for (int kx = 0; kx < k; ++kx) {
          const UpTap<A> tw = a.tables ? cols_b[j + kx] : tap_of(b, false, J + kx - rh);
          if (tw.i0 < 0) continue;
          const A* plane = tm + ((ky * k + kx) * a.P + p) * tb.tmap.stride[1];
          up_accumulate(val, th, two_h, tw, two_w,
                        [&](int i, int jj) { return plane[i * tb.tmap.stride[2] + jj * tb.tmap.stride[3]]; });
        }
      }
    }
    if (a.partial.data != nullptr) {  // a launch before the last: its sum, unrounded
      mptr<A>(a.partial)[off4<A>(a.partial, n, p, I, J)] = val;
      return;
    }
    const S pre = from_acc<S>(val);  // the pre-activation as a tensor of S holds it
    if (a.pre.data != nullptr) mptr<S>(a.pre)[off4<S>(a.pre, n, p, I, J)] = pre;
    if (a.out.data != nullptr) {
      const A alpha = param<A>(a.alpha, p, A(1)), beta = param<A>(a.beta, p, A(0));
      mptr<S>(a.out)[off4<S>(a.out, n, p, I, J)] =
          from_acc<S>(activate<A>(static_cast<Activation>(a.activation), alpha * to_acc(pre) + beta));
    }
  };
  // The tile's outputs in memory order (NCHW: (row, column) of plane p0; channels_last: (column, p)), by
  // carries (MemoryOrderCursor).
  auto walk = [&](auto at, int count) {
    for (int e = t; e < count; e += kThreads, at.advance()) element(at.i(), at.j(), p0 + at.c());
  };
  if (cl)
    walk(MemoryOrderCursor<true, int>(t, kThreads, static_cast<int>(a.P), 1, cols), static_cast<int>(a.P) * cols);
  else
    walk(MemoryOrderCursor<false, int>(t, kThreads, 1, rows, cols), rows * cols);
}

// ---------------------------------------------------------------------------------------------------
// The projection, backward: dT of every per-tap branch as a gather at its level. A block holds
// kThreads / lanes level elements; an element's reader rectangle (the output pixels whose shifted
// up-resize reads it) is split over its lanes, whose parts add in a fixed tree.
// ---------------------------------------------------------------------------------------------------
template <typename S>
__global__ void __launch_bounds__(kThreads, 1) project_adjoint_kernel(const __grid_constant__ ProjectAdjointArgs a) {
  using A = acc_t<S>;
  __shared__ A s_acc[kThreads];
  const int64_t blk = blockIdx.x;
  const int b = range_of(blk, a.num_branches, [&](int q) { return a.br[q].block_begin; });
  const ProjectAdjointBranch& br = a.br[b];
  const int64_t h = br.h, w = br.w, KP = a.k * a.k * a.P, r = a.k / 2;
  const int t = threadIdx.x, G = static_cast<int>(br.lanes), lane = t % G;
  const int64_t e = (blk - br.block_begin) * (kThreads / G) + t / G;
  const bool valid = e < a.N * KP * h * w;  // (uniform control flow below: the lane tree has barriers)
  int64_t n = 0, ch = 0, i = 0, j = 0;
  if (valid) unflatten(e, KP, h, w, a.channels_last, &n, &ch, &i, &j);
  const int64_t tap = ch / a.P, p = ch % a.P, dy = tap / a.k - r, dx = tap % a.k - r;
  const bool ac = a.align_corners;
  const ResizeKind kh = static_cast<ResizeKind>(br.up_h), kw = static_cast<ResizeKind>(br.up_w);
  const A sh = linear_scale<A>(h, a.H, ac), sw = linear_scale<A>(w, a.W, ac);
  const S* dpre = cptr<S>(a.dpre);
  // The block's tables (as up_grad's: every level row's and column's readers and weights), where they fit.
  MSFUSED_DYNAMIC_SHARED(smem_raw);
  const bool tables = br.table_h > 0;
  const AdjointTables<A> tb =
      build_adjoint_tables<A>(smem_raw, tables, kh, kw, h, w, a.H, a.W, ac, br.table_h, br.table_w);
  int2* ranges = tb.ranges;
  A* row_weights = tb.row_weights;
  A* col_weights = tb.col_weights;
  A part = A(0);
  if (valid) {
    // The rows and columns of the resized map that read (i, j), kept where the shift lands inside.
    int64_t R0, R1, C0, C1;
    if (tables) {
      R0 = ranges[i].x, R1 = ranges[i].y, C0 = ranges[h + j].x, C1 = ranges[h + j].y;
    } else {
      readers_of<A>(kh, i, h, a.H, 1, ac, sh, &R0, &R1);
      readers_of<A>(kw, j, w, a.W, 1, ac, sw, &C0, &C1);
    }
    const int64_t first_row = R0, first_col = C0;
    clip_to_shift(dy, a.H, &R0, &R1);
    clip_to_shift(dx, a.W, &C0, &C1);
    if (tables) {  // int indices and in-plane offsets (adjoint_tables checked that they fit)
      const A* wr = row_weights + i * br.table_h;
      const A* wc = col_weights + j * br.table_w;
      const int fr = static_cast<int>(first_row), fc = static_cast<int>(first_col);
      const S* __restrict__ plane = dpre + (n * a.dpre.stride[0] + p * a.dpre.stride[1]);
      const int s2 = static_cast<int>(a.dpre.stride[2]), s3 = static_cast<int>(a.dpre.stride[3]);
      const int sy = static_cast<int>(dy), sx = static_cast<int>(dx);
      part = lane_rectangle_sum<A>(lane, G, static_cast<int>(R0), static_cast<int>(R1), static_cast<int>(C0),
                                   static_cast<int>(C1), [&](int R, int Cc) {
                                     return wr[R - fr] * wc[Cc - fc] * to_acc(plane[(R - sy) * s2 + (Cc - sx) * s3]);
                                   });
    } else {
      part = lane_rectangle_sum<A>(lane, G, R0, R1, C0, C1, [&](int64_t R, int64_t Cc) {
        return weight_of<A>(kh, R, i, h, a.H, ac, sh) * weight_of<A>(kw, Cc, j, w, a.W, ac, sw) *
               to_acc(dpre[off4<S>(a.dpre, n, p, R - dy, Cc - dx)]);
      });
    }
  }
  if (G > 1) part = lane_tree_sum(part, s_acc, t, lane, G);
  if (valid && lane == 0) mptr<A>(br.dt)[off4<S>(br.dt, n, ch, i, j)] = part;  // opmath (tap_maps_dtype)
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

size_t elem_size(DType dtype) { return dtype == DType::Double ? 8 : dtype == DType::Float ? 4 : 2; }

thread_local LaunchRecorder* recorder_ = nullptr;

// Each kernel's cost model for the record-only mode (defined with the launchers, below): its launch's
// groups of alike blocks, from the arguments its launcher filled; S: the dtype's size, A: opmath's.
using Parts = std::vector<PlannedPart>;
int64_t min64(int64_t a, int64_t b);
int64_t max64(int64_t a, int64_t b);
Parts kernel_cost(const PoolArgs& a, int64_t blocks, size_t S, size_t A);
Parts kernel_cost(const LevelArgs& a, int64_t blocks, size_t S, size_t A);
Parts kernel_cost(const StatsArgs& a, int64_t blocks, size_t S, size_t A);
Parts kernel_cost(const MergeStatsArgs& a, int64_t blocks, size_t S, size_t A);
Parts kernel_cost(const EpilogueArgs& a, int64_t blocks, size_t S, size_t A);
Parts kernel_cost(const UpGradArgs& a, int64_t blocks, size_t S, size_t A);
Parts kernel_cost(const ReduceArgs& a, int64_t blocks, size_t S, size_t A);
Parts kernel_cost(const NormGradArgs& a, int64_t blocks, size_t S, size_t A);
Parts kernel_cost(const DxArgs& a, int64_t blocks, size_t S, size_t A);
Parts kernel_cost(const ProjectAccArgs& a, int64_t blocks, size_t S, size_t A);
Parts kernel_cost(const ProjectAdjointArgs& a, int64_t blocks, size_t S, size_t A);

// Launches kernel_of(S{}) (a kernel template's instantiation for the dtype) over `blocks` blocks; with a
// launch recorder installed, records it (its cost model: kernel_cost) instead.
template <typename Args, typename KernelOf>
cudaError_t launch(DType dtype, const char* name, int64_t blocks, size_t shared_bytes, const Args& args,
                   cudaStream_t stream, KernelOf kernel_of) {
  if (blocks == 0) return cudaSuccess;
  if (blocks > kMaxGrid) return cudaErrorInvalidConfiguration;
  if (recorder_ != nullptr) {
    PlannedLaunch l;
    l.kernel = name;
    l.grid = blocks;
    l.threads = kThreads;
    l.shared_bytes = shared_bytes;
    l.parts = kernel_cost(args, blocks, elem_size(dtype), acc_size(dtype));
    recorder_->launches.push_back(std::move(l));
    return cudaSuccess;
  }
  return dispatch(dtype, [&](auto s) {
    void (*kernel)(Args) = kernel_of(s);
    return MSFUSED_LAUNCH(kernel, blocks, shared_bytes, stream, args);
  });
}

// Checks the branch count (and the chunk table's width) a launch was given.
template <typename Args>
bool valid_group(const Args& args, int64_t max_chunks = kMaxChunks) {
  return args.num_branches >= 1 && args.num_branches <= kMaxBranches && max_chunks == kMaxChunks;
}

// The channels of every branch of a group (the per-channel launches: one thread each).
template <typename Args>
int64_t group_channels(const Args& args) {
  int64_t channels = 0;
  for (int b = 0; b < args.num_branches; ++b) channels += args.br[b].channels;
  return channels;
}

// The current device's multiprocessor count, asked once per device.
int64_t multiprocessors() {
  if (recorder_ != nullptr) return recorder_->multiprocessors;
#ifdef MSFUSED_CUDA_EMULATION
  return 2;
#else
  constexpr int kDevices = 64;
  static std::atomic<int> cached[kDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  if (device >= 0 && device < kDevices && cached[device].load() > 0) return cached[device].load();
  int count = 1;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count < 1) count = 1;
  if (device >= 0 && device < kDevices) cached[device].store(count);
  return count;
#endif
}

// Threads per level element of launch_levels: pooling windows (both axes pooling or identity) of more than
// 16 taps are split over a power of two of lanes (about 16 taps each), more while the launch would not
// fill the device (2 blocks per multiprocessor), up to a block; anything else: one thread.
// Taps of x one level element of a pooling down-resize reads along an axis, at most (-1: not pooling).
int64_t pooling_taps(int kind, int64_t level, int64_t full, int64_t factor) {
  switch (static_cast<ResizeKind>(kind)) {
    case ResizeKind::Identity: return 1;
    case ResizeKind::AvgFactor: return factor;
    case ResizeKind::Adaptive: return (full + level - 1) / level + 1;
    default: return -1;  // not a pooling kind
  }
}

// Taps of x one level element of any down-resize reads along an axis, at most.
int64_t down_taps(int kind, int64_t level, int64_t full, int64_t factor) {
  const int64_t pooled = pooling_taps(kind, level, full, factor);
  if (pooled >= 0) return pooled;
  return static_cast<ResizeKind>(kind) == ResizeKind::Linear ? kMaxPointTaps : 1;
}

// Outputs of a resize from `in` to `out` values that read one input along an axis, at most (the readers an
// adjoint gathers).
int64_t resize_readers(int kind, int64_t in, int64_t out) {
  return static_cast<ResizeKind>(kind) == ResizeKind::Identity ? 1 : (out + in - 1) / in + 2;
}

int64_t level_lanes(const LevelBranch& br, int64_t planes, int64_t H, int64_t W) {
  const int64_t th = pooling_taps(br.down_h, br.level_h, H, br.factor);
  const int64_t tw = pooling_taps(br.down_w, br.level_w, W, br.factor);
  if (th < 0 || tw < 0) return 1;
  const int64_t entries = th * tw, elems = planes * br.level_h * br.level_w;
  int64_t lanes = 1;
  while (lanes < kThreads && lanes * 16 < entries) lanes *= 2;
  while (lanes < kThreads && lanes < entries && elems * lanes < 2 * multiprocessors() * kThreads) lanes *= 2;
  return lanes;
}

// Threads that read each level pixel's upsample adjoint (up_grad, and the projection's per-tap adjoint):
// about 32 reader entries per thread, a power of two up to the block (bin 1 on a 64x64 map: 4356
// entries, 256 lanes).
int64_t adjoint_lanes(int up_h, int64_t h, int up_w, int64_t w, int64_t H, int64_t W) {
  const int64_t entries = resize_readers(up_h, h, H) * resize_readers(up_w, w, W);
  int64_t lanes = 1;
  while (lanes < kThreads && lanes * 32 < entries) lanes *= 2;
  return lanes;
}

}  // namespace

int64_t max_reduction_chunks() { return kMaxChunks; }

int64_t reduction_chunks(int64_t channels, int64_t elems) {
  const int64_t want = ceil_div(4 * multiprocessors(), channels < 1 ? 1 : channels);  // >= 4 blocks per SM
  // The record-only mode plans the GPU build's chunks (the emulation build's are small for its tests).
  const int64_t min_elems = recorder_ != nullptr ? kGpuMinChunkElems : kMinChunkElems;
  int64_t chunks = want < ceil_div(elems, min_elems) ? want : ceil_div(elems, min_elems);
  chunks = chunks < kMaxChunks ? chunks : kMaxChunks;
  return chunks < 1 ? 1 : chunks;
}

namespace {

// The multiply-high divider of d (1 <= d < 2^31; exact for dividends below 2^31: IntDivider's method).
LevelDivisor level_divisor(int64_t d) {
  LevelDivisor r;
  r.d = static_cast<uint32_t>(d);
  while ((int64_t{1} << r.shift) < d) ++r.shift;
  r.magic = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << r.shift) - r.d)) / r.d + 1);
  return r;
}

// Whether a tensor of these sizes has these strides where they matter (sizes above 1).
bool dense_strides(const int64_t* sizes, const int64_t* strides, const int64_t* want, int dims) {
  for (int d = 0; d < dims; ++d)
    if (sizes[d] > 1 && strides[d] != want[d]) return false;
  return true;
}

// copy_flat (LevelArgs): x dense in its memory order, and out's x slice runs of x's order at a fixed stride;
// copy_vec: elements of `elem` bytes per 16-byte chunk where runs, stride and both starts are 16-byte aligned.
void plan_flat_copy(LevelArgs* a, size_t elem) {
  const int64_t N = a->N, C = a->C, H = a->H, W = a->W, total = N * C * H * W;
  const int64_t* os = a->out.stride;
  const int64_t sizes[4] = {N, C, H, W};
  a->copy_flat = false;
  if (total <= 0 || total >= (int64_t{1} << 31)) return;
  if (a->x_channels_last) {
    const int64_t x_want[4] = {H * W * C, 1, W * C, C};
    const int64_t P = W > 1 ? os[3] : H > 1 ? os[2] : os[0];  // out's pixel stride
    const int64_t o_want[4] = {H * W * P, 1, W * P, P};
    if (!dense_strides(sizes, a->x.stride, x_want, 4) || !dense_strides(sizes, os, o_want, 4)) return;
    a->copy_run = C;
    a->copy_run_stride = P;
  } else {
    const int64_t x_want[4] = {C * H * W, H * W, W, 1};
    const int64_t o_want[4] = {os[0], H * W, W, 1};
    if (!dense_strides(sizes, a->x.stride, x_want, 4) || !dense_strides(sizes + 1, os + 1, o_want + 1, 3)) return;
    a->copy_run = C * H * W;
    a->copy_run_stride = os[0];
  }
  a->div_run = level_divisor(a->copy_run);
  a->copy_flat = true;
  const int64_t vec = static_cast<int64_t>(sizeof(LevelChunk) / elem);
  const uintptr_t dst = reinterpret_cast<uintptr_t>(a->out.data) +
                        static_cast<uintptr_t>(a->x_offset * a->out.stride[1]) * static_cast<uintptr_t>(elem);
  const bool aligned =
      reinterpret_cast<uintptr_t>(a->x.data) % sizeof(LevelChunk) == 0 && dst % sizeof(LevelChunk) == 0;
  const bool runs = a->copy_run % vec == 0 && a->copy_run_stride % vec == 0;
  a->copy_vec = vec > 1 && runs && aligned ? static_cast<int>(vec) : 1;
}

}  // namespace

cudaError_t launch_levels(DType dtype, LevelArgs args, cudaStream_t stream) {
  if (args.num_branches < 0 || args.num_branches > kMaxBranches) return cudaErrorInvalidValue;
  const int64_t copy_total = args.N * args.C * args.H * args.W;
  args.copy_blocks = args.x_offset >= 0 && copy_total > 0 ? min64(ceil_div(copy_total, kThreads), kMaxCopyBlocks) : 0;
  if (args.copy_blocks > 0) plan_flat_copy(&args, elem_size(dtype));
  const int64_t fits = int64_t{1} << 31;
  if (args.C >= 1 && args.C < fits) args.div_c = level_divisor(args.C);
  int64_t blocks = 0;
  for (int b = 0; b < args.num_branches; ++b) {
    LevelBranch& br = args.br[b];
    br.lanes = level_lanes(br, args.N * args.C, args.H, args.W);
    br.block_begin = blocks;
    blocks += ceil_div(args.N * args.C * br.level_h * br.level_w * br.lanes, kThreads);
    br.fast = args.N * args.C * br.level_h * br.level_w < fits && args.C >= 1 && args.C < fits && br.level_h >= 1 &&
              br.level_w >= 1;
    if (br.fast) {
      br.div_h = level_divisor(br.level_h);
      br.div_w = level_divisor(br.level_w);
    }
  }
  return launch(dtype, "levels", blocks + args.copy_blocks, 0, args, stream,
                [](auto s) { return levels_kernel<decltype(s)>; });
}

cudaError_t launch_stats_partial(DType dtype, StatsArgs* args, cudaStream_t stream) {
  if (!valid_group(*args, args->max_chunks)) return cudaErrorInvalidValue;
  int64_t blocks = 0;
  for (int b = 0; b < args->num_branches; ++b) {
    StatsBranch& sb = args->br[b];
    sb.chunks = reduction_chunks(sb.channels, args->N * sb.h * sb.w);
    sb.block_begin = blocks;
    blocks += sb.channels * sb.chunks;
  }
  return launch(dtype, "stats_partial", args->N == 0 ? 0 : blocks, 0, *args, stream,
                [](auto s) { return stats_partial_kernel<decltype(s)>; });
}

cudaError_t launch_merge_stats(DType dtype, const MergeStatsArgs& args, cudaStream_t stream) {
  if (!valid_group(args, args.max_chunks)) return cudaErrorInvalidValue;
  return launch(dtype, "merge_stats", ceil_div(group_channels(args), kThreads), 0, args, stream,
                [](auto s) { return merge_stats_kernel<decltype(s)>; });
}

// The tiles of an (N, C, H, W) output of about tile_elems outputs each (OutputTiles); several_planes: NCHW
// planes smaller than a tile share one.
OutputTiles output_tiles(int64_t C, int64_t H, int64_t W, bool channels_last, int64_t tile_elems, bool several_planes) {
  OutputTiles ts;
  if (channels_last) {
    ts.cols = max64(1, min64(min64(W, kUpTileMaxCols), ceil_div(tile_elems, max64(C, 1))));
    ts.row_tiles = H;
  } else {
    ts.cols = max64(1, min64(W, kUpTileMaxCols));
    ts.rows = max64(1, min64(min64(H, kUpTileMaxRows), ceil_div(tile_elems, ts.cols)));
    ts.row_tiles = ceil_div(H, ts.rows);
    if (several_planes && ts.rows == H && ts.cols == W) ts.channels = max64(1, min64(C, tile_elems / max64(1, H * W)));
    ts.channel_tiles = ceil_div(C, ts.channels);
  }
  ts.col_tiles = ceil_div(W, ts.cols);
  return ts;
}

int64_t tile_count(const OutputTiles& ts, int64_t N) { return N * ts.channel_tiles * ts.row_tiles * ts.col_tiles; }

cudaError_t launch_epilogue_up(DType dtype, EpilogueArgs args, cudaStream_t stream) {
  if (!valid_group(args)) return cudaErrorInvalidValue;
  // The record-only mode plans the GPU build's tiles (the emulation build's are small for its tests).
  const int64_t tile_elems = recorder_ != nullptr ? kGpuUpTileElems : kUpTileElems;
  int64_t blocks = 0;
  for (int b = 0; b < args.num_branches; ++b) {
    EpilogueBranch& eb = args.br[b];
    // The tables and the tile's element loop index in int: levels, maps and channels below 2^30.
    if (eb.h >= (int64_t{1} << 30) || eb.w >= (int64_t{1} << 30) || args.H >= (int64_t{1} << 30) ||
        args.W >= (int64_t{1} << 30) || eb.channels >= (int64_t{1} << 30))
      return cudaErrorInvalidValue;
    eb.tiles = output_tiles(eb.channels, args.H, args.W, args.channels_last, tile_elems, true);
    eb.block_begin = blocks;
    blocks += tile_count(eb.tiles, args.N);
  }
  return launch(dtype, "epilogue_up", args.H == 0 || args.W == 0 ? 0 : blocks, 0, args, stream,
                [](auto s) { return epilogue_up_kernel<decltype(s)>; });
}

// The most readers any of the `in` rows (columns) of an up-resize to `out` has: every row's range searched,
// in opmath A as the kernel does (a few microseconds for the largest maps).
template <typename A>
static int64_t most_readers(int kind, int64_t in, int64_t out, bool ac) {
  const A scale = linear_scale<A>(in, out, ac);
  int64_t most = 0;
  for (int64_t i = 0; i < in; ++i) {
    int64_t o0, o1;
    readers_of<A>(static_cast<ResizeKind>(kind), i, in, out, 1, ac, scale, &o0, &o1);
    most = o1 - o0 > most ? o1 - o0 : most;
  }
  return most;
}

// The tables of an up-resize's adjoint (up_grad, project_adjoint) from (h, w) to (H, W): *table_h, *table_w
// readers per level row and column (0: none: an identity, or too large) and their bytes.
static bool offsets_fit_int(const View4& v, int64_t n, int64_t c, int64_t h, int64_t w);

// (The table paths index in int: the output plane's sizes, entries and offsets (`plane`: grad's) fit.)
// double_weights: the kernel's weights are double whatever the dtype (up_grad), else opmath (project_adjoint).
static size_t adjoint_tables(DType dtype, bool double_weights, int up_h, int64_t h, int up_w, int64_t w, int64_t H,
                             int64_t W, bool ac, const View4& plane, int64_t* table_h, int64_t* table_w) {
  *table_h = *table_w = 0;
  const bool identity = up_h == static_cast<int>(ResizeKind::Identity) && up_w == up_h;
  constexpr int64_t kSmall = int64_t{1} << 30;
  if (identity || h >= kSmall || w >= kSmall || H >= kSmall || W >= kSmall || H * W > INT32_MAX ||
      !offsets_fit_int(plane, 1, 1, H, W))
    return 0;
  const bool dbl = dtype == DType::Double;
  const int64_t th = dbl ? most_readers<double>(up_h, h, H, ac) : most_readers<float>(up_h, h, H, ac);
  const int64_t tw = dbl ? most_readers<double>(up_w, w, W, ac) : most_readers<float>(up_w, w, W, ac);
  const size_t bytes = static_cast<size_t>(h + w) * sizeof(int2) +
                       static_cast<size_t>(h * th + w * tw) * (double_weights ? sizeof(double) : acc_size(dtype));
  if (bytes > (recorder_ != nullptr ? kGpuUpGradTableBytes : kUpGradTableBytes)) return 0;
  *table_h = th;
  *table_w = tw;
  return bytes;
}

cudaError_t launch_up_grad(DType dtype, UpGradArgs* args, cudaStream_t stream) {
  if (!valid_group(*args, args->max_chunks)) return cudaErrorInvalidValue;
  int64_t blocks = 0;
  size_t smem = 0;
  for (int b = 0; b < args->num_branches; ++b) {
    UpGradBranch& ub = args->br[b];
    ub.lanes = adjoint_lanes(ub.up_h, ub.h, ub.up_w, ub.w, args->H, args->W);
    ub.chunks = reduction_chunks(ub.channels, args->N * ub.h * ub.w * ub.lanes);
    ub.block_begin = blocks;
    blocks += ub.channels * ub.chunks;
    const size_t bytes = adjoint_tables(dtype, true, ub.up_h, ub.h, ub.up_w, ub.w, args->H, args->W,
                                        args->align_corners, args->grad, &ub.table_h, &ub.table_w);
    smem = bytes > smem ? bytes : smem;
  }
  return launch(dtype, "up_grad", args->N == 0 ? 0 : blocks, smem, *args, stream,
                [](auto s) { return up_grad_kernel<decltype(s)>; });
}

cudaError_t launch_reduce_partials(DType dtype, const ReduceArgs& args, cudaStream_t stream) {
  if (!valid_group(args, args.max_chunks)) return cudaErrorInvalidValue;
  return launch(dtype, "reduce_partials", ceil_div(group_channels(args), kThreads), 0, args, stream,
                [](auto s) { return reduce_partials_kernel<decltype(s)>; });
}

cudaError_t launch_norm_grad(DType dtype, NormGradArgs args, cudaStream_t stream) {
  if (!valid_group(args)) return cudaErrorInvalidValue;
  int64_t blocks = 0;
  for (int b = 0; b < args.num_branches; ++b) {
    NormGradBranch& nb = args.br[b];
    const int64_t need = ceil_div(args.N * nb.channels * nb.h * nb.w, kThreads);
    nb.blocks = need < 1 ? 1 : (need > 4096 ? 4096 : need);
    nb.block_begin = blocks;
    blocks += nb.blocks;
  }
  return launch(dtype, "norm_grad", args.N == 0 ? 0 : blocks, 0, args, stream,
                [](auto s) { return norm_grad_kernel<decltype(s)>; });
}

size_t pool_shared_limit() { return 48 * 1024; }

bool pool_fills_device(int64_t N, int64_t C, bool channels_last) {
  return N * ceil_div(C, pool_group(channels_last)) >= 2 * multiprocessors();
}

size_t pool_shared_bytes(DType dtype, PoolArgs* args) {
  int64_t rows = 0, bins = 0;
  for (int b = 0; b < args->num_branches; ++b) {
    args->br[b].row_base = rows;
    args->br[b].bin_base = bins;
    rows += args->br[b].level_h;
    bins += args->br[b].level_h * args->br[b].level_w;
  }
  // A table entry is an int2 of bin-row indices and an int row: levels and H must fit in int.
  if (args->H >= (int64_t{1} << 30)) return SIZE_MAX;
  for (int b = 0; b < args->num_branches; ++b)
    if (args->br[b].level_h >= (int64_t{1} << 30)) return SIZE_MAX;
  const size_t acc = acc_size(dtype);
  const size_t bytes = static_cast<size_t>(rows) * kThreads * acc +
                       static_cast<size_t>(bins) * pool_group(args->x_channels_last) * acc;
  const size_t aligned = (bytes + 7) / 8 * 8;  // int2 table after the accumulators, then the segment ends
  return aligned + static_cast<size_t>(args->H) * (args->num_branches * sizeof(int2) + sizeof(int));
}

cudaError_t launch_pool_levels(DType dtype, const PoolArgs& args, cudaStream_t stream) {
  if (!valid_group(args)) return cudaErrorInvalidValue;
  PoolArgs a = args;
  const size_t smem = pool_shared_bytes(dtype, &a);
  if (smem > pool_shared_limit()) return cudaErrorInvalidValue;
  return launch(dtype, "pool_levels", a.N * ceil_div(a.C, pool_group(a.x_channels_last)), smem, a, stream,
                [](auto s) { return pool_levels_kernel<decltype(s)>; });
}

// Whether every element offset of an (n, c, h, w) view (and each term of it) fits int.
static bool offsets_fit_int(const View4& v, int64_t n, int64_t c, int64_t h, int64_t w) {
  const int64_t size[4] = {n, c, h, w};
  int64_t largest = 0;
  for (int d = 0; d < 4; ++d) {
    if (size[d] <= 1) continue;
    const int64_t stride = v.stride[d] < 0 ? -v.stride[d] : v.stride[d];
    if (size[d] > INT32_MAX || stride > INT32_MAX) return false;
    largest += (size[d] - 1) * stride;
  }
  return largest <= INT32_MAX;
}

// The most level rows one tile of `rows` x rows reads from branch db (its rows of sums in dx_row_tiles): the
// reader ranges grow with the row, so a tile's are its first row's start to its last row's end.
template <typename A>
static int64_t dx_tile_level_rows(const DxArgs& a, const DxBranch& db, int64_t rows) {
  const ResizeKind kind = static_cast<ResizeKind>(db.down_h);
  const A scale = linear_scale<A>(a.H, db.level_h, a.align_corners);
  auto range = [&](int64_t i, int64_t* o0, int64_t* o1) {
    *o0 = i, *o1 = i + 1;  // Identity
    if (kind != ResizeKind::Identity)
      readers_of<A>(kind, i, a.H, db.level_h, db.factor, a.align_corners, scale, o0, o1);
  };
  int64_t most = 0;
  for (int64_t i0 = 0; i0 < a.H; i0 += rows) {
    int64_t lo, hi, unused;
    range(i0, &lo, &unused);
    range((i0 + rows < a.H ? i0 + rows : a.H) - 1, &unused, &hi);
    most = hi - lo > most ? hi - lo : most;
  }
  return most;
}

size_t dx_tables_bytes(DType dtype, DxArgs* args) {
  int64_t taps = 0;
  for (int b = 0; b < args->num_branches; ++b) {
    args->br[b].weight_base = taps;
    taps += args->br[b].level_h + args->br[b].level_w;
  }
  const size_t tap_bytes = dtype == DType::Double ? sizeof(DxTap<double>) : sizeof(DxTap<float>);
  return static_cast<size_t>(args->num_branches) * (args->H + args->W) * sizeof(int2) +
         static_cast<size_t>(taps) * tap_bytes;
}

cudaError_t launch_dx(DType dtype, const DxArgs& args, cudaStream_t stream) {
  if (args.num_branches < 0 || args.num_branches > kMaxBranches) return cudaErrorInvalidValue;
  // The tables in shared memory where they fit (int indices, MemoryOrderCursor: sizes below 2^30).
  DxArgs a = args;
  const size_t bytes = dx_tables_bytes(dtype, &a);
  constexpr int64_t kSmall = int64_t{1} << 30;
  a.tables = a.num_branches > 0 && bytes <= 48 * 1024 && a.C < kSmall && a.H < kSmall && a.W < kSmall;
  const int64_t total = a.N * a.C * a.H * a.W;
  const int64_t past_end = (kDxUnroll + 1) * kDxBlocksPerSM * multiprocessors() * kThreads;  // the walk's overshoot
  a.narrow = total <= kDxNarrowLimit && total + past_end <= INT32_MAX && offsets_fit_int(a.dx, a.N, a.C, a.H, a.W) &&
             (a.x_offset < 0 || offsets_fit_int(a.grad, a.N, a.x_offset + a.C, a.H, a.W));
  for (int b = 0; b < a.num_branches; ++b)
    a.narrow = a.narrow && offsets_fit_int(a.br[b].dz, a.N, a.C, a.br[b].level_h, a.br[b].level_w);
  // NCHW: row tiles (dx_row_tiles) of as many rows as keep every block busy and the level-row sums beside the
  // tables in shared memory.
  size_t smem = a.tables ? bytes : 0;
  a.tile_rows = 0;
  bool plane_int = offsets_fit_int(a.dx, 1, 1, a.H, a.W) && offsets_fit_int(a.grad, 1, 1, a.H, a.W);
  for (int b = 0; b < a.num_branches; ++b)
    plane_int = plane_int && offsets_fit_int(a.br[b].dz, 1, 1, a.br[b].level_h, a.br[b].level_w);
  if (a.tables && !a.channels_last && plane_int) {
    const size_t sums_at = (bytes + 15) / 16 * 16;
    const int64_t want_units = kDxBlocksPerSM * multiprocessors();
    // Terms per x row at most: an identity branch's dz, else a term per reader (two for linear: both taps).
    int64_t row_terms = 0;
    for (int b = 0; b < a.num_branches; ++b) {
      const DxBranch& db = a.br[b];
      const bool identity = db.down_h == static_cast<int>(ResizeKind::Identity) && db.down_w == db.down_h;
      const int64_t readers = identity ? 1
                              : dtype == DType::Double ? dx_tile_level_rows<double>(a, db, 1)
                                                       : dx_tile_level_rows<float>(a, db, 1);
      row_terms += db.down_h == static_cast<int>(ResizeKind::Linear) ? 2 * readers : readers;
    }
    // (The launch plan: the GPU build's minimum.)
    const int64_t min_elems = recorder_ != nullptr ? kGpuDxTileMinElems : kDxTileMinElems;
    for (int64_t rows = a.H; rows >= 1 && rows * a.W >= min_elems; rows = rows == 1 ? 0 : (rows + 1) / 2) {
      int64_t values = 0;
      for (int b = 0; b < a.num_branches; ++b) {
        DxBranch& db = a.br[b];
        db.sum_base = values;
        if (db.down_h == static_cast<int>(ResizeKind::Identity) && db.down_w == db.down_h) continue;
        values += (dtype == DType::Double ? dx_tile_level_rows<double>(a, db, rows)
                                          : dx_tile_level_rows<float>(a, db, rows)) * a.W;
      }
      const size_t terms_at = (sums_at + static_cast<size_t>(values) * acc_size(dtype) + 15) / 16 * 16;
      const size_t need =
          terms_at + static_cast<size_t>(rows) * (row_terms * (acc_size(dtype) + sizeof(int)) + sizeof(int));
      if (need <= 48 * 1024 && (a.N * a.C * ceil_div(a.H, rows) >= want_units || rows == 1)) {
        a.tile_rows = rows;
        a.sums_at = static_cast<int64_t>(sums_at);
        a.terms_at = static_cast<int64_t>(terms_at);
        a.row_terms = row_terms;
        smem = need;
        break;
      }
    }
  }
  const bool narrow = a.tables && a.narrow;
  auto kernel_of = [&](auto s) {
    using T = decltype(s);
    if (narrow) return a.channels_last ? dx_kernel<T, true, int> : dx_kernel<T, false, int>;
    return a.channels_last ? dx_kernel<T, true, int64_t> : dx_kernel<T, false, int64_t>;
  };
  // As many blocks per multiprocessor as are resident at once (its registers), at most kDxBlocksPerSM: one
  // wave, each block's share of the elements equal.
  int64_t per_sm = kDxBlocksPerSM;
#ifndef MSFUSED_CUDA_EMULATION
  if (recorder_ == nullptr)
    dispatch(dtype, [&](auto s) {
      int resident = 0;
      if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel_of(s), kThreads, smem) == cudaSuccess &&
          resident >= 1 && resident < per_sm)
        per_sm = resident;
      return cudaSuccess;
    });
#endif
  const int64_t need = a.tile_rows > 0 ? a.N * a.C * ceil_div(a.H, a.tile_rows) : ceil_div(total, kThreads);
  const int64_t cap = per_sm * multiprocessors();
  a.blocks = need < cap ? need : cap;
  return launch(dtype, "dx", a.blocks, smem, a, stream, kernel_of);
}

cudaError_t launch_project_accumulate(DType dtype, const ProjectAccArgs& args, cudaStream_t stream) {
  if (args.num_taps < 0 || args.num_taps > kMaxBranches || args.num_direct < 0 || args.num_direct > kMaxBranches ||
      args.k < 1 || args.k % 2 == 0)
    return cudaErrorInvalidValue;
  // The tile loops index in int: maps, channels and k below 2^30.
  if (args.H >= (int64_t{1} << 30) || args.W >= (int64_t{1} << 30) || args.P >= (int64_t{1} << 30) ||
      args.k >= (int64_t{1} << 20))
    return cudaErrorInvalidValue;
  ProjectAccArgs a = args;
  a.tiles = output_tiles(a.P, a.H, a.W, a.channels_last, recorder_ != nullptr ? kGpuUpTileElems : kUpTileElems, false);
  // Tap tables per per-tap branch: the tile's rows and columns with k / 2 more on each side; computed per
  // use where they would not fit (a very large k).
  const size_t tables = static_cast<size_t>(a.num_taps) * (a.tiles.rows + a.tiles.cols + 2 * (a.k - 1)) *
                        (acc_size(dtype) == 8 ? sizeof(UpTap<double>) : sizeof(UpTap<float>));
  a.tables = a.num_taps > 0 && tables <= 48 * 1024;
  const int64_t blocks = a.H == 0 || a.W == 0 ? 0 : tile_count(a.tiles, a.N);
  return launch(dtype, "project_accumulate", blocks, a.tables ? tables : 0, a, stream,
                [](auto s) { return project_accumulate_kernel<decltype(s)>; });
}

cudaError_t launch_project_adjoint(DType dtype, ProjectAdjointArgs args, cudaStream_t stream) {
  if (!valid_group(args) || args.k < 1 || args.k % 2 == 0) return cudaErrorInvalidValue;
  int64_t blocks = 0;
  size_t smem = 0;
  for (int b = 0; b < args.num_branches; ++b) {
    ProjectAdjointBranch& br = args.br[b];
    br.lanes = adjoint_lanes(br.up_h, br.h, br.up_w, br.w, args.H, args.W);
    br.block_begin = blocks;
    blocks += ceil_div(args.N * args.k * args.k * args.P * br.h * br.w * br.lanes, kThreads);
    const size_t bytes =
        adjoint_tables(dtype, false, br.up_h, br.h, br.up_w, br.w, args.H, args.W, args.align_corners, args.dpre,
                       &br.table_h, &br.table_w);
    smem = bytes > smem ? bytes : smem;
  }
  return launch(dtype, "project_adjoint", blocks, smem, args, stream,
                [](auto s) { return project_adjoint_kernel<decltype(s)>; });
}

// ---------------------------------------------------------------------------------------------------
// The record-only mode: the launch recorder and every kernel's cost model (ESTIMATES from the launchers'
// arithmetic: blocks, active threads of a block, the longest serial loop of a thread, distinct bytes)
// ---------------------------------------------------------------------------------------------------
void set_launch_recorder(LaunchRecorder* recorder) { recorder_ = recorder; }
LaunchRecorder* launch_recorder() { return recorder_; }

namespace {

int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Steps of a fixed tree over g lanes (lane_tree_sum).
int64_t tree_steps(int64_t g) {
  int64_t steps = 0;
  while ((int64_t{1} << steps) < g) ++steps;
  return steps;
}

PlannedPart part(std::string what, int64_t programs, int64_t lanes, int64_t serial, int64_t read, int64_t written) {
  PlannedPart p;
  p.what = std::move(what);
  p.programs = programs;
  p.lanes = max64(lanes, 1);
  p.serial = max64(serial, 1);
  p.read = read;
  p.written = written;
  return p;
}

std::string level_name(const char* kind, int b, int64_t h, int64_t w) {
  return std::string(kind) + " " + std::to_string(b) + " (" + std::to_string(h) + "x" + std::to_string(w) + ")";
}

// The taps of an up-resize one output element reads (both axes).
int64_t up_taps(int up_h, int up_w) {
  auto taps = [](int kind) { return static_cast<ResizeKind>(kind) == ResizeKind::Linear ? kMaxPointTaps : 1; };
  return taps(up_h) * taps(up_w);
}

// A level element whose `entries` reads are split over `lanes` threads (kThreads / lanes elements per
// block; levels, project_adjoint): active threads of a block and the serial loop of one (its share, then
// the tree).
void lane_split(int64_t lanes, int64_t entries, int64_t elems, int64_t* active, int64_t* serial) {
  *active = min64(lanes, entries) * min64(kThreads / lanes, elems);
  *serial = ceil_div(entries, lanes) + (lanes > 1 ? tree_steps(lanes) : 0);
}

Parts kernel_cost(const PoolArgs& a, int64_t blocks, size_t S, size_t) {
  // One block per (n, channel group): the row table (a row per thread), then per chunk of TJ columns each
  // thread walks its column down its row group's rows (a segment's sum added to its bin rows), then the
  // block's bins add their columns of the chunk (every row group's).
  const int CG = pool_group(a.x_channels_last);
  int TJ, RG;
  pool_tile(a.x_channels_last, a.W, &TJ, &RG);
  int64_t level_elems = 0;
  for (int b = 0; b < a.num_branches; ++b) level_elems += a.br[b].level_h * a.br[b].level_w;
  const int64_t x_elems = a.N * a.C * a.H * a.W;
  const int64_t per_chunk = ceil_div(a.H, RG) + ceil_div(level_elems * CG, kThreads) * RG * min64(TJ, a.W);
  return {part("x: every bins level" + std::string(a.x_offset >= 0 ? " + x's copy" : ""), blocks,
               min64(CG, a.C) * min64(TJ, a.W) * min64(RG, a.H),
               ceil_div(a.H, kThreads) * a.num_branches + ceil_div(a.W, TJ) * per_chunk, x_elems * S,
               (a.N * a.C * level_elems + (a.x_offset >= 0 ? x_elems : 0)) * S)};
}

Parts kernel_cost(const LevelArgs& a, int64_t, size_t S, size_t) {
  Parts parts;
  const int64_t x_elems = a.N * a.C * a.H * a.W;
  if (a.copy_blocks > 0)
    parts.push_back(part("x's copy", a.copy_blocks, min64(kThreads, x_elems),
                         ceil_div(x_elems, a.copy_blocks * kThreads), x_elems * S, x_elems * S));
  for (int b = 0; b < a.num_branches; ++b) {
    const LevelBranch& br = a.br[b];
    const int64_t elems = a.N * a.C * br.level_h * br.level_w;
    const int64_t taps =
        down_taps(br.down_h, br.level_h, a.H, br.factor) * down_taps(br.down_w, br.level_w, a.W, br.factor);
    int64_t active, serial;
    lane_split(br.lanes, taps, elems, &active, &serial);
    parts.push_back(part(level_name("level", b, br.level_h, br.level_w), ceil_div(elems * br.lanes, kThreads), active,
                         serial, min64(x_elems, elems * taps) * S, elems * S));
  }
  return parts;
}

Parts kernel_cost(const StatsArgs& a, int64_t, size_t S, size_t) {
  Parts parts;
  for (int b = 0; b < a.num_branches; ++b) {
    const StatsBranch& sb = a.br[b];
    const int64_t elems = a.N * sb.h * sb.w, per_chunk = ceil_div(elems, sb.chunks);
    // Two passes over the chunk (the sum, then M2 about the chunk's mean).
    parts.push_back(part(level_name("branch", b, sb.h, sb.w) + " x " + std::to_string(sb.chunks) + " chunks",
                         sb.channels * sb.chunks, min64(kThreads, per_chunk), 2 * ceil_div(per_chunk, kThreads),
                         sb.channels * elems * S, sb.channels * sb.chunks * 3 * 8));
  }
  return parts;
}

Parts kernel_cost(const MergeStatsArgs& a, int64_t blocks, size_t, size_t A) {
  int64_t channels = 0, chunks = 0;
  for (int b = 0; b < a.num_branches; ++b) {
    channels += a.br[b].channels;
    chunks = max64(chunks, a.br[b].chunks);
  }
  const bool merge = a.partial != nullptr;
  // One thread per channel: the chunks in order, twice (the mean, then M2).
  return {part(merge ? "per channel: the chunks merged" : "per channel: saved statistics", blocks,
               min64(kThreads, channels), merge ? 2 * chunks : 1,
               (merge ? channels * chunks * 3 * 8 : channels * 2 * A) + channels * 2 * A,
               channels * (merge ? 4 : 2) * A)};
}

Parts kernel_cost(const EpilogueArgs& a, int64_t, size_t S, size_t A) {
  Parts parts;
  for (int b = 0; b < a.num_branches; ++b) {
    const EpilogueBranch& eb = a.br[b];
    // A block: one tile, its elements kThreads at a time, each reading its up-resize's taps.
    const int64_t tile = eb.tiles.rows * eb.tiles.cols * (a.channels_last ? eb.channels : eb.tiles.channels);
    const int64_t blocks = tile_count(eb.tiles, a.N);
    parts.push_back(part(level_name("branch", b, eb.h, eb.w) + " tiles", blocks, min64(kThreads, tile),
                         ceil_div(tile, kThreads) * up_taps(eb.up_h, eb.up_w),
                         (a.N * eb.h * eb.w * S + 2 * A) * eb.channels, a.N * eb.channels * a.H * a.W * S));
  }
  return parts;
}

Parts kernel_cost(const UpGradArgs& a, int64_t, size_t S, size_t) {
  Parts parts;
  for (int b = 0; b < a.num_branches; ++b) {
    const UpGradBranch& ub = a.br[b];
    // A block: its tables (each level row's and column's readers), then one channel's chunk of level pixels,
    // kThreads / lanes at a time (rounds), each pixel's readers split over its lanes (then the tree).
    const int64_t pixels = a.N * ub.h * ub.w, per_chunk = ceil_div(pixels, ub.chunks);
    const int64_t entries = resize_readers(ub.up_h, ub.h, a.H) * resize_readers(ub.up_w, ub.w, a.W);
    int64_t active, per_pixel;
    lane_split(ub.lanes, entries, per_chunk, &active, &per_pixel);
    const int64_t rounds = ceil_div(per_chunk, kThreads / ub.lanes);
    const int64_t tables = ub.table_h > 0 ? ceil_div(ub.h + ub.w, kThreads) * max64(ub.table_h, ub.table_w) : 0;
    parts.push_back(part(level_name("branch", b, ub.h, ub.w) + " x " + std::to_string(ub.chunks) + " chunks",
                         ub.channels * ub.chunks, active, tables + rounds * per_pixel,
                         ub.channels * (a.N * a.H * a.W + 2 * pixels) * S,
                         ub.channels * (pixels * S + ub.chunks * 2 * 8)));
  }
  return parts;
}

Parts kernel_cost(const ReduceArgs& a, int64_t blocks, size_t, size_t A) {
  int64_t channels = 0, chunks = 0, stats = 0;
  for (int b = 0; b < a.num_branches; ++b) {
    channels += a.br[b].channels;
    chunks = max64(chunks, a.br[b].chunks);
    if (a.br[b].batch_stats) stats += a.br[b].channels;
  }
  return {part("per channel: the chunks summed", blocks, min64(kThreads, channels), chunks,
               channels * (chunks * 2 * 8 + 3 * A), channels * 2 * 8 + stats * 3 * 8)};
}

Parts kernel_cost(const NormGradArgs& a, int64_t, size_t S, size_t) {
  Parts parts;
  for (int b = 0; b < a.num_branches; ++b) {
    const NormGradBranch& nb = a.br[b];
    const int64_t total = a.N * nb.channels * nb.h * nb.w;
    parts.push_back(part(level_name("branch", b, nb.h, nb.w), nb.blocks, min64(kThreads, total),
                         ceil_div(total, nb.blocks * kThreads), 2 * total * S + nb.channels * 3 * 8, total * S));
  }
  return parts;
}

Parts kernel_cost(const DxArgs& a, int64_t blocks, size_t S, size_t) {
  const int64_t total = a.N * a.C * a.H * a.W;
  // The block's tables (once), then its grid-stride steps: per element every branch's readers (level rows x
  // columns).
  int64_t serial = 0, per_element = 0;
  int64_t read = (a.x_offset >= 0 ? total : 0) + (a.accumulate ? total : 0);
  for (int b = 0; b < a.num_branches; ++b) {
    const DxBranch& db = a.br[b];
    if (a.tables) serial += ceil_div(a.H + a.W, kThreads) + ceil_div(db.level_h + db.level_w, kThreads);
    per_element += resize_readers(db.down_h, a.H, db.level_h) * resize_readers(db.down_w, a.W, db.level_w);
    read += a.N * a.C * db.level_h * db.level_w;
  }
  if (a.tile_rows > 0) {
    // Row tiles: per unit the level-row sums (each its columns' readers), then per element its level rows.
    const int64_t units = a.N * a.C * ceil_div(a.H, a.tile_rows);
    int64_t per_unit = ceil_div(a.tile_rows * a.W, kThreads) * (1 + a.num_branches * 2);
    for (int b = 0; b < a.num_branches; ++b) {
      const DxBranch& db = a.br[b];
      const int64_t sum_rows = ceil_div(db.level_h * a.tile_rows, a.H) + 2;
      per_unit += ceil_div(sum_rows * a.W, kThreads) * resize_readers(db.down_w, a.W, db.level_w);
    }
    serial += ceil_div(units, blocks) * per_unit;
  } else {
    serial += ceil_div(total, blocks * kThreads) * max64(per_element, 1);
  }
  return {part(a.tile_rows > 0 ? "every element of dx (row tiles)" : "every element of dx", blocks,
               min64(kThreads, total), serial, read * S, total * S)};
}

Parts kernel_cost(const ProjectAccArgs& a, int64_t blocks, size_t S, size_t A) {
  const int64_t total = a.N * a.P * a.H * a.W, tile = a.tiles.rows * a.tiles.cols * (a.channels_last ? a.P : 1);
  // A block: one tile, kThreads outputs at a time, each its direct parts and every branch's k*k shifted taps.
  int64_t per_output = a.num_direct, read = ((a.acc.data != nullptr ? 1 : 0) + a.num_direct) * total * S +
                                           (a.carry.data != nullptr ? total * A : 0);
  for (int b = 0; b < a.num_taps; ++b) {
    const ProjectTapBranch& tb = a.tap[b];
    per_output += a.k * a.k * up_taps(tb.up_h, tb.up_w);
    read += a.N * a.k * a.k * a.P * tb.h * tb.w * A;
  }
  const int64_t written = a.partial.data != nullptr
                              ? total * A
                              : ((a.pre.data != nullptr ? 1 : 0) + (a.out.data != nullptr ? 1 : 0)) * total * S;
  return {part("output tiles", blocks, min64(kThreads, tile), ceil_div(tile, kThreads) * per_output, read, written)};
}

Parts kernel_cost(const ProjectAdjointArgs& a, int64_t, size_t S, size_t A) {
  Parts parts;
  for (int b = 0; b < a.num_branches; ++b) {
    const ProjectAdjointBranch& br = a.br[b];
    const int64_t elems = a.N * a.k * a.k * a.P * br.h * br.w;
    const int64_t entries = resize_readers(br.up_h, br.h, a.H) * resize_readers(br.up_w, br.w, a.W);
    int64_t active, serial;
    lane_split(br.lanes, entries, elems, &active, &serial);
    if (br.table_h > 0) serial += ceil_div(br.h + br.w, kThreads) * max64(br.table_h, br.table_w);  // the tables
    parts.push_back(part(level_name("branch", b, br.h, br.w), ceil_div(elems * br.lanes, kThreads), active, serial,
                         a.N * a.P * a.H * a.W * S, elems * A));
  }
  return parts;
}

}  // namespace
}  // namespace cuda
}  // namespace msfused
