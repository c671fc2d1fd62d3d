// tap_gemm_conv (tap_gemm.h). With p = k / 2 and z zero-padded to (Hp, Wp) = (H + 2p, W + 2p), output pixel
// (i, j) sits at padded pixel q = (i + p) * Wp + (j + p), and tap (ky, kx) reads padded pixel q + (ky - p) * Wp
// + (kx - p): one constant offset per tap over the flattened pixels. So each tap is one GEMM over a contiguous
// run of pixels, from the first output pixel's q to the last one's (the padding columns between rows come
// along, computed and never read; channels_last runs through the whole batch at once, its shifted reads of an
// output pixel never leave its sample's padded map):
//   * NCHW: buf (N, P, Hp * Wp)[:, :, run] (+)= W_tap (P, C) times zp (N, C, Hp * Wp)[:, :, run + offset];
//   * channels_last: buf (N * Hp * Wp, P)[run] (+)= zp (N * Hp * Wp, C)[run + offset] times W_tap^T (C, P).
// The taps add in a fixed order (the same bits run after run); the result is buf's interior, a strided view.

#include "tap_gemm.h"

#include <ATen/ATen.h>
#include <torch/library.h>
#include <c10/util/Exception.h>

namespace msfused {
namespace {

// out (B, M, N) = a (B, M, K) b (B, K, N) in float32, added to out's values where accumulate (else out's
// values, NaN included, are ignored: beta 0). On the GPU one batched GEMM of the half-precision operands with a
// float32 result; on the CPU (the tests, the CUDA backend's emulation) the operands widened to float32, whose
// products are exact, as the GPU's are; on meta tensors (shapes only: the CUDA plan's record, fake tensors)
// bmm's, as ATen's meta baddbmm with out_dtype fails (torch 2.13).
void gemm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const double beta = accumulate ? 1.0 : 0.0;
  if (out.is_cpu())
    out.baddbmm_(a.to(at::kFloat), b.to(at::kFloat), beta, 1.0);
  else if (out.is_meta())
    at::bmm_out(out, a, b, at::kFloat);
  else
    at::baddbmm_out(out, out, a, b, at::kFloat, beta, 1.0);
}

}  // namespace

at::Tensor tap_gemm_conv(const at::Tensor& z, const at::Tensor& w) {
  TORCH_CHECK_VALUE(z.dim() == 4 && w.dim() == 4 && w.size(1) == z.size(1) && w.size(2) == w.size(3) &&
                        w.size(2) % 2 == 1,
                    "msfused: tap_gemm_conv takes z (N, C, H, W) and w (P, C, k, k) with k odd, got ", z.sizes(),
                    " and ", w.sizes());
  TORCH_CHECK_TYPE((z.scalar_type() == at::kHalf || z.scalar_type() == at::kBFloat16) &&
                       w.scalar_type() == z.scalar_type(),
                   "msfused: tap_gemm_conv takes float16 or bfloat16 z and w of one dtype, got ", z.scalar_type(),
                   " and ", w.scalar_type());
  const int64_t N = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3), P = w.size(0), k = w.size(2);
  const int64_t p = k / 2, Hp = H + 2 * p, Wp = W + 2 * p, L = Hp * Wp;
  const bool cl = z.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto fopts = z.options().dtype(at::kFloat);
  if (N * H * W * P == 0 || C == 0) return at::zeros({N, P, H, W}, fopts.memory_format(fmt));
  // z zero-padded, pixels of one sample consecutive: (N, Hp, Wp, C) channels_last, (N, C, Hp, Wp) NCHW.
  const at::Tensor z_pix = cl ? z.permute({0, 2, 3, 1}) : z;
  at::Tensor zp = z_pix.contiguous();
  if (p > 0) {
    zp = at::zeros(cl ? at::IntArrayRef{N, Hp, Wp, C} : at::IntArrayRef{N, C, Hp, Wp}, z.options());
    zp.narrow(cl ? 1 : 2, p, H).narrow(cl ? 2 : 3, p, W).copy_(z_pix);
  }
  // The run of padded pixels from the first output pixel to the last (of the batch: channels_last; of a
  // sample: NCHW), and each tap's offset into the padded map.
  const int64_t first = p * Wp + p, last = (cl ? (N - 1) * L : 0) + (H - 1 + p) * Wp + (W - 1 + p);
  const int64_t run = last - first + 1;
  // The weight a tap at a time: (k * k, C, P) channels_last (B operands), (k * k, P, C) NCHW (A operands).
  const at::Tensor w_taps = (cl ? w.permute({2, 3, 1, 0}) : w.permute({2, 3, 0, 1})).reshape({k * k, -1}).contiguous();
  at::Tensor buf = at::empty(cl ? at::IntArrayRef{1, N * L, P} : at::IntArrayRef{N, P, L}, fopts);
  for (int64_t ky = 0; ky < k; ++ky) {
    for (int64_t kx = 0; kx < k; ++kx) {
      const int64_t offset = (ky - p) * Wp + (kx - p);
      const bool accumulate = ky > 0 || kx > 0;
      const at::Tensor w_tap = w_taps[ky * k + kx];
      if (cl)
        gemm_into(buf.narrow(1, first, run), zp.view({1, N * L, C}).narrow(1, first + offset, run),
                  w_tap.view({1, C, P}), accumulate);
      else
        gemm_into(buf.narrow(2, first, run), w_tap.view({1, P, C}).expand({N, P, C}),
                  zp.view({N, C, L}).narrow(2, first + offset, run), accumulate);
    }
  }
  if (cl) return buf.view({N, Hp, Wp, P}).narrow(1, p, H).narrow(2, p, W).permute({0, 3, 1, 2});
  return buf.view({N, P, Hp, Wp}).narrow(2, p, H).narrow(3, p, W);
}

// An operator for the Triton backend (Python) and the tests; the CUDA backend calls the function. Composite:
// the same code on every device, meta tensors included (the fake kernel). The CUDA backend's emulation build
// compiles this file for the function only (the operator is the main library's).
#ifndef MSFUSED_CUDA_EMULATION
TORCH_LIBRARY_IMPL(msfused, CompositeExplicitAutograd, m) { m.impl("tap_gemm_conv", &tap_gemm_conv); }
#endif

}  // namespace msfused
