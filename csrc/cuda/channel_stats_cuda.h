// CUDA entry points of channel_stats, free of torch headers: the launcher in
// register_cuda.cpp turns tensors into the plain params structs and calls these.
#pragma once

#include <cuda_runtime.h>

#include "../channel_stats_params.h"

namespace sparsity_ext {

// Forward: one pass over x per row; writes entropy, perplexity, sparsity and row_stats.
// Launches on `stream` without synchronising; throws std::runtime_error if the launch fails.
// Expects N * C > 0 (the caller skips empty outputs).
void channel_stats_forward_cuda(const sparsity_ext::ForwardParams& p, cudaStream_t stream);

// Backward: one elementwise pass, grad_x from x, row_stats and the three output grads.
// Same launch and error contract as the forward.
void channel_stats_backward_cuda(const sparsity_ext::BackwardParams& p, cudaStream_t stream);

}  // namespace sparsity_ext
