// What the CPU backend's translation units share: the work items and their layouts, each branch's resize
// taps, the epilogue's per-channel coefficients, the activation as a compile-time constant; and the passes
// the block defines and the projection runs too (declared at the end; defined once, so compiled once).
// The files: forward.cpp and backward.cpp (the block), projection_forward.cpp and projection_backward.cpp
// (the block with its projection; tap_branch.h), register.cpp (the operators, operators.h, for the CPU key).
//
// Layouts: NCHW work items are one (n, c) plane; channels_last work items are one n and a group of up to
// kGroup channels, so the innermost loops run over contiguous memory in both.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../block_config.h"
#include "../norm.h"
#include "../taps.h"
#include "operators.h"

namespace msfused {
namespace cpu {
namespace detail {

inline constexpr int64_t kGroup = 16;  // channels per channels_last work item: one 64-byte line of float32

// Where element (i, j, g) of one work item lives: base + i * row + j * pix + g.
template <bool CL>
struct Plane {
  int64_t row = 0, pix = 1;
  static Plane make(int64_t width, int64_t channels) {
    Plane p;
    p.row = CL ? width * channels : width;
    p.pix = CL ? channels : 1;
    return p;
  }
  // Offset of (n, c, 0, 0) in a (N, channels, height, width) tensor.
  static int64_t origin(int64_t n, int64_t c, int64_t channels, int64_t height, int64_t width) {
    return CL ? n * height * width * channels + c : (n * channels + c) * height * width;
  }
};

// Work items: (n, first channel, channel count) over `channels` channels; channels_last items take Width
// channels (kGroup, or a multiple of it where a pass walks the whole map per item).
template <bool CL, int64_t Width = kGroup>
struct Groups {
  int64_t per_n;
  int64_t channels;
  explicit Groups(int64_t channels_) : per_n(CL ? (channels_ + Width - 1) / Width : channels_), channels(channels_) {}
  void at(int64_t item, int64_t* n, int64_t* c0, int64_t* g) const {
    *n = item / per_n;
    const int64_t k = item % per_n;
    *c0 = CL ? k * Width : k;
    *g = CL ? std::min(Width, channels - *c0) : 1;
  }
};

template <typename T>
struct BranchTaps {
  Taps1d<T> down_h, down_w, up_h, up_w;
};

template <typename T>
std::vector<BranchTaps<T>> make_branch_taps(const BlockPlan& plan) {
  std::vector<BranchTaps<T>> taps;
  for (const BranchPlan& b : plan.branches) {
    BranchTaps<T> t;
    t.down_h = make_taps<T>(b.down_h, plan.H, b.level_h, b.factor, plan.align_corners);
    t.down_w = make_taps<T>(b.down_w, plan.W, b.level_w, b.factor, plan.align_corners);
    t.up_h = make_taps<T>(b.up_h, b.level_h, plan.H, 1, plan.align_corners);
    t.up_w = make_taps<T>(b.up_w, b.level_w, plan.W, 1, plan.align_corners);
    taps.push_back(std::move(t));
  }
  return taps;
}

// Branch b's per-channel epilogue as y = alpha * conv + beta (norm folded or batch-normalised), in opmath.
template <typename T>
struct Epilogue {
  std::vector<T> alpha, beta;
};

inline std::vector<double> to_doubles(const std::optional<Tensor>& t, int64_t n, double fill) {
  if (!t.has_value() || !t->defined()) return std::vector<double>(n, fill);
  Tensor d = t->detach().to(at::kCPU, at::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + n);
}

// y = scale * conv + shift, or with batch statistics y = (conv - mean) * invstd * scale + shift.
template <typename T>
Epilogue<T> make_epilogue(const BranchPlan& b, const std::optional<Tensor>& scale, const std::optional<Tensor>& shift,
                          const Tensor& mean, const Tensor& var) {
  const int64_t cb = b.out_channels;
  std::vector<double> s = to_doubles(scale, cb, 1.0), t = to_doubles(shift, cb, 0.0);
  Epilogue<T> e;
  e.alpha.resize(cb);
  e.beta.resize(cb);
  std::vector<double> m = b.batch_stats ? to_doubles(mean, cb, 0.0) : std::vector<double>(cb, 0.0);
  std::vector<double> v = b.batch_stats ? to_doubles(var, cb, 0.0) : std::vector<double>(cb, 0.0);
  for (int64_t c = 0; c < cb; ++c) {
    double alpha, beta;
    norm_epilogue(b.batch_stats, s[c], t[c], m[c], v[c], b.eps, &alpha, &beta);
    e.alpha[c] = static_cast<T>(alpha);
    e.beta[c] = static_cast<T>(beta);
  }
  return e;
}

// An up-resize axis (Identity, Nearest: one tap; Linear: two) as flat arrays for the inner loops.
template <typename T>
struct UpAxis {
  bool two = false;
  std::vector<int64_t> i0, i1;
  std::vector<T> w0, w1;
  explicit UpAxis(const Taps1d<T>& t) {
    for (int64_t o = 0; o < t.out; ++o) {
      const int64_t k = t.row_ptr[o], count = t.row_ptr[o + 1] - k;
      TORCH_INTERNAL_ASSERT(count == 1 || count == 2);
      two = two || count == 2;
      i0.push_back(t.row_idx[k]);
      w0.push_back(t.row_w[k]);
      i1.push_back(count == 2 ? t.row_idx[k + 1] : t.row_idx[k]);
      TORCH_INTERNAL_ASSERT(i1.back() - i0.back() == 0 || i1.back() - i0.back() == 1);  // epilogue_and_up relies on it
      w1.push_back(count == 2 ? t.row_w[k + 1] : T(0));
    }
  }
};

// Calls f with the activation as a compile-time constant, so the epilogue loops specialise (and relu
// vectorises).
template <typename F>
void with_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::Relu: f(std::integral_constant<Activation, Activation::Relu>{}); break;
    case Activation::Silu: f(std::integral_constant<Activation, Activation::Silu>{}); break;
    case Activation::Gelu: f(std::integral_constant<Activation, Activation::Gelu>{}); break;
    default: f(std::integral_constant<Activation, Activation::None>{}); break;
  }
}

// Runs worker(next) once on each intra-op thread (at most count of them), where next() hands out the items
// [0, count) one at a time and then -1. A thread slowed by page faults of fresh output memory, or by another
// process on its core, takes fewer items instead of holding the others at the region's end. Only for items
// that write disjoint outputs: the results cannot depend on which thread ran an item. Inside another parallel
// region it runs inline, one worker taking every item.
template <typename Worker>
void parallel_items(int64_t count, const Worker& worker) {
  std::atomic<int64_t> next_item{0};
  const auto next = [&]() -> int64_t {
    const int64_t i = next_item.fetch_add(1, std::memory_order_relaxed);
    return i < count ? i : -1;
  };
  at::parallel_for(0, std::min<int64_t>(count, at::get_num_threads()), 1, [&](int64_t, int64_t) { worker(next); });
}

// ---------------------------------------------------------------------------------------------------
// Defined in forward.cpp; the projection (projection_forward.cpp, projection_backward.cpp) runs them too.
// ---------------------------------------------------------------------------------------------------

// Forward pass 1 in x's dtype and layout (cl: channels_last): every level into level[b] (allocated by the
// caller; empty for an identity branch) and, where plan.x_offset >= 0, x's slice of out.
void dispatch_levels_and_copy(const BlockPlan& plan, const Tensor& x, const Tensor& out, const TensorVector& level,
                              bool cl);

// A norm's batch mean and biased variance over (N, H, W) of `pre` (empty tensors without batch statistics).
std::pair<Tensor, Tensor> batch_statistics(const Tensor& pre, bool batch_stats);

// A branch's convolution (stride 1, padding pad) in memory format fmt.
Tensor branch_conv(const Tensor& z, const Tensor& w, const std::optional<Tensor>& bias, int64_t pad,
                   at::MemoryFormat fmt);

// act(norm(pre)) of plan's branch 0, up-resized as the plan says, into a new tensor or `into`.
Tensor branch_epilogue(const BlockPlan& p, const Tensor& pre, const std::optional<Tensor>& scale,
                       const std::optional<Tensor>& shift, const Tensor& mean, const Tensor& var, at::MemoryFormat fmt,
                       const Tensor& into = Tensor());

// ---------------------------------------------------------------------------------------------------
// Defined in backward.cpp; the projection runs them too.
// ---------------------------------------------------------------------------------------------------

// Backward pass 3 in grad_x's dtype and layout: dx written once into grad_x, from grad's x slice (where
// plan.x_offset >= 0; grad may be undefined otherwise) and every branch's dz (empty for none).
void dispatch_down_adjoint(const BlockPlan& plan, const Tensor& grad, const TensorVector& dz, const Tensor& grad_x,
                           bool cl);

// The backward of branch bp's epilogue: the gradient of its convolution output, and of its norm's scale and shift.
std::tuple<Tensor, Tensor, Tensor> epilogue_backward(const BlockPlan& plan, const BranchPlan& bp, const Tensor& grad,
                                                     const Tensor& pre, const std::optional<Tensor>& sc,
                                                     const std::optional<Tensor>& sh, const Tensor& mean,
                                                     const Tensor& var, at::MemoryFormat fmt);

}  // namespace detail
}  // namespace cpu
}  // namespace msfused
