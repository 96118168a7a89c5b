// CPU registration of the channel_stats operators: tensors -> params -> the kernel build
// for this process's CPU capability (cpu_capability.h).
#include <torch/library.h>

#include "../launch.h"
#include "channel_stats_cpu.h"
#include "recycled_buffers.h"

namespace sparsity_ext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x) {
  ForwardCall call = prepare_forward(x);
  if (call.entropy.numel() > 0) SPARSITY_EXT_CPU_KERNEL(channel_stats_forward_cpu)(call.params);
  return call.outputs();
}

at::Tensor backward_cpu(const at::Tensor& x, const at::Tensor& row_stats,
                        const at::Tensor& grad_entropy, const at::Tensor& grad_perplexity,
                        const at::Tensor& grad_sparsity) {
  BackwardCall call =
      prepare_backward(x, row_stats, grad_entropy, grad_perplexity, grad_sparsity);
  if (call.grad_x.numel() == 0) return call.grad_x;
  // Fresh memory as large as x costs more page faults than the kernel costs (see
  // recycled_buffers.h); the same layout in recycled memory costs none.
  call.grad_x = empty_recycled_like(call.grad_x);
  call.params.grad_x = call.grad_x.mutable_data_ptr();
  SPARSITY_EXT_CPU_KERNEL(channel_stats_backward_cpu)(call.params);
  return call.grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsity_ext, CPU, m) {
  m.impl("channel_stats_forward", &forward_cpu);
  m.impl("channel_stats_backward", &backward_cpu);
}

}  // namespace sparsity_ext
