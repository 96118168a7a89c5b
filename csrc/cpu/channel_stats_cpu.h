// CPU kernels of channel_stats: plain params in, no tensors. One build per CPU
// capability (see cpu_capability.h); call them as SPARSITY_EXT_CPU_KERNEL(name)(params).
#pragma once

#include "../channel_stats_params.h"
#include "cpu_capability.h"

SPARSITY_EXT_DECLARE_CPU_KERNELS(
    void channel_stats_forward_cpu(const ::sparsity_ext::ForwardParams& p);
    void channel_stats_backward_cpu(const ::sparsity_ext::BackwardParams& p);)
