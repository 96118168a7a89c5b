// CPU kernels of l1_stats: plain params in, no tensors. One build per CPU capability (see
// cpu_capability.h); call them as SPARSITY_EXT_CPU_KERNEL(name)(params).
#pragma once

#include "../l1_stats_params.h"
#include "cpu_capability.h"

SPARSITY_EXT_DECLARE_CPU_KERNELS(
    void l1_stats_forward_cpu(const ::sparsity_ext::L1ForwardParams& p);
    void l1_stats_backward_cpu(const ::sparsity_ext::L1BackwardParams& p);)
