// The three output gradients of a run of consecutive rows, read for the CPU backwards'
// per-row coefficients (channel_stats and l1_stats): one place for the strided reads.
#pragma once

#include <cstdint>

#include "../channel_stats_params.h"

namespace sparsity_ext {
namespace {

// g[k][j] = grad k (entropy, perplexity, sparsity) of row first + j, j < count <= kMax, as
// acc_t; row `first` is sample n, channel c. Grads may have any strides (0 when expanded).
template <typename scalar_t, typename acc_t, int64_t kMax>
inline void load_row_grads(const BackwardParams& p, int64_t first, int64_t count, int64_t n,
                           int64_t c, acc_t (&g)[3][kMax]) {
  const scalar_t* grads[3] = {static_cast<const scalar_t*>(p.grad_entropy),
                              static_cast<const scalar_t*>(p.grad_perplexity),
                              static_cast<const scalar_t*>(p.grad_sparsity)};
  for (int k = 0; k < 3; ++k) {
    const int64_t* strides = p.grad_strides[k];
    if (strides[1] == 1 && (strides[0] == p.channels || p.batch == 1)) {  // contiguous
      const scalar_t* from = grads[k] + first;
      for (int64_t j = 0; j < count; ++j) g[k][j] = static_cast<acc_t>(from[j]);
      continue;
    }
    int64_t nj = n, cj = c;
    for (int64_t j = 0; j < count; ++j, cj = cj + 1 == p.channels ? (++nj, 0) : cj + 1) {
      g[k][j] = static_cast<acc_t>(grads[k][nj * strides[0] + cj * strides[1]]);
    }
  }
}

}  // namespace
}  // namespace sparsity_ext
