// widened_conv (widened_conv.h): a half-precision convolution summed in float32, on oneDNN's matrix
// micro-kernel (ATen's cpublas::brgemm, C (M x N, float32) (+)= A (M x K) B (K x N), B in VNNI pairs: rows
// 2i and 2i + 1 of B interleaved, element (k, n) at ((k / 2) * ld_b + n) * 2 + k % 2).
//   * NCHW: per output channel block and pixel run, out = sum over taps of W_tap (A: the weight repacked
//     (k * k, P, C rounded up to even)) times x's band shifted by the tap (B: the band's rows with a halo of k / 2
//     zero rows and columns, packed in channel pairs once per call, so that every tap is a plain offset into it).
//   * channels_last: per row, column block and output channel block, out = sum over taps of x's rows shifted
//     by the tap (A: x as it lies, C channels a row) times W_tap^T (B: the weight packed in channel pairs);
//     the centre tap covers every output and goes first, the others add where their shift stays inside the
//     map (the zero padding contributes nothing).

#include "widened_conv.h"

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#include "common.h"

// ATen's CPUBlas.h includes oneDNN's micro-kernel header in x86 builds with oneDNN; a torch that ships without
// it gets the float32 convolution instead of a build error.
#if defined(__has_include)
#if __has_include(<ATen/native/CPUBlas.h>) && (!(defined(__x86_64__) || defined(_M_X64)) || __has_include(<oneapi/dnnl/dnnl_ukernel.hpp>))
#define MSFUSED_HAVE_BRGEMM 1
#include <ATen/native/CPUBlas.h>
#endif
#endif

namespace msfused {
namespace cpu {
namespace detail {
namespace {
#ifdef MSFUSED_HAVE_BRGEMM

namespace blas = at::native::cpublas;

// Block sizes of one micro-kernel call (measured on the 2-core AMD EPYC, bfloat16, 2048 -> 512 channels:
// 64-128 x 128-256 all ran within 10% of oneDNN's bfloat16 convolution).
constexpr int64_t kChannelsM = 64;  // NCHW: output channels per call (M)
constexpr int64_t kPixelsN = 256;   // NCHW 1x1: pixels per call (N); k x k: one output row
constexpr int64_t kColumnsM = 64;   // channels_last: output columns per call (M)
constexpr int64_t kChannelsN = 128; // channels_last: output channels per call (N)

// Whether oneDNN's micro-kernel takes scalar_t operands in VNNI pairs here (ATen raises where it does not:
// no AVX-512, float16 without AVX512-FP16, a build without the micro-kernel). Probed once, on a 1 x 16 x 2
// product checked against its known result.
template <typename scalar_t>
bool ukernel_takes() {
  static const bool ok = [] {
    scalar_t a[2] = {scalar_t(1.0f), scalar_t(2.0f)};
    scalar_t b[32];
    for (int n = 0; n < 16; ++n) {
      b[2 * n] = scalar_t(static_cast<float>(n));
      b[2 * n + 1] = scalar_t(1.0f);
    }
    float c[16];
    try {
      blas::brgemm(1, 16, 2, 2, 16, 16, false, a, b, c, true);
      blas::brgemm_release(true);
    } catch (const c10::Error&) {
      return false;
    }
    for (int n = 0; n < 16; ++n)
      if (c[n] != static_cast<float>(n) + 2.0f) return false;
    return true;
  }();
  return ok;
}

// Runs worker(item) over [0, count) as parallel_items does, releasing the micro-kernel's per-thread hardware
// context (AMX tiles, where used) when a thread is done.
template <typename F>
void for_items(int64_t count, const F& f) {
  parallel_items(count, [&](const auto& next) {
    for (int64_t item = next(); item >= 0; item = next()) f(item);
    blas::brgemm_release(true);
  });
}

// A for NCHW: the weight per tap, (taps, P, Ce), Ce = C rounded up to even, zero past C.
template <typename scalar_t>
void pack_weight_nchw(const scalar_t* w, scalar_t* wr, int64_t C, int64_t P, int64_t k) {
  const int64_t taps = k * k, Ce = (C + 1) / 2 * 2;
  at::parallel_for(0, P, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t t = 0; t < taps; ++t) {
        scalar_t* d = wr + (t * P + p) * Ce;
        for (int64_t c = 0; c < C; ++c) d[c] = w[(p * C + c) * taps + t];
        if (Ce > C) d[C] = scalar_t(0.0f);
      }
  });
}

// B for channels_last: per block of kChannelsN output channels and tap, the weight's (pairs, block width, 2),
// contiguous (C even).
template <typename scalar_t>
void pack_weight_channels_last(const scalar_t* w, scalar_t* wb, int64_t C, int64_t P, int64_t k) {
  const int64_t taps = k * k;
  at::parallel_for(0, P, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t pb = p / kChannelsN, np = std::min(kChannelsN, P - pb * kChannelsN), q = p - pb * kChannelsN;
      for (int64_t t = 0; t < taps; ++t) {
        scalar_t* d = wb + (pb * taps * kChannelsN + t * np) * C;
        for (int64_t c = 0; c < C; ++c) d[((c / 2) * np + q) * 2 + c % 2] = w[(p * C + c) * taps + t];
      }
    }
  });
}

// wr: pack_weight_nchw's.
template <typename scalar_t>
void conv_nchw(const scalar_t* z, const scalar_t* wr, float* out, int64_t C, int64_t H, int64_t W, int64_t P,
               int64_t k, int64_t n0, int64_t n1, int64_t r0, int64_t r1) {
  const int64_t r = k / 2, taps = k * k, Ce = (C + 1) / 2 * 2, pairs = Ce / 2, rows = r1 - r0, plane = rows * W,
                samples = n1 - n0;
  // The output in runs: a 1x1's of kPixelsN pixels of the band's plane; a k x k's one row each.
  const int64_t run = k == 1 ? std::min(kPixelsN, plane) : W, runs = k == 1 ? (plane + run - 1) / run : rows;
  // B: per sample, `packed` rows of Wp pixels (a 1x1: its runs; a k x k: the band's rows and k / 2 more above
  // and below, each with k / 2 columns either side, zero outside the map), each row all its channel pairs,
  // so that one call's B (a run, shifted by a tap) lies in one block of pairs * Wp pixel pairs.
  const int64_t packed = k == 1 ? runs : rows + 2 * r, Wp = k == 1 ? run : W + 2 * r, row_size = pairs * Wp * 2;
  const at::Tensor xb_buffer =  // uninitialised: every element is written below
      at::empty({samples * packed * row_size}, at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
  scalar_t* const xb = xb_buffer.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, samples * packed, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = n0 + i / packed, pr = i % packed;
      scalar_t* dst = xb + i * row_size;
      // Where the row's pixels start in x's plane, how many, and at which packed column.
      const int64_t I = r0 - r + pr;
      const bool inside = k == 1 || (I >= 0 && I < H);
      const int64_t q0 = k == 1 ? r0 * W + pr * run : I * W, len = k == 1 ? std::min(run, plane - pr * run) : W;
      if (!inside) {
        std::fill(dst, dst + row_size, scalar_t(0.0f));
        continue;
      }
      for (int64_t c2 = 0; c2 < pairs; ++c2) {
        scalar_t* d = dst + c2 * Wp * 2;
        std::fill(d, d + 2 * r, scalar_t(0.0f));  // the halo columns (and a 1x1's run's tail) are zero
        std::fill(d + 2 * (r + len), d + Wp * 2, scalar_t(0.0f));
        const scalar_t* s0 = z + (n * C + 2 * c2) * H * W + q0;
        const scalar_t* s1 = 2 * c2 + 1 < C ? s0 + H * W : nullptr;
        for (int64_t J = 0; J < len; ++J) {
          d[2 * (r + J)] = s0[J];
          d[2 * (r + J) + 1] = s1 ? s1[J] : scalar_t(0.0f);
        }
      }
    }
  });
  // Items: (sample, run, output channel block); the blocks of a run are neighbours, sharing its packed rows.
  const int64_t mblocks = (P + kChannelsM - 1) / kChannelsM;
  for_items(samples * runs * mblocks, [&](int64_t item) {
    const int64_t mb = item % mblocks, s = item / mblocks % runs, nn = item / mblocks / runs;
    const int64_t m0 = mb * kChannelsM, m = std::min(kChannelsM, P - m0);
    const int64_t len = k == 1 ? std::min(run, plane - s * run) : W;
    float* o = out + (nn * P + m0) * plane + s * run;
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t ky = t / k, kx = t % k;
      const scalar_t* b = xb + (nn * packed + s + ky) * row_size + kx * 2;
      blas::brgemm(m, len, Ce, Ce, Wp, plane, t > 0, wr + (t * P + m0) * Ce, b, o, true);
    }
  });
}

// wb: pack_weight_channels_last's.
template <typename scalar_t>
void conv_channels_last(const scalar_t* z, const scalar_t* wb, float* out, int64_t C, int64_t H, int64_t W,
                        int64_t P, int64_t k, int64_t n0, int64_t n1, int64_t r0, int64_t r1) {
  const int64_t r = k / 2, taps = k * k, rows = r1 - r0, pblocks = (P + kChannelsN - 1) / kChannelsN;
  // Items: (output channel block, sample, row, column block), the channel block slowest: the threads share
  // its packed weight.
  const int64_t cblocks = (W + kColumnsM - 1) / kColumnsM;
  for_items(pblocks * (n1 - n0) * rows * cblocks, [&](int64_t item) {
    const int64_t cb = item % cblocks, i = item / cblocks % rows, nn = item / cblocks / rows % (n1 - n0),
                  pb = item / cblocks / rows / (n1 - n0);
    const int64_t n = n0 + nn, I = r0 + i, p0 = pb * kChannelsN, np = std::min(kChannelsN, P - p0);
    const int64_t j0 = cb * kColumnsM, j1 = std::min(W, j0 + kColumnsM);
    const scalar_t* wblock = wb + pb * taps * kChannelsN * C;
    float* orow = out + (nn * rows + i) * W * P + p0;
    const auto tap = [&](int64_t ky, int64_t kx, bool add) {
      const int64_t dy = ky - r, dx = kx - r, Iy = I + dy;
      if (Iy < 0 || Iy >= H) return;
      const int64_t J0 = std::max(j0, -dx), J1 = std::min(j1, W - dx);
      if (J0 >= J1) return;
      blas::brgemm(J1 - J0, np, C, C, np, P, add, z + ((n * H + Iy) * W + J0 + dx) * C,
                   wblock + (ky * k + kx) * np * C, orow + J0 * P, true);
    };
    tap(r, r, false);  // every output of the block, at its own pixel
    for (int64_t t = 0; t < taps; ++t)
      if (t != r * k + r) tap(t / k, t % k, true);
  });
}

#endif  // MSFUSED_HAVE_BRGEMM
}  // namespace

bool ukernel_available(at::ScalarType dtype) {
#ifdef MSFUSED_HAVE_BRGEMM
  switch (dtype) {
    case at::kBFloat16: return ukernel_takes<at::BFloat16>();
    case at::kHalf: return ukernel_takes<at::Half>();
    default: return false;
  }
#else
  (void)dtype;
  return false;
#endif
}

bool widened_on_ukernel(const at::Tensor& z, bool cl) {
  if (!at::globalContext().userEnabledMkldnn()) return false;
  if (cl && z.size(1) % 2 != 0) return false;  // x's rows feed the micro-kernel as they lie: K in pairs
  return ukernel_available(z.scalar_type());
}

WidenedConv::WidenedConv(const at::Tensor& w, bool cl)
    : cl_(cl), C_(w.size(1)), P_(w.size(0)), k_(w.size(2)) {
  TORCH_INTERNAL_ASSERT(w.dim() == 4 && w.size(3) == k_ && k_ % 2 == 1 && (!cl || C_ % 2 == 0));
#ifdef MSFUSED_HAVE_BRGEMM
  const at::Tensor wc = w.contiguous();
  packed_ = at::empty({k_ * k_ * P_ * ((C_ + 1) / 2 * 2)}, w.options());
  AT_DISPATCH_REDUCED_FLOATING_TYPES(w.scalar_type(), "msfused_widened_pack", [&] {
    auto pack = cl ? pack_weight_channels_last<scalar_t> : pack_weight_nchw<scalar_t>;
    pack(wc.const_data_ptr<scalar_t>(), packed_.mutable_data_ptr<scalar_t>(), C_, P_, k_);
  });
#else
  TORCH_INTERNAL_ASSERT(false, "msfused: built without oneDNN's micro-kernel (widened_on_ukernel is false)");
#endif
}

void WidenedConv::run(const at::Tensor& z, int64_t n0, int64_t n1, int64_t r0, int64_t r1, float* out) const {
  const int64_t H = z.size(2), W = z.size(3);
  TORCH_INTERNAL_ASSERT(widened_on_ukernel(z, cl_) && z.scalar_type() == packed_.scalar_type() && z.size(1) == C_ &&
                        z.is_contiguous(cl_ ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  TORCH_INTERNAL_ASSERT(0 <= n0 && n0 < n1 && n1 <= z.size(0) && 0 <= r0 && r0 < r1 && r1 <= H);
#ifdef MSFUSED_HAVE_BRGEMM
  AT_DISPATCH_REDUCED_FLOATING_TYPES(z.scalar_type(), "msfused_widened_conv", [&] {
    auto conv = cl_ ? conv_channels_last<scalar_t> : conv_nchw<scalar_t>;
    conv(z.const_data_ptr<scalar_t>(), packed_.const_data_ptr<scalar_t>(), out, C_, H, W, P_, k_, n0, n1, r0, r1);
  });
#else
  (void)W, (void)out;  // unreachable: the constructor raises
#endif
}

at::Tensor widened_conv(const at::Tensor& z, const at::Tensor& w, bool cl) {
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  if (!widened_on_ukernel(z, cl))
    return at::conv2d(z.to(at::kFloat), w.to(at::kFloat), {}, 1, w.size(2) / 2).contiguous(fmt);
  at::Tensor out = at::empty({z.size(0), w.size(0), z.size(2), z.size(3)}, z.options().dtype(at::kFloat).memory_format(fmt));
  WidenedConv(w, cl).run(z, 0, z.size(0), 0, z.size(2), out.data_ptr<float>());
  return out;
}

}  // namespace detail
}  // namespace cpu
}  // namespace msfused
