// CUDA kernels of channel_stats (entropy, perplexity and sparsity of the spatial softmax of
// every (n, c) row of x) and of its one-pass backward. No torch headers: register_cuda.cpp
// hands over a ForwardParams / BackwardParams of raw pointers, sizes and element strides.
//
// Work mapping (rows = N * C, L = positions per row; a "pack" is one 16-byte load when the
// base pointer, the strides and L or C allow it, else one element; a "round" is the 2 packs
// or 8 elements a thread loads before doing any arithmetic):
//
// Unit-stride positions (NCHW-like; any batch and channel strides, 0 when expanded):
//   * Short rows (a 32-lane team covers them in <= 4 rounds, e.g. 7x7 = 49 or 28x28 = 784
//     positions): a team of 1..32 lanes of one warp per row, 256 / team rows per block,
//     merged by a warp-shuffle tree. Adjacent teams read adjacent rows, so a warp's loads
//     fall in a few contiguous cache lines, and 10^5 rows make thousands of blocks.
//   * Long rows: one block of 64..1024 threads per row (512 for double), sized for about
//     four rounds per thread; shuffles, then one warp over shared memory. When the rows are
//     too few to fill the GPU (a handful of rows of 10^5..10^6 positions) and the device has
//     thread-block clusters (sm_90+), a cluster of up to 8 blocks shares each row: each block
//     reduces one contiguous slice and block 0 merges the slices in rank order through
//     distributed shared memory. That is a deterministic two-stage merge with no global
//     scratch and no atomics; on sm_80 such rows run one block each (fewer SMs busy).
// Unit-stride channels (channels_last-like, any batch and position strides):
//   * Threads map to channels so loads stay coalesced: threadIdx.x walks packs of up to 4
//     consecutive channels of one sample (a warp covers runs of 32 packs), threadIdx.y
//     splits the positions. The y-split merges by a fixed tree in shared memory; a cluster
//     splits the positions across blocks when N x (channel tiles) would leave the GPU idle.
// Backward (elementwise, no reduction): the same teams for short rows; fixed segments of a
//   row per block for long rows (any number of blocks per row); channel x position tiles
//   for channels last. Each thread computes the coefficient of its row(s) itself from
//   row_stats and the three grads: a few cached loads and one exp.
//
// Each thread folds its elements into the online state (max, sum, shifted) one round at a
// time: at most one rescale per round when the maximum grows, one exp per element, x read
// once. Merges run in a fixed order for a given launch configuration (a function of shape,
// dtype, strides, alignment and SM count), so results are bitwise reproducible. No atomics,
// no allocation, no host synchronisation. Element offsets are int64_t.

#include "channel_stats_cuda.h"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include "../entropy_state.h"

// The per-thread helpers are __host__ __device__ (the host compiler sees them too), where
// "#pragma unroll" would draw unknown-pragma warnings.
#if defined(__CUDA_ARCH__)
#define SPARSITY_EXT_UNROLL _Pragma("unroll")
#else
#define SPARSITY_EXT_UNROLL
#endif

namespace sparsity_ext {
namespace {

// ----------------------------------------------------------------------------------------
// Tunables (one place; see the mapping notes above).

constexpr int kPackBytes = 16;               // widest load: LDG.128
constexpr int kTeamBlockThreads = 256;       // block size when teams of <= 32 share a block
constexpr int kShortRowMaxRounds = 4;        // short row: a 32-lane team needs <= 4 rounds
constexpr int kRoundsPerThreadLongRow = 4;   // block per row: aim at this many load rounds each
constexpr int kMinRowBlockThreads = 64;
constexpr int kMinRoundsPerClusterThread = 2;  // don't split a row so finely that threads idle
constexpr int kMaxClusterBlocks = 8;         // portable cluster size limit
constexpr int kChannelsLastBlockThreads = 256;
constexpr int kBackwardBlockThreads = 256;
constexpr int kBackwardRoundsPerItem = 4;    // load rounds per thread per backward work item
constexpr int kMaxThreadsPerSm = 2048;       // sm_80 and sm_90
constexpr int64_t kMaxGridX = 2147483647;    // gridDim.x limit; kernels grid-stride beyond it

// Elements per load. Unit-stride rows: one 16-byte pack. Channels last: at most 4 channels
// (16 bytes, or 8 for half types), since each channel of the pack carries its own state.
template <typename scalar_t>
constexpr int kRowsPack = kPackBytes / sizeof(scalar_t);
template <typename scalar_t>
constexpr int kChannelsLastPack = kRowsPack<scalar_t> < 4 ? kRowsPack<scalar_t> : 4;

// Register budgets: float types fit 64 registers per thread (1024-thread blocks, or four
// 256-thread blocks per SM); double's exp needs more, so its blocks are half as large.
template <typename scalar_t>
constexpr int kMaxRowBlockThreads = sizeof(scalar_t) == 8 ? 512 : 1024;
template <typename scalar_t>
constexpr int kMinBlocksPerSm256 = sizeof(scalar_t) == 8 ? 2 : 4;

// Loads a thread issues per round before using any: 32 bytes for 16-byte packs, 8 elements
// (4 doubles) otherwise. At 1024 resident threads per SM (64 registers) that is ~32 KB in
// flight per SM, above what covers DRAM latency at full bandwidth (~20 KB on H100).
template <typename scalar_t, int kPack>
constexpr int kLoadsPerRound = kPack > 1 ? 2 : (sizeof(scalar_t) == 8 ? 4 : 8);

// ----------------------------------------------------------------------------------------
// Element types: float accumulation for half, bfloat16 and float; double for double.

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccType<scalar_t>::type;

__host__ __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__host__ __device__ __forceinline__ float to_acc(float v) { return v; }
__host__ __device__ __forceinline__ double to_acc(double v) { return v; }

template <typename scalar_t>
__host__ __device__ __forceinline__ scalar_t from_acc(acc_type<scalar_t> v);
template <>
__host__ __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__host__ __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__host__ __device__ __forceinline__ double from_acc<double>(double v) { return v; }

// -inf without std::numeric_limits, whose constexpr members are host-only for nvcc.
template <typename acc_t>
__host__ __device__ __forceinline__ acc_t negative_infinity() {
  return static_cast<acc_t>(-INFINITY);
}

template <typename acc_t>
__host__ __device__ __forceinline__ EntropyState<acc_t> empty_state() {
  return {negative_infinity<acc_t>(), acc_t(0), acc_t(0)};
}

// kPack consecutive elements, loaded or stored as one aligned vector.
template <typename scalar_t, int kPack>
struct alignas(sizeof(scalar_t) * kPack) Pack {
  scalar_t v[kPack];
};

// The native type of a pack's size, so that a pack moves with one vector load or store.
template <int kBytes>
struct BitsOf;
template <>
struct BitsOf<16> {
  using type = uint4;
};
template <>
struct BitsOf<8> {
  using type = uint2;
};
template <>
struct BitsOf<4> {
  using type = unsigned int;
};
template <>
struct BitsOf<2> {
  using type = unsigned short;
};

template <int kPack, typename scalar_t>
__host__ __device__ __forceinline__ Pack<scalar_t, kPack> load_pack(const scalar_t* src) {
  using Bits = typename BitsOf<sizeof(Pack<scalar_t, kPack>)>::type;
  const Bits bits = *reinterpret_cast<const Bits*>(src);
  Pack<scalar_t, kPack> pack;
  memcpy(&pack, &bits, sizeof(pack));
  return pack;
}

template <int kPack, typename scalar_t>
__host__ __device__ __forceinline__ void store_pack(scalar_t* dst,
                                                    const Pack<scalar_t, kPack>& pack) {
  using Bits = typename BitsOf<sizeof(Pack<scalar_t, kPack>)>::type;
  Bits bits;
  memcpy(&bits, &pack, sizeof(bits));
#if defined(__CUDA_ARCH__)
  __stwb(reinterpret_cast<Bits*>(dst), bits);  // a plain store would be split per element
#else
  *reinterpret_cast<Bits*>(dst) = bits;
#endif
}

// Element k of a round's pack u in the accumulation type; a pack beyond the end of the
// range reads as -inf, a masked position that adds exactly nothing.
template <typename scalar_t, int kPack, typename acc_t = acc_type<scalar_t>>
__host__ __device__ __forceinline__ acc_t element_or_masked(const Pack<scalar_t, kPack>& pack,
                                                            bool valid, int k) {
  return valid ? to_acc(pack.v[k]) : negative_infinity<acc_t>();
}

// How far a grid-stride loop over rows (row = n * C + c) advances per iteration, also as
// (n, c), computed on the host: kernel arguments live in the constant bank, not registers.
struct RowStep {
  int64_t rows, n, c;
};

RowStep make_row_step(int64_t rows, int64_t channels) {
  return {rows, rows / channels, rows % channels};
}

// (n, c) of a row that advances by a RowStep: one division up front, none per step (a 64-bit
// division costs more than the arithmetic of a short row).
struct RowCursor {
  int64_t n, c;
  __host__ __device__ __forceinline__ RowCursor(int64_t row, int64_t channels)
      : n(row / channels), c(row % channels) {}
  __host__ __device__ __forceinline__ void advance(const RowStep& step, int64_t channels) {
    n += step.n;
    c += step.c;
    if (c >= channels) {
      c -= channels;
      ++n;
    }
  }
};

// ----------------------------------------------------------------------------------------
// Per-thread online accumulation.

// max that keeps NaN from either side (fmax would drop it).
template <typename acc_t>
__host__ __device__ __forceinline__ acc_t max_keep_nan(acc_t running, acc_t v) {
  return (v > running || v != v) ? v : running;
}

// One instruction each; they skip NaN, which the per-element sums then catch.
__host__ __device__ __forceinline__ float max_skip_nan(float a, float b) { return fmaxf(a, b); }
__host__ __device__ __forceinline__ double max_skip_nan(double a, double b) { return fmax(a, b); }

// exp of a shift x_i - max (<= 0, -inf when masked) in the forward's sums. float on the GPU:
// __expf (MUFU.EX2; relative error below 2e-6 for shifts above -10, and the terms below that
// are < 5e-5 of the row maximum's term 1), because one accurate expf per element costs as
// many instructions as 16-bit data leave per element at full bandwidth. Same order of error
// as the CPU kernel's polynomial exp. exp(-inf) = 0 either way.
__host__ __device__ __forceinline__ float exp_of_shift(float shift) {
#if defined(__CUDA_ARCH__)
  return __expf(shift);
#else
  return std::exp(shift);
#endif
}
__host__ __device__ __forceinline__ double exp_of_shift(double shift) { return std::exp(shift); }

// Folds kCount values of one row into a thread's state: rescale once to the round's new
// maximum, then one exp per value. The sums are those of entropy_state.h, with its clamped
// shift (clamp_shift) applied only where it matters, in the product: exp(-inf) is already 0.
template <typename acc_t, int kCount>
__host__ __device__ __forceinline__ void accumulate_round(EntropyState<acc_t>& state,
                                                          const acc_t (&values)[kCount]) {
  acc_t new_max = state.max;
SPARSITY_EXT_UNROLL
  for (int k = 0; k < kCount; ++k) new_max = max_skip_nan(new_max, values[k]);
  if (new_max == negative_infinity<acc_t>()) {
    // Only -inf (masked) and NaN so far: nothing to add (-inf - -inf would be NaN), but a
    // NaN must still poison the row; a poisoned state stays NaN through every rescale.
SPARSITY_EXT_UNROLL
    for (int k = 0; k < kCount; ++k) {
      if (values[k] != values[k]) state.sum = state.shifted = values[k];
    }
    return;
  }
  if (new_max != state.max) {
    acc_t sum, shifted;
    state.rescale_to(new_max, sum, shifted);
    state.max = new_max;
    state.sum = sum;
    state.shifted = shifted;
  }
SPARSITY_EXT_UNROLL
  for (int k = 0; k < kCount; ++k) {
    const acc_t shift = values[k] - new_max;  // NaN for NaN, and for +inf once max is +inf
    const acc_t weight = exp_of_shift(shift);
    state.sum += weight;
    // clamp_shift(shift) * weight: a NaN shift has already made weight NaN, so the cheaper
    // fmax (which maps NaN to the floor) gives the same sums.
    state.shifted += max_skip_nan(shift, ShiftFloor<acc_t>::value) * weight;
  }
}

// A row of unit-stride positions: this thread (`lane` of `team`) folds packs lane,
// lane + team, ... of the pack range [begin, end). Consecutive lanes read consecutive packs.
template <int kPack, typename scalar_t, typename acc_t>
__host__ __device__ __forceinline__ void accumulate_row_slice(const scalar_t* row, int64_t begin,
                                                              int64_t end, int lane, int team,
                                                              EntropyState<acc_t>& state) {
  constexpr int kLoads = kLoadsPerRound<scalar_t, kPack>;
  const int64_t round_stride = static_cast<int64_t>(team) * kLoads;
  for (int64_t i = begin + lane; i < end; i += round_stride) {
    // Issue every load of the round before any arithmetic; convert after.
    Pack<scalar_t, kPack> packs[kLoads];
    bool valid[kLoads];
SPARSITY_EXT_UNROLL
    for (int u = 0; u < kLoads; ++u) {
      const int64_t j = i + static_cast<int64_t>(u) * team;
      valid[u] = j < end;
      if (valid[u]) packs[u] = load_pack<kPack>(row + j * kPack);
    }
    acc_t values[kLoads * kPack];
SPARSITY_EXT_UNROLL
    for (int u = 0; u < kLoads; ++u) {
SPARSITY_EXT_UNROLL
      for (int k = 0; k < kPack; ++k) {
        values[u * kPack + k] = element_or_masked(packs[u], valid[u], k);
      }
    }
    accumulate_round(state, values);
  }
}

// Channels last: this thread folds positions [begin, end) stepping by `step` of kPack
// adjacent channels; `column` points at (n, position 0, first channel of the pack) and
// positions are `position_stride` elements apart. One state per channel.
template <int kPack, typename scalar_t, typename acc_t>
__host__ __device__ __forceinline__ void accumulate_channel_pack(
    const scalar_t* column, int64_t position_stride, int64_t begin, int64_t end, int step,
    EntropyState<acc_t> (&states)[kPack]) {
  constexpr int kLoads = kLoadsPerRound<scalar_t, kPack>;
  const int64_t round_stride = static_cast<int64_t>(step) * kLoads;
  for (int64_t l = begin; l < end; l += round_stride) {
    Pack<scalar_t, kPack> packs[kLoads];
    bool valid[kLoads];
SPARSITY_EXT_UNROLL
    for (int u = 0; u < kLoads; ++u) {
      const int64_t position = l + static_cast<int64_t>(u) * step;
      valid[u] = position < end;
      if (valid[u]) packs[u] = load_pack<kPack>(column + position * position_stride);
    }
    // One round per channel, converting from the raw packs (fewer live registers).
SPARSITY_EXT_UNROLL
    for (int k = 0; k < kPack; ++k) {
      acc_t values[kLoads];
SPARSITY_EXT_UNROLL
      for (int u = 0; u < kLoads; ++u) values[u] = element_or_masked(packs[u], valid[u], k);
      accumulate_round(states[k], values);
    }
  }
}

// ----------------------------------------------------------------------------------------
// Merges across threads, blocks and cluster ranks, each in a fixed order.

// Merges the states of the `team` lanes (a power of two <= 32) of each team in a warp, with
// the result EntropyState::merge would give but one exp per lane instead of two per merge:
// the team's maximum first (a butterfly, so every lane has it), then each lane's state
// rescaled to it, then a tree of plain sums. Lane 0 of each team ends with the team's
// state; every lane of the warp must call it. Fixed order: deterministic.
template <typename acc_t>
__device__ __forceinline__ void team_reduce(EntropyState<acc_t>& state, int team) {
  acc_t team_max = state.max;
  for (int mask = team / 2; mask > 0; mask /= 2) {
    team_max = max_keep_nan(team_max, __shfl_xor_sync(0xffffffffu, team_max, mask, team));
  }
  acc_t sum, shifted;
  state.rescale_to(team_max, sum, shifted);  // an empty or all-masked lane stays at 0
  for (int offset = team / 2; offset > 0; offset /= 2) {
    sum += __shfl_down_sync(0xffffffffu, sum, offset, team);
    shifted += __shfl_down_sync(0xffffffffu, shifted, offset, team);
  }
  state = {team_max, sum, shifted};
}

// Whole (1-D) block; thread 0 ends with the block's state. Every thread must call it, and
// the block must pass a barrier before calling it again (shared scratch).
template <typename acc_t>
__device__ __forceinline__ void block_reduce(EntropyState<acc_t>& state) {
  __shared__ acc_t warp_max[32], warp_sum[32], warp_shifted[32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  team_reduce(state, 32);
  if (lane == 0) {
    warp_max[warp] = state.max;
    warp_sum[warp] = state.sum;
    warp_shifted[warp] = state.shifted;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = static_cast<int>(blockDim.x / 32);
    state = lane < warps ? EntropyState<acc_t>{warp_max[lane], warp_sum[lane], warp_shifted[lane]}
                         : empty_state<acc_t>();
    team_reduce(state, 32);
  }
}

// Thread-block clusters (sm_90+). Clustered kernels are only launched on such devices;
// compiled for an older architecture their cluster steps trap.
__device__ __forceinline__ int cluster_block_count() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return static_cast<int>(cooperative_groups::this_cluster().num_blocks());
#else
  return 1;
#endif
}

__device__ __forceinline__ int cluster_block_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return static_cast<int>(cooperative_groups::this_cluster().block_rank());
#else
  return 0;
#endif
}

// Barrier over every thread of every block of the cluster, with shared-memory visibility.
__device__ __forceinline__ void cluster_barrier() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __trap();
#endif
}

// Address of `local` (a __shared__ variable) in the shared memory of cluster block `rank`.
template <typename T>
__device__ __forceinline__ const T* cluster_shared(T* local, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(local, static_cast<unsigned>(rank));
#else
  __trap();
  return local;
#endif
}

// Thread 0 of every block holds its slice's state; on return thread 0 of rank 0 holds the
// merge of ranks 0, 1, ..., in that order. Every thread of the cluster must call it.
template <typename acc_t>
__device__ __forceinline__ void cluster_reduce(EntropyState<acc_t>& state) {
  __shared__ acc_t slice_state[3];
  if (threadIdx.x == 0) {
    slice_state[0] = state.max;
    slice_state[1] = state.sum;
    slice_state[2] = state.shifted;
  }
  cluster_barrier();
  if (threadIdx.x == 0 && cluster_block_rank() == 0) {
    const int blocks = cluster_block_count();
    for (int rank = 1; rank < blocks; ++rank) {
      const acc_t* remote = cluster_shared(slice_state, rank);
      state.merge({remote[0], remote[1], remote[2]});
    }
  }
  // No block may overwrite its slot (next row) or exit while rank 0 may still read it.
  cluster_barrier();
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_row_outputs(const ForwardParams& p, int64_t row,
                                                  const EntropyState<acc_t>& state) {
  const RowResult<acc_t> r = finalize(state, static_cast<long long>(p.positions));
  static_cast<scalar_t*>(p.entropy)[row] = from_acc<scalar_t>(r.entropy);
  static_cast<scalar_t*>(p.perplexity)[row] = from_acc<scalar_t>(r.perplexity);
  static_cast<scalar_t*>(p.sparsity)[row] = from_acc<scalar_t>(r.sparsity);
  const int64_t rows = p.batch * p.channels;
  acc_t* stats = static_cast<acc_t*>(p.row_stats);  // (3, N, C): max, log_sum, mean_shift
  stats[row] = r.max;
  stats[rows + row] = r.log_sum;
  stats[2 * rows + row] = r.mean_shift;
}

// ----------------------------------------------------------------------------------------
// Forward kernels.

// Rows of unit-stride positions. `team` lanes share a row: a power of two <= 32 (256 / team
// rows per block), or blockDim.x (one block per row, or with kClustered one cluster per row).
// Row (n, c) starts at n * x_strides.batch + c * x_strides.channel (any batch/channel
// strides, 0 for expanded dims); its positions are unit-stride.
template <typename scalar_t, int kPack, bool kClustered>
__global__ void __launch_bounds__(kMaxRowBlockThreads<scalar_t>, 1)
    entropy_fwd_rows_kernel(const ForwardParams p, int team, RowStep step) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const int64_t rows = p.batch * p.channels;
  const int64_t packs = p.positions / kPack;
  const int teams_per_block = static_cast<int>(blockDim.x) / team;
  const int team_index = static_cast<int>(threadIdx.x) / team;
  const int lane = static_cast<int>(threadIdx.x) % team;
  const int cluster_blocks = kClustered ? cluster_block_count() : 1;
  const int rank = kClustered ? cluster_block_rank() : 0;
  // This block's slice of every row it visits: all of it unless a cluster shares the row.
  const int64_t slice_begin = packs * rank / cluster_blocks;
  const int64_t slice_end = packs * (rank + 1) / cluster_blocks;
  // step.rows == (gridDim.x / cluster_blocks) * teams_per_block, set by the launcher.
  const int64_t first_row = static_cast<int64_t>(blockIdx.x / cluster_blocks) * teams_per_block;
  RowCursor cursor(first_row + team_index, p.channels);
  // The loop bound is uniform over the block: shuffles and barriers need every thread.
  for (int64_t team_row = first_row; team_row < rows;
       team_row += step.rows, cursor.advance(step, p.channels)) {
    const int64_t row = team_row + team_index;
    EntropyState<acc_t> state = empty_state<acc_t>();
    if (row < rows) {
      const scalar_t* row_start = x + cursor.n * p.x_strides.batch + cursor.c * p.x_strides.channel;
      accumulate_row_slice<kPack>(row_start, slice_begin, slice_end, lane, team, state);
    }
    if (team <= 32) {
      team_reduce(state, team);
    } else {
      block_reduce(state);
    }
    if constexpr (kClustered) cluster_reduce(state);
    if (lane == 0 && rank == 0 && row < rows) write_row_outputs<scalar_t>(p, row, state);
    // block_reduce's scratch is rewritten for the next row (cluster_reduce ends in a barrier).
    if (!kClustered && team > 32) __syncthreads();
  }
}

// Channels last (unit-stride channels). Block (tx, ty): threadIdx.x = pack of channels
// within a tile of blockDim.x packs, threadIdx.y = position lane. Each cluster (or block)
// takes one (sample, channel tile) per step; with kClustered the positions are split in
// contiguous slices by rank. Element (n, c, i) sits at n * batch + c + i * position stride.
template <typename scalar_t, int kPack, bool kClustered>
__global__ void __launch_bounds__(kChannelsLastBlockThreads, kMinBlocksPerSm256<scalar_t>)
    entropy_fwd_channels_last_kernel(const ForwardParams p, int64_t tiles_per_sample) {
  using acc_t = acc_type<scalar_t>;
  // The y-tree's scratch: one state per (ty, tx, channel in pack).
  __shared__ acc_t tree_max[kChannelsLastBlockThreads * kPack];
  __shared__ acc_t tree_sum[kChannelsLastBlockThreads * kPack];
  __shared__ acc_t tree_shifted[kChannelsLastBlockThreads * kPack];

  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const int64_t channels = p.channels, positions = p.positions;
  const int64_t channel_packs = channels / kPack;
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  const int width = static_cast<int>(blockDim.x), height = static_cast<int>(blockDim.y);
  const int cluster_blocks = kClustered ? cluster_block_count() : 1;
  const int rank = kClustered ? cluster_block_rank() : 0;
  const int64_t slice_begin = positions * rank / cluster_blocks;
  const int64_t slice_end = positions * (rank + 1) / cluster_blocks;
  const int64_t tiles = p.batch * tiles_per_sample;
  const int64_t tile_step = gridDim.x / cluster_blocks;
  auto slot = [&](int y, int k) { return (y * width + tx) * kPack + k; };

  for (int64_t tile = blockIdx.x / cluster_blocks; tile < tiles; tile += tile_step) {
    const int64_t n = tile / tiles_per_sample;
    const int64_t pack_index = (tile - n * tiles_per_sample) * width + tx;
    const bool active = pack_index < channel_packs;
    EntropyState<acc_t> states[kPack];
#pragma unroll
    for (int k = 0; k < kPack; ++k) states[k] = empty_state<acc_t>();
    if (active) {
      const scalar_t* column = x + n * p.x_strides.batch + pack_index * kPack;
      accumulate_channel_pack<kPack>(column, p.x_strides.position, slice_begin + ty, slice_end,
                                     height, states);
    }
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      tree_max[slot(ty, k)] = states[k].max;
      tree_sum[slot(ty, k)] = states[k].sum;
      tree_shifted[slot(ty, k)] = states[k].shifted;
    }
    __syncthreads();
    // Fixed tree over ty (blockDim.y is a power of two); row ty ends with rows ty..ty+2s-1.
    for (int half = height / 2; half > 0; half /= 2) {
      if (ty < half) {
#pragma unroll
        for (int k = 0; k < kPack; ++k) {
          const int other = slot(ty + half, k);
          states[k].merge({tree_max[other], tree_sum[other], tree_shifted[other]});
          tree_max[slot(ty, k)] = states[k].max;
          tree_sum[slot(ty, k)] = states[k].sum;
          tree_shifted[slot(ty, k)] = states[k].shifted;
        }
      }
      __syncthreads();
    }
    if constexpr (kClustered) {
      cluster_barrier();  // every rank's tree is complete
      if (ty == 0 && rank == 0) {
        for (int r = 1; r < cluster_blocks; ++r) {
          const acc_t* remote_max = cluster_shared(tree_max, r);
          const acc_t* remote_sum = cluster_shared(tree_sum, r);
          const acc_t* remote_shifted = cluster_shared(tree_shifted, r);
#pragma unroll
          for (int k = 0; k < kPack; ++k) {
            const int s = slot(0, k);
            states[k].merge({remote_max[s], remote_sum[s], remote_shifted[s]});
          }
        }
      }
    }
    if (ty == 0 && rank == 0 && active) {
#pragma unroll
      for (int k = 0; k < kPack; ++k) {
        write_row_outputs<scalar_t>(p, n * channels + pack_index * kPack + k, states[k]);
      }
    }
    // The tree scratch is rewritten for the next tile, and read remotely until here.
    if constexpr (kClustered) {
      cluster_barrier();
    } else {
      __syncthreads();
    }
  }
}

// ----------------------------------------------------------------------------------------
// Backward kernels: grad_x_i = grad_element(x_i - max, log_sum, mean_shift, coef(row)).
// They need no barriers, so each kernel is a thin wrapper around a per-thread function of
// the thread's grid coordinates (which a host test can also drive, thread by thread).

struct GridCoords {
  int thread_x, thread_y;  // threadIdx
  int block_x, block_y;    // blockDim
  int64_t block, blocks;   // blockIdx.x, gridDim.x
};

__device__ __forceinline__ GridCoords this_thread_coords() {
  return {static_cast<int>(threadIdx.x), static_cast<int>(threadIdx.y),
          static_cast<int>(blockDim.x),  static_cast<int>(blockDim.y),
          static_cast<int64_t>(blockIdx.x), static_cast<int64_t>(gridDim.x)};
}

template <typename acc_t>
struct RowGradient {
  acc_t max, log_sum, mean_shift, coef;
};

template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
__host__ __device__ __forceinline__ RowGradient<acc_t> load_row_gradient(const BackwardParams& p,
                                                                         int64_t n, int64_t c) {
  const int64_t rows = p.batch * p.channels;
  const int64_t row = n * p.channels + c;
  const acc_t* stats = static_cast<const acc_t*>(p.row_stats);
  const void* grads[3] = {p.grad_entropy, p.grad_perplexity, p.grad_sparsity};
  acc_t g[3];
SPARSITY_EXT_UNROLL
  for (int k = 0; k < 3; ++k) {
    // Strides may be 0 (an expanded grad, e.g. from .sum()).
    const int64_t offset = n * p.grad_strides[k][0] + c * p.grad_strides[k][1];
    g[k] = to_acc(static_cast<const scalar_t*>(grads[k])[offset]);
  }
  RowGradient<acc_t> r;
  r.max = stats[row];
  r.log_sum = stats[rows + row];
  r.mean_shift = stats[2 * rows + row];
  r.coef = backward_coefficient(r.log_sum, r.mean_shift, g[0], g[1], g[2],
                                static_cast<long long>(p.positions));
  return r;
}

template <typename scalar_t, typename acc_t>
__host__ __device__ __forceinline__ scalar_t grad_of(acc_t x, const RowGradient<acc_t>& g) {
  return from_acc<scalar_t>(grad_element(x - g.max, g.log_sum, g.mean_shift, g.coef));
}

// Rows of unit-stride positions. Work item = (row, segment): with segments == 1, teams of
// `team` <= 32 lanes take whole rows (blockDim.x / team per block); otherwise team ==
// blockDim.x and a block takes one of `segments` equal slices of a row.
template <typename scalar_t, int kPack>
__host__ __device__ __forceinline__ void backward_rows_thread(const BackwardParams& p, int team,
                                                              int64_t segments, RowStep step,
                                                              const GridCoords& at) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kLoads = kLoadsPerRound<scalar_t, kPack>;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  scalar_t* grad_x = static_cast<scalar_t*>(p.grad_x);
  const int64_t channels = p.channels;
  const int64_t items = p.batch * channels * segments;
  const int64_t row_packs = p.positions / kPack;
  const int teams_per_block = at.block_x / team;
  const int lane = at.thread_x % team;
  const int64_t round_stride = static_cast<int64_t>(team) * kLoads;
  // step.rows == gridDim.x * teams_per_block items, set by the launcher. With whole rows
  // as items (segments == 1) the cursor tracks (n, c) without dividing.
  const int64_t first_item = at.block * teams_per_block + at.thread_x / team;
  RowCursor cursor(first_item / segments, channels);
  for (int64_t item = first_item; item < items; item += step.rows, cursor.advance(step, channels)) {
    int64_t segment = 0, n = cursor.n, c = cursor.c;
    if (segments > 1) {
      const int64_t row = item / segments;
      segment = item - row * segments;
      n = row / channels;
      c = row - n * channels;
    }
    const RowGradient<acc_t> g = load_row_gradient<scalar_t>(p, n, c);
    const scalar_t* x_row = x + n * p.x_strides.batch + c * p.x_strides.channel;
    scalar_t* grad_row = grad_x + n * p.grad_x_strides.batch + c * p.grad_x_strides.channel;
    const int64_t begin = row_packs * segment / segments;
    const int64_t end = row_packs * (segment + 1) / segments;
    for (int64_t i = begin + lane; i < end; i += round_stride) {
      Pack<scalar_t, kPack> loaded[kLoads];
SPARSITY_EXT_UNROLL
      for (int u = 0; u < kLoads; ++u) {
        const int64_t j = i + static_cast<int64_t>(u) * team;
        if (j < end) loaded[u] = load_pack<kPack>(x_row + j * kPack);
      }
SPARSITY_EXT_UNROLL
      for (int u = 0; u < kLoads; ++u) {
        const int64_t j = i + static_cast<int64_t>(u) * team;
        if (j < end) {
          Pack<scalar_t, kPack> out;
SPARSITY_EXT_UNROLL
          for (int k = 0; k < kPack; ++k) out.v[k] = grad_of<scalar_t>(to_acc(loaded[u].v[k]), g);
          store_pack<kPack>(grad_row + j * kPack, out);
        }
      }
    }
  }
}

template <typename scalar_t, int kPack>
__global__ void __launch_bounds__(kBackwardBlockThreads, kMinBlocksPerSm256<scalar_t>)
    entropy_bwd_rows_kernel(const BackwardParams p, int team, int64_t segments, RowStep step) {
  backward_rows_thread<scalar_t, kPack>(p, team, segments, step, this_thread_coords());
}

// Channels last. Block (tx, ty) as in the forward; work item = (sample, channel tile,
// chunk of `chunk_positions` positions), so long rows spread over many blocks.
template <typename scalar_t, int kPack>
__host__ __device__ __forceinline__ void backward_channels_last_thread(
    const BackwardParams& p, int64_t tiles_per_sample, int64_t chunk_positions,
    const GridCoords& at) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kLoads = kLoadsPerRound<scalar_t, kPack>;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  scalar_t* grad_x = static_cast<scalar_t*>(p.grad_x);
  const int64_t channels = p.channels, positions = p.positions;
  const int64_t channel_packs = channels / kPack;
  const int64_t chunks = (positions + chunk_positions - 1) / chunk_positions;
  const int64_t items = p.batch * tiles_per_sample * chunks;
  const int64_t round_stride = static_cast<int64_t>(at.block_y) * kLoads;
  for (int64_t item = at.block; item < items; item += at.blocks) {
    const int64_t tile = item / chunks;
    const int64_t chunk = item - tile * chunks;
    const int64_t n = tile / tiles_per_sample;
    const int64_t pack_index = (tile - n * tiles_per_sample) * at.block_x + at.thread_x;
    if (pack_index >= channel_packs) continue;  // no barriers here
    RowGradient<acc_t> g[kPack];
SPARSITY_EXT_UNROLL
    for (int k = 0; k < kPack; ++k) {
      g[k] = load_row_gradient<scalar_t>(p, n, pack_index * kPack + k);
    }
    const scalar_t* x_column = x + n * p.x_strides.batch + pack_index * kPack;
    scalar_t* grad_column = grad_x + n * p.grad_x_strides.batch + pack_index * kPack;
    const int64_t x_step = p.x_strides.position, grad_step = p.grad_x_strides.position;
    const int64_t chunk_begin = chunk * chunk_positions;
    const int64_t chunk_end =
        chunk_begin + chunk_positions < positions ? chunk_begin + chunk_positions : positions;
    for (int64_t l = chunk_begin + at.thread_y; l < chunk_end; l += round_stride) {
      Pack<scalar_t, kPack> loaded[kLoads];
SPARSITY_EXT_UNROLL
      for (int u = 0; u < kLoads; ++u) {
        const int64_t position = l + static_cast<int64_t>(u) * at.block_y;
        if (position < chunk_end) loaded[u] = load_pack<kPack>(x_column + position * x_step);
      }
SPARSITY_EXT_UNROLL
      for (int u = 0; u < kLoads; ++u) {
        const int64_t position = l + static_cast<int64_t>(u) * at.block_y;
        if (position < chunk_end) {
          Pack<scalar_t, kPack> out;
SPARSITY_EXT_UNROLL
          for (int k = 0; k < kPack; ++k) {
            out.v[k] = grad_of<scalar_t>(to_acc(loaded[u].v[k]), g[k]);
          }
          store_pack<kPack>(grad_column + position * grad_step, out);
        }
      }
    }
  }
}

template <typename scalar_t, int kPack>
__global__ void __launch_bounds__(kChannelsLastBlockThreads, kMinBlocksPerSm256<scalar_t>)
    entropy_bwd_channels_last_kernel(const BackwardParams p, int64_t tiles_per_sample,
                                     int64_t chunk_positions) {
  backward_channels_last_thread<scalar_t, kPack>(p, tiles_per_sample, chunk_positions,
                                                 this_thread_coords());
}

// ----------------------------------------------------------------------------------------
// Host side: launch plans (pure functions of shape and device) and dispatch.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

struct DeviceInfo {
  int sm_count;
  bool has_clusters;  // thread-block clusters: compute capability 9.0 and newer
};

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("sparsity_ext: ") + what + " failed: " +
                             cudaGetErrorString(err));
  }
}

DeviceInfo current_device_info() {
  int device = 0, sms = 0, major = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  // Attribute queries are cheap and never synchronise (unlike cudaGetDeviceProperties).
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
             "cudaDeviceGetAttribute");
  return {sms, major >= 9};
}

// Blocks per row for a few long rows: enough to fill one wave of the GPU when the rows
// alone would leave more than half of it idle, within the portable cluster size, and not
// so many that threads get fewer than kMinRoundsPerClusterThread rounds of loads.
int plan_cluster(int64_t work_blocks, int64_t threads_per_block, int64_t max_split,
                 const DeviceInfo& dev) {
  if (!dev.has_clusters) return 1;
  const int64_t blocks_per_wave = dev.sm_count * (kMaxThreadsPerSm / threads_per_block);
  if (work_blocks * 2 > blocks_per_wave) return 1;
  return static_cast<int>(
      clamp64(std::min<int64_t>(ceil_div(blocks_per_wave, work_blocks), max_split), 1,
              kMaxClusterBlocks));
}

struct RowsPlan {
  int team;     // lanes per row
  int threads;  // blockDim.x
  int cluster;  // blocks per row (1: none)
  int64_t grid;
};

RowsPlan plan_forward_rows(int64_t rows, int64_t positions, int pack, int loads,
                           int max_threads, const DeviceInfo& dev) {
  const int64_t per_round = static_cast<int64_t>(pack) * loads;  // elements per thread-round
  const int64_t threads_one_round = ceil_div(positions, per_round);
  RowsPlan plan;
  if (threads_one_round <= 32 * kShortRowMaxRounds) {  // short row: a team of <= 32 lanes
    plan.team = static_cast<int>(std::min<int64_t>(32, next_pow2(threads_one_round)));
    plan.threads = kTeamBlockThreads;
    plan.cluster = 1;
    plan.grid = std::min(ceil_div(rows, kTeamBlockThreads / plan.team), kMaxGridX);
    return plan;
  }
  plan.threads = static_cast<int>(clamp64(
      next_pow2(ceil_div(threads_one_round, kRoundsPerThreadLongRow)), kMinRowBlockThreads,
      max_threads));
  plan.team = plan.threads;
  plan.cluster = plan_cluster(
      rows, plan.threads, positions / (plan.threads * per_round * kMinRoundsPerClusterThread),
      dev);
  plan.grid = std::min(rows, kMaxGridX / plan.cluster) * plan.cluster;
  return plan;
}

struct ChannelsLastPlan {
  int width, height;  // blockDim.x (channel packs), blockDim.y (position lanes)
  int64_t tiles_per_sample;
  int cluster;
  int64_t grid;
};

ChannelsLastPlan plan_channels_last(int64_t batch, int64_t channels, int64_t positions, int pack,
                                    int loads) {
  ChannelsLastPlan plan;
  const int64_t channel_packs = channels / pack;
  plan.width = static_cast<int>(std::min<int64_t>(32, next_pow2(channel_packs)));
  plan.height = static_cast<int>(std::min<int64_t>(kChannelsLastBlockThreads / plan.width,
                                                   next_pow2(ceil_div(positions, loads))));
  plan.tiles_per_sample = ceil_div(channel_packs, plan.width);
  plan.cluster = 1;
  plan.grid = std::min(batch * plan.tiles_per_sample, kMaxGridX);
  return plan;
}

ChannelsLastPlan plan_forward_channels_last(int64_t batch, int64_t channels, int64_t positions,
                                            int pack, int loads, const DeviceInfo& dev) {
  ChannelsLastPlan plan = plan_channels_last(batch, channels, positions, pack, loads);
  const int64_t tiles = batch * plan.tiles_per_sample;
  plan.cluster = plan_cluster(
      tiles, plan.width * plan.height,
      positions / (static_cast<int64_t>(plan.height) * loads * kMinRoundsPerClusterThread), dev);
  plan.grid = std::min(tiles, kMaxGridX / plan.cluster) * plan.cluster;
  return plan;
}

struct BackwardRowsPlan {
  int team, threads;
  int64_t segments, grid;
};

BackwardRowsPlan plan_backward_rows(int64_t rows, int64_t positions, int pack, int loads) {
  const int64_t threads_one_round = ceil_div(positions, static_cast<int64_t>(pack) * loads);
  BackwardRowsPlan plan;
  plan.threads = kBackwardBlockThreads;
  if (threads_one_round <= 32 * kShortRowMaxRounds) {  // short row: a team of <= 32 lanes
    plan.team = static_cast<int>(std::min<int64_t>(32, next_pow2(threads_one_round)));
    plan.segments = 1;
    plan.grid = std::min(ceil_div(rows, kBackwardBlockThreads / plan.team), kMaxGridX);
    return plan;
  }
  plan.team = kBackwardBlockThreads;
  const int64_t packs_per_segment =
      static_cast<int64_t>(kBackwardBlockThreads) * loads * kBackwardRoundsPerItem;
  plan.segments = ceil_div(positions / pack, packs_per_segment);
  plan.grid = std::min(rows * plan.segments, kMaxGridX);
  return plan;
}

// True when every pack a kernel would load from (or store to) this tensor is aligned: the
// base pointer and the strides between rows (kRows) or between positions (channels last).
template <typename scalar_t, int kPack>
bool packs_aligned(const void* ptr, const RowStrides& strides, RowLayout layout) {
  const bool base = reinterpret_cast<std::uintptr_t>(ptr) % (sizeof(scalar_t) * kPack) == 0;
  const int64_t step = layout == RowLayout::kRows ? strides.channel : strides.position;
  return base && strides.batch % kPack == 0 && step % kPack == 0;
}

cudaLaunchConfig_t cluster_launch_config(dim3 grid, dim3 block, int cluster, cudaStream_t stream,
                                          cudaLaunchAttribute* attribute) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  attribute->id = cudaLaunchAttributeClusterDimension;
  attribute->val.clusterDim.x = static_cast<unsigned>(cluster);
  attribute->val.clusterDim.y = 1;
  attribute->val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  return config;
}

// Whether the current device can run `kernel` with `config`'s block and cluster shape (a
// small MIG slice may not). Asked once per (device, kernel, shape) from the occupancy
// calculator, which neither launches nor synchronises; so a launch inside CUDA graph
// capture (always after an eager warm-up call) never meets a refusal, which would
// invalidate the capture instead of falling back.
bool cluster_launchable(const void* kernel, const cudaLaunchConfig_t& config) {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  using Key = std::tuple<int, const void*, unsigned, unsigned, unsigned>;
  static std::mutex mutex;
  static std::map<Key, bool> known;
  const Key key{device, kernel, config.blockDim.x, config.blockDim.y,
                config.attrs[0].val.clusterDim.x};
  std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find(key);
  if (found != known.end()) return found->second;
  int active_clusters = 0;
  const bool launchable =
      cudaOccupancyMaxActiveClusters(&active_clusters, kernel, &config) == cudaSuccess &&
      active_clusters > 0;
  (void)cudaGetLastError();  // a refused query leaves an error behind: clear it
  known.emplace(key, launchable);
  return launchable;
}

// Launches a clustered kernel; false if the device cannot run the cluster shape, in which
// case the caller launches the unclustered kernel.
template <typename... KernelArgs, typename... Args>
bool launch_clustered(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, int cluster,
                      cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attribute[1];
  const cudaLaunchConfig_t config = cluster_launch_config(grid, block, cluster, stream, attribute);
  if (!cluster_launchable(reinterpret_cast<const void*>(kernel), config)) {
    return false;
  }
  if (cudaLaunchKernelEx(&config, kernel, args...) == cudaSuccess) return true;
  (void)cudaGetLastError();  // clear the refusal before the fallback launch
  return false;
}

template <typename scalar_t, int kPack>
void launch_forward_rows(const ForwardParams& p, cudaStream_t stream, const DeviceInfo& dev) {
  const RowsPlan plan =
      plan_forward_rows(p.batch * p.channels, p.positions, kPack, kLoadsPerRound<scalar_t, kPack>,
                        kMaxRowBlockThreads<scalar_t>, dev);
  const int64_t teams_per_block = plan.threads / plan.team;
  // Clusters (or blocks) in the grid times rows per block: the kernels' row step.
  const int64_t grid_units = plan.grid / plan.cluster;
  const RowStep step = make_row_step(grid_units * teams_per_block, p.channels);
  if (plan.cluster > 1 &&
      launch_clustered(entropy_fwd_rows_kernel<scalar_t, kPack, true>,
                       dim3(static_cast<unsigned>(plan.grid)), dim3(plan.threads), plan.cluster,
                       stream, p, plan.team, step)) {
    return;
  }
  entropy_fwd_rows_kernel<scalar_t, kPack, false>
      <<<static_cast<unsigned>(grid_units), plan.threads, 0, stream>>>(p, plan.team, step);
}

template <typename scalar_t, int kPack>
void launch_forward_channels_last(const ForwardParams& p, cudaStream_t stream,
                                  const DeviceInfo& dev) {
  const ChannelsLastPlan plan = plan_forward_channels_last(
      p.batch, p.channels, p.positions, kPack, kLoadsPerRound<scalar_t, kPack>, dev);
  const dim3 block(plan.width, plan.height);
  if (plan.cluster > 1 &&
      launch_clustered(entropy_fwd_channels_last_kernel<scalar_t, kPack, true>,
                       dim3(static_cast<unsigned>(plan.grid)), block, plan.cluster, stream, p,
                       plan.tiles_per_sample)) {
    return;
  }
  const int64_t grid = std::min(plan.grid / plan.cluster, kMaxGridX);
  entropy_fwd_channels_last_kernel<scalar_t, kPack, false>
      <<<static_cast<unsigned>(grid), block, 0, stream>>>(p, plan.tiles_per_sample);
}

template <typename scalar_t>
void launch_forward(const ForwardParams& p, cudaStream_t stream) {
  const DeviceInfo dev = current_device_info();
  if (p.layout == RowLayout::kRows) {
    // Rows start on a pack boundary only if the base does and L is a multiple of the pack.
    constexpr int kPack = kRowsPack<scalar_t>;
    if (packs_aligned<scalar_t, kPack>(p.x, p.x_strides, p.layout) && p.positions % kPack == 0) {
      launch_forward_rows<scalar_t, kPack>(p, stream, dev);
    } else {
      launch_forward_rows<scalar_t, 1>(p, stream, dev);
    }
  } else {
    constexpr int kPack = kChannelsLastPack<scalar_t>;
    if (packs_aligned<scalar_t, kPack>(p.x, p.x_strides, p.layout) && p.channels % kPack == 0) {
      launch_forward_channels_last<scalar_t, kPack>(p, stream, dev);
    } else {
      launch_forward_channels_last<scalar_t, 1>(p, stream, dev);
    }
  }
}

template <typename scalar_t, int kPack>
void launch_backward_rows(const BackwardParams& p, cudaStream_t stream) {
  const BackwardRowsPlan plan = plan_backward_rows(p.batch * p.channels, p.positions, kPack,
                                                   kLoadsPerRound<scalar_t, kPack>);
  const RowStep step = make_row_step(plan.grid * (plan.threads / plan.team), p.channels);
  entropy_bwd_rows_kernel<scalar_t, kPack><<<static_cast<unsigned>(plan.grid), plan.threads, 0,
                                             stream>>>(p, plan.team, plan.segments, step);
}

template <typename scalar_t, int kPack>
void launch_backward_channels_last(const BackwardParams& p, cudaStream_t stream) {
  constexpr int kLoads = kLoadsPerRound<scalar_t, kPack>;
  const ChannelsLastPlan plan = plan_channels_last(p.batch, p.channels, p.positions, kPack, kLoads);
  const int64_t chunk_positions =
      static_cast<int64_t>(plan.height) * kLoads * kBackwardRoundsPerItem;
  const int64_t items = p.batch * plan.tiles_per_sample * ceil_div(p.positions, chunk_positions);
  const int64_t grid = std::min(items, kMaxGridX);
  entropy_bwd_channels_last_kernel<scalar_t, kPack>
      <<<static_cast<unsigned>(grid), dim3(plan.width, plan.height), 0, stream>>>(
          p, plan.tiles_per_sample, chunk_positions);
}

template <typename scalar_t>
void launch_backward(const BackwardParams& p, cudaStream_t stream) {
  if (p.layout == RowLayout::kRows) {
    constexpr int kPack = kRowsPack<scalar_t>;
    if (packs_aligned<scalar_t, kPack>(p.x, p.x_strides, p.layout) &&
        packs_aligned<scalar_t, kPack>(p.grad_x, p.grad_x_strides, p.layout) &&
        p.positions % kPack == 0) {
      launch_backward_rows<scalar_t, kPack>(p, stream);
    } else {
      launch_backward_rows<scalar_t, 1>(p, stream);
    }
  } else {
    constexpr int kPack = kChannelsLastPack<scalar_t>;
    if (packs_aligned<scalar_t, kPack>(p.x, p.x_strides, p.layout) &&
        packs_aligned<scalar_t, kPack>(p.grad_x, p.grad_x_strides, p.layout) &&
        p.channels % kPack == 0) {
      launch_backward_channels_last<scalar_t, kPack>(p, stream);
    } else {
      launch_backward_channels_last<scalar_t, 1>(p, stream);
    }
  }
}

void check_launch(const char* which) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("sparsity_ext: CUDA launch of the ") + which +
                             " kernel failed: " + cudaGetErrorString(err));
  }
}

}  // namespace

void channel_stats_forward_cuda(const ForwardParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case ScalarKind::kFloat16: launch_forward<__half>(p, stream); break;
    case ScalarKind::kBFloat16: launch_forward<__nv_bfloat16>(p, stream); break;
    case ScalarKind::kFloat32: launch_forward<float>(p, stream); break;
    case ScalarKind::kFloat64: launch_forward<double>(p, stream); break;
  }
  check_launch("forward");
}

void channel_stats_backward_cuda(const BackwardParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case ScalarKind::kFloat16: launch_backward<__half>(p, stream); break;
    case ScalarKind::kBFloat16: launch_backward<__nv_bfloat16>(p, stream); break;
    case ScalarKind::kFloat32: launch_backward<float>(p, stream); break;
    case ScalarKind::kFloat64: launch_backward<double>(p, stream); break;
  }
  check_launch("backward");
}

}  // namespace sparsity_ext
