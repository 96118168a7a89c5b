// CUDA entry points of l1_stats, free of torch headers: the launcher in register_cuda.cpp
// turns tensors into the plain params structs (host_prepare.h) and calls these.
#pragma once

#include <cuda_runtime.h>

#include "../l1_stats_params.h"

namespace sparsity_ext {

// Forward: one pass over x; writes entropy, perplexity, sparsity and row_stats (4, N, C).
// Launches on `stream` without synchronising; throws std::runtime_error if the launch fails.
// Expects N * C > 0 (the caller skips empty outputs).
void l1_stats_forward_cuda(const L1ForwardParams& p, cudaStream_t stream);

// Backward: one elementwise pass, grad_x from x, row_stats and the three output grads.
// Same launch and error contract as the forward; expects grad_x non-empty.
void l1_stats_backward_cuda(const L1BackwardParams& p, cudaStream_t stream);

}  // namespace sparsity_ext
