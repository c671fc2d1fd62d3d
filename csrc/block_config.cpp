#include "block_config.h"

#include <c10/util/Exception.h>

namespace msfused {
namespace {

ResizeKind down_kind(std::string_view mode) {
  if (mode == "avg") return ResizeKind::AvgFactor;
  if (mode == "bilinear") return ResizeKind::Linear;
  if (mode == "nearest") return ResizeKind::Nearest;
  TORCH_CHECK_VALUE(false, "msfused: down_mode must be 'avg', 'bilinear' or 'nearest', got '", mode, "'");
}

ResizeKind up_kind(std::string_view mode) {
  if (mode == "bilinear") return ResizeKind::Linear;
  if (mode == "nearest") return ResizeKind::Nearest;
  TORCH_CHECK_VALUE(false, "msfused: up_mode must be 'bilinear' or 'nearest', got '", mode, "'");
}

}  // namespace

Activation parse_activation(std::string_view name) {
  if (name == "none") return Activation::None;
  if (name == "relu") return Activation::Relu;
  if (name == "silu") return Activation::Silu;
  if (name == "gelu") return Activation::Gelu;
  TORCH_CHECK_VALUE(false, "msfused: activation must be 'relu', 'silu', 'gelu' or 'none', got '", name, "'");
}

BlockPlan make_plan(const at::Tensor& x, at::TensorList weight, const c10::List<bool>& batch_stats,
                    c10::ArrayRef<double> eps, c10::IntArrayRef factor, c10::IntArrayRef bins,
                    std::string_view down_mode, std::string_view up_mode, bool align_corners,
                    std::string_view activation, std::string_view input_position) {
  TORCH_CHECK_VALUE(x.dim() == 4, "msfused: x must be 4-D (N, C, H, W), got ", x.dim(), " dimensions");
  const int64_t B = static_cast<int64_t>(weight.size());
  TORCH_CHECK_VALUE(B >= 1, "msfused: weight must hold at least one branch");
  TORCH_CHECK_VALUE(static_cast<int64_t>(factor.size()) == B && static_cast<int64_t>(bins.size()) == 2 * B &&
                        static_cast<int64_t>(batch_stats.size()) == B && static_cast<int64_t>(eps.size()) == B,
                    "msfused: factor, batch_stats and eps need one entry per branch and bins two (", B,
                    " branches)");
  BlockPlan plan;
  plan.N = x.size(0);
  plan.C = x.size(1);
  plan.H = x.size(2);
  plan.W = x.size(3);
  TORCH_CHECK_VALUE(plan.H >= 1 && plan.W >= 1, "msfused: x has an empty map (H = ", plan.H, ", W = ", plan.W,
                    "); H and W must be at least 1");
  plan.align_corners = align_corners;
  plan.activation = parse_activation(activation);
  const ResizeKind down = down_kind(down_mode);
  const ResizeKind up = up_kind(up_mode);

  int64_t offset = 0;
  if (input_position == "first") {
    plan.x_offset = 0;
    offset = plan.C;
  } else {
    TORCH_CHECK_VALUE(input_position == "last" || input_position == "none",
                      "msfused: input_position must be 'first', 'last' or 'none', got '", input_position, "'");
  }
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor& w = weight[b];
    TORCH_CHECK_VALUE(w.dim() == 4 && w.size(2) == w.size(3) && w.size(2) % 2 == 1,
                      "msfused: weight[", b, "] must be (Cb, C, k, k) with k odd, got ", w.sizes());
    TORCH_CHECK_VALUE(w.size(1) == plan.C, "msfused: weight[", b, "] expects ", w.size(1),
                      " input channels, x has ", plan.C);
    TORCH_CHECK_VALUE(w.size(0) >= 1, "msfused: weight[", b, "] has no output channels");
    BranchPlan p;
    p.factor = factor[b];
    p.out_channels = w.size(0);
    p.kernel_size = w.size(2);
    p.batch_stats = batch_stats.get(b);
    p.eps = eps[b];
    p.channel_offset = offset;
    offset += p.out_channels;
    if (p.factor > 0) {
      p.level_h = plan.H / p.factor;
      p.level_w = plan.W / p.factor;
      p.identity = p.factor == 1;
      const ResizeKind k = p.identity ? ResizeKind::Identity : down;
      p.down_h = p.down_w = k;
    } else {
      TORCH_CHECK_VALUE(p.factor == 0 && bins[2 * b] >= 1 && bins[2 * b + 1] >= 1, "msfused: branch ", b,
                        " needs a factor >= 1 or bins >= 1, got factor ", p.factor, " and bins (", bins[2 * b],
                        ", ", bins[2 * b + 1], ")");
      p.level_h = bins[2 * b];
      p.level_w = bins[2 * b + 1];
      p.down_h = p.down_w = ResizeKind::Adaptive;
    }
    TORCH_CHECK_VALUE(p.level_h >= 1 && p.level_w >= 1, "msfused: branch ", b, " (factor ", p.factor,
                      ") gives a level of ", p.level_h, "x", p.level_w, " for x of ", plan.H, "x", plan.W,
                      "; a level must be at least 1x1");
    p.up_h = p.level_h == plan.H ? ResizeKind::Identity : up;
    p.up_w = p.level_w == plan.W ? ResizeKind::Identity : up;
    plan.branches.push_back(p);
  }
  if (input_position == "last") {
    plan.x_offset = offset;
    offset += plan.C;
  }
  plan.out_channels = offset;
  return plan;
}

void check_backward_args(const BlockPlan& plan, const at::Tensor& grad_out, at::TensorList level, at::TensorList pre,
                         at::TensorList mean, at::TensorList var, const OptionalTensorList& scale,
                         const OptionalTensorList& shift) {
  const size_t B = plan.branches.size();
  TORCH_CHECK_VALUE(level.size() == B && pre.size() == B && mean.size() == B && var.size() == B &&
                        scale.size() == B && shift.size() == B,
                    "msfused: backward needs one saved level, pre-activation, mean and var per branch");
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == plan.N && grad_out.size(1) == plan.out_channels &&
                        grad_out.size(2) == plan.H && grad_out.size(3) == plan.W,
                    "msfused: grad_out must have the output's shape (", plan.N, ", ", plan.out_channels, ", ", plan.H,
                    ", ", plan.W, "), got ", grad_out.sizes());
}

void check_parameters(const at::Tensor& x, at::TensorList weight, const OptionalTensorList& bias,
                      const OptionalTensorList& scale, const OptionalTensorList& shift) {
  TORCH_CHECK_TYPE(c10::isFloatingType(x.scalar_type()), "msfused: x must be a floating-point tensor, got ",
                   x.scalar_type());
  auto same_device = [&](const at::Tensor& t, const char* name, size_t b) {
    TORCH_CHECK_VALUE(t.device() == x.device(), "msfused: ", name, "[", b, "] is on ", t.device(), " but x is on ",
                      x.device());
  };
  for (size_t b = 0; b < weight.size(); ++b) {
    TORCH_CHECK_TYPE(weight[b].scalar_type() == x.scalar_type(), "msfused: weight[", b, "] has dtype ",
                     weight[b].scalar_type(), " but x has ", x.scalar_type());
    same_device(weight[b], "weight", b);
  }
  for (size_t b = 0; b < bias.size(); ++b) {
    const std::optional<at::Tensor> t = bias.get(b);
    if (!t.has_value() || !t->defined()) continue;
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), "msfused: bias[", b, "] has dtype ", t->scalar_type(),
                     " but x has ", x.scalar_type());
    same_device(*t, "bias", b);
  }
  for (const auto* list : {&scale, &shift})
    for (size_t b = 0; b < list->size(); ++b) {
      const std::optional<at::Tensor> t = list->get(b);
      if (t.has_value() && t->defined()) same_device(*t, list == &scale ? "scale" : "shift", b);
    }
}

bool pooled_only(c10::IntArrayRef factor, c10::IntArrayRef bins, std::string_view input_position) {
  if (input_position != "none" || factor.empty() || bins.size() < 2 * factor.size()) return false;
  for (size_t b = 0; b < factor.size(); ++b)
    if (factor[b] != 0 || bins[2 * b] != 1 || bins[2 * b + 1] != 1) return false;
  return true;
}

}  // namespace msfused
