// On AVX2, what avx512_short_rows.h has on AVX-512, under the same names so that the kernel
// files' short-row code reads the same for both: the float exp and log of the kernels, the
// reader that hands over a group of up to 8 short rows one position at a time, a row per
// lane (ShortRowTiles, 8 x 8 tiles), and the softmax and L1 steps over such a group.
// Included only by kernel files, inside their per-capability build (cpu_capability.h):
// everything here is in an anonymous namespace, so each build keeps its own copy.
#pragma once

#if defined(CPU_CAPABILITY_AVX2)

#include <immintrin.h>

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../channel_stats_params.h"
#include "../entropy_state.h"  // ShiftFloor
#include "avx512_short_rows.h"  // kShortRow and the polynomials' coefficients

namespace sparsity_ext {
namespace {

// A float vector of this build, as the functions below take it (avx512_short_rows.h:
// __m512), and the rows of a group of short rows (one per lane).
using FloatVector = __m256;
constexpr int64_t kTileRows = 8;

// The row of each lane of a group (walk_run's lane_rows, aligned) as a vector, one row in
// every lane, and a float vector's lanes rearranged by it (lane j: lane rows[j] of v).
using LaneIndex = __m256i;
inline LaneIndex load_lane_rows(const int32_t* rows) {
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(rows));
}
inline LaneIndex same_row(int row) { return _mm256_set1_epi32(row); }
inline __m256 permute_lanes(__m256 v, LaneIndex rows) { return _mm256_permutevar8x32_ps(v, rows); }

// A comparison's lanes (all ones or all zeros) as one bit per lane, and a blend by them.
inline uint32_t lane_bits(__m256 mask) { return static_cast<uint32_t>(_mm256_movemask_ps(mask)); }
inline __m256 blend_lanes(__m256 mask, __m256 if_clear, __m256 if_set) {
  return _mm256_blendv_ps(if_clear, if_set, mask);
}

// max(shift, the softmax's shift floor) in one instruction (at::vec::maximum takes three):
// max_ps returns its second operand when either is NaN, so NaN stays NaN.
inline __m256 clamp_shift_float(__m256 shift) {
  return _mm256_max_ps(_mm256_set1_ps(ShiftFloor<float>::value), shift);
}

// 2^f for |f| <= 1/2, of degree kDegree (5 or 4: kExp2Polynomial, kExp2Polynomial4).
template <int kDegree = 5>
inline __m256 exp2_reduced(__m256 f) {
  static_assert(kDegree == 4 || kDegree == 5);
  const float* c = kDegree == 5 ? kExp2Polynomial : kExp2Polynomial4;
  __m256 p = _mm256_set1_ps(c[0]);
  for (int k = 1; k <= kDegree; ++k) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c[k]));
  return p;
}

// 2^y for y <= 0 (or NaN), as AVX-512's exp2_nonpositive: 2^n * 2^f with n = round(y),
// 2^n built in the exponent field (AVX2 has no scalef), results below 2^-125 exactly 0
// (a masked position's too: no clamp needed), NaN stays NaN. About 12 instructions where
// at::vec's exp_u20 takes about 19, at a smaller error (1.9e-7 relative). One addition
// finds n: y + 1.5 * 2^23 + 127 rounds y to an integer (the sum's ulp is 1) and holds
// n + 127 in its low bits, which a shift by 23 moves into the exponent field (finite for
// -127 < n < 128; lanes below are masked): one instruction less than round, convert, add
// and shift. A tie (y = k + 1/2) goes to the odd n, where round_ps takes the even one:
// f = 1/2 instead of -1/2, both inside the polynomial's interval. The addition rounds as
// the MXCSR says (to nearest unless a program changes it; torch does not), and the
// compiler must not fold (y + c) - c into y, hence no -ffast-math (checked below).
// exp2_unmasked returns 2^f and 2^n apart, for a caller that multiplies 2^n into other
// factors while the polynomial runs, and leaves the lanes outside `representable` unmasked
// (they hold anything, NaN included) for a caller that masks its product once instead.
#if defined(__FAST_MATH__)
// exp2_unmasked and exp_nonpositive round by adding and subtracting kExp2Rounder.
#error "the AVX2 exp rounds by adding and subtracting a constant: build without -ffast-math"
#endif
constexpr float kExp2Rounder = 0x1.8p23f + 127.0f;  // y + it: round(y) + 127 in the low bits

template <int kDegree = 5>
inline __m256 exp2_unmasked(__m256 y, __m256& representable, __m256& two_to_n) {
  const __m256 rounder = _mm256_set1_ps(kExp2Rounder);
  representable = _mm256_cmp_ps(y, _mm256_set1_ps(-125.0f), _CMP_NLT_UQ);
  const __m256 biased = _mm256_add_ps(y, rounder);  // n + 127 in the low bits
  const __m256 n = _mm256_sub_ps(biased, rounder);
  two_to_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(biased), 23));
  return exp2_reduced<kDegree>(_mm256_sub_ps(y, n));
}

inline __m256 exp2_nonpositive(__m256 y) {
  __m256 representable, two_to_n;
  const __m256 two_to_f = exp2_unmasked(y, representable, two_to_n);
  return _mm256_and_ps(representable, _mm256_mul_ps(two_to_f, two_to_n));
}

// e^d for d <= 0 (or NaN), for the forward's exp pass: exp2_nonpositive(d log2 e) with a
// dependency chain of 26 cycles from d instead of 36 (FMA and mul latency 4 and 3, add 3).
// Each vector's exp is one long chain, and on Zen 3 its length, not the FMA ports, set the
// pass's speed: a loop of the step alone (input in L1) took 10.2 cycles per vector where its
// 8 operations on the two FMA ports need 4, dropping 4 of the polynomial's FMAs saved 5
// cycles, and with the changes below it takes 7.8:
// - n from one FMA, d log2 e + kExp2Rounder, and f = d log2 e - n from another, of the
//   exact product: one rounding (y = d log2 e rounded, then y - n, had two);
// - 2^f by Estrin's scheme, (c0 f + c1) f^4 + (c2 f + c3) f^2 + c4 f + c5: three FMAs deep
//   instead of five, one multiplication more (the same kExp2Polynomial);
// - 2^n masked (results below 2^-125 are 0) before the product, not after it.
// A NaN d gives NaN (a NaN f; its 2^n is 0, not masked). Not in the backward: the same
// polynomial there cost 8 % on 7x7 float32, where the chain is not what bounds it.
inline __m256 exp_nonpositive(__m256 d) {
  const __m256 log2e = _mm256_set1_ps(kLog2e), rounder = _mm256_set1_ps(kExp2Rounder);
  const __m256 biased = _mm256_fmadd_ps(d, log2e, rounder);
  const __m256 n = _mm256_sub_ps(biased, rounder);
  const __m256 two_to_n = _mm256_and_ps(
      _mm256_cmp_ps(n, _mm256_set1_ps(-125.0f), _CMP_NLT_UQ),  // NaN: unordered, kept
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(biased), 23)));
  const __m256 f = _mm256_fmsub_ps(d, log2e, n);
  const auto c = [](int k) { return _mm256_set1_ps(kExp2Polynomial[k]); };
  const __m256 f2 = _mm256_mul_ps(f, f);
  const __m256 high = _mm256_fmadd_ps(c(0), f, c(1));
  const __m256 middle = _mm256_fmadd_ps(c(2), f, c(3));
  const __m256 low = _mm256_fmadd_ps(c(4), f, c(5));
  return _mm256_mul_ps(_mm256_fmadd_ps(_mm256_fmadd_ps(high, f2, middle), f2, low), two_to_n);
}

// log2(x) for x > 0 (+inf -> +inf, NaN -> NaN), as AVX-512's log2_positive: x = 2^e m with
// m in [1, 2) taken from the bits (AVX2 has no getexp/getmant; a subnormal x is first
// scaled by 2^23, exactly), log2(m) = u Q(u) with u = m - 1 (kLog2Polynomial). About 21
// instructions where at::vec's log (Sleef's logf) takes several times more.
inline __m256 log2_positive(__m256 x) {
  const __m256 subnormal = _mm256_cmp_ps(x, _mm256_set1_ps(0x1p-126f), _CMP_LT_OQ);
  const __m256i bits = _mm256_castps_si256(
      _mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(0x1p23f)), subnormal));
  const __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
      _mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f800000)));
  const __m256 e = _mm256_sub_ps(
      _mm256_cvtepi32_ps(_mm256_srli_epi32(bits, 23)),
      _mm256_blendv_ps(_mm256_set1_ps(127.0f), _mm256_set1_ps(150.0f), subnormal));
  const __m256 u = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));
  __m256 q = _mm256_set1_ps(kLog2Polynomial[0]);
  for (int k = 1; k < 9; ++k) q = _mm256_fmadd_ps(q, u, _mm256_set1_ps(kLog2Polynomial[k]));
  const __m256 inf_or_nan =
      _mm256_cmp_ps(x, _mm256_set1_ps(std::numeric_limits<float>::infinity()), _CMP_NLT_UQ);
  return _mm256_blendv_ps(_mm256_fmadd_ps(u, q, e), x, inf_or_nan);
}

// 8 consecutive elements of scalar_t as float.
template <typename scalar_t>
inline __m256 load8(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
    } else {
      return _mm256_cvtph_ps(bits);
    }
  }
}

// In place: r[j] (row j, 8 positions) becomes position j of the 8 rows (row i in lane i).
inline void transpose8x8(__m256 (&r)[8]) {
  __m256 t[8];  // t[j], j even: rows j, j+1 at positions 0, 1 | 4, 5; t[j+1]: 2, 3 | 6, 7
  for (int j = 0; j < 8; j += 2) {
    t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]);
    t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
  }
  __m256 u[8];  // u[4g + m]: rows 4g..4g+3 at position m | m + 4
  for (int g = 0; g < 2; ++g) {
    u[4 * g] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0xee);
    u[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xee);
  }
  for (int m = 0; m < 4; ++m) {
    r[m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x20);
    r[4 + m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x31);
  }
}

// The reader of a group of `count` <= 8 short rows from row `first` of x, handed to the
// caller one position at a time, position i of every row in one vector (row j in lane j):
// 8 positions of each row per load, the 8 x 8 tile transposed in registers.
template <typename scalar_t>
struct ShortRowTiles : ShortRowStarts<scalar_t, 8> {
  using ShortRowStarts<scalar_t, 8>::starts;
  using ShortRowStarts<scalar_t, 8>::length;
  using ShortRowStarts<scalar_t, 8>::count;
  __m256 active;  // all ones in the group's lanes

  bool init(const ForwardParams& p, int64_t first, int64_t rows) {
    if (!ShortRowStarts<scalar_t, 8>::init(p, first, rows)) return false;
    active = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rows)),
                                                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    return true;
  }

  // take(i, v) for i = 0 .. L-1 in order, v = position i of each row as float, `fill` in
  // the lanes past the group. Only a tensor's last group can be partial: a full one takes
  // no blend (one instruction per vector of the forward's read pass).
  template <typename Take>
  void for_each_position(__m256 fill, Take&& take) const {
    if (count == 8) return walk_positions(take, [](__m256 v) { return v; });
    walk_positions(take, [&](__m256 v) { return _mm256_blendv_ps(fill, v, active); });
  }

  // for_each_position with in_group(v) applied to each vector. Past the last full tile, 1
  // or 2 positions (49 = 6 x 8 + 1) are read a position at a time (8 or 16 scalar loads
  // cost less than a tile's 8 loads and 24 shuffles), 3 to 7 from one more tile ending at
  // the row's end, which overlaps the last full one (the tile's loads stay inside the row;
  // AVX2 has no masked 16-bit load).
  template <typename Take, typename InGroup>
  void walk_positions(Take& take, InGroup&& in_group) const {
    __m256 tile[8];
    const auto read_tile = [&](int64_t at) {
      for (int j = 0; j < 8; ++j) tile[j] = load8(starts[j] + at);
      transpose8x8(tile);
    };
    int64_t i0 = 0;
    for (; i0 + 8 <= length; i0 += 8) {
      read_tile(i0);
      for (int i = 0; i < 8; ++i) take(i0 + i, in_group(tile[i]));
    }
    if (length - i0 >= 3 && length >= 8) {
      read_tile(length - 8);
      for (int64_t i = i0; i < length; ++i) take(i, in_group(tile[i - (length - 8)]));
      return;
    }
    for (int64_t i = i0; i < length; ++i) take(i, in_group(column(i)));
  }

  __m256 column(int64_t i) const {
    alignas(32) float values[8];
    ShortRowStarts<scalar_t, 8>::column(i, values);
    return _mm256_load_ps(values);
  }

  // Reads the group once, position i stored at transposed + 8 i (8 floats, aligned) and
  // folded into the rows' max, which is returned; also(v) sees each position too. Lanes
  // past the group read -inf. The max skips NaN (max_ps, one instruction where
  // at::vec::maximum takes three): a NaN still reaches the row's sums through
  // softmax_group_sums, which shifts an all-masked row by 0, so even a row of NaN and -inf
  // gives NaN.
  template <typename Also>
  __m256 read_transposed(float* transposed, Also&& also) const {
    const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    __m256 vmax = neg_inf;
    for_each_position(neg_inf, [&](int64_t i, __m256 v) {
      _mm256_store_ps(transposed + i * 8, v);
      vmax = _mm256_max_ps(v, vmax);
      also(v);
    });
    return vmax;
  }

  // acc + v in the group's lanes, acc in the others.
  __m256 add_in_group(__m256 acc, __m256 v) const {
    return _mm256_add_ps(acc, _mm256_and_ps(active, v));
  }
};

// One position of the softmax measure's state (entropy_state.h) for 8 rows, as
// channel_stats' accumulate(): with d = max(shift, floor) (NaN stays NaN),
// sum += exp(d), shifted += d exp(d).
inline void softmax_step(__m256 shift, __m256& sum, __m256& shifted) {
  const __m256 d = clamp_shift_float(shift);
  const __m256 e = exp_nonpositive(d);
  sum = _mm256_add_ps(sum, e);
  shifted = _mm256_fmadd_ps(d, e, shifted);
}

// One position of the L1 measure's state (l1_state.h) for 8 rows: S += a, T += a log2 a
// (base 2: times kLn2 once per row), total += x, live += 1 for a = x where !(x <= 0) (NaN
// stays live).
inline void l1_step(__m256 x, __m256& sum, __m256& xlog2x, __m256& total, __m256& live) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 not_live = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LE_OQ);
  const __m256 a = _mm256_andnot_ps(not_live, x);
  sum = _mm256_add_ps(sum, a);
  xlog2x = _mm256_fmadd_ps(a, log2_positive(_mm256_blendv_ps(x, one, not_live)), xlog2x);
  total = _mm256_add_ps(total, x);
  live = _mm256_add_ps(live, _mm256_andnot_ps(not_live, one));
}

}  // namespace
}  // namespace sparsity_ext

#endif  // CPU_CAPABILITY_AVX2
