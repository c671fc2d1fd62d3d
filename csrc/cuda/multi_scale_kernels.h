// The CUDA kernels' launchers: plain C++ over raw pointers, sizes and strides (in elements, int64), so that
// this header and multi_scale_kernels.cu need only CUDA's own headers (and the shared csrc/*.h helpers).
// The torch binding (tensors, dtype dispatch, device guard, stream, the ATen convolutions) is
// multi_scale_cuda.cpp.
//
// Every launcher launches on the stream it is given and returns the launch's cudaError_t (cudaSuccess if
// nothing needed launching). See multi_scale_kernels.cu for what each kernel computes and the launch
// counts per mode.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace msfused {
namespace cuda {

enum class DType : int { Float = 0, Double = 1, Half = 2, BFloat16 = 3 };

// Branches per launch; a block with more branches is processed in groups of this many (one launch each).
constexpr int kMaxBranches = 8;

// A 4-D tensor (N, channels, height, width) as a pointer and element strides.
struct View4 {
  void* data = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};
};

// ---------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------

// Adaptive average pooling of every bins branch from one read of x (column sums in shared memory), plus
// x's slice of the output.
struct PoolBranch {
  View4 level;  // (N, C, h, w) written
  int64_t level_h = 0, level_w = 0;
  int64_t row_base = 0, bin_base = 0;  // filled by pool_shared_bytes
};

struct PoolArgs {
  int64_t N = 0, C = 0, H = 0, W = 0;
  View4 x, out;
  int64_t x_offset = -1;  // copy x into out[:, x_offset : x_offset + C] when >= 0
  bool x_channels_last = false;
  int num_branches = 0;
  PoolBranch br[kMaxBranches];
};

// Shared memory the pooling kernel needs for these branches (fills row_base, bin_base); the binding pools
// with it only while this stays within pool_shared_limit() and pool_fills_device() (its blocks are one
// per (n, channel group): few batches and channels would leave the GPU idle), and gathers the other bins
// levels with launch_levels instead.
size_t pool_shared_bytes(DType dtype, PoolArgs* args);
size_t pool_shared_limit();
bool pool_fills_device(int64_t N, int64_t C, bool channels_last);
cudaError_t launch_pool_levels(DType dtype, const PoolArgs& args, cudaStream_t stream);

// Levels as gathers from x (the down-resize's taps, resize.h; a large pooling window split over several
// threads, combined in a fixed tree), plus x's slice of the output when x_offset >= 0 (extra blocks of
// the same launch).
// floor(n / d) for n, d < 2^31 as a multiply-high and a shift (launch_levels fills it; a division per element
// would be a long sequence on the GPU).
struct LevelDivisor {
  uint32_t d = 1, magic = 1;
  int shift = 0;
};
struct LevelBranch {
  View4 level;  // (N, C, h, w) written
  int64_t level_h = 0, level_w = 0, factor = 1;
  int down_h = 0, down_w = 0;  // ResizeKind, x -> level
  int64_t lanes = 1, block_begin = 0;  // filled by the launcher
  bool fast = false;  // filled by the launcher: elements and sizes below 2^31 (the divisors below apply)
  LevelDivisor div_h, div_w;
};
struct LevelArgs {
  int64_t N = 0, C = 0, H = 0, W = 0;
  View4 x, out;
  int64_t x_offset = -1;  // copy x into out[:, x_offset : x_offset + C] when >= 0
  bool x_channels_last = false;  // the memory order of x and the levels
  bool align_corners = false;
  int num_branches = 0;
  LevelBranch br[kMaxBranches];
  // Filled by the launcher: the copy's blocks; copy_flat: x dense in its memory order and out's slice made of
  // runs of copy_run elements of x's order, copy_run_stride apart (NCHW: one per n; channels_last: one per
  // pixel), x below 2^31 elements: element e of x goes to out + x_offset * stride[1] + e + (e / copy_run) *
  // (copy_run_stride - copy_run); in 16-byte chunks of copy_vec elements where the runs, their stride and both
  // starts allow (copy_vec 1: element by element).
  int64_t copy_blocks = 0;
  bool copy_flat = false;
  int64_t copy_run = 0, copy_run_stride = 0;
  int copy_vec = 1;
  LevelDivisor div_run, div_c;
};
cudaError_t launch_levels(DType dtype, LevelArgs args, cudaStream_t stream);

// Whole-map reductions are cut into (channel, chunk) blocks: the chunks one channel's `elems` values are
// cut into, so that `channels` channels give enough blocks to fill the device (and at most
// max_reduction_chunks()). Partial results are then combined per channel in chunk order.
int64_t reduction_chunks(int64_t channels, int64_t elems);
int64_t max_reduction_chunks();

// Batch statistics, pass 1: per (channel, chunk) of pre (the convolution output with its bias): the
// chunk's count, sum and M2 about its own mean (double), at partial[((channel_base + c) * max_chunks +
// chunk) * 3].
struct StatsBranch {
  View4 pre;  // (N, Cb, h, w)
  int64_t channels = 0, h = 0, w = 0;
  int64_t channel_base = 0;
  int64_t chunks = 0, block_begin = 0;  // filled by the launcher
};
struct StatsArgs {
  int64_t N = 0;
  int num_branches = 0;
  StatsBranch br[kMaxBranches];
  double* partial = nullptr;
  int64_t max_chunks = 0;  // max_reduction_chunks()
};
// Fills each branch's chunks (reduction_chunks) and block_begin; the merge needs the chunks.
cudaError_t launch_stats_partial(DType dtype, StatsArgs* args, cudaStream_t stream);

// Batch statistics, pass 2 (per-channel work, one thread per channel): the chunks merged in chunk order
// into the batch mean and biased variance (stats dtype: float, double for double), and the epilogue's
// alpha, beta (opmath, csrc/norm.h) from them and scale, shift (opmath; nullptr: 1 and 0). With partial ==
// nullptr, mean and var are given (read, not merged) and only alpha, beta are written.
struct MergeStatsBranch {
  int64_t channels = 0, chunks = 0, channel_base = 0;
  double eps = 0;
  const void* scale = nullptr;
  const void* shift = nullptr;
  void* mean = nullptr;
  void* var = nullptr;
  void* alpha = nullptr;
  void* beta = nullptr;
};
struct MergeStatsArgs {
  int num_branches = 0;
  MergeStatsBranch br[kMaxBranches];
  const double* partial = nullptr;  // nullptr: the statistics are given in mean, var
  int64_t max_chunks = 0;
};
cudaError_t launch_merge_stats(DType dtype, const MergeStatsArgs& args, cudaStream_t stream);

// The tiles of an (N, channels, H, W) output, a block each (epilogue_up, project_accumulate; filled by the
// launchers): NCHW, rows x cols outputs of `channels` planes (several only where a whole plane is smaller
// than a tile); channels_last, cols pixels of one row (rows 1, row_tiles H) with every channel.
struct OutputTiles {
  int64_t rows = 1, cols = 1, channels = 1, row_tiles = 1, col_tiles = 1, channel_tiles = 1;
};

// Norm, activation and the resize back up, every branch written straight into its channel slice of out
// (a tile of one branch's outputs per block): out(n, offset + c, I, J) = up-resize of act(alpha * pre + beta) (each
// tap rounded to the dtype, as the reference's activation output is). alpha/beta: opmath per channel
// (nullptr: 1 and 0).
struct EpilogueBranch {
  View4 pre;  // (N, Cb, h, w)
  int64_t channels = 0, h = 0, w = 0, channel_offset = 0;
  int up_h = 0, up_w = 0;  // ResizeKind, level -> output
  const void* alpha = nullptr;
  const void* beta = nullptr;
  OutputTiles tiles;  // filled by the launcher, and where the branch's blocks start
  int64_t block_begin = 0;
};
struct EpilogueArgs {
  int64_t N = 0, H = 0, W = 0;
  View4 out;
  bool channels_last = false;  // out's memory order
  bool align_corners = false;
  int activation = 0;  // msfused::Activation
  int num_branches = 0;
  EpilogueBranch br[kMaxBranches];
};
cudaError_t launch_epilogue_up(DType dtype, EpilogueArgs args, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------

// Per branch: dY = the upsample's adjoint of grad's slice (a gather over the output pixels that read a
// level pixel, `lanes` threads per level pixel, combined in a fixed tree), times act'(alpha * pre + beta)
// (alpha, beta from csrc/norm.h), rounded to the dtype; writes dconv = dY * pre_scale[c] (the scale without
// batch statistics, else 1) and per (channel, chunk) partial sums of dY and dY * (pre - center[c]) (center:
// the batch mean, else 0) in double into partial[((channel_base + c) * max_chunks + chunk) * 2].
struct UpGradBranch {
  View4 pre;  // (N, Cb, h, w)
  View4 dconv;  // (N, Cb, h, w) written
  int64_t channels = 0, h = 0, w = 0, channel_offset = 0;
  int up_h = 0, up_w = 0;
  bool batch_stats = false;
  double eps = 0;
  const void* scale = nullptr;  // opmath (float; double for double); nullptr: 1
  const void* shift = nullptr;  // opmath; nullptr: 0
  const void* mean = nullptr;  // stats dtype (= opmath), batch statistics only
  const void* var = nullptr;
  int64_t channel_base = 0;  // this branch's first row in partial
  int64_t chunks = 0, block_begin = 0, lanes = 1;  // filled by the launcher
  int64_t table_h = 0, table_w = 0;  // filled by the launcher: readers per level row, column in the tables (0: none)
};
struct UpGradArgs {
  int64_t N = 0, H = 0, W = 0;
  View4 grad;  // (N, C_out, H, W)
  bool align_corners = false;
  int activation = 0;
  int num_branches = 0;
  UpGradBranch br[kMaxBranches];
  double* partial = nullptr;  // (total channels * max_chunks, 2)
  int64_t max_chunks = 0;  // max_reduction_chunks()
};
// Fills each branch's lanes, chunks (reduction_chunks) and block_begin; reduce_partials needs the chunks.
cudaError_t launch_up_grad(DType dtype, UpGradArgs* args, cudaStream_t stream);

// The partial sums of up_grad combined per channel in chunk order (one thread per channel), and what the
// norm's backward needs from them (double, per channel): sums[c] = (sum dY, d_scale), d_scale =
// sum dY * (pre - center) (and, with batch statistics, times invstd: csrc/norm.h), and for batch-statistics
// branches the coefficients coef[c] = (p, q, r) of dconv = p * dconv + q * pre + r.
struct ReduceBranch {
  int64_t channels = 0, chunks = 0, channel_base = 0;
  bool batch_stats = false;
  double eps = 0, count = 0;  // count: N * h * w
  const void* scale = nullptr;  // opmath; nullptr: 1
  const void* mean = nullptr;  // stats dtype (batch statistics)
  const void* var = nullptr;
  double* coef = nullptr;  // (Cb, 3) written for batch statistics
};
struct ReduceArgs {
  int num_branches = 0;
  ReduceBranch br[kMaxBranches];
  const double* partial = nullptr;
  int64_t max_chunks = 0;
  double* sums = nullptr;  // (total channels, 2)
};
cudaError_t launch_reduce_partials(DType dtype, const ReduceArgs& args, cudaStream_t stream);

// Batch-statistics branches: dconv = p[c] * dconv + q[c] * pre + r[c], in place.
struct NormGradBranch {
  View4 pre, dconv;
  int64_t channels = 0, h = 0, w = 0;
  const double* coef = nullptr;  // (Cb, 3): p, q, r
  int64_t block_begin = 0, blocks = 0;  // filled by the launcher
};
struct NormGradArgs {
  int64_t N = 0;
  bool channels_last = false;
  int num_branches = 0;
  NormGradBranch br[kMaxBranches];
};
cudaError_t launch_norm_grad(DType dtype, NormGradArgs args, cudaStream_t stream);

// dx written once: grad's x slice + every branch's adjoint down-resize of dz (the gradient wrt its level;
// for an identity branch dz is (N, C, H, W) and is added as it is). Gathers, in branch order, by a few blocks
// per multiprocessor, each walking many elements after tabulating the readers and taps once.
struct DxBranch {
  View4 dz;
  int64_t level_h = 0, level_w = 0, factor = 1;
  int down_h = 0, down_w = 0;
  int64_t weight_base = 0;  // set by launch_dx: this branch's taps in the shared tables
  int64_t sum_base = 0;  // set by launch_dx: this branch's level-row sums (values after sums_at)
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
  bool tables = false;  // set by launch_dx: the reader tables in shared memory (they fit)
  int64_t blocks = 0;  // set by launch_dx: the grid (its blocks walk the elements in a grid-stride loop)
  bool narrow = false;  // set by launch_dx: every element offset the kernel forms fits int
  int64_t tile_rows = 0;  // set by launch_dx: NCHW row tiles of this many rows (0: elements in memory order)
  int64_t sums_at = 0;  // set by launch_dx: the row tiles' level-row sums in shared memory (bytes)
  int64_t terms_at = 0, row_terms = 0;  // set by launch_dx: the row tiles' terms (bytes), most terms per row
};
cudaError_t launch_dx(DType dtype, const DxArgs& args, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------
// The projection (SPEC.md, "The projection"; shared host-side plan: csrc/projection.h)
// ---------------------------------------------------------------------------------------------------

// A per-tap branch's part of a k x k projection: T (N, k*k*P, h, w), channel tap * P + p, tap = ky * k + kx,
// read up-resized to (H, W) and shifted by the tap (zero outside the map).
struct ProjectTapBranch {
  View4 tmap;  // (N, k*k*P, h, w) in opmath (float for half / bfloat16: csrc/projection.h, tap_maps_dtype)
  int64_t h = 0, w = 0;
  int up_h = 0, up_w = 0;  // ResizeKind, level -> output
};

// The projection's pre-activation per output element (n, p, I, J), a tile of outputs per block: acc
// (conv(x, W_x); absent: 0) + bias[p] + every direct branch's full-size part + every per-tap branch's maps
// resized up and shifted; written to pre (if pre.data) rounded to the dtype, and act(alpha * pre + beta) to
// out (if out.data: the norm's coefficients known before the sum, no batch statistics). pre and out may
// alias acc: each thread reads its element before writing it. Blocks with more than kMaxBranches parts of
// either kind go in several launches: each one before the last writes its sum unrounded to partial (opmath)
// and nothing else, the next one reads it as carry in place of acc (so the sum is rounded once).
struct ProjectAccArgs {
  int64_t N = 0, P = 0, H = 0, W = 0, k = 1;
  View4 acc, pre, out;  // (N, P, H, W); acc.data / pre.data / out.data nullptr: absent
  View4 carry, partial;  // (N, P, H, W) in opmath; data nullptr: the first launch / the last launch
  const void* bias = nullptr;  // opmath per channel; nullptr: none
  const void* alpha = nullptr;  // opmath per channel; nullptr: 1
  const void* beta = nullptr;  // opmath per channel; nullptr: 0
  bool channels_last = false;  // the output's memory order
  bool align_corners = false;
  int activation = 0;  // msfused::Activation
  int num_taps = 0, num_direct = 0;
  ProjectTapBranch tap[kMaxBranches];
  View4 direct[kMaxBranches];  // (N, P, H, W)
  // Filled by the launcher: the output's tiles (one plane per NCHW tile); tables: the tap tables fit in
  // shared memory.
  OutputTiles tiles;
  bool tables = false;
};
cudaError_t launch_project_accumulate(DType dtype, const ProjectAccArgs& args, cudaStream_t stream);

// Backward: the adjoint of the accumulation's resize-and-shift for every per-tap branch, as a gather at
// the level: dT(n, tap * P + p, i, j) = sum over the output pixels (I, J) whose shifted up-resize reads
// (i, j) of its weight times dpre(n, p, I - dy, J - dx); one level element's readers split over `lanes`
// threads combined in a fixed tree (deterministic, no atomics).
struct ProjectAdjointBranch {
  View4 dt;  // (N, k*k*P, h, w) written, in opmath (as ProjectTapBranch::tmap)
  int64_t h = 0, w = 0;
  int up_h = 0, up_w = 0;
  int64_t lanes = 1, block_begin = 0;  // filled by the launcher
  int64_t table_h = 0, table_w = 0;  // filled by the launcher: readers per level row, column in the tables (0: none)
};
struct ProjectAdjointArgs {
  int64_t N = 0, P = 0, H = 0, W = 0, k = 1;
  View4 dpre;  // (N, P, H, W)
  bool channels_last = false;  // dt's memory order
  bool align_corners = false;
  int num_branches = 0;
  ProjectAdjointBranch br[kMaxBranches];
};
cudaError_t launch_project_adjoint(DType dtype, ProjectAdjointArgs args, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------
// The record-only mode (the launch plan: msfused/cuda_plan.py, `python -m msfused explain --backend cuda`)
// ---------------------------------------------------------------------------------------------------

// One group of alike blocks of a launch (x's copy, one branch): the cost model's figures, ESTIMATES from the
// launcher's own arithmetic (kernel_cost in multi_scale_kernels.cu), not measurements.
struct PlannedPart {
  std::string what;
  int64_t programs = 0;  // blocks
  int64_t lanes = 0;  // active threads of one block
  int64_t serial = 0;  // the longest serial loop of one thread (its nested loops' product), at most
  int64_t read = 0, written = 0;  // bytes, each distinct element once
};
struct PlannedLaunch {
  std::string kernel;
  int64_t grid = 0;  // blocks
  int threads = 0;  // per block
  size_t shared_bytes = 0;  // dynamic shared memory
  std::vector<PlannedPart> parts;
};
// While a recorder is installed on this thread, every launch_* function records what it would launch and
// returns cudaSuccess without launching (nothing is read or written: the binding runs on meta tensors), and
// the launchers' device query (the multiprocessor count) answers the recorder's `multiprocessors`.
struct LaunchRecorder {
  int64_t multiprocessors = 1;
  std::vector<PlannedLaunch> launches;
};
void set_launch_recorder(LaunchRecorder* recorder);  // nullptr: launch for real
LaunchRecorder* launch_recorder();

// Kernel arguments travel by value (the classic 4 KB parameter limit, with room to spare).
static_assert(sizeof(PoolArgs) <= 4096 && sizeof(LevelArgs) <= 4096 && sizeof(StatsArgs) <= 4096 &&
                  sizeof(MergeStatsArgs) <= 4096 && sizeof(EpilogueArgs) <= 4096 && sizeof(UpGradArgs) <= 4096 &&
                  sizeof(ReduceArgs) <= 4096 && sizeof(NormGradArgs) <= 4096 && sizeof(DxArgs) <= 4096 &&
                  sizeof(ProjectAccArgs) <= 4096 && sizeof(ProjectAdjointArgs) <= 4096,
              "kernel arguments too large");

}  // namespace cuda
}  // namespace msfused
