// Plain description of one channel_stats call, filled by the host launchers from tensors.
// Kernels see only this: raw pointers, sizes and element strides, no torch types.
#pragma once

#include <cstdint>

namespace sparsity_ext {

// Which dimension is unit-stride: it decides how a kernel vectorises or coalesces.
enum class RowLayout : int {
  kRows = 0,          // positions are unit-stride: rows are walked one by one
  kChannelsLast = 1,  // channels are unit-stride: consecutive channels side by side
};

// Element type of x (and of the three outputs and grads); acc_t is double for kFloat64,
// float otherwise.
enum class ScalarKind : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// Rows of channel_stats' row_stats: max, log_sum, mean_shift (ForwardParams::row_stats).
constexpr int64_t kChannelStatsRows = 3;

// Element (n, c, position i) of a tensor sits at n * batch + c * channel + i * position.
// kRows has position == 1, kChannelsLast has channel == 1; the others are free (0 for an
// expanded dim), so batch slices and expanded views are read in place.
struct RowStrides {
  int64_t batch;
  int64_t channel;
  int64_t position;
};

struct ForwardParams {
  const void* x;           // scalar_t, strides `x_strides`
  void* entropy;           // scalar_t, (N, C) contiguous
  void* perplexity;        // scalar_t, (N, C) contiguous
  void* sparsity;          // scalar_t, (N, C) contiguous
  void* row_stats;         // acc_t, (3, N, C) contiguous: max, log_sum, mean_shift
  int64_t batch;           // N
  int64_t channels;        // C
  int64_t positions;       // L
  RowLayout layout;
  ScalarKind dtype;
  RowStrides x_strides;
};

struct BackwardParams {
  const void* x;                // scalar_t, strides `x_strides`
  const void* row_stats;        // acc_t, (3, N, C) contiguous, as written by the forward
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

}  // namespace sparsity_ext
