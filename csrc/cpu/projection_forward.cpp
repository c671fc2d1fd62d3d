// The fused multi-scale block with its projection on the CPU (SPEC.md, "The projection"), forward (the
// backward: projection_backward.cpp): act(norm(conv(cat))) without ever building cat. The split of the work
// (which branch goes per tap, the plans) is csrc/projection.h, shared with the CUDA backend; the block's own
// passes (the levels, each branch's epilogue and its backward, dx) are forward.cpp's and backward.cpp's.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <optional>
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

// rw[0, n) += sum over m of w[m] * e[m][0, n): four rows per sweep, so that rw is loaded and stored once per
// four of them.
template <typename T>
inline void add_rows_impl(T* rw, const std::vector<std::pair<int64_t, T>>& rd, const T* e, int64_t n) {
  size_t m = 0;
  for (; m + 4 <= rd.size(); m += 4) {
    const T *e0 = e + rd[m].first, *e1 = e + rd[m + 1].first, *e2 = e + rd[m + 2].first, *e3 = e + rd[m + 3].first;
    const T w0 = rd[m].second, w1 = rd[m + 1].second, w2 = rd[m + 2].second, w3 = rd[m + 3].second;
    for (int64_t q = 0; q < n; ++q) rw[q] += (w0 * e0[q] + w1 * e1[q]) + (w2 * e2[q] + w3 * e3[q]);
  }
  for (; m + 2 <= rd.size(); m += 2) {
    const T *e0 = e + rd[m].first, *e1 = e + rd[m + 1].first;
    const T w0 = rd[m].second, w1 = rd[m + 1].second;
    for (int64_t q = 0; q < n; ++q) rw[q] += w0 * e0[q] + w1 * e1[q];
  }
  if (m < rd.size()) {
    const T* e0 = e + rd[m].first;
    const T w0 = rd[m].second;
    for (int64_t q = 0; q < n; ++q) rw[q] += w0 * e0[q];
  }
}
MSFUSED_SIMD_CLONES void add_rows(float* rw, const std::vector<std::pair<int64_t, float>>& rd, const float* e, int64_t n) {
  add_rows_impl(rw, rd, e, n);
}
MSFUSED_SIMD_CLONES void add_rows(double* rw, const std::vector<std::pair<int64_t, double>>& rd, const double* e, int64_t n) {
  add_rows_impl(rw, rd, e, n);
}

// out[J] = act(al * v + be) for the W values of r, each rounded to scalar_t first (as the reference's
// convolution output is): an NCHW row's norm and activation.
// The pass's hottest loops, this and add_rows, are compiled per SIMD width (simd.h).
template <typename scalar_t, typename T, Activation A, typename Raw = typename Narrow<scalar_t, T>::Raw>
MSFUSED_SIMD_CLONES void epilogue_row(Raw* out, const T* r, T al, T be, int64_t W) {
  using Nr = Narrow<scalar_t, T>;
  for (int64_t J = 0; J < W; ++J) out[J] = Nr::store(activate<T>(A, al * Nr::load(Nr::store(r[J])) + be));
}

// The samples [n0, n1) and rows [r0, r1) one call of accumulate_projection computes, and the layout of its acc:
// (n1 - n0, P, r1 - r0, W), in the work layout.
struct Band {
  int64_t n0, n1, r0, r1;
};

// Forward pass over a band of acc (the band's conv(x, W_x), or null: zeros): the projection's pre-activation
// v = acc + bias + every direct branch's full-size part + every tap branch's maps resized up and shifted by
// their tap (zero outside). Separable: per tap row ky, the k maps of that row expanded along the width and
// summed at the level (E, h x W, once per item), then each output row adds the (one or two) E rows its height
// taps read, contiguously. One read of acc and one write per output element:
//   * with `epi` (no batch statistics) out = act(epi(v)) (out may be acc: inference keeps nothing), and
//     pre_out (may be null, or acc) keeps v for backward;
//   * without, v goes to pre_out, and part_sum / part_m2 get each (n, channel)'s sum and sum of squared
//     deviations from its own mean (in double; combined in batch order by projection_batch_stats); the band
//     then holds whole samples.
// CL is the layout of acc, the maps, the direct parts, pre_out and out (the caller's). acc, the maps and the
// direct parts are in opmath: the sum is rounded to scalar_t once, before the norm and the statistics, as the
// reference's convolution output is.
template <typename scalar_t, bool CL, Activation A>
void accumulate_projection(const BlockPlan& plan, int64_t P, int64_t k, const std::vector<TapBranch<scalar_t>>& tb,
                           const std::vector<const at::opmath_type<scalar_t>*>& direct,
                           const std::vector<at::opmath_type<scalar_t>>& bias,
                           const Epilogue<at::opmath_type<scalar_t>>* epi, const Band& band,
                           const at::opmath_type<scalar_t>* acc, scalar_t* pre_out, scalar_t* out, double* part_sum,
                           double* part_m2) {
  using T = at::opmath_type<scalar_t>;
  constexpr int64_t S = CL ? kGroup : 1;
  const int64_t H = plan.H, W = plan.W, r = k / 2, KP = k * k * P, WS = W * S, rows = band.r1 - band.r0;
  TORCH_INTERNAL_ASSERT(out || (band.r0 == 0 && band.r1 == H), "batch statistics need whole samples");
  const Groups<CL> groups(P);
  const Plane<CL> ap = Plane<CL>::make(W, P);
  int64_t e_size = 0;
  std::vector<int64_t> e_at;  // offset of tap branch t's E rows in the scratch
  for (const auto& t : tb) {
    e_at.push_back(e_size);
    e_size += k * t.h * WS;
  }
  // Per output row, the E rows it reads (offsets into the scratch) and their weights: per tap branch and tap
  // row, the height taps at I + dy (none outside the map: the zero padding).
  std::vector<std::vector<std::pair<int64_t, T>>> reads(rows);
  for (int64_t I = band.r0; I < band.r1; ++I)
    for (size_t b = 0; b < tb.size(); ++b) {
      const TapBranch<scalar_t>& t = tb[b];
      for (int64_t ky = 0; ky < k; ++ky) {
        const int64_t O = I + ky - r;
        if (O < 0 || O >= H) continue;
        const int64_t at = e_at[b] + ky * t.h * WS;
        reads[I - band.r0].emplace_back(at + t.uh.i0[O] * WS, t.uh.two ? t.uh.w0[O] : T(1));
        if (t.uh.two) reads[I - band.r0].emplace_back(at + t.uh.i1[O] * WS, t.uh.w1[O]);
      }
    }
  // Items handed out one at a time: the output's fresh pages fault unevenly over the threads.
  parallel_items((band.n1 - band.n0) * groups.per_n, [&](const auto& next) {
    std::vector<T> e(e_size), row(WS);
    for (int64_t item = next(); item >= 0; item = next()) {
      int64_t n, c0, g_count;
      groups.at(item, &n, &c0, &g_count);
      n += band.n0;
      const int64_t G = CL ? g_count : 1;
      std::fill(e.begin(), e.end(), T(0));
      for (size_t b = 0; b < tb.size(); ++b) {
        const TapBranch<scalar_t>& t = tb[b];
        const Plane<CL> tp = Plane<CL>::make(t.w, KP);
        for (int64_t ky = 0; ky < k; ++ky)
          for (int64_t kx = 0; kx < k; ++kx) {
            const int64_t dx = kx - r, j0 = std::max<int64_t>(0, -dx), j1 = std::min<int64_t>(W, W - dx);
            const T* src = t.maps + Plane<CL>::origin(n, (ky * k + kx) * P + c0, KP, t.h, t.w);
            for (int64_t i = 0; i < t.h; ++i) {
              T* erow = e.data() + e_at[b] + (ky * t.h + i) * WS;
              const T* srow = src + i * tp.row;
              if (!CL && t.col_runs) {  // each level value spread over its run of outputs
                for (int64_t g = 0; g < G; ++g)
                  for (int64_t j = 0; j < t.w; ++j) {
                    int64_t u0, u1;
                    t.runs(j, dx, W, &u0, &u1);
                    const T v = srow[j * tp.pix + g];
                    T* eo = erow + g * W + t.col_first[j] - dx;
                    const T* cw = t.col_w.data() + t.col_ptr[j];
                    for (int64_t u = u0; u < u1; ++u) eo[u] += v * cw[u];
                  }
                continue;
              }
              for (int64_t J = j0; J < j1; ++J) {
                const int64_t q = J + dx;
                const T* a0 = srow + t.uw.i0[q] * tp.pix;
                const T* a1 = srow + t.uw.i1[q] * tp.pix;
                T* es = erow + J * S;
                if (t.uw.two) {
                  const T w0 = t.uw.w0[q], w1 = t.uw.w1[q];
                  for (int64_t g = 0; g < G; ++g) es[g] += w0 * a0[g] + w1 * a1[g];
                } else {
                  for (int64_t g = 0; g < G; ++g) es[g] += a0[g];
                }
              }
            }
          }
      }
      const int64_t work_origin = Plane<CL>::origin(n, c0, P, H, W);
      const int64_t acc_origin = Plane<CL>::origin(n - band.n0, c0, P, rows, W);
      T bias_g[S] = {}, alpha_g[S] = {}, beta_g[S] = {};
      for (int64_t g = 0; g < G; ++g) {
        bias_g[g] = bias.empty() ? T(0) : bias[c0 + g];
        if (out) {
          alpha_g[g] = epi->alpha[c0 + g];
          beta_g[g] = epi->beta[c0 + g];
        }
      }
      double sum[S] = {};
      for (int64_t I = band.r0; I < band.r1; ++I) {
        // acc, the bias and the direct branches (layout-specialised loops, so that they vectorise).
        const int64_t work_row = work_origin + I * ap.row, acc_row = acc_origin + (I - band.r0) * ap.row;
        T* rw = row.data();
        if constexpr (!CL) {
          const T b0 = bias_g[0];
          if (acc) {
            const T* arow = acc + acc_row;
            for (int64_t J = 0; J < W; ++J) rw[J] = arow[J] + b0;
          } else {
            for (int64_t J = 0; J < W; ++J) rw[J] = b0;
          }
          for (const T* d : direct) {
            const T* drw = d + work_row;
            for (int64_t J = 0; J < W; ++J) rw[J] += drw[J];
          }
        } else {
          for (int64_t J = 0; J < W; ++J) {
            T* rs = rw + J * S;
            for (int64_t g = 0; g < S; ++g) rs[g] = bias_g[g];  // zero past G
            if (acc)
              for (int64_t g = 0; g < G; ++g) rs[g] += acc[acc_row + J * ap.pix + g];
            for (const T* d : direct)
              for (int64_t g = 0; g < G; ++g) rs[g] += d[work_row + J * ap.pix + g];
          }
        }
        add_rows(rw, reads[I - band.r0], e.data(), WS);
        // The row out: the pre-activation, and the norm and activation or the statistics' sums.
        const int64_t out_row = work_origin + I * ap.row;
        if constexpr (!CL) {  // its row of the NCHW plane
          for (int64_t g = 0; g < G; ++g) {
            const int64_t og = out_row + g * H * W;
            const T* rg = rw + g * W;
            if (pre_out)
              for (int64_t J = 0; J < W; ++J) pre_out[og + J] = static_cast<scalar_t>(rg[J]);
            if (out) {
              epilogue_row<scalar_t, T, A>(raw<scalar_t, T>(out + og), rg, alpha_g[g], beta_g[g], W);
            } else {
              T s0 = 0;  // the row's sum in opmath, the rows' in double
#pragma omp simd reduction(+ : s0)
              for (int64_t J = 0; J < W; ++J) s0 += static_cast<T>(static_cast<scalar_t>(rg[J]));
              sum[g] += static_cast<double>(s0);
            }
          }
        } else {
          for (int64_t J = 0; J < W; ++J) {
            const int64_t at = out_row + J * ap.pix;
            const T* rs = rw + J * S;
            if (pre_out)
              for (int64_t g = 0; g < G; ++g) pre_out[at + g] = static_cast<scalar_t>(rs[g]);
            if (out) {
              for (int64_t g = 0; g < G; ++g)
                out[at + g] = static_cast<scalar_t>(
                    activate<T>(A, alpha_g[g] * static_cast<T>(static_cast<scalar_t>(rs[g])) + beta_g[g]));
            } else {
              for (int64_t g = 0; g < G; ++g) sum[g] += static_cast<double>(static_cast<scalar_t>(rs[g]));
            }
          }
        }
      }
      if (out) continue;
      // Batch statistics: this item's mean, then its squared deviations, from the stored values (in cache).
      const double count = static_cast<double>(H * W);
      double mean[S], m2[S] = {};
      for (int64_t g = 0; g < G; ++g) mean[g] = sum[g] / count;
      for (int64_t I = 0; I < H; ++I) {
        const scalar_t* prw = pre_out + work_origin + I * ap.row;
        if constexpr (!CL) {
          for (int64_t g = 0; g < G; ++g) {
            const scalar_t* pg = prw + g * H * W;
            const T mu = static_cast<T>(mean[g]);
            T s2 = 0;
#pragma omp simd reduction(+ : s2)
            for (int64_t J = 0; J < W; ++J) {
              const T d = static_cast<T>(pg[J]) - mu;
              s2 += d * d;
            }
            m2[g] += static_cast<double>(s2);
          }
        } else {
          for (int64_t J = 0; J < W; ++J)
            for (int64_t g = 0; g < G; ++g) {
              const double d = static_cast<double>(prw[J * ap.pix + g]) - mean[g];
              m2[g] += d * d;
            }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        part_sum[n * P + c0 + g] = sum[g];
        part_m2[n * P + c0 + g] = m2[g];
      }
    }
  });
}

// The bands of x's part (float32): one sample each, or rows of one sample where its P planes pass kBandBytes
// (whole samples with batch statistics: their pass reads whole planes). Small enough to be read back from
// cache; large enough that oneDNN's call costs little beside the product.
std::vector<Band> x_part_bands(int64_t N, int64_t P, int64_t H, int64_t W, bool whole_samples) {
  constexpr int64_t kBandBytes = int64_t(8) << 20;
  const int64_t row_bytes = std::max<int64_t>(1, P * W * int64_t(sizeof(float)));
  const int64_t rows = whole_samples ? H : std::max<int64_t>(1, kBandBytes / row_bytes);
  std::vector<Band> bands;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t r = 0; r < H; r += rows) bands.push_back({n, n + 1, r, std::min(H, r + rows)});
  return bands;
}

// The batch mean and biased variance per channel from accumulate_projection's per-(n, channel) sums and
// squared deviations (count values each), combined in batch order (Chan et al.): deterministic.
std::pair<Tensor, Tensor> projection_batch_stats(const std::vector<double>& part_sum, const std::vector<double>& part_m2,
                                                 int64_t N, int64_t P, double count, at::ScalarType dtype) {
  std::vector<double> mean(P, 0.0), var(P, 0.0);
  for (int64_t c = 0; c < P; ++c) {
    double s = 0;
    for (int64_t n = 0; n < N; ++n) s += part_sum[n * P + c];
    const double mu = s / (count * N);
    double m2 = 0;
    for (int64_t n = 0; n < N; ++n) {
      const double d = part_sum[n * P + c] / count - mu;
      m2 += part_m2[n * P + c] + count * d * d;
    }
    mean[c] = mu;
    var[c] = m2 / (count * N);
  }
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const auto stat = at::TensorOptions().dtype(stats_dtype(dtype));
  return {at::from_blob(mean.data(), {P}, opts).to(stat, false, /*copy=*/true),
          at::from_blob(var.data(), {P}, opts).to(stat, false, /*copy=*/true)};
}

}  // namespace

ProjectForwardResult multi_scale_project_forward_cpu(
    const Tensor& x_in, at::TensorList weight, const OptionalTensorList& bias, const OptionalTensorList& scale,
    const OptionalTensorList& shift, const c10::List<bool>& batch_stats, c10::ArrayRef<double> eps,
    c10::IntArrayRef factor, c10::IntArrayRef bins, c10::string_view down_mode, c10::string_view up_mode,
    bool align_corners, c10::string_view activation, c10::string_view input_position, const Tensor& pw,
    const std::optional<Tensor>& p_bias, const std::optional<Tensor>& p_scale, const std::optional<Tensor>& p_shift,
    bool p_batch_stats, double p_eps, c10::string_view p_activation, bool save_pre, at::TensorList project_parts) {
  const BlockPlan plan = make_plan(x_in, weight, batch_stats, eps, factor, bins, down_mode, up_mode, align_corners,
                                   activation, input_position);
  TORCH_CHECK_VALUE(bias.size() == weight.size() && scale.size() == weight.size() && shift.size() == weight.size(),
                    "msfused: bias, scale and shift need one entry (or None) per branch");
  check_parameters(x_in, weight, bias, scale, shift);
  const Projection proj = check_projection(plan, x_in, pw, p_eps, p_batch_stats, p_activation);
  const int64_t P = proj.P, k = proj.k, pad = k / 2, H = plan.H, W = plan.W;
  const auto fmt = x_in.suggest_memory_format();
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const Tensor x = x_in.contiguous(fmt);
  const auto opts = x.options();
  const size_t B = plan.branches.size();
  TensorVector level(B), pre(B), mean(B), var(B);
  for (size_t b = 0; b < B; ++b) {
    const BranchPlan& bp = plan.branches[b];
    level[b] = bp.identity ? at::empty({0}, opts) : at::empty({plan.N, plan.C, bp.level_h, bp.level_w}, opts.memory_format(fmt));
  }
  BlockPlan levels_plan = plan;
  levels_plan.x_offset = -1;  // there is no concatenation to copy x into
  dispatch_levels_and_copy(levels_plan, x, Tensor(), level, cl);
  const TensorVector parts = projection_parts(plan, proj, pw, project_parts);
  // The x part of the projection: conv(x, W_x) with the weight's x slice, in opmath. A 1x1 one in float32 is
  // oneDNN's (x_part_on_onednn): for a channels_last x its convolution, whole; for an NCHW x the product W_x X
  // per band (X: the band's (C, pixels) block of x, read transposed where it lies), NCHW like the output, in
  // bands of a sample or of its rows (x_part_bands) that the accumulation reads back from cache. (oneDNN's
  // convolution of an NCHW x reorders it and its output, and a transpose to channels_last and back cost more
  // than the product.) Half precision: widened_conv (summed in float32, not rounded: the pass adds every part
  // before its one rounding), in bands too where it runs on oneDNN's micro-kernel. Otherwise branch_conv's,
  // whole. acc, the maps and the direct parts are in x's layout.
  const at::ScalarType tdt = tap_maps_dtype(x.scalar_type());
  const bool widen = tdt != x.scalar_type();
  const bool onednn = plan.x_offset >= 0 && x_part_on_onednn(k, x);
  const bool banded = plan.x_offset >= 0 && ((onednn && !cl) || (widen && widened_on_ukernel(x, cl)));
  Tensor acc;
  if (plan.x_offset >= 0 && !banded)
    acc = onednn  ? conv1x1(x, parts[0])
          : widen ? widened_conv(x, parts[0], cl)
                  : branch_conv(x, parts[0], std::nullopt, pad, fmt).contiguous(fmt);
  TensorVector tmaps(B), direct(B);
  for (size_t b = 0; b < B; ++b) {
    const BranchPlan& bp = plan.branches[b];
    const Tensor& z = bp.identity ? x : level[b];
    pre[b] = branch_conv(z, weight[b], bias.get(b), bp.kernel_size / 2, fmt).contiguous(fmt);
    std::tie(mean[b], var[b]) = batch_statistics(pre[b], bp.batch_stats);
    const bool whole = convolves_resized(bp, k, H, W);
    const Tensor a = branch_epilogue(branch_alone(plan, b, !whole), pre[b], scale.get(b), shift.get(b), mean[b],
                                     var[b], fmt);
    if (whole)
      direct[b] = widen ? widened_conv(a.contiguous(fmt), parts[1 + b], cl)
                        : branch_conv(a, parts[1 + b], std::nullopt, pad, fmt).contiguous(fmt);
    else
      tmaps[b] = branch_conv(a.to(tdt), parts[1 + b], std::nullopt, 0, fmt).contiguous(fmt);
  }
  const BlockPlan pp = projection_plan(plan, proj);
  // Without batch statistics the norm and activation run in the accumulation pass; in place when the
  // pre-activation need not be kept (nothing will differentiate it). With them, the pass keeps the
  // pre-activation (in acc's place where acc has x's dtype) and its per-sample statistics, and one more pass
  // applies the norm.
  const bool fuse_epilogue = !proj.batch_stats;
  Tensor p_pre = acc.defined() && !widen ? acc : at::empty({plan.N, P, H, W}, opts.memory_format(fmt));
  Tensor out = fuse_epilogue ? (save_pre ? at::empty_like(p_pre, fmt) : p_pre) : Tensor();
  std::vector<double> part_sum(proj.batch_stats ? plan.N * P : 0), part_m2(part_sum.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "msfused_project_accumulate_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto taps = make_branch_taps<T>(plan);
    std::vector<TapBranch<scalar_t>> tb;
    std::vector<const T*> dv;
    for (size_t b = 0; b < B; ++b) {
      if (direct[b].defined()) dv.push_back(direct[b].const_data_ptr<T>());
      if (!tmaps[b].defined()) continue;
      tb.emplace_back(plan.branches[b], taps[b]);
      tb.back().maps = tmaps[b].const_data_ptr<T>();
    }
    std::vector<T> pb;
    if (p_bias.has_value() && p_bias->defined()) {
      TORCH_CHECK_TYPE(p_bias->scalar_type() == x.scalar_type(), "msfused: project_bias has dtype ",
                       p_bias->scalar_type(), " but x has ", x.scalar_type());
      for (double v : to_doubles(p_bias, P, 0.0)) pb.push_back(static_cast<T>(v));
    }
    const Epilogue<T> epi = make_epilogue<T>(pp.branches[0], p_scale, p_shift, Tensor(), Tensor());
    scalar_t* pre_out = !fuse_epilogue || save_pre ? p_pre.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = fuse_epilogue ? out.data_ptr<scalar_t>() : nullptr;
    if (p_pre.numel() == 0) return;
    with_activation(proj.activation, [&](auto act) {
      constexpr Activation A = decltype(act)::value;
      auto run = cl ? accumulate_projection<scalar_t, true, A> : accumulate_projection<scalar_t, false, A>;
      if (!banded) {
        run(plan, P, k, tb, dv, pb, &epi, Band{0, plan.N, 0, H}, acc.defined() ? acc.const_data_ptr<T>() : nullptr,
            pre_out, o, part_sum.data(), part_m2.data());
        return;
      }
      const Tensor wx = onednn ? parts[0].reshape({P, plan.C}).contiguous() : Tensor();
      const std::optional<WidenedConv> widened =
          onednn ? std::nullopt : std::optional<WidenedConv>(std::in_place, parts[0], cl);  // packed once
      const std::vector<Band> bands = x_part_bands(plan.N, P, H, W, proj.batch_stats);
      Tensor buffer;  // the widened bands, one after the other (fresh memory faults page by page)
      for (const Band& band : bands) {
        const T* ab;  // the band's part: (samples, P, rows, W) in x's layout
        Tensor product;
        if (onednn) {  // (P, pixels): the band's rows of each of the P planes
          const Tensor xb = x.select(0, band.n0).view({plan.C, H * W}).slice(1, band.r0 * W, band.r1 * W);
          product = linear(wx, xb.t());
          ab = product.const_data_ptr<T>();
        } else {
          if (!buffer.defined())
            buffer = at::empty({(bands[0].n1 - bands[0].n0) * P * (bands[0].r1 - bands[0].r0) * W}, opts.dtype(at::kFloat));
          widened->run(x, band.n0, band.n1, band.r0, band.r1, buffer.data_ptr<float>());
          ab = reinterpret_cast<const T*>(buffer.const_data_ptr<float>());
        }
        run(plan, P, k, tb, dv, pb, &epi, band, ab, pre_out, o, part_sum.data(), part_m2.data());
      }
    });
  });
  Tensor p_mean, p_var;
  if (proj.batch_stats) {
    std::tie(p_mean, p_var) =
        projection_batch_stats(part_sum, part_m2, plan.N, P, static_cast<double>(H * W), x.scalar_type());
    out = branch_epilogue(pp, p_pre, p_scale, p_shift, p_mean, p_var, fmt, save_pre ? Tensor() : p_pre);
  } else {
    std::tie(p_mean, p_var) = batch_statistics(p_pre, false);  // empty
  }
  if (!save_pre) p_pre = at::empty({0}, opts);
  return {out, level, pre, mean, var, p_pre, p_mean, p_var};
}

}  // namespace cpu
}  // namespace msfused
