// Plain description of one l1_stats call, filled by the host launchers from tensors (see
// l1_launch.h). Layout, dtype and strides mean what they mean in channel_stats_params.h.
#pragma once

#include <cstdint>

#include "channel_stats_params.h"

namespace sparsity_ext {

struct L1ForwardParams {
  const void* x;       // scalar_t, strides `x_strides`
  void* entropy;       // scalar_t, (N, C) contiguous
  void* perplexity;    // scalar_t, (N, C) contiguous
  void* sparsity;      // scalar_t, (N, C) contiguous
  void* row_stats;     // acc_t, (4, N, C) contiguous: S, T/S, count of x <= 0, sum of x
  int64_t batch;       // N
  int64_t channels;    // C
  int64_t positions;   // L
  RowLayout layout;
  ScalarKind dtype;
  RowStrides x_strides;
};

struct L1BackwardParams {
  const void* x;                // scalar_t, strides `x_strides`
  const void* row_stats;        // acc_t, (4, N, C) contiguous, as written by the forward
  const void* grad_entropy;     // scalar_t, (N, C) with strides below
  const void* grad_perplexity;  // scalar_t
  const void* grad_sparsity;    // scalar_t
  int64_t grad_strides[3][2];   // element strides (n, c) of the three grads (0 if expanded)
  void* grad_x;                 // scalar_t, dense, strides `grad_x_strides`
  int64_t batch;
  int64_t channels;
  int64_t positions;
  RowLayout layout;             // shared by x and grad_x
  ScalarKind dtype;
  RowStrides x_strides;
  RowStrides grad_x_strides;
};

// Rows of row_stats, each (N, C).
enum L1RowStat : int { kL1Sum = 0, kL1MeanLog = 1, kL1NonPositive = 2, kL1Total = 3, kL1Stats = 4 };

}  // namespace sparsity_ext
