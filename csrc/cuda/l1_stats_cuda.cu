// CUDA kernels of l1_stats (the L1 measure of l1_state.h) and of its one-pass backward.
// No torch headers: register_cuda.cpp hands over L1ForwardParams / L1BackwardParams.
//
// Deliberately simple (one element per load, no vector loads or clusters), so that it is
// plainly correct; the math lives in l1_state.h, shared with the CPU kernel.
//
// Forward work mapping (rows = N * C, L positions per row):
//   * Unit-stride positions, L <= kWarpRowMax: one warp per row, lanes stride over the
//     positions, merged by a shuffle-down tree.
//   * Unit-stride positions, longer rows: one block per row; a shuffle tree per warp, then
//     thread 0 merges the warps in order.
//   * Unit-stride channels: a 32 x 8 block per (sample, 32 channels); threadIdx.x is the
//     channel (coalesced loads), threadIdx.y splits the positions, and thread y == 0
//     merges the 8 partial states in order.
// Every merge runs in a fixed order for a given shape: bitwise reproducible, no atomics.
// Backward (elementwise): one warp per (row, segment of positions), or one 32 x 8 block per
// (sample, 32 channels, chunk of positions) for channels last; every thread computes the
// coefficient of its row itself from row_stats and the three grads.
#include "l1_stats_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../l1_state.h"

namespace sparsity_ext {
namespace {

constexpr int kWarp = 32;
constexpr int kBlockThreads = 256;             // 1-D blocks: 8 warps
constexpr int64_t kWarpRowMax = 4096;          // longer unit-stride rows take a block each
constexpr int kTileY = kBlockThreads / kWarp;  // channels last: 32 channels x 8 position lanes
constexpr int64_t kBackwardSegment = 32 * kWarp;  // positions per backward warp item
constexpr int64_t kBackwardChunk = 64 * kTileY;   // positions per channels-last backward block
constexpr int64_t kMaxGrid = int64_t(1) << 20;    // kernels grid-stride beyond this many blocks

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

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(acc_type<scalar_t> v);
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }

// Lane 0 ends with the sum of the warp's 32 states; every lane must call it.
template <typename acc_t>
__device__ __forceinline__ void warp_reduce(L1State<acc_t>& s) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    s.sum += __shfl_down_sync(0xffffffffu, s.sum, offset);
    s.xlogx += __shfl_down_sync(0xffffffffu, s.xlogx, offset);
    s.total += __shfl_down_sync(0xffffffffu, s.total, offset);
    s.nonpositive += __shfl_down_sync(0xffffffffu, s.nonpositive, offset);
  }
}

// Writes row `row` (= n * C + c) of the three outputs and of row_stats.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
__device__ __forceinline__ void store_row(const L1ForwardParams& p, int64_t row,
                                          const L1State<acc_t>& s, acc_t log_positions) {
  const L1RowResult<acc_t> r = l1_finalize(s.sum, s.xlogx, p.positions, log_positions);
  const int64_t rows = p.batch * p.channels;
  static_cast<scalar_t*>(p.entropy)[row] = from_acc<scalar_t>(r.entropy);
  static_cast<scalar_t*>(p.perplexity)[row] = from_acc<scalar_t>(r.perplexity);
  static_cast<scalar_t*>(p.sparsity)[row] = from_acc<scalar_t>(r.sparsity);
  acc_t* stats = static_cast<acc_t*>(p.row_stats);
  stats[kL1Sum * rows + row] = s.sum;
  stats[kL1MeanLog * rows + row] = r.mean_log;
  stats[kL1NonPositive * rows + row] = static_cast<acc_t>(s.nonpositive);
  stats[kL1Total * rows + row] = s.total;
}

template <typename scalar_t>
__device__ __forceinline__ const scalar_t* row_start(const scalar_t* x, const RowStrides& xs,
                                                     int64_t row, int64_t channels) {
  return x + (row / channels) * xs.batch + (row % channels) * xs.channel;
}

// --- forward ---------------------------------------------------------------------------

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    l1_fwd_warp_per_row_kernel(const L1ForwardParams p, acc_type<scalar_t> log_positions) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const int64_t rows = p.batch * p.channels;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_block = blockDim.x / kWarp;
  // The row depends on the warp only, so every lane of a warp runs the same iterations.
  for (int64_t row = blockIdx.x * warps_per_block + threadIdx.x / kWarp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * warps_per_block) {
    const scalar_t* xr = row_start(x, p.x_strides, row, p.channels);
    L1State<acc_t> s = L1State<acc_t>::empty();
    for (int64_t i = lane; i < p.positions; i += kWarp) s.add(to_acc(xr[i]));
    warp_reduce(s);
    if (lane == 0) store_row<scalar_t>(p, row, s, log_positions);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    l1_fwd_block_per_row_kernel(const L1ForwardParams p, acc_type<scalar_t> log_positions) {
  using acc_t = acc_type<scalar_t>;
  __shared__ L1State<acc_t> warp_states[kBlockThreads / kWarp];
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const int64_t rows = p.batch * p.channels;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const scalar_t* xr = row_start(x, p.x_strides, row, p.channels);
    L1State<acc_t> s = L1State<acc_t>::empty();
    for (int64_t i = threadIdx.x; i < p.positions; i += blockDim.x) s.add(to_acc(xr[i]));
    warp_reduce(s);
    if (lane == 0) warp_states[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < static_cast<int>(blockDim.x / kWarp); ++w) s.merge(warp_states[w]);
      store_row<scalar_t>(p, row, s, log_positions);
    }
    __syncthreads();  // warp_states is reused by the next row
  }
}

// Block (kWarp, kTileY); `tiles` = ceil(C / kWarp) channel tiles per sample.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    l1_fwd_channels_last_kernel(const L1ForwardParams p, acc_type<scalar_t> log_positions,
                                int64_t tiles) {
  using acc_t = acc_type<scalar_t>;
  __shared__ L1State<acc_t> partial[kTileY][kWarp];
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const RowStrides& xs = p.x_strides;
  for (int64_t item = blockIdx.x; item < p.batch * tiles; item += gridDim.x) {
    const int64_t n = item / tiles, c = (item % tiles) * kWarp + threadIdx.x;
    L1State<acc_t> s = L1State<acc_t>::empty();
    if (c < p.channels) {
      const scalar_t* column = x + n * xs.batch + c * xs.channel;
      for (int64_t i = threadIdx.y; i < p.positions; i += kTileY) {
        s.add(to_acc(column[i * xs.position]));
      }
    }
    partial[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < p.channels) {
      for (int y = 1; y < kTileY; ++y) s.merge(partial[y][threadIdx.x]);
      store_row<scalar_t>(p, n * p.channels + c, s, log_positions);
    }
    __syncthreads();  // partial is reused by the next item
  }
}

// --- backward --------------------------------------------------------------------------

template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
__device__ __forceinline__ acc_t row_coefficient(const L1BackwardParams& p, int64_t n,
                                                 int64_t c) {
  const acc_t* stats = static_cast<const acc_t*>(p.row_stats);
  const int64_t rows = p.batch * p.channels, row = n * p.channels + c;
  const void* grads[3] = {p.grad_entropy, p.grad_perplexity, p.grad_sparsity};
  acc_t g[3];
#pragma unroll
  for (int k = 0; k < 3; ++k) {  // unrolled: the arrays stay in registers
    const int64_t at = n * p.grad_strides[k][0] + c * p.grad_strides[k][1];
    g[k] = to_acc(static_cast<const scalar_t*>(grads[k])[at]);
  }
  return l1_backward_coefficient<acc_t>(stats[kL1Sum * rows + row], stats[kL1MeanLog * rows + row],
                                        g[0], g[1], g[2], p.positions);
}

// One warp per (row, segment of kBackwardSegment positions).
template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    l1_bwd_rows_kernel(const L1BackwardParams p, int64_t segments) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  scalar_t* grad_x = static_cast<scalar_t*>(p.grad_x);
  const acc_t* stats = static_cast<const acc_t*>(p.row_stats);
  const int64_t rows = p.batch * p.channels;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_block = blockDim.x / kWarp;
  for (int64_t item = blockIdx.x * warps_per_block + threadIdx.x / kWarp; item < rows * segments;
       item += static_cast<int64_t>(gridDim.x) * warps_per_block) {
    const int64_t row = item / segments, n = row / p.channels, c = row % p.channels;
    const int64_t begin = (item % segments) * kBackwardSegment;
    const int64_t end = begin + kBackwardSegment < p.positions ? begin + kBackwardSegment
                                                                : p.positions;
    const acc_t coef = row_coefficient<scalar_t>(p, n, c);
    const acc_t mean_log = stats[kL1MeanLog * rows + row];
    const scalar_t* xr = x + n * p.x_strides.batch + c * p.x_strides.channel;
    scalar_t* gr = grad_x + n * p.grad_x_strides.batch + c * p.grad_x_strides.channel;
    for (int64_t i = begin + lane; i < end; i += kWarp) {
      gr[i] = from_acc<scalar_t>(l1_grad_element(to_acc(xr[i]), mean_log, coef));
    }
  }
}

// Block (kWarp, kTileY) per (sample, 32 channels, chunk of kBackwardChunk positions).
template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    l1_bwd_channels_last_kernel(const L1BackwardParams p, int64_t tiles, int64_t chunks) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  scalar_t* grad_x = static_cast<scalar_t*>(p.grad_x);
  const acc_t* stats = static_cast<const acc_t*>(p.row_stats);
  const int64_t rows = p.batch * p.channels;
  for (int64_t item = blockIdx.x; item < p.batch * tiles * chunks; item += gridDim.x) {
    const int64_t n = item / (tiles * chunks);
    const int64_t c = ((item / chunks) % tiles) * kWarp + threadIdx.x;
    if (c >= p.channels) continue;  // no barrier in this kernel: idle lanes may leave
    const int64_t begin = (item % chunks) * kBackwardChunk;
    const int64_t end = begin + kBackwardChunk < p.positions ? begin + kBackwardChunk
                                                              : p.positions;
    const acc_t coef = row_coefficient<scalar_t>(p, n, c);
    const acc_t mean_log = stats[kL1MeanLog * rows + n * p.channels + c];
    const scalar_t* column = x + n * p.x_strides.batch + c * p.x_strides.channel;
    scalar_t* grad_column = grad_x + n * p.grad_x_strides.batch + c * p.grad_x_strides.channel;
    for (int64_t i = begin + threadIdx.y; i < end; i += kTileY) {
      grad_column[i * p.grad_x_strides.position] = from_acc<scalar_t>(
          l1_grad_element(to_acc(column[i * p.x_strides.position]), mean_log, coef));
    }
  }
}

// --- host launchers --------------------------------------------------------------------

unsigned grid_for(int64_t blocks) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, kMaxGrid)));
}

void check_launch(const char* which) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("sparsity_ext: CUDA launch of the l1_stats ") + which +
                             " kernel failed: " + cudaGetErrorString(err));
  }
}

template <typename scalar_t>
void launch_forward(const L1ForwardParams& p, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  // Computed once on the host, as the CPU kernel does: a dead row's entropy has the same
  // bits on every backend.
  const acc_t log_positions = std::log(static_cast<acc_t>(p.positions));
  const int64_t rows = p.batch * p.channels;
  if (p.layout == RowLayout::kChannelsLast) {
    const int64_t tiles = (p.channels + kWarp - 1) / kWarp;
    l1_fwd_channels_last_kernel<scalar_t><<<grid_for(p.batch * tiles), dim3(kWarp, kTileY), 0,
                                            stream>>>(p, log_positions, tiles);
  } else if (p.positions <= kWarpRowMax) {
    const int64_t warps_per_block = kBlockThreads / kWarp;
    l1_fwd_warp_per_row_kernel<scalar_t>
        <<<grid_for((rows + warps_per_block - 1) / warps_per_block), kBlockThreads, 0, stream>>>(
            p, log_positions);
  } else {
    l1_fwd_block_per_row_kernel<scalar_t><<<grid_for(rows), kBlockThreads, 0, stream>>>(
        p, log_positions);
  }
}

template <typename scalar_t>
void launch_backward(const L1BackwardParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.channels;
  if (p.layout == RowLayout::kChannelsLast) {
    const int64_t tiles = (p.channels + kWarp - 1) / kWarp;
    const int64_t chunks = (p.positions + kBackwardChunk - 1) / kBackwardChunk;
    l1_bwd_channels_last_kernel<scalar_t>
        <<<grid_for(p.batch * tiles * chunks), dim3(kWarp, kTileY), 0, stream>>>(p, tiles, chunks);
  } else {
    const int64_t segments = (p.positions + kBackwardSegment - 1) / kBackwardSegment;
    const int64_t warps_per_block = kBlockThreads / kWarp;
    l1_bwd_rows_kernel<scalar_t>
        <<<grid_for((rows * segments + warps_per_block - 1) / warps_per_block), kBlockThreads, 0,
           stream>>>(p, segments);
  }
}

template <template <typename> class Launch, typename Params>
void dispatch(const Params& p, cudaStream_t stream) {
  switch (p.dtype) {
    case ScalarKind::kFloat16: return Launch<__half>::run(p, stream);
    case ScalarKind::kBFloat16: return Launch<__nv_bfloat16>::run(p, stream);
    case ScalarKind::kFloat32: return Launch<float>::run(p, stream);
    case ScalarKind::kFloat64: return Launch<double>::run(p, stream);
  }
}

template <typename scalar_t>
struct Forward {
  static void run(const L1ForwardParams& p, cudaStream_t stream) {
    launch_forward<scalar_t>(p, stream);
  }
};

template <typename scalar_t>
struct Backward {
  static void run(const L1BackwardParams& p, cudaStream_t stream) {
    launch_backward<scalar_t>(p, stream);
  }
};

}  // namespace

void l1_stats_forward_cuda(const L1ForwardParams& p, cudaStream_t stream) {
  dispatch<Forward>(p, stream);
  check_launch("forward");
}

void l1_stats_backward_cuda(const L1BackwardParams& p, cudaStream_t stream) {
  dispatch<Backward>(p, stream);
  check_launch("backward");
}

}  // namespace sparsity_ext
