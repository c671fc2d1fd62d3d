// The CPU backend's operators (the schemas are csrc/ops.cpp's), registered for the CPU key by register.cpp:
// the block's forward (forward.cpp) and backward (backward.cpp), and the block with its projection
// (projection_forward.cpp, projection_backward.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "../block_config.h"

namespace msfused {
namespace cpu {

using at::Tensor;
using TensorVector = std::vector<Tensor>;
using ForwardResult = std::tuple<Tensor, TensorVector, TensorVector, TensorVector, TensorVector>;
using BackwardResult = std::tuple<Tensor, TensorVector, TensorVector, TensorVector, TensorVector>;
using ProjectForwardResult =
    std::tuple<Tensor, TensorVector, TensorVector, TensorVector, TensorVector, Tensor, Tensor, Tensor>;
using ProjectBackwardResult =
    std::tuple<Tensor, TensorVector, TensorVector, TensorVector, TensorVector, Tensor, Tensor, Tensor, Tensor>;

ForwardResult multi_scale_forward_cpu(const Tensor& x_in, at::TensorList weight, const OptionalTensorList& bias,
                                      const OptionalTensorList& scale, const OptionalTensorList& shift,
                                      const c10::List<bool>& batch_stats, c10::ArrayRef<double> eps,
                                      c10::IntArrayRef factor, c10::IntArrayRef bins, c10::string_view down_mode,
                                      c10::string_view up_mode, bool align_corners, c10::string_view activation,
                                      c10::string_view input_position);

BackwardResult multi_scale_backward_cpu(const Tensor& grad_in, const Tensor& x_in, at::TensorList weight,
                                        const OptionalTensorList& scale, const OptionalTensorList& shift,
                                        at::TensorList level, at::TensorList pre, at::TensorList mean,
                                        at::TensorList var, const c10::List<bool>& batch_stats,
                                        c10::ArrayRef<double> eps, c10::IntArrayRef factor, c10::IntArrayRef bins,
                                        c10::string_view down_mode, c10::string_view up_mode, bool align_corners,
                                        c10::string_view activation, c10::string_view input_position,
                                        std::array<bool, 2> output_mask);

ProjectForwardResult multi_scale_project_forward_cpu(
    const Tensor& x_in, at::TensorList weight, const OptionalTensorList& bias, const OptionalTensorList& scale,
    const OptionalTensorList& shift, const c10::List<bool>& batch_stats, c10::ArrayRef<double> eps,
    c10::IntArrayRef factor, c10::IntArrayRef bins, c10::string_view down_mode, c10::string_view up_mode,
    bool align_corners, c10::string_view activation, c10::string_view input_position, const Tensor& pw,
    const std::optional<Tensor>& p_bias, const std::optional<Tensor>& p_scale, const std::optional<Tensor>& p_shift,
    bool p_batch_stats, double p_eps, c10::string_view p_activation, bool save_pre, at::TensorList project_parts);

ProjectBackwardResult multi_scale_project_backward_cpu(
    const Tensor& grad_in, const Tensor& x_in, at::TensorList weight, const OptionalTensorList& scale,
    const OptionalTensorList& shift, at::TensorList level, at::TensorList pre, at::TensorList mean, at::TensorList var,
    const c10::List<bool>& batch_stats, c10::ArrayRef<double> eps, c10::IntArrayRef factor, c10::IntArrayRef bins,
    c10::string_view down_mode, c10::string_view up_mode, bool align_corners, c10::string_view activation,
    c10::string_view input_position, const Tensor& pw, const std::optional<Tensor>& p_scale,
    const std::optional<Tensor>& p_shift, const Tensor& p_pre, const Tensor& p_mean, const Tensor& p_var,
    bool p_batch_stats, double p_eps, c10::string_view p_activation, std::array<bool, 2> output_mask);

}  // namespace cpu
}  // namespace msfused
