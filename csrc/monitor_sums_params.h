// Plain description of one monitor_sums_ call: the per-row statistics both forward kernels
// wrote for one activation, reduced into the monitor's column sums.
#pragma once

#include <cstdint>

#include "channel_stats_params.h"

namespace sparsity_ext {

// Columns of monitor_sums_'s `sums` (float64, kMonitorColumns): sums over the rows of an
// activation, added to what is there. The one C++ home of this order; Python's is
// MONITOR_COLUMNS in sparsity_ext/ops.py (tested to agree).
enum MonitorColumn : int {
  kMonitorSparsity = 0,     // softmax sparsity, every row
  kMonitorEntropy = 1,      // softmax entropy, every row
  kMonitorSparsityL1 = 2,   // L1 sparsity, live rows (a dead row's is 0 anyway)
  kMonitorEntropyL1 = 3,    // L1 entropy, live rows only
  kMonitorLiveRows = 4,     // rows with a positive value (S != 0; a NaN row counts)
  kMonitorNonPositive = 5,  // values <= 0
  kMonitorTotal = 6,        // sum of the values
  kMonitorRows = 7,         // rows
  kMonitorValues = 8,       // values (rows * positions)
  kMonitorColumns = 9,
};

struct MonitorSumsParams {
  const void* softmax_stats;  // acc_t (3, rows): max, log_sum, mean_shift
  const void* l1_stats;       // acc_t (kL1Stats, rows): S, T/S, count of x <= 0, sum of x
  int64_t rows;
  int64_t positions;
  ScalarKind acc_dtype;       // kFloat32 or kFloat64
  double* sums;               // kMonitorColumns values, `sums_stride` apart, added to
  int64_t sums_stride;
};

}  // namespace sparsity_ext
