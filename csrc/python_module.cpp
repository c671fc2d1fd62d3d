// Makes the library importable as the Python module msfused._C (importing it registers the operators), with
// one function for `python -m msfused info`: which CPU code paths this machine gets.
// Not part of the CMake library: libtorch users load that with torch::ops / dlopen instead.
#include <Python.h>

#include <c10/core/ScalarType.h>

#include "cpu/simd.h"
#include "cpu/widened_conv.h"

namespace {

// {"simd": the SIMD clone of the CPU kernels' hottest loops the loader picks (csrc/cpu/simd.h: GCC's resolver
// takes the first of the clones' targets the CPU has), "bfloat16_ukernel" / "float16_ukernel": whether the
// projection's half-precision parts run on oneDNN's micro-kernel (csrc/cpu/widened_conv.h; else a float32
// convolution of the widened operands)}.
PyObject* cpu_paths(PyObject*, PyObject*) {
  const char* simd = "baseline x86-64 / none (built without the SIMD clones)";
#ifdef MSFUSED_HAVE_SIMD_CLONES
  __builtin_cpu_init();
  simd = __builtin_cpu_supports("avx512f") ? "avx512f" : __builtin_cpu_supports("avx2") ? "avx2" : "default (SSE2)";
#endif
  bool bf16 = false, f16 = false;
  try {
    bf16 = msfused::cpu::detail::ukernel_available(c10::ScalarType::BFloat16);
    f16 = msfused::cpu::detail::ukernel_available(c10::ScalarType::Half);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  return Py_BuildValue("{s:s,s:O,s:O}", "simd", simd, "bfloat16_ukernel", bf16 ? Py_True : Py_False,
                       "float16_ukernel", f16 ? Py_True : Py_False);
}

PyMethodDef methods[] = {
    {"cpu_paths", cpu_paths, METH_NOARGS, "The CPU code paths this machine gets (a dict; python -m msfused info)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
