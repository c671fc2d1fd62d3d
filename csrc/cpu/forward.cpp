// The fused multi-scale block's forward on the CPU (the backward: backward.cpp; the shared helpers and the
// file map: common.h). Per call:
//   1. one pass over x (parallel over channel groups) computes every pyramid level and copies x into its
//      slice of the output;
//   2. each branch's convolution on its (small) level, by ATen (oneDNN); batch statistics if asked;
//   3. one pass writes norm, activation and the resize back up straight into the branch's channel slice.

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/var_mean.h>
#include <ATen/ops/where.h>
#include <ATen/Version.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "common.h"

namespace msfused {
namespace cpu {
using namespace detail;
namespace {

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
        if (h == 1 && w == 1 &&
            std::all_of(level.begin(), level.begin() + G, [](T v) { return std::isfinite(v); })) {
          // A 1x1 level (image pooling) resizes to its value everywhere: every mode's weights sum to 1. The
          // plain fill is what a write-bound pass can do (ATen's blend of equal taps differs by an ulp; for
          // an Inf, its zero weights make NaN, so those take the blend below).
          if constexpr (!CL) {
            std::fill_n(ob, H * W, static_cast<scalar_t>(level[0]));
          } else {
            scalar_t v[kGroup];
            for (int64_t g = 0; g < G; ++g) v[g] = static_cast<scalar_t>(level[g]);
            for (int64_t k = 0; k < H * W; ++k) std::copy_n(v, G, ob + k * op.pix);
          }
          continue;
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

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MSFUSED_PLANE_MEANS_AVX512 1
// The mean of each of `count` contiguous float32 planes of L elements, from plane `first` on: four 16-lane
// accumulators over chunks of 1024 elements, each chunk's total added in double (no error growth with L).
// 512-bit loads: for an x that comes from memory rather than L2, ATen's sum (its AVX2 kernel) measured about
// 20% slower here (aspp_pool's 2 x 2048 x 64 x 64, 2 threads: 2.27 against 1.83 ms; torch.compile's
// AVX-512 loop 2.19).
__attribute__((target("avx512f"))) void plane_means_avx512(const float* x, int64_t first, int64_t count,
                                                            int64_t L, float* out) {
  constexpr int64_t kChunk = 1024;
  for (int64_t r = first; r < first + count; ++r) {
    const float* p = x + r * L;
    double total = 0;
    for (int64_t c0 = 0; c0 < L; c0 += kChunk) {
      const int64_t c1 = std::min(L, c0 + kChunk);
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
      int64_t k = c0;
      for (; k + 64 <= c1; k += 64) {
        a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + k));
        a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + k + 16));
        a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + k + 32));
        a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + k + 48));
      }
      for (; k + 16 <= c1; k += 16) a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + k));
      float chunk = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
      for (; k < c1; ++k) chunk += p[k];
      total += chunk;
    }
    out[r] = static_cast<float>(total / static_cast<double>(L));
  }
}

// Whether ATen dispatches its own kernels at AVX-512 (the CPU has it, and ATEN_CPU_CAPABILITY does not lower it).
bool avx512_dispatch() {
  static const bool yes = at::get_cpu_capability() == "AVX512";
  return yes;
}
#endif

// x's mean over the map, (N, C, 1, 1) in `fmt`: the image-pooling levels. ATen's mean, except for a
// contiguous float32 x where ATen dispatches at AVX-512, which takes plane_means_avx512.
Tensor image_pooling_level(const Tensor& x, at::MemoryFormat fmt) {
#ifdef MSFUSED_PLANE_MEANS_AVX512
  const int64_t L = x.size(2) * x.size(3);
  if (x.scalar_type() == at::kFloat && x.is_contiguous() && L > 0 && avx512_dispatch()) {
    Tensor level = at::empty({x.size(0), x.size(1), 1, 1}, x.options());
    const float* px = x.const_data_ptr<float>();
    float* pl = level.data_ptr<float>();
    constexpr int64_t kGrainElements = 1 << 15;  // at least 128 KB of x per task
    at::parallel_for(0, x.size(0) * x.size(1), std::max<int64_t>(1, kGrainElements / L), [&](int64_t b, int64_t e) {
      plane_means_avx512(px, b, e - b, L, pl);
    });
    return level.contiguous(fmt);
  }
#endif
  return at::mean(x, {2, 3}, /*keepdim=*/true).contiguous(fmt);
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

}  // namespace

// The dtype and layout dispatch around levels_and_copy (the block's forward and the projection's).
void detail::dispatch_levels_and_copy(const BlockPlan& plan, const Tensor& x, const Tensor& out,
                                      const TensorVector& level, bool cl) {
  const size_t B = plan.branches.size();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "msfused_levels_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto taps = make_branch_taps<T>(plan);
    std::vector<scalar_t*> lv(B);
    for (size_t b = 0; b < B; ++b) lv[b] = level[b].numel() ? level[b].data_ptr<scalar_t>() : nullptr;
    if (x.numel() > 0) {
      scalar_t* o = out.defined() ? out.data_ptr<scalar_t>() : nullptr;  // undefined: no x slice to write
      if (cl) levels_and_copy<scalar_t, true>(plan, taps, x.const_data_ptr<scalar_t>(), o, lv);
      else levels_and_copy<scalar_t, false>(plan, taps, x.const_data_ptr<scalar_t>(), o, lv);
    }
  });
}

// A norm's batch mean and biased variance over (N, H, W) of its input `pre`, in stats_dtype (empty tensors
// without batch statistics).
std::pair<Tensor, Tensor> detail::batch_statistics(const Tensor& pre, bool batch_stats) {
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

// A branch's convolution (stride 1, padding pad) in memory format fmt. A 1x1 kernel in float32 / float64 is
// the GEMM it is (ATen takes its slow unfolded path for 1x1 kernels on one thread; torch.compile a GEMM).
Tensor detail::branch_conv(const Tensor& z, const Tensor& w, const std::optional<Tensor>& bias, int64_t pad,
                           at::MemoryFormat fmt) {
  const bool gemm = pad == 0 && w.size(2) == 1 && w.size(3) == 1 &&
                    (z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble);
  if (!gemm) return at::conv2d(z, w, bias, {1, 1}, {pad, pad}).contiguous(fmt);
  const int64_t N = z.size(0), C = z.size(1), h = z.size(2), wd = z.size(3), Cb = w.size(0);
  const Tensor w2 = w.reshape({Cb, C});
  const bool has_bias = bias.has_value() && bias->defined();
  // (N h w, C) x (C, Cb), the output channels_last; a 1x1 level's is both layouts, and one GEMM over the
  // batch reads the weight once instead of once per sample.
  if (fmt == at::MemoryFormat::ChannelsLast || h * wd == 1) {
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
  if (pooled_only(factor, bins, input_position)) {  // image pooling alone (block_config.h)
    // Each level is the mean over the map, which is what the reference's adaptive_avg_pool2d computes for
    // 1x1: one vectorised, parallel read of x (the levels pass would read x for nothing else).
    const Tensor pooled = image_pooling_level(x, fmt);
    for (size_t b = 0; b < B; ++b) level[b] = b == 0 ? pooled : pooled.clone();  // outputs never alias
  } else {
    for (size_t b = 0; b < B; ++b) {
      const BranchPlan& bp = plan.branches[b];
      level[b] = bp.identity ? at::empty({0}, opts)
                             : at::empty({plan.N, plan.C, bp.level_h, bp.level_w}, opts.memory_format(fmt));
    }
    dispatch_levels_and_copy(plan, x, out, level, cl);
  }
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

// act(norm(pre)) of plan's branch 0 (up-resized as the plan says) into a new (N, Cb, H, W) tensor, or
// `into`.
// `into`: write there instead (pre itself is fine: the norm and activation are elementwise).
Tensor detail::branch_epilogue(const BlockPlan& p, const Tensor& pre, const std::optional<Tensor>& scale,
                               const std::optional<Tensor>& shift, const Tensor& mean, const Tensor& var,
                               at::MemoryFormat fmt, const Tensor& into) {
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

}  // namespace cpu
}  // namespace msfused
