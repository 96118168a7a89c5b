// CPU kernels of l1_stats: plain params in, no tensors.
#pragma once

#include "../l1_stats_params.h"

namespace sparsity_ext {

void l1_stats_forward_cpu(const L1ForwardParams& p);
void l1_stats_backward_cpu(const L1BackwardParams& p);

}  // namespace sparsity_ext
