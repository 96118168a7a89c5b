// AVX-512 pieces shared by the CPU kernel files (channel_stats, l1_stats, monitor_sums):
// the float exp and log they use, and the gather that reads a group of short rows one
// position at a time, a row per lane. Included only by kernel files, inside their
// per-capability build (cpu_capability.h): everything here is in an anonymous namespace,
// so each build keeps its own copy.
#pragma once

#include <cstdint>

namespace sparsity_ext {
namespace {
// Rows of at most this many positions are read a group of 16 rows at a time, one row per
// lane (7x7 = 49 positions), by ShortRowGather below on AVX-512: no horizontal reduction
// and no partial vector per row, which is what a row-at-a-time loop spends most of its
// time on at this length.
constexpr int64_t kShortRow = 64;
}  // namespace
}  // namespace sparsity_ext

#if defined(CPU_CAPABILITY_AVX512)

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../channel_stats_params.h"

namespace sparsity_ext {
namespace {

// 2^y for y <= 0 (or NaN): 2^n * 2^f with n = round(y), |f| <= 1/2, and 2^f from a
// degree-5 near-minimax polynomial (fitted to relative error 9e-8; 1.9e-7 evaluated in
// float, about 1 ulp, the accuracy of exp_u20's 6th degree at one FMA less); scalef
// applies 2^n.
// Results below 2^-125 are set to exactly 0 through `representable` rather than
// computed: an underflowing scalef takes a microcode assist that costs more than a whole
// short row. The mask is "not less than", so NaN lanes stay representable and NaN.
inline __m512 exp2_nonpositive(__m512 y, __mmask16& representable) {
  const __m512 lowest = _mm512_set1_ps(-125.0f);
  representable = _mm512_cmp_ps_mask(y, lowest, _CMP_NLT_UQ);
  const __m512 yc = _mm512_max_ps(lowest, y);  // max_ps returns its 2nd operand on NaN
  const __m512 n = _mm512_roundscale_ps(yc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(yc, n);
  __m512 p = _mm512_set1_ps(1.3264727080169001e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6715128621880884e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507337456456640e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022242081843176e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314697759658850e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(representable, p, n);
}

constexpr float kLog2e = 1.4426950408889634f;

// log2(x) for x > 0 (+inf -> +inf, NaN -> NaN): x = 2^e m with m in [1, 2), and
// log2(m) = u Q(u), u = m - 1, Q a degree-8 Chebyshev interpolant of log2(1 + u)/u on
// [0, 1]: absolute error 1.4e-7 evaluated in float (about 1 ulp of log2 m), which is what
// the sums need (T/S and log x - T/S are compared in absolute terms). getmant/getexp handle
// subnormal x. Measured here about 5x cheaper than Sleef's logf (u10), which at::vec's
// log() calls and which made the forward log-bound; base 2 saves the multiply by log(2)
// per element (done once per row instead).
inline __m512 log2_positive(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 u = _mm512_sub_ps(_mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src), one);
  __m512 q = _mm512_set1_ps(7.395402063e-03f);
  q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(-4.194501042e-02f));
  q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(1.118320748e-01f));
  q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(-1.962389499e-01f));
  q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(2.752211988e-01f));
  q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(-3.582990766e-01f));
  q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(4.806788862e-01f));
  q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(-7.213395238e-01f));
  q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(1.442695022e+00f));
  return _mm512_fmadd_ps(u, q, _mm512_getexp_ps(x));  // getexp: e = floor(log2 x)
}

constexpr float kLn2 = 0.693147180559945309f;

// The gather of such a group: `count` <= 16 rows from row `first` of x (p's layout kRows),
// position i of every row in one vector.
template <typename scalar_t>
struct ShortRowGather {
  static constexpr bool kHalfType = at::is_reduced_floating_point_v<scalar_t>;
  const scalar_t* base = nullptr;  // the lowest row start of the group
  __m512i first_index;             // each row's offset from base, in elements
  __mmask16 active;                // the group's lanes
  int64_t length = 0;

  // False where it does not apply: rows longer than kShortRow, offsets beyond 32 bits, or
  // 16-bit rows of one position (16-bit types read 32-bit words, which needs a second).
  bool init(const ForwardParams& p, int64_t first, int64_t count) {
    active = 0;  // no lane reads anything unless init succeeds
    const int64_t L = p.positions, C = p.channels;
    if (L > kShortRow || (kHalfType && L < 2)) return false;
    const scalar_t* x = static_cast<const scalar_t*>(p.x);
    const scalar_t* starts[16];
    int64_t n = first / C, c = first % C;  // one division per group, not per row
    for (int64_t j = 0; j < count; ++j) {
      starts[j] = x + n * p.x_strides.batch + c * p.x_strides.channel;
      base = j == 0 ? starts[0] : std::min(base, starts[j]);
      if (++c == C) c = 0, ++n;
    }
    alignas(64) int32_t offsets[16] = {};
    for (int64_t j = 0; j < count; ++j) {
      const int64_t offset = starts[j] - base;
      if (offset > INT32_MAX - L) return false;
      offsets[j] = static_cast<int32_t>(offset);
    }
    first_index = _mm512_load_si512(offsets);
    active = static_cast<__mmask16>((1u << count) - 1);
    length = L;
    return true;
  }

  // Position i of each row as float; `fill` in the lanes past the group.
  __m512 operator()(int64_t i, __m512 fill) const {
    const __m512i index = _mm512_add_epi32(first_index, _mm512_set1_epi32(static_cast<int>(i)));
    if constexpr (!kHalfType) {
      return _mm512_mask_i32gather_ps(fill, active, index, base, 4);
    } else {
      // A 16-bit element is one half of the 32-bit word gathered at its own address (low
      // half), or, for the row's last position, at the previous element's (high half), so
      // no word reaches past the row.
      const bool last = i == length - 1;
      const __m512i at = last ? _mm512_sub_epi32(index, _mm512_set1_epi32(1)) : index;
      __m512i word = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), active, at, base, 2);
      word = last ? _mm512_srli_epi32(word, 16) : _mm512_and_si512(word, _mm512_set1_epi32(0xFFFF));
      __m512 v;
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        v = _mm512_castsi512_ps(_mm512_slli_epi32(word, 16));
      } else {
        v = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(word));
      }
      return _mm512_mask_blend_ps(active, fill, v);
    }
  }

  // Where the next group's rows start when rows are contiguous: fetched while this group
  // computes from cache, one 64-byte line per call (i = 0, 1, ...).
  void prefetch_next(int64_t count, int64_t i) const {
    const int64_t bytes = count * length * static_cast<int64_t>(sizeof(scalar_t)) + i * 64;
    __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(base) + bytes));
  }
};

// One position of the softmax measure's state (entropy_state.h) for 16 rows: with
// shift = x - max (<= 0, -inf when masked, or NaN), sum += exp(shift) and
// shifted += shift * exp(shift). Lanes whose exp is 0 (masked ones included) leave
// `shifted` alone, which spares the clamp that keeps -inf * 0 from making NaN.
inline void softmax_step(__m512 shift, __m512& sum, __m512& shifted) {
  __mmask16 representable;
  const __m512 e = exp2_nonpositive(_mm512_mul_ps(shift, _mm512_set1_ps(kLog2e)), representable);
  sum = _mm512_add_ps(sum, e);
  shifted = _mm512_mask3_fmadd_ps(shift, e, shifted, representable);
}

// One position of the L1 measure's state (l1_state.h) for 16 rows: S += a, T += a log2 a
// (base 2: times kLn2 once per row), total += x, live += 1 for a = x where !(x <= 0)
// (NLE_UQ: x > 0, and NaN, which must stay live).
inline void l1_step(__m512 x, __m512& sum, __m512& xlog2x, __m512& total, __m512& live) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __mmask16 live_lanes = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NLE_UQ);
  const __m512 log_a = log2_positive(_mm512_mask_blend_ps(live_lanes, one, x));
  sum = _mm512_mask_add_ps(sum, live_lanes, sum, x);
  xlog2x = _mm512_mask3_fmadd_ps(x, log_a, xlog2x, live_lanes);
  total = _mm512_add_ps(total, x);
  live = _mm512_mask_add_ps(live, live_lanes, live, one);
}

}  // namespace
}  // namespace sparsity_ext

#endif  // CPU_CAPABILITY_AVX512
