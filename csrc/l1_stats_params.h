// Plain description of one l1_stats call, filled from tensors by csrc/host_prepare.cpp.
#pragma once

#include <cstdint>

#include "channel_stats_params.h"

namespace sparsity_ext {

// The same plain descriptions as channel_stats (one home: host_prepare fills both); only
// row_stats differs, (kL1Stats, N, C) in the accumulation type: S, T/S, count of x <= 0,
// sum of x.
using L1ForwardParams = ForwardParams;
using L1BackwardParams = BackwardParams;

// Rows of row_stats, each (N, C).
enum L1RowStat : int { kL1Sum = 0, kL1MeanLog = 1, kL1NonPositive = 2, kL1Total = 3, kL1Stats = 4 };

}  // namespace sparsity_ext
