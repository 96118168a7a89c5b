// Plain description of one channel_stats call, filled by the host launchers from tensors.
// Kernels see only this: raw pointers, sizes and element strides, no torch types.
#pragma once

#include <cstdint>

namespace sparsity_ext {

// How the L positions of row (n, c) sit in memory.
enum class RowLayout : int {
  kRows = 0,          // contiguous (N, C, L): row (n, c) starts at (n * C + c) * L, stride 1
  kChannelsLast = 1,  // (N, L, C): row (n, c) starts at n * L * C + c, positions stride C
};

// Element type of x (and of the three outputs and grads); acc_t is double for kFloat64,
// float otherwise.
enum class ScalarKind : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

struct ForwardParams {
  const void* x;           // scalar_t, in `layout`
  void* entropy;           // scalar_t, (N, C) contiguous
  void* perplexity;        // scalar_t, (N, C) contiguous
  void* sparsity;          // scalar_t, (N, C) contiguous
  void* row_stats;         // acc_t, (3, N, C) contiguous: max, log_sum, mean_shift
  int64_t batch;           // N
  int64_t channels;        // C
  int64_t positions;       // L
  RowLayout layout;
  ScalarKind dtype;
};

struct BackwardParams {
  const void* x;                // scalar_t, in `layout`
  const void* row_stats;        // acc_t, (3, N, C) contiguous, as written by the forward
  const void* grad_entropy;     // scalar_t, (N, C) with strides below
  const void* grad_perplexity;  // scalar_t
  const void* grad_sparsity;    // scalar_t
  int64_t grad_strides[3][2];   // element strides (n, c) of the three grads (0 if expanded)
  void* grad_x;                 // scalar_t, same layout as x
  int64_t batch;
  int64_t channels;
  int64_t positions;
  RowLayout layout;
  ScalarKind dtype;
};

}  // namespace sparsity_ext
