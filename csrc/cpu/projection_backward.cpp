// The fused multi-scale block with its projection on the CPU (SPEC.md, "The projection"), backward (the
// forward: projection_forward.cpp): act(norm(conv(cat))) without ever building cat. The split of the work
// (which branch goes per tap, the plans) is csrc/projection.h, shared with the CUDA backend; the block's own
// passes (the levels, each branch's epilogue and its backward, dx) are forward.cpp's and backward.cpp's.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <utility>
#include <vector>

#include "../projection.h"
#include "common.h"
#include "onednn.h"
#include "simd.h"
#include "tap_branch.h"
#include "widened_conv.h"

namespace msfused {
namespace cpu {
using namespace detail;
namespace {

#if defined(__GNUC__) || defined(__clang__)
#define MSFUSED_PREFETCH(p) __builtin_prefetch(p)
#else
#define MSFUSED_PREFETCH(p) ((void)0)
#endif

constexpr int64_t kGradWide = 4 * kGroup;  // channels per channels_last item of projection_grad_pass, at most

// A channels_last item's per-lane coefficients (its channels': the activation's alpha and beta, the norm
// backward's p, q, r, the statistics' center).
template <typename T, int64_t S>
struct LaneCoefs {
  const T (&al)[S], (&be)[S], (&p)[S], (&q)[S], (&r)[S], (&ctr)[S];
};

// One row of a channels_last item in projection_grad_pass: per pixel its `lanes` channels (L of them, known at
// compile time for a full item so that the lanes vectorise; L = 0: `lanes` at run time), each lane's sums in
// pixel order. The pixels are a whole pixel's channels apart (pix): the next ones' lines are prefetched, as the
// hardware's prefetch stops at each page. Raw: Narrow's element type (simd.h).
template <typename scalar_t, typename T, Activation A, bool SumsOnly, int64_t L, int64_t S,
          typename Raw = typename Narrow<scalar_t, T>::Raw>
MSFUSED_SIMD_CLONES void grad_lanes(int64_t W, int64_t pix, int64_t lanes, const Raw* __restrict grad,
                                    const Raw* __restrict pre, Raw* __restrict dpre, T* __restrict drow,
                                    const LaneCoefs<T, S>& co, T* __restrict a1, T* __restrict a2,
                                    T* __restrict a3) {
  using Nr = Narrow<scalar_t, T>;
  constexpr int64_t kAhead = 4;  // pixels
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(scalar_t));
  const int64_t n_lanes = L > 0 ? L : lanes;
  for (int64_t J = 0; J < W; ++J) {
    const int64_t at = J * pix;
    if (J + kAhead < W)
      for (int64_t g = 0; g < n_lanes; g += kLine) {
        MSFUSED_PREFETCH(pre + at + kAhead * pix + g);
        MSFUSED_PREFETCH(grad + at + kAhead * pix + g);
      }
#pragma omp simd
    for (int64_t g = 0; g < n_lanes; ++g) {
      const T v = Nr::load(pre[at + g]);
      const T dyv = Nr::round(Nr::load(grad[at + g]) * activate_grad_simd<A>(co.al[g] * v + co.be[g]));
      a1[g] += dyv;
      a2[g] += dyv * (v - co.ctr[g]);
      if constexpr (!SumsOnly) {
        const T dv = Nr::round(co.p[g] * dyv + co.q[g] * v + co.r[g]);
        dpre[at + g] = Nr::store(dv);
        drow[J * S + g] = dv;
        a3[g] += dv;
      }
    }
  }
}

// One row of an NCHW item in projection_grad_pass (one channel; the pass's comment says what is computed):
// sums[0..2] = the row's sums of dyv, dyv * (v - ctr) and dv. First the elementwise work (dyv and its product
// into `scratch`, 2 W values; dv into dpre and drow), then each sum in simd.h's lane_sum order: the same bits on
// every clone and thread count.
template <typename scalar_t, typename T, Activation A, bool SumsOnly, typename Raw = typename Narrow<scalar_t, T>::Raw>
MSFUSED_SIMD_CLONES void grad_row(int64_t W, const Raw* __restrict grad, const Raw* __restrict pre,
                                  Raw* __restrict dpre, T* __restrict drow, T* __restrict scratch, T al, T be, T ctr,
                                  T pc, T qc, T rc, T* sums) {
  using Nr = Narrow<scalar_t, T>;
  T* __restrict dy = scratch;
  T* __restrict dyc = scratch + W;
  for (int64_t J = 0; J < W; ++J) {
    const T v = Nr::load(pre[J]);
    const T dyv = Nr::round(Nr::load(grad[J]) * activate_grad_simd<A>(al * v + be));
    dy[J] = dyv;
    dyc[J] = dyv * (v - ctr);
    if constexpr (!SumsOnly) {
      const T dv = Nr::round(pc * dyv + qc * v + rc);
      dpre[J] = Nr::store(dv);
      drow[J] = dv;
    }
  }
  sums[0] = lane_sum<T>(W, [&](int64_t J) { return dy[J]; });
  sums[1] = lane_sum<T>(W, [&](int64_t J) { return dyc[J]; });
  sums[2] = SumsOnly ? T(0) : lane_sum<T>(W, [&](int64_t J) { return drow[J]; });
}

// y[0, n) += a * x[0, n): the height adjoint's row updates.
template <typename T>
MSFUSED_SIMD_CLONES void add_scaled(T* __restrict y, T a, const T* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// The projection epilogue's backward, per work item (n, channel group), from grad (dY of the output) and the
// saved pre-activation v: dyv = dY * act'(alpha * v + beta), rounded to scalar_t as the reference's
// activation gradient is, then dv = p * dyv + q * v + r per channel (the norm's backward: with batch
// statistics p, q, r from the sums below; otherwise p = the folded scale, q = r = 0).
//   * SumsOnly (batch statistics, first pass): part_dy = sum(dyv), part_dyc = sum(dyv * (v - center)); no write.
//   * otherwise: dv written to dpre, part_dv = sum(dv) (the bias gradient), part_dy / part_dyc as above with
//     center 0 (eval-mode scale and shift gradients), and from the same rows, while they are in cache, every
//     tap branch's map gradient dT_b: the adjoint of the forward's resize-and-shift, as a gather at the level
//     (height first: each row of dv added to the level rows its taps read, rows in increasing order; then the
//     width taps), in a fixed order: no atomics.
// A channels_last item walks the whole map a pixel at a time, a pixel's P channels apart: Width channels per
// item (kGradWide where there are items enough for the threads: four lines a pixel, so that each page fetched
// serves four of the item's lines, not one; psp_decoder_smp N = 4's backward took 113 ms with kGroup, 62 ms
// with kGradWide and the prefetch, 58 ms in NCHW, on the AMD EPYC). The results do not depend on Width: each
// channel's sums run in pixel order either way.
template <typename scalar_t, bool CL, Activation A, bool SumsOnly, int64_t Width>
void projection_grad_pass(const BlockPlan& plan, int64_t P, int64_t k, const std::vector<TapBranch<scalar_t>>& tb,
                          const Epilogue<at::opmath_type<scalar_t>>& epi, const std::vector<double>& center,
                          const std::vector<at::opmath_type<scalar_t>>& p, const std::vector<at::opmath_type<scalar_t>>& q,
                          const std::vector<at::opmath_type<scalar_t>>& r_coef, const scalar_t* grad, const scalar_t* pre,
                          scalar_t* dpre, double* part_dy, double* part_dyc, double* part_dv) {
  using T = at::opmath_type<scalar_t>;
  constexpr int64_t S = CL ? Width : 1;
  const int64_t H = plan.H, W = plan.W, r = k / 2, KP = k * k * P, WS = W * S;
  const Groups<CL, S> groups(P);
  const Plane<CL> ap = Plane<CL>::make(W, P);
  int64_t r_size = 0;
  std::vector<int64_t> r_at;
  for (const auto& t : tb) {
    r_at.push_back(r_size);
    r_size += k * t.h * WS;
  }
  at::parallel_for(0, plan.N * groups.per_n, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> rbuf(SumsOnly ? 0 : r_size), drow(SumsOnly ? 0 : WS), scratch(CL ? 0 : 2 * W), lrow;
    for (int64_t item = begin; item < end; ++item) {
      int64_t n, c0, g_count;
      groups.at(item, &n, &c0, &g_count);
      const int64_t G = CL ? g_count : 1;
      const int64_t origin = Plane<CL>::origin(n, c0, P, H, W);
      double s_dy[S] = {}, s_dyc[S] = {}, s_dv[S] = {};
      if (!SumsOnly) std::fill(rbuf.begin(), rbuf.end(), T(0));
      // channels_last: the group's coefficients per lane; the lanes past G stay zero in drow.
      T al_g[S] = {}, be_g[S] = {}, p_g[S] = {}, q_g[S] = {}, r_g[S] = {}, ctr_g[S] = {};
      if constexpr (CL) {
        for (int64_t g = 0; g < G; ++g) {
          const int64_t c = c0 + g;
          al_g[g] = epi.alpha[c];
          be_g[g] = epi.beta[c];
          p_g[g] = p[c];
          q_g[g] = q[c];
          r_g[g] = r_coef[c];
          ctr_g[g] = static_cast<T>(center[c]);
        }
        if (!SumsOnly && G < S)
          for (int64_t J = 0; J < W; ++J) std::fill(drow.begin() + J * S + G, drow.begin() + (J + 1) * S, T(0));
      }
      for (int64_t I = 0; I < H; ++I) {
        const int64_t at_row = origin + I * ap.row;
        if constexpr (!CL) {  // one channel: the row's sums in opmath (as ATen's batch norm accumulates)
          T sums[3];
          grad_row<scalar_t, T, A, SumsOnly>(W, raw<scalar_t, T>(grad + at_row), raw<scalar_t, T>(pre + at_row),
                                             SumsOnly ? nullptr : raw<scalar_t, T>(dpre + at_row), drow.data(),
                                             scratch.data(), epi.alpha[c0], epi.beta[c0], static_cast<T>(center[c0]),
                                             p[c0], q[c0], r_coef[c0], sums);
          s_dy[0] += static_cast<double>(sums[0]);
          s_dyc[0] += static_cast<double>(sums[1]);
          s_dv[0] += static_cast<double>(sums[2]);
        } else {
          // The group's channels as lanes (each lane's sums in pixel order, as one channel's above); a full
          // group takes the loop with its lane count known at compile time, so that it vectorises.
          T a1[S] = {}, a2[S] = {}, a3[S] = {};
          const LaneCoefs<T, S> co{al_g, be_g, p_g, q_g, r_g, ctr_g};
          const auto gr = raw<scalar_t, T>(grad + at_row), vr = raw<scalar_t, T>(pre + at_row);
          const auto dp = SumsOnly ? nullptr : raw<scalar_t, T>(dpre + at_row);
          T* dr = SumsOnly ? nullptr : drow.data();
          if (G == S)
            grad_lanes<scalar_t, T, A, SumsOnly, S, S>(W, ap.pix, S, gr, vr, dp, dr, co, a1, a2, a3);
          else
            grad_lanes<scalar_t, T, A, SumsOnly, 0, S>(W, ap.pix, G, gr, vr, dp, dr, co, a1, a2, a3);
          for (int64_t g = 0; g < G; ++g) {
            s_dy[g] += static_cast<double>(a1[g]);
            s_dyc[g] += static_cast<double>(a2[g]);
            s_dv[g] += static_cast<double>(a3[g]);
          }
        }
        if constexpr (!SumsOnly) {
          // This row of dv into the level rows that output rows I + dy read (height adjoint).
          for (size_t b = 0; b < tb.size(); ++b) {
            const TapBranch<scalar_t>& t = tb[b];
            for (int64_t ky = 0; ky < k; ++ky) {
              const int64_t O = I + ky - r;
              if (O < 0 || O >= H) continue;
              T* rb = rbuf.data() + r_at[b] + ky * t.h * WS;
              T* r0 = rb + t.uh.i0[O] * WS;
              add_scaled(r0, t.uh.two ? t.uh.w0[O] : T(1), drow.data(), WS);
              if (t.uh.two) add_scaled(rb + t.uh.i1[O] * WS, t.uh.w1[O], drow.data(), WS);
            }
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        part_dy[n * P + c0 + g] = s_dy[g];
        part_dyc[n * P + c0 + g] = s_dyc[g];
        if (!SumsOnly) part_dv[n * P + c0 + g] = s_dv[g];
      }
      if constexpr (SumsOnly) continue;
      // The width adjoint: each level row of the height adjoint, shifted by the tap, gathered into dT's row.
      for (size_t b = 0; b < tb.size(); ++b) {
        const TapBranch<scalar_t>& t = tb[b];
        const Plane<CL> tp = Plane<CL>::make(t.w, KP);
        lrow.resize(t.w * S);
        for (int64_t ky = 0; ky < k; ++ky)
          for (int64_t kx = 0; kx < k; ++kx) {
            const int64_t dx = kx - r, j0 = std::max<int64_t>(0, -dx), j1 = std::min<int64_t>(W, W - dx);
            T* dst = t.grads + Plane<CL>::origin(n, (ky * k + kx) * P + c0, KP, t.h, t.w);
            for (int64_t i = 0; i < t.h; ++i) {
              const T* rrow = rbuf.data() + r_at[b] + (ky * t.h + i) * WS;
              T* drow_t = dst + i * tp.row;
              if (!CL && t.col_runs) {  // each level value gathers its run of outputs
                for (int64_t j = 0; j < t.w; ++j) {
                  int64_t u0, u1;
                  t.runs(j, dx, W, &u0, &u1);
                  const T* ro = rrow + t.col_first[j] - dx;
                  const T* cw = t.col_w.data() + t.col_ptr[j];
                  T a = 0;
#pragma omp simd reduction(+ : a)
                  for (int64_t u = u0; u < u1; ++u) a += cw[u] * ro[u];
                  drow_t[j * tp.pix] = a;
                }
                continue;
              }
              std::fill(lrow.begin(), lrow.end(), T(0));
              for (int64_t J = j0; J < j1; ++J) {
                const int64_t qx = J + dx;
                const T* rs = rrow + J * S;
                T* l0 = lrow.data() + t.uw.i0[qx] * S;
                if (t.uw.two) {
                  T* l1 = lrow.data() + t.uw.i1[qx] * S;
                  const T w0 = t.uw.w0[qx], w1 = t.uw.w1[qx];
                  for (int64_t g = 0; g < S; ++g) {
                    l0[g] += w0 * rs[g];
                    l1[g] += w1 * rs[g];
                  }
                } else {
                  for (int64_t g = 0; g < S; ++g) l0[g] += rs[g];
                }
              }
              for (int64_t j = 0; j < t.w; ++j)
                for (int64_t g = 0; g < G; ++g) drow_t[j * tp.pix + g] = lrow[j * S + g];
            }
          }
      }
    }
  });
}

// Per channel, the per-(n, channel) partial sums added in batch order (deterministic).
std::vector<double> sum_over_batch(const std::vector<double>& part, int64_t N, int64_t P) {
  std::vector<double> s(P, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < P; ++c) s[c] += part[n * P + c];
  return s;
}

// Whether the projection's x part backward runs as matrix products (1x1 kernel, a dtype BLAS computes): ATen's
// 1x1 convolution reorders NCHW maps in and out of oneDNN's blocked layout, costing more than the product itself
// at these sizes. Not for channels_last maps in float32 on oneDNN: there ATen's convolution backward runs
// oneDNN's nhwc kernels on the maps as they are (on an AMD EPYC, psp_decoder_smp at N = 4: 16 ms for dx and
// dW_x, against 28 ms for MKL's GEMMs over the rows, which take their AVX2 path there).
// NCHW bfloat16 too where the CPU multiplies bfloat16 natively (widened_on_ukernel's probe: ATen's mm then runs
// oneDNN's bfloat16 GEMM; on the AMD EPYC, psp_decoder_smp N = 4: 8 ms against 13 for the convolution's
// backward); in channels_last the two were even.
bool x_part_is_gemm(int64_t k, const Tensor& x, at::MemoryFormat fmt) {
  if (k != 1) return false;
  if (fmt == at::MemoryFormat::ChannelsLast)
    return x.scalar_type() == at::kDouble || (x.scalar_type() == at::kFloat && !x_part_on_onednn(k, x));
  return x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
         (x.scalar_type() == at::kBFloat16 && widened_on_ukernel(x, false));
}

// The x part's backward as GEMMs (x_part_is_gemm): dx = W_x^T dv and dW_x = dv x^T summed over the batch
// in order (NCHW float32 / float64, per sample; on oneDNN in float32: x_part_on_onednn; bfloat16 in one
// product), or over the rows (N H W, channels) of channels_last maps.
std::pair<Tensor, Tensor> x_part_gemm_backward(const Tensor& dpre, const Tensor& x, const Tensor& wx, bool need_x,
                                               bool need_w, at::MemoryFormat fmt) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), P = wx.size(0);
  const Tensor w2 = wx.reshape({P, C});
  Tensor dx, dw;
  if (fmt == at::MemoryFormat::ChannelsLast) {
    const Tensor rows = dpre.permute({0, 2, 3, 1}).reshape({N * H * W, P});
    const Tensor xrows = x.permute({0, 2, 3, 1}).reshape({N * H * W, C});
    if (need_x) dx = at::mm(rows, w2).view({N, H, W, C}).permute({0, 3, 1, 2});
    if (need_w) dw = at::mm(rows.t(), xrows);
  } else if (N > 0 && x_part_on_onednn(1, x)) {
    // NCHW on oneDNN (onednn.h), per sample in batch order: dW_x += dv[n] x[n]^T, x[n] (C, HW) the inner
    // product's weight as NCHW keeps it; dx[n] = W_x^T dv[n], dv[n]'s (P, HW) plane read transposed as the
    // weight, so that the product is NCHW like dx.
    const Tensor cols = dpre.contiguous().view({N, P, H * W});
    const Tensor xcols = x.view({N, C, H * W});
    if (need_w)
      for (int64_t n = 0; n < N; ++n) {
        const Tensor part = linear(cols.select(0, n), xcols.select(0, n));
        dw = n == 0 ? part : dw.add_(part);
      }
    if (need_x) {
      dx = at::empty({N, C, H * W}, x.options());
      const Tensor wt = w2.t().contiguous();  // (C, P)
      for (int64_t n = 0; n < N; ++n) dx.select(0, n).copy_(linear(wt, cols.select(0, n).t()));
      dx = dx.view({N, C, H, W});
    }
  } else {
    const Tensor cols = dpre.view({N, P, H * W});
    const Tensor xcols = x.view({N, C, H * W});
    if (need_x) {
      dx = at::empty({N, C, H * W}, x.options());
      for (int64_t n = 0; n < N; ++n) {
        Tensor dn = dx.select(0, n);
        at::mm_out(dn, w2.t(), cols.select(0, n));
      }
      dx = dx.view({N, C, H, W});
    }
    if (need_w && x.scalar_type() == at::kBFloat16) {
      // One product over the whole batch (the samples' columns side by side), rounded once as the reference's
      // weight gradient is: per-sample products would round each partial sum to bfloat16.
      const Tensor a = dpre.transpose(0, 1).reshape({P, N * H * W});
      const Tensor b = x.transpose(0, 1).reshape({C, N * H * W});
      dw = at::mm(a, b.t());
    } else if (need_w) {
      dw = at::zeros({P, C}, x.options());
      for (int64_t n = 0; n < N; ++n) dw.addmm_(cols.select(0, n), xcols.select(0, n).t());
    }
  }
  return {dx, need_w ? dw.view({P, C, 1, 1}) : dw};
}

}  // namespace

ProjectBackwardResult multi_scale_project_backward_cpu(
    const Tensor& grad_in, const Tensor& x_in, at::TensorList weight, const OptionalTensorList& scale,
    const OptionalTensorList& shift, at::TensorList level, at::TensorList pre, at::TensorList mean, at::TensorList var,
    const c10::List<bool>& batch_stats, c10::ArrayRef<double> eps, c10::IntArrayRef factor, c10::IntArrayRef bins,
    c10::string_view down_mode, c10::string_view up_mode, bool align_corners, c10::string_view activation,
    c10::string_view input_position, const Tensor& pw, const std::optional<Tensor>& p_scale,
    const std::optional<Tensor>& p_shift, const Tensor& p_pre, const Tensor& p_mean, const Tensor& p_var,
    bool p_batch_stats, double p_eps, c10::string_view p_activation, std::array<bool, 2> output_mask) {
  const BlockPlan plan = make_plan(x_in, weight, batch_stats, eps, factor, bins, down_mode, up_mode, align_corners,
                                   activation, input_position);
  const Projection proj = check_projection(plan, x_in, pw, p_eps, p_batch_stats, p_activation);
  const size_t B = plan.branches.size();
  const int64_t P = proj.P, k = proj.k, pad = k / 2, H = plan.H, W = plan.W;
  check_project_backward_args(plan, proj, grad_in, level, pre, mean, var, scale, shift, p_pre);
  const auto fmt = x_in.suggest_memory_format();
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const Tensor x = x_in.contiguous(fmt);
  const Tensor grad = grad_in.to(x.scalar_type()).contiguous(fmt);
  const auto opts = x.options();
  const bool need_w = output_mask[1];
  // The projection's epilogue backward (the gradient dpre of its pre-activation, bias included) and, in the
  // same pass, the gradients of every per-tap branch's maps T_b.
  const BlockPlan pp = projection_plan(plan, proj);
  const Tensor pre_c = p_pre.contiguous(fmt);
  Tensor dpre = at::empty({plan.N, P, H, W}, opts.memory_format(fmt));
  TensorVector dts(B);
  for (size_t b = 0; b < B; ++b)
    if (!convolves_resized(plan.branches[b], k, H, W))
      dts[b] = at::empty({plan.N, k * k * P, plan.branches[b].level_h, plan.branches[b].level_w},
                         opts.dtype(tap_maps_dtype(x.scalar_type())).memory_format(fmt));
  Tensor grad_p_bias, grad_p_scale, grad_p_shift;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "msfused_project_grad_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto taps = make_branch_taps<T>(plan);
    std::vector<TapBranch<scalar_t>> tb;
    for (size_t b = 0; b < B; ++b) {
      if (!dts[b].defined()) continue;
      tb.emplace_back(plan.branches[b], taps[b]);
      tb.back().grads = dts[b].data_ptr<T>();
    }
    const Epilogue<T> epi = make_epilogue<T>(pp.branches[0], p_scale, p_shift, p_mean, p_var);
    const std::vector<double> s = to_doubles(p_scale, P, 1.0);
    const std::vector<double> center = proj.batch_stats ? to_doubles(p_mean, P, 0.0) : std::vector<double>(P, 0.0);
    std::vector<T> pc(P), qc(P, T(0)), rc(P, T(0));
    std::vector<double> part_dy(plan.N * P), part_dyc(plan.N * P), part_dv(plan.N * P), d_scale(P);
    const bool work = dpre.numel() > 0;
    const bool wide = plan.N * ((P + kGradWide - 1) / kGradWide) >= 2 * at::get_num_threads();  // (see the pass)
    with_activation(proj.activation, [&](auto act) {
      constexpr Activation A = decltype(act)::value;
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      const scalar_t* v = pre_c.const_data_ptr<scalar_t>();
      if (proj.batch_stats) {  // the sums first: the norm's backward coefficients need them
        auto sums = !cl  ? projection_grad_pass<scalar_t, false, A, true, 1>
                    : wide ? projection_grad_pass<scalar_t, true, A, true, kGradWide>
                           : projection_grad_pass<scalar_t, true, A, true, kGroup>;
        if (work) sums(plan, P, k, tb, epi, center, pc, qc, rc, g, v, nullptr, part_dy.data(), part_dyc.data(), nullptr);
        const std::vector<double> sum_dy = sum_over_batch(part_dy, plan.N, P), sum_dyc = sum_over_batch(part_dyc, plan.N, P);
        const std::vector<double> var = to_doubles(p_var, P, 0.0);
        for (int64_t c = 0; c < P; ++c) {
          double pd, qd, rd;
          batch_norm_grad(s[c], center[c], var[c], proj.eps, static_cast<double>(plan.N * H * W), sum_dy[c],
                          sum_dyc[c], &d_scale[c], &pd, &qd, &rd);
          pc[c] = static_cast<T>(pd);
          qc[c] = static_cast<T>(qd);
          rc[c] = static_cast<T>(rd);
        }
      } else {
        for (int64_t c = 0; c < P; ++c) pc[c] = static_cast<T>(s[c]);
      }
      auto pass = !cl  ? projection_grad_pass<scalar_t, false, A, false, 1>
                  : wide ? projection_grad_pass<scalar_t, true, A, false, kGradWide>
                         : projection_grad_pass<scalar_t, true, A, false, kGroup>;
      if (work)
        pass(plan, P, k, tb, epi, center, pc, qc, rc, g, v, dpre.data_ptr<scalar_t>(), part_dy.data(), part_dyc.data(),
             part_dv.data());
    });
    std::vector<double> sum_dy = sum_over_batch(part_dy, plan.N, P), sum_dv = sum_over_batch(part_dv, plan.N, P);
    if (!proj.batch_stats) d_scale = sum_over_batch(part_dyc, plan.N, P);  // sum(dY * pre)
    const auto pdt = at::TensorOptions().dtype(at::kDouble);
    const auto as_grad = [&](std::vector<double>& values, const std::optional<Tensor>& like) {
      if (!like.has_value() || !like->defined()) return at::empty({0}, opts);
      return at::from_blob(values.data(), {P}, pdt).to(like->scalar_type(), false, /*copy=*/true);
    };
    grad_p_scale = as_grad(d_scale, p_scale);
    grad_p_shift = as_grad(sum_dy, p_shift);
    grad_p_bias = at::from_blob(sum_dv.data(), {P}, pdt).to(x.scalar_type(), false, /*copy=*/true);
  });
  Tensor grad_pw = need_w ? at::zeros_like(pw, at::MemoryFormat::Preserve) : at::empty({0}, opts);
  Tensor dx_proj;  // the x part's gradient of x
  if (plan.x_offset >= 0) {
    const Tensor wx = weight_slice(pw, plan.x_offset, plan.C);
    Tensor dx_g, dw_g;
    if (x_part_is_gemm(k, x, fmt)) {
      std::tie(dx_g, dw_g) = x_part_gemm_backward(dpre, x, wx, output_mask[0], need_w, fmt);
    } else {
      auto g = at::convolution_backward(dpre, x, wx, std::nullopt, {1, 1}, {pad, pad}, {1, 1}, false, {0, 0}, 1,
                                        {output_mask[0], need_w, false});
      dx_g = std::get<0>(g);
      dw_g = std::get<1>(g);
    }
    if (output_mask[0]) dx_proj = dx_g.contiguous(fmt);
    if (need_w) grad_pw.narrow(1, plan.x_offset, plan.C).copy_(dw_g);
  }
  TensorVector grad_weight(B), grad_bias(B), grad_scale(B), grad_shift(B), dz(B);
  for (size_t b = 0; b < B; ++b) {
    const BranchPlan& bp = plan.branches[b];
    const int64_t Cb = bp.out_channels;
    const bool whole = convolves_resized(bp, k, H, W);
    const BlockPlan alone = branch_alone(plan, b, !whole);
    // The branch's activation (as in the forward) and the gradient reaching it.
    const Tensor a = branch_epilogue(alone, pre[b], scale.get(b), shift.get(b), mean[b], var[b], fmt);
    Tensor da;
    if (whole) {
      auto g = at::convolution_backward(dpre, a, weight_slice(pw, bp.channel_offset, Cb), std::nullopt, {1, 1},
                                        {pad, pad}, {1, 1}, false, {0, 0}, 1, {true, need_w, false});
      da = std::get<0>(g).contiguous(fmt);
      if (need_w) grad_pw.narrow(1, bp.channel_offset, Cb).copy_(std::get<1>(g));
    } else {
      Tensor dw;
      std::tie(da, dw) = tap_maps_backward(dts[b], a, pw, bp.channel_offset, need_w, fmt);
      if (need_w) grad_pw.narrow(1, bp.channel_offset, Cb).copy_(dw);
    }
    Tensor dconv;
    std::tie(dconv, grad_scale[b], grad_shift[b]) =
        epilogue_backward(alone, alone.branches[0], da, pre[b], scale.get(b), shift.get(b), mean[b], var[b], fmt);
    const int64_t bpad = bp.kernel_size / 2;
    const Tensor& z = bp.identity ? x : level[b];
    auto grads = at::convolution_backward(dconv, z, weight[b], c10::OptionalArrayRef<int64_t>({Cb}), {1, 1},
                                          {bpad, bpad}, {1, 1}, false, {0, 0}, 1, {output_mask[0], need_w, true});
    dz[b] = output_mask[0] ? std::get<0>(grads).contiguous(fmt) : Tensor();
    grad_weight[b] = need_w ? std::get<1>(grads).contiguous(weight[b].suggest_memory_format()) : at::empty({0}, opts);
    grad_bias[b] = std::get<2>(grads);
  }
  Tensor grad_x = at::empty({0}, opts);
  if (output_mask[0]) {
    // dx written once: the x part's gradient (as the "identity slice" of a C-channel gradient) plus every
    // branch's adjoint down-resize.
    BlockPlan dx_plan = plan;
    dx_plan.out_channels = plan.C;
    dx_plan.x_offset = plan.x_offset >= 0 ? 0 : -1;
    grad_x = at::empty({plan.N, plan.C, H, W}, opts.memory_format(fmt));
    dispatch_down_adjoint(dx_plan, dx_proj, dz, grad_x, cl);
  }
  if (!need_w) grad_pw = at::empty({0}, opts);
  return {grad_x, grad_weight, grad_bias, grad_scale, grad_shift, grad_pw, grad_p_bias, grad_p_scale, grad_p_shift};
}

}  // namespace cpu
}  // namespace msfused
