// The CUDA kernels' launchers: plain C++ over raw pointers, sizes and strides (in elements, int64), so that
// this header and multi_scale_kernels.cu need only CUDA's own headers (and the shared csrc/*.h helpers).
// The torch binding (tensors, dtype dispatch, device guard, stream) is multi_scale_cuda.cpp.
//
// Every launcher launches on the stream it is given and returns the launch's cudaError_t (cudaSuccess if
// nothing needed launching). See multi_scale_kernels.cu for what each kernel computes and the launch
// counts per mode.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace msfused {
namespace cuda {

enum class DType : int { Float = 0, Double = 1, Half = 2, BFloat16 = 3 };

// Branches per launch; a block with more branches is processed in groups of this many (one launch each).
constexpr int kMaxBranches = 8;
// Largest convolution kernel the tile kernel holds in shared memory (k = 1, 3, 5, 7).
constexpr int kMaxKernelSize = 7;

// A 4-D tensor (N, channels, height, width) as a pointer and element strides.
struct View4 {
  void* data = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};
};

// ---------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------

// One branch as the tile kernel sees it. The convolution reads the level: either sampled on the fly from
// src (x, down kinds from the plan) or read from src itself (a level pooled earlier: down kinds Identity,
// src_h/src_w the level size). The epilogue is y = alpha * pre + beta (opmath dtype, per channel).
struct TileBranch {
  View4 src;
  int64_t src_h = 0, src_w = 0;
  int down_h = 0, down_w = 0;  // ResizeKind, src -> level
  int up_h = 0, up_w = 0;  // ResizeKind, level -> output
  int64_t factor = 1;
  int64_t level_h = 0, level_w = 0;
  View4 level_out;  // written when data != nullptr (owned pixels, by the first channel chunk)
  const void* weight = nullptr;  // (Cb, C, k, k) contiguous, x's dtype
  const void* bias = nullptr;  // (Cb,) x's dtype, or nullptr
  const void* alpha = nullptr;  // (Cb,) opmath dtype (float; double for double)
  const void* beta = nullptr;
  View4 pre;  // (N, Cb, h, w): written by the conv modes, read by the epilogue-only mode
  // ConvOnly with batch statistics: per (channel, tile) partial statistics of pre, (count, mean, M2) in
  // double, at stats_partial[(c * N * tiles_per_image(h, w) + tile) * 3]; nullptr: none.
  double* stats_partial = nullptr;
  int64_t out_channels = 0, kernel_size = 1, channel_offset = 0;
  int64_t tiles_h = 0, tiles_w = 0, co_chunks = 0;  // filled by the launcher
  int64_t block_begin = 0;  // filled by the launcher
};

struct TileArgs {
  int64_t N = 0, C = 0, H = 0, W = 0;
  View4 x;  // read by the copy blocks
  View4 out;  // (N, C_out, H, W)
  int64_t x_offset = -1;  // copy x into out[:, x_offset : x_offset + C] when >= 0
  bool x_channels_last = false;  // x's memory order, for coalesced copies
  bool align_corners = false;
  int activation = 0;  // msfused::Activation
  int num_branches = 0;
  TileBranch br[kMaxBranches];
  int64_t copy_blocks = 0;  // filled by the launcher
};

// What the tile kernel does in one launch.
enum class TileMode : int {
  ConvEpilogue = 0,  // level -> conv -> pre, epilogue, upsample into out (inference: one launch)
  ConvOnly = 1,  // level -> conv -> pre (training with batch statistics: first pass)
  EpilogueOnly = 2,  // pre -> epilogue, upsample into out (after the statistics)
};

cudaError_t launch_tile_forward(DType dtype, TileMode mode, TileArgs args, cudaStream_t stream);

// Adaptive average pooling of every bins branch from one read of x, plus x's slice of the output.
struct PoolBranch {
  View4 level;  // (N, C, h, w) written
  int64_t level_h = 0, level_w = 0;
  int64_t row_base = 0, bin_base = 0;  // filled by pool_shared_bytes
};

struct PoolArgs {
  int64_t N = 0, C = 0, H = 0, W = 0;
  View4 x, out;
  int64_t x_offset = -1;
  bool x_channels_last = false;
  int num_branches = 0;
  PoolBranch br[kMaxBranches];
};

// Shared memory the pooling kernel needs for these branches (fills row_base, bin_base); the binding pools
// with it only while this stays within pool_shared_limit(), and samples the other bins branches in the
// tile kernel instead.
size_t pool_shared_bytes(DType dtype, PoolArgs* args);
size_t pool_shared_limit();
cudaError_t launch_pool_levels(DType dtype, const PoolArgs& args, cudaStream_t stream);

// Tiles the tile kernel cuts one image of an h x w level into (the stats_partial entries per channel and n).
int64_t tiles_per_image(int64_t h, int64_t w);

// Per-channel batch mean and biased variance from the tile kernel's partial statistics: the partials of a
// channel merged in tile order (Chan et al.'s pairwise update, double). Parameter-sized work: one thread per
// channel. mean/var: (Cb,) float (double for double).
struct MergeStatsBranch {
  const double* partial = nullptr;
  int64_t channels = 0, partials_per_channel = 0;
  void* mean = nullptr;
  void* var = nullptr;
};
struct MergeStatsArgs {
  int num_branches = 0;
  MergeStatsBranch br[kMaxBranches];
};
cudaError_t launch_merge_stats(DType dtype, const MergeStatsArgs& args, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------

// Per branch: dY = the upsample's adjoint of grad's slice (a gather), times act'(alpha * pre + beta),
// rounded to the dtype; writes dconv = dY * pre_scale[c] and per (channel, chunk) partial sums of dY and
// dY * (pre - center[c]) (double) into partial[(channel_base + c) * max_chunks + chunk][2].
struct UpGradBranch {
  View4 pre;  // (N, Cb, h, w)
  View4 dconv;  // (N, Cb, h, w) written
  int64_t channels = 0, h = 0, w = 0, channel_offset = 0;
  int up_h = 0, up_w = 0;
  const void* alpha = nullptr;  // opmath
  const void* beta = nullptr;
  const double* pre_scale = nullptr;
  const double* center = nullptr;
  int64_t channel_base = 0;  // this branch's first row in partial / sums
  int64_t chunks = 0, block_begin = 0;  // filled by the launcher
};
struct UpGradArgs {
  int64_t N = 0, H = 0, W = 0;
  View4 grad;  // (N, C_out, H, W)
  bool align_corners = false;
  int activation = 0;
  int num_branches = 0;
  UpGradBranch br[kMaxBranches];
  double* partial = nullptr;  // (total channels * max_chunks, 2)
  int64_t max_chunks = 0;  // use up_grad_max_chunks
};
int64_t up_grad_max_chunks();
// Reduces partial in chunk order into sums (total_channels, 2): sum dY, sum dY * (pre - center).
cudaError_t launch_up_grad(DType dtype, UpGradArgs args, cudaStream_t stream);
cudaError_t launch_reduce_partials(const double* partial, int64_t total_channels, int64_t max_chunks, double* sums,
                                   cudaStream_t stream);

// Batch-statistics branches: dconv = p[c] * dconv + q[c] * pre + r[c] in opmath, in place.
struct NormGradBranch {
  View4 pre, dconv;
  int64_t channels = 0, h = 0, w = 0;
  const double* p = nullptr;
  const double* q = nullptr;
  const double* r = nullptr;
  int64_t block_begin = 0, blocks = 0;  // filled by the launcher
};
struct NormGradArgs {
  int64_t N = 0;
  int num_branches = 0;
  NormGradBranch br[kMaxBranches];
};
cudaError_t launch_norm_grad(DType dtype, NormGradArgs args, cudaStream_t stream);

// dx written once: grad's x slice + every branch's adjoint down-resize of dz (the gradient wrt its level;
// for an identity branch dz is (N, C, H, W) and is added as it is). Gathers, in branch order.
struct DxBranch {
  View4 dz;
  int64_t level_h = 0, level_w = 0, factor = 1;
  int down_h = 0, down_w = 0;
};
struct DxArgs {
  int64_t N = 0, C = 0, H = 0, W = 0;
  View4 grad, dx;
  int64_t x_offset = -1;  // grad's x slice, or -1
  bool channels_last = false;  // dx's memory order
  bool align_corners = false;
  int num_branches = 0;
  DxBranch br[kMaxBranches];
  bool accumulate = false;  // add to dx (a later group of branches) instead of writing it
};
cudaError_t launch_dx(DType dtype, const DxArgs& args, cudaStream_t stream);

// Kernel arguments travel by value (the classic 4 KB parameter limit, with room to spare).
static_assert(sizeof(TileArgs) <= 4096 && sizeof(PoolArgs) <= 4096 && sizeof(MergeStatsArgs) <= 4096 &&
                  sizeof(UpGradArgs) <= 4096 && sizeof(NormGradArgs) <= 4096 && sizeof(DxArgs) <= 4096,
              "kernel arguments too large");

}  // namespace cuda
}  // namespace msfused
