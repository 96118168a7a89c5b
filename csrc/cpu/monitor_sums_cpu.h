// CPU kernel of monitor_sums_: plain params in, no tensors. One build per CPU capability
// (see cpu_capability.h); call it as SPARSITY_EXT_CPU_KERNEL(monitor_sums_cpu)(params).
#pragma once

#include "../monitor_sums_params.h"
#include "cpu_capability.h"

// monitor_sums_cpu reduces the two forward kernels' row statistics (p's pointers);
// monitor_sums_fused_cpu reads x itself in one pass for both measures where it can (short
// rows on AVX-512; it returns false, having done nothing, elsewhere).
SPARSITY_EXT_DECLARE_CPU_KERNELS(
    void monitor_sums_cpu(const ::sparsity_ext::MonitorSumsParams& p);
    bool monitor_sums_fused_cpu(const ::sparsity_ext::ForwardParams& x,
                                const ::sparsity_ext::MonitorSumsParams& p);)
