// What lets the CPU passes' hottest loops vectorise: the package is built for baseline x86-64 (SSE2), so those
// loops are also compiled for AVX2 and AVX-512 and the one the CPU has is chosen when the library loads (GCC's
// function multiversioning, through glibc's ifunc); and a bfloat16 load and rounding written on the bits, so that
// a loop of them has no branch. No FMA in any clone (the build passes -ffp-contract=off: GCC would otherwise
// contract a * b + c in the AVX2 and AVX-512 clones), so all of them round alike.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/bit_cast.h>

#include "../activation.h"

#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__)
#define MSFUSED_HAVE_SIMD_CLONES 1
#define MSFUSED_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MSFUSED_SIMD_CLONES
#endif

namespace msfused {
namespace cpu {
namespace detail {

// scalar_t's values in opmath T and back, as a vectorising loop reads, rounds and writes them: `Raw` is the
// element type the loop's pointers have; round(v) is v rounded to scalar_t, in T. Every dtype but bfloat16 goes
// through its own conversions.
template <typename scalar_t, typename T>
struct Narrow {
  using Raw = scalar_t;
  static T load(Raw v) { return static_cast<T>(v); }
  static Raw store(T v) { return static_cast<scalar_t>(v); }
  static T round(T v) { return static_cast<T>(static_cast<scalar_t>(v)); }
};

// bfloat16 as its bits: exactly c10::BFloat16's conversions (round to nearest even; a NaN becomes 0x7FC0), the
// NaN case a select instead of c10's branch.
template <>
struct Narrow<c10::BFloat16, float> {
  using Raw = uint16_t;
  static float load(Raw v) { return c10::bit_cast<float>(static_cast<uint32_t>(v) << 16); }
  // f rounded to bfloat16, as float32 bits.
  static uint32_t round_bits(float f) {
    const uint32_t u = c10::bit_cast<uint32_t>(f);
    const uint32_t rounded = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) & UINT32_C(0xFFFF0000);
    return f != f ? UINT32_C(0x7FC00000) : rounded;
  }
  static Raw store(float f) { return static_cast<Raw>(round_bits(f) >> 16); }
  static float round(float f) { return c10::bit_cast<float>(round_bits(f)); }
};

// activate_grad(A, y) (activation.h), ReLU's 0 or 1 as a mask of 1's bits: GCC vectorises neither a select
// nor a bool's conversion beside Narrow's NaN select in one loop.
template <Activation A, typename T>
inline T activate_grad_simd(T y) {
  if constexpr (A == Activation::Relu && (sizeof(T) == 4 || sizeof(T) == 8)) {
    using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    return c10::bit_cast<T>(c10::bit_cast<U>(T(1)) & (U(0) - static_cast<U>(!(y <= T(0)))));
  } else {
    return activate_grad<T>(A, y);
  }
}

// The sum over J < W of f(J) in kRowLanes fixed lanes (lane l takes J = l mod kRowLanes, in order), the lanes
// then added in order: the same bits whatever the vector width of the clone it is inlined into, and it vectorises
// (one plain accumulator would not: its order is serial).
constexpr int64_t kRowLanes = 16;
template <typename T, typename F>
inline T lane_sum(int64_t W, F&& f) {
  T acc[kRowLanes] = {};
  int64_t J0 = 0;
  for (; J0 + kRowLanes <= W; J0 += kRowLanes)
    for (int64_t l = 0; l < kRowLanes; ++l) acc[l] += f(J0 + l);
  for (int64_t l = 0; J0 + l < W; ++l) acc[l] += f(J0 + l);
  T s = 0;
  for (int64_t l = 0; l < kRowLanes; ++l) s += acc[l];
  return s;
}

// A scalar_t pointer as the Raw pointer Narrow's loops take (c10::BFloat16 is a standard-layout struct of its
// bits: pointer-interconvertible with them).
template <typename scalar_t, typename T, typename P>
auto raw(P* p) {
  using Raw = typename Narrow<scalar_t, T>::Raw;
  if constexpr (std::is_const_v<P>)
    return reinterpret_cast<const Raw*>(p);
  else
    return reinterpret_cast<Raw*>(p);
}

}  // namespace detail
}  // namespace cpu
}  // namespace msfused
