// The fused multi-scale block's backward on the CPU (the forward: forward.cpp; the shared helpers and the
// file map: common.h). It mirrors the forward: the adjoint of the upsample as a gather fused with the
// activation and norm backward, ATen's convolution backward on the level, then one pass that writes dx once
// (the identity slice plus every branch's adjoint down-resize, gathered in a fixed order). No atomics, no
// scatter across threads: results are bit-identical run to run.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "common.h"

namespace msfused {
namespace cpu {
using namespace detail;
namespace {

// ---------------------------------------------------------------------------------------------------
// Backward pass 1 (per branch): the upsample's adjoint as a gather, then the activation's and the
// norm's backward at the level. Writes p * dY (p = the folded scale in eval mode, 1 with batch
// statistics) and per (n, channel) partial sums of dY and dY * (conv - center), reduced later in n order.
// The adjoint's sums (about (H / h) * (W / w) * 4 terms per level value) run in double, weights included,
// whatever the dtype: dY is then rounded once, as the reference rounds it, and the norm's weight and bias
// gradients (sums over N * h * w of those values, often cancelling) keep float32's precision.
// ---------------------------------------------------------------------------------------------------
template <typename scalar_t, bool CL, Activation A>
void up_adjoint_and_act_grad(const BlockPlan& plan, const BranchPlan& bp, const BranchTaps<double>& taps,
                             const Epilogue<at::opmath_type<scalar_t>>& epi, const std::vector<double>& center,
                             const std::vector<double>& pre_scale, const scalar_t* grad, const scalar_t* pre,
                             scalar_t* dy_out, double* sum_dy, double* sum_dyc) {
  using T = at::opmath_type<scalar_t>;
  const int64_t H = plan.H, W = plan.W, Co = plan.out_channels;
  const int64_t Cb = bp.out_channels, h = bp.level_h, w = bp.level_w;
  const Groups<CL> groups(Cb);
  const Plane<CL> gp = Plane<CL>::make(W, Co);
  const Plane<CL> cp = Plane<CL>::make(w, Cb);
  const auto& th = taps.up_h;
  const auto& tw = taps.up_w;
  at::parallel_for(0, plan.N * groups.per_n, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t S = CL ? kGroup : 1;
    // One level row at a time: the output rows that read it, reduced along the height first (contiguous,
    // vectorised), then the width gather on that one W-long row.
    std::vector<double> trow(bp.identity ? 0 : W * S), darow(w * S);
    for (int64_t item = begin; item < end; ++item) {
      int64_t n, c0, g_count;
      groups.at(item, &n, &c0, &g_count);
      const int64_t G = CL ? g_count : 1;  // a constant 1 for NCHW, so the loops over j vectorise
      const scalar_t* gb = grad + Plane<CL>::origin(n, bp.channel_offset + c0, Co, H, W);
      const scalar_t* cb = pre + Plane<CL>::origin(n, c0, Cb, h, w);
      scalar_t* db = dy_out + Plane<CL>::origin(n, c0, Cb, h, w);
      double s1[S] = {}, s2[S] = {};
      for (int64_t oh = 0; oh < h; ++oh) {
        if (!bp.identity) {
          std::fill(trow.begin(), trow.end(), 0.0);  // a level row no output reads gets no gradient
          for (int64_t k = th.col_ptr[oh]; k < th.col_ptr[oh + 1]; ++k) {
            const scalar_t* grow = gb + th.col_idx[k] * gp.row;
            const double wt = th.col_w[k];
            for (int64_t J = 0; J < W; ++J)
              for (int64_t g = 0; g < G; ++g) trow[J * S + g] += wt * static_cast<double>(grow[J * gp.pix + g]);
          }
        }
        // The gradient reaching the activation, along this level row.
        for (int64_t ow = 0; ow < w; ++ow) {
          double* da = darow.data() + ow * S;
          if (bp.identity) {
            const scalar_t* gs = gb + oh * gp.row + ow * gp.pix;
            for (int64_t g = 0; g < G; ++g) da[g] = static_cast<double>(gs[g]);
          } else {
            for (int64_t g = 0; g < G; ++g) da[g] = 0.0;
            for (int64_t k = tw.col_ptr[ow]; k < tw.col_ptr[ow + 1]; ++k) {
              const double* t = trow.data() + tw.col_idx[k] * S;
              const double wt = tw.col_w[k];
              for (int64_t g = 0; g < G; ++g) da[g] += wt * t[g];
            }
          }
        }
        // Activation backward, p * dY stored, and the sums in double. The reference rounds the
        // activation's incoming gradient to the tensor's dtype, hence the casts through scalar_t.
        const scalar_t* cs = cb + oh * cp.row;
        scalar_t* ds = db + oh * cp.row;
        if constexpr (!CL) {
          // One channel: the sums run along the row; omp simd lets them use independent lanes (a fixed
          // order, so still deterministic) instead of one latency-bound chain.
          const T al = epi.alpha[c0], be = epi.beta[c0];
          const double ctr = center[c0], ps = pre_scale[c0];
          double r1 = 0, r2 = 0;
#pragma omp simd reduction(+ : r1, r2)
          for (int64_t ow = 0; ow < w; ++ow) {
            const T cv = static_cast<T>(cs[ow]);
            const T dyv = static_cast<T>(static_cast<scalar_t>(darow[ow])) * activate_grad<T>(A, al * cv + be);
            r1 += static_cast<double>(dyv);
            r2 += static_cast<double>(dyv) * (static_cast<double>(cv) - ctr);
            ds[ow] = static_cast<scalar_t>(static_cast<double>(dyv) * ps);
          }
          s1[0] += r1;
          s2[0] += r2;
        } else {
          for (int64_t ow = 0; ow < w; ++ow)
            for (int64_t g = 0; g < G; ++g) {  // G channels: G independent sums per step
              const int64_t c = c0 + g;
              const T cv = static_cast<T>(cs[ow * cp.pix + g]);
              const T dyv = static_cast<T>(static_cast<scalar_t>(darow[ow * S + g])) *
                            activate_grad<T>(A, epi.alpha[c] * cv + epi.beta[c]);
              s1[g] += static_cast<double>(dyv);
              s2[g] += static_cast<double>(dyv) * (static_cast<double>(cv) - center[c]);
              ds[ow * cp.pix + g] = static_cast<scalar_t>(static_cast<double>(dyv) * pre_scale[c]);
            }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        sum_dy[n * Cb + c0 + g] = s1[g];
        sum_dyc[n * Cb + c0 + g] = s2[g];
      }
    }
  });
}

// Backward pass 3: dx written once: the identity slice of grad, plus every branch's adjoint down-resize.
template <typename scalar_t, bool CL>
void down_adjoint(const BlockPlan& plan, const std::vector<BranchTaps<at::opmath_type<scalar_t>>>& taps,
                  const scalar_t* grad, const std::vector<const scalar_t*>& dz, scalar_t* dx) {
  using T = at::opmath_type<scalar_t>;
  const int64_t C = plan.C, H = plan.H, W = plan.W, Co = plan.out_channels;
  const Groups<CL> groups(C);
  const Plane<CL> xp = Plane<CL>::make(W, C);
  const Plane<CL> gp = Plane<CL>::make(W, Co);
  const size_t B = plan.branches.size();
  at::parallel_for(0, plan.N * groups.per_n, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t S = CL ? kGroup : 1;
    std::vector<std::vector<T>> expanded(B);  // dz of branch b expanded along the width: (h_b, W)
    std::vector<T> row(W * S);
    for (int64_t item = begin; item < end; ++item) {
      int64_t n, c0, g_count;
      groups.at(item, &n, &c0, &g_count);
      const int64_t G = CL ? g_count : 1;  // a constant 1 for NCHW, so the loops over j vectorise
      for (size_t b = 0; b < B; ++b) {
        const BranchPlan& bp = plan.branches[b];
        if (bp.identity) continue;
        const auto& tw = taps[b].down_w;
        const Plane<CL> zp = Plane<CL>::make(bp.level_w, C);
        const scalar_t* zb = dz[b] + Plane<CL>::origin(n, c0, C, bp.level_h, bp.level_w);
        expanded[b].assign(bp.level_h * W * S, T(0));
        for (int64_t oh = 0; oh < bp.level_h; ++oh) {
          for (int64_t j = 0; j < W; ++j) {
            T* e = expanded[b].data() + (oh * W + j) * S;
            for (int64_t k = tw.col_ptr[j]; k < tw.col_ptr[j + 1]; ++k) {
              const scalar_t* zs = zb + oh * zp.row + tw.col_idx[k] * zp.pix;
              const T wt = tw.col_w[k];
              for (int64_t g = 0; g < G; ++g) e[g] += wt * static_cast<T>(zs[g]);
            }
          }
        }
      }
      scalar_t* xb = dx + Plane<CL>::origin(n, c0, C, H, W);
      const scalar_t* gb = plan.x_offset >= 0 ? grad + Plane<CL>::origin(n, plan.x_offset + c0, Co, H, W) : nullptr;
      for (int64_t i = 0; i < H; ++i) {
        for (int64_t j = 0; j < W; ++j)
          for (int64_t g = 0; g < G; ++g) row[j * S + g] = gb ? static_cast<T>(gb[i * gp.row + j * gp.pix + g]) : T(0);
        for (size_t b = 0; b < B; ++b) {
          const BranchPlan& bp = plan.branches[b];
          if (bp.identity) {
            const scalar_t* zb = dz[b] + Plane<CL>::origin(n, c0, C, H, W);
            for (int64_t j = 0; j < W; ++j)
              for (int64_t g = 0; g < G; ++g) row[j * S + g] += static_cast<T>(zb[i * xp.row + j * xp.pix + g]);
            continue;
          }
          const auto& th = taps[b].down_h;
          for (int64_t k = th.col_ptr[i]; k < th.col_ptr[i + 1]; ++k) {
            const T* e = expanded[b].data() + th.col_idx[k] * W * S;
            const T wt = th.col_w[k];
            for (int64_t j = 0; j < W * S; ++j) row[j] += wt * e[j];
          }
        }
        for (int64_t j = 0; j < W; ++j)
          for (int64_t g = 0; g < G; ++g) xb[i * xp.row + j * xp.pix + g] = static_cast<scalar_t>(row[j * S + g]);
      }
    }
  });
}

// ATen's convolution backward of one branch, over chunks of the batch when the conv-output gradient is large:
// its workspace (oneDNN's reordered copies of dconv, about 1.5 times its size) grows with the batch, and would
// come on top of everything the fused block keeps saved until its backward returns. dconv_of(n0, len) gives
// the conv-output gradient of samples [n0, n0 + len) (a slice of the whole one, or computed for the chunk
// alone, so that the whole one never exists). The weight and bias gradients are summed over the chunks in
// batch order (deterministic).
constexpr int64_t kConvBackwardChunkBytes = 4 << 20;

// Samples per chunk for a conv-output gradient of sample_bytes bytes per sample (N: one chunk).
int64_t conv_backward_chunk(int64_t N, int64_t sample_bytes) {
  return sample_bytes > 0 ? std::max<int64_t>(1, kConvBackwardChunkBytes / sample_bytes) : std::max<int64_t>(N, 1);
}

template <typename DconvOf>
std::tuple<Tensor, Tensor, Tensor> conv_backward_chunked(DconvOf&& dconv_of, int64_t chunk, const Tensor& z,
                                                         const Tensor& weight, int64_t pad,
                                                         std::array<bool, 2> output_mask) {
  const int64_t N = z.size(0), Cb = weight.size(0);
  auto call = [&](const Tensor& d, const Tensor& in) {
    return at::convolution_backward(d, in, weight, c10::OptionalArrayRef<int64_t>({Cb}), {1, 1}, {pad, pad}, {1, 1},
                                    false, {0, 0}, 1, {output_mask[0], output_mask[1], true});
  };
  if (chunk >= N) return call(dconv_of(0, N), z);
  Tensor dz = output_mask[0] ? at::empty_like(z) : Tensor();
  Tensor dw, db;
  at::ScalarType dtype = z.scalar_type();
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t len = std::min(chunk, N - n0);
    auto [dz_c, dw_c, db_c] = call(dconv_of(n0, len), z.narrow(0, n0, len));
    if (output_mask[0]) dz.narrow(0, n0, len).copy_(dz_c);
    dz_c = Tensor();  // freed before the next chunk's gradient is made
    // Summed in float32 at least (a half-precision sum would round at every chunk).
    const auto wide = [](const Tensor& t) { return t.to(stats_dtype(t.scalar_type()), false, /*copy=*/true); };
    if (output_mask[1]) dw = dw.defined() ? dw.add_(dw_c) : wide(dw_c);
    dtype = db_c.scalar_type();
    db = db.defined() ? db.add_(db_c) : wide(db_c);
  }
  return {dz, output_mask[1] ? dw.to(weight.scalar_type()) : dw, db.to(dtype)};
}

}  // namespace

// The dtype and layout dispatch around down_adjoint (the block's backward and the projection's).
void detail::dispatch_down_adjoint(const BlockPlan& plan, const Tensor& grad, const TensorVector& dz,
                                   const Tensor& grad_x, bool cl) {
  const size_t B = plan.branches.size();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_x.scalar_type(), "msfused_dx_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto taps = make_branch_taps<T>(plan);
    std::vector<const scalar_t*> zv(B);
    for (size_t b = 0; b < B; ++b) zv[b] = dz[b].numel() ? dz[b].const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* g = grad.defined() ? grad.const_data_ptr<scalar_t>() : nullptr;
    if (grad_x.numel() > 0) {
      if (cl) down_adjoint<scalar_t, true>(plan, taps, g, zv, grad_x.data_ptr<scalar_t>());
      else down_adjoint<scalar_t, false>(plan, taps, g, zv, grad_x.data_ptr<scalar_t>());
    }
  });
}

// The backward of branch bp's epilogue (up-resize, activation, norm): from `grad` (in format fmt), the
// gradient of the block output as `plan` lays it out, the gradient of the convolution output `pre` (bias included), and the
// gradients of the norm's scale and shift (empty where absent).
std::tuple<Tensor, Tensor, Tensor> detail::epilogue_backward(const BlockPlan& plan, const BranchPlan& bp,
                                                             const Tensor& grad, const Tensor& pre,
                                                             const std::optional<Tensor>& sc,
                                                             const std::optional<Tensor>& sh, const Tensor& mean,
                                                             const Tensor& var, at::MemoryFormat fmt) {
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const auto opts = grad.options();
  const int64_t Cb = bp.out_channels;
  Tensor dconv, grad_scale, grad_shift;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "msfused_epilogue_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    BranchTaps<double> taps;  // the upsample's adjoint in double (up_adjoint_and_act_grad)
    taps.up_h = make_taps<double>(bp.up_h, bp.level_h, plan.H, 1, plan.align_corners);
    taps.up_w = make_taps<double>(bp.up_w, bp.level_w, plan.W, 1, plan.align_corners);
    const Epilogue<T> epi = make_epilogue<T>(bp, sc, sh, mean, var);
    const Tensor pre_b = pre.contiguous(fmt);
    // Eval mode: dconv = scale * dY, folded into pass 1. Batch statistics: 1 there, finished below.
    const std::vector<double> s = to_doubles(sc, Cb, 1.0);
    const std::vector<double> center = bp.batch_stats ? to_doubles(mean, Cb, 0.0) : std::vector<double>(Cb, 0.0);
    const std::vector<double> pre_scale = bp.batch_stats ? std::vector<double>(Cb, 1.0) : s;
    dconv = at::empty_like(pre_b, at::MemoryFormat::Preserve);
    std::vector<double> part_dy(plan.N * Cb), part_dyc(plan.N * Cb);
    if (pre_b.numel() > 0) {
      with_activation(plan.activation, [&](auto act) {
        constexpr Activation A = decltype(act)::value;
        auto run = cl ? up_adjoint_and_act_grad<scalar_t, true, A> : up_adjoint_and_act_grad<scalar_t, false, A>;
        run(plan, bp, taps, epi, center, pre_scale, grad.const_data_ptr<scalar_t>(),
            pre_b.const_data_ptr<scalar_t>(), dconv.data_ptr<scalar_t>(), part_dy.data(), part_dyc.data());
      });
    }
    std::vector<double> sum_dy(Cb, 0.0), sum_dyc(Cb, 0.0);
    for (int64_t n = 0; n < plan.N; ++n)  // fixed order: deterministic
      for (int64_t c = 0; c < Cb; ++c) {
        sum_dy[c] += part_dy[n * Cb + c];
        sum_dyc[c] += part_dyc[n * Cb + c];
      }
    const auto pdt = at::TensorOptions().dtype(at::kDouble);
    std::vector<double> d_scale(Cb);
    if (bp.batch_stats) {
      const std::vector<double> v = to_doubles(var, Cb, 0.0), m = center;
      const double M = static_cast<double>(plan.N * bp.level_h * bp.level_w);
      std::vector<double> p(Cb), q(Cb), r(Cb);
      for (int64_t c = 0; c < Cb; ++c)
        batch_norm_grad(s[c], m[c], v[c], bp.eps, M, sum_dy[c], sum_dyc[c], &d_scale[c], &p[c], &q[c], &r[c]);
      // In place, one parallel pass (the projection's is full-size): dconv = p * dY + q * conv + r.
      std::vector<T> pt(p.begin(), p.end()), qt(q.begin(), q.end()), rt(r.begin(), r.end());
      scalar_t* d = dconv.data_ptr<scalar_t>();
      const scalar_t* cv = pre_b.const_data_ptr<scalar_t>();
      const int64_t hw = bp.level_h * bp.level_w;
      at::parallel_for(0, dconv.numel(), 16384, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t c = cl ? i % Cb : (i / hw) % Cb;
          d[i] = static_cast<scalar_t>(pt[c] * static_cast<T>(d[i]) + qt[c] * static_cast<T>(cv[i]) + rt[c]);
        }
      });
    } else {
      d_scale = sum_dyc;  // sum(dY * conv)
    }
    const auto param_opts = [&](const std::optional<Tensor>& t) {
      return at::TensorOptions().dtype(t.has_value() && t->defined() ? t->scalar_type() : grad.scalar_type());
    };
    if (sc.has_value() && sc->defined())
      grad_scale = at::from_blob(d_scale.data(), {Cb}, pdt).to(param_opts(sc), false, /*copy=*/true);
    else
      grad_scale = at::empty({0}, opts);
    if (sh.has_value() && sh->defined())
      grad_shift = at::from_blob(sum_dy.data(), {Cb}, pdt).to(param_opts(sh), false, /*copy=*/true);
    else
      grad_shift = at::empty({0}, opts);
  });
  return {dconv, grad_scale, grad_shift};
}

BackwardResult multi_scale_backward_cpu(const Tensor& grad_in, const Tensor& x_in, at::TensorList weight,
                                        const OptionalTensorList& scale, const OptionalTensorList& shift,
                                        at::TensorList level, at::TensorList pre, at::TensorList mean,
                                        at::TensorList var, const c10::List<bool>& batch_stats,
                                        c10::ArrayRef<double> eps, c10::IntArrayRef factor, c10::IntArrayRef bins,
                                        c10::string_view down_mode, c10::string_view up_mode, bool align_corners,
                                        c10::string_view activation, c10::string_view input_position,
                                        std::array<bool, 2> output_mask) {
  const BlockPlan plan = make_plan(x_in, weight, batch_stats, eps, factor, bins, down_mode, up_mode, align_corners,
                                   activation, input_position);
  const size_t B = plan.branches.size();
  check_backward_args(plan, grad_in, level, pre, mean, var, scale, shift);
  const auto fmt = x_in.suggest_memory_format();
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const Tensor x = x_in.contiguous(fmt);
  const Tensor grad = grad_in.to(x.scalar_type()).contiguous(fmt);
  const auto opts = x.options();
  TensorVector grad_weight(B), grad_bias(B), grad_scale(B), grad_shift(B), dz(B);
  for (size_t b = 0; b < B; ++b) {
    const BranchPlan& bp = plan.branches[b];
    const int64_t pad = bp.kernel_size / 2;
    const Tensor& z = bp.identity ? x : level[b];
    const int64_t chunk = conv_backward_chunk(plan.N, pre[b].numel() / std::max<int64_t>(plan.N, 1) *
                                                          static_cast<int64_t>(pre[b].element_size()));
    Tensor dconv;  // the whole batch's conv-output gradient, where the norm's batch statistics need it all
    if (bp.batch_stats || chunk >= plan.N)
      std::tie(dconv, grad_scale[b], grad_shift[b]) =
          epilogue_backward(plan, bp, grad, pre[b], scale.get(b), shift.get(b), mean[b], var[b], fmt);
    // Otherwise each chunk's own: the epilogue backward is per sample, and its scale and shift gradients are
    // summed over the chunks in batch order.
    auto dconv_of = [&](int64_t n0, int64_t len) -> Tensor {
      if (dconv.defined()) return dconv.narrow(0, n0, len);
      BlockPlan part = plan;
      part.N = len;
      auto [d, g_scale, g_shift] = epilogue_backward(part, bp, grad.narrow(0, n0, len), pre[b].narrow(0, n0, len),
                                                     scale.get(b), shift.get(b), mean[b], var[b], fmt);
      const auto sum = [&](Tensor& total, const Tensor& t) {
        total = total.defined() ? total.add_(t) : t.to(stats_dtype(t.scalar_type()), false, /*copy=*/true);
      };
      sum(grad_scale[b], g_scale);
      sum(grad_shift[b], g_shift);
      return d;
    };
    auto [dz_b, dw_b, db_b] = conv_backward_chunked(dconv_of, chunk, z, weight[b], pad, output_mask);
    dconv = Tensor();
    if (!bp.batch_stats && chunk < plan.N) {  // the chunks' sums back in the parameters' dtype
      const auto param_dtype = [&](const std::optional<Tensor>& t, const Tensor& g) {
        return t.has_value() && t->defined() ? g.to(t->scalar_type()) : at::empty({0}, opts);
      };
      grad_scale[b] = param_dtype(scale.get(b), grad_scale[b]);
      grad_shift[b] = param_dtype(shift.get(b), grad_shift[b]);
    }
    dz[b] = output_mask[0] ? dz_b.contiguous(fmt) : Tensor();
    grad_weight[b] = output_mask[1] ? dw_b.contiguous(weight[b].suggest_memory_format()) : at::empty({0}, opts);
    grad_bias[b] = db_b;
  }
  Tensor grad_x = at::empty({0}, opts);
  if (output_mask[0]) {
    grad_x = at::empty({plan.N, plan.C, plan.H, plan.W}, opts.memory_format(fmt));
    dispatch_down_adjoint(plan, grad, dz, grad_x, cl);
  }
  return {grad_x, grad_weight, grad_bias, grad_scale, grad_shift};
}

}  // namespace cpu
}  // namespace msfused
