// The per-channel arithmetic of the norm, for the CPU and the CUDA kernels alike (in double): the
// epilogue coefficients of the forward (y = alpha * conv + beta) and, with batch statistics, the
// coefficients of its backward.
#pragma once

#include <cmath>

#include "resize.h"  // MSFUSED_HD

namespace msfused {

// y = scale * conv + shift (no statistics: a folded eval-mode norm, or none), or with batch statistics
// y = (conv - mean) * invstd * scale + shift, as y = alpha * conv + beta.
MSFUSED_HD void norm_epilogue(bool batch_stats, double scale, double shift, double mean, double var, double eps,
                              double* alpha, double* beta) {
  if (!batch_stats) {
    *alpha = scale;
    *beta = shift;
    return;
  }
  const double invstd = 1.0 / sqrt(var + eps);
  *alpha = scale * invstd;
  *beta = shift - mean * scale * invstd;
}

// Batch statistics backward from sum_dy = sum(dY) and sum_dyc = sum(dY * (conv - mean)) over the count
// values of a channel: d_scale = sum(dY * xhat) and
// dconv = scale * invstd * (dY - mean(dY) - xhat * mean(dY * xhat)) = p * dY + q * conv + r.
MSFUSED_HD void batch_norm_grad(double scale, double mean, double var, double eps, double count, double sum_dy,
                                double sum_dyc, double* d_scale, double* p, double* q, double* r) {
  const double invstd = 1.0 / sqrt(var + eps);
  *d_scale = sum_dyc * invstd;
  *p = scale * invstd;
  *q = -*p * invstd * *d_scale / count;
  *r = -*p * sum_dy / count - *q * mean;
}

}  // namespace msfused
