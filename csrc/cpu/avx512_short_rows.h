// Pieces shared by the CPU kernel files (channel_stats, l1_stats, monitor_sums): how rows
// are grouped and how a backward walks them, for every capability; and on AVX-512 the
// float exp and log they use, the reader that hands over a group of short rows one position
// at a time, a row per lane, and the walk of short rows as one run of vectors. Included
// only by kernel files, inside their per-capability build (cpu_capability.h): everything
// here is in an anonymous namespace, so each build keeps its own copy.
#pragma once

#include <ATen/cpu/vec/vec.h>  // at::is_reduced_floating_point_v

#include <cstdint>
#include <type_traits>
#include <utility>

#include "../channel_stats_params.h"
#include "store_from_float.h"  // AVX2's bfloat16 even/odd load and store

namespace sparsity_ext {
namespace {
// Rows of at most this many positions are read a group of 16 rows at a time, one row per
// lane (7x7 = 49 positions), by ShortRowTiles below on AVX-512 (8 rows by ShortRowTiles of
// avx2_short_rows.h on AVX2): no horizontal reduction
// and no partial vector per row, which is what a row-at-a-time loop spends most of its
// time on at this length.
constexpr int64_t kShortRow = 64;

constexpr float kLog2e = 1.4426950408889634f;

// 2^f for |f| <= 1/2 (AVX-512 and AVX2 exp2_reduced): near-minimax polynomials, highest
// coefficient first, 2^0 = 1 exactly. Degree 5, fitted to relative error 9e-8 (1.9e-7
// evaluated in float), everywhere but in the per-element exp of the backward of bfloat16
// and float16 (kExp2Degree; FramedGradTerms, which serves every row but those beyond about
// 7e5, those with gradients beyond about 1e30 and those not finite), which takes degree 4,
// one FMA less: 2.9e-6 evaluated in float, an error that multiplies each gradient, under
// 1/170 of float16's half ulp, so the gradients stay within one ulp of exact (against
// float64; 0.2 % of float16's and 0.03 % of bfloat16's elements not correctly rounded,
// where degree 5 gives 0.04 % and 0.005 %).
// The forward keeps degree 5: its sums give the mean that each gradient subtracts from,
// where degree 4 cost up to 3.4 ulps of float16 near a gradient's zero crossing.
constexpr float kExp2Polynomial[6] = {1.3264727080169001e-3f, 9.6715128621880884e-3f,
                                      5.5507337456456640e-2f, 2.4022242081843176e-1f,
                                      6.9314697759658850e-1f, 1.0f};
constexpr float kExp2Polynomial4[5] = {9.582830593e-3f, 5.590636656e-2f, 2.402409911e-1f,
                                       6.931241751e-1f, 1.0f};
template <typename scalar_t>  // the element type of the backward's x and gradients
constexpr int kExp2Degree = at::is_reduced_floating_point_v<scalar_t> ? 4 : 5;

constexpr float kLn2 = 0.693147180559945309f;

// log2(1 + u) / u for u in [0, 1] (AVX-512 and AVX2 log2_positive): a degree-8 Chebyshev
// interpolant, highest coefficient first; absolute error of u Q(u) 1.4e-7 in float.
constexpr float kLog2Polynomial[9] = {7.395402063e-03f, -4.194501042e-02f, 1.118320748e-01f,
                                      -1.962389499e-01f, 2.752211988e-01f, -3.582990766e-01f,
                                      4.806788862e-01f, -7.213395238e-01f, 1.442695022e+00f};

// Rows per group of a kernel over rows laid out kRows: `group` (the rows whose per-row
// last step runs together), except when the rows are long and few: then one, so that they
// spread over the threads. The groups depend on the shape only, never on the
// thread count, so neither does which path a row takes.
inline int64_t row_group_size(int64_t L, int64_t rows, int64_t group) {
  return L <= kShortRow || rows >= 64 * group ? group : 1;
}

// Where each row of a group of `count` <= kRows short rows starts (layout kRows, so each
// row's positions are consecutive): the part of the tile readers (ShortRowTiles on
// AVX-512, ShortRowTiles on AVX2) that does not depend on the vector unit.
template <typename scalar_t, int kRows>
struct ShortRowStarts {
  const scalar_t* starts[kRows];  // each row's first element; rows past the group repeat row 0
  int64_t count = 0;              // rows in the group
  int64_t length = 0;

  // False where it does not apply: rows longer than kShortRow, or more than kRows rows.
  bool init(const ForwardParams& p, int64_t first, int64_t rows) {
    const int64_t L = p.positions, C = p.channels;
    if (L > kShortRow || rows > kRows) return false;
    const scalar_t* x = static_cast<const scalar_t*>(p.x);
    int64_t n = first / C, c = first % C;  // one division per group, not per row
    for (int64_t j = 0; j < rows; ++j) {
      starts[j] = x + n * p.x_strides.batch + c * p.x_strides.channel;
      if (++c == C) c = 0, ++n;
    }
    for (int64_t j = rows; j < kRows; ++j) starts[j] = starts[0];
    count = rows;
    length = L;
    return true;
  }

  // Position i of each row as float into values[0 .. kRows), one scalar load per row.
  void column(int64_t i, float* values) const {
    for (int j = 0; j < kRows; ++j) values[j] = static_cast<float>(starts[j][i]);
  }

  // What follows the group's last row (the next group's rows when rows are contiguous):
  // fetched while this group computes from cache, one 64-byte line per call (i = 0, 1, ...).
  void prefetch_next(int64_t i) const {
    const uintptr_t end = reinterpret_cast<uintptr_t>(starts[count - 1] + length);
    __builtin_prefetch(reinterpret_cast<const void*>(end + i * 64));
  }
};

// The backward of elements 0 .. total - 1 of x: grad = element(v, e, even_odd) for each
// vector v, read and written a pack P at a time (the kernel file's Pack: kVecs vectors per
// pack). Lane j of v is element e + j, or with even_odd (std::true_type: AVX2 bfloat16, whose
// full packs are read and written as their even and odd elements, 4 and 2 instructions
// fewer than in order) element e - e % 16 + 2 j + (e % 16) / 8 (e: i, the even elements
// of the pack at i, or i + 8, its odd ones). Full packs first, then at most one partial
// pack: a loop that chose between them per pack kept v in memory and took three jumps per
// pack (on AVX2, 38 instructions per vector of short rows, of which 22 compute).
template <typename P, typename scalar_t, typename Element>
inline void walk_elements(const scalar_t* x, scalar_t* grad_x, int64_t total, Element&& element) {
  typename P::Vec v[P::kVecs];
  const auto pack = [&](int64_t i, int64_t count) {
    P::load(x + i, count, v);
    for (int k = 0; k < P::kVecs; ++k) v[k] = element(v[k], i + k * P::kLanes, std::false_type{});
    P::store(grad_x + i, count, v);
  };
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    static_assert(P::kWidth == 16);
    for (; i + 16 <= total; i += 16) {
      __m256 even, odd;
      load_bfloat16_even_odd(x + i, even, odd);
      store_bfloat16_even_odd(grad_x + i, element(even, i, std::true_type{}),
                              element(odd, i + 8, std::true_type{}));
    }
  }
#endif
  for (; i + P::kWidth <= total; i += P::kWidth) pack(i, P::kWidth);
  if (i < total) pack(i, total - i);
}

// The backward of one row: grad = element(v) for each vector v of the row's L elements.
template <typename P, typename scalar_t, typename Element>
inline void walk_row(const scalar_t* x, scalar_t* grad_x, int64_t L, Element&& element) {
  walk_elements<P>(x, grad_x, L,
                   [&](const typename P::Vec& v, int64_t, auto) { return element(v); });
}

// Whether every row of x, and of grad_x, starts where the one before it ends.
inline bool rows_form_one_run(const BackwardParams& p) {
  const int64_t L = p.positions, C = p.channels;
  const RowStrides &xs = p.x_strides, &gs = p.grad_x_strides;
  return xs.channel == L && gs.channel == L &&
         (p.batch == 1 || (xs.batch == C * L && gs.batch == C * L));
}

// Whether a backward walks its short rows a group of up to 16 (AVX-512) or 8 (AVX2) at a
// time as one run of full vectors (walk_run below: float accumulation, rows that lie end
// to end), and row_of[e] = e / L, the row of element e of a run, for the 16 L + 32
// elements a walk can reach (AVX-512: a pack of 32 may start at element 16 L - 1; AVX2
// reaches 8 L + 16); on AVX2 also row_of_even_odd[e], the row of lane e % 8 of
// walk_elements' even_odd vector e - e % 8. Shared read-only by the threads.
struct ShortRun {
  static constexpr int64_t kMaxElements = kShortRow * 16 + 32;
  bool applies = false;
  alignas(64) int32_t row_of[kMaxElements];
#if defined(CPU_CAPABILITY_AVX2)
  alignas(64) int32_t row_of_even_odd[kMaxElements];
#endif

  ShortRun(const BackwardParams& p, [[maybe_unused]] bool float_accumulation) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    applies = float_accumulation && p.positions <= kShortRow && rows_form_one_run(p);
#endif
    if (!applies) return;
    const int32_t L = static_cast<int32_t>(p.positions);
    for (int32_t e = 0; e < 16 * L + 32; ++e) row_of[e] = e / L;
#if defined(CPU_CAPABILITY_AVX2)
    for (int32_t e = 0; e < 16 * L + 32; ++e) {
      row_of_even_odd[e] = (e - e % 16 + 2 * (e % 8) + (e % 16) / 8) / L;
    }
#endif
  }

  // The rows of the lanes of walk_elements' vector e.
  template <bool kEvenOdd>
  const int32_t* lane_rows(int64_t e) const {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (kEvenOdd) return row_of_even_odd + e;
#endif
    return row_of + e;
  }
};

// Where the run of rows from row `first` starts, in x and in grad_x.
template <typename scalar_t>
inline std::pair<const scalar_t*, scalar_t*> run_start(const BackwardParams& p, int64_t first) {
  const int64_t L = p.positions, n = first / p.channels, c = first % p.channels;
  return {static_cast<const scalar_t*>(p.x) + n * p.x_strides.batch + c * L,
          static_cast<scalar_t*>(p.grad_x) + n * p.grad_x_strides.batch + c * L};
}

// The backward of `count` short rows from row `first` where run.applies: walks the run's
// count * L elements as packs P of full vectors whose lanes may belong to different rows,
// grad = element(v, lane_rows), lane j of v belonging to row lane_rows[j] (0 .. count - 1;
// aligned to the vector, for an aligned load). A row-at-a-time loop would spend a partial
// vector and the per-row setup on every 49-position row.
template <typename scalar_t, typename P, typename Element>
inline void walk_run(const BackwardParams& p, const ShortRun& run, int64_t first, int64_t count,
                     Element&& element) {
  const auto [x, grad_x] = run_start<scalar_t>(p, first);
  walk_elements<P>(x, grad_x, count * p.positions,
                   [&](const typename P::Vec& v, int64_t e, auto even_odd) {
                     return element(v, run.lane_rows<decltype(even_odd)::value>(e));
                   });
}

// walk_run, except on AVX2 for float x with rows of at least a vector (L >= 8): there the
// run is walked a row at a time, still in full vectors of the run. A vector inside row j
// takes row_element(j)(v), made once per row (its terms the same in every lane); only a
// vector across two rows takes element(v, lane_rows), and the run's last partial vector
// (inside its last row, since L >= 8) row_element(count - 1). The lane permutes that
// element() spends on every vector (vpermps, about 1.2 cycles each on Zen 3) took about a
// fifth of the softmax backward of 128x512x7x7 float32 there (three per vector with
// FramedGradTerms, the usual terms; four or eight with the others; walking by
// rows: 5-11 % faster on 1 thread, bit-identical). Not for the L1 backward, whose two
// permutes per vector cost less than the row loop (4-8 % slower there), nor for AVX-512's
// cheaper permutes.
template <typename scalar_t, typename P, typename Element, typename RowElement>
inline void walk_run_by_rows(const BackwardParams& p, const ShortRun& run, int64_t first,
                             int64_t count, Element&& element,
                             [[maybe_unused]] RowElement&& row_element) {
#if defined(CPU_CAPABILITY_AVX2)
  using Vec = typename P::Vec;
  constexpr int64_t W = Vec::size();
  const int64_t L = p.positions;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (L >= W) {
      const auto [x, grad_x] = run_start<float>(p, first);
      const int64_t total = count * L;
      int64_t e = 0;
      for (int64_t j = 0; j < count; ++j) {
        const auto inside_row = row_element(j);
        const int64_t row_end = (j + 1) * L;
        for (; e + 2 * W <= row_end; e += 2 * W) {  // two at a time: fewer loop branches
          const Vec a = Vec::loadu(x + e), b = Vec::loadu(x + e + W);
          inside_row(a).store(grad_x + e);
          inside_row(b).store(grad_x + e + W);
        }
        if (e + W <= row_end) {
          inside_row(Vec::loadu(x + e)).store(grad_x + e);
          e += W;
        }
        if (e < row_end && e + W <= total) {  // across rows j and j + 1
          element(Vec::loadu(x + e), run.lane_rows<false>(e)).store(grad_x + e);
          e += W;
        }
      }
      if (e < total) {
        row_element(count - 1)(Vec::loadu(x + e, total - e)).store(grad_x + e, total - e);
      }
      return;
    }
  }
#endif
  walk_run<scalar_t, P>(p, run, first, count, element);
}
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

#include "../entropy_state.h"  // ShiftFloor

namespace sparsity_ext {
namespace {

// A float vector of this build, as the functions below take it (avx2_short_rows.h: __m256),
// and the rows of a group of short rows (one per lane).
using FloatVector = __m512;
constexpr int64_t kTileRows = 16;

// The row of each lane of a group (walk_run's lane_rows, aligned) as a vector, one row in
// every lane, and a float vector's lanes rearranged by it (lane j: lane rows[j] of v).
using LaneIndex = __m512i;
inline LaneIndex load_lane_rows(const int32_t* rows) { return _mm512_load_si512(rows); }
inline LaneIndex same_row(int row) { return _mm512_set1_epi32(row); }
inline __m512 permute_lanes(__m512 v, LaneIndex rows) { return _mm512_permutexvar_ps(rows, v); }

// A comparison's lanes (all ones or all zeros) as one bit per lane, and a blend by them.
inline uint32_t lane_bits(__m512 mask) { return _mm512_movepi32_mask(_mm512_castps_si512(mask)); }
inline __m512 blend_lanes(__m512 mask, __m512 if_clear, __m512 if_set) {
  return _mm512_mask_blend_ps(static_cast<__mmask16>(lane_bits(mask)), if_clear, if_set);
}

// max(shift, the softmax's shift floor) in one instruction (at::vec::maximum takes three):
// max_ps returns its second operand when either is NaN, so NaN stays NaN.
inline __m512 clamp_shift_float(__m512 shift) {
  return _mm512_max_ps(_mm512_set1_ps(ShiftFloor<float>::value), shift);
}

// 2^f for |f| <= 1/2, the polynomial of exp2_nonpositive below, of degree kDegree (5 or 4:
// kExp2Polynomial, kExp2Polynomial4).
template <int kDegree = 5>
inline __m512 exp2_reduced(__m512 f) {
  static_assert(kDegree == 4 || kDegree == 5);
  const float* c = kDegree == 5 ? kExp2Polynomial : kExp2Polynomial4;
  __m512 p = _mm512_set1_ps(c[0]);
  for (int k = 1; k <= kDegree; ++k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[k]));
  return p;
}

// 2^y for y <= 0 (or NaN), the shifted values of a softmax (right for any y < 128, as n
// follows y): 2^n * 2^f with n = round(y), |f| <= 1/2, and 2^f from a degree-5
// near-minimax polynomial (fitted to relative error 9e-8; 1.9e-7 evaluated in float, about
// 1 ulp, the accuracy of exp_u20's 6th degree at one FMA less); scalef applies 2^n.
// Results below 2^-125 are set to exactly 0 through `representable` rather than
// computed: an underflowing scalef takes a microcode assist that costs more than a whole
// short row. The mask is "not less than", so NaN lanes stay representable and NaN. The
// other lanes need no clamp: whatever they compute (NaN from y = -inf) is masked away.
// exp2_nonpositive below; exp2_unscaled is its first part: it returns 2^f and sets n and
// `representable`, for a caller that multiplies other factors into 2^f before it applies
// 2^n (FramedGradTerms).
template <int kDegree = 5>
inline __m512 exp2_unscaled(__m512 y, __m512& n, __mmask16& representable) {
  representable = _mm512_cmp_ps_mask(y, _mm512_set1_ps(-125.0f), _CMP_NLT_UQ);
  n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return exp2_reduced<kDegree>(_mm512_sub_ps(y, n));
}

template <int kDegree = 5>
inline __m512 exp2_nonpositive(__m512 y, __mmask16& representable) {
  __m512 n;
  const __m512 two_to_f = exp2_unscaled<kDegree>(y, n, representable);
  return _mm512_maskz_scalef_ps(representable, two_to_f, n);
}

inline __m512 exp2_nonpositive(__m512 y) {
  __mmask16 representable;
  return exp2_nonpositive(y, representable);
}

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
  __m512 q = _mm512_set1_ps(kLog2Polynomial[0]);
  for (int k = 1; k < 9; ++k) q = _mm512_fmadd_ps(q, u, _mm512_set1_ps(kLog2Polynomial[k]));
  return _mm512_fmadd_ps(u, q, _mm512_getexp_ps(x));  // getexp: e = floor(log2 x)
}

// 16 consecutive elements of scalar_t as float, lanes outside `mask` read as 0 (and not
// read at all: a masked load never touches the memory of a masked-out lane).
template <typename scalar_t>
inline __m512 load16(const scalar_t* p, __mmask16 mask) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_maskz_loadu_ps(mask, p);
  } else {
    const __m256i bits = _mm256_maskz_loadu_epi16(mask, p);
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    } else {
      return _mm512_cvtph_ps(bits);
    }
  }
}

// In place: r[j] (row j, 16 positions) becomes position j of the 16 rows (row i in lane i).
inline void transpose16x16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int j = 0; j < 16; j += 2) {  // lane k of t[j]: r[j], r[j+1] at 4k and 4k+1; t[j+1]: +2
    t[j] = _mm512_unpacklo_ps(r[j], r[j + 1]);
    t[j + 1] = _mm512_unpackhi_ps(r[j], r[j + 1]);
  }
  __m512 u[16];  // u[4g + m]: rows 4g..4g+3 at positions 4k + m, k = 0..3
  for (int g = 0; g < 4; ++g) {
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 1]), d = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int m = 0; m < 4; ++m) {
    // v: rows 0-7 (lo) and 8-15 (hi) at positions m, 8 + m (0x88) and 4 + m, 12 + m (0xdd)
    const __m512 lo_a = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x88);
    const __m512 lo_b = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xdd);
    const __m512 hi_a = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x88);
    const __m512 hi_b = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xdd);
    r[m] = _mm512_shuffle_f32x4(lo_a, hi_a, 0x88);
    r[8 + m] = _mm512_shuffle_f32x4(lo_a, hi_a, 0xdd);
    r[4 + m] = _mm512_shuffle_f32x4(lo_b, hi_b, 0x88);
    r[12 + m] = _mm512_shuffle_f32x4(lo_b, hi_b, 0xdd);
  }
}

// The reader of such a group: `count` <= 16 rows from row `first` of x (layout kRows, so
// each row's positions are consecutive), handed to the caller one position at a time,
// position i of every row in one vector (row j in lane j). It reads 16 positions of each
// row with one (masked) load and transposes the 16 x 16 tile in registers: plain loads
// wherever the rows lie, where a gather per position costs several times more (measured
// on Zen 4, whose gathers are microcoded).
template <typename scalar_t>
struct ShortRowTiles : ShortRowStarts<scalar_t, 16> {
  using ShortRowStarts<scalar_t, 16>::starts;
  using ShortRowStarts<scalar_t, 16>::length;
  __mmask16 active = 0;  // the group's lanes

  bool init(const ForwardParams& p, int64_t first, int64_t rows) {
    if (!ShortRowStarts<scalar_t, 16>::init(p, first, rows)) return false;
    active = static_cast<__mmask16>((1u << rows) - 1);
    return true;
  }

  // take(i, v) for i = 0 .. L-1 in order, v = position i of each row as float, `fill` in
  // the lanes past the group. A tile of 1 or 2 positions (49 = 3 x 16 + 1) is read a
  // position at a time instead: 16 or 32 scalar loads cost less than a tile's 16 loads and
  // 64 shuffles.
  template <typename Take>
  void for_each_position(__m512 fill, Take&& take) const {
    for (int64_t i0 = 0; i0 < length; i0 += 16) {
      const int64_t width = std::min<int64_t>(16, length - i0);
      if (width <= 2) {
        for (int64_t i = i0; i < length; ++i) {
          take(i, _mm512_mask_blend_ps(active, fill, column(i)));
        }
        break;
      }
      const __mmask16 positions = static_cast<__mmask16>((1u << width) - 1);
      __m512 tile[16];
      for (int j = 0; j < 16; ++j) tile[j] = load16(starts[j] + i0, positions);
      transpose16x16(tile);
      for (int64_t i = 0; i < width; ++i) take(i0 + i, _mm512_mask_blend_ps(active, fill, tile[i]));
    }
  }

  __m512 column(int64_t i) const {
    alignas(64) float values[16];
    ShortRowStarts<scalar_t, 16>::column(i, values);
    return _mm512_load_ps(values);
  }

  // Reads the group once, position i stored at transposed + 16 i (16 floats, aligned) and
  // folded into the rows' max, which is returned; also(v) sees each position too. Lanes
  // past the group read -inf. The max skips NaN (max_ps): a NaN still reaches the row's
  // sums through softmax_group_sums, which shifts an all-masked row by 0, so even a row of
  // NaN and -inf gives NaN.
  template <typename Also>
  __m512 read_transposed(float* transposed, Also&& also) const {
    __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for_each_position(vmax, [&](int64_t i, __m512 v) {
      _mm512_store_ps(transposed + i * 16, v);
      vmax = _mm512_max_ps(v, vmax);
      also(v);
    });
    return vmax;
  }

  // acc + v in the group's lanes, acc in the others.
  __m512 add_in_group(__m512 acc, __m512 v) const { return _mm512_mask_add_ps(acc, active, acc, v); }
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
