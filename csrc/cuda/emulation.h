// A CPU stand-in for the parts of the CUDA execution model the kernels use, so that the very same kernel
// and binding sources can be compiled with a host compiler (-DMSFUSED_CUDA_EMULATION) and checked against
// the CPU kernels on a machine without a GPU (tests/test_cuda_emulation.py). Never part of a real build.
//
// A launch runs its blocks one after another; a block's threads are an OpenMP team of blockDim threads
// (threadIdx.x = the OpenMP thread number), __syncthreads is an OpenMP barrier and __shared__ arrays are
// function statics (shared by the team, as by a block). It checks the kernels' logic, indexing and
// synchronisation structure, not their speed, and not the hardware's memory model.
#pragma once

#ifndef MSFUSED_CUDA_EMULATION
#error "emulation.h is for -DMSFUSED_CUDA_EMULATION builds only"
#endif

#include <cuda_bf16.h>  // host-side conversions of __half and __nv_bfloat16
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>  // types only (cudaError_t, cudaStream_t, int2): no runtime call is made
#include <omp.h>

#include <cstddef>
#include <cstdio>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#undef __grid_constant__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) alignas(n)
#define __syncthreads() _Pragma("omp barrier")

namespace msfused {
namespace cuda {
namespace emu {

struct Index3 {
  unsigned x = 0, y = 0, z = 0;
};

inline Index3& block_index() {
  static Index3 b;
  return b;
}
inline Index3& block_dim() {
  static Index3 d;
  return d;
}
inline Index3 thread_index() { return {static_cast<unsigned>(omp_get_thread_num()), 0, 0}; }
inline std::vector<unsigned char>& dynamic_shared() {
  static std::vector<unsigned char> s;
  return s;
}

// Runs body() as `grid` blocks of `block` threads, blocks in order. Dynamic shared memory starts as
// 0xFF bytes (NaN in every float format), so a read of a slot nobody wrote shows.
template <typename F>
cudaError_t launch(unsigned grid, unsigned block, size_t shared_bytes, F&& body) {
  omp_set_dynamic(0);
  dynamic_shared().assign(shared_bytes + 16, 0xFF);
  block_dim() = Index3{block, 1, 1};
  for (unsigned b = 0; b < grid; ++b) {
    block_index() = Index3{b, 0, 0};
    int short_team = 0;
#pragma omp parallel num_threads(block)
    {
      if (omp_get_num_threads() != static_cast<int>(block)) {
#pragma omp atomic
        ++short_team;
      } else {
        body();
      }
    }
    if (short_team) return cudaErrorLaunchOutOfResources;
  }
  return cudaSuccess;
}

inline const char* error_string(cudaError_t e) {
  static char buf[64];
  std::snprintf(buf, sizeof(buf), "emulated cudaError_t %d", static_cast<int>(e));
  return buf;
}

}  // namespace emu
}  // namespace cuda
}  // namespace msfused

#define blockIdx (::msfused::cuda::emu::block_index())
#define blockDim (::msfused::cuda::emu::block_dim())
#define threadIdx (::msfused::cuda::emu::thread_index())
