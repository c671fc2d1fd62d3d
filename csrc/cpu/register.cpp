// The CPU backend's operators (operators.h) registered for the CPU key.

#include <torch/library.h>

#include "operators.h"

namespace msfused {

TORCH_LIBRARY_IMPL(msfused, CPU, m) {
  m.impl("multi_scale_forward", &cpu::multi_scale_forward_cpu);
  m.impl("multi_scale_backward", &cpu::multi_scale_backward_cpu);
  m.impl("multi_scale_project_forward", &cpu::multi_scale_project_forward_cpu);
  m.impl("multi_scale_project_backward", &cpu::multi_scale_project_backward_cpu);
}

}  // namespace msfused
