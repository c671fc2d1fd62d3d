// The projection's full-size parts (conv(x, W_x), a directly convolved branch's part) on the GPU backends for
// half-precision operands, summed in float32 and returned in float32 (SPEC.md: half precision accumulates in
// float32; the reference's one convolution rounds the whole sum once). cuDNN's convolution writes its output
// in the input's dtype, and a part rounded apart took the branches' gradient errors over SPEC's rule (the GPU
// check's c19); the CPU backend's answer is cpu/widened_conv.h. Here each tap is one batched GEMM with
// half-precision operands and a float32 result (ATen's baddbmm with out_dtype: cuBLAS on tensor cores) over a
// zero-padded copy of z, every tap a plain offset into its flattened pixels, the taps accumulating into one
// float32 buffer. Device-generic (ATen calls only): the CUDA backend (and its CPU emulation), the Triton backend
// (through msfused._C), and the tests on the CPU, where the products run on the operands widened to float32
// (exact: a product of two half-precision values is exact in float32).

#pragma once

#include <ATen/core/Tensor.h>

namespace msfused {

// conv(z, w) (stride 1, padding k / 2, no bias) in float32 of z (N, C, H, W) and w (P, C, k, k), both float16
// or both bfloat16, k odd: a float32 (N, P, H, W) view into a padded buffer, its pixels in z's layout
// (channels_last where z is channels_last-contiguous and not NCHW-contiguous, else NCHW).
at::Tensor tap_gemm_conv(const at::Tensor& z, const at::Tensor& w);

}  // namespace msfused
