// The projection's x part on oneDNN (forward: projection_forward.cpp, backward: projection_backward.cpp).
// MKL's sgemm takes its AVX2 path on AMD CPUs: on the 2-core AMD EPYC of 2026-12-01 it ran the x part's
// products at about 0.2 TFLOP/s where oneDNN's AVX-512 kernels reached about 0.4. oneDNN is reached through
// the operators Inductor's CPU fusions call (mkldnn::_convolution_pointwise and mkldnn::_linear_pointwise),
// found in the dispatcher; where torch has none, ATen's conv2d / mm instead.
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/mm.h>

#include <optional>
#include <vector>

namespace msfused {
namespace cpu {
namespace detail {

// Whether a projection's x part (conv(x, W_x), the bulk of a head's FLOPs) runs on oneDNN: a 1x1 kernel in
// float32 with oneDNN on (torch.backends.mkldnn). Where MKL runs AVX-512 the two are about even.
inline bool x_part_on_onednn(int64_t k, const at::Tensor& x) {
  return k == 1 && x.scalar_type() == at::kFloat && at::hasMKLDNN() && at::globalContext().userEnabledMkldnn();
}

// The operator, where torch registers it with the schema these calls push (its argument count): else none,
// and the caller's ATen fallback runs.
inline std::optional<c10::OperatorHandle> find_op(const char* name, const char* overload, size_t arguments) {
  auto op = c10::Dispatcher::singleton().findOp({name, overload});
  if (op && op->hasSchema() && op->schema().arguments().size() == arguments) return op;
  return std::nullopt;
}

// conv(x, w) for a 1x1 w, as a new channels_last tensor.
inline at::Tensor conv1x1(const at::Tensor& x, const at::Tensor& w) {
  static const std::optional<c10::OperatorHandle> op = find_op("mkldnn::_convolution_pointwise", "", 10);
  if (!op) return at::conv2d(x, w).contiguous(at::MemoryFormat::ChannelsLast);
  const std::vector<int64_t> zeros{0, 0}, ones{1, 1};
  torch::jit::Stack stack{x, w, c10::IValue(), zeros, ones, ones, int64_t(1), "none",
                          c10::List<std::optional<c10::Scalar>>(), c10::IValue()};
  op->callBoxed(&stack);
  return stack.back().toTensor().contiguous(at::MemoryFormat::ChannelsLast);
}

// a b^T for a row-major a (M, K) and a b (O, K) of any strides (the transposed view of a (K, O) block serves):
// oneDNN's inner product, b as its weight.
inline at::Tensor linear(const at::Tensor& a, const at::Tensor& b) {
  static const std::optional<c10::OperatorHandle> op = find_op("mkldnn::_linear_pointwise", "", 6);
  if (!op) return at::mm(a, b.t());
  torch::jit::Stack stack{a, b, c10::IValue(), "none", c10::List<std::optional<c10::Scalar>>(), c10::IValue()};
  op->callBoxed(&stack);
  return stack.back().toTensor();
}

}  // namespace detail
}  // namespace cpu
}  // namespace msfused
