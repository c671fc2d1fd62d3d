// The torch binding of the CUDA kernels (backend 'cuda'): checks, output allocation, the per-channel
// parameter work (norm folding, gradient coefficients: tiny ATen ops), the deterministic ATen work of the
// backward on level-sized tensors, and the launches of multi_scale_kernels.cu under a device guard on
// the current stream, each checked. Registered for the CUDA key beside the CPU kernels.
//
// Layout: the outputs (out, level, pre, grad_x) are channels_last exactly when x.suggest_memory_format()
// is; the kernels address every tensor through its strides, so both formats run the same kernels.
#include <ATen/ATen.h>
#include <torch/library.h>
#ifndef MSFUSED_CUDA_EMULATION
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <array>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../block_config.h"
#include "multi_scale_kernels.h"
#ifdef MSFUSED_CUDA_EMULATION
#include "emulation.h"
#endif

namespace msfused {
namespace cuda {
namespace {

#ifndef MSFUSED_CUDA_EMULATION
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
const char* error_string(cudaError_t e) { return cudaGetErrorString(e); }
constexpr bool kEmulation = false;
#else
// tests/test_cuda_emulation.py: the kernels run on the CPU (csrc/cuda/emulation.h) over CPU tensors.
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
cudaStream_t current_stream() { return nullptr; }
const char* error_string(cudaError_t e) { return emu::error_string(e); }
constexpr bool kEmulation = true;
#endif

using at::Tensor;
using TensorVector = std::vector<Tensor>;
using ForwardResult = std::tuple<Tensor, TensorVector, TensorVector, TensorVector, TensorVector>;
using BackwardResult = ForwardResult;

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::Float;
    case at::kDouble: return DType::Double;
    case at::kHalf: return DType::Half;
    case at::kBFloat16: return DType::BFloat16;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "msfused (cuda): x must be float16, bfloat16, float32 or float64, got ", t);
  return DType::Float;  // unreachable
}

at::ScalarType opmath(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

View4 view(const Tensor& t) {
  View4 v;
  v.data = const_cast<void*>(t.const_data_ptr());
  for (int d = 0; d < 4; ++d) v.stride[d] = t.stride(d);
  return v;
}

void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "msfused (cuda): launching ", kernel, " failed: ", error_string(err));
}

// A fresh output; in the emulation build filled with NaN first, so that an element no kernel writes shows.
Tensor fresh(Tensor t) {
  if (kEmulation && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

bool present(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

void check_device(const Tensor& t, const Tensor& x, const char* name, size_t b) {
  TORCH_CHECK_VALUE(t.device() == x.device(), "msfused (cuda): ", name, "[", b, "] is on ", t.device(),
                    " but x is on ", x.device());
}

// The kernels compute block and table indices in 32 bits: every size must fit (element counts and
// offsets are 64-bit).
void check_sizes(const BlockPlan& plan) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(plan.N <= kMax && plan.C <= kMax && plan.H <= kMax && plan.W <= kMax && plan.out_channels <= kMax,
                    "msfused (cuda): every size of x and of the output must be below 2^31, got x of (", plan.N, ", ",
                    plan.C, ", ", plan.H, ", ", plan.W, ") and ", plan.out_channels, " output channels");
  for (size_t b = 0; b < plan.branches.size(); ++b) {
    const BranchPlan& bp = plan.branches[b];
    TORCH_CHECK_VALUE(bp.kernel_size <= kMaxKernelSize, "msfused (cuda): weight[", b, "] has kernel size ",
                      bp.kernel_size, "; the CUDA kernels take odd sizes up to ", kMaxKernelSize,
                      " (use backend 'reference' for larger ones)");
    TORCH_CHECK_VALUE(bp.level_h <= kMax && bp.level_w <= kMax, "msfused (cuda): branch ", b, " level of ", bp.level_h,
                      "x", bp.level_w, " is too large");
  }
}

// Branch b's epilogue y = alpha * conv + beta per channel, in opmath, on the device: the folded scale and
// shift, or with batch statistics scale * invstd and shift - mean * scale * invstd (as the CPU kernel, in
// double).
std::pair<Tensor, Tensor> epilogue_coefficients(const BranchPlan& bp, const std::optional<Tensor>& scale,
                                                const std::optional<Tensor>& shift, const Tensor& mean,
                                                const Tensor& var, const Tensor& x) {
  const int64_t Cb = bp.out_channels;
  const auto d = x.options().dtype(at::kDouble);
  const Tensor s = present(scale) ? scale->detach().to(d).reshape({Cb}) : at::ones({Cb}, d);
  const Tensor t = present(shift) ? shift->detach().to(d).reshape({Cb}) : at::zeros({Cb}, d);
  Tensor alpha = s, beta = t;
  if (bp.batch_stats) {
    const Tensor invstd = at::reciprocal(at::sqrt(var.to(d) + bp.eps));
    alpha = s * invstd;
    beta = t - mean.to(d) * s * invstd;
  }
  const auto op = x.options().dtype(opmath(x.scalar_type()));
  return {alpha.to(op).contiguous(), beta.to(op).contiguous()};
}

void check_tensors(const Tensor& x, at::TensorList weight, const OptionalTensorList& bias,
                   const OptionalTensorList& scale, const OptionalTensorList& shift) {
  TORCH_CHECK_VALUE(kEmulation || x.is_cuda(), "msfused (cuda): x must be a CUDA tensor, got one on ", x.device());
  dtype_of(x.scalar_type());
  for (size_t b = 0; b < weight.size(); ++b) {
    TORCH_CHECK_TYPE(weight[b].scalar_type() == x.scalar_type(), "msfused: weight[", b, "] has dtype ",
                     weight[b].scalar_type(), " but x has ", x.scalar_type());
    check_device(weight[b], x, "weight", b);
  }
  for (size_t b = 0; b < bias.size(); ++b) {
    const std::optional<Tensor> t = bias.get(b);
    if (!present(t)) continue;
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), "msfused: bias[", b, "] has dtype ", t->scalar_type(),
                     " but x has ", x.scalar_type());
    check_device(*t, x, "bias", b);
  }
  for (const auto* list : {&scale, &shift})
    for (size_t b = 0; b < list->size(); ++b) {
      const std::optional<Tensor> t = list->get(b);
      if (present(t)) check_device(*t, x, list == &scale ? "scale" : "shift", b);
    }
}

// What both directions start with once the arguments are checked: sizes the kernels can index, and x
// in its suggested memory format (the outputs' format).
struct Input {
  at::MemoryFormat fmt;
  bool channels_last;
  Tensor x;
};
Input prepare(const BlockPlan& plan, const Tensor& x_in) {
  check_sizes(plan);
  // Without channels the branches still have outputs (bias, norm shift, activation) and so gradients of
  // those, which this backward's shortcut for value-free inputs would zero: refused, not miscomputed.
  TORCH_CHECK_VALUE(plan.C >= 1 || plan.N == 0, "msfused (cuda): x has no channels (shape ", x_in.sizes(),
                    "); backend 'cuda' needs at least one (backends 'cpu' and 'reference' take it)");
  const auto fmt = x_in.suggest_memory_format();
  return {fmt, fmt == at::MemoryFormat::ChannelsLast, x_in.contiguous(fmt)};
}

// The fields the launches that read x and write out share (TileArgs, PoolArgs).
template <typename Args>
void set_block(Args& a, const BlockPlan& plan, const Tensor& x, const Tensor& out, int64_t x_offset, bool cl) {
  a.N = plan.N;
  a.C = plan.C;
  a.H = plan.H;
  a.W = plan.W;
  a.x = view(x);
  a.out = view(out);
  a.x_offset = x_offset;
  a.x_channels_last = cl;
}

// Groups of at most kMaxBranches consecutive indices of `items`: f(first, count).
template <typename F>
void in_groups(size_t count, F&& f) {
  for (size_t g0 = 0; g0 < count; g0 += kMaxBranches) f(g0, std::min<size_t>(kMaxBranches, count - g0));
}

// ---------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------
ForwardResult multi_scale_forward_cuda(const Tensor& x_in, at::TensorList weight, const OptionalTensorList& bias,
                                       const OptionalTensorList& scale, const OptionalTensorList& shift,
                                       const c10::List<bool>& batch_stats, c10::ArrayRef<double> eps,
                                       c10::IntArrayRef factor, c10::IntArrayRef bins, c10::string_view down_mode,
                                       c10::string_view up_mode, bool align_corners, c10::string_view activation,
                                       c10::string_view input_position) {
  const BlockPlan plan = make_plan(x_in, weight, batch_stats, eps, factor, bins, down_mode, up_mode, align_corners,
                                   activation, input_position);
  TORCH_CHECK_VALUE(bias.size() == weight.size() && scale.size() == weight.size() && shift.size() == weight.size(),
                    "msfused: bias, scale and shift need one entry (or None) per branch");
  check_tensors(x_in, weight, bias, scale, shift);
  const DeviceGuard device_guard(x_in.device());
  const cudaStream_t stream = current_stream();
  const Input input = prepare(plan, x_in);
  const at::MemoryFormat fmt = input.fmt;
  const bool cl = input.channels_last;
  const Tensor& x = input.x;
  const auto opts = x.options();
  const auto stat_opts = opts.dtype(stats_dtype(x.scalar_type()));
  const DType dt = dtype_of(x.scalar_type());
  const size_t B = plan.branches.size();

  Tensor out = fresh(at::empty({plan.N, plan.out_channels, plan.H, plan.W}, opts.memory_format(fmt)));
  TensorVector level(B), pre(B), mean(B), var(B);
  for (size_t b = 0; b < B; ++b) {
    const BranchPlan& bp = plan.branches[b];
    level[b] = bp.identity ? at::empty({0}, opts)
                           : fresh(at::empty({plan.N, plan.C, bp.level_h, bp.level_w}, opts.memory_format(fmt)));
    pre[b] = fresh(at::empty({plan.N, bp.out_channels, bp.level_h, bp.level_w}, opts.memory_format(fmt)));
    mean[b] = fresh(at::empty({bp.batch_stats ? bp.out_channels : 0}, stat_opts));
    var[b] = fresh(at::empty({bp.batch_stats ? bp.out_channels : 0}, stat_opts));
  }
  if (plan.N == 0) {  // nothing to compute; the statistics of no values are NaN, as var_mean's
    for (size_t b = 0; b < B; ++b)
      if (plan.branches[b].batch_stats) {
        mean[b].fill_(std::numeric_limits<double>::quiet_NaN());
        var[b].fill_(std::numeric_limits<double>::quiet_NaN());
      }
    return {out, level, pre, mean, var};
  }
  TORCH_CHECK_VALUE(plan.H > 0 && plan.W > 0, "msfused (cuda): x has an empty map (", plan.H, "x", plan.W,
                    "); pooling and resizing need at least one pixel");

  // Parameters as the kernels read them (kept alive until the launches are queued; the caching
  // allocator orders their reuse on this stream); per-(channel, tile) partial statistics.
  TensorVector w(B), bs(B), alpha(B), beta(B), stats_partial(B);
  for (size_t b = 0; b < B; ++b) {
    w[b] = weight[b].contiguous();
    const std::optional<Tensor> bb = bias.get(b);
    if (present(bb)) bs[b] = bb->contiguous();
  }
  auto fold = [&](size_t b) {
    std::tie(alpha[b], beta[b]) = epilogue_coefficients(plan.branches[b], scale.get(b), shift.get(b), mean[b], var[b], x);
  };

  // Launch 1 for bins: pool every bins branch whose tables fit in shared memory, from one read of x.
  std::vector<bool> pooled(B, false);
  std::vector<size_t> bins_branches;
  for (size_t b = 0; b < B; ++b)
    if (plan.branches[b].factor == 0) bins_branches.push_back(b);
  bool copied = false;
  {
    std::vector<std::vector<size_t>> groups;
    std::vector<size_t> current;
    auto fits = [&](const std::vector<size_t>& members) {
      PoolArgs a;
      a.H = plan.H;
      a.x_channels_last = cl;
      a.num_branches = static_cast<int>(members.size());
      for (size_t i = 0; i < members.size(); ++i) {
        a.br[i].level_h = plan.branches[members[i]].level_h;
        a.br[i].level_w = plan.branches[members[i]].level_w;
      }
      return pool_shared_bytes(dt, &a) <= pool_shared_limit();
    };
    for (size_t b : bins_branches) {
      std::vector<size_t> trial = current;
      trial.push_back(b);
      if (trial.size() <= static_cast<size_t>(kMaxBranches) && fits(trial)) {
        current = trial;
      } else if (fits({b})) {
        groups.push_back(current);
        current = {b};
      }  // else: too large for the pooling kernel's shared memory; the tile kernel samples it from x
    }
    if (!current.empty()) groups.push_back(current);
    for (const auto& members : groups) {
      if (members.empty()) continue;
      PoolArgs a;
      set_block(a, plan, x, out, copied ? -1 : plan.x_offset, cl);
      a.num_branches = static_cast<int>(members.size());
      for (size_t i = 0; i < members.size(); ++i) {
        const size_t b = members[i];
        a.br[i].level = view(level[b]);
        a.br[i].level_h = plan.branches[b].level_h;
        a.br[i].level_w = plan.branches[b].level_w;
        pooled[b] = true;
      }
      check_launch(launch_pool_levels(dt, a, stream), "pool_levels");
      copied = true;
    }
  }

  auto tile_args = [&](size_t g0, size_t count, bool copy) {
    TileArgs a;
    set_block(a, plan, x, out, copy ? plan.x_offset : -1, cl);
    a.align_corners = plan.align_corners;
    a.activation = static_cast<int>(plan.activation);
    a.num_branches = static_cast<int>(count);
    for (size_t i = 0; i < count; ++i) {
      const size_t b = g0 + i;
      const BranchPlan& bp = plan.branches[b];
      TileBranch& t = a.br[i];
      if (bp.identity || pooled[b]) {  // the level is x itself, or was pooled by launch 1
        t.src = view(bp.identity ? x : level[b]);
        t.src_h = bp.level_h;
        t.src_w = bp.level_w;
        t.down_h = t.down_w = static_cast<int>(ResizeKind::Identity);
      } else {  // sampled from x in the tile kernel, which also writes the level
        t.src = view(x);
        t.src_h = plan.H;
        t.src_w = plan.W;
        t.down_h = static_cast<int>(bp.down_h);
        t.down_w = static_cast<int>(bp.down_w);
        t.level_out = view(level[b]);
      }
      t.up_h = static_cast<int>(bp.up_h);
      t.up_w = static_cast<int>(bp.up_w);
      t.factor = bp.factor > 0 ? bp.factor : 1;
      t.level_h = bp.level_h;
      t.level_w = bp.level_w;
      t.weight = w[b].const_data_ptr();
      t.bias = bs[b].defined() ? bs[b].const_data_ptr() : nullptr;
      t.alpha = alpha[b].defined() ? alpha[b].const_data_ptr() : nullptr;
      t.beta = beta[b].defined() ? beta[b].const_data_ptr() : nullptr;
      t.pre = view(pre[b]);
      t.stats_partial = stats_partial[b].defined() ? stats_partial[b].data_ptr<double>() : nullptr;
      t.out_channels = bp.out_channels;
      t.kernel_size = bp.kernel_size;
      t.channel_offset = bp.channel_offset;
    }
    return a;
  };

  bool any_stats = false;
  for (const BranchPlan& bp : plan.branches) any_stats = any_stats || bp.batch_stats;
  if (!any_stats) {
    for (size_t b = 0; b < B; ++b) fold(b);
    in_groups(B, [&](size_t g0, size_t count) {
      check_launch(launch_tile_forward(dt, TileMode::ConvEpilogue, tile_args(g0, count, !copied), stream),
                   "tile_forward (conv + epilogue)");
      copied = true;
    });
  } else {
    std::vector<size_t> stat_branches;
    for (size_t b = 0; b < B; ++b) {
      const BranchPlan& bp = plan.branches[b];
      if (!bp.batch_stats) continue;
      stat_branches.push_back(b);
      const int64_t partials = plan.N * tiles_per_image(bp.level_h, bp.level_w);
      stats_partial[b] = fresh(at::empty({bp.out_channels * partials * 3}, x.options().dtype(at::kDouble)));
    }
    in_groups(B, [&](size_t g0, size_t count) {
      check_launch(launch_tile_forward(dt, TileMode::ConvOnly, tile_args(g0, count, !copied), stream),
                   "tile_forward (conv + partial statistics)");
      copied = true;
    });
    in_groups(stat_branches.size(), [&](size_t g0, size_t count) {
      MergeStatsArgs a;
      a.num_branches = static_cast<int>(count);
      for (size_t i = 0; i < count; ++i) {
        const size_t b = stat_branches[g0 + i];
        const BranchPlan& bp = plan.branches[b];
        a.br[i].partial = stats_partial[b].const_data_ptr<double>();
        a.br[i].channels = bp.out_channels;
        a.br[i].partials_per_channel = plan.N * tiles_per_image(bp.level_h, bp.level_w);
        a.br[i].mean = mean[b].data_ptr();
        a.br[i].var = var[b].data_ptr();
      }
      check_launch(launch_merge_stats(dt, a, stream), "merge_stats");
    });
    for (size_t b = 0; b < B; ++b) fold(b);
    in_groups(B, [&](size_t g0, size_t count) {
      check_launch(launch_tile_forward(dt, TileMode::EpilogueOnly, tile_args(g0, count, false), stream),
                   "tile_forward (epilogue)");
    });
  }
  return {out, level, pre, mean, var};
}

// ---------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------

// dL/dweight = sum over n and pixels of dconv (Cb, pixel) x im2col(z) (pixel, C k k): GEMMs in opmath,
// in chunks of the batch (bounded im2col memory), accumulated in a fixed order. cuBLAS GEMMs are
// deterministic run to run; ATen's im2col is a gather.
// Under torch.use_deterministic_algorithms, ATen refuses cuBLAS unless CUBLAS_WORKSPACE_CONFIG is set
// (with several streams cuBLAS's workspace can change its reduction order); the weight gradient is
// then ATen's convolution backward, for which cuDNN picks a deterministic algorithm in that mode.
Tensor conv_grad_weight(const Tensor& dconv, const Tensor& z, const Tensor& weight, int64_t k) {
  const int64_t pad = k / 2;
  if (at::globalContext().deterministicAlgorithms()) {
    const Tensor gw = std::get<1>(at::convolution_backward(
        dconv, z.to(dconv.scalar_type()), weight.to(dconv.scalar_type()), std::nullopt, {1, 1}, {pad, pad},
        {1, 1}, false, {0, 0}, 1, {false, true, false}));
    return gw.to(weight.scalar_type()).contiguous(weight.suggest_memory_format());
  }
  const int64_t N = z.size(0), C = z.size(1), Cb = dconv.size(1), L = dconv.size(2) * dconv.size(3);
  const int64_t Ckk = C * k * k;
  const auto acc = dconv.options().dtype(opmath(dconv.scalar_type()));
  Tensor gw = at::zeros({Cb, Ckk}, acc);
  const int64_t per_n = std::max<int64_t>(1, Ckk * L);
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(N, (int64_t{1} << 28) / per_n));
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t nn = std::min(chunk, N - n0);
    const Tensor zc = z.narrow(0, n0, nn).contiguous();
    const Tensor cols = k == 1 ? zc.reshape({nn, C, L}) : at::im2col(zc, {k, k}, {1, 1}, {pad, pad}, {1, 1});
    const Tensor d = dconv.narrow(0, n0, nn).contiguous().reshape({nn, Cb, L});
    gw.addmm_(d.permute({1, 0, 2}).reshape({Cb, nn * L}).to(acc),
              cols.permute({0, 2, 1}).reshape({nn * L, Ckk}).to(acc));
  }
  return gw.reshape(weight.sizes()).to(weight.scalar_type()).contiguous(weight.suggest_memory_format());
}

BackwardResult multi_scale_backward_cuda(const Tensor& grad_in, const Tensor& x_in, at::TensorList weight,
                                         const OptionalTensorList& scale, const OptionalTensorList& shift,
                                         at::TensorList level, at::TensorList pre, at::TensorList mean,
                                         at::TensorList var, const c10::List<bool>& batch_stats,
                                         c10::ArrayRef<double> eps, c10::IntArrayRef factor, c10::IntArrayRef bins,
                                         c10::string_view down_mode, c10::string_view up_mode, bool align_corners,
                                         c10::string_view activation, c10::string_view input_position,
                                         std::array<bool, 2> output_mask) {
  const BlockPlan plan = make_plan(x_in, weight, batch_stats, eps, factor, bins, down_mode, up_mode, align_corners,
                                   activation, input_position);
  const size_t B = plan.branches.size();
  check_backward_args(plan, grad_in, level, pre, mean, var, scale, shift);
  check_tensors(x_in, weight, OptionalTensorList(), scale, shift);
  TORCH_CHECK_VALUE(grad_in.device() == x_in.device(), "msfused (cuda): grad_out is on ", grad_in.device(),
                    " but x is on ", x_in.device());
  for (size_t b = 0; b < B; ++b) {
    check_device(pre[b], x_in, "pre", b);
    if (!plan.branches[b].identity) check_device(level[b], x_in, "level", b);
  }
  const DeviceGuard device_guard(x_in.device());
  const cudaStream_t stream = current_stream();
  const Input input = prepare(plan, x_in);
  const at::MemoryFormat fmt = input.fmt;
  const bool cl = input.channels_last;
  const Tensor& x = input.x;
  const Tensor grad = grad_in.to(x.scalar_type()).contiguous(fmt);
  const auto opts = x.options();
  const DType dt = dtype_of(x.scalar_type());
  TensorVector grad_weight(B), grad_bias(B), grad_scale(B), grad_shift(B), dz(B);
  auto param_opts = [&](const std::optional<Tensor>& t) { return opts.dtype(t->scalar_type()); };

  if (x.numel() == 0 || grad.numel() == 0) {  // no values: every gradient is zero
    for (size_t b = 0; b < B; ++b) {
      const int64_t Cb = plan.branches[b].out_channels;
      const std::optional<Tensor> sc = scale.get(b), sh = shift.get(b);
      grad_weight[b] = output_mask[1] ? at::zeros_like(weight[b]) : at::empty({0}, opts);
      grad_bias[b] = at::zeros({Cb}, opts);
      grad_scale[b] = present(sc) ? at::zeros({Cb}, param_opts(sc)) : at::empty({0}, opts);
      grad_shift[b] = present(sh) ? at::zeros({Cb}, param_opts(sh)) : at::empty({0}, opts);
    }
    Tensor grad_x = output_mask[0] ? at::zeros({plan.N, plan.C, plan.H, plan.W}, opts.memory_format(fmt))
                                   : at::empty({0}, opts);
    return {grad_x, grad_weight, grad_bias, grad_scale, grad_shift};
  }

  // Pass 1: upsample adjoint + activation (and, in eval mode, the folded norm's) backward, per-channel sums.
  TensorVector pre_b(B), dconv(B), alpha(B), beta(B), pre_scale(B), center(B);
  std::vector<int64_t> channel_base(B);
  int64_t total_channels = 0;
  const auto dopts = opts.dtype(at::kDouble);
  for (size_t b = 0; b < B; ++b) {
    const BranchPlan& bp = plan.branches[b];
    pre_b[b] = pre[b].to(x.scalar_type()).contiguous(fmt);
    dconv[b] = fresh(at::empty_like(pre_b[b]));
    std::tie(alpha[b], beta[b]) = epilogue_coefficients(bp, scale.get(b), shift.get(b), mean[b], var[b], x);
    const std::optional<Tensor> sc = scale.get(b);
    if (bp.batch_stats) {
      pre_scale[b] = at::ones({bp.out_channels}, dopts);
      center[b] = mean[b].to(dopts).contiguous();
    } else {
      pre_scale[b] = present(sc) ? sc->detach().to(dopts).reshape({bp.out_channels}).contiguous()
                                 : at::ones({bp.out_channels}, dopts);
      center[b] = at::zeros({bp.out_channels}, dopts);
    }
    channel_base[b] = total_channels;
    total_channels += bp.out_channels;
  }
  const int64_t max_chunks = up_grad_max_chunks();
  const Tensor partial = at::zeros({total_channels * max_chunks * 2}, dopts);
  const Tensor sums = at::empty({total_channels, 2}, dopts);
  in_groups(B, [&](size_t g0, size_t count) {
    UpGradArgs a;
    a.N = plan.N;
    a.H = plan.H;
    a.W = plan.W;
    a.grad = view(grad);
    a.align_corners = plan.align_corners;
    a.activation = static_cast<int>(plan.activation);
    a.num_branches = static_cast<int>(count);
    a.partial = partial.data_ptr<double>();
    a.max_chunks = max_chunks;
    for (size_t i = 0; i < count; ++i) {
      const size_t b = g0 + i;
      const BranchPlan& bp = plan.branches[b];
      UpGradBranch& u = a.br[i];
      u.pre = view(pre_b[b]);
      u.dconv = view(dconv[b]);
      u.channels = bp.out_channels;
      u.h = bp.level_h;
      u.w = bp.level_w;
      u.channel_offset = bp.channel_offset;
      u.up_h = static_cast<int>(bp.up_h);
      u.up_w = static_cast<int>(bp.up_w);
      u.alpha = alpha[b].const_data_ptr();
      u.beta = beta[b].const_data_ptr();
      u.pre_scale = pre_scale[b].const_data_ptr<double>();
      u.center = center[b].const_data_ptr<double>();
      u.channel_base = channel_base[b];
    }
    check_launch(launch_up_grad(dt, a, stream), "up_grad");
  });
  check_launch(launch_reduce_partials(partial.const_data_ptr<double>(), total_channels, max_chunks,
                                      sums.data_ptr<double>(), stream),
               "reduce_partials");

  // Per-channel parameter gradients and the batch-statistics coefficients (Cb-sized, in double).
  TensorVector coef_p(B), coef_q(B), coef_r(B);
  std::vector<size_t> stat_branches;
  for (size_t b = 0; b < B; ++b) {
    const BranchPlan& bp = plan.branches[b];
    const int64_t Cb = bp.out_channels;
    const Tensor sum_dy = sums.select(1, 0).narrow(0, channel_base[b], Cb);
    const Tensor sum_dyc = sums.select(1, 1).narrow(0, channel_base[b], Cb);
    const std::optional<Tensor> sc = scale.get(b), sh = shift.get(b);
    Tensor d_scale = sum_dyc;
    if (bp.batch_stats) {
      const Tensor s = present(sc) ? sc->detach().to(dopts).reshape({Cb}) : at::ones({Cb}, dopts);
      const Tensor invstd = at::reciprocal(at::sqrt(var[b].to(dopts) + bp.eps));
      const double M = static_cast<double>(plan.N * bp.level_h * bp.level_w);
      d_scale = sum_dyc * invstd;  // sum(dY * xhat)
      // dconv = scale * invstd * (dY - mean(dY) - xhat * mean(dY * xhat)) = p * dY + q * conv + r
      coef_p[b] = (s * invstd).contiguous();
      coef_q[b] = (-coef_p[b] * invstd * d_scale / M).contiguous();
      coef_r[b] = (-coef_p[b] * sum_dy / M - coef_q[b] * center[b]).contiguous();
      stat_branches.push_back(b);
    }
    grad_scale[b] = present(sc) ? d_scale.to(param_opts(sc)) : at::empty({0}, opts);
    grad_shift[b] = present(sh) ? sum_dy.to(param_opts(sh)) : at::empty({0}, opts);
  }
  in_groups(stat_branches.size(), [&](size_t g0, size_t count) {
    NormGradArgs a;
    a.N = plan.N;
    a.num_branches = static_cast<int>(count);
    for (size_t i = 0; i < count; ++i) {
      const size_t b = stat_branches[g0 + i];
      const BranchPlan& bp = plan.branches[b];
      NormGradBranch& nb = a.br[i];
      nb.pre = view(pre_b[b]);
      nb.dconv = view(dconv[b]);
      nb.channels = bp.out_channels;
      nb.h = bp.level_h;
      nb.w = bp.level_w;
      nb.p = coef_p[b].const_data_ptr<double>();
      nb.q = coef_q[b].const_data_ptr<double>();
      nb.r = coef_r[b].const_data_ptr<double>();
    }
    check_launch(launch_norm_grad(dt, a, stream), "norm_grad");
  });

  // The convolution's backward on the level, with deterministic ATen ops: grad bias (a reduction), grad
  // weight (im2col + GEMM), grad of the level (a forward convolution with the flipped, transposed kernel).
  for (size_t b = 0; b < B; ++b) {
    const BranchPlan& bp = plan.branches[b];
    const int64_t pad = bp.kernel_size / 2;
    const Tensor z = bp.identity ? x : level[b].to(x.scalar_type()).contiguous(fmt);
    grad_bias[b] = dconv[b].sum({0, 2, 3}, false, opmath(x.scalar_type())).to(x.scalar_type());
    grad_weight[b] =
        output_mask[1] ? conv_grad_weight(dconv[b], z, weight[b], bp.kernel_size) : at::empty({0}, opts);
    if (output_mask[0]) {
      const Tensor wt = weight[b].flip({2, 3}).transpose(0, 1);
      dz[b] = at::conv2d(dconv[b], wt, std::nullopt, {1, 1}, {pad, pad}).contiguous(fmt);
    }
  }

  // dx, written once: x's slice of grad plus every branch's down-resize adjoint.
  Tensor grad_x = at::empty({0}, opts);
  if (output_mask[0]) {
    grad_x = fresh(at::empty({plan.N, plan.C, plan.H, plan.W}, opts.memory_format(fmt)));
    in_groups(B, [&](size_t g0, size_t count) {
      DxArgs a;
      a.N = plan.N;
      a.C = plan.C;
      a.H = plan.H;
      a.W = plan.W;
      a.grad = view(grad);
      a.dx = view(grad_x);
      a.x_offset = g0 == 0 ? plan.x_offset : -1;
      a.channels_last = cl;
      a.align_corners = plan.align_corners;
      a.num_branches = static_cast<int>(count);
      a.accumulate = g0 > 0;
      for (size_t i = 0; i < count; ++i) {
        const size_t b = g0 + i;
        const BranchPlan& bp = plan.branches[b];
        a.br[i].dz = view(dz[b]);
        a.br[i].level_h = bp.level_h;
        a.br[i].level_w = bp.level_w;
        a.br[i].factor = bp.factor > 0 ? bp.factor : 1;
        a.br[i].down_h = static_cast<int>(bp.down_h);
        a.br[i].down_w = static_cast<int>(bp.down_w);
      }
      check_launch(launch_dx(dt, a, stream), "dx");
    });
  }
  return {grad_x, grad_weight, grad_bias, grad_scale, grad_shift};
}

}  // namespace
}  // namespace cuda

#ifndef MSFUSED_CUDA_EMULATION
TORCH_LIBRARY_IMPL(msfused, CUDA, m) {
  m.impl("multi_scale_forward", &cuda::multi_scale_forward_cuda);
  m.impl("multi_scale_backward", &cuda::multi_scale_backward_cuda);
}
#else
// The emulation build: the same functions as operators of their own (schemas inferred), over CPU tensors.
TORCH_LIBRARY(msfused_cuda_emulation, m) {
  m.def("multi_scale_forward", &cuda::multi_scale_forward_cuda);
  m.def("multi_scale_backward", &cuda::multi_scale_backward_cuda);
}
#endif

}  // namespace msfused
