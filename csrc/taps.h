// A 1-D resize as a sparse (out x in) matrix, built on the host from the index math in resize.h: its
// rows (the taps each output reads: forward passes) and its columns (the outputs that read each input:
// the adjoint, as a gather, for backward passes). Columns keep increasing output order, so the adjoint
// sums in a fixed order and is deterministic.
#pragma once

#include <cstdint>
#include <vector>

#include "resize.h"

namespace msfused {

template <typename T>
struct Taps1d {
  int64_t in = 0, out = 0;
  std::vector<int64_t> row_ptr, row_idx;  // output o reads row_idx[row_ptr[o] .. row_ptr[o + 1])
  std::vector<T> row_w;
  std::vector<int64_t> col_ptr, col_idx;  // input i is read by outputs col_idx[col_ptr[i] .. col_ptr[i + 1])
  std::vector<T> col_w;
};

template <typename T>
Taps1d<T> make_taps(ResizeKind kind, int64_t in, int64_t out, int64_t factor, bool align_corners) {
  Taps1d<T> t;
  t.in = in;
  t.out = out;
  const T scale = linear_scale<T>(in, out, align_corners);
  t.row_ptr.reserve(out + 1);
  t.row_ptr.push_back(0);
  for (int64_t o = 0; o < out; ++o) {
    for_each_tap<T>(kind, o, in, out, factor, align_corners, scale, [&](int64_t i, T w) {
      t.row_idx.push_back(i);
      t.row_w.push_back(w);
    });
    t.row_ptr.push_back(static_cast<int64_t>(t.row_idx.size()));
  }
  // Transpose by counting; visiting outputs in order keeps each column sorted by output.
  t.col_ptr.assign(in + 1, 0);
  for (int64_t i : t.row_idx) ++t.col_ptr[i + 1];
  for (int64_t i = 0; i < in; ++i) t.col_ptr[i + 1] += t.col_ptr[i];
  t.col_idx.resize(t.row_idx.size());
  t.col_w.resize(t.row_idx.size());
  std::vector<int64_t> fill(t.col_ptr.begin(), t.col_ptr.end() - 1);
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t k = t.row_ptr[o]; k < t.row_ptr[o + 1]; ++k) {
      const int64_t slot = fill[t.row_idx[k]]++;
      t.col_idx[slot] = o;
      t.col_w[slot] = t.row_w[k];
    }
  }
  return t;
}

}  // namespace msfused
