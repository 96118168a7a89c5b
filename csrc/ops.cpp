// The operator schemas, defined once; each device registers its kernels elsewhere
// (cpu/register_cpu.cpp, cuda/register_cuda.cpp) and the dispatcher picks the device.
#include <Python.h>
#include <torch/library.h>

// Lets `import sparsity_ext._C` load this library when it is built ahead of time;
// importing runs the registrations below. The module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(sparsity_ext, m) {
  // x: (N, C, *spatial) floating. Returns entropy, perplexity, sparsity of shape (N, C) in
  // x's dtype, and row_stats (3, N, C) in the accumulation dtype: max, log_sum, mean_shift
  // of each row, which is all the backward needs.
  m.def("channel_stats_forward(Tensor x) -> (Tensor, Tensor, Tensor, Tensor)");
  // One elementwise pass: grad_x = d(loss)/dx from the three output grads and row_stats.
  m.def(
      "channel_stats_backward(Tensor x, Tensor row_stats, Tensor grad_entropy, "
      "Tensor grad_perplexity, Tensor grad_sparsity) -> Tensor");
  // The scale-invariant L1 measure (csrc/l1_state.h): p_i = max(x_i, 0) / S. Outputs as
  // above; row_stats (4, N, C) in the accumulation dtype: S, T/S (0 for a dead row), the
  // count of x_i <= 0 and the sum of x_i, so one read of x serves the monitor too.
  m.def("l1_stats_forward(Tensor x) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "l1_stats_backward(Tensor x, Tensor row_stats, Tensor grad_entropy, "
      "Tensor grad_perplexity, Tensor grad_sparsity) -> Tensor");
}
