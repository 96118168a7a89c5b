// CPU registration of the channel_stats and l1_stats operators: tensors -> params -> the
// kernel build for this process's CPU capability (cpu_capability.h).
#include <torch/library.h>

#include "../host_prepare.h"
#include "channel_stats_cpu.h"
#include "l1_stats_cpu.h"
#include "monitor_sums_cpu.h"
#include "recycled_buffers.h"

namespace sparsity_ext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x) {
  ForwardCall call = prepare_forward(x, kChannelStatsRows, empty_recycled);
  if (call.entropy.numel() > 0) SPARSITY_EXT_CPU_KERNEL(channel_stats_forward_cpu)(call.params);
  return call.outputs();
}

void backward_cpu(const at::Tensor& x, const at::Tensor& row_stats,
                  const at::Tensor& grad_entropy, const at::Tensor& grad_perplexity,
                  const at::Tensor& grad_sparsity, at::Tensor& grad_x) {
  const BackwardCall call =
      prepare_backward(x, row_stats, grad_entropy, grad_perplexity, grad_sparsity, grad_x);
  if (grad_x.numel() == 0) return;
  SPARSITY_EXT_CPU_KERNEL(channel_stats_backward_cpu)(call.params);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> l1_forward_cpu(const at::Tensor& x) {
  const ForwardCall call = prepare_forward(x, kL1Stats, empty_recycled);
  if (call.entropy.numel() > 0) SPARSITY_EXT_CPU_KERNEL(l1_stats_forward_cpu)(call.params);
  return call.outputs();
}

void l1_backward_cpu(const at::Tensor& x, const at::Tensor& row_stats,
                     const at::Tensor& grad_entropy, const at::Tensor& grad_perplexity,
                     const at::Tensor& grad_sparsity, at::Tensor& grad_x) {
  const BackwardCall call = prepare_backward(x, row_stats, grad_entropy, grad_perplexity,
                                             grad_sparsity, grad_x, kL1Stats);
  if (grad_x.numel() == 0) return;
  SPARSITY_EXT_CPU_KERNEL(l1_stats_backward_cpu)(call.params);
}

// The functional backward of either measure, given its .out kernel: grad_x in recycled
// memory (recycled_buffers.h) by the layout rule (empty_grad_x), then the kernel; a
// backward from autograd reaches the kernel with no Python in between.
using BackwardOut = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, at::Tensor&);

template <BackwardOut out>
at::Tensor backward_functional(const at::Tensor& x, const at::Tensor& row_stats,
                               const at::Tensor& grad_entropy, const at::Tensor& grad_perplexity,
                               const at::Tensor& grad_sparsity) {
  at::Tensor grad_x = empty_grad_x(x, empty_recycled);
  out(x, row_stats, grad_entropy, grad_perplexity, grad_sparsity, grad_x);
  return grad_x;
}

// One native call per monitored activation (sparsity_ext/monitor.py): one fused pass where
// the kernel has one, else both forward kernels and their row statistics reduced into sums.
void monitor_sums_cpu(at::Tensor& sums, const at::Tensor& x) {
  MonitorSumsParams params = prepare_monitor_sums(sums, x);
  if (params.rows == 0) return;
  const c10::optional<ForwardParams> input = in_place_input(x);
  if (input && SPARSITY_EXT_CPU_KERNEL(monitor_sums_fused_cpu)(*input, params)) return;
  const ForwardCall softmax = prepare_forward(x, kChannelStatsRows, empty_recycled);
  const ForwardCall l1 = prepare_forward(softmax.x, kL1Stats, empty_recycled);  // x or its copy
  SPARSITY_EXT_CPU_KERNEL(channel_stats_forward_cpu)(softmax.params);
  SPARSITY_EXT_CPU_KERNEL(l1_stats_forward_cpu)(l1.params);
  params.softmax_stats = softmax.row_stats.const_data_ptr();
  params.l1_stats = l1.row_stats.const_data_ptr();
  SPARSITY_EXT_CPU_KERNEL(monitor_sums_cpu)(params);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsity_ext, CPU, m) {
  m.impl("channel_stats_forward", &forward_cpu);
  m.impl("channel_stats_backward", &backward_functional<backward_cpu>);
  m.impl("channel_stats_backward.out", &backward_cpu);
  m.impl("l1_stats_forward", &l1_forward_cpu);
  m.impl("l1_stats_backward", &backward_functional<l1_backward_cpu>);
  m.impl("l1_stats_backward.out", &l1_backward_cpu);
  m.impl("monitor_sums_", &monitor_sums_cpu);
}

}  // namespace sparsity_ext
