// The fused multi-scale block on the CPU: forward and backward kernels, registered for the CPU key.
//
// Forward, per call:
//   1. one pass over x (parallel over channel groups) computes every pyramid level and copies x into its
//      slice of the output;
//   2. each branch's convolution on its (small) level, by ATen (oneDNN); batch statistics if asked;
//   3. one pass writes norm, activation and the resize back up straight into the branch's channel slice.
// Backward mirrors it: the adjoint of the upsample as a gather fused with the activation and norm
// backward, ATen's convolution backward on the level, then one pass that writes dx once (the identity
// slice plus every branch's adjoint down-resize, gathered in a fixed order). No atomics, no scatter
// across threads: results are bit-identical run to run.
//
// Layouts: NCHW work items are one (n, c) plane; channels_last work items are one n and a group of up to
// kGroup channels, so the innermost loops run over contiguous memory in both.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../block_config.h"
#include "../norm.h"
#include "../projection.h"
#include "../taps.h"

namespace msfused {
namespace cpu {
namespace {

using at::Tensor;
using TensorVector = std::vector<Tensor>;
using ForwardResult = std::tuple<Tensor, TensorVector, TensorVector, TensorVector, TensorVector>;

constexpr int64_t kGroup = 16;  // channels per channels_last work item: one 64-byte line of float32

// Where element (i, j, g) of one work item lives: base + i * row + j * pix + g.
template <bool CL>
struct Plane {
  int64_t row = 0, pix = 1;
  static Plane make(int64_t width, int64_t channels) {
    Plane p;
    p.row = CL ? width * channels : width;
    p.pix = CL ? channels : 1;
    return p;
  }
  // Offset of (n, c, 0, 0) in a (N, channels, height, width) tensor.
  static int64_t origin(int64_t n, int64_t c, int64_t channels, int64_t height, int64_t width) {
    return CL ? n * height * width * channels + c : (n * channels + c) * height * width;
  }
};

// Work items: (n, first channel, channel count) over `channels` channels.
template <bool CL>
struct Groups {
  int64_t per_n;
  int64_t channels;
  explicit Groups(int64_t channels_) : per_n(CL ? (channels_ + kGroup - 1) / kGroup : channels_), channels(channels_) {}
  void at(int64_t item, int64_t* n, int64_t* c0, int64_t* g) const {
    *n = item / per_n;
    const int64_t k = item % per_n;
    *c0 = CL ? k * kGroup : k;
    *g = CL ? std::min(kGroup, channels - *c0) : 1;
  }
};

template <typename T>
struct BranchTaps {
  Taps1d<T> down_h, down_w, up_h, up_w;
};

template <typename T>
std::vector<BranchTaps<T>> make_branch_taps(const BlockPlan& plan) {
  std::vector<BranchTaps<T>> taps;
  for (const BranchPlan& b : plan.branches) {
    BranchTaps<T> t;
    t.down_h = make_taps<T>(b.down_h, plan.H, b.level_h, b.factor, plan.align_corners);
    t.down_w = make_taps<T>(b.down_w, plan.W, b.level_w, b.factor, plan.align_corners);
    t.up_h = make_taps<T>(b.up_h, b.level_h, plan.H, 1, plan.align_corners);
    t.up_w = make_taps<T>(b.up_w, b.level_w, plan.W, 1, plan.align_corners);
    taps.push_back(std::move(t));
  }
  return taps;
}

// Branch b's per-channel epilogue as y = alpha * conv + beta (norm folded or batch-normalised), in opmath.
template <typename T>
struct Epilogue {
  std::vector<T> alpha, beta;
};

std::vector<double> to_doubles(const std::optional<Tensor>& t, int64_t n, double fill) {
  if (!t.has_value() || !t->defined()) return std::vector<double>(n, fill);
  Tensor d = t->detach().to(at::kCPU, at::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + n);
}

// y = scale * conv + shift, or with batch statistics y = (conv - mean) * invstd * scale + shift.
template <typename T>
Epilogue<T> make_epilogue(const BranchPlan& b, const std::optional<Tensor>& scale, const std::optional<Tensor>& shift,
                          const Tensor& mean, const Tensor& var) {
  const int64_t cb = b.out_channels;
  std::vector<double> s = to_doubles(scale, cb, 1.0), t = to_doubles(shift, cb, 0.0);
  Epilogue<T> e;
  e.alpha.resize(cb);
  e.beta.resize(cb);
  std::vector<double> m = b.batch_stats ? to_doubles(mean, cb, 0.0) : std::vector<double>(cb, 0.0);
  std::vector<double> v = b.batch_stats ? to_doubles(var, cb, 0.0) : std::vector<double>(cb, 0.0);
  for (int64_t c = 0; c < cb; ++c) {
    double alpha, beta;
    norm_epilogue(b.batch_stats, s[c], t[c], m[c], v[c], b.eps, &alpha, &beta);
    e.alpha[c] = static_cast<T>(alpha);
    e.beta[c] = static_cast<T>(beta);
  }
  return e;
}

// dst[l] = sum over taps k of w[k] * src[idx[k] * stride + l], for l < L: the L sums stay in registers
// while the taps' rows stream by, so each element is loaded once (no row buffer stored and reloaded per tap).
// Equal weights (pooling) are applied once to the sum, as average pooling divides the sum: one add per element.
template <int64_t L, bool Uniform, typename scalar_t, typename T>
inline void weighted_rows_block(const scalar_t* src, int64_t stride, const int64_t* idx, const T* w, int64_t count,
                                T* dst) {
  T acc[L] = {};
  for (int64_t k = 0; k < count; ++k) {
    const scalar_t* s = src + idx[k] * stride;
    if constexpr (Uniform) {
      for (int64_t l = 0; l < L; ++l) acc[l] += static_cast<T>(s[l]);
    } else {
      const T wk = w[k];
      for (int64_t l = 0; l < L; ++l) acc[l] += wk * static_cast<T>(s[l]);
    }
  }
  for (int64_t l = 0; l < L; ++l) dst[l] = Uniform ? acc[l] * w[0] : acc[l];
}

// The same over len contiguous elements: blocks as wide as the registers allow (a 64-float row of x in one
// sequential sweep when the weights are equal), then one element at a time.
template <bool Uniform, typename scalar_t, typename T>
inline void weighted_rows_impl(const scalar_t* src, int64_t stride, int64_t len, const int64_t* idx, const T* w,
                               int64_t count, T* dst) {
  int64_t l = 0;
  if constexpr (Uniform && sizeof(T) == 4)
    for (; l + 64 <= len; l += 64) weighted_rows_block<64, Uniform>(src + l, stride, idx, w, count, dst + l);
  for (; l + 32 <= len; l += 32) weighted_rows_block<32, Uniform>(src + l, stride, idx, w, count, dst + l);
  for (; l + 16 <= len; l += 16) weighted_rows_block<16, Uniform>(src + l, stride, idx, w, count, dst + l);
  for (; l < len; ++l) weighted_rows_block<1, Uniform>(src + l, stride, idx, w, count, dst + l);
}

inline bool is_pooling(ResizeKind k) { return k == ResizeKind::AvgFactor || k == ResizeKind::Adaptive; }

// pooling: the taps are a pooling window's (equal weights; the reference sums, then divides).
template <typename scalar_t, typename T>
inline void weighted_rows(bool pooling, const scalar_t* src, int64_t stride, int64_t len, const int64_t* idx,
                          const T* w, int64_t count, T* dst) {
  if (pooling)
    weighted_rows_impl<true>(src, stride, len, idx, w, count, dst);
  else
    weighted_rows_impl<false>(src, stride, len, idx, w, count, dst);
}

// Row segments of x shared by the branches whose height resize pools (equal weights over contiguous rows):
// x's rows cut at every such window's ends, so that pass 1 sums each row of x once (into its segment) and
// each window is the sum of whole segments (PSP's bins 1, 2, 3, 6 would otherwise read every row about four
// times; scales 2 and 4 twice).
struct RowSegments {
  std::vector<std::vector<int64_t>> rows;  // segment k: its rows of x (none: no window reads it)
  // windows[b][oh]: the segments level row oh of branch b sums; windows[b] is empty for a branch that does
  // not use segments.
  std::vector<std::vector<std::vector<int64_t>>> windows;
  bool any() const { return !rows.empty(); }
};

template <typename T>
RowSegments make_row_segments(const BlockPlan& plan, const std::vector<BranchTaps<T>>& taps) {
  RowSegments s;
  const size_t B = plan.branches.size();
  std::vector<int64_t> cuts{0, plan.H};
  std::vector<bool> uses(B, false);
  for (size_t b = 0; b < B; ++b) {
    const BranchPlan& bp = plan.branches[b];
    if (bp.identity || !is_pooling(bp.down_h)) continue;
    const auto& th = taps[b].down_h;
    bool contiguous = true;
    for (int64_t oh = 0; oh < bp.level_h; ++oh)
      for (int64_t k = th.row_ptr[oh]; k < th.row_ptr[oh + 1]; ++k)
        contiguous = contiguous && th.row_idx[k] == th.row_idx[th.row_ptr[oh]] + (k - th.row_ptr[oh]);
    if (!contiguous) continue;
    uses[b] = true;
    for (int64_t oh = 0; oh < bp.level_h; ++oh) {
      cuts.push_back(th.row_idx[th.row_ptr[oh]]);
      cuts.push_back(th.row_idx[th.row_ptr[oh + 1] - 1] + 1);
    }
  }
  if (std::none_of(uses.begin(), uses.end(), [](bool u) { return u; })) return s;
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  const auto segment_of = [&](int64_t row) {
    return static_cast<int64_t>(std::lower_bound(cuts.begin(), cuts.end(), row) - cuts.begin());
  };
  std::vector<bool> read(cuts.size() - 1, false);
  s.windows.resize(B);
  for (size_t b = 0; b < B; ++b) {
    if (!uses[b]) continue;
    const auto& th = taps[b].down_h;
    for (int64_t oh = 0; oh < plan.branches[b].level_h; ++oh) {
      std::vector<int64_t> w;
      const int64_t end = segment_of(th.row_idx[th.row_ptr[oh + 1] - 1] + 1);
      for (int64_t k = segment_of(th.row_idx[th.row_ptr[oh]]); k < end; ++k) {
        w.push_back(k);
        read[k] = true;
      }
      s.windows[b].push_back(std::move(w));
    }
  }
  s.rows.resize(cuts.size() - 1);
  for (size_t k = 0; k + 1 < cuts.size(); ++k)
    if (read[k])
      for (int64_t r = cuts[k]; r < cuts[k + 1]; ++r) s.rows[k].push_back(r);
  return s;
}

// ---------------------------------------------------------------------------------------------------
// Forward pass 1: every level from one read of x, and x's slice of the output.
// ---------------------------------------------------------------------------------------------------
template <typename scalar_t, bool CL>
void levels_and_copy(const BlockPlan& plan, const std::vector<BranchTaps<at::opmath_type<scalar_t>>>& taps,
                     const scalar_t* x, scalar_t* out, const std::vector<scalar_t*>& level) {
  using T = at::opmath_type<scalar_t>;
  const int64_t C = plan.C, H = plan.H, W = plan.W;
  const Groups<CL> groups(C);
  const Plane<CL> xp = Plane<CL>::make(W, C);
  const Plane<CL> op = Plane<CL>::make(W, plan.out_channels);
  constexpr int64_t S = CL ? kGroup : 1;
  const RowSegments segs = make_row_segments(plan, taps);
  at::parallel_for(0, plan.N * groups.per_n, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> row(W * S), seg_sum(segs.rows.size() * W * S);
    for (int64_t item = begin; item < end; ++item) {
      int64_t n, c0, g_count;
      groups.at(item, &n, &c0, &g_count);
      const int64_t G = CL ? g_count : 1;  // a constant 1 for NCHW, so the loops over j vectorise
      const scalar_t* xb = x + Plane<CL>::origin(n, c0, C, H, W);
      // Each segment's rows summed (x read once), in row order: plain loops over a row, which vectorise.
      for (size_t k = 0; k < segs.rows.size(); ++k) {
        const std::vector<int64_t>& r = segs.rows[k];
        if (r.empty()) continue;
        T* __restrict sk = seg_sum.data() + k * W * S;
        for (size_t t = 0; t < r.size(); ++t) {
          const scalar_t* __restrict xr = xb + r[t] * xp.row;
          if (!CL) {
            if (t == 0)
              for (int64_t j = 0; j < W; ++j) sk[j] = static_cast<T>(xr[j]);
            else
              for (int64_t j = 0; j < W; ++j) sk[j] += static_cast<T>(xr[j]);
          } else {
            for (int64_t j = 0; j < W; ++j)
              for (int64_t g = 0; g < G; ++g)
                sk[j * S + g] = (t == 0 ? T(0) : sk[j * S + g]) + static_cast<T>(xr[j * xp.pix + g]);
          }
        }
      }
      if (plan.x_offset >= 0) {
        scalar_t* ob = out + Plane<CL>::origin(n, plan.x_offset + c0, plan.out_channels, H, W);
        if (!CL) {
          std::memcpy(ob, xb, sizeof(scalar_t) * H * W);
        } else {
          for (int64_t i = 0; i < H; ++i)
            for (int64_t j = 0; j < W; ++j) std::memcpy(ob + i * op.row + j * op.pix, xb + i * xp.row + j * xp.pix, sizeof(scalar_t) * G);
        }
      }
      for (size_t b = 0; b < plan.branches.size(); ++b) {
        const BranchPlan& bp = plan.branches[b];
        if (bp.identity) continue;
        const auto& th = taps[b].down_h;
        const auto& tw = taps[b].down_w;
        const bool pool_h = is_pooling(bp.down_h), pool_w = is_pooling(bp.down_w);
        const Plane<CL> zp = Plane<CL>::make(bp.level_w, C);
        scalar_t* zb = level[b] + Plane<CL>::origin(n, c0, C, bp.level_h, bp.level_w);
        for (int64_t oh = 0; oh < bp.level_h; ++oh) {
          // Rows of x weighted into one row buffer (each element of x loaded once, the sums in registers),
          // then the column taps.
          const int64_t k0 = th.row_ptr[oh], taps_h = th.row_ptr[oh + 1] - k0;
          if (!segs.windows.empty() && !segs.windows[b].empty()) {  // the window's segments, then its weight
            const std::vector<int64_t>& win = segs.windows[b][oh];
            T* __restrict rw = row.data();
            const T* __restrict first = seg_sum.data() + win[0] * W * S;
            for (int64_t q = 0; q < W * S; ++q) rw[q] = first[q];
            for (size_t t = 1; t < win.size(); ++t) {
              const T* __restrict sk = seg_sum.data() + win[t] * W * S;
              for (int64_t q = 0; q < W * S; ++q) rw[q] += sk[q];
            }
            const T wh = th.row_w[k0];
            for (int64_t q = 0; q < W * S; ++q) rw[q] *= wh;
          } else if (!CL) {
            weighted_rows(pool_h, xb, xp.row, W, th.row_idx.data() + k0, th.row_w.data() + k0, taps_h, row.data());
          } else {
            for (int64_t j = 0; j < W; ++j)
              weighted_rows(pool_h, xb + j * xp.pix, xp.row, G, th.row_idx.data() + k0, th.row_w.data() + k0, taps_h,
                            row.data() + j * S);
          }
          for (int64_t ow = 0; ow < bp.level_w; ++ow) {
            scalar_t* zs = zb + oh * zp.row + ow * zp.pix;
            if constexpr (!CL) {  // one channel: lanes of partial sums instead of one latency-bound chain
              const int64_t k0w = tw.row_ptr[ow], k1w = tw.row_ptr[ow + 1];
              const int64_t* idx = tw.row_idx.data();
              const T* wt = tw.row_w.data();
              T acc = 0;
              if (pool_w) {
#pragma omp simd reduction(+ : acc)
                for (int64_t k = k0w; k < k1w; ++k) acc += row[idx[k]];
                acc *= wt[k0w];
              } else {
#pragma omp simd reduction(+ : acc)
                for (int64_t k = k0w; k < k1w; ++k) acc += wt[k] * row[idx[k]];
              }
              zs[0] = static_cast<scalar_t>(acc);
              continue;
            }
            T acc[S] = {};
            for (int64_t k = tw.row_ptr[ow]; k < tw.row_ptr[ow + 1]; ++k) {
              const T* r = row.data() + tw.row_idx[k] * S;
              const T w = tw.row_w[k];
              for (int64_t g = 0; g < G; ++g) acc[g] += w * r[g];
            }
            for (int64_t g = 0; g < G; ++g) zs[g] = static_cast<scalar_t>(acc[g]);
          }
        }
      }
    }
  });
}

// An up-resize axis (Identity, Nearest: one tap; Linear: two) as flat arrays for the inner loops.
template <typename T>
struct UpAxis {
  bool two = false;
  std::vector<int64_t> i0, i1;
  std::vector<T> w0, w1;
  explicit UpAxis(const Taps1d<T>& t) {
    for (int64_t o = 0; o < t.out; ++o) {
      const int64_t k = t.row_ptr[o], count = t.row_ptr[o + 1] - k;
      TORCH_INTERNAL_ASSERT(count == 1 || count == 2);
      two = two || count == 2;
      i0.push_back(t.row_idx[k]);
      w0.push_back(t.row_w[k]);
      i1.push_back(count == 2 ? t.row_idx[k + 1] : t.row_idx[k]);
      TORCH_INTERNAL_ASSERT(i1.back() - i0.back() == 0 || i1.back() - i0.back() == 1);  // epilogue_and_up relies on it
      w1.push_back(count == 2 ? t.row_w[k + 1] : T(0));
    }
  }
};

// Calls f with the activation as a compile-time constant, so the epilogue loops specialise (and relu
// vectorises).
template <typename F>
void with_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::Relu: f(std::integral_constant<Activation, Activation::Relu>{}); break;
    case Activation::Silu: f(std::integral_constant<Activation, Activation::Silu>{}); break;
    case Activation::Gelu: f(std::integral_constant<Activation, Activation::Gelu>{}); break;
    default: f(std::integral_constant<Activation, Activation::None>{}); break;
  }
}

// ---------------------------------------------------------------------------------------------------
// Forward pass 3: norm, activation and the resize back up, written into each branch's output slice.
// ---------------------------------------------------------------------------------------------------
template <typename scalar_t, bool CL, Activation A>
void epilogue_and_up(const BlockPlan& plan, const std::vector<BranchTaps<at::opmath_type<scalar_t>>>& taps,
                     const std::vector<Epilogue<at::opmath_type<scalar_t>>>& epi, const std::vector<const scalar_t*>& pre,
                     scalar_t* out) {
  using T = at::opmath_type<scalar_t>;
  constexpr int64_t S = CL ? kGroup : 1;
  const int64_t H = plan.H, W = plan.W, Co = plan.out_channels;
  const Plane<CL> op = Plane<CL>::make(W, Co);
  for (size_t b = 0; b < plan.branches.size(); ++b) {
    if (pre[b] == nullptr) continue;  // written by identity_epilogue_from_channels_last
    const BranchPlan& bp = plan.branches[b];
    const int64_t Cb = bp.out_channels, h = bp.level_h, w = bp.level_w;
    const Groups<CL> groups(Cb);
    const Plane<CL> cp = Plane<CL>::make(w, Cb);
    const T* alpha = epi[b].alpha.data();
    const T* beta = epi[b].beta.data();
    const UpAxis<T> uh(taps[b].up_h), uw(taps[b].up_w);
    at::parallel_for(0, plan.N * groups.per_n, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> level(bp.identity ? 0 : h * w * S), wide(bp.identity ? 0 : 2 * W * S);
      for (int64_t item = begin; item < end; ++item) {
        int64_t n, c0, g_count;
        groups.at(item, &n, &c0, &g_count);
        const int64_t G = CL ? g_count : 1;
        const scalar_t* cb = pre[b] + Plane<CL>::origin(n, c0, Cb, h, w);
        scalar_t* ob = out + Plane<CL>::origin(n, bp.channel_offset + c0, Co, H, W);
        if (bp.identity) {
          if (!CL) {  // one contiguous plane in and out
            const T a = alpha[c0], be = beta[c0];
            for (int64_t k = 0; k < H * W; ++k) ob[k] = static_cast<scalar_t>(activate<T>(A, a * static_cast<T>(cb[k]) + be));
            continue;
          }
          for (int64_t i = 0; i < H; ++i)
            for (int64_t j = 0; j < W; ++j) {
              const scalar_t* cs = cb + i * cp.row + j * cp.pix;
              scalar_t* os = ob + i * op.row + j * op.pix;
              for (int64_t g = 0; g < G; ++g)
                os[g] = static_cast<scalar_t>(activate<T>(A, alpha[c0 + g] * static_cast<T>(cs[g]) + beta[c0 + g]));
            }
          continue;
        }
        // The activated level in a local buffer (it is small), rounded to the tensor's dtype as the
        // reference's activation output is; then the separable up-resize in ATen's order (along the width,
        // then the height): each level row is expanded to the full width once (kept for the two level rows
        // the current output row reads), and each output row is a contiguous blend of two expanded rows.
        for (int64_t i = 0; i < h; ++i)
          for (int64_t j = 0; j < w; ++j) {
            const scalar_t* cs = cb + i * cp.row + j * cp.pix;
            T* ls = level.data() + (i * w + j) * S;
            for (int64_t g = 0; g < G; ++g)
              ls[g] = static_cast<T>(static_cast<scalar_t>(activate<T>(A, alpha[c0 + g] * static_cast<T>(cs[g]) + beta[c0 + g])));
          }
        int64_t held[2] = {-1, -1};  // the level row in each slot of `wide` (slot = row parity)
        auto expanded = [&](int64_t i) -> const T* {
          T* e = wide.data() + (i & 1) * W * S;
          if (held[i & 1] == i) return e;
          held[i & 1] = i;
          const T* lr = level.data() + i * w * S;
          for (int64_t J = 0; J < W; ++J) {
            const T* a0 = lr + uw.i0[J] * S;
            const T* a1 = lr + uw.i1[J] * S;
            T* es = e + J * S;
            if (uw.two) {
              const T w0 = uw.w0[J], w1 = uw.w1[J];
              for (int64_t g = 0; g < G; ++g) es[g] = w0 * a0[g] + w1 * a1[g];
            } else {
              for (int64_t g = 0; g < G; ++g) es[g] = a0[g];
            }
          }
          return e;
        };
        for (int64_t I = 0; I < H; ++I) {
          const T* e0 = expanded(uh.i0[I]);
          const T* e1 = expanded(uh.i1[I]);  // a linear axis' two rows differ in parity, or are the same row
          scalar_t* orow = ob + I * op.row;
          const T w0 = uh.w0[I], w1 = uh.w1[I];
          if constexpr (!CL) {
            if (uh.two) {
              for (int64_t J = 0; J < W; ++J) orow[J] = static_cast<scalar_t>(w0 * e0[J] + w1 * e1[J]);
            } else {
              for (int64_t J = 0; J < W; ++J) orow[J] = static_cast<scalar_t>(e0[J]);
            }
            continue;
          }
          for (int64_t J = 0; J < W; ++J) {
            scalar_t* os = orow + J * op.pix;
            const T* a0 = e0 + J * S;
            const T* a1 = e1 + J * S;
            if (uh.two) {
              for (int64_t g = 0; g < G; ++g) os[g] = static_cast<scalar_t>(w0 * a0[g] + w1 * a1[g]);
            } else {
              for (int64_t g = 0; g < G; ++g) os[g] = static_cast<scalar_t>(a0[g]);
            }
          }
        }
      }
    });
  }
}

// The epilogue of a factor-1 branch of an NCHW block whose convolution ran channels_last
// (conv_channels_last): pre_cl (N, H, W, Cb) transposed in tiles of kGroup channels x kGroup pixels (each
// read and each write a whole cache line) into the branch's NCHW output slice, activated, and into `pre`
// (NCHW: the convolution's output as the operator returns it). Work items: (n, output row).
template <typename scalar_t, Activation A>
void identity_epilogue_from_channels_last(const BlockPlan& plan, const BranchPlan& bp,
                                          const Epilogue<at::opmath_type<scalar_t>>& epi, const scalar_t* pre_cl,
                                          scalar_t* pre, scalar_t* out) {
  using T = at::opmath_type<scalar_t>;
  const int64_t H = plan.H, W = plan.W, Cb = bp.out_channels, Co = plan.out_channels;
  at::parallel_for(0, plan.N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / H, i = item % H;
      const scalar_t* src = pre_cl + item * W * Cb;
      for (int64_t c0 = 0; c0 < Cb; c0 += kGroup) {
        const int64_t cn = std::min(kGroup, Cb - c0);
        for (int64_t j0 = 0; j0 < W; j0 += kGroup) {
          const int64_t jn = std::min(kGroup, W - j0);
          for (int64_t c = c0; c < c0 + cn; ++c) {
            const T a = epi.alpha[c], be = epi.beta[c];
            const scalar_t* s = src + j0 * Cb + c;
            scalar_t* prow = pre + ((n * Cb + c) * H + i) * W + j0;
            scalar_t* orow = out + ((n * Co + bp.channel_offset + c) * H + i) * W + j0;
            for (int64_t j = 0; j < jn; ++j) {
              const scalar_t v = s[j * Cb];
              prow[j] = v;
              orow[j] = static_cast<scalar_t>(activate<T>(A, a * static_cast<T>(v) + be));
            }
          }
        }
      }
    }
  });
}

// A norm's batch mean and biased variance over (N, H, W) of its input `pre`, in stats_dtype (empty tensors
// without batch statistics).
std::pair<Tensor, Tensor> batch_statistics(const Tensor& pre, bool batch_stats) {
  const auto stat_opts = pre.options().dtype(stats_dtype(pre.scalar_type()));
  if (!batch_stats) return {at::empty({0}, stat_opts), at::empty({0}, stat_opts)};
  const Tensor pre_stats = pre.to(stats_dtype(pre.scalar_type()));
  auto [var, mean] = at::var_mean(pre_stats, {0, 2, 3}, /*correction=*/0, /*keepdim=*/false);
  // var_mean's running (Welford) mean turns a channel's +-Inf into NaN; ATen's batch norm (sum / count)
  // keeps a one-signed Inf, and so the running mean: where the mean is not finite, take it as ATen does.
  const Tensor finite = at::isfinite(mean);
  if (!finite.all().item<bool>()) mean = at::where(finite, mean, pre_stats.mean({0, 2, 3}));
  return {mean, var};
}

// Image pooling alone: every branch pools x to 1x1 (bins), and x is not part of the output.
bool only_image_pooling(const BlockPlan& plan) {
  return plan.x_offset < 0 && std::all_of(plan.branches.begin(), plan.branches.end(), [](const BranchPlan& b) {
    return !b.identity && b.level_h == 1 && b.level_w == 1 && b.down_h == ResizeKind::Adaptive &&
           b.down_w == ResizeKind::Adaptive;
  });
}

// A branch's convolution (stride 1, padding pad) in memory format fmt. A 1x1 kernel in float32 / float64 is
// the GEMM it is (ATen takes its slow unfolded path for 1x1 kernels on one thread; torch.compile a GEMM).
Tensor branch_conv(const Tensor& z, const Tensor& w, const std::optional<Tensor>& bias, int64_t pad,
                   at::MemoryFormat fmt) {
  const bool gemm = pad == 0 && w.size(2) == 1 && w.size(3) == 1 &&
                    (z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble);
  if (!gemm) return at::conv2d(z, w, bias, {1, 1}, {pad, pad}).contiguous(fmt);
  const int64_t N = z.size(0), C = z.size(1), h = z.size(2), wd = z.size(3), Cb = w.size(0);
  const Tensor w2 = w.reshape({Cb, C});
  const bool has_bias = bias.has_value() && bias->defined();
  if (fmt == at::MemoryFormat::ChannelsLast) {  // (N h w, C) x (C, Cb): the output channels_last
    const Tensor rows = z.contiguous(fmt).permute({0, 2, 3, 1}).reshape({N * h * wd, C});
    const Tensor r = has_bias ? at::addmm(*bias, rows, w2.t()) : at::mm(rows, w2.t());
    return r.view({N, h, wd, Cb}).permute({0, 3, 1, 2});
  }
  const Tensor cols = z.contiguous().view({N, C, h * wd});
  Tensor r = at::empty({N, Cb, h * wd}, z.options());
  for (int64_t n = 0; n < N; ++n) {  // (Cb, C) x (C, hw) per sample
    Tensor rn = r.select(0, n);
    at::mm_out(rn, w2, cols.select(0, n));
  }
  if (has_bias) r.add_(bias->view({1, Cb, 1}));
  return r.view({N, Cb, h, wd});
}

// Whether a factor-1 branch of an NCHW block convolves x channels_last: oneDNN's NCHW convolution reorders
// its input and output around a blocked kernel, and for few input channels that costs about as much as the
// arithmetic. Measured here (2 threads, float32, 3x3): pyramid_seed's 64 -> 64 channels at 128 x 128, N = 2,
// 12.0 ms NCHW vs 5.5 ms channels_last plus 0.8 ms to convert x; stem_pyramid's 3 -> 32 at 224 x 224, N = 4,
// 2.2 vs 1.4 ms; but 256 -> 128 at 64 x 64 (pyramid_wide) 11.2 vs 10.7 ms, less than the conversion saves.
// The output comes back to NCHW in the epilogue's own pass (identity_epilogue_from_channels_last).
bool conv_channels_last(const BranchPlan& bp, const Tensor& x, bool cl) {
  constexpr int64_t kMaxInputChannels = 64;
  return !cl && bp.identity && bp.kernel_size > 1 && x.scalar_type() == at::kFloat && x.size(1) <= kMaxInputChannels &&
         at::hasMKLDNN() && at::globalContext().userEnabledMkldnn();
}

ForwardResult multi_scale_forward_cpu(const Tensor& x_in, at::TensorList weight, const OptionalTensorList& bias,
                                      const OptionalTensorList& scale, const OptionalTensorList& shift,
                                      const c10::List<bool>& batch_stats, c10::ArrayRef<double> eps,
                                      c10::IntArrayRef factor, c10::IntArrayRef bins, c10::string_view down_mode,
                                      c10::string_view up_mode, bool align_corners, c10::string_view activation,
                                      c10::string_view input_position) {
  const BlockPlan plan = make_plan(x_in, weight, batch_stats, eps, factor, bins, down_mode, up_mode, align_corners,
                                   activation, input_position);
  TORCH_CHECK_VALUE(bias.size() == weight.size() && scale.size() == weight.size() && shift.size() == weight.size(),
                    "msfused: bias, scale and shift need one entry (or None) per branch");
  check_parameters(x_in, weight, bias, scale, shift);
  const auto fmt = x_in.suggest_memory_format();
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const Tensor x = x_in.contiguous(fmt);
  const auto opts = x.options();
  Tensor out = at::empty({plan.N, plan.out_channels, plan.H, plan.W}, opts.memory_format(fmt));
  const size_t B = plan.branches.size();
  TensorVector level(B), pre(B), mean(B), var(B);
  for (size_t b = 0; b < B; ++b) {
    const BranchPlan& bp = plan.branches[b];
    level[b] = bp.identity ? at::empty({0}, opts) : at::empty({plan.N, plan.C, bp.level_h, bp.level_w}, opts.memory_format(fmt));
  }
  if (only_image_pooling(plan)) {
    // Each level is the mean over the map, which is what the reference's adaptive_avg_pool2d computes for
    // 1x1: ATen's one vectorised, parallel read of x (the levels pass would read x for nothing else).
    const Tensor pooled = at::mean(x, {2, 3}, /*keepdim=*/true).contiguous(fmt);
    for (size_t b = 0; b < B; ++b) level[b] = b == 0 ? pooled : pooled.clone();  // outputs never alias
  } else AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "msfused_levels_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto taps = make_branch_taps<T>(plan);
    std::vector<scalar_t*> lv(B);
    for (size_t b = 0; b < B; ++b) lv[b] = level[b].numel() ? level[b].data_ptr<scalar_t>() : nullptr;
    if (x.numel() > 0) {
      if (cl) levels_and_copy<scalar_t, true>(plan, taps, x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lv);
      else levels_and_copy<scalar_t, false>(plan, taps, x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lv);
    }
  });
  TensorVector pre_cl(B);  // the channels_last convolution output of conv_channels_last branches
  for (size_t b = 0; b < B; ++b) {
    const BranchPlan& bp = plan.branches[b];
    const int64_t pad = bp.kernel_size / 2;
    const Tensor& z = bp.identity ? x : level[b];
    if (conv_channels_last(bp, x, cl)) {
      const auto cl_fmt = at::MemoryFormat::ChannelsLast;
      pre_cl[b] = branch_conv(x.contiguous(cl_fmt), weight[b].contiguous(cl_fmt), bias.get(b), pad, cl_fmt);
      pre[b] = at::empty(pre_cl[b].sizes(), opts.memory_format(fmt));  // written by the epilogue
      std::tie(mean[b], var[b]) = batch_statistics(pre_cl[b], bp.batch_stats);
      continue;
    }
    pre[b] = branch_conv(z, weight[b], bias.get(b), pad, fmt);
    std::tie(mean[b], var[b]) = batch_statistics(pre[b], bp.batch_stats);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "msfused_epilogue_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto taps = make_branch_taps<T>(plan);
    std::vector<Epilogue<T>> epi;
    std::vector<const scalar_t*> pv(B);
    for (size_t b = 0; b < B; ++b) {
      epi.push_back(make_epilogue<T>(plan.branches[b], scale.get(b), shift.get(b), mean[b], var[b]));
      pv[b] = pre_cl[b].defined() ? nullptr : pre[b].const_data_ptr<scalar_t>();  // null: done below
    }
    if (out.numel() > 0) {
      with_activation(plan.activation, [&](auto act) {
        constexpr Activation A = decltype(act)::value;
        for (size_t b = 0; b < B; ++b)
          if (pre_cl[b].defined())
            identity_epilogue_from_channels_last<scalar_t, A>(plan, plan.branches[b], epi[b],
                                                              pre_cl[b].const_data_ptr<scalar_t>(),
                                                              pre[b].data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
        if (cl) epilogue_and_up<scalar_t, true, A>(plan, taps, epi, pv, out.data_ptr<scalar_t>());
        else epilogue_and_up<scalar_t, false, A>(plan, taps, epi, pv, out.data_ptr<scalar_t>());
      });
    }
  });
  return {out, level, pre, mean, var};
}

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

// The backward of branch bp's epilogue (up-resize, activation, norm): from `grad` (in format fmt), the
// gradient of the block output as `plan` lays it out, the gradient of the convolution output `pre` (bias included), and the
// gradients of the norm's scale and shift (empty where absent).
std::tuple<Tensor, Tensor, Tensor> epilogue_backward(const BlockPlan& plan, const BranchPlan& bp, const Tensor& grad,
                                                     const Tensor& pre, const std::optional<Tensor>& sc,
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

using BackwardResult = std::tuple<Tensor, TensorVector, TensorVector, TensorVector, TensorVector>;

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
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "msfused_dx_cpu", [&] {
      using T = at::opmath_type<scalar_t>;
      const auto taps = make_branch_taps<T>(plan);
      std::vector<const scalar_t*> zv(B);
      for (size_t b = 0; b < B; ++b) zv[b] = dz[b].numel() ? dz[b].const_data_ptr<scalar_t>() : nullptr;
      if (grad_x.numel() > 0) {
        if (cl) down_adjoint<scalar_t, true>(plan, taps, grad.const_data_ptr<scalar_t>(), zv, grad_x.data_ptr<scalar_t>());
        else down_adjoint<scalar_t, false>(plan, taps, grad.const_data_ptr<scalar_t>(), zv, grad_x.data_ptr<scalar_t>());
      }
    });
  }
  return {grad_x, grad_weight, grad_bias, grad_scale, grad_shift};
}

// ===================================================================================================
// The block with its projection (SPEC.md, "The projection"): act(norm(conv(cat))) without ever building
// cat; the split of the work (which branch goes per tap, the plans) is csrc/projection.h, shared with the
// CUDA backend.
// ===================================================================================================

// act(norm(pre)) of plan's branch 0 (up-resized as the plan says) into a new (N, Cb, H, W) tensor, or
// `into`.
// `into`: write there instead (pre itself is fine: the norm and activation are elementwise).
Tensor branch_epilogue(const BlockPlan& p, const Tensor& pre, const std::optional<Tensor>& scale,
                       const std::optional<Tensor>& shift, const Tensor& mean, const Tensor& var, at::MemoryFormat fmt,
                       const Tensor& into = Tensor()) {
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  Tensor out = into.defined() ? into : at::empty({p.N, p.out_channels, p.H, p.W}, pre.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(), "msfused_branch_epilogue_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto taps = make_branch_taps<T>(p);
    const std::vector<Epilogue<T>> epi{make_epilogue<T>(p.branches[0], scale, shift, mean, var)};
    const Tensor pre_c = pre.contiguous(fmt);
    const std::vector<const scalar_t*> pv{pre_c.const_data_ptr<scalar_t>()};
    with_activation(p.activation, [&](auto act) {
      if (cl) epilogue_and_up<scalar_t, true, decltype(act)::value>(p, taps, epi, pv, out.data_ptr<scalar_t>());
      else epilogue_and_up<scalar_t, false, decltype(act)::value>(p, taps, epi, pv, out.data_ptr<scalar_t>());
    });
  });
  return out;
}

// A per-tap branch of the projection: its maps T_b (N, k*k*P, h, w), channel tap * P + p (forward), or their
// gradient (backward), in opmath (partial sums of the one convolution the reference rounds once: not rounded
// to scalar_t; tap_maps_dtype), and its up-resize as flat two-tap axes.
// Along the width also by level column: the outputs that read column j are col_first[j] + u for
// u < col_ptr[j + 1] - col_ptr[j] (a linear or nearest resize reads each input from one run of outputs; a
// clamped tap that reads it twice for one output has its weights summed), weights col_w[col_ptr[j] + u]:
// the NCHW loops then run over contiguous outputs and vectorise.
template <typename scalar_t>
struct TapBranch {
  using T = at::opmath_type<scalar_t>;
  const T* maps = nullptr;
  T* grads = nullptr;
  int64_t h = 0, w = 0;
  UpAxis<T> uh, uw;
  std::vector<int64_t> col_ptr{0}, col_first;
  std::vector<T> col_w;
  bool col_runs = true;  // every column's outputs are one run
  TapBranch(const BranchPlan& bp, const BranchTaps<T>& t) : h(bp.level_h), w(bp.level_w), uh(t.up_h), uw(t.up_w) {
    const Taps1d<T>& a = t.up_w;
    for (int64_t j = 0; j < w; ++j) {
      const int64_t t0 = a.col_ptr[j], t1 = a.col_ptr[j + 1];
      const int64_t first = t1 > t0 ? a.col_idx[t0] : 0, last = t1 > t0 ? a.col_idx[t1 - 1] : -1;
      col_first.push_back(first);
      const size_t at = col_w.size();
      col_w.resize(at + (last - first + 1), T(0));
      std::vector<bool> seen(last - first + 1, false);
      for (int64_t u = t0; u < t1; ++u) {  // columns list their outputs in increasing order
        col_w[at + a.col_idx[u] - first] += a.col_w[u];
        seen[a.col_idx[u] - first] = true;
      }
      col_runs = col_runs && std::all_of(seen.begin(), seen.end(), [](bool v) { return v; });
      col_ptr.push_back(static_cast<int64_t>(col_w.size()));
    }
  }
  // The outputs u in [*u0, *u1) of column j whose output J = col_first[j] + u - dx lies in [0, W).
  void runs(int64_t j, int64_t dx, int64_t W, int64_t* u0, int64_t* u1) const {
    *u0 = std::max<int64_t>(0, dx - col_first[j]);
    *u1 = std::min<int64_t>(col_ptr[j + 1] - col_ptr[j], W + dx - col_first[j]);
  }
};

// Forward pass over acc (N, P, H, W), which holds conv(x, W_x) (or is null: zeros): the projection's
// pre-activation v = acc + bias + every direct branch's full-size part + every tap branch's maps resized up
// and shifted by their tap (zero outside). Separable: per tap row ky, the k maps of that row expanded along
// the width and summed at the level (E, h x W, once per item), then each output row adds the (one or two)
// E rows its height taps read, contiguously. One read of acc and one write per output element:
//   * with `epi` (no batch statistics) out = act(epi(v)) (out may be acc: inference keeps nothing), and
//     pre_out (may be null, or acc) keeps v for backward;
//   * without, v goes to pre_out, and part_sum / part_m2 get each (n, channel)'s sum and sum of squared
//     deviations from its own mean (in double; combined in batch order by projection_batch_stats).
// Values are rounded to scalar_t before the norm and the statistics, as the reference's convolution output is.
template <typename scalar_t, bool CL, Activation A>
void accumulate_projection(const BlockPlan& plan, int64_t P, int64_t k, const std::vector<TapBranch<scalar_t>>& tb,
                           const std::vector<const scalar_t*>& direct, const std::vector<at::opmath_type<scalar_t>>& bias,
                           const Epilogue<at::opmath_type<scalar_t>>* epi, const scalar_t* acc, scalar_t* pre_out,
                           scalar_t* out, double* part_sum, double* part_m2) {
  using T = at::opmath_type<scalar_t>;
  constexpr int64_t S = CL ? kGroup : 1;
  const int64_t H = plan.H, W = plan.W, r = k / 2, KP = k * k * P, WS = W * S;
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
  std::vector<std::vector<std::pair<int64_t, T>>> reads(H);
  for (int64_t I = 0; I < H; ++I)
    for (size_t b = 0; b < tb.size(); ++b) {
      const TapBranch<scalar_t>& t = tb[b];
      for (int64_t ky = 0; ky < k; ++ky) {
        const int64_t O = I + ky - r;
        if (O < 0 || O >= H) continue;
        const int64_t at = e_at[b] + ky * t.h * WS;
        reads[I].emplace_back(at + t.uh.i0[O] * WS, t.uh.two ? t.uh.w0[O] : T(1));
        if (t.uh.two) reads[I].emplace_back(at + t.uh.i1[O] * WS, t.uh.w1[O]);
      }
    }
  at::parallel_for(0, plan.N * groups.per_n, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> e(e_size), row(WS);
    for (int64_t item = begin; item < end; ++item) {
      int64_t n, c0, g_count;
      groups.at(item, &n, &c0, &g_count);
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
                for (int64_t j = 0; j < t.w; ++j) {
                  int64_t u0, u1;
                  t.runs(j, dx, W, &u0, &u1);
                  const T v = srow[j * tp.pix];
                  T* eo = erow + t.col_first[j] - dx;
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
      const int64_t origin = Plane<CL>::origin(n, c0, P, H, W);
      T bias_g[S] = {}, alpha_g[S] = {}, beta_g[S] = {};
      for (int64_t g = 0; g < G; ++g) {
        bias_g[g] = bias.empty() ? T(0) : bias[c0 + g];
        if (out) {
          alpha_g[g] = epi->alpha[c0 + g];
          beta_g[g] = epi->beta[c0 + g];
        }
      }
      double sum[S] = {};
      for (int64_t I = 0; I < H; ++I) {
        // acc, the bias and the direct branches (layout-specialised loops, so that they vectorise).
        const int64_t at_row = origin + I * ap.row;
        T* rw = row.data();
        if constexpr (!CL) {
          const T b0 = bias_g[0];
          if (acc) {
            const scalar_t* arow = acc + at_row;
            for (int64_t J = 0; J < W; ++J) rw[J] = static_cast<T>(arow[J]) + b0;
          } else {
            for (int64_t J = 0; J < W; ++J) rw[J] = b0;
          }
          for (const scalar_t* d : direct) {
            const scalar_t* drw = d + at_row;
            for (int64_t J = 0; J < W; ++J) rw[J] += static_cast<T>(drw[J]);
          }
        } else {
          for (int64_t J = 0; J < W; ++J) {
            const int64_t at = at_row + J * ap.pix;
            T* rs = rw + J * S;
            for (int64_t g = 0; g < S; ++g) rs[g] = bias_g[g];  // zero past G
            if (acc)
              for (int64_t g = 0; g < G; ++g) rs[g] += static_cast<T>(acc[at + g]);
            for (const scalar_t* d : direct)
              for (int64_t g = 0; g < G; ++g) rs[g] += static_cast<T>(d[at + g]);
          }
        }
        const auto& rd = reads[I];
        size_t m = 0;
        for (; m + 1 < rd.size(); m += 2) {  // two rows per sweep: half the loads and stores of row
          const T *e0 = e.data() + rd[m].first, *e1 = e.data() + rd[m + 1].first;
          const T w0 = rd[m].second, w1 = rd[m + 1].second;
          for (int64_t q = 0; q < WS; ++q) rw[q] += w0 * e0[q] + w1 * e1[q];
        }
        if (m < rd.size()) {
          const T* e0 = e.data() + rd[m].first;
          const T w0 = rd[m].second;
          for (int64_t q = 0; q < WS; ++q) rw[q] += w0 * e0[q];
        }
        // The row out: the pre-activation, and the norm and activation or the statistics' sums.
        if constexpr (!CL) {
          if (pre_out) {
            scalar_t* prw = pre_out + at_row;
            for (int64_t J = 0; J < W; ++J) prw[J] = static_cast<scalar_t>(rw[J]);
          }
          if (out) {
            scalar_t* orw = out + at_row;
            const T al = alpha_g[0], be = beta_g[0];
            for (int64_t J = 0; J < W; ++J)
              orw[J] = static_cast<scalar_t>(activate<T>(A, al * static_cast<T>(static_cast<scalar_t>(rw[J])) + be));
          } else {
            T s0 = 0;  // the row's sum in opmath, the rows' in double
#pragma omp simd reduction(+ : s0)
            for (int64_t J = 0; J < W; ++J) s0 += static_cast<T>(static_cast<scalar_t>(rw[J]));
            sum[0] += static_cast<double>(s0);
          }
        } else {
          for (int64_t J = 0; J < W; ++J) {
            const int64_t at = at_row + J * ap.pix;
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
        const scalar_t* prw = pre_out + origin + I * ap.row;
        if constexpr (!CL) {
          const T mu = static_cast<T>(mean[0]);
          T s2 = 0;
#pragma omp simd reduction(+ : s2)
          for (int64_t J = 0; J < W; ++J) {
            const T d = static_cast<T>(prw[J]) - mu;
            s2 += d * d;
          }
          m2[0] += static_cast<double>(s2);
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
template <typename scalar_t, bool CL, Activation A, bool SumsOnly>
void projection_grad_pass(const BlockPlan& plan, int64_t P, int64_t k, const std::vector<TapBranch<scalar_t>>& tb,
                          const Epilogue<at::opmath_type<scalar_t>>& epi, const std::vector<double>& center,
                          const std::vector<at::opmath_type<scalar_t>>& p, const std::vector<at::opmath_type<scalar_t>>& q,
                          const std::vector<at::opmath_type<scalar_t>>& r_coef, const scalar_t* grad, const scalar_t* pre,
                          scalar_t* dpre, double* part_dy, double* part_dyc, double* part_dv) {
  using T = at::opmath_type<scalar_t>;
  constexpr int64_t S = CL ? kGroup : 1;
  const int64_t H = plan.H, W = plan.W, r = k / 2, KP = k * k * P, WS = W * S;
  const Groups<CL> groups(P);
  const Plane<CL> ap = Plane<CL>::make(W, P);
  int64_t r_size = 0;
  std::vector<int64_t> r_at;
  for (const auto& t : tb) {
    r_at.push_back(r_size);
    r_size += k * t.h * WS;
  }
  at::parallel_for(0, plan.N * groups.per_n, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> rbuf(SumsOnly ? 0 : r_size), drow(SumsOnly ? 0 : WS), lrow;
    for (int64_t item = begin; item < end; ++item) {
      int64_t n, c0, g_count;
      groups.at(item, &n, &c0, &g_count);
      const int64_t G = CL ? g_count : 1;
      const int64_t origin = Plane<CL>::origin(n, c0, P, H, W);
      double s_dy[S] = {}, s_dyc[S] = {}, s_dv[S] = {};
      if (!SumsOnly) std::fill(rbuf.begin(), rbuf.end(), T(0));
      for (int64_t I = 0; I < H; ++I) {
        const int64_t at_row = origin + I * ap.row;
        if constexpr (!CL) {  // one channel: the sums along the row in independent lanes (a fixed order)
          const T al = epi.alpha[c0], be = epi.beta[c0], pc = p[c0], qc = q[c0], rc = r_coef[c0];
          const double ctr = center[c0];
          const scalar_t* gs = grad + at_row;
          const scalar_t* vs = pre + at_row;
          // Row sums in opmath (as ATen's batch norm accumulates), the rows' sums in double.
          const T ctr_t = static_cast<T>(ctr);
          T a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a1, a2, a3)
          for (int64_t J = 0; J < W; ++J) {
            const T v = static_cast<T>(vs[J]);
            const T dyv = static_cast<T>(static_cast<scalar_t>(static_cast<T>(gs[J]) * activate_grad<T>(A, al * v + be)));
            a1 += dyv;
            a2 += dyv * (v - ctr_t);
            if constexpr (!SumsOnly) {
              const scalar_t dv = static_cast<scalar_t>(pc * dyv + qc * v + rc);
              dpre[at_row + J] = dv;
              drow[J] = static_cast<T>(dv);
              a3 += static_cast<T>(dv);
            }
          }
          s_dy[0] += static_cast<double>(a1);
          s_dyc[0] += static_cast<double>(a2);
          s_dv[0] += static_cast<double>(a3);
        } else {
          T a1[S] = {}, a2[S] = {}, a3[S] = {};
          for (int64_t J = 0; J < W; ++J) {
            const int64_t at = at_row + J * ap.pix;
            for (int64_t g = 0; g < S; ++g) {
              if (g >= G) {
                if constexpr (!SumsOnly) drow[J * S + g] = T(0);
                continue;
              }
              const int64_t c = c0 + g;
              const T v = static_cast<T>(pre[at + g]);
              const T dyv = static_cast<T>(
                  static_cast<scalar_t>(static_cast<T>(grad[at + g]) * activate_grad<T>(A, epi.alpha[c] * v + epi.beta[c])));
              a1[g] += dyv;
              a2[g] += dyv * (v - static_cast<T>(center[c]));
              if constexpr (!SumsOnly) {
                const scalar_t dv = static_cast<scalar_t>(p[c] * dyv + q[c] * v + r_coef[c]);
                dpre[at + g] = dv;
                drow[J * S + g] = static_cast<T>(dv);
                a3[g] += static_cast<T>(dv);
              }
            }
          }
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
              const T w0 = t.uh.two ? t.uh.w0[O] : T(1);
              for (int64_t x = 0; x < WS; ++x) r0[x] += w0 * drow[x];
              if (t.uh.two) {
                T* r1 = rb + t.uh.i1[O] * WS;
                const T w1 = t.uh.w1[O];
                for (int64_t x = 0; x < WS; ++x) r1[x] += w1 * drow[x];
              }
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

// Whether the projection's x part is the GEMM it is (1x1 kernel, a dtype BLAS computes): then the forward
// and backward run it as matrix products (ATen's 1x1 convolution reorders NCHW maps in and out of oneDNN's
// blocked layout, costing more than the product itself at these sizes).
bool x_part_is_gemm(int64_t k, const Tensor& x) {
  return k == 1 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
}

// The x part's backward as GEMMs (x_part_is_gemm): dx = W_x^T dv and dW_x = dv x^T summed over the batch
// in order (NCHW, per sample), or over the rows (N H W, channels) of channels_last maps.
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
    if (need_w) {
      dw = at::zeros({P, C}, x.options());
      for (int64_t n = 0; n < N; ++n) dw.addmm_(cols.select(0, n), xcols.select(0, n).t());
    }
  }
  return {dx, need_w ? dw.view({P, C, 1, 1}) : dw};
}

using ProjectForwardResult =
    std::tuple<Tensor, TensorVector, TensorVector, TensorVector, TensorVector, Tensor, Tensor, Tensor>;

ProjectForwardResult multi_scale_project_forward_cpu(
    const Tensor& x_in, at::TensorList weight, const OptionalTensorList& bias, const OptionalTensorList& scale,
    const OptionalTensorList& shift, const c10::List<bool>& batch_stats, c10::ArrayRef<double> eps,
    c10::IntArrayRef factor, c10::IntArrayRef bins, c10::string_view down_mode, c10::string_view up_mode,
    bool align_corners, c10::string_view activation, c10::string_view input_position, const Tensor& pw,
    const std::optional<Tensor>& p_bias, const std::optional<Tensor>& p_scale, const std::optional<Tensor>& p_shift,
    bool p_batch_stats, double p_eps, c10::string_view p_activation, bool save_pre) {
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "msfused_project_levels_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto taps = make_branch_taps<T>(plan);
    std::vector<scalar_t*> lv(B);
    for (size_t b = 0; b < B; ++b) lv[b] = level[b].numel() ? level[b].data_ptr<scalar_t>() : nullptr;
    if (x.numel() > 0) {
      if (cl) levels_and_copy<scalar_t, true>(levels_plan, taps, x.const_data_ptr<scalar_t>(), nullptr, lv);
      else levels_and_copy<scalar_t, false>(levels_plan, taps, x.const_data_ptr<scalar_t>(), nullptr, lv);
    }
  });
  // The x part of the projection: conv(x, W_x) with the weight's x slice (a GEMM for a 1x1 kernel).
  const Tensor acc = plan.x_offset >= 0 ? branch_conv(x, weight_slice(pw, plan.x_offset, plan.C), std::nullopt, pad, fmt)
                                              .contiguous(fmt)
                                        : Tensor();
  TensorVector tmaps(B), direct(B);
  const at::ScalarType tdt = tap_maps_dtype(x.scalar_type());
  for (size_t b = 0; b < B; ++b) {
    const BranchPlan& bp = plan.branches[b];
    const Tensor& z = bp.identity ? x : level[b];
    pre[b] = branch_conv(z, weight[b], bias.get(b), bp.kernel_size / 2, fmt).contiguous(fmt);
    std::tie(mean[b], var[b]) = batch_statistics(pre[b], bp.batch_stats);
    const bool whole = convolves_resized(bp, k, H, W);
    const Tensor a = branch_epilogue(branch_alone(plan, b, !whole), pre[b], scale.get(b), shift.get(b), mean[b],
                                     var[b], fmt);
    if (whole)
      direct[b] = branch_conv(a, weight_slice(pw, bp.channel_offset, bp.out_channels), std::nullopt, pad, fmt)
                      .contiguous(fmt);
    else
      tmaps[b] = branch_conv(a.to(tdt), tap_weight(pw, bp.channel_offset, bp.out_channels).to(tdt), std::nullopt, 0, fmt)
                     .contiguous(fmt);
  }
  const BlockPlan pp = projection_plan(plan, proj);
  // Without batch statistics the norm and activation run in the accumulation pass; in place when the
  // pre-activation need not be kept (nothing will differentiate it). With them, the pass keeps the
  // pre-activation (in acc's place) and its per-sample statistics, and one more pass applies the norm.
  const bool fuse_epilogue = !proj.batch_stats;
  Tensor p_pre = acc.defined() ? acc : at::empty({plan.N, P, H, W}, opts.memory_format(fmt));
  Tensor out = fuse_epilogue ? (save_pre ? at::empty_like(p_pre, fmt) : p_pre) : Tensor();
  std::vector<double> part_sum(proj.batch_stats ? plan.N * P : 0), part_m2(part_sum.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "msfused_project_accumulate_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto taps = make_branch_taps<T>(plan);
    std::vector<TapBranch<scalar_t>> tb;
    std::vector<const scalar_t*> dv;
    for (size_t b = 0; b < B; ++b) {
      if (direct[b].defined()) dv.push_back(direct[b].const_data_ptr<scalar_t>());
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
    const scalar_t* a = acc.defined() ? acc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* pre_out = !fuse_epilogue || save_pre ? p_pre.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = fuse_epilogue ? out.data_ptr<scalar_t>() : nullptr;
    if (p_pre.numel() > 0) {
      with_activation(proj.activation, [&](auto act) {
        constexpr Activation A = decltype(act)::value;
        auto run = cl ? accumulate_projection<scalar_t, true, A> : accumulate_projection<scalar_t, false, A>;
        run(plan, P, k, tb, dv, pb, &epi, a, pre_out, o, part_sum.data(), part_m2.data());
      });
    }
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

using ProjectBackwardResult =
    std::tuple<Tensor, TensorVector, TensorVector, TensorVector, TensorVector, Tensor, Tensor, Tensor, Tensor>;

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
    with_activation(proj.activation, [&](auto act) {
      constexpr Activation A = decltype(act)::value;
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      const scalar_t* v = pre_c.const_data_ptr<scalar_t>();
      if (proj.batch_stats) {  // the sums first: the norm's backward coefficients need them
        auto sums = cl ? projection_grad_pass<scalar_t, true, A, true> : projection_grad_pass<scalar_t, false, A, true>;
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
      auto pass = cl ? projection_grad_pass<scalar_t, true, A, false> : projection_grad_pass<scalar_t, false, A, false>;
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
    if (x_part_is_gemm(k, x)) {
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
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "msfused_project_dx_cpu", [&] {
      using T = at::opmath_type<scalar_t>;
      const auto taps = make_branch_taps<T>(plan);
      std::vector<const scalar_t*> zv(B);
      for (size_t b = 0; b < B; ++b) zv[b] = dz[b].numel() ? dz[b].const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* gx = dx_proj.defined() ? dx_proj.const_data_ptr<scalar_t>() : nullptr;
      if (grad_x.numel() > 0) {
        if (cl) down_adjoint<scalar_t, true>(dx_plan, taps, gx, zv, grad_x.data_ptr<scalar_t>());
        else down_adjoint<scalar_t, false>(dx_plan, taps, gx, zv, grad_x.data_ptr<scalar_t>());
      }
    });
  }
  if (!need_w) grad_pw = at::empty({0}, opts);
  return {grad_x, grad_weight, grad_bias, grad_scale, grad_shift, grad_pw, grad_p_bias, grad_p_scale, grad_p_shift};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(msfused, CPU, m) {
  m.impl("multi_scale_forward", &cpu::multi_scale_forward_cpu);
  m.impl("multi_scale_backward", &cpu::multi_scale_backward_cpu);
  m.impl("multi_scale_project_forward", &cpu::multi_scale_project_forward_cpu);
  m.impl("multi_scale_project_backward", &cpu::multi_scale_project_backward_cpu);
}

}  // namespace msfused
