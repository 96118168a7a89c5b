// CPU kernels of channel_stats, vectorised with at::vec and parallel over rows.
//
// Forward, per row: the row is cut into chunks that stay in L1/L2; each chunk takes a
// max pass and then an exp pass relative to that max (one exp per element, the real
// floor on CPU), and the chunk states merge in order through EntropyState::merge.
// A row's result therefore does not depend on the thread count: same bits always.
//
// Layouts: kRows walks each row with unit stride, except short rows (<= 64 positions) on
// AVX-512 and AVX2, which are read one row per lane (16 x 16 or 8 x 8 tiles transposed in
// registers); kChannelsLast (channels unit-stride) vectorises across channels (one vector =
// Pack::kWidth consecutive channels of one sample) and walks the positions, so every load
// is contiguous. The float exp is a polynomial exp2 on AVX-512 and AVX2 (exp2_nonpositive).
//
// Backward, per element: grad_x = coef * exp(d - log_sum) * (d - mean_shift) with
// d = max(x - max, floor) and one coef per row (see entropy_state.h for the derivation);
// on AVX-512 and AVX2 float the same in the frame of y = x log2(e) - offset
// (FramedGradTerms).
#include "channel_stats_cpu.h"

#if !defined(CPU_CAPABILITY)
#error "compile once per CPU capability with -DCPU_CAPABILITY=<cap> (see cpu_capability.h)"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../entropy_state.h"
#include "avx2_short_rows.h"
#include "avx512_short_rows.h"
#include "short_row_groups.h"
#include "parallel_chunks.h"
#include "row_grads.h"
#include "store_from_float.h"

namespace sparsity_ext {
namespace {

using at::vec::Vectorized;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Elements per task handed to a thread: enough to amortise the scheduling.
constexpr int64_t kElementsPerTask = 1 << 15;
// Positions per chunk of a row: the chunk is re-read from cache by the exp pass.
constexpr int64_t kRowChunk = 1 << 13;          // kRows: 8192 elements, 32 KB in float
constexpr int64_t kChannelsLastChunk = 1 << 9;  // kChannelsLast: 512 positions x one vector
// Groups of rows whose per-row last step (the forward's store_rows, the backward's
// row_coefficients) runs in one call: independent latency chains (log, exp, division) that
// overlap, where one group's stalled the loop (7x7 kernels 3-7 % faster, 1 thread).
constexpr int64_t kGroupsPerBatch = 4;


// exp(x) for x <= 0 (or NaN): the DEFAULT build's float exp. On AVX-512 and AVX2,
// accumulate() and GradTerms take exp2_nonpositive for float before they reach it.
inline Vectorized<float> exp_nonpositive(const Vectorized<float>& x) { return x.exp_u20(); }

inline Vectorized<double> exp_nonpositive(const Vectorized<double>& x) { return x.exp(); }

template <typename acc_t>
inline Vectorized<acc_t> clamp_shift(const Vectorized<acc_t>& shift) {
  // at::vec::maximum propagates NaN, as the scalar clamp_shift does.
  return at::vec::maximum(shift, Vectorized<acc_t>(ShiftFloor<acc_t>::value));
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
template <>
inline Vectorized<float> clamp_shift(const Vectorized<float>& shift) {
  return clamp_shift_float(shift);
}
#endif

// The forward's inner step for shift = x - max (<= 0, -inf when masked, or NaN):
//   sum += exp(shift),  shifted += shift * exp(shift).
template <typename acc_t>
inline void accumulate(const Vectorized<acc_t>& shift, Vectorized<acc_t>& sum,
                       Vectorized<acc_t>& shifted) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    FloatVector s = sum, t = shifted;
    softmax_step(shift, s, t);
    sum = s;
    shifted = t;
    return;
  }
#endif
  const Vectorized<acc_t> d = clamp_shift(shift);
  const Vectorized<acc_t> e = exp_nonpositive(d);
  sum = sum + e;
  shifted = at::vec::fmadd(d, e, shifted);
}

// Prefetch the line `bytes` past p. Done on integers: the address may lie past the end of
// the tensor (pointer arithmetic there would be undefined; a prefetch never faults).
inline void prefetch_ahead(const void* p, int64_t bytes) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + bytes));
}

// Running max for the max pass. On AVX-512 and AVX2 a plain max_ps (one instruction where
// at::vec::maximum takes three), which skips NaN (it returns b when either is NaN): a NaN
// still reaches the result through the exp pass (x - max is NaN there), except in a part
// with nothing but -inf and NaN, which the caller must catch (contiguous_chunk_state checks
// for it; the short rows shift such a row by 0, so its NaN - 0 stays NaN).
template <typename acc_t>
inline Vectorized<acc_t> max_skipping_nan(const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) return _mm512_max_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) return _mm256_max_ps(a, b);
#endif
  return at::vec::maximum(a, b);
}

template <typename acc_t>
inline acc_t reduce_max(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return at::vec::maximum(a, b); }, v);
}

template <typename acc_t>
inline acc_t reduce_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return a + b; }, v);
}

// One load of kWidth elements of scalar_t as kVecs vectors of acc_t. Partial loads fill
// the missing lanes with -inf, a masked position, so no scalar tail loop is needed.
template <typename scalar_t>
struct Pack {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr bool kReduced = at::is_reduced_floating_point_v<scalar_t>;
  static constexpr int kVecs = kReduced ? 2 : 1;
  static constexpr int64_t kLanes = Vec::size();
  static constexpr int64_t kWidth = kVecs * kLanes;

  // A full pack inline, a partial one (count < kWidth; lanes past count read -inf) out of
  // line: with both inline, the loops that call load() grew past what GCC inlines, and it
  // made load() a call per vector (the AVX2 backward of short rows 25 % slower).
  C10_ALWAYS_INLINE static void load(const scalar_t* p, int64_t count, Vec (&out)[kVecs]) {
    if (count != kWidth) return load_partial(p, count, out);
    if constexpr (kReduced) {
      std::tie(out[0], out[1]) =
          at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
    } else {
      out[0] = Vec::loadu(p);
    }
  }

  C10_NOINLINE static void load_partial(const scalar_t* p, int64_t count, Vec (&out)[kVecs]) {
    const Vec masked(-std::numeric_limits<acc_t>::infinity());
    if constexpr (kReduced) {
      std::tie(out[0], out[1]) =
          at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p, count));
    } else {
      out[0] = Vec::loadu(p, count);
    }
    for (int k = 0; k < kVecs; ++k) {
      out[k] = keep_first(masked, out[k], std::clamp<int64_t>(count - k * kLanes, 0, kLanes));
    }
  }

  // As load(), with the elements in any order over the lanes: for passes that only take
  // a max or a sum. bfloat16 on AVX-512 is split into its even and odd elements, two
  // instructions where load()'s in-order conversion takes four.
  static void load_unordered(const scalar_t* p, int64_t count, Vec (&out)[kVecs]) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      // Lanes past `count` read 0xFF80 (-128 as int16), bfloat16's -inf: a masked position.
      const __m512i bits =
          count == kWidth ? _mm512_loadu_si512(p)
                          : _mm512_mask_loadu_epi16(_mm512_set1_epi16(-128),
                                                    static_cast<__mmask32>((1u << count) - 1), p);
      out[0] = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));  // even elements
      out[1] = _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32(-65536)));  // odd
      return;
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (count == kWidth) {
        __m256 even, odd;
        load_bfloat16_even_odd(p, even, odd);
        out[0] = even;
        out[1] = odd;
        return;
      }
    }
#endif
    load(p, count, out);
  }

  // The first `lanes` lanes of v, the rest from `fill`.
  static Vec keep_first(const Vec& fill, const Vec& v, int64_t lanes) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float>) {
      return _mm512_mask_blend_ps(static_cast<__mmask16>((1u << lanes) - 1), fill, v);
    } else {
      return _mm512_mask_blend_pd(static_cast<__mmask8>((1u << lanes) - 1), fill, v);
    }
#else
    return Vec::set(fill, v, lanes);  // a switch over `lanes` in at::vec
#endif
  }

  static void store(scalar_t* p, int64_t count, const Vec (&in)[kVecs]) {
    if constexpr (kReduced) {
      store_from_float(p, count, in[0], in[1]);
    } else {
      in[0].store(p, count);
    }
  }
};

// --- forward ------------------------------------------------------------------------

// State of `count` consecutive elements: a max pass, then an exp pass from cache. Both
// loops keep kUnroll independent accumulators so that they are not latency bound.
template <typename scalar_t>
EntropyState<acc_type<scalar_t>> contiguous_chunk_state(const scalar_t* x, int64_t count) {
  using P = Pack<scalar_t>;
  using acc_t = typename P::acc_t;
  using Vec = typename P::Vec;
  constexpr int64_t W = P::kWidth;
  constexpr int kUnroll = 4;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  Vec v[P::kVecs];
  Vec vmax[kUnroll];
  for (int u = 0; u < kUnroll; ++u) vmax[u] = Vec(kNegInf);
  int64_t i = 0;
  for (; i + kUnroll * W <= count; i += kUnroll * W) {
    for (int u = 0; u < kUnroll; ++u) {
      P::load_unordered(x + i + u * W, W, v);
      for (int k = 0; k < P::kVecs; ++k) vmax[u] = max_skipping_nan(v[k], vmax[u]);
    }
  }
  for (; i < count; i += W) {
    P::load_unordered(x + i, std::min(W, count - i), v);
    for (int k = 0; k < P::kVecs; ++k) vmax[0] = max_skipping_nan(v[k], vmax[0]);
  }
  for (int u = 1; u < kUnroll; ++u) vmax[0] = max_skipping_nan(vmax[u], vmax[0]);
  const acc_t row_max = reduce_max(vmax[0]);
  if (row_max == kNegInf) {
    // Only masked positions, which contribute nothing (and -inf - -inf would be NaN),
    // unless a NaN hid among them from max_skipping_nan.
    for (int64_t j = 0; j < count; ++j) {
      if (static_cast<acc_t>(x[j]) != static_cast<acc_t>(x[j])) {
        const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
        return {nan, nan, nan};
      }
    }
    return EntropyState<acc_t>::empty();
  }

  const Vec shift_by(row_max);
  Vec sum[kUnroll], shifted[kUnroll];
  for (int u = 0; u < kUnroll; ++u) sum[u] = shifted[u] = Vec(0);
  i = 0;
  for (; i + kUnroll * W <= count; i += kUnroll * W) {
    for (int u = 0; u < kUnroll; ++u) {
      // While this pass computes from cache, fetch what follows the chunk (the next
      // chunk, or the next row when rows are contiguous): the max pass then finds it in
      // cache instead of waiting on memory. One 64-byte line per pack.
      prefetch_ahead(x + i + u * W, count * static_cast<int64_t>(sizeof(scalar_t)));
      P::load_unordered(x + i + u * W, W, v);
      for (int k = 0; k < P::kVecs; ++k) accumulate(v[k] - shift_by, sum[u], shifted[u]);
    }
  }
  for (; i < count; i += W) {
    P::load_unordered(x + i, std::min(W, count - i), v);
    for (int k = 0; k < P::kVecs; ++k) accumulate(v[k] - shift_by, sum[0], shifted[0]);
  }
  for (int u = 1; u < kUnroll; ++u) {
    sum[0] = sum[0] + sum[u];
    shifted[0] = shifted[0] + shifted[u];
  }
  return {row_max, reduce_sum(sum[0]), reduce_sum(shifted[0])};
}

// Finishes `count` consecutive rows from their states (max, sum, shifted), several rows
// per vector: finalize() of entropy_state.h lane by lane, with at::vec's log and exp.
// Per-row scalar log/exp and scattered stores would otherwise dominate 7x7 rows.
template <typename scalar_t>
void store_rows(const ForwardParams& p, int64_t first, int64_t count,
                const acc_type<scalar_t>* row_max, const acc_type<scalar_t>* sum,
                const acc_type<scalar_t>* shifted) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t rows = p.batch * p.channels;
  const acc_t length = static_cast<acc_t>(p.positions);
  acc_t* stats = static_cast<acc_t*>(p.row_stats);
  scalar_t* outputs[3] = {static_cast<scalar_t*>(p.entropy), static_cast<scalar_t*>(p.perplexity),
                          static_cast<scalar_t*>(p.sparsity)};
  for (int64_t j = 0; j < count; j += V) {
    const int64_t k = std::min(V, count - j);
    const Vec m = Vec::loadu(row_max + j, k), s = Vec::loadu(sum + j, k),
              t = Vec::loadu(shifted + j, k);
    const Vec log_sum = s.log(), mean_shift = t / s;
    const Vec entropy = log_sum - mean_shift;
    const Vec perplexity = entropy.exp();
    const Vec sparsity = p.positions > 1 ? (Vec(length) - perplexity) / Vec(length - acc_t(1))
                                         : perplexity * Vec(0);  // L == 1: 0, NaN stays NaN
    const Vec values[3] = {entropy, perplexity, sparsity};
    for (int o = 0; o < 3; ++o) {
      if constexpr (at::is_reduced_floating_point_v<scalar_t>) {
        const auto packed = at::vec::convert_from_float<scalar_t>(values[o], values[o]);
        packed.store(outputs[o] + first + j, k);
      } else {
        values[o].store(outputs[o] + first + j, k);
      }
    }
    m.store(stats + first + j, k);
    log_sum.store(stats + rows + first + j, k);
    mean_shift.store(stats + 2 * rows + first + j, k);
  }
}

// Short rows (7x7 = 49 positions): one row per lane, `count` <= kTileRows rows at once (16
// on AVX-512, 8 on AVX2), each position read across the rows (ShortRowTiles of the build's
// header). No horizontal reduction and no partial vector per row, which is what a
// row-at-a-time loop spends most of its time on at this length. Returns false where it
// does not apply (the caller then goes row by row).
template <typename scalar_t>
bool short_rows_state(const ForwardParams& p, int64_t first, int64_t count,
                      acc_type<scalar_t>* row_max, acc_type<scalar_t>* sum,
                      acc_type<scalar_t>* shifted) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (!std::is_same_v<acc_type<scalar_t>, float>) {
    return false;
  } else {
    ShortRowTiles<scalar_t> rows;
    if (!rows.init(p, first, count)) return false;
    // Each position read once, kept transposed (position-major) for the exp pass.
    alignas(64) float transposed[kShortRow * kTileRows];
    const FloatVector vmax = rows.read_transposed(transposed, [](FloatVector) {});
    FloatVector s, t;
    softmax_group_sums(transposed, vmax, rows, s, t);
    Vectorized<float>(vmax).store(row_max, count);
    Vectorized<float>(s).store(sum, count);
    Vectorized<float>(t).store(shifted, count);
    return true;
  }
#else
  return false;
#endif
}

template <typename scalar_t>
void forward_rows(const ForwardParams& p) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const int64_t L = p.positions, C = p.channels;
  const RowStrides& xs = p.x_strides;
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / L);
  constexpr int64_t kGroup = Vectorized<acc_t>::size();
  const int64_t rows = p.batch * C;
  const int64_t group_size = row_group_size(L, rows, kGroup);  // rows finished together
  const int64_t groups = (rows + group_size - 1) / group_size;
  const int64_t group_grain = std::max<int64_t>(1, grain / group_size);
  // The states of up to kGroupsPerBatch groups are finished in one store_rows call.
  constexpr int64_t kFinished = kGroupsPerBatch * kGroup;
  parallel_chunks(groups, group_grain, [&](int64_t begin, int64_t end) {
    acc_t m[kFinished], s[kFinished], t[kFinished];
    int64_t batch_first = begin * group_size, batched = 0;  // the rows in m, s and t
    for (int64_t group = begin; group < end; ++group) {
      const int64_t first = group * group_size, count = std::min(group_size, rows - first);
      acc_t *mg = m + batched, *sg = s + batched, *tg = t + batched;
      if (!short_rows_state<scalar_t>(p, first, count, mg, sg, tg)) {
        for (int64_t j = 0; j < count; ++j) {
          const int64_t row = first + j;
          const scalar_t* xr = x + (row / C) * xs.batch + (row % C) * xs.channel;
          auto state = EntropyState<acc_t>::empty();
          for (int64_t start = 0; start < L; start += kRowChunk) {
            state.merge(contiguous_chunk_state(xr + start, std::min(kRowChunk, L - start)));
          }
          mg[j] = state.max;
          sg[j] = state.sum;
          tg[j] = state.shifted;
        }
      }
      batched += count;
      if (batched + group_size > kFinished || group + 1 == end) {
        store_rows<scalar_t>(p, batch_first, batched, m, s, t);
        batch_first += batched;
        batched = 0;
      }
    }
  });
}

template <typename scalar_t>
void forward_channels_last(const ForwardParams& p) {
  using P = Pack<scalar_t>;
  using acc_t = typename P::acc_t;
  using Vec = typename P::Vec;
  constexpr int64_t W = P::kWidth;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const int64_t C = p.channels, L = p.positions, step = p.x_strides.position;
  const int64_t blocks = (C + W - 1) / W;
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / (L * W));

  parallel_chunks(p.batch * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, c0 = (item % blocks) * W;
      const int64_t lanes = std::min(W, C - c0);
      const scalar_t* xb = x + n * p.x_strides.batch + c0;
      EntropyState<acc_t> state[W];
      for (int64_t j = 0; j < W; ++j) state[j] = EntropyState<acc_t>::empty();

      for (int64_t start = 0; start < L; start += kChannelsLastChunk) {
        const int64_t stop = std::min(L, start + kChannelsLastChunk);
        Vec v[P::kVecs], vmax[P::kVecs];
        for (int k = 0; k < P::kVecs; ++k) vmax[k] = Vec(kNegInf);
        for (int64_t i = start; i < stop; ++i) {
          P::load(xb + i * step, lanes, v);
          for (int k = 0; k < P::kVecs; ++k) vmax[k] = max_skipping_nan(v[k], vmax[k]);
        }
        // A lane with only masked positions (and NaN, which the max skips) shifts by 0
        // instead of -inf (no -inf - -inf): its sum is then 0, or NaN from a NaN, and the
        // merge treats a 0 as contributing nothing.
        Vec shift_by[P::kVecs], sum[P::kVecs], shifted[P::kVecs];
        for (int k = 0; k < P::kVecs; ++k) {
          shift_by[k] = Vec::blendv(vmax[k], Vec(0), vmax[k] == Vec(kNegInf));
          sum[k] = Vec(0);
          shifted[k] = Vec(0);
        }
        for (int64_t i = start; i < stop; ++i) {
          P::load(xb + i * step, lanes, v);
          for (int k = 0; k < P::kVecs; ++k) {
            accumulate(v[k] - shift_by[k], sum[k], shifted[k]);
          }
        }
        acc_t m[W], s[W], t[W];
        for (int k = 0; k < P::kVecs; ++k) {
          vmax[k].store(m + k * P::kLanes);
          sum[k].store(s + k * P::kLanes);
          shifted[k].store(t + k * P::kLanes);
        }
        for (int64_t j = 0; j < lanes; ++j) state[j].merge({m[j], s[j], t[j]});
      }
      acc_t m[W], s[W], t[W];
      for (int64_t j = 0; j < lanes; ++j) {
        m[j] = state[j].max;
        s[j] = state[j].sum;
        t[j] = state[j].shifted;
      }
      store_rows<scalar_t>(p, n * C + c0, lanes, m, s, t);
    }
  });
}

// --- backward -----------------------------------------------------------------------

// Rows whose coefficients are computed together (one float vector's worth: 16 on AVX-512,
// 8 otherwise), and the rows a backward takes as one group: their terms fit in one vector.
constexpr int64_t kCoefGroup = Vectorized<float>::size();
// Rows whose coefficients one row_coefficients call computes, at most.
constexpr int64_t kCoefBatch = kGroupsPerBatch * kCoefGroup;

// backward_coefficient() of entropy_state.h for the `count` <= kCoefBatch consecutive rows
// from `first` (sample n, channel c), several rows per vector: a scalar exp and division
// per row would otherwise cost more than a short row's elements.
template <typename scalar_t>
void row_coefficients(const BackwardParams& p, int64_t first, int64_t count, int64_t n, int64_t c,
                      acc_type<scalar_t>* coef) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const acc_t* stats = static_cast<const acc_t*>(p.row_stats);
  const int64_t rows = p.batch * p.channels;
  acc_t g[3][kCoefBatch];
  load_row_grads<scalar_t>(p, first, count, n, c, g);
  // L == 1: no sparsity term (its factor 1 / (L - 1) would be infinite).
  const Vec sparsity_scale(p.positions > 1 ? acc_t(1) / static_cast<acc_t>(p.positions - 1)
                                           : acc_t(0));
  for (int64_t j = 0; j < count; j += V) {
    const int64_t k = std::min(V, count - j);
    const Vec log_sum = Vec::loadu(stats + rows + first + j, k);
    const Vec mean_shift = Vec::loadu(stats + 2 * rows + first + j, k);
    const Vec perplexity = (log_sum - mean_shift).exp();
    Vec sum = Vec::loadu(g[0] + j, k) + perplexity * Vec::loadu(g[1] + j, k);
    if (p.positions > 1) sum = sum - perplexity * Vec::loadu(g[2] + j, k) * sparsity_scale;
    sum.neg().store(coef + j, k);
  }
}

// grad_element() of entropy_state.h, one vector of x at a time, from per-lane row terms
// prepared once per row (or group of rows):
//   grad = coef exp(d - log_sum) (d - mean_shift),  d = clamp_shift(x - max).
// On AVX-512 and AVX2, log_sum is kept in base 2 (times log2 e) for exp2_nonpositive, so that the
// exponent is one FMA: the backward of bfloat16 and of short rows is bound by operations
// per element, not by memory. coef multiplies exp(...) first, as in grad_element(): a
// masked position (d at the floor, exp 0) then gives 0 for any finite coef, where
// coef * d first would overflow for |coef| > 2.6e36 and give inf * 0 = NaN.
template <typename acc_t>
struct GradTerms {
  using Vec = Vectorized<acc_t>;
  Vec row_max, log_sum, coef, mean_shift;

  static GradTerms of(const Vec& row_max, const Vec& log_sum, const Vec& mean_shift,
                      const Vec& coef) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<acc_t, float>) {
      return {row_max, log_sum * Vec(kLog2e), coef, mean_shift};
    }
#endif
    return {row_max, log_sum, coef, mean_shift};
  }

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  // The terms of the rows in `rows` (lane j: the row whose index is lane j of `rows`).
  GradTerms permuted(LaneIndex rows) const {
    static_assert(std::is_same_v<acc_t, float>);
    return {permute_lanes(row_max, rows), permute_lanes(log_sum, rows),
            permute_lanes(coef, rows), permute_lanes(mean_shift, rows)};
  }
#endif

  Vec operator()(const Vec& x) const {
    const Vec d = clamp_shift(x - row_max);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<acc_t, float>) {
      const Vec e = exp2_nonpositive(at::vec::fmsub(d, Vec(kLog2e), log_sum));
      return coef * e * (d - mean_shift);
    }
#endif
    return coef * exp_nonpositive(d - log_sum) * (d - mean_shift);
  }
};

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// The float backward on AVX-512 and AVX2 in the frame of y = x log2(e) - offset, one FMA
// from x, with offset = (max + log_sum) log2(e) rounded to float:
//   coef exp(d - log_sum) (d - mean_shift) = scale 2^y (y - center),
//   scale = coef 2^-r ln(2),  center = r - (log_sum - mean_shift) log2(e),
// r = (max + log_sum) log2(e) - offset, the offset's rounding error, found exactly by
// error-free transformations (the products' errors by FMA, the sum's by TwoSum). The FMA
// rounds once, relative to y, so rows far from zero keep their precision; and no clamp is
// needed: a position whose 2^y is below 2^-125 (a masked one included) gives 0 through
// the exp's mask (AVX2: the product's). Two instructions per vector fewer than GradTerms
// (the subtraction of the max and its clamp; on short rows also a permute), and the
// backward of bfloat16 and of short rows is bound by instructions; the exp's polynomial
// has degree kDegree (kExp2Degree of the element type). A row qualifies when
// |offset| <= 2^20 (so |r| <= 1/8), |scale| <= 2^100 and center is finite (then
// |center| <= 1/8 + log2(L), the entropy in bits); the others (activations beyond about
// 7e5, gradients beyond about 1e30, NaN or infinite rows or gradients) keep GradTerms
// (MixedGradTerms serves both kinds).
// The error-free transformations need IEEE arithmetic as written: no -ffast-math.
#if defined(__FAST_MATH__)
#error "FramedGradTerms relies on exact rounding errors (TwoSum): build without -ffast-math"
#endif
template <int kDegree>
struct FramedGradTerms {
  using Vec = Vectorized<float>;
  Vec offset, scale, center;

  // The terms of a vector of rows, one per lane, and which lanes qualify (all ones there).
  static FramedGradTerms of(const Vec& row_max, const Vec& log_sum, const Vec& mean_shift,
                            const Vec& coef, Vec& qualifies) {
    const Vec log2e(kLog2e);
    const Vec a = row_max * log2e, a_error = at::vec::fmsub(row_max, log2e, a);
    const Vec b = log_sum * log2e, b_error = at::vec::fmsub(log_sum, log2e, b);
    const Vec offset = a + b;
    const Vec b_kept = offset - a;  // TwoSum: offset + sum_error = a + b
    const Vec sum_error = (a - (offset - b_kept)) + (b - b_kept);
    const Vec r = sum_error + (a_error + b_error);
    const Vec two_to_minus_r = exp2_reduced(Vec(0.0f) - r);
    // center = r - (log_sum - mean_shift) log2(e), rounded once (fmadd of the negation).
    const FramedGradTerms terms{offset, coef * two_to_minus_r * Vec(kLn2),
                                at::vec::fmadd((log_sum - mean_shift).neg(), log2e, r)};
    qualifies = (offset.abs() <= Vec(0x1p20f)) & (terms.scale.abs() <= Vec(0x1p100f)) &
                (terms.center.abs() <= Vec(std::numeric_limits<float>::max()));
    return terms;
  }

  // The terms of the rows in `rows` (lane j: the row whose index is lane j of `rows`).
  FramedGradTerms permuted(LaneIndex rows) const {
    return {permute_lanes(offset, rows), permute_lanes(scale, rows), permute_lanes(center, rows)};
  }

  Vec operator()(const Vec& x) const {
    const Vec y = at::vec::fmsub(x, Vec(kLog2e), offset);
#if defined(CPU_CAPABILITY_AVX512)
    // 2^n applies last, by scalef: scale (y - center) does not wait for the polynomial, and
    // a tiny 2^y no longer makes the product subnormal in a multiplication, which costs
    // extra on Zen 4 (output gradients of 1e-30: backward 1.8x faster); only a subnormal
    // scale still does. 7x7 float32 backward 2 % faster, bfloat16 4 % (Zen 4, 1 thread).
    // In the lanes kept (y >= -125), |scale| <= 2^100 and |y - center| < 2^8 keep
    // scale (y - center) finite. Lanes outside `representable` (y = -inf: NaN or inf) are
    // masked once, here.
    __m512 n;
    __mmask16 representable;
    const __m512 two_to_f = exp2_unscaled<kDegree>(y, n, representable);
    const __m512 rest = _mm512_mul_ps(scale, _mm512_sub_ps(y, center));
    return _mm512_maskz_scalef_ps(representable, _mm512_mul_ps(two_to_f, rest), n);
#else
    // 2^f multiplies last: 2^n scale (y - center) does not wait for the polynomial, so each
    // vector's dependency chain is one multiplication shorter. On Zen 3 this loop runs well
    // below the FMA ports' limit (about 7 cycles a vector where its 9 FMA-port operations
    // need 4.5), and the shorter chain made the float32 backward 4 % faster on 7x7 rows and
    // about 8 % on 32x32 and 56x56 (1 thread). n <= 0 here (y <= 1/8), so |2^n scale| <=
    // |scale|. Lanes outside `representable` (y = -inf: NaN) are masked once, here.
    __m256 representable, two_to_n;
    const Vec two_to_f = exp2_unmasked<kDegree>(y, representable, two_to_n);
    return _mm256_and_ps(representable, two_to_f * (Vec(two_to_n) * scale * (y - center)));
#endif
  }
};

// The first `count` lanes as bits (none for count <= 0, all for a full vector or more), and
// whether a comparison's result (all ones or all zeros per lane) has all of them set, or
// none.
inline uint32_t first_lanes(int64_t count) {
  return (1u << std::clamp<int64_t>(count, 0, Vectorized<float>::size())) - 1;
}
inline bool all_first_lanes(const Vectorized<float>& mask, int64_t count) {
  return (lane_bits(mask) & first_lanes(count)) == first_lanes(count);
}
inline bool no_first_lanes(const Vectorized<float>& mask, int64_t count) {
  return (lane_bits(mask) & first_lanes(count)) == 0;
}

// GradTerms and FramedGradTerms of the same rows (one per lane), each lane computed with
// the one its row qualifies for, so that a row's gradient never depends on which rows
// share its group (groups differ between kernels and layouts). Only groups that mix the
// two pay for both.
template <int kDegree>
struct MixedGradTerms {
  GradTerms<float> shifted;
  FramedGradTerms<kDegree> framed;
  Vectorized<float> framed_lanes;  // all ones in the lanes whose row qualifies

  static MixedGradTerms of(const Vectorized<float>& row_max, const Vectorized<float>& log_sum,
                           const Vectorized<float>& mean_shift, const Vectorized<float>& coef) {
    Vectorized<float> qualifies;
    const auto framed =
        FramedGradTerms<kDegree>::of(row_max, log_sum, mean_shift, coef, qualifies);
    return {GradTerms<float>::of(row_max, log_sum, mean_shift, coef), framed, qualifies};
  }

  MixedGradTerms permuted(LaneIndex rows) const {
    return {shifted.permuted(rows), framed.permuted(rows), permute_lanes(framed_lanes, rows)};
  }

  Vectorized<float> operator()(const Vectorized<float>& x) const {
    return blend_lanes(framed_lanes, shifted(x), framed(x));
  }

  // Whether the rows of the first `count` lanes all qualify (framed serves them).
  bool all_framed(int64_t count) const { return all_first_lanes(framed_lanes, count); }
};

// Calls body(terms) for the `count` <= kTileRows rows whose values start at the four
// pointers (one row per lane) with the cheapest terms that serve each row its own kind:
// FramedGradTerms where all qualify, GradTerms where none does, MixedGradTerms otherwise
// (the framed ones with an exp polynomial of degree kDegree). The framed terms come first
// and alone: making MixedGradTerms for every group and then choosing cost 9 % of the
// 32x512x7x7 float32 backward on Zen 3, where nearly every group is framed.
template <int kDegree, typename Body>
inline void with_grad_terms(const float* row_max, const float* log_sum, const float* mean_shift,
                            const float* coef, int64_t count, Body&& body) {
  using Vec = Vectorized<float>;
  const Vec max = Vec::loadu(row_max, count), sum = Vec::loadu(log_sum, count),
            shift = Vec::loadu(mean_shift, count), k = Vec::loadu(coef, count);
  Vec qualifies;
  const auto framed = FramedGradTerms<kDegree>::of(max, sum, shift, k, qualifies);
  if (all_first_lanes(qualifies, count)) return body(framed);
  const MixedGradTerms<kDegree> both{GradTerms<float>::of(max, sum, shift, k), framed, qualifies};
  if (no_first_lanes(qualifies, count)) return body(both.shifted);
  body(both);
}
#endif

template <typename scalar_t>
void backward_rows(const BackwardParams& p) {
  using P = Pack<scalar_t>;
  using acc_t = typename P::acc_t;
  using Vec = typename P::Vec;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  scalar_t* grad_x = static_cast<scalar_t*>(p.grad_x);
  const acc_t* stats = static_cast<const acc_t*>(p.row_stats);
  const int64_t L = p.positions, C = p.channels, rows = p.batch * C;
  const RowStrides &xs = p.x_strides, &gs = p.grad_x_strides;
  const int64_t group_size = row_group_size(L, rows, kCoefGroup);  // with terms in one vector
  const int64_t groups = (rows + group_size - 1) / group_size;
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / (L * group_size));
  const ShortRun run(p, std::is_same_v<acc_t, float>);  // walk_run's, where it applies
  parallel_chunks(groups, grain, [&](int64_t begin, int64_t end) {
    // The coefficients of up to kGroupsPerBatch groups at a time, rows batch_first ..
    // batch_end - 1 (group_size <= kCoefGroup, so they fit in kCoefBatch).
    acc_t batch_coef[kCoefBatch];
    int64_t batch_first = 0, batch_end = 0;
    const int64_t range_end = std::min(rows, end * group_size);
    for (int64_t group = begin; group < end; ++group) {
      const int64_t first = group * group_size, count = std::min(group_size, rows - first);
      int64_t n = first / C, c = first % C;  // advanced with the row: no division per row
      if (first >= batch_end) {
        batch_first = first;
        batch_end = std::min(range_end, first + kGroupsPerBatch * group_size);
        row_coefficients<scalar_t>(p, first, batch_end - first, n, c, batch_coef);
      }
      const acc_t* coef = batch_coef + (first - batch_first);
      const auto rows_pass = [&](const auto& terms_of_row) {  // terms_of_row(j): row first + j
        for (int64_t j = 0; j < count; ++j, c = c + 1 == C ? (++n, 0) : c + 1) {
          walk_row<P>(x + n * xs.batch + c * xs.channel, grad_x + n * gs.batch + c * gs.channel, L,
                      terms_of_row(j));
        }
      };
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      if constexpr (std::is_same_v<acc_t, float>) {
        const auto walk = [&](const auto& group) {
          if (run.applies) {
            walk_run_by_rows<scalar_t, P>(
                p, run, first, count,
                [&](const Vec& v, const int32_t* lane_rows) {
                  return group.permuted(load_lane_rows(lane_rows))(v);
                },
                [&](int64_t j) { return group.permuted(same_row(static_cast<int>(j))); });
            return;
          }
          rows_pass([&](int64_t j) { return group.permuted(same_row(static_cast<int>(j))); });
        };
        with_grad_terms<kExp2Degree<scalar_t>>(stats + first, stats + rows + first,
                                               stats + 2 * rows + first, coef, count, walk);
        continue;
      }
#endif
      rows_pass([&](int64_t j) {
        const int64_t row = first + j;
        return GradTerms<acc_t>::of(Vec(stats[row]), Vec(stats[rows + row]),
                                    Vec(stats[2 * rows + row]), Vec(coef[j]));
      });
    }
  });
}

template <typename scalar_t>
void backward_channels_last(const BackwardParams& p) {
  using P = Pack<scalar_t>;
  using acc_t = typename P::acc_t;
  using Vec = typename P::Vec;
  constexpr int64_t W = P::kWidth;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  scalar_t* grad_x = static_cast<scalar_t*>(p.grad_x);
  const acc_t* stats = static_cast<const acc_t*>(p.row_stats);
  const int64_t C = p.channels, L = p.positions, rows = p.batch * C;
  const int64_t blocks = (C + W - 1) / W;
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / (L * W));

  parallel_chunks(p.batch * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, c0 = (item % blocks) * W;
      const int64_t lanes = std::min(W, C - c0);
      // Per-lane row statistics; lanes past `lanes` are computed but never stored.
      acc_t lane_stats[4][W] = {};
      for (int64_t j = 0; j < lanes; ++j) {
        const int64_t row = n * C + c0 + j;
        lane_stats[0][j] = stats[row];
        lane_stats[1][j] = stats[rows + row];
        lane_stats[2][j] = stats[2 * rows + row];
      }
      for (int64_t j = 0; j < lanes; j += kCoefGroup) {
        row_coefficients<scalar_t>(p, n * C + c0 + j, std::min(kCoefGroup, lanes - j), n, c0 + j,
                                   lane_stats[3] + j);
      }
      const scalar_t* xb = x + n * p.x_strides.batch + c0;
      scalar_t* gb = grad_x + n * p.grad_x_strides.batch + c0;
      const int64_t x_step = p.x_strides.position, grad_step = p.grad_x_strides.position;
      const auto block_pass = [&](const auto& terms) {  // terms[k]: the rows of vector k
        Vec v[P::kVecs];
        for (int64_t i = 0; i < L; ++i) {
          P::load(xb + i * x_step, lanes, v);
          for (int k = 0; k < P::kVecs; ++k) v[k] = terms[k](v[k]);
          P::store(gb + i * grad_step, lanes, v);
        }
      };
      const auto lane_vec = [&](int which, int k) {
        return Vec::loadu(lane_stats[which] + k * P::kLanes);
      };
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      // The terms with_grad_terms would choose, for kVecs vectors; both kinds are made here,
      // once per block of channels for all of its L positions.
      if constexpr (std::is_same_v<acc_t, float>) {
        using Mixed = MixedGradTerms<kExp2Degree<scalar_t>>;
        Mixed both[P::kVecs];
        bool all_framed = true;
        for (int k = 0; k < P::kVecs; ++k) {
          both[k] = Mixed::of(lane_vec(0, k), lane_vec(1, k), lane_vec(2, k), lane_vec(3, k));
          all_framed = all_framed && both[k].all_framed(lanes - k * P::kLanes);
        }
        if (all_framed) {
          decltype(Mixed::framed) framed[P::kVecs];
          for (int k = 0; k < P::kVecs; ++k) framed[k] = both[k].framed;
          block_pass(framed);
        } else {
          block_pass(both);
        }
        continue;
      }
#endif
      GradTerms<acc_t> terms[P::kVecs];
      for (int k = 0; k < P::kVecs; ++k) {
        terms[k] =
            GradTerms<acc_t>::of(lane_vec(0, k), lane_vec(1, k), lane_vec(2, k), lane_vec(3, k));
      }
      block_pass(terms);
    }
  });
}

template <template <typename> class Kernel, typename Params>
void dispatch(const Params& p) {
  switch (p.dtype) {
    case ScalarKind::kFloat16: return Kernel<c10::Half>::run(p);
    case ScalarKind::kBFloat16: return Kernel<c10::BFloat16>::run(p);
    case ScalarKind::kFloat32: return Kernel<float>::run(p);
    case ScalarKind::kFloat64: return Kernel<double>::run(p);
  }
}

template <typename scalar_t>
struct ForwardKernel {
  static void run(const ForwardParams& p) {
    p.layout == RowLayout::kRows ? forward_rows<scalar_t>(p) : forward_channels_last<scalar_t>(p);
  }
};

template <typename scalar_t>
struct BackwardKernel {
  static void run(const BackwardParams& p) {
    p.layout == RowLayout::kRows ? backward_rows<scalar_t>(p) : backward_channels_last<scalar_t>(p);
  }
};

}  // namespace

// This build's entry points (one build per CPU capability: see cpu_capability.h).
namespace CPU_CAPABILITY {
void channel_stats_forward_cpu(const ForwardParams& p) { dispatch<ForwardKernel>(p); }
void channel_stats_backward_cpu(const BackwardParams& p) { dispatch<BackwardKernel>(p); }
}  // namespace CPU_CAPABILITY

}  // namespace sparsity_ext
