// The projection's x part on oneDNN (forward: projection_forward.cpp, backward: projection_backward.cpp).
// MKL's sgemm takes its AVX2 path on AMD CPUs: on the 2-core AMD EPYC of 2026-12-01 it ran the x part's
// products at about 0.2 TFLOP/s where oneDNN's AVX-512 kernels reached about 0.4. oneDNN is reached through
// the operators Inductor's CPU fusions call (mkldnn::_convolution_pointwise and mkldnn::_linear_pointwise),
// found in the dispatcher; where torch has none, ATen's conv2d / mm instead.
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
#include <type_traits>
#include <vector>

#if defined(__unix__)
#include <sys/mman.h>
#endif
#if defined(__SSE2__)
#include <xmmintrin.h>
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

// a b^T for a row-major a (M, K) and a b (O, K) of any strides (the transposed view of a (K, O) block serves):
// oneDNN's inner product, b as its weight.
inline at::Tensor linear(const at::Tensor& a, const at::Tensor& b) {
  static const std::optional<c10::OperatorHandle> op = find_op("mkldnn::_linear_pointwise", "", 6);
  if (!op) return at::mm(a, b.t());
  torch::jit::Stack stack{a, b, c10::IValue(), "none", c10::List<std::optional<c10::Scalar>>(), c10::IValue()};
  op->callBoxed(&stack);
  return stack.back().toTensor();
}

// dst (cols, rows), contiguous = the transpose of src's (rows, cols), rows ld apart, over all threads. A
// block of kTile columns (a 64-byte line of float32 at each source row) against every row in turn, so that
// the reads take whole lines and the writes fill the block's destination rows (rows apart) in order; float
// in 4 x 4 SSE transposes (on the 2-core AMD EPYC, 2.7x the 8 x 8 scalar tiles of before on psp_decoder_smp's
// (512, 4096) planes in its backward, 1.8x on (128, 4096) ones).
template <typename scalar_t>
void transpose_into(const scalar_t* src, int64_t rows, int64_t cols, int64_t ld, scalar_t* dst) {
  constexpr int64_t kTile = 16;
  const int64_t blocks = (cols + kTile - 1) / kTile;
  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t p0 = block * kTile, p1 = std::min(cols, p0 + kTile);
      int64_t c0 = 0;
#if defined(__SSE2__)
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (p1 - p0 == kTile)
          for (; c0 + 4 <= rows; c0 += 4) {
            const float* s = src + c0 * ld + p0;
            for (int64_t j = 0; j < kTile; j += 4) {
              __m128 r0 = _mm_loadu_ps(s + j), r1 = _mm_loadu_ps(s + ld + j), r2 = _mm_loadu_ps(s + 2 * ld + j),
                     r3 = _mm_loadu_ps(s + 3 * ld + j);
              _MM_TRANSPOSE4_PS(r0, r1, r2, r3);  // r_i: column p0 + j + i at rows c0 .. c0 + 3
              float* d = dst + (p0 + j) * rows + c0;
              _mm_storeu_ps(d, r0);
              _mm_storeu_ps(d + rows, r1);
              _mm_storeu_ps(d + 2 * rows, r2);
              _mm_storeu_ps(d + 3 * rows, r3);
            }
          }
      }
#endif
      for (int64_t q = p0; q < p1; ++q)
        for (int64_t c = c0; c < rows; ++c) dst[q * rows + c] = src[c * ld + q];
    }
  });
}

// Scratch for the x part's transposes in the backward, kept per calling thread between calls and grown to
// the largest asked for: on a VM a fresh 10 MiB costs about 2.5k page faults (~3 ms, 15% of psp_decoder_smp's
// forward there). Its own mapping where there is mmap, so that a long-lived buffer does not split malloc's
// heap (whose large free blocks let a later large tensor, such as the output, reuse pages already mapped);
// plain memory, not a tensor, so that nothing of torch's is left to free at thread or process exit. Nothing in
// it outlives a call.
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
