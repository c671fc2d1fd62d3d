// What the projection's forward (projection_forward.cpp) and backward (projection_backward.cpp) share on the
// CPU: a per-tap branch, with the up-resize it is read through.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace msfused {
namespace cpu {
namespace detail {

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

}  // namespace detail
}  // namespace cpu
}  // namespace msfused
