// CPU kernels of l1_stats (the L1 measure of l1_state.h), vectorised with at::vec and
// parallel over rows.
//
// Forward, per row: one pass that folds every vector of x into four vector accumulators
// (S, T, sum of x, count of live positions), one log per element (a polynomial log2 on
// AVX-512 and AVX2, the cost that matters) and no exp or max; rows are then finished one
// vector's worth at a time with vector log and exp. kRows walks each row with unit stride
// and reduces the lanes at its end, except short rows (<= 64 positions) on AVX-512 and
// AVX2, which are read one row per lane (16 x 16 or 8 x 8 tiles transposed in registers);
// kChannelsLast puts consecutive channels of one sample side by side in a vector (one lane
// per row) and walks the positions, so no horizontal reduction is needed.
// Each row is always folded in the same order, whatever the thread count: same bits.
//
// Backward, per element: grad_x = coef * (log x - T/S) where x > 0, else 0, with one coef
// per row (l1_backward_coefficient of l1_state.h).
#include "l1_stats_cpu.h"

#if !defined(CPU_CAPABILITY)
#error "compile once per CPU capability with -DCPU_CAPABILITY=<cap> (see cpu_capability.h)"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../l1_state.h"
#include "avx2_short_rows.h"
#include "avx512_short_rows.h"
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
// How far ahead the forward prefetches: bytes along a row, positions in channels last.
constexpr int64_t kPrefetchBytes = 1024;
constexpr int64_t kPrefetchPositions = 16;

// Prefetch the line `bytes` past p. Done on integers: the address may lie past the end of
// the tensor (pointer arithmetic there would be undefined; a prefetch never faults).
inline void prefetch_ahead(const void* p, int64_t bytes) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + bytes));
}

// kWidth elements of scalar_t as kVecs vectors of acc_t (two for 16-bit types). Lanes past
// `count` read as 0, which is not live and adds nothing to any sum.
template <typename scalar_t>
struct Pack {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr bool kReduced = at::is_reduced_floating_point_v<scalar_t>;
  static constexpr int kVecs = kReduced ? 2 : 1;
  static constexpr int64_t kLanes = Vec::size();
  static constexpr int64_t kWidth = kVecs * kLanes;

  static void load(const scalar_t* p, int64_t count, Vec (&out)[kVecs]) {
    if constexpr (kReduced) {
      const auto raw = count == kWidth ? Vectorized<scalar_t>::loadu(p)
                                       : Vectorized<scalar_t>::loadu(p, count);
      std::tie(out[0], out[1]) = at::vec::convert_to_float<scalar_t>(raw);
    } else {
      out[0] = count == kWidth ? Vec::loadu(p) : Vec::loadu(p, count);
    }
    if (count < kWidth) {  // at::vec does not promise zeros past `count` on every ISA
      for (int k = 0; k < kVecs; ++k) {
        out[k] = Vec::set(Vec(0), out[k], std::clamp<int64_t>(count - k * kLanes, 0, kLanes));
      }
    }
  }

  static void store(scalar_t* p, int64_t count, const Vec (&in)[kVecs]) {
    if constexpr (kReduced) {
      store_from_float(p, count, in[0], in[1]);
    } else {
      in[0].store(p, count);
    }
  }
};


// log of the live lanes (!(x <= 0): x > 0, +inf, NaN); 0 on the others, whose log is never
// used (log(1) = 0 rather than log(0) = -inf, so a * log a is 0 there, not 0 * -inf).
template <typename acc_t>
inline Vectorized<acc_t> log_of_live(const Vectorized<acc_t>& x, const Vectorized<acc_t>& not_live) {
  return Vectorized<acc_t>::blendv(x, Vectorized<acc_t>(1), not_live).log();
}

// L1State of l1_state.h, lane by lane; `live` counts lanes with !(x <= 0) as 1.0 each.
// `xlogx` is in the base of the log used (2 on the AVX-512 and AVX2 float paths, which
// take l1_step); xlogx_nats() converts it to T.
template <typename acc_t>
struct VecL1State {
  using Vec = Vectorized<acc_t>;
  Vec sum{0}, xlogx{0}, total{0}, live{0};

  Vec xlogx_nats() const {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<acc_t, float>) return xlogx * Vec(kLn2);
#endif
    return xlogx;
  }

  void add(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<acc_t, float>) {
      FloatVector s = sum, t = xlogx, x_total = total, x_live = live;
      l1_step(x, s, t, x_total, x_live);
      sum = s, xlogx = t, total = x_total, live = x_live;
      return;
    }
#endif
    const Vec not_live = x <= Vec(0);  // all-ones lanes; false for NaN, which must stay live
    const Vec a = Vec::blendv(x, Vec(0), not_live);
    sum = sum + a;
    xlogx = at::vec::fmadd(a, log_of_live(x, not_live), xlogx);
    total = total + x;
    live = live + Vec::blendv(Vec(1), Vec(0), not_live);
  }
};

template <typename acc_t>
inline acc_t reduce_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return a + b; }, v);
}

// Per-row sums of up to kRowGroup rows, finished together by store_rows.
template <typename acc_t>
struct RowSums {
  static constexpr int64_t kRowGroup = Vectorized<acc_t>::size();
  alignas(64) acc_t sum[kRowGroup], xlogx[kRowGroup], total[kRowGroup], live[kRowGroup];
};

// Finishes `count` consecutive rows from their sums: l1_finalize of l1_state.h lane by lane
// (a per-row scalar log and exp would dominate 7x7 rows).
template <typename scalar_t>
void store_rows(const L1ForwardParams& p, int64_t first, int64_t count,
                const RowSums<acc_type<scalar_t>>& sums) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t rows = p.batch * p.channels;
  const acc_t length = static_cast<acc_t>(p.positions);
  const Vec log_length(std::log(length));  // the same bits as l1_finalize's log_positions
  acc_t* stats = static_cast<acc_t*>(p.row_stats);
  scalar_t* outputs[3] = {static_cast<scalar_t*>(p.entropy), static_cast<scalar_t*>(p.perplexity),
                          static_cast<scalar_t*>(p.sparsity)};
  const Vec s = Vec::loadu(sums.sum, count), t = Vec::loadu(sums.xlogx, count);
  const Vec dead = s == Vec(0);
  const Vec mean_log = Vec::blendv(t / s, Vec(0), dead);
  Vec entropy = Vec::blendv(s.log() - mean_log, log_length, dead);
  if (p.positions == 1) entropy = entropy * Vec(0);  // exactly 0; NaN stays NaN
  const Vec perplexity = Vec::blendv(entropy.exp(), Vec(length), dead);
  const Vec sparsity = p.positions > 1 ? (Vec(length) - perplexity) / Vec(length - acc_t(1))
                                       : perplexity * Vec(0);
  const Vec values[3] = {entropy, perplexity, sparsity};
  for (int o = 0; o < 3; ++o) {
    if constexpr (at::is_reduced_floating_point_v<scalar_t>) {
      at::vec::convert_from_float<scalar_t>(values[o], values[o]).store(outputs[o] + first, count);
    } else {
      values[o].store(outputs[o] + first, count);
    }
  }
  s.store(stats + kL1Sum * rows + first, count);
  mean_log.store(stats + kL1MeanLog * rows + first, count);
  (Vec(length) - Vec::loadu(sums.live, count)).store(stats + kL1NonPositive * rows + first, count);
  Vec::loadu(sums.total, count).store(stats + kL1Total * rows + first, count);
}

// --- forward ------------------------------------------------------------------------

// Short rows (7x7 = 49 positions): one row per lane, the `count` <= kTileRows rows of a
// group at once, each position read across the rows (ShortRowTiles, as
// channel_stats_cpu.cpp): no horizontal reduction and no partial vector per row, which is
// what a row-at-a-time loop spends most of its time on at this length. Returns false where
// it does not apply.
template <typename scalar_t>
bool short_rows_sums(const L1ForwardParams& p, int64_t first, int64_t count,
                     RowSums<acc_type<scalar_t>>& sums) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (!std::is_same_v<acc_type<scalar_t>, float>) {
    return false;
  } else {
    ShortRowTiles<scalar_t> rows;
    if (!rows.init(p, first, count)) return false;
    VecL1State<float> state;
    // Lanes past the group: 0, not live. One pass, so the next group's rows (which follow
    // these when rows are contiguous) are fetched during this one, a line per position:
    // without it the tiles' loads wait on memory.
    rows.for_each_position(Vectorized<float>(0), [&](int64_t i, FloatVector v) {
      rows.prefetch_next(i);
      state.add(v);
    });
    state.sum.store(sums.sum);
    state.xlogx_nats().store(sums.xlogx);
    state.total.store(sums.total);
    state.live.store(sums.live);
    return true;
  }
#else
  return false;
#endif
}

template <typename scalar_t>
void forward_rows(const L1ForwardParams& p) {
  using P = Pack<scalar_t>;
  using acc_t = typename P::acc_t;
  using Vec = typename P::Vec;
  constexpr int64_t W = P::kWidth;
  constexpr int64_t kGroup = RowSums<acc_t>::kRowGroup;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const int64_t L = p.positions, C = p.channels, rows = p.batch * C;
  const RowStrides& xs = p.x_strides;
  const int64_t group_size = row_group_size(L, rows, kGroup);  // rows finished together
  const int64_t groups = (rows + group_size - 1) / group_size;
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / (L * group_size));
  parallel_chunks(groups, grain, [&](int64_t begin, int64_t end) {
    RowSums<acc_t> sums;
    Vec v[P::kVecs];
    for (int64_t group = begin; group < end; ++group) {
      const int64_t first = group * group_size, count = std::min(group_size, rows - first);
      if (short_rows_sums<scalar_t>(p, first, count, sums)) {
        store_rows<scalar_t>(p, first, count, sums);
        continue;
      }
      for (int64_t j = 0; j < count; ++j) {
        const int64_t row = first + j;
        const scalar_t* xr = x + (row / C) * xs.batch + (row % C) * xs.channel;
        // Two independent states, so that consecutive vectors' sums do not wait on each
        // other; merged in a fixed order.
        VecL1State<acc_t> state[2];
        int64_t i = 0;
        for (; i + 2 * W <= L; i += 2 * W) {
          prefetch_ahead(xr + i, kPrefetchBytes);
          for (int u = 0; u < 2; ++u) {
            P::load(xr + i + u * W, W, v);
            for (int k = 0; k < P::kVecs; ++k) state[u].add(v[k]);
          }
        }
        for (; i < L; i += W) {
          P::load(xr + i, std::min(W, L - i), v);
          for (int k = 0; k < P::kVecs; ++k) state[0].add(v[k]);
        }
        sums.sum[j] = reduce_sum(state[0].sum + state[1].sum);
        sums.xlogx[j] = reduce_sum(state[0].xlogx_nats() + state[1].xlogx_nats());
        sums.total[j] = reduce_sum(state[0].total + state[1].total);
        sums.live[j] = reduce_sum(state[0].live + state[1].live);
      }
      store_rows<scalar_t>(p, first, count, sums);
    }
  });
}

template <typename scalar_t>
void forward_channels_last(const L1ForwardParams& p) {
  using P = Pack<scalar_t>;
  using acc_t = typename P::acc_t;
  constexpr int64_t W = P::kWidth;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const int64_t C = p.channels, L = p.positions, step = p.x_strides.position;
  const int64_t blocks = (C + W - 1) / W;
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / (L * W));
  parallel_chunks(p.batch * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, c0 = (item % blocks) * W;
      const int64_t lanes = std::min(W, C - c0);
      const scalar_t* xb = x + n * p.x_strides.batch + c0;
      VecL1State<acc_t> state[P::kVecs];
      typename P::Vec v[P::kVecs];
      for (int64_t i = 0; i < L; ++i) {
        // Positions are a whole row of channels apart, too far for the hardware prefetcher
        // to follow reliably: fetch kPrefetchPositions ahead (a prefetch never faults).
        prefetch_ahead(xb + i * step, kPrefetchPositions * step * int64_t(sizeof(scalar_t)));
        P::load(xb + i * step, lanes, v);
        for (int k = 0; k < P::kVecs; ++k) state[k].add(v[k]);
      }
      // One lane per row: finish each vector's lanes as a group of consecutive rows.
      for (int k = 0; k < P::kVecs && k * P::kLanes < lanes; ++k) {
        RowSums<acc_t> sums;
        state[k].sum.store(sums.sum);
        state[k].xlogx_nats().store(sums.xlogx);
        state[k].total.store(sums.total);
        state[k].live.store(sums.live);
        const int64_t count = std::min<int64_t>(P::kLanes, lanes - k * P::kLanes);
        store_rows<scalar_t>(p, n * C + c0 + k * P::kLanes, count, sums);
      }
    }
  });
}

// --- backward -----------------------------------------------------------------------

// Rows whose coefficients one row_coefficients call computes, at most, and the rows a
// backward takes as one group: one float vector's worth (16 on AVX-512, 8 otherwise).
constexpr int64_t kCoefGroup = Vectorized<float>::size();

// l1_backward_coefficient() of l1_state.h for the `count` <= kCoefGroup consecutive rows
// from `first` (sample n, channel c), several rows per vector: a scalar log, exp and
// division per row cost about as much as a 7x7 row's elements.
template <typename scalar_t>
void row_coefficients(const L1BackwardParams& p, int64_t first, int64_t count, int64_t n,
                      int64_t c, acc_type<scalar_t>* coef) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const acc_t* stats = static_cast<const acc_t*>(p.row_stats);
  const int64_t rows = p.batch * p.channels, L = p.positions;
  acc_t g[3][kCoefGroup];
  load_row_grads<scalar_t>(p, first, count, n, c, g);
  for (int64_t j = 0; j < count; j += V) {
    const int64_t k = std::min(V, count - j);
    const Vec sum = Vec::loadu(stats + kL1Sum * rows + first + j, k);
    const Vec mean_log = Vec::loadu(stats + kL1MeanLog * rows + first + j, k);
    const Vec perplexity = (sum.log() - mean_log).exp();
    Vec sum_g = Vec::loadu(g[0] + j, k) + perplexity * Vec::loadu(g[1] + j, k);
    if (L > 1) {
      sum_g = sum_g - perplexity * Vec::loadu(g[2] + j, k) / Vec(static_cast<acc_t>(L - 1));
    }
    Vec result = sum_g.neg() / sum;
    if (L <= 1) result = result * Vec(0);
    // A dead row (S == 0) gets 0 whatever its gradients (its x_i <= 0 get 0 anyway).
    Vec::blendv(result, Vec(0), sum == Vec(0)).store(coef + j, k);
  }
}

// l1_grad_element of l1_state.h, one vector of x at a time.
template <typename acc_t>
inline Vectorized<acc_t> grad_elements(const Vectorized<acc_t>& x,
                                       const Vectorized<acc_t>& mean_log,
                                       const Vectorized<acc_t>& coef) {
  using Vec = Vectorized<acc_t>;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __mmask16 live_lanes = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NLE_UQ);
    const __m512 log2_x = log2_positive(_mm512_mask_blend_ps(live_lanes, _mm512_set1_ps(1.0f), x));
    return _mm512_maskz_mul_ps(live_lanes, coef,
                               _mm512_fmsub_ps(_mm512_set1_ps(kLn2), log2_x, mean_log));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    const Vec not_live = x <= Vec(0);
    const Vec log2_x = log2_positive(Vec::blendv(x, Vec(1), not_live));
    return Vec::blendv(coef * at::vec::fmsub(Vec(kLn2), log2_x, mean_log), Vec(0), not_live);
  }
#endif
  const Vec not_live = x <= Vec(0);
  const Vec grad = coef * (log_of_live(x, not_live) - mean_log);
  return Vec::blendv(grad, Vec(0), not_live);
}

template <typename scalar_t>
void backward_rows(const L1BackwardParams& p) {
  using P = Pack<scalar_t>;
  using acc_t = typename P::acc_t;
  using Vec = typename P::Vec;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  scalar_t* grad_x = static_cast<scalar_t*>(p.grad_x);
  const acc_t* stats = static_cast<const acc_t*>(p.row_stats);
  const int64_t L = p.positions, C = p.channels, rows = p.batch * C;
  const RowStrides &xs = p.x_strides, &gs = p.grad_x_strides;
  const int64_t group_size = row_group_size(L, rows, kCoefGroup);  // coefficients in one call
  const int64_t groups = (rows + group_size - 1) / group_size;
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / (L * group_size));
  const ShortRun run(p, std::is_same_v<acc_t, float>);  // walk_run's, where it applies
  parallel_chunks(groups, grain, [&](int64_t begin, int64_t end) {
    acc_t coef[kCoefGroup];
    for (int64_t group = begin; group < end; ++group) {
      const int64_t first = group * group_size, count = std::min(group_size, rows - first);
      int64_t n = first / C, c = first % C;  // advanced with the row: no division per row
      row_coefficients<scalar_t>(p, first, count, n, c, coef);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      if constexpr (std::is_same_v<acc_t, float>) {
        if (run.applies) {
          const Vec mean_log = Vec::loadu(stats + kL1MeanLog * rows + first, count);
          const Vec coefs = Vec::loadu(coef, count);
          walk_run<scalar_t, P>(p, run, first, count, [&](const Vec& v, const int32_t* lane_rows) {
            const LaneIndex rows_of_lanes = load_lane_rows(lane_rows);
            return grad_elements<float>(v, permute_lanes(mean_log, rows_of_lanes),
                                        permute_lanes(coefs, rows_of_lanes));
          });
          continue;
        }
      }
#endif
      for (int64_t j = 0; j < count; ++j, c = c + 1 == C ? (++n, 0) : c + 1) {
        const Vec mean_log(stats[kL1MeanLog * rows + first + j]), row_coef(coef[j]);
        walk_row<P>(x + n * xs.batch + c * xs.channel, grad_x + n * gs.batch + c * gs.channel, L,
                    [&](const Vec& v) { return grad_elements(v, mean_log, row_coef); });
      }
    }
  });
}

template <typename scalar_t>
void backward_channels_last(const L1BackwardParams& p) {
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
      alignas(64) acc_t lane_stats[2][W] = {};
      for (int64_t j = 0; j < lanes; ++j) {
        lane_stats[0][j] = stats[kL1MeanLog * rows + n * C + c0 + j];
      }
      for (int64_t j = 0; j < lanes; j += kCoefGroup) {
        row_coefficients<scalar_t>(p, n * C + c0 + j, std::min(kCoefGroup, lanes - j), n, c0 + j,
                                   lane_stats[1] + j);
      }
      Vec mean_log[P::kVecs], coef[P::kVecs];
      for (int k = 0; k < P::kVecs; ++k) {
        mean_log[k] = Vec::loadu(lane_stats[0] + k * P::kLanes);
        coef[k] = Vec::loadu(lane_stats[1] + k * P::kLanes);
      }
      const scalar_t* xb = x + n * p.x_strides.batch + c0;
      scalar_t* gb = grad_x + n * p.grad_x_strides.batch + c0;
      const int64_t x_step = p.x_strides.position, grad_step = p.grad_x_strides.position;
      Vec v[P::kVecs];
      for (int64_t i = 0; i < L; ++i) {
        P::load(xb + i * x_step, lanes, v);
        for (int k = 0; k < P::kVecs; ++k) v[k] = grad_elements(v[k], mean_log[k], coef[k]);
        P::store(gb + i * grad_step, lanes, v);
      }
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
  static void run(const L1ForwardParams& p) {
    p.layout == RowLayout::kRows ? forward_rows<scalar_t>(p) : forward_channels_last<scalar_t>(p);
  }
};

template <typename scalar_t>
struct BackwardKernel {
  static void run(const L1BackwardParams& p) {
    p.layout == RowLayout::kRows ? backward_rows<scalar_t>(p) : backward_channels_last<scalar_t>(p);
  }
};

}  // namespace

// This build's entry points (one build per CPU capability: see cpu_capability.h).
namespace CPU_CAPABILITY {
void l1_stats_forward_cpu(const L1ForwardParams& p) { dispatch<ForwardKernel>(p); }
void l1_stats_backward_cpu(const L1BackwardParams& p) { dispatch<BackwardKernel>(p); }
}  // namespace CPU_CAPABILITY

}  // namespace sparsity_ext
