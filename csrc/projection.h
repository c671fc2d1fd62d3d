// The block's projection (SPEC.md, "The projection") as every device's kernels see it: the host-side
// decisions and plans shared by the CPU and CUDA operators, so that both split the work the same way.
// act(norm(conv(cat))) without ever building cat: conv(cat) = conv(x, W_x) + per branch its part: at a
// small level, per kernel tap, T_b = W_b,tap . a_b (one 1x1 convolution with k*k*P outputs at the level),
// resized up and shifted by the tap at full resolution (zero outside); at a level close to full size,
// conv(up(a_b), W_b) directly.
#pragma once

#include <ATen/core/Tensor.h>

#include <string_view>
#include <utility>
#include <vector>

#include "block_config.h"

namespace msfused {

struct Projection {
  int64_t P = 0, k = 0;
  bool batch_stats = false;
  double eps = 0;
  Activation activation = Activation::None;
};

// Checks project_weight (P, C_out, k, k) against the plan and x (dtype, device); names what is wrong.
Projection check_projection(const BlockPlan& plan, const at::Tensor& x, const at::Tensor& pw, double eps,
                            bool batch_stats, std::string_view activation);

// Checks multi_scale_project_backward's saved per-branch tensors, grad_out's shape (N, P, H, W) and the
// projection's saved pre-activation (absent when the forward ran with save_pre=False).
void check_project_backward_args(const BlockPlan& plan, const Projection& proj, const at::Tensor& grad_out,
                                 at::TensorList level, at::TensorList pre, at::TensorList mean, at::TensorList var,
                                 const OptionalTensorList& scale, const OptionalTensorList& shift,
                                 const at::Tensor& project_pre);

// Whether branch bp's part of a k x k projection convolves its resized branch directly (its per-tap maps,
// k * k of them at the level, would hold more than one full-size map) instead of per tap at its level.
inline bool convolves_resized(const BranchPlan& bp, int64_t k, int64_t H, int64_t W) {
  return bp.identity || bp.level_h * bp.level_w * k * k > H * W;
}

// Branch b of `plan` alone, its output (N, Cb, ., .) starting at channel 0: the up-resized map, or with
// at_level the level itself (no up-resize), so that the block's epilogue kernels compute a branch's
// activation, and their backward its gradient, for the projection.
BlockPlan branch_alone(const BlockPlan& plan, size_t b, bool at_level);

// The projection's epilogue as a one-branch plan: a factor-1 "branch" of P channels over (H, W).
BlockPlan projection_plan(const BlockPlan& plan, const Projection& proj);

// The part of the projection weight (P, C_out, k, k) that reads channels [offset, offset + count) of cat.
at::Tensor weight_slice(const at::Tensor& pw, int64_t offset, int64_t count);

// The same part as one 1x1 convolution weight (k * k * P, count, 1, 1): output channel tap * P + p.
at::Tensor tap_weight(const at::Tensor& pw, int64_t offset, int64_t count);

// The dtype of a per-tap branch's maps T_b and of their gradient dT_b: opmath (float for half and bfloat16).
// Each is a partial sum of the one convolution the reference rounds once, so neither is rounded to x's dtype;
// their 1x1 convolutions run in it (a half-precision activation and weight are exact there).
inline at::ScalarType tap_maps_dtype(at::ScalarType t) { return stats_dtype(t); }

// The projection weight's parts as the forward convolves them: [0] x's slice (P, C, k, k) (undefined where x is
// not in the output), [1 + b] branch b's: its slice where it convolves its resized branch directly, else its
// per-tap weight (k * k * P, Cb, 1, 1) in tap_maps_dtype. `given` (the operator's project_parts): empty (they
// are computed here), or these, precomputed by the caller from pw (msfused/functional.py keeps them per version
// of the weight); each is checked against the part it stands for (shape, dtype, device) and used as it is.
std::vector<at::Tensor> projection_parts(const BlockPlan& plan, const Projection& proj, const at::Tensor& pw,
                                         at::TensorList given);

// The backward of T_b = tap_weight(pw, offset, Cb) . a (a's per-tap maps, one 1x1 convolution at its level)
// from dt (tap_maps_dtype): the gradient of a, rounded once to a's dtype, in `fmt`; and (need_w) that of the
// weight's part (P, Cb, k, k), in dt's dtype (rounded once where it is copied into the weight's gradient).
std::pair<at::Tensor, at::Tensor> tap_maps_backward(const at::Tensor& dt, const at::Tensor& a, const at::Tensor& pw,
                                                    int64_t offset, bool need_w, at::MemoryFormat fmt);

}  // namespace msfused
