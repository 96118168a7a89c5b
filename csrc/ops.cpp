// The operator schemas are defined once, in Python (sparsity_ext/ops.py), beside their fake,
// autograd and vmap registrations; this library only registers device kernels for them
// (cpu/register_cpu.cpp, cuda/register_cuda.cpp), and the dispatcher picks the device.
#include <Python.h>

// Lets `import sparsity_ext._C` load this library when it is built ahead of time;
// importing runs the kernel registrations. The module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
