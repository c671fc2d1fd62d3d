// The branch activation and its derivative, for the CPU and the CUDA kernels alike.
#pragma once

#include <cmath>
#include <limits>
#include <type_traits>

#include "resize.h"  // MSFUSED_HD

namespace msfused {

enum class Activation : int { None = 0, Relu = 1, Silu = 2, Gelu = 3 };

template <typename T>
MSFUSED_HD T sigmoid(T y) {
  return T(1) / (T(1) + exp(-y));
}

// act(y); NaN propagates as in ATen (relu keeps NaN).
template <typename T>
MSFUSED_HD T activate(Activation a, T y) {
  switch (a) {
    case Activation::Relu:
      return y < T(0) ? T(0) : y;
    case Activation::Silu:
      return y * sigmoid(y);
    case Activation::Gelu:  // exact erf form
#if !defined(__CUDA_ARCH__) && !defined(__HIP_DEVICE_COMPILE__)
      // ATen's CPU gelu in float (and in float16 / bfloat16, computed in float) gives NaN at +Inf, where the
      // formula (and ATen in float64, and on CUDA) gives +Inf: the CPU path propagates Inf as ATen does there.
      if constexpr (std::is_same_v<T, float>) {
        if (y == std::numeric_limits<float>::infinity()) return std::numeric_limits<float>::quiet_NaN();
      }
#endif
      return T(0.5) * y * (T(1) + erf(y * T(0.70710678118654752440)));
    default:
      return y;
  }
}

// d act / dy at y (relu: ATen's threshold_backward on the output, so 0 at y == 0).
template <typename T>
MSFUSED_HD T activate_grad(Activation a, T y) {
  switch (a) {
    case Activation::Relu:
      // Branch-free (the sign of y is random; a branch mispredicts half the time). NaN passes the
      // gradient, as threshold_backward does.
      return static_cast<T>(!(y <= T(0)));
    case Activation::Silu: {
      const T s = sigmoid(y);
      return s * (T(1) + y * (T(1) - s));
    }
    case Activation::Gelu: {
      const T cdf = T(0.5) * (T(1) + erf(y * T(0.70710678118654752440)));
      const T pdf = exp(T(-0.5) * y * y) * T(0.39894228040143267794);
      return cdf + y * pdf;
    }
    default:
      return T(1);
  }
}

}  // namespace msfused
