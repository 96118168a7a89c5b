// CPU kernels of monitor_sums_: each row's softmax and L1 entropy and sparsity
// (finalize() of entropy_state.h and l1_state.h, a vector of rows at a time), summed over
// the rows into the float64 column sums. Short rows on AVX-512 and AVX2 take one fused
// pass over x for both measures (monitor_sums_fused_cpu); everything else is reduced from
// the row statistics of the two forward kernels (monitor_sums_cpu).
#include "monitor_sums_cpu.h"

#if !defined(CPU_CAPABILITY)
#error "compile once per CPU capability with -DCPU_CAPABILITY=<cap> (see cpu_capability.h)"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../l1_stats_params.h"
#include "avx2_short_rows.h"
#include "avx512_short_rows.h"
#include "short_row_groups.h"
#include "parallel_chunks.h"

namespace sparsity_ext {
namespace {

using at::vec::Vectorized;

template <typename scalar_t>
using acc_type_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Rows summed in acc_t, lane by lane, before the block's sums go into float64: a lane adds
// at most kBlockVectors values in acc_t.
constexpr int64_t kBlockVectors = 16;
constexpr int kSummed = kMonitorRows;  // columns summed over rows; the last two are counts

// Adds the block sums of `V`-lane accumulators into float64, lane by lane.
template <typename acc_t>
void add_lanes(const Vectorized<acc_t> (&acc)[kSummed], double (&total)[kSummed]) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  for (int c = 0; c < kSummed; ++c) {
    alignas(64) acc_t lanes[V];
    acc[c].store(lanes);
    for (int64_t i = 0; i < V; ++i) total[c] += static_cast<double>(lanes[i]);
  }
}

void add_into(const MonitorSumsParams& p, const double (&total)[kSummed]) {
  for (int c = 0; c < kSummed; ++c) p.sums[c * p.sums_stride] += total[c];
  p.sums[kMonitorRows * p.sums_stride] += static_cast<double>(p.rows);
  p.sums[kMonitorValues * p.sums_stride] +=
      static_cast<double>(p.rows) * static_cast<double>(p.positions);
}

// The summed columns of a vector of rows, from each row's softmax entropy, L1 sum S and
// L1 mean log T/S, its count of values <= 0 and its sum of values: finalize() of
// entropy_state.h and l1_finalize() of l1_state.h, with at::vec's log and exp (the ops'
// own accuracy: a cheaper polynomial exp's 2e-7 relative error is amplified in
// SP = (L - PP) / (L - 1) when PP is close to L).
template <typename acc_t>
void row_columns(const Vectorized<acc_t>& entropy, const Vectorized<acc_t>& l1_sum,
                 const Vectorized<acc_t>& l1_mean_log, const Vectorized<acc_t>& non_positive,
                 const Vectorized<acc_t>& total, int64_t L, Vectorized<acc_t> (&values)[kSummed]) {
  using Vec = Vectorized<acc_t>;
  const Vec length(static_cast<acc_t>(L));
  // SP = (L - PP) / (L - 1); L == 1 gives 0 (NaN stays NaN).
  const Vec scale(L > 1 ? acc_t(1) / static_cast<acc_t>(L - 1) : acc_t(0));
  // L == 1: the L1 entropy is 0 exactly (l1_finalize), not log S - T/S rounded.
  const Vec single(L > 1 ? acc_t(1) : acc_t(0));
  const Vec zero(0);
  const Vec live = l1_sum != zero;  // all bits set in a live (or NaN) row's lane
  const Vec entropy_l1 = Vec::blendv(zero, (l1_sum.log() - l1_mean_log) * single, live);
  values[kMonitorSparsity] = (length - entropy.exp()) * scale;
  values[kMonitorEntropy] = entropy;
  values[kMonitorSparsityL1] = Vec::blendv(zero, (length - entropy_l1.exp()) * scale, live);
  values[kMonitorEntropyL1] = entropy_l1;
  values[kMonitorLiveRows] = Vec::blendv(zero, Vec(1), live);
  values[kMonitorNonPositive] = non_positive;
  values[kMonitorTotal] = total;
}

template <typename acc_t>
void reduce(const MonitorSumsParams& p) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const acc_t* softmax = static_cast<const acc_t*>(p.softmax_stats);
  const acc_t* l1 = static_cast<const acc_t*>(p.l1_stats);
  const int64_t rows = p.rows, L = p.positions;
  const Vec zero(0);
  double total[kSummed] = {};
  for (int64_t start = 0; start < rows; start += kBlockVectors * V) {
    const int64_t stop = std::min(rows, start + kBlockVectors * V);
    Vec acc[kSummed];
    for (int c = 0; c < kSummed; ++c) acc[c] = zero;
    for (int64_t j = start; j < stop; j += V) {
      const int64_t k = std::min(V, stop - j);
      Vec values[kSummed];
      row_columns(Vec::loadu(softmax + rows + j, k) - Vec::loadu(softmax + 2 * rows + j, k),
                  Vec::loadu(l1 + kL1Sum * rows + j, k), Vec::loadu(l1 + kL1MeanLog * rows + j, k),
                  Vec::loadu(l1 + kL1NonPositive * rows + j, k),
                  Vec::loadu(l1 + kL1Total * rows + j, k), L, values);
      // Lanes past the last row hold loads of 0, which are not all zero results: drop them.
      for (int c = 0; c < kSummed; ++c) acc[c] = acc[c] + Vec::set(zero, values[c], k);
    }
    add_lanes(acc, total);
  }
  add_into(p, total);
}


#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Groups of kTileRows short rows per block of the parallel loop; blocks are summed in order, so
// the sums do not depend on the thread count.
constexpr int64_t kGroupsPerBlock = 16;

// One group of short rows (ShortRowTiles), one row per lane, each position read once: the
// softmax state's max pass and the L1 sums take the same vector, the softmax exp pass
// reads it back from a transposed copy in cache. Adds the group's rows into acc.
template <typename scalar_t>
void fused_group(const ShortRowTiles<scalar_t>& rows, FloatVector (&acc)[kSummed]) {
  const int64_t L = rows.length;
  alignas(64) float transposed[kShortRow * kTileRows];
  FloatVector l1_sum = Vectorized<float>(0), xlog2x = l1_sum, total = l1_sum, live = l1_sum;
  // Lanes past the group read -inf: not live for the L1 sums either.
  const FloatVector vmax = rows.read_transposed(
      transposed, [&](FloatVector v) { l1_step(v, l1_sum, xlog2x, total, live); });
  FloatVector sum, shifted;
  softmax_group_sums(transposed, vmax, rows, sum, shifted);
  using Vec = Vectorized<float>;
  const Vec s(sum), t(shifted);
  const Vec l1_s(l1_sum);
  Vec values[kSummed];
  row_columns<float>(s.log() - t / s, l1_s, Vec(xlog2x) * Vec(kLn2) / l1_s,
                     Vec(static_cast<float>(L)) - Vec(live), Vec(total), L, values);
  for (int c = 0; c < kSummed; ++c) {
    acc[c] = rows.add_in_group(acc[c], values[c]);
  }
}

template <typename scalar_t>
bool fused(const ForwardParams& x, const MonitorSumsParams& p) {
  if constexpr (!std::is_same_v<acc_type_of<scalar_t>, float>) {
    return false;
  } else {
    if (x.layout != RowLayout::kRows || x.positions > kShortRow) return false;
    const int64_t rows = x.batch * x.channels, groups = (rows + kTileRows - 1) / kTileRows;
    const int64_t blocks = (groups + kGroupsPerBlock - 1) / kGroupsPerBlock;
    std::vector<std::array<double, kSummed>> block_sums(blocks);
    parallel_chunks(blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        FloatVector acc[kSummed];
        for (int c = 0; c < kSummed; ++c) acc[c] = Vectorized<float>(0);
        const int64_t stop = std::min(groups, (block + 1) * kGroupsPerBlock);
        for (int64_t group = block * kGroupsPerBlock; group < stop; ++group) {
          const int64_t first = group * kTileRows;
          const int64_t count = std::min<int64_t>(kTileRows, rows - first);
          ShortRowTiles<scalar_t> group_rows;
          group_rows.init(x, first, count);  // true: x.positions <= kShortRow
          fused_group<scalar_t>(group_rows, acc);
        }
        double total[kSummed] = {};
        Vectorized<float> vecs[kSummed];
        for (int c = 0; c < kSummed; ++c) vecs[c] = acc[c];
        add_lanes(vecs, total);
        std::copy(total, total + kSummed, block_sums[block].begin());
      }
    });
    double total[kSummed] = {};
    for (const auto& sums : block_sums) {
      for (int c = 0; c < kSummed; ++c) total[c] += sums[c];
    }
    add_into(p, total);
    return true;
  }
}
#endif
}  // namespace

// This build's entry points (one build per CPU capability: see cpu_capability.h).
namespace CPU_CAPABILITY {
void monitor_sums_cpu(const MonitorSumsParams& p) {
  p.acc_dtype == ScalarKind::kFloat64 ? reduce<double>(p) : reduce<float>(p);
}

bool monitor_sums_fused_cpu(const ForwardParams& x, const MonitorSumsParams& p) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  switch (x.dtype) {
    case ScalarKind::kFloat16: return fused<c10::Half>(x, p);
    case ScalarKind::kBFloat16: return fused<c10::BFloat16>(x, p);
    case ScalarKind::kFloat32: return fused<float>(x, p);
    case ScalarKind::kFloat64: break;
  }
#endif
  return false;
}
}  // namespace CPU_CAPABILITY

}  // namespace sparsity_ext
