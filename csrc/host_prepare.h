// Host side shared by every device, between the registered op and the torch-free kernels:
// checks every tensor argument, picks how x is read, allocates the forward's outputs and
// fills the plain params structs the kernels take. grad_x is checked here; a functional
// backward allocates it with empty_grad_x, an .out call brings its own.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <functional>
#include <tuple>

#include "channel_stats_params.h"
#include "monitor_sums_params.h"

namespace sparsity_ext {

struct ForwardCall {
  at::Tensor x;  // x itself, or one contiguous copy when its strides are neither layout
  at::Tensor entropy, perplexity, sparsity, row_stats;
  ForwardParams params;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {entropy, perplexity, sparsity, row_stats};
  }
};

struct BackwardCall {
  at::Tensor x;          // x itself, or one copy in grad_x's layout
  at::Tensor row_stats;  // contiguous
  BackwardParams params;
};

// An uninitialised dense tensor of `sizes` and a dtype on x's device: at::empty, or the
// CPU registration's recycled memory (cpu/recycled_buffers.h).
using EmptyTensor = std::function<at::Tensor(at::IntArrayRef sizes, at::ScalarType dtype)>;

// row_stats_rows: kChannelStatsRows (3) for channel_stats, kL1Stats (4) for l1_stats;
// every other check, layout rule and param is shared by the measures. The four outputs
// come from `empty` where one is given, else from at::empty.
ForwardCall prepare_forward(const at::Tensor& x, int64_t row_stats_rows = kChannelStatsRows,
                            const EmptyTensor& empty = nullptr);

// x's checks (the forward's), then an uninitialised grad_x for it from `empty` (x's dtype)
// (dense, contiguous): channels innermost when x's channels are its unit-stride dim,
// else contiguous. The rule of _grad_x_like in sparsity_ext/ops.py, which the fake and
// fallback kernels use; tests/test_ops.py checks the two agree on every layout.
at::Tensor empty_grad_x(const at::Tensor& x, const EmptyTensor& empty);

// grad_x: shape, dtype and device of x, dense, positions or channels unit-stride.
BackwardCall prepare_backward(
    const at::Tensor& x, const at::Tensor& row_stats, const at::Tensor& grad_entropy,
    const at::Tensor& grad_perplexity, const at::Tensor& grad_sparsity, at::Tensor& grad_x,
    int64_t row_stats_rows = kChannelStatsRows);

// The input half of x's ForwardParams (no output pointers) when the kernels can read x in
// place; no allocation, no check (call after the checks).
c10::optional<ForwardParams> in_place_input(const at::Tensor& x);

// monitor_sums_'s checks: x as for the forward, sums float64 (kMonitorColumns,) on x's
// device. Fills the params but the two row_stats pointers (the caller runs the forwards).
MonitorSumsParams prepare_monitor_sums(at::Tensor& sums, const at::Tensor& x);

}  // namespace sparsity_ext
