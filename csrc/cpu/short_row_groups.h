// What a group of short rows computes the same way on AVX-512 and AVX2, written once over
// the per-ISA pieces of avx512_short_rows.h and avx2_short_rows.h (FloatVector, kTileRows,
// ShortRowTiles, softmax_step, blend_lanes). Included only by kernel files, inside their
// per-capability build (cpu_capability.h), as those two headers are.
#pragma once

#include "avx2_short_rows.h"
#include "avx512_short_rows.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)

#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <limits>

namespace sparsity_ext {
namespace {

// The softmax state's exp pass over a group of short rows (`rows`) kept transposed
// (position i of every row at transposed + kTileRows i), given each row's max:
// sum = sum of exp(x - max), shifted = sum of (x - max) exp(x - max), per lane. A row of
// only masked positions shifts by 0 (no -inf - -inf), so its sum stays 0. Fetches what
// follows the group while it computes from cache (one line per position covers the
// group's rows of <= 64 float positions).
template <typename scalar_t>
inline void softmax_group_sums(const float* transposed, FloatVector row_max,
                               const ShortRowTiles<scalar_t>& rows, FloatVector& sum,
                               FloatVector& shifted) {
  using Vec = at::vec::Vectorized<float>;
  const Vec max(row_max);
  const Vec shift_by =
      blend_lanes(max == Vec(-std::numeric_limits<float>::infinity()), max, Vec(0.0f));
  const auto shift = [&](int64_t i) -> FloatVector {
    return Vec::loadu(transposed + i * kTileRows) - shift_by;
  };
  // Two accumulator pairs (even and odd positions), so that the adds are not latency
  // bound; named, not an array indexed by i & 1, which would keep them in memory.
  FloatVector s0 = Vec(0.0f), t0 = s0, s1 = s0, t1 = s0;
  const int64_t L = rows.length;
  int64_t i = 0;
  for (; i + 2 <= L; i += 2) {
    rows.prefetch_next(i);
    rows.prefetch_next(i + 1);
    softmax_step(shift(i), s0, t0);
    softmax_step(shift(i + 1), s1, t1);
  }
  if (i < L) {
    rows.prefetch_next(i);
    softmax_step(shift(i), s0, t0);
  }
  sum = Vec(s0) + Vec(s1);
  shifted = Vec(t0) + Vec(t1);
}

}  // namespace
}  // namespace sparsity_ext

#endif  // CPU_CAPABILITY_AVX512 || CPU_CAPABILITY_AVX2
