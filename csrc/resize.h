// Index math for every resize of SPEC.md, in one place, for the CPU and the CUDA kernels alike.
//
// Each function gives the input taps that one output index of a 1-D resize reads; a 2-D resize is the
// product of a row resize and a column resize. The formulas follow ATen's exactly (area_pixel_* for
// bilinear, nearest_idx, adaptive start/end, avg_pool2d with floor), so a fused kernel samples the same
// pixels with the same weights as the reference composition. Nothing here is device-specific.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MSFUSED_HD __host__ __device__ __forceinline__
#else
#define MSFUSED_HD inline
#endif

namespace msfused {

// The 1-D resize kinds a branch uses, down (x -> level) or up (level -> output).
enum class ResizeKind : int {
  Identity = 0,  // level == input size: no resize
  AvgFactor = 1,  // avg_pool2d(kernel = stride = factor), floor: the last in % factor rows are not read
  Adaptive = 2,  // adaptive_avg_pool2d bins (need not divide)
  Linear = 3,  // bilinear, align_corners or not (per axis)
  Nearest = 4,  // 'nearest' (ATen's legacy formula, float32 scale)
};

// Most taps one output of a Linear or Nearest resize reads.
constexpr int kMaxPointTaps = 2;

// ---- avg_pool2d(kernel = stride = factor): output o reads [o * factor, o * factor + factor). ----
MSFUSED_HD int64_t avg_factor_start(int64_t o, int64_t factor) { return o * factor; }

// ---- adaptive_avg_pool2d: output o of out reads [start, end) of in (ATen's start_index/end_index). ----
MSFUSED_HD int64_t adaptive_start(int64_t o, int64_t out, int64_t in) { return (o / out) * in + ((o % out) * in) / out; }
MSFUSED_HD int64_t adaptive_end(int64_t o, int64_t out, int64_t in) { return 1 + ((o + 1) * in - 1) / out; }

// ---- bilinear: ATen's area_pixel_compute_scale / area_pixel_compute_source_index, in opmath T. ----
template <typename T>
MSFUSED_HD T linear_scale(int64_t in, int64_t out, bool align_corners) {
  if (align_corners) {
    return out > 1 ? static_cast<T>(in - 1) / static_cast<T>(out - 1) : T(0);
  }
  return static_cast<T>(in) / static_cast<T>(out);
}

// Output o reads i0 with weight l0 and i1 with weight l1 (i1 == i0 + 1, or i0 at the last row).
template <typename T>
MSFUSED_HD void linear_taps(int64_t o, int64_t in, T scale, bool align_corners, int64_t* i0, int64_t* i1, T* l0,
                            T* l1) {
  T src = align_corners ? scale * static_cast<T>(o) : scale * (static_cast<T>(o) + T(0.5)) - T(0.5);
  if (src < T(0)) src = T(0);
  int64_t lo = static_cast<int64_t>(src);  // src >= 0: truncation is floor
  if (lo > in - 1) lo = in - 1;
  T lambda = src - static_cast<T>(lo);
  lambda = lambda < T(0) ? T(0) : (lambda > T(1) ? T(1) : lambda);
  *i0 = lo;
  *i1 = lo + (lo < in - 1 ? 1 : 0);
  *l1 = lambda;
  *l0 = T(1) - lambda;
}

// ---- nearest: ATen's nearest_idx (the scale is float32 whatever the tensor's dtype). ----
MSFUSED_HD int64_t nearest_source(int64_t o, int64_t in, int64_t out) {
  if (out == in) return o;
  if (out == 2 * in) return o >> 1;
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  const int64_t src = static_cast<int64_t>(floorf(static_cast<float>(o) * scale));
  return src < in - 1 ? src : in - 1;
}

// A run of taps [start, start + count) of equal weight, for the pooling kinds.
struct TapRun {
  int64_t start;
  int64_t count;
};

MSFUSED_HD TapRun pooling_run(ResizeKind kind, int64_t o, int64_t in, int64_t out, int64_t factor) {
  if (kind == ResizeKind::AvgFactor) return {avg_factor_start(o, factor), factor};
  const int64_t s = adaptive_start(o, out, in);
  return {s, adaptive_end(o, out, in) - s};
}

// Every tap of output o for any kind, visited in increasing input order: f(input_index, weight).
template <typename T, typename F>
MSFUSED_HD void for_each_tap(ResizeKind kind, int64_t o, int64_t in, int64_t out, int64_t factor,
                             bool align_corners, T linear_scale_value, F&& f) {
  switch (kind) {
    case ResizeKind::Identity:
      f(o, T(1));
      break;
    case ResizeKind::AvgFactor:
    case ResizeKind::Adaptive: {
      const TapRun run = pooling_run(kind, o, in, out, factor);
      const T w = T(1) / static_cast<T>(run.count);
      for (int64_t i = run.start; i < run.start + run.count; ++i) f(i, w);
      break;
    }
    case ResizeKind::Linear: {
      int64_t i0, i1;
      T l0, l1;
      linear_taps<T>(o, in, linear_scale_value, align_corners, &i0, &i1, &l0, &l1);
      // Always both taps, as ATen computes l0 * a + l1 * b (also when i1 == i0), so Inf and NaN
      // propagate the same way.
      f(i0, l0);
      f(i1, l1);
      break;
    }
    case ResizeKind::Nearest:
      f(nearest_source(o, in, out), T(1));
      break;
  }
}

// ---- Tap spans and their inverses, for kernels that gather instead of reading tap tables. ----
// Every kind's taps of output o lie in [first, last], and both ends are non-decreasing in o (the
// formulas above are monotone in o, rounding included). So the outputs that read input i, and the
// outputs whose first tap lies in a range, are contiguous ranges of o, found by binary search.

// The first and last input index output o reads.
template <typename T>
MSFUSED_HD void tap_span(ResizeKind kind, int64_t o, int64_t in, int64_t out, int64_t factor, bool align_corners,
                         T linear_scale_value, int64_t* first, int64_t* last) {
  switch (kind) {
    case ResizeKind::AvgFactor:
    case ResizeKind::Adaptive: {
      const TapRun run = pooling_run(kind, o, in, out, factor);
      *first = run.start;
      *last = run.start + run.count - 1;
      return;
    }
    case ResizeKind::Linear: {
      T l0, l1;
      linear_taps<T>(o, in, linear_scale_value, align_corners, first, last, &l0, &l1);
      return;
    }
    case ResizeKind::Nearest:
      *first = *last = nearest_source(o, in, out);
      return;
    default:  // Identity
      *first = *last = o;
      return;
  }
}

// The least o in [0, out) whose first tap (use_last: last tap) is >= i, or out if none.
template <typename T>
MSFUSED_HD int64_t first_output_from(ResizeKind kind, int64_t i, bool use_last, int64_t in, int64_t out,
                                     int64_t factor, bool align_corners, T linear_scale_value) {
  int64_t lo = 0, hi = out;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    int64_t f, l;
    tap_span<T>(kind, mid, in, out, factor, align_corners, linear_scale_value, &f, &l);
    if ((use_last ? l : f) >= i) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

// The outputs [*o_begin, *o_end) that read input i (the adjoint's gather range; empty for inputs no
// output reads, e.g. the last in % factor rows of AvgFactor).
template <typename T>
MSFUSED_HD void readers_of(ResizeKind kind, int64_t i, int64_t in, int64_t out, int64_t factor, bool align_corners,
                           T linear_scale_value, int64_t* o_begin, int64_t* o_end) {
  *o_begin = first_output_from<T>(kind, i, true, in, out, factor, align_corners, linear_scale_value);
  *o_end = first_output_from<T>(kind, i + 1, false, in, out, factor, align_corners, linear_scale_value);
  if (*o_end < *o_begin) *o_end = *o_begin;
}

// The outputs [*o_begin, *o_end) whose first tap lies in [lo, hi): a partition of the outputs when the
// input is cut into consecutive ranges (tiles).
template <typename T>
MSFUSED_HD void outputs_starting_in(ResizeKind kind, int64_t lo, int64_t hi, int64_t in, int64_t out, int64_t factor,
                                    bool align_corners, T linear_scale_value, int64_t* o_begin, int64_t* o_end) {
  *o_begin = first_output_from<T>(kind, lo, false, in, out, factor, align_corners, linear_scale_value);
  *o_end = first_output_from<T>(kind, hi, false, in, out, factor, align_corners, linear_scale_value);
}

// Every weight with which output o reads input i (none if it does not), in the order for_each_tap visits
// them: f(weight). Pooling kinds in O(1) rather than walking the run.
template <typename T, typename F>
MSFUSED_HD void for_each_weight_of(ResizeKind kind, int64_t o, int64_t i, int64_t in, int64_t out, int64_t factor,
                                   bool align_corners, T linear_scale_value, F&& f) {
  if (kind == ResizeKind::AvgFactor || kind == ResizeKind::Adaptive) {
    const TapRun run = pooling_run(kind, o, in, out, factor);
    if (i >= run.start && i < run.start + run.count) f(T(1) / static_cast<T>(run.count));
    return;
  }
  for_each_tap<T>(kind, o, in, out, factor, align_corners, linear_scale_value, [&](int64_t j, T w) {
    if (j == i) f(w);
  });
}

// ---- The projection's tap shift (SPEC.md, "The projection"): a k x k convolution's tap (ky, kx) reads the
// resized map at (I + ky - k / 2, J + kx - k / 2), zero outside it. Output o of a size-long axis reads
// position o + d (d = tap - k / 2) if that lies inside; the adjoint's outputs: o = r - d for r in
// [max(lo, d), min(hi, size + d)).
MSFUSED_HD bool shifted_source(int64_t o, int64_t d, int64_t size, int64_t* src) {
  *src = o + d;
  return *src >= 0 && *src < size;
}
MSFUSED_HD void clip_to_shift(int64_t d, int64_t size, int64_t* lo, int64_t* hi) {
  if (*lo < d) *lo = d;
  if (*hi > size + d) *hi = size + d;
  if (*hi < *lo) *hi = *lo;
}

}  // namespace msfused
