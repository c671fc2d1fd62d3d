// The projection's full-size parts (conv(x, W_x), a directly convolved branch's part) for half-precision
// operands, summed in float32 and returned in float32 (SPEC.md: half precision accumulates in float32; the
// reference's one convolution rounds the whole sum once). ATen's convolution rounds its output to the input's
// dtype, and neither ATen nor its oneDNN operators give a float32 product of bfloat16 operands on the CPU;
// rounded apart, x's part took the branches' gradient errors over SPEC's rule (the GPU check's c19). So these
// run oneDNN's matrix micro-kernel (ATen's cpublas::brgemm: bfloat16 x bfloat16 -> float32, B in VNNI pairs) on
// the layouts as they lie; where it is unavailable (no AVX-512, float16 without AVX512-FP16, oneDNN off,
// channels_last with an odd channel count), the convolution of the operands widened to float32 (exact: their
// products are exact in float32; in bfloat16 2-4x the micro-kernel's time, docs/BACKENDS.md).

#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace msfused {
namespace cpu {
namespace detail {

// conv(z, w) (stride 1, padding k / 2) in float32 of a half-precision z (N, C, H, W) and w (P, C, k, k): a
// float32 tensor (N, P, H, W) in `cl`'s layout (contiguous: channels_last when cl, else NCHW), z in that
// layout too.
at::Tensor widened_conv(const at::Tensor& z, const at::Tensor& w, bool cl);

// The same convolution over bands of z, the weight packed for oneDNN's micro-kernel once (construction), each
// band run on it: only where widened_on_ukernel(z, cl).
class WidenedConv {
 public:
  WidenedConv(const at::Tensor& w, bool cl);
  // Samples [n0, n1) and output rows [r0, r1) of conv(z, w) into out, (n1 - n0, P, r1 - r0, W) in cl's layout.
  void run(const at::Tensor& z, int64_t n0, int64_t n1, int64_t r0, int64_t r1, float* out) const;

 private:
  at::Tensor packed_;  // w as the micro-kernel's A (NCHW) or B (channels_last): widened_conv.cpp
  bool cl_;
  int64_t C_, P_, k_;
};

// Whether widened_conv of z runs on oneDNN's micro-kernel (else on the float32 convolution).
bool widened_on_ukernel(const at::Tensor& z, bool cl);

// Whether oneDNN's micro-kernel takes `dtype` operands on this CPU and build (torch.backends.mkldnn aside):
// what `python -m msfused info` reports.
bool ukernel_available(at::ScalarType dtype);

}  // namespace detail
}  // namespace cpu
}  // namespace msfused
