// The block configuration as the kernels see it: the operator's arguments checked and turned into one
// plan per branch (level size, resize kinds, channel offset in the output). Shared by every device's
// kernels and by the autograd kernel; the schema itself lives in ops.cpp.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <vector>

#include "activation.h"
#include "resize.h"

namespace msfused {

struct BranchPlan {
  int64_t factor = 0;  // >= 1 for a factor branch, 0 for a bins branch
  int64_t level_h = 0, level_w = 0;  // the size the branch works at
  int64_t out_channels = 0, kernel_size = 0;
  int64_t channel_offset = 0;  // first channel of this branch in the output
  bool identity = false;  // factor 1: the level is x itself (no resize, no saved level)
  bool batch_stats = false;  // its norm normalises with the batch's statistics
  double eps = 0;
  ResizeKind down_h = ResizeKind::Identity, down_w = ResizeKind::Identity;  // x -> level, per axis
  ResizeKind up_h = ResizeKind::Identity, up_w = ResizeKind::Identity;  // level -> output, per axis
};

struct BlockPlan {
  int64_t N = 0, C = 0, H = 0, W = 0, out_channels = 0;
  int64_t x_offset = -1;  // first channel of x in the output, -1 if x is not part of it
  bool align_corners = false;
  Activation activation = Activation::None;
  std::vector<BranchPlan> branches;
};

using OptionalTensorList = c10::List<std::optional<at::Tensor>>;

// 'relu', 'silu', 'gelu' or 'none' (a clear error otherwise).
Activation parse_activation(std::string_view name);

// Checks the operator's arguments (the Python layer has checked them already with friendlier messages;
// these guard C++ callers) and builds the plan for an input x.
BlockPlan make_plan(const at::Tensor& x, at::TensorList weight, const c10::List<bool>& batch_stats,
                    c10::ArrayRef<double> eps, c10::IntArrayRef factor, c10::IntArrayRef bins,
                    std::string_view down_mode, std::string_view up_mode, bool align_corners,
                    std::string_view activation, std::string_view input_position);

// Checks multi_scale_backward's saved per-branch tensors (one of each per branch) and grad_out's shape.
void check_backward_args(const BlockPlan& plan, const at::Tensor& grad_out, at::TensorList level, at::TensorList pre,
                         at::TensorList mean, at::TensorList var, const OptionalTensorList& scale,
                         const OptionalTensorList& shift);

// Checks the parameters against x (both devices' kernels): x floating point; weight and bias in x's dtype;
// weight, bias, scale and shift on x's device. Names the offending argument.
void check_parameters(const at::Tensor& x, at::TensorList weight, const OptionalTensorList& bias,
                      const OptionalTensorList& scale, const OptionalTensorList& shift);

// True when every branch pools x to 1x1 (bins (1, 1)) and x is not part of the output: image pooling.
// Such a block factorises as x's spatial mean, the block on that 1x1 level, and a broadcast back up,
// so its backward can run on the 1x1 problem (autograd/).
bool pooled_only(c10::IntArrayRef factor, c10::IntArrayRef bins, std::string_view input_position);

// The dtype batch statistics and fp32-accumulated per-channel values are kept in.
inline at::ScalarType stats_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

}  // namespace msfused
