// Host side shared by every device: checks the tensors, picks the memory layout,
// allocates the outputs and fills the plain params structs the kernels take.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "channel_stats_params.h"

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
  at::Tensor x;
  at::Tensor row_stats, grad_entropy, grad_perplexity, grad_sparsity;  // kept alive
  at::Tensor grad_x;
  BackwardParams params;
};

ForwardCall prepare_forward(const at::Tensor& x);

BackwardCall prepare_backward(
    const at::Tensor& x, const at::Tensor& row_stats, const at::Tensor& grad_entropy,
    const at::Tensor& grad_perplexity, const at::Tensor& grad_sparsity);

}  // namespace sparsity_ext
