// msfused from C++: a PSPNet pyramid pooling block (bins 1, 2, 3, 6) through the fused operator.
//
// The program links libmsfused.so (with --no-as-needed, see CMakeLists.txt) so that the library's static
// initialisers register the operators; it then finds msfused::multi_scale_forward in the dispatcher, runs
// it, trains through it with autograd, and compares it with the same block written with
// torch::nn::functional. It exits non-zero if anything is off.
//
//   ./multi_scale_example                 # on the GPU when torch sees one and libmsfused has CUDA kernels
//   ./multi_scale_example --device cpu    # or --device cuda
#include <torch/cuda.h>
#include <torch/nn/functional.h>
#include <torch/utils.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

using torch::Tensor;
namespace F = torch::nn::functional;

using TensorVector = std::vector<Tensor>;
using OptionalTensorList = c10::List<std::optional<Tensor>>;

// The operator's C++ signature, exactly as its schema in csrc/ops.cpp reads:
//   multi_scale_forward(Tensor x, Tensor[] weight, Tensor?[] bias, Tensor?[] scale, Tensor?[] shift,
//       bool[] batch_stats, float[] eps, int[] factor, int[] bins, str down_mode, str up_mode,
//       bool align_corners, str activation, str input_position)
//     -> (Tensor out, Tensor[] level, Tensor[] pre, Tensor[] mean, Tensor[] var)
using MultiScaleForward = std::tuple<Tensor, TensorVector, TensorVector, TensorVector, TensorVector>(
    const Tensor&, at::TensorList, const OptionalTensorList&, const OptionalTensorList&, const OptionalTensorList&,
    const c10::List<bool>&, c10::ArrayRef<double>, c10::IntArrayRef, c10::IntArrayRef, c10::string_view,
    c10::string_view, bool, c10::string_view, c10::string_view);

// One branch: a 1x1 convolution without bias, then BatchNorm (its parameters and running statistics).
struct Branch {
  int64_t bins;
  Tensor weight, gamma, beta, running_mean, running_var;
};
constexpr double kEps = 1e-5;

// The block as a user writes it: adaptive_avg_pool2d, conv2d, batch_norm (eval), relu, upsample, cat.
Tensor reference(const Tensor& x, const std::vector<Branch>& branches) {
  const int64_t H = x.size(2), W = x.size(3);
  TensorVector parts{x};  // input_position "first": x, then the branches
  for (const Branch& b : branches) {
    Tensor z = F::adaptive_avg_pool2d(x, F::AdaptiveAvgPool2dFuncOptions({b.bins, b.bins}));
    z = F::conv2d(z, b.weight);
    z = F::batch_norm(z, b.running_mean, b.running_var,
                      F::BatchNormFuncOptions().weight(b.gamma).bias(b.beta).eps(kEps).training(false));
    z = F::relu(z);
    parts.push_back(F::interpolate(z, F::InterpolateFuncOptions()
                                          .size(std::vector<int64_t>{H, W})
                                          .mode(torch::kBilinear)
                                          .align_corners(false)));
  }
  return torch::cat(parts, 1);
}

// The same block through msfused. An eval-mode BatchNorm folds into a per-channel scale and shift
// (y = conv * scale + shift). For a training-mode norm pass batch_stats = true, scale = gamma,
// shift = beta and its eps instead: the operator then normalises with the batch's statistics and
// returns them (mean, biased var) so that the caller can update the running statistics.
Tensor fused(const Tensor& x, const std::vector<Branch>& branches) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("msfused::multi_scale_forward", "")
                       .typed<MultiScaleForward>();
  TensorVector weight;
  OptionalTensorList bias, scale, shift;
  c10::List<bool> batch_stats;
  std::vector<double> eps;
  std::vector<int64_t> factor, bins;
  for (const Branch& b : branches) {
    const Tensor s = b.gamma * torch::rsqrt(b.running_var + kEps);
    weight.push_back(b.weight);
    bias.push_back(std::nullopt);
    scale.push_back(s);
    shift.push_back(b.beta - b.running_mean * s);
    batch_stats.push_back(false);
    eps.push_back(kEps);
    factor.push_back(0);  // 0: a bins branch (factor >= 1 would be a factor pyramid level)
    bins.insert(bins.end(), {b.bins, b.bins});
  }
  // down_mode applies to factor branches only (bins always pool adaptively) but must be valid.
  auto [out, level, pre, mean, var] = op.call(x, weight, bias, scale, shift, batch_stats, eps, factor, bins,
                                              /*down_mode=*/"avg", /*up_mode=*/"bilinear",
                                              /*align_corners=*/false, /*activation=*/"relu",
                                              /*input_position=*/"first");
  return out;
}

// Norm-wise relative error, as SPEC.md measures it.
double rel_err(const Tensor& a, const Tensor& ref) {
  return (a - ref).norm().item<double>() / std::max(ref.norm().item<double>(), 1e-12);
}

int main(int argc, char** argv) {
  const auto op = c10::Dispatcher::singleton().findSchema({"msfused::multi_scale_forward", ""});
  if (!op) {
    std::cerr << "msfused operators are not registered: link libmsfused with -Wl,--no-as-needed "
                 "or dlopen it before use\n";
    return 1;
  }
  // The device: --device cpu|cuda, else the GPU when torch sees one and the library has CUDA kernels
  // (built with -DMSFUSED_WITH_CUDA=ON).
  const bool cuda_kernels = op->hasKernelForDispatchKey(c10::DispatchKey::CUDA);
  std::string device_name = torch::cuda::is_available() && cuda_kernels ? "cuda" : "cpu";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--device" && i + 1 < argc) device_name = argv[++i];
    else if (arg.rfind("--device=", 0) == 0) device_name = arg.substr(9);
    else {
      std::cerr << "usage: " << argv[0] << " [--device cpu|cuda]\n";
      return 2;
    }
  }
  if (device_name == "cuda" && !(torch::cuda::is_available() && cuda_kernels)) {
    std::cerr << "--device cuda: " << (cuda_kernels ? "torch sees no CUDA device" : "libmsfused has no CUDA kernels")
              << "\n";
    return 2;
  }
  const torch::Device device(device_name == "cuda" ? torch::kCUDA : torch::kCPU);
  // float32 without TF32 on the GPU, so that the 1e-5 check below holds for the reference's convolution too.
  if (device.is_cuda()) {
    at::globalContext().setAllowTF32CuDNN(false);
    at::globalContext().setAllowTF32CuBLAS(false);
  }
  std::cout << "device: " << device << "\n";

  torch::manual_seed(0);
  const int64_t N = 2, C = 8, H = 12, W = 12, Cb = C / 4;
  const auto on = torch::TensorOptions().device(device);
  std::vector<Branch> branches;
  for (int64_t bins : {1, 2, 3, 6})
    branches.push_back({bins, torch::randn({Cb, C, 1, 1}, on) / std::sqrt(double(C)), torch::rand({Cb}, on) + 0.5,
                        torch::randn({Cb}, on), torch::randn({Cb}, on) * 0.1, torch::rand({Cb}, on) + 0.5});

  const Tensor x = torch::randn({N, C, H, W}, on).requires_grad_();
  const Tensor out = fused(x, branches);
  std::cout << "output shape: " << out.sizes() << "\n";  // [2, 16, 12, 12]: x's 8 channels + 4 x 2

  // Autograd through the operator (its Autograd kernel is registered in C++ too).
  out.sum().backward();
  std::cout << "grad norm of x: " << x.grad().norm().item<double>() << "\n";

  // The same block in torch::nn::functional, forward and backward.
  const Tensor x_ref = x.detach().clone().requires_grad_();
  const Tensor ref = reference(x_ref, branches);
  ref.sum().backward();
  const double out_err = rel_err(out.detach(), ref.detach()), grad_err = rel_err(x.grad(), x_ref.grad());
  std::printf("relative error vs torch::nn::functional: output %.3g, grad %.3g\n", out_err, grad_err);

  bool ok = out.sizes() == ref.sizes() && torch::isfinite(out).all().item<bool>() &&
            torch::isfinite(x.grad()).all().item<bool>() && out_err <= 1e-5 && grad_err <= 1e-5;
  std::cout << (ok ? "OK" : "FAILED") << std::endl;
  return ok ? 0 : 1;
}
