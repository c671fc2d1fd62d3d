// The projection's x part on oneDNN (forward: projection_forward.cpp, backward: projection_backward.cpp).
// MKL's sgemm takes its AVX2 path on AMD CPUs: on the 2-core AMD EPYC of 2026-12-01 it ran the x part's
// products at about 0.2 TFLOP/s where oneDNN's AVX-512 kernels reached about 0.4. oneDNN is reached through
// the operators Inductor's CPU fusions call (mkldnn::_convolution_pointwise, its in-place form, and
// mkldnn::_linear_pointwise), found in the dispatcher; where torch has none, ATen's conv2d / mm instead.
#pragma once

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <vector>

#if defined(__unix__)
#include <sys/mman.h>
#endif

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

// dst = conv(x, w) for a 1x1 w, all channels_last, in dst's memory: the in-place form, which adds the product
// into a tensor (here zeros), so that a band's product reuses one buffer.
inline void conv1x1_into(at::Tensor& dst, const at::Tensor& x, const at::Tensor& w) {
  static const std::optional<c10::OperatorHandle> op = find_op("mkldnn::_convolution_pointwise_", "binary", 13);
  if (!op) {
    dst.copy_(at::conv2d(x, w));
    return;
  }
  dst.zero_();
  const std::vector<int64_t> zeros{0, 0}, ones{1, 1};
  torch::jit::Stack stack{dst, x, w, c10::IValue(), zeros, ones, ones, int64_t(1), "add", c10::Scalar(1.0),
                          c10::IValue(), c10::List<std::optional<c10::Scalar>>(), c10::IValue()};
  op->callBoxed(&stack);
}

// a b^T for row-major a (M, K) and b (O, K): oneDNN's inner product, b as its weight.
inline at::Tensor linear(const at::Tensor& a, const at::Tensor& b) {
  static const std::optional<c10::OperatorHandle> op = find_op("mkldnn::_linear_pointwise", "", 6);
  if (!op) return at::mm(a, b.t());
  torch::jit::Stack stack{a, b, c10::IValue(), "none", c10::List<std::optional<c10::Scalar>>(), c10::IValue()};
  op->callBoxed(&stack);
  return stack.back().toTensor();
}

// dst (cols, rows), contiguous = the transpose of src's (rows, cols), rows ld apart: 8 x 8 tiles through a
// local array, so that both the reads and the writes run along memory (about 7x ATen's strided copy on the
// workloads' bands), over all threads.
template <typename scalar_t>
void transpose_into(const scalar_t* src, int64_t rows, int64_t cols, int64_t ld, scalar_t* dst) {
  constexpr int64_t kTile = 8;
  const int64_t blocks = (cols + kTile - 1) / kTile;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t p0 = block * kTile, p1 = std::min(cols, p0 + kTile);
      for (int64_t c0 = 0; c0 < rows; c0 += kTile) {
        const int64_t c1 = std::min(rows, c0 + kTile);
        if (p1 - p0 == kTile && c1 - c0 == kTile) {
          scalar_t t[kTile][kTile];
          for (int64_t i = 0; i < kTile; ++i)
            for (int64_t j = 0; j < kTile; ++j) t[j][i] = src[(c0 + i) * ld + p0 + j];
          for (int64_t j = 0; j < kTile; ++j)
            for (int64_t i = 0; i < kTile; ++i) dst[(p0 + j) * rows + c0 + i] = t[j][i];
        } else {
          for (int64_t q = p0; q < p1; ++q)
            for (int64_t c = c0; c < c1; ++c) dst[q * rows + c] = src[c * ld + q];
        }
      }
    }
  });
}

// Scratch for the x part's bands and transposes, kept per calling thread between calls and grown to the
// largest asked for: on a VM a fresh 10 MiB costs about 2.5k page faults (~3 ms, 15% of psp_decoder_smp's
// forward there). Its own mapping where there is mmap, so that a long-lived buffer does not split malloc's
// heap (whose large free blocks let a later large tensor, such as the output, reuse pages already mapped);
// plain memory, not a tensor, so that nothing of torch's is left to free at thread or process exit. The
// forward and the backward use it in turn (nothing in it outlives a call).
inline void* band_workspace(int64_t bytes) {
  struct Buffer {
    void* p = nullptr;
    size_t size = 0;
    void release() {
#if defined(__unix__)
      if (p) munmap(p, size);
#else
      std::free(p);
#endif
      p = nullptr;
      size = 0;
    }
    ~Buffer() { release(); }
  };
  thread_local Buffer buf;
  if (static_cast<size_t>(bytes) > buf.size) {
    buf.release();
    const size_t rounded = (static_cast<size_t>(bytes) + 4095) / 4096 * 4096;
#if defined(__unix__)
    void* p = mmap(nullptr, rounded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "msfused: cannot map ", rounded, " bytes for the projection's x part");
#else
    void* p = std::aligned_alloc(4096, rounded);
    TORCH_CHECK(p, "msfused: cannot allocate ", rounded, " bytes for the projection's x part");
#endif
    buf.p = p;
    buf.size = rounded;
  }
  return buf.p;
}

}  // namespace detail
}  // namespace cpu
}  // namespace msfused
