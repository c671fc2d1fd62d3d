// The torch binding of the CUDA kernels (backend 'cuda'): checks, output allocation, the convolutions
// through ATen (cuDNN, with deterministic algorithms), and the launches of multi_scale_kernels.cu (the
// memory passes, the norm arithmetic included) under a device guard on the current stream, each checked.
// The same structure as the CPU backend (csrc/cpu/). Registered for the CUDA key.
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
#include <cstddef>
#include <array>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../block_config.h"
#include "../projection.h"
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

// A tensor's data for the kernels. A meta tensor's (the record-only mode: the launch plan, nothing is read
// or written) is a non-null placeholder, so that the launchers and their cost models see it present.
template <typename T = void>
T* data_of(const Tensor& t) {
  if (t.is_meta()) return reinterpret_cast<T*>(alignof(std::max_align_t));
  return static_cast<T*>(const_cast<void*>(t.const_data_ptr()));
}

// A tensor as the kernels address it; an undefined tensor as a null pointer (absent).
View4 view(const Tensor& t) {
  View4 v;
  if (!t.defined()) return v;
  v.data = data_of(t);
  for (int d = 0; d < 4; ++d) v.stride[d] = t.stride(d);
  return v;
}

void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "msfused (cuda): launching ", kernel, " failed: ", error_string(err));
}

// A fresh output; in the emulation build filled with NaN first, so that an element no kernel writes shows
// (not a meta tensor's: the launch plan records the GPU build's ATen ops).
Tensor fresh(Tensor t) {
  if (kEmulation && t.numel() > 0 && !t.is_meta()) t.fill_(std::numeric_limits<double>::quiet_NaN());
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
    TORCH_CHECK_VALUE(bp.level_h <= kMax && bp.level_w <= kMax, "msfused (cuda): branch ", b, " level of ", bp.level_h,
                      "x", bp.level_w, " is too large");
  }
}

void check_tensors(const Tensor& x, at::TensorList weight, const OptionalTensorList& bias,
                   const OptionalTensorList& scale, const OptionalTensorList& shift) {
  TORCH_CHECK_VALUE(kEmulation || x.is_cuda(), "msfused (cuda): x must be a CUDA tensor, got one on ", x.device());
  check_parameters(x, weight, bias, scale, shift);
  dtype_of(x.scalar_type());
}

// A per-channel parameter (scale, shift, mean, var) as the kernels read it: contiguous, in opmath (a no-op
// for one that already is); an undefined tensor where it is absent.
Tensor per_channel(const std::optional<Tensor>& t, const Tensor& x) {
  if (!present(t)) return Tensor();
  return t->detach().reshape({-1}).to(opmath(x.scalar_type())).contiguous();
}
const void* ptr(const Tensor& t) { return t.defined() ? data_of(t) : nullptr; }

// ATen's convolutions run inside this scope: cuDNN is asked for deterministic algorithms (ATen reads the
// flag per call), whatever torch.backends.cudnn.deterministic says, so that gradients are bit-identical run
// to run also with benchmark on; TF32 and benchmarking follow the user's flags. The flag is global: the
// mutex keeps concurrent msfused calls from restoring it under each other.
class DeterministicConvolutions {
 public:
  DeterministicConvolutions() : lock_(mutex()), saved_(at::globalContext().deterministicCuDNN()) {
    at::globalContext().setDeterministicCuDNN(true);
  }
  ~DeterministicConvolutions() { at::globalContext().setDeterministicCuDNN(saved_); }
  DeterministicConvolutions(const DeterministicConvolutions&) = delete;
  DeterministicConvolutions& operator=(const DeterministicConvolutions&) = delete;

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  std::lock_guard<std::mutex> lock_;
  bool saved_;
};

// ATen's convolution (cuDNN on a GPU): stride 1, no dilation, no groups; and its backward.
Tensor convolution(const Tensor& in, const Tensor& weight, const std::optional<Tensor>& bias, int64_t pad) {
  return at::convolution(in, weight, bias, {1, 1}, {pad, pad}, {1, 1}, false, {0, 0}, 1);
}

std::tuple<Tensor, Tensor, Tensor> convolution_backward(const Tensor& grad, const Tensor& in, const Tensor& weight,
                                                        c10::OptionalArrayRef<int64_t> bias_sizes, int64_t pad,
                                                        std::array<bool, 3> mask) {
  return at::convolution_backward(grad, in, weight, bias_sizes, {1, 1}, {pad, pad}, {1, 1}, false, {0, 0}, 1, mask);
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

// The fields the launches that read x and write out share (LevelArgs, PoolArgs).
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

// The fields of a branch's level-sized map that the epilogue and up_grad launches share.
template <typename Branch>
void set_level_map(Branch& m, const BranchPlan& bp, const Tensor& pre) {
  m.pre = view(pre);
  m.channels = bp.out_channels;
  m.h = bp.level_h;
  m.w = bp.level_w;
  m.channel_offset = bp.channel_offset;
  m.up_h = static_cast<int>(bp.up_h);
  m.up_w = static_cast<int>(bp.up_w);
}

// Groups of at most kMaxBranches consecutive indices of `items`: f(first, count).
template <typename F>
void in_groups(size_t count, F&& f) {
  for (size_t g0 = 0; g0 < count; g0 += kMaxBranches) f(g0, std::min<size_t>(kMaxBranches, count - g0));
}

// ---------------------------------------------------------------------------------------------------
// The passes both operators (the block, and the block with its projection) run
// ---------------------------------------------------------------------------------------------------
at::MemoryFormat format_of(bool cl) { return cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous; }

// The per-branch results both forwards return, allocated: the levels (empty for x itself), the batch mean
// and var (empty without batch statistics); pre is left to the convolutions. Without values (N == 0): pre
// empty too, and the statistics of no values NaN, as var_mean's.
struct BranchResults {
  TensorVector level, pre, mean, var;
};
BranchResults branch_results(const BlockPlan& plan, const Tensor& x, at::MemoryFormat fmt) {
  const size_t B = plan.branches.size();
  const auto opts = x.options();
  const auto stat_opts = opts.dtype(stats_dtype(x.scalar_type()));
  BranchResults r{TensorVector(B), TensorVector(B), TensorVector(B), TensorVector(B)};
  for (size_t b = 0; b < B; ++b) {
    const BranchPlan& bp = plan.branches[b];
    r.level[b] = bp.identity ? at::empty({0}, opts)
                             : fresh(at::empty({plan.N, plan.C, bp.level_h, bp.level_w}, opts.memory_format(fmt)));
    r.mean[b] = fresh(at::empty({bp.batch_stats ? bp.out_channels : 0}, stat_opts));
    r.var[b] = fresh(at::empty({bp.batch_stats ? bp.out_channels : 0}, stat_opts));
    if (plan.N == 0) {
      r.pre[b] = at::empty({0, bp.out_channels, bp.level_h, bp.level_w}, opts.memory_format(fmt));
      r.mean[b].fill_(std::numeric_limits<double>::quiet_NaN());
      r.var[b].fill_(std::numeric_limits<double>::quiet_NaN());
    }
  }
  return r;
}

// Every level from x (level[b] for each branch that is not x itself), and x's slice of out where
// plan.x_offset >= 0: the bins branches from one read of x where the pooling kernel's tables fit its
// shared memory and its grid fills the GPU; the others as gathers.
void compute_levels(const BlockPlan& plan, const Tensor& x, const Tensor& out, const TensorVector& level, bool cl,
                    DType dt, cudaStream_t stream) {
  const size_t B = plan.branches.size();
  std::vector<bool> pooled(B, false);
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
    for (size_t b = 0; b < B; ++b) {
      if (plan.branches[b].factor != 0 || !pool_fills_device(plan.N, plan.C, cl)) continue;
      std::vector<size_t> trial = current;
      trial.push_back(b);
      if (trial.size() <= static_cast<size_t>(kMaxBranches) && fits(trial)) {
        current = trial;
      } else if (fits({b})) {
        groups.push_back(current);
        current = {b};
      }  // else: too large for the pooling kernel's shared memory (many bins: small windows): a gather
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
  std::vector<size_t> gathered;
  for (size_t b = 0; b < B; ++b)
    if (!plan.branches[b].identity && !pooled[b]) gathered.push_back(b);
  auto level_launch = [&](size_t g0, size_t count) {
    LevelArgs a;
    set_block(a, plan, x, out, copied ? -1 : plan.x_offset, cl);
    a.align_corners = plan.align_corners;
    a.num_branches = static_cast<int>(count);
    for (size_t i = 0; i < count; ++i) {
      const BranchPlan& bp = plan.branches[gathered[g0 + i]];
      LevelBranch& l = a.br[i];
      l.level = view(level[gathered[g0 + i]]);
      l.level_h = bp.level_h;
      l.level_w = bp.level_w;
      l.factor = bp.factor > 0 ? bp.factor : 1;
      l.down_h = static_cast<int>(bp.down_h);
      l.down_w = static_cast<int>(bp.down_w);
    }
    check_launch(launch_levels(dt, a, stream), "levels");
    copied = true;
  };
  in_groups(gathered.size(), level_launch);
  if (!copied && plan.x_offset >= 0) level_launch(0, 0);  // only factor-1 branches: the copy alone
}

// The epilogue's per-channel alpha, beta of every branch of plan (opmath; undefined where 1 and 0): the
// folded scale and shift, or with batch statistics those of pre, written into mean[b], var[b] ((channel,
// chunk) partials merged per channel in chunk order), and the coefficients from them.
std::pair<TensorVector, TensorVector> norm_coefficients(const BlockPlan& plan, const TensorVector& pre,
                                                        const OptionalTensorList& scale,
                                                        const OptionalTensorList& shift, const TensorVector& mean,
                                                        const TensorVector& var, const Tensor& x, DType dt,
                                                        cudaStream_t stream) {
  const size_t B = plan.branches.size();
  const auto opts = x.options();
  const auto stat_opts = opts.dtype(stats_dtype(x.scalar_type()));
  TensorVector alpha(B), beta(B);
  std::vector<size_t> stat_branches;
  for (size_t b = 0; b < B; ++b) {
    if (plan.branches[b].batch_stats) {
      stat_branches.push_back(b);
    } else {
      alpha[b] = per_channel(scale.get(b), x);
      beta[b] = per_channel(shift.get(b), x);
    }
  }
  if (!stat_branches.empty()) {
    const int64_t max_chunks = max_reduction_chunks();
    int64_t total = 0;
    std::vector<int64_t> channel_base(B, 0);
    for (size_t b : stat_branches) {
      channel_base[b] = total;
      total += plan.branches[b].out_channels;
    }
    const Tensor partial = at::empty({total * max_chunks * 3}, opts.dtype(at::kDouble));
    TensorVector sc(B), sh(B);
    in_groups(stat_branches.size(), [&](size_t g0, size_t count) {
      StatsArgs s;
      s.N = plan.N;
      s.num_branches = static_cast<int>(count);
      s.partial = data_of<double>(partial);
      s.max_chunks = max_chunks;
      MergeStatsArgs m;
      m.num_branches = static_cast<int>(count);
      m.partial = data_of<double>(partial);
      m.max_chunks = max_chunks;
      for (size_t i = 0; i < count; ++i) {
        const size_t b = stat_branches[g0 + i];
        const BranchPlan& bp = plan.branches[b];
        s.br[i].pre = view(pre[b]);
        s.br[i].channels = bp.out_channels;
        s.br[i].h = bp.level_h;
        s.br[i].w = bp.level_w;
        s.br[i].channel_base = channel_base[b];
        sc[b] = per_channel(scale.get(b), x);
        sh[b] = per_channel(shift.get(b), x);
        alpha[b] = at::empty({bp.out_channels}, stat_opts);
        beta[b] = at::empty({bp.out_channels}, stat_opts);
        MergeStatsBranch& mb = m.br[i];
        mb.channels = bp.out_channels;
        mb.channel_base = channel_base[b];
        mb.eps = bp.eps;
        mb.scale = ptr(sc[b]);
        mb.shift = ptr(sh[b]);
        mb.mean = data_of(mean[b]);
        mb.var = data_of(var[b]);
        mb.alpha = data_of(alpha[b]);
        mb.beta = data_of(beta[b]);
      }
      check_launch(launch_stats_partial(dt, &s, stream), "stats_partial");
      for (size_t i = 0; i < count; ++i) m.br[i].chunks = s.br[i].chunks;
      check_launch(launch_merge_stats(dt, m, stream), "merge_stats");
    });
  }
  return {alpha, beta};
}

// Norm, activation and the resize back up, every branch of plan into its channel slice of out.
void launch_epilogue(const BlockPlan& plan, const Tensor& out, const TensorVector& pre, const TensorVector& alpha,
                     const TensorVector& beta, bool cl, DType dt, cudaStream_t stream) {
  in_groups(plan.branches.size(), [&](size_t g0, size_t count) {
    EpilogueArgs a;
    a.N = plan.N;
    a.H = plan.H;
    a.W = plan.W;
    a.out = view(out);
    a.channels_last = cl;
    a.align_corners = plan.align_corners;
    a.activation = static_cast<int>(plan.activation);
    a.num_branches = static_cast<int>(count);
    for (size_t i = 0; i < count; ++i) {
      const size_t b = g0 + i;
      const BranchPlan& bp = plan.branches[b];
      EpilogueBranch& e = a.br[i];
      set_level_map(e, bp, pre[b]);
      e.alpha = ptr(alpha[b]);
      e.beta = ptr(beta[b]);
    }
    check_launch(launch_epilogue_up(dt, a, stream), "epilogue_up");
  });
}

// The backward of every branch's epilogue (the up-resize's adjoint, activation, norm) from grad, the
// gradient of the output plan lays out: the gradients of the convolution outputs pre (bias included) and
// of the norms' scale and shift (empty where absent).
struct EpilogueGrads {
  TensorVector dconv, grad_scale, grad_shift;
};
EpilogueGrads epilogue_backward(const BlockPlan& plan, const Tensor& grad, at::TensorList pre,
                                const OptionalTensorList& scale, const OptionalTensorList& shift, at::TensorList mean,
                                at::TensorList var, const Tensor& x, bool cl, DType dt, cudaStream_t stream) {
  const size_t B = plan.branches.size();
  const at::MemoryFormat fmt = format_of(cl);
  const auto opts = x.options();
  auto param_opts = [&](const std::optional<Tensor>& t) { return opts.dtype(t->scalar_type()); };
  TensorVector grad_scale(B), grad_shift(B);
  TensorVector pre_b(B), dconv(B), sc(B), sh(B), mu(B), va(B), coef(B);
  std::vector<int64_t> channel_base(B);
  int64_t total_channels = 0;
  const auto dopts = opts.dtype(at::kDouble);
  for (size_t b = 0; b < B; ++b) {
    const BranchPlan& bp = plan.branches[b];
    pre_b[b] = pre[b].to(x.scalar_type()).contiguous(fmt);
    dconv[b] = fresh(at::empty_like(pre_b[b]));
    sc[b] = per_channel(scale.get(b), x);
    sh[b] = per_channel(shift.get(b), x);
    if (bp.batch_stats) {
      mu[b] = per_channel(mean[b], x);
      va[b] = per_channel(var[b], x);
      coef[b] = at::empty({bp.out_channels, 3}, dopts);
    }
    channel_base[b] = total_channels;
    total_channels += bp.out_channels;
  }
  const int64_t max_chunks = max_reduction_chunks();
  const Tensor partial = at::empty({total_channels * max_chunks * 2}, dopts);
  const Tensor sums = at::empty({total_channels, 2}, dopts);
  std::vector<size_t> stat_branches;
  in_groups(B, [&](size_t g0, size_t count) {
    UpGradArgs a;
    a.N = plan.N;
    a.H = plan.H;
    a.W = plan.W;
    a.grad = view(grad);
    a.align_corners = plan.align_corners;
    a.activation = static_cast<int>(plan.activation);
    a.num_branches = static_cast<int>(count);
    a.partial = data_of<double>(partial);
    a.max_chunks = max_chunks;
    for (size_t i = 0; i < count; ++i) {
      const size_t b = g0 + i;
      const BranchPlan& bp = plan.branches[b];
      UpGradBranch& u = a.br[i];
      set_level_map(u, bp, pre_b[b]);
      u.dconv = view(dconv[b]);
      u.batch_stats = bp.batch_stats;
      u.eps = bp.eps;
      u.scale = ptr(sc[b]);
      u.shift = ptr(sh[b]);
      u.mean = ptr(mu[b]);
      u.var = ptr(va[b]);
      u.channel_base = channel_base[b];
    }
    check_launch(launch_up_grad(dt, &a, stream), "up_grad");
    ReduceArgs r;
    r.num_branches = static_cast<int>(count);
    r.partial = data_of<double>(partial);
    r.max_chunks = max_chunks;
    r.sums = data_of<double>(sums);
    for (size_t i = 0; i < count; ++i) {
      const size_t b = g0 + i;
      const BranchPlan& bp = plan.branches[b];
      ReduceBranch& rb = r.br[i];
      rb.channels = bp.out_channels;
      rb.chunks = a.br[i].chunks;
      rb.channel_base = channel_base[b];
      rb.batch_stats = bp.batch_stats;
      rb.eps = bp.eps;
      rb.count = static_cast<double>(plan.N * bp.level_h * bp.level_w);
      rb.scale = ptr(sc[b]);
      rb.mean = ptr(mu[b]);
      rb.var = ptr(va[b]);
      rb.coef = coef[b].defined() ? data_of<double>(coef[b]) : nullptr;
      if (bp.batch_stats) stat_branches.push_back(b);
    }
    check_launch(launch_reduce_partials(dt, r, stream), "reduce_partials");
  });
  for (size_t b = 0; b < B; ++b) {
    const int64_t Cb = plan.branches[b].out_channels;
    const std::optional<Tensor> s = scale.get(b), t = shift.get(b);
    grad_scale[b] = present(s) ? sums.select(1, 1).narrow(0, channel_base[b], Cb).to(param_opts(s)) : at::empty({0}, opts);
    grad_shift[b] = present(t) ? sums.select(1, 0).narrow(0, channel_base[b], Cb).to(param_opts(t)) : at::empty({0}, opts);
  }
  in_groups(stat_branches.size(), [&](size_t g0, size_t count) {
    NormGradArgs a;
    a.N = plan.N;
    a.channels_last = cl;
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
      nb.coef = data_of<double>(coef[b]);
    }
    check_launch(launch_norm_grad(dt, a, stream), "norm_grad");
  });
  return {dconv, grad_scale, grad_shift};
}

// dx, written once: grad's x slice (channels x_offset .. x_offset + C of grad; none for -1) plus every
// branch's down-resize adjoint of dz (its level's gradient).
Tensor write_dx(const BlockPlan& plan, const Tensor& grad, int64_t x_offset, const TensorVector& dz, const Tensor& x,
                bool cl, DType dt, cudaStream_t stream) {
  const size_t B = plan.branches.size();
  Tensor grad_x = fresh(at::empty({plan.N, plan.C, plan.H, plan.W}, x.options().memory_format(format_of(cl))));
  in_groups(B, [&](size_t g0, size_t count) {
    DxArgs a;
    a.N = plan.N;
    a.C = plan.C;
    a.H = plan.H;
    a.W = plan.W;
    a.grad = view(grad);
    a.dx = view(grad_x);
    a.x_offset = g0 == 0 ? x_offset : -1;
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
  return grad_x;
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
  const DType dt = dtype_of(x.scalar_type());
  const size_t B = plan.branches.size();

  Tensor out = fresh(at::empty({plan.N, plan.out_channels, plan.H, plan.W}, opts.memory_format(fmt)));
  auto [level, pre, mean, var] = branch_results(plan, x, fmt);
  if (plan.N == 0) return {out, level, pre, mean, var};

  // 1. Every level from x, and x's slice of the output.
  compute_levels(plan, x, out, level, cl, dt, stream);

  // 2. The convolutions (with their bias) through ATen: cuDNN on the levels, and on x for factor 1.
  {
    const DeterministicConvolutions deterministic;
    for (size_t b = 0; b < B; ++b) {
      const BranchPlan& bp = plan.branches[b];
      const int64_t pad = bp.kernel_size / 2;
      pre[b] = convolution(bp.identity ? x : level[b], weight[b], bias.get(b), pad).contiguous(fmt);
    }
  }

  // 3. Batch statistics ((channel, chunk) partials, merged per channel) and the epilogue's alpha, beta;
  // 4. norm, activation and the resize back up, every branch into its channel slice.
  const auto [alpha, beta] = norm_coefficients(plan, pre, scale, shift, mean, var, x, dt, stream);
  launch_epilogue(plan, out, pre, alpha, beta, cl, dt, stream);
  return {out, level, pre, mean, var};
}

// ---------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------
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

  // 1. Upsample adjoint + activation (and, in eval mode, the folded norm's) backward, per-chunk sums;
  // 2. their fixed-order reduction (parameter gradients, batch-statistics coefficients);
  // 3. with batch statistics, the norm's correction of dconv.
  EpilogueGrads eg = epilogue_backward(plan, grad, pre, scale, shift, mean, var, x, cl, dt, stream);
  grad_scale = eg.grad_scale;
  grad_shift = eg.grad_shift;
  const TensorVector& dconv = eg.dconv;

  // 4. The convolutions' backward through ATen (cuDNN, deterministic algorithms): the gradient of the
  // level (of x for factor 1), of the weight and of the bias.
  {
    const DeterministicConvolutions deterministic;
    for (size_t b = 0; b < B; ++b) {
      const BranchPlan& bp = plan.branches[b];
      const int64_t pad = bp.kernel_size / 2;
      const Tensor z = bp.identity ? x : level[b].to(x.scalar_type()).contiguous(fmt);
      auto grads = convolution_backward(dconv[b], z, weight[b], c10::OptionalArrayRef<int64_t>({bp.out_channels}), pad,
                                        {output_mask[0], output_mask[1], true});
      dz[b] = output_mask[0] ? std::get<0>(grads).contiguous(fmt) : Tensor();
      grad_weight[b] = output_mask[1] ? std::get<1>(grads).contiguous(weight[b].suggest_memory_format())
                                      : at::empty({0}, opts);
      grad_bias[b] = std::get<2>(grads);
    }
  }

  // 5. dx, written once: x's slice of grad plus every branch's down-resize adjoint.
  const Tensor grad_x = output_mask[0] ? write_dx(plan, grad, plan.x_offset, dz, x, cl, dt, stream) : at::empty({0}, opts);
  return {grad_x, grad_weight, grad_bias, grad_scale, grad_shift};
}

// ---------------------------------------------------------------------------------------------------
// The block with its projection (SPEC.md, "The projection"; the split of the work: csrc/projection.h, as
// the CPU backend's): the concatenation is never built.
// ---------------------------------------------------------------------------------------------------
using ProjectForwardResult =
    std::tuple<Tensor, TensorVector, TensorVector, TensorVector, TensorVector, Tensor, Tensor, Tensor>;
using ProjectBackwardResult =
    std::tuple<Tensor, TensorVector, TensorVector, TensorVector, TensorVector, Tensor, Tensor, Tensor, Tensor>;

OptionalTensorList one(const std::optional<Tensor>& t) {
  OptionalTensorList l;
  l.push_back(t);
  return l;
}

void check_optional_device(const std::optional<Tensor>& t, const Tensor& x, const char* name) {
  if (present(t))
    TORCH_CHECK_VALUE(t->device() == x.device(), "msfused (cuda): ", name, " is on ", t->device(), " but x is on ",
                      x.device());
}

// Branch b's activation for the projection: act(norm(pre)) at its level (alone: branch_alone(plan, b, true))
// or resized up to full size (branch_alone(plan, b, false)), in a new tensor.
Tensor branch_activation(const BlockPlan& alone, const Tensor& pre, const Tensor& alpha, const Tensor& beta, bool cl,
                         DType dt, cudaStream_t stream) {
  Tensor a = fresh(at::empty({alone.N, alone.out_channels, alone.H, alone.W}, pre.options().memory_format(format_of(cl))));
  launch_epilogue(alone, a, {pre}, {alpha}, {beta}, cl, dt, stream);
  return a;
}

ProjectForwardResult multi_scale_project_forward_cuda(
    const Tensor& x_in, at::TensorList weight, const OptionalTensorList& bias, const OptionalTensorList& scale,
    const OptionalTensorList& shift, const c10::List<bool>& batch_stats, c10::ArrayRef<double> eps,
    c10::IntArrayRef factor, c10::IntArrayRef bins, c10::string_view down_mode, c10::string_view up_mode,
    bool align_corners, c10::string_view activation, c10::string_view input_position, const Tensor& pw,
    const std::optional<Tensor>& p_bias, const std::optional<Tensor>& p_scale, const std::optional<Tensor>& p_shift,
    bool p_batch_stats, double p_eps, c10::string_view p_activation, bool save_pre, at::TensorList project_parts) {
  const BlockPlan plan = make_plan(x_in, weight, batch_stats, eps, factor, bins, down_mode, up_mode, align_corners,
                                   activation, input_position);
  TORCH_CHECK_VALUE(bias.size() == weight.size() && scale.size() == weight.size() && shift.size() == weight.size(),
                    "msfused: bias, scale and shift need one entry (or None) per branch");
  check_tensors(x_in, weight, bias, scale, shift);
  const Projection proj = check_projection(plan, x_in, pw, p_eps, p_batch_stats, p_activation);
  if (present(p_bias))
    TORCH_CHECK_TYPE(p_bias->scalar_type() == x_in.scalar_type(), "msfused: project_bias has dtype ",
                     p_bias->scalar_type(), " but x has ", x_in.scalar_type());
  check_optional_device(p_bias, x_in, "project_bias");
  check_optional_device(p_scale, x_in, "project_scale");
  check_optional_device(p_shift, x_in, "project_shift");
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
  const int64_t P = proj.P, k = proj.k, pad = k / 2, H = plan.H, W = plan.W;
  const BlockPlan pp = projection_plan(plan, proj);

  auto [level, pre, mean, var] = branch_results(plan, x, fmt);
  Tensor p_mean = fresh(at::empty({proj.batch_stats ? P : 0}, stat_opts));
  Tensor p_var = fresh(at::empty({proj.batch_stats ? P : 0}, stat_opts));
  if (plan.N == 0) {  // nothing to compute (branch_results has said so for the branches)
    p_mean.fill_(std::numeric_limits<double>::quiet_NaN());
    p_var.fill_(std::numeric_limits<double>::quiet_NaN());
    const Tensor out = at::empty({0, P, H, W}, opts.memory_format(fmt));
    return {out, level, pre, mean, var, save_pre ? at::empty({0, P, H, W}, opts.memory_format(fmt)) : at::empty({0}, opts),
            p_mean, p_var};
  }

  // 1. Every level from x (x itself is not copied: there is no concatenation).
  BlockPlan levels_plan = plan;
  levels_plan.x_offset = -1;
  compute_levels(levels_plan, x, Tensor(), level, cl, dt, stream);

  // 2. The branches' convolutions (ATen: cuDNN); 3. their batch statistics and epilogue coefficients.
  {
    const DeterministicConvolutions deterministic;
    for (size_t b = 0; b < B; ++b) {
      const BranchPlan& bp = plan.branches[b];
      const int64_t bpad = bp.kernel_size / 2;
      pre[b] = convolution(bp.identity ? x : level[b], weight[b], bias.get(b), bpad).contiguous(fmt);
    }
  }
  const auto [alpha, beta] = norm_coefficients(plan, pre, scale, shift, mean, var, x, dt, stream);

  // 4. Per branch its activation (at the level, or resized up where it is convolved directly), then its part
  // of the projection through ATen: the per-tap maps (one 1x1 convolution to k*k*P channels at the level,
  // in opmath: tap_maps_dtype) or the direct convolution; and the x part, conv(x, W_x).
  TensorVector tmaps, direct;
  std::vector<size_t> tap_branch;
  Tensor acc;
  {
    TensorVector act(B);
    for (size_t b = 0; b < B; ++b) {
      const bool whole = convolves_resized(plan.branches[b], k, H, W);
      act[b] = branch_activation(branch_alone(plan, b, !whole), pre[b], alpha[b], beta[b], cl, dt, stream);
    }
    const DeterministicConvolutions deterministic;
    const TensorVector parts = projection_parts(plan, proj, pw, project_parts);
    if (plan.x_offset >= 0) acc = convolution(x, parts[0], std::nullopt, pad).contiguous(fmt);
    for (size_t b = 0; b < B; ++b) {
      const BranchPlan& bp = plan.branches[b];
      if (convolves_resized(bp, k, H, W)) {
        direct.push_back(convolution(act[b], parts[1 + b], std::nullopt, pad).contiguous(fmt));
      } else {
        const at::ScalarType tdt = tap_maps_dtype(x.scalar_type());
        tmaps.push_back(convolution(act[b].to(tdt), parts[1 + b], std::nullopt, 0).contiguous(fmt));
        tap_branch.push_back(b);
      }
    }
  }

  // 5. One pass: the sum, the bias and (without batch statistics) the norm and activation, the output
  // written once; the pre-activation kept only for a backward (else the output takes its place). Over
  // kMaxBranches parts of a kind: several launches, each adding its parts to the previous one's sum, carried
  // between them in opmath (a buffer of its own for half / bfloat16: the sum is rounded once).
  const bool fused_epilogue = !proj.batch_stats;
  const Tensor pre_sum = acc.defined() ? acc : fresh(at::empty({plan.N, P, H, W}, opts.memory_format(fmt)));
  Tensor out = save_pre ? fresh(at::empty({plan.N, P, H, W}, opts.memory_format(fmt))) : pre_sum;
  const Tensor p_bias_acc = per_channel(p_bias, x);
  const Tensor p_alpha = fused_epilogue ? per_channel(p_scale, x) : Tensor();
  const Tensor p_beta = fused_epilogue ? per_channel(p_shift, x) : Tensor();
  const size_t launches = std::max<size_t>({1, (tmaps.size() + kMaxBranches - 1) / kMaxBranches,
                                            (direct.size() + kMaxBranches - 1) / kMaxBranches});
  const at::ScalarType sum_dt = opmath(x.scalar_type());
  const Tensor partial = launches == 1 ? Tensor()
                         : sum_dt == x.scalar_type()
                             ? pre_sum
                             : fresh(at::empty({plan.N, P, H, W}, opts.dtype(sum_dt).memory_format(fmt)));
  for (size_t l = 0; l < launches; ++l) {
    const bool last = l + 1 == launches;
    ProjectAccArgs a;
    a.N = plan.N;
    a.P = P;
    a.H = H;
    a.W = W;
    a.k = k;
    a.acc = l == 0 ? view(acc) : View4();
    a.carry = l == 0 ? View4() : view(partial);
    a.partial = last ? View4() : view(partial);
    a.pre = last && fused_epilogue && !save_pre ? View4() : view(pre_sum);
    a.out = last && fused_epilogue ? view(out) : View4();
    a.bias = l == 0 ? ptr(p_bias_acc) : nullptr;
    a.alpha = ptr(p_alpha);
    a.beta = ptr(p_beta);
    a.channels_last = cl;
    a.align_corners = plan.align_corners;
    a.activation = static_cast<int>(proj.activation);
    for (size_t i = l * kMaxBranches; i < std::min(tmaps.size(), (l + 1) * kMaxBranches); ++i) {
      const BranchPlan& bp = plan.branches[tap_branch[i]];
      ProjectTapBranch& t = a.tap[a.num_taps++];
      t.tmap = view(tmaps[i]);
      t.h = bp.level_h;
      t.w = bp.level_w;
      t.up_h = static_cast<int>(bp.up_h);
      t.up_w = static_cast<int>(bp.up_w);
    }
    for (size_t i = l * kMaxBranches; i < std::min(direct.size(), (l + 1) * kMaxBranches); ++i)
      a.direct[a.num_direct++] = view(direct[i]);
    check_launch(launch_project_accumulate(dt, a, stream), "project_accumulate");
  }

  // 6. With batch statistics: the projection's statistics, then its norm and activation (in place when
  // the pre-activation need not be kept).
  if (!fused_epilogue) {
    const auto [pa, pb] = norm_coefficients(pp, {pre_sum}, one(p_scale), one(p_shift), {p_mean}, {p_var}, x, dt, stream);
    launch_epilogue(pp, out, {pre_sum}, pa, pb, cl, dt, stream);
  }
  return {out, level, pre, mean, var, save_pre ? pre_sum : at::empty({0}, opts), p_mean, p_var};
}

ProjectBackwardResult multi_scale_project_backward_cuda(
    const Tensor& grad_in, const Tensor& x_in, at::TensorList weight, const OptionalTensorList& scale,
    const OptionalTensorList& shift, at::TensorList level, at::TensorList pre, at::TensorList mean, at::TensorList var,
    const c10::List<bool>& batch_stats, c10::ArrayRef<double> eps, c10::IntArrayRef factor, c10::IntArrayRef bins,
    c10::string_view down_mode, c10::string_view up_mode, bool align_corners, c10::string_view activation,
    c10::string_view input_position, const Tensor& pw, const std::optional<Tensor>& p_scale,
    const std::optional<Tensor>& p_shift, const Tensor& p_pre, const Tensor& p_mean, const Tensor& p_var,
    bool p_batch_stats, double p_eps, c10::string_view p_activation, std::array<bool, 2> output_mask) {
  const BlockPlan plan = make_plan(x_in, weight, batch_stats, eps, factor, bins, down_mode, up_mode, align_corners,
                                   activation, input_position);
  const Projection proj = check_projection(plan, x_in, pw, p_eps, p_batch_stats, p_activation);
  const size_t B = plan.branches.size();
  const int64_t P = proj.P, k = proj.k, pad = k / 2, H = plan.H, W = plan.W;
  check_project_backward_args(plan, proj, grad_in, level, pre, mean, var, scale, shift, p_pre);
  check_tensors(x_in, weight, OptionalTensorList(), scale, shift);
  TORCH_CHECK_VALUE(grad_in.device() == x_in.device(), "msfused (cuda): grad_out is on ", grad_in.device(),
                    " but x is on ", x_in.device());
  for (size_t b = 0; b < B; ++b) {
    check_device(pre[b], x_in, "pre", b);
    if (!plan.branches[b].identity) check_device(level[b], x_in, "level", b);
  }
  check_device(p_pre, x_in, "project_pre", 0);
  check_optional_device(p_scale, x_in, "project_scale");
  check_optional_device(p_shift, x_in, "project_shift");
  const DeviceGuard device_guard(x_in.device());
  const cudaStream_t stream = current_stream();
  const Input input = prepare(plan, x_in);
  const at::MemoryFormat fmt = input.fmt;
  const bool cl = input.channels_last;
  const Tensor& x = input.x;
  const Tensor grad = grad_in.to(x.scalar_type()).contiguous(fmt);
  const auto opts = x.options();
  const DType dt = dtype_of(x.scalar_type());
  const bool need_w = output_mask[1];
  auto param_opts = [&](const std::optional<Tensor>& t) { return opts.dtype(t->scalar_type()); };
  TensorVector grad_weight(B), grad_bias(B), grad_scale(B), grad_shift(B), dz(B);

  if (x.numel() == 0 || grad.numel() == 0) {  // no values: every gradient is zero
    for (size_t b = 0; b < B; ++b) {
      const int64_t Cb = plan.branches[b].out_channels;
      const std::optional<Tensor> sc = scale.get(b), sh = shift.get(b);
      grad_weight[b] = need_w ? at::zeros_like(weight[b]) : at::empty({0}, opts);
      grad_bias[b] = at::zeros({Cb}, opts);
      grad_scale[b] = present(sc) ? at::zeros({Cb}, param_opts(sc)) : at::empty({0}, opts);
      grad_shift[b] = present(sh) ? at::zeros({Cb}, param_opts(sh)) : at::empty({0}, opts);
    }
    return {output_mask[0] ? at::zeros({plan.N, plan.C, H, W}, opts.memory_format(fmt)) : at::empty({0}, opts),
            grad_weight, grad_bias, grad_scale, grad_shift,
            need_w ? at::zeros_like(pw) : at::empty({0}, opts), at::zeros({P}, opts),
            present(p_scale) ? at::zeros({P}, param_opts(p_scale)) : at::empty({0}, opts),
            present(p_shift) ? at::zeros({P}, param_opts(p_shift)) : at::empty({0}, opts)};
  }

  // 1. The projection's epilogue backward (activation, norm) at full size: the gradient of its
  // pre-activation, and of its norm's scale and shift; the bias gradient is its sum.
  const BlockPlan pp = projection_plan(plan, proj);
  EpilogueGrads pg = epilogue_backward(pp, grad, {p_pre}, one(p_scale), one(p_shift), {p_mean}, {p_var}, x, cl, dt,
                                       stream);
  const Tensor dpre = pg.dconv[0];
  const Tensor grad_p_bias = dpre.sum({0, 2, 3});
  Tensor grad_pw = need_w ? at::zeros_like(pw, at::MemoryFormat::Preserve) : at::empty({0}, opts);

  // 2. The x part: the transposed convolution (ATen) gives its gradient of x and of the weight's x slice.
  Tensor dx_proj;
  if (plan.x_offset >= 0 && (output_mask[0] || need_w)) {
    const DeterministicConvolutions deterministic;
    auto g = convolution_backward(dpre, x, weight_slice(pw, plan.x_offset, plan.C), std::nullopt, pad,
                                  {output_mask[0], need_w, false});
    if (output_mask[0]) dx_proj = std::get<0>(g).contiguous(fmt);
    if (need_w) grad_pw.narrow(1, plan.x_offset, plan.C).copy_(std::get<1>(g));
  }

  // 3. Every per-tap branch's maps' gradient: the adjoint of the shifted resize, a gather at its level (in
  // opmath: tap_maps_dtype).
  TensorVector dts(B);
  std::vector<size_t> tap_branches;
  for (size_t b = 0; b < B; ++b) {
    const BranchPlan& bp = plan.branches[b];
    if (convolves_resized(bp, k, H, W)) continue;
    dts[b] = fresh(at::empty({plan.N, k * k * P, bp.level_h, bp.level_w},
                             opts.dtype(tap_maps_dtype(x.scalar_type())).memory_format(fmt)));
    tap_branches.push_back(b);
  }
  in_groups(tap_branches.size(), [&](size_t g0, size_t count) {
    ProjectAdjointArgs a;
    a.N = plan.N;
    a.P = P;
    a.H = H;
    a.W = W;
    a.k = k;
    a.dpre = view(dpre);
    a.channels_last = cl;
    a.align_corners = plan.align_corners;
    a.num_branches = static_cast<int>(count);
    for (size_t i = 0; i < count; ++i) {
      const BranchPlan& bp = plan.branches[tap_branches[g0 + i]];
      ProjectAdjointBranch& br = a.br[i];
      br.dt = view(dts[tap_branches[g0 + i]]);
      br.h = bp.level_h;
      br.w = bp.level_w;
      br.up_h = static_cast<int>(bp.up_h);
      br.up_w = static_cast<int>(bp.up_w);
    }
    check_launch(launch_project_adjoint(dt, a, stream), "project_adjoint");
  });

  // 4. Per branch: its activation again (as in the forward: the epilogue coefficients from the saved
  // statistics), the gradient reaching it through its part's convolution (ATen) and the weight slice's;
  // its epilogue's backward; its own convolution's backward (ATen).
  for (size_t b = 0; b < B; ++b) {
    const BranchPlan& bp = plan.branches[b];
    const int64_t Cb = bp.out_channels;
    const bool whole = convolves_resized(bp, k, H, W);
    const BlockPlan alone = branch_alone(plan, b, !whole);
    const Tensor pre_b = pre[b].to(x.scalar_type()).contiguous(fmt);
    Tensor alpha = per_channel(scale.get(b), x), beta = per_channel(shift.get(b), x);
    if (bp.batch_stats) {
      const Tensor sc = alpha, sh = beta, mu = per_channel(mean[b], x), va = per_channel(var[b], x);
      alpha = at::empty({Cb}, sc.defined() ? sc.options() : mu.options());
      beta = at::empty_like(alpha);
      MergeStatsArgs m;  // no partials: the coefficients from the saved statistics
      m.num_branches = 1;
      m.max_chunks = max_reduction_chunks();
      MergeStatsBranch& mb = m.br[0];
      mb.channels = Cb;
      mb.eps = bp.eps;
      mb.scale = ptr(sc);
      mb.shift = ptr(sh);
      mb.mean = data_of(mu);
      mb.var = data_of(va);
      mb.alpha = data_of(alpha);
      mb.beta = data_of(beta);
      check_launch(launch_merge_stats(dt, m, stream), "merge_stats");
    }
    const Tensor act = branch_activation(alone, pre_b, alpha, beta, cl, dt, stream);
    Tensor da;
    {
      const DeterministicConvolutions deterministic;
      if (whole) {
        auto g = convolution_backward(dpre, act, weight_slice(pw, bp.channel_offset, Cb), std::nullopt, pad,
                                      {true, need_w, false});
        da = std::get<0>(g).contiguous(fmt);
        if (need_w) grad_pw.narrow(1, bp.channel_offset, Cb).copy_(std::get<1>(g));
      } else {
        Tensor dw;
        std::tie(da, dw) = tap_maps_backward(dts[b], act, pw, bp.channel_offset, need_w, fmt);
        if (need_w) grad_pw.narrow(1, bp.channel_offset, Cb).copy_(dw);
      }
    }
    EpilogueGrads eg = epilogue_backward(alone, da, {pre_b}, one(scale.get(b)), one(shift.get(b)), {mean[b]}, {var[b]},
                                         x, cl, dt, stream);
    grad_scale[b] = eg.grad_scale[0];
    grad_shift[b] = eg.grad_shift[0];
    const DeterministicConvolutions deterministic;
    const int64_t bpad = bp.kernel_size / 2;
    const Tensor z = bp.identity ? x : level[b].to(x.scalar_type()).contiguous(fmt);
    auto grads = convolution_backward(eg.dconv[0], z, weight[b], c10::OptionalArrayRef<int64_t>({Cb}), bpad,
                                      {output_mask[0], need_w, true});
    dz[b] = output_mask[0] ? std::get<0>(grads).contiguous(fmt) : Tensor();
    grad_weight[b] = need_w ? std::get<1>(grads).contiguous(weight[b].suggest_memory_format()) : at::empty({0}, opts);
    grad_bias[b] = std::get<2>(grads);
  }

  // 5. dx, written once: the x part's gradient plus every branch's down-resize adjoint.
  const Tensor grad_x = output_mask[0] ? write_dx(plan, dx_proj, dx_proj.defined() ? 0 : -1, dz, x, cl, dt, stream)
                                       : at::empty({0}, opts);
  return {grad_x,  grad_weight, grad_bias, grad_scale, grad_shift, grad_pw, grad_p_bias,
          pg.grad_scale[0], pg.grad_shift[0]};
}

}  // namespace
}  // namespace cuda

#ifndef MSFUSED_CUDA_EMULATION
TORCH_LIBRARY_IMPL(msfused, CUDA, m) {
  m.impl("multi_scale_forward", &cuda::multi_scale_forward_cuda);
  m.impl("multi_scale_backward", &cuda::multi_scale_backward_cuda);
  m.impl("multi_scale_project_forward", &cuda::multi_scale_project_forward_cuda);
  m.impl("multi_scale_project_backward", &cuda::multi_scale_project_backward_cuda);
}
#else
namespace cuda {
namespace {
// The record-only mode's entry (msfused/cuda_plan.py): start_recording(multiprocessors) installs a recorder
// on this thread (the launchers then size their grids for a device of that many multiprocessors);
// stop_recording() removes it and returns the kernel launches recorded, as JSON (a list). The ATen ops of
// the binding (the convolutions, casts, sums) are seen by the caller's dispatch mode on the meta tensors.
thread_local LaunchRecorder recorder;

void start_recording(int64_t multiprocessors) {
  TORCH_CHECK_VALUE(multiprocessors >= 1, "msfused: multiprocessors must be positive, got ", multiprocessors);
  recorder = LaunchRecorder();
  recorder.multiprocessors = multiprocessors;
  set_launch_recorder(&recorder);
}

std::string stop_recording() {
  set_launch_recorder(nullptr);
  std::string j = "[";
  for (const PlannedLaunch& l : recorder.launches) {
    if (j.size() > 1) j += ",";
    j += "{\"kernel\":\"" + l.kernel + "\",\"grid\":" + std::to_string(l.grid) + ",\"threads\":" +
         std::to_string(l.threads) + ",\"shared_bytes\":" + std::to_string(l.shared_bytes) + ",\"parts\":[";
    for (size_t i = 0; i < l.parts.size(); ++i) {
      const PlannedPart& p = l.parts[i];
      j += std::string(i ? "," : "") + "{\"what\":\"" + p.what + "\",\"programs\":" + std::to_string(p.programs) +
           ",\"lanes\":" + std::to_string(p.lanes) + ",\"serial\":" + std::to_string(p.serial) +
           ",\"read\":" + std::to_string(p.read) + ",\"written\":" + std::to_string(p.written) + "}";
    }
    j += "]}";
  }
  recorder = LaunchRecorder();
  return j + "]";
}
}  // namespace
}  // namespace cuda

// The emulation build: the same functions as operators of their own (schemas inferred), over CPU tensors
// (or meta tensors while recording).
TORCH_LIBRARY(msfused_cuda_emulation, m) {
  m.def("multi_scale_forward", &cuda::multi_scale_forward_cuda);
  m.def("multi_scale_backward", &cuda::multi_scale_backward_cuda);
  m.def("multi_scale_project_forward", &cuda::multi_scale_project_forward_cuda);
  m.def("multi_scale_project_backward", &cuda::multi_scale_project_backward_cuda);
  m.def("start_recording", &cuda::start_recording);
  m.def("stop_recording", &cuda::stop_recording);
}
#endif

}  // namespace msfused
