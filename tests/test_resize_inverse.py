"""The gather helpers of csrc/resize.h that the CUDA kernels use instead of tap tables (tap_span,
readers_of, outputs_starting_in, for_each_weight_of) agree exactly with the CPU kernels' tables
(csrc/taps.h, built from the same for_each_tap): for every kind, align_corners, input and output size up to
40 and both opmath types, the outputs that read input i are readers_of(i) with the same weights in the same
order, and the tiles' owned output ranges partition the outputs. Compiled with the host C++ compiler."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")

pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler (g++, c++ or clang++) on PATH")

PROGRAM = r"""
#include <cstdio>
#include <vector>
#include "taps.h"
using namespace msfused;

template <typename T>
int check(ResizeKind kind, int64_t in, int64_t out, int64_t factor, bool ac) {
  const Taps1d<T> t = make_taps<T>(kind, in, out, factor, ac);
  const T scale = linear_scale<T>(in, out, ac);
  int bad = 0;
  for (int64_t i = 0; i < in; ++i) {
    // Expected: the column of the table (outputs in increasing order, a weight per entry).
    std::vector<int64_t> want_o(t.col_idx.begin() + t.col_ptr[i], t.col_idx.begin() + t.col_ptr[i + 1]);
    std::vector<T> want_w(t.col_w.begin() + t.col_ptr[i], t.col_w.begin() + t.col_ptr[i + 1]);
    int64_t o0, o1;
    readers_of<T>(kind, i, in, out, factor, ac, scale, &o0, &o1);
    std::vector<int64_t> got_o;
    std::vector<T> got_w;
    for (int64_t o = o0; o < o1; ++o)
      for_each_weight_of<T>(kind, o, i, in, out, factor, ac, scale, [&](T w) { got_o.push_back(o); got_w.push_back(w); });
    if (got_o != want_o || got_w != want_w) {
      if (bad < 3) std::printf("kind %d in %ld out %ld factor %ld ac %d: input %ld readers differ\n", int(kind), long(in), long(out), long(factor), int(ac), long(i));
      ++bad;
    }
  }
  // Owned ranges of consecutive input tiles partition [0, out).
  for (int64_t tile : {1, 2, 3, 15}) {
    int64_t next = 0;
    for (int64_t lo = 0; lo < in; lo += tile) {
      int64_t b, e;
      outputs_starting_in<T>(kind, lo, lo + tile < in ? lo + tile : in, in, out, factor, ac, scale, &b, &e);
      if (b != next || e < b) { ++bad; break; }
      for (int64_t o = b; o < e; ++o) {
        int64_t f, l;
        tap_span<T>(kind, o, in, out, factor, ac, scale, &f, &l);
        if (f < lo || f >= lo + tile || l > f + 1 && kind != ResizeKind::AvgFactor && kind != ResizeKind::Adaptive) ++bad;
      }
      next = e;
    }
    if (next != out) ++bad;
  }
  return bad;
}

int main() {
  int bad = 0, cases = 0;
  for (int64_t in = 1; in <= 40; ++in)
    for (int64_t out = 1; out <= 40; ++out)
      for (int ac = 0; ac < 2; ++ac) {
        for (ResizeKind k : {ResizeKind::Linear, ResizeKind::Nearest, ResizeKind::Adaptive}) {
          bad += check<float>(k, in, out, 1, ac) + check<double>(k, in, out, 1, ac);
          cases += 2;
        }
        if (in == out) { bad += check<float>(ResizeKind::Identity, in, out, 1, ac); ++cases; }
        for (int64_t f = 1; f <= 5; ++f)
          if (in / f == out) { bad += check<float>(ResizeKind::AvgFactor, in, out, f, ac) + check<double>(ResizeKind::AvgFactor, in, out, f, ac); cases += 2; }
      }
  std::printf("%d configurations, %d mismatches\n", cases, bad);
  return bad == 0 ? 0 : 1;
}
"""


def test_gather_helpers_match_tap_tables(tmp_path):
    src = tmp_path / "resize_inverse.cpp"
    src.write_text(PROGRAM)
    exe = tmp_path / "resize_inverse"
    r = subprocess.run([CXX, "-std=c++17", "-O1", "-I", str(ROOT / "csrc"), str(src), "-o", str(exe)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:]
    assert " 0 mismatches" in r.stdout
