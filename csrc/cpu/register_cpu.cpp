// CPU registration of the channel_stats operators: tensors -> params -> kernel.
#include <torch/library.h>

#include "../launch.h"
#include "channel_stats_cpu.h"

namespace sparsity_ext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x) {
  ForwardCall call = prepare_forward(x);
  if (call.entropy.numel() > 0) channel_stats_forward_cpu(call.params);
  return call.outputs();
}

at::Tensor backward_cpu(const at::Tensor& x, const at::Tensor& row_stats,
                        const at::Tensor& grad_entropy, const at::Tensor& grad_perplexity,
                        const at::Tensor& grad_sparsity) {
  BackwardCall call =
      prepare_backward(x, row_stats, grad_entropy, grad_perplexity, grad_sparsity);
  if (call.grad_x.numel() > 0) channel_stats_backward_cpu(call.params);
  return call.grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsity_ext, CPU, m) {
  m.impl("channel_stats_forward", &forward_cpu);
  m.impl("channel_stats_backward", &backward_cpu);
}

}  // namespace sparsity_ext
