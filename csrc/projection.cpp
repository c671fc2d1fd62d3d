#include "projection.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace msfused {

Projection check_projection(const BlockPlan& plan, const at::Tensor& x, const at::Tensor& pw, double eps,
                            bool batch_stats, std::string_view activation) {
  TORCH_CHECK_VALUE(pw.dim() == 4 && pw.size(2) == pw.size(3) && pw.size(2) % 2 == 1,
                    "msfused: project_weight must be (P, C_out, k, k) with k odd, got ", pw.sizes());
  TORCH_CHECK_VALUE(pw.size(1) == plan.out_channels, "msfused: project_weight expects ", pw.size(1),
                    " input channels, the concatenation has ", plan.out_channels);
  TORCH_CHECK_VALUE(pw.size(0) >= 1, "msfused: project_weight has no output channels");
  TORCH_CHECK_TYPE(pw.scalar_type() == x.scalar_type(), "msfused: project_weight has dtype ", pw.scalar_type(),
                   " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(pw.device() == x.device(), "msfused: project_weight is on ", pw.device(), " but x is on ",
                    x.device());
  Projection p;
  p.P = pw.size(0);
  p.k = pw.size(2);
  p.batch_stats = batch_stats;
  p.eps = eps;
  p.activation = parse_activation(activation);
  return p;
}

void check_project_backward_args(const BlockPlan& plan, const Projection& proj, const at::Tensor& grad_out,
                                 at::TensorList level, at::TensorList pre, at::TensorList mean, at::TensorList var,
                                 const OptionalTensorList& scale, const OptionalTensorList& shift,
                                 const at::Tensor& project_pre) {
  BlockPlan out_plan = plan;  // the output is the projection's: P channels
  out_plan.out_channels = proj.P;
  check_backward_args(out_plan, grad_out, level, pre, mean, var, scale, shift);
  TORCH_CHECK_VALUE(project_pre.sizes() == grad_out.sizes(), "msfused: the projection's pre-activation was not "
                    "saved (multi_scale_project_forward with save_pre=False), so there is no backward");
}

BlockPlan branch_alone(const BlockPlan& plan, size_t b, bool at_level) {
  BlockPlan p = plan;
  BranchPlan bp = plan.branches[b];
  bp.channel_offset = 0;
  if (at_level) {
    p.H = bp.level_h;
    p.W = bp.level_w;
    bp.identity = true;
    bp.factor = 1;
    bp.down_h = bp.down_w = bp.up_h = bp.up_w = ResizeKind::Identity;
  }
  p.branches = {bp};
  p.x_offset = -1;
  p.out_channels = bp.out_channels;
  return p;
}

BlockPlan projection_plan(const BlockPlan& plan, const Projection& proj) {
  BlockPlan p = plan;
  BranchPlan bp;
  bp.factor = 1;
  bp.level_h = plan.H;
  bp.level_w = plan.W;
  bp.out_channels = proj.P;
  bp.kernel_size = proj.k;
  bp.identity = true;
  bp.batch_stats = proj.batch_stats;
  bp.eps = proj.eps;
  p.branches = {bp};
  p.x_offset = -1;
  p.out_channels = proj.P;
  p.activation = proj.activation;
  return p;
}

at::Tensor weight_slice(const at::Tensor& pw, int64_t offset, int64_t count) {
  return pw.narrow(1, offset, count).contiguous(pw.suggest_memory_format());
}

at::Tensor tap_weight(const at::Tensor& pw, int64_t offset, int64_t count) {
  const int64_t P = pw.size(0), k = pw.size(2);
  return pw.narrow(1, offset, count).permute({2, 3, 0, 1}).reshape({k * k * P, count, 1, 1});
}

std::vector<at::Tensor> projection_parts(const BlockPlan& plan, const Projection& proj, const at::Tensor& pw,
                                         at::TensorList given) {
  const size_t B = plan.branches.size();
  TORCH_CHECK_VALUE(given.empty() || given.size() == 1 + B, "msfused: project_parts needs ", 1 + B,
                    " tensors (x's part, then one per branch) or none, got ", given.size());
  const int64_t P = proj.P, k = proj.k;
  const at::ScalarType tdt = tap_maps_dtype(pw.scalar_type());
  std::vector<at::Tensor> parts(1 + B);
  // Part i, channels [offset, offset + count) of pw: its slice, or (tap) its per-tap weight; the given one
  // checked against it, else made.
  auto part = [&](size_t i, int64_t offset, int64_t count, bool tap) {
    if (given.empty()) {
      parts[i] = tap ? tap_weight(pw, offset, count).to(tdt) : weight_slice(pw, offset, count);
      return;
    }
    const at::Tensor& t = given[i];
    const std::vector<int64_t> shape = tap ? std::vector<int64_t>{k * k * P, count, 1, 1}
                                           : std::vector<int64_t>{P, count, k, k};
    const char* what = tap ? "a per-tap weight" : "a slice of project_weight";
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), "msfused: project_parts[", i, "] (", what,
                      ") must have shape ", at::IntArrayRef(shape), ", got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == (tap ? tdt : pw.scalar_type()), "msfused: project_parts[", i, "] (", what,
                     ") must have dtype ", tap ? tdt : pw.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == pw.device(), "msfused: project_parts[", i, "] is on ", t.device(),
                      " but project_weight is on ", pw.device());
    parts[i] = t;
  };
  if (plan.x_offset >= 0)
    part(0, plan.x_offset, plan.C, false);
  else
    TORCH_CHECK_VALUE(given.empty() || given[0].numel() == 0,
                      "msfused: project_parts[0] must be empty: x is not in the output");
  for (size_t b = 0; b < B; ++b) {
    const BranchPlan& bp = plan.branches[b];
    part(1 + b, bp.channel_offset, bp.out_channels, !convolves_resized(bp, k, plan.H, plan.W));
  }
  return parts;
}

std::pair<at::Tensor, at::Tensor> tap_maps_backward(const at::Tensor& dt, const at::Tensor& a, const at::Tensor& pw,
                                                    int64_t offset, bool need_w, at::MemoryFormat fmt) {
  const int64_t P = pw.size(0), k = pw.size(2), Cb = a.size(1);
  const at::ScalarType wide = dt.scalar_type();
  auto g = at::convolution_backward(dt, a.to(wide), tap_weight(pw, offset, Cb).to(wide), std::nullopt, {1, 1}, {0, 0},
                                    {1, 1}, false, {0, 0}, 1, {true, need_w, false});
  at::Tensor da = std::get<0>(g).to(a.scalar_type()).contiguous(fmt);
  // (k * k * P, Cb, 1, 1) back to the (P, Cb, k, k) layout of the weight's part
  at::Tensor dw = need_w ? std::get<1>(g).reshape({k, k, P, Cb}).permute({2, 3, 0, 1}) : at::Tensor();
  return {da, dw};
}

}  // namespace msfused
