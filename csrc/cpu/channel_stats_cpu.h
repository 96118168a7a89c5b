// CPU kernels of channel_stats: plain params in, no tensors.
#pragma once

#include "../channel_stats_params.h"

namespace sparsity_ext {

void channel_stats_forward_cpu(const ForwardParams& p);
void channel_stats_backward_cpu(const BackwardParams& p);

}  // namespace sparsity_ext
