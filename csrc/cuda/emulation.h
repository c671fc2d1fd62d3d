// A CPU stand-in for the parts of the CUDA execution model the kernels use, so that the very same kernel
// and binding sources can be compiled with a host compiler (-DMSFUSED_CUDA_EMULATION) and checked against
// the CPU kernels on a machine without a GPU (tests/test_cuda_emulation.py). Never part of a real build.
//
// A launch runs its blocks one after another on the calling thread. A block's threads are fibers (ucontext,
// each on a stack of its own): the block runs each thread in turn until its next __syncthreads (a switch
// back to the block's loop) or its end, and a barrier completes once every thread still running has reached
// it. __shared__ arrays are function statics, shared by the fibers as by a block's threads. Between two
// barriers the threads run in increasing order in even blocks and decreasing order in odd ones (the order
// flips at each barrier), so a read of another thread's write without a barrier between them sees the old
// value in one of the two orders, whichever thread writes. (An OpenMP team of 256 OS threads per block, as
// before, spent most of the tests' time in futex waits on a 2-core machine.) It checks the kernels' logic,
// indexing and synchronisation structure, not their speed, and not the hardware's memory model.
#pragma once

#ifndef MSFUSED_CUDA_EMULATION
#error "emulation.h is for -DMSFUSED_CUDA_EMULATION builds only"
#endif

#include <cuda_bf16.h>  // host-side conversions of __half and __nv_bfloat16
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>  // types only (cudaError_t, cudaStream_t, int2): no runtime call is made
#include <sys/mman.h>
#include <ucontext.h>

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define MSFUSED_EMULATION_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MSFUSED_EMULATION_ASAN 1
#endif
#endif
#ifdef MSFUSED_EMULATION_ASAN
#include <sanitizer/common_interface_defs.h>  // fiber switches announced to AddressSanitizer
#endif

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
#define __syncthreads() ::msfused::cuda::emu::sync_threads()

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
inline std::vector<unsigned char>& dynamic_shared() {
  static std::vector<unsigned char> s;
  return s;
}

// The running block: its fibers, their stacks (kept for the next launches) and which thread runs.
struct Block {
  static constexpr size_t kStackBytes = 256 * 1024;  // mapped lazily; a guard page below each
  static constexpr size_t kGuardBytes = 4096;
  ucontext_t scheduler;
  std::vector<ucontext_t> threads;
  std::vector<unsigned char*> stacks;
  std::vector<char> finished;
  unsigned current = 0;
  void (*run)(void*) = nullptr;  // the kernel call, type-erased
  void* body = nullptr;
#ifdef MSFUSED_EMULATION_ASAN
  std::vector<void*> fake_stacks;  // each fiber's, while it is switched out
  const void* scheduler_bottom = nullptr;
  size_t scheduler_size = 0;
#endif
};

inline Block& block() {
  static Block b;
  return b;
}

inline Index3 thread_index() { return {block().current, 0, 0}; }

// Switches from the running fiber to the block's loop, and back when the loop resumes it.
inline void to_scheduler(bool finishing) {
  Block& b = block();
#ifdef MSFUSED_EMULATION_ASAN
  __sanitizer_start_switch_fiber(finishing ? nullptr : &b.fake_stacks[b.current], b.scheduler_bottom,
                                 b.scheduler_size);
#endif
  swapcontext(&b.threads[b.current], &b.scheduler);
#ifdef MSFUSED_EMULATION_ASAN
  __sanitizer_finish_switch_fiber(b.fake_stacks[b.current], nullptr, nullptr);
#endif
}

inline void sync_threads() { to_scheduler(false); }

inline void thread_main() {
  Block& b = block();
#ifdef MSFUSED_EMULATION_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_bottom, &b.scheduler_size);
#endif
  b.run(b.body);
  b.finished[b.current] = 1;
  to_scheduler(true);  // never resumed
  std::abort();
}

inline unsigned char* new_stack() {
  void* p = mmap(nullptr, Block::kStackBytes + Block::kGuardBytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "emulation: no memory for a thread's stack\n");
    std::abort();
  }
  mprotect(p, Block::kGuardBytes, PROT_NONE);  // an overflow faults instead of writing another stack
  return static_cast<unsigned char*>(p) + Block::kGuardBytes;
}

// Runs body() as `grid` blocks of `block_threads` threads, blocks in order. Dynamic shared memory starts as
// 0xFF bytes (NaN in every float format), so a read of a slot nobody wrote shows.
template <typename F>
cudaError_t launch(unsigned grid, unsigned block_threads, size_t shared_bytes, F&& body) {
  Block& b = block();
  dynamic_shared().assign(shared_bytes + 16, 0xFF);
  block_dim() = Index3{block_threads, 1, 1};
  b.threads.resize(block_threads);
  b.finished.assign(block_threads, 0);
#ifdef MSFUSED_EMULATION_ASAN
  b.fake_stacks.assign(block_threads, nullptr);
#endif
  while (b.stacks.size() < block_threads) b.stacks.push_back(new_stack());
  b.run = [](void* f) { (*static_cast<F*>(f))(); };
  b.body = static_cast<void*>(&body);
  for (unsigned blk = 0; blk < grid; ++blk) {
    block_index() = Index3{blk, 0, 0};
    for (unsigned t = 0; t < block_threads; ++t) {
      ucontext_t& c = b.threads[t];
      getcontext(&c);
      c.uc_stack.ss_sp = b.stacks[t];
      c.uc_stack.ss_size = Block::kStackBytes;
      c.uc_link = nullptr;
      makecontext(&c, &thread_main, 0);
      b.finished[t] = 0;
    }
    unsigned running = block_threads;
    for (unsigned phase = 0; running > 0; ++phase) {
      const bool backwards = (phase + blk) % 2 == 1;
      for (unsigned i = 0; i < block_threads; ++i) {
        const unsigned t = backwards ? block_threads - 1 - i : i;
        if (b.finished[t]) continue;
        b.current = t;
#ifdef MSFUSED_EMULATION_ASAN
        void* fake = nullptr;
        __sanitizer_start_switch_fiber(&fake, b.stacks[t], Block::kStackBytes);
#endif
        swapcontext(&b.scheduler, &b.threads[t]);
#ifdef MSFUSED_EMULATION_ASAN
        __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
        if (b.finished[t]) --running;
      }
    }
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
