// Every msfused operator's schema, defined once. Kernels are registered per device beside their code
// (cpu/, cuda/), autograd in autograd/, fake (meta) kernels in Python (msfused/_ops.py).
//
// multi_scale_forward computes the whole block (SPEC.md). Per branch b: weight[b] (Cb, C, k, k), optional
// bias[b]; the epilogue y = scale[b] * conv + shift[b] (an eval-mode norm folded by the caller, either may
// be None), or, where batch_stats[b], y = (conv - mean) / sqrt(var + eps[b]) * scale[b] + shift[b] with
// the batch's statistics; then the activation. factor[b] >= 1 gives a factor level, factor[b] == 0 the
// bins (bins[2b], bins[2b + 1]). Besides the output it returns what backward needs and what the caller
// needs to update running statistics: per branch the level (empty for factor 1, where it is x itself),
// the convolution output with its bias, and the batch mean and biased variance (empty without
// batch_stats). It never mutates its inputs.
//
// multi_scale_project_forward computes the block followed by its projection (SPEC.md, "The projection"):
// act(norm(conv(cat, project_weight, project_bias))) with project_weight (P, C_out, k, k), the norm as a
// branch's (project_scale, project_shift, project_batch_stats, project_eps), project_activation as the
// block's; the concatenation itself is never built. Besides the branches' saved tensors it returns the
// projection's pre-activation (bias included) and its batch mean and biased variance (empty without
// batch statistics); with save_pre False (nothing will be differentiated) the pre-activation comes back
// empty and the output may be computed in its place. project_parts: empty, or project_weight's parts in the
// layouts the forward convolves them in (csrc/projection.h, projection_parts), precomputed by a caller that
// keeps them per version of the weight; they carry no gradient (project_weight's flows through project_weight).
// Its backward returns the block's gradients plus the projection's weight (if output_mask[1]), bias, scale and
// shift gradients.
#include <torch/library.h>

TORCH_LIBRARY(msfused, m) {
  m.def(
      "multi_scale_forward(Tensor x, Tensor[] weight, Tensor?[] bias, Tensor?[] scale, Tensor?[] shift, "
      "bool[] batch_stats, float[] eps, int[] factor, int[] bins, str down_mode, str up_mode, "
      "bool align_corners, str activation, str input_position) "
      "-> (Tensor out, Tensor[] level, Tensor[] pre, Tensor[] mean, Tensor[] var)",
      {at::Tag::pt2_compliant_tag});
  // Gradients of x (if output_mask[0], else an empty tensor), of every weight (if output_mask[1]), and of
  // every bias, scale and shift (empty where the forward had None).
  m.def(
      "multi_scale_backward(Tensor grad_out, Tensor x, Tensor[] weight, Tensor?[] scale, Tensor?[] shift, "
      "Tensor[] level, Tensor[] pre, Tensor[] mean, Tensor[] var, bool[] batch_stats, float[] eps, "
      "int[] factor, int[] bins, str down_mode, str up_mode, bool align_corners, str activation, "
      "str input_position, bool[2] output_mask) "
      "-> (Tensor grad_x, Tensor[] grad_weight, Tensor[] grad_bias, Tensor[] grad_scale, Tensor[] grad_shift)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "multi_scale_project_forward(Tensor x, Tensor[] weight, Tensor?[] bias, Tensor?[] scale, Tensor?[] shift, "
      "bool[] batch_stats, float[] eps, int[] factor, int[] bins, str down_mode, str up_mode, "
      "bool align_corners, str activation, str input_position, Tensor project_weight, Tensor? project_bias, "
      "Tensor? project_scale, Tensor? project_shift, bool project_batch_stats, float project_eps, "
      "str project_activation, bool save_pre, Tensor[] project_parts) "
      "-> (Tensor out, Tensor[] level, Tensor[] pre, Tensor[] mean, Tensor[] var, Tensor project_pre, "
      "Tensor project_mean, Tensor project_var)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "multi_scale_project_backward(Tensor grad_out, Tensor x, Tensor[] weight, Tensor?[] scale, "
      "Tensor?[] shift, Tensor[] level, Tensor[] pre, Tensor[] mean, Tensor[] var, bool[] batch_stats, "
      "float[] eps, int[] factor, int[] bins, str down_mode, str up_mode, bool align_corners, str activation, "
      "str input_position, Tensor project_weight, Tensor? project_scale, Tensor? project_shift, "
      "Tensor project_pre, Tensor project_mean, Tensor project_var, bool project_batch_stats, "
      "float project_eps, str project_activation, bool[2] output_mask) "
      "-> (Tensor grad_x, Tensor[] grad_weight, Tensor[] grad_bias, Tensor[] grad_scale, Tensor[] grad_shift, "
      "Tensor grad_project_weight, Tensor grad_project_bias, Tensor grad_project_scale, "
      "Tensor grad_project_shift)",
      {at::Tag::pt2_compliant_tag});
}
