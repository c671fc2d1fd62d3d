// Makes the library importable as the Python module msfused._C (importing it registers the operators).
// Not part of the CMake library: libtorch users load that with torch::ops / dlopen instead.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
