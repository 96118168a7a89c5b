// Host side of the l1_stats ops: checks, layout, allocation and params, as launch.h does for
// channel_stats (the definitions sit in launch.cpp, next to the layout resolution they share).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "l1_stats_params.h"

namespace sparsity_ext {

struct L1ForwardCall {
  at::Tensor x;  // x itself, or one contiguous copy when its strides are neither layout
  at::Tensor entropy, perplexity, sparsity, row_stats;
  L1ForwardParams params;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {entropy, perplexity, sparsity, row_stats};
  }
};

struct L1BackwardCall {
  at::Tensor x;
  at::Tensor row_stats, grad_entropy, grad_perplexity, grad_sparsity;  // kept alive
  at::Tensor grad_x;
  L1BackwardParams params;
};

L1ForwardCall prepare_l1_forward(const at::Tensor& x);

L1BackwardCall prepare_l1_backward(
    const at::Tensor& x, const at::Tensor& row_stats, const at::Tensor& grad_entropy,
    const at::Tensor& grad_perplexity, const at::Tensor& grad_sparsity);

}  // namespace sparsity_ext
