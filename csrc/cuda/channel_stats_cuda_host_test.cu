// Host-side checks of channel_stats_cuda.cu that need no GPU. The kernels' per-thread code
// (the __host__ __device__ accumulation and backward thread functions) and launch plans
// run thread by thread over the planned grids, with the kernels' merge orders emulated
// (team shuffle trees, block and cluster merges), against a float64 two-pass reference:
// every element visited once, strides, grid-stride loops, the non-finite rules.
//
// Built and run by tests/test_cuda.py::test_kernel_thread_logic_on_the_host whenever nvcc
// is found:  nvcc -std=c++17 -arch=sm_80 channel_stats_cuda_host_test.cu && ./a.out
#include "channel_stats_cuda.cu"

#include <cstdio>
#include <random>
#include <vector>

using namespace sparsity_ext;

namespace {

int failures = 0;

#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond)) {                                         \
      if (++failures <= 30) {                              \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__);   \
        std::printf(__VA_ARGS__);                          \
        std::printf("\n");                                 \
      }                                                    \
    }                                                      \
  } while (0)

constexpr double kLowest = -1.7976931348623157e308;  // reference.py clamps shifts to this

struct Reference {
  double entropy, perplexity, sparsity, max, log_sum, mean_shift;
};

// reference.py in double: two passes, -inf masked, NaN or +inf poison the row.
Reference reference(const std::vector<double>& row) {
  const double length = static_cast<double>(row.size());
  double m = -INFINITY;
  bool has_nan = false;
  for (double v : row) {
    has_nan = has_nan || v != v;
    m = std::max(m, v);
  }
  if (has_nan) m = NAN;
  double s = 0, t = 0;
  for (double v : row) {
    const double d = std::max(v - m, kLowest);  // NaN stays NaN (std::max keeps the first)
    const double e = std::exp(d);
    s += e;
    t += d == kLowest ? 0.0 : d * e;
  }
  Reference r;
  r.max = m;
  r.log_sum = std::log(s);
  r.mean_shift = t / s;
  r.entropy = r.log_sum - r.mean_shift;
  r.perplexity = std::exp(r.entropy);
  r.sparsity = length > 1 ? (length - r.perplexity) / (length - 1) : r.perplexity * 0;
  return r;
}

bool close(double got, double want, double rtol, double atol) {
  if (got != got || want != want) return got != got && want != want;
  if (std::isinf(got) || std::isinf(want)) return got == want;
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

template <typename scalar_t>
scalar_t from_double(double v) {
  return from_acc<scalar_t>(static_cast<acc_type<scalar_t>>(v));
}

// team_reduce, lane by lane: butterfly max, each lane rescaled to it, shfl_down tree of
// sums (a lane past the end of the tree reads its own value, as __shfl_down_sync does).
template <typename acc_t>
EntropyState<acc_t> emulate_team_reduce(std::vector<EntropyState<acc_t>> lanes) {
  const int width = static_cast<int>(lanes.size());
  std::vector<acc_t> team_max(width), sum(width), shifted(width);
  for (int lane = 0; lane < width; ++lane) team_max[lane] = lanes[lane].max;
  for (int mask = width / 2; mask > 0; mask /= 2) {
    std::vector<acc_t> next = team_max;
    for (int lane = 0; lane < width; ++lane) {
      next[lane] = max_keep_nan(team_max[lane], team_max[lane ^ mask]);
    }
    team_max = next;
  }
  for (int lane = 0; lane < width; ++lane) {
    lanes[lane].rescale_to(team_max[lane], sum[lane], shifted[lane]);
  }
  for (int offset = width / 2; offset > 0; offset /= 2) {
    std::vector<acc_t> next_sum = sum, next_shifted = shifted;
    for (int lane = 0; lane < width; ++lane) {
      const int source = lane + offset < width ? lane + offset : lane;
      next_sum[lane] = sum[lane] + sum[source];
      next_shifted[lane] = shifted[lane] + shifted[source];
    }
    sum = next_sum;
    shifted = next_shifted;
  }
  return {team_max[0], sum[0], shifted[0]};
}

// The channels-last kernel's tree over threadIdx.y in shared memory.
template <typename acc_t>
EntropyState<acc_t> emulate_y_tree(std::vector<EntropyState<acc_t>> states) {
  for (int half = static_cast<int>(states.size()) / 2; half > 0; half /= 2) {
    for (int y = 0; y < half; ++y) states[y].merge(states[y + half]);
  }
  return states[0];
}

// entropy_fwd_rows_kernel on one row: the planned team, block and cluster.
template <typename scalar_t, int kPack>
EntropyState<acc_type<scalar_t>> emulate_row(const scalar_t* row, int64_t positions,
                                             const RowsPlan& plan) {
  using acc_t = acc_type<scalar_t>;
  const int64_t packs = positions / kPack;
  EntropyState<acc_t> total = empty_state<acc_t>();
  for (int rank = 0; rank < plan.cluster; ++rank) {
    const int64_t begin = packs * rank / plan.cluster;
    const int64_t end = packs * (rank + 1) / plan.cluster;
    std::vector<EntropyState<acc_t>> lanes(plan.team, empty_state<acc_t>());
    for (int lane = 0; lane < plan.team; ++lane) {
      accumulate_row_slice<kPack>(row, begin, end, lane, plan.team, lanes[lane]);
    }
    EntropyState<acc_t> block;
    if (plan.team <= 32) {
      block = emulate_team_reduce(lanes);
    } else {  // block_reduce: each warp, then warp 0 over the warps' states
      std::vector<EntropyState<acc_t>> warps(32, empty_state<acc_t>());
      for (int w = 0; w < plan.team / 32; ++w) {
        warps[w] = emulate_team_reduce(std::vector<EntropyState<acc_t>>(
            lanes.begin() + 32 * w, lanes.begin() + 32 * (w + 1)));
      }
      block = emulate_team_reduce(warps);
    }
    if (rank == 0) {
      total = block;
    } else {
      total.merge(block);  // cluster_reduce: rank 0 merges ranks 1, 2, ... in order
    }
  }
  return total;
}

// Dense rows, each with a finite pattern or (fill_kind 1) a non-finite one.
template <typename scalar_t, int kPack>
void check_rows_forward(const char* name, int64_t rows, int64_t positions, int fill_kind,
                        const DeviceInfo& dev, double rtol) {
  using acc_t = acc_type<scalar_t>;
  std::mt19937 gen(1234 + static_cast<unsigned>(positions));
  std::normal_distribution<double> normal(0.0, 2.0);
  std::vector<scalar_t> x(rows * positions);
  for (auto& v : x) v = from_double<scalar_t>(normal(gen));
  const scalar_t minus_inf = from_double<scalar_t>(-INFINITY);
  for (int64_t r = 0; fill_kind == 1 && r < rows; ++r) {
    scalar_t* row = x.data() + r * positions;
    switch (r % 8) {
      case 0: row[positions / 2] = minus_inf; break;                      // one masked
      case 1: row[positions - 1] = from_double<scalar_t>(NAN); break;     // NaN
      case 2: row[0] = from_double<scalar_t>(INFINITY); break;            // +inf: NaN
      case 3: std::fill(row, row + positions, minus_inf); break;          // all masked: NaN
      case 4:                                                             // one-hot
        std::fill(row, row + positions, minus_inf);
        row[positions / 3] = from_double<scalar_t>(5.0);
        break;
      case 5:                                                             // far from zero
        for (int64_t i = 0; i < positions; ++i) {
          row[i] = from_double<scalar_t>(1e4 + 0.1 * normal(gen));
        }
        break;
      case 6:                                                             // masked + NaN
        std::fill(row, row + positions, minus_inf);
        row[positions / 2] = from_double<scalar_t>(NAN);
        break;
      case 7:                                 // NaN among masked, a finite value later: NaN
        std::fill(row, row + positions, minus_inf);
        row[0] = from_double<scalar_t>(NAN);
        row[positions - 1] = from_double<scalar_t>(1.0);
        break;
    }
  }
  const RowsPlan plan = plan_forward_rows(rows, positions, kPack, kLoadsPerRound<scalar_t, kPack>,
                                          kMaxRowBlockThreads<scalar_t>, dev);
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = x.data() + r * positions;
    const RowResult<acc_t> got =
        finalize(emulate_row<scalar_t, kPack>(row, positions, plan), positions);
    std::vector<double> values(positions);
    for (int64_t i = 0; i < positions; ++i) values[i] = to_acc(row[i]);
    const Reference want = reference(values);
    CHECK(close(got.entropy, want.entropy, rtol, rtol) &&
              close(got.perplexity, want.perplexity, rtol, rtol) &&
              close(got.sparsity, want.sparsity, rtol, rtol),
          "%s rows=%ld L=%ld kind=%d row %ld (team %d, threads %d, cluster %d): "
          "H PP SP %g %g %g, want %g %g %g",
          name, (long)rows, (long)positions, fill_kind, (long)r, plan.team, plan.threads,
          plan.cluster, (double)got.entropy, (double)got.perplexity, (double)got.sparsity,
          want.entropy, want.perplexity, want.sparsity);
    if (want.entropy == want.entropy) {
      CHECK(got.max == want.max, "%s max %g, want %g", name, (double)got.max, want.max);
    }
  }
}

// Strided rows, channel stride `channel_stride` and batch stride `batch_stride` (0: an
// expanded batch), walked as the rows kernel walks them (RowCursor) with `grid_units`
// blocks or clusters: each row exactly once.
template <typename scalar_t, int kPack>
void check_strided_rows_forward(const char* name, int64_t batch, int64_t channels,
                                int64_t positions, int64_t channel_stride, int64_t batch_stride,
                                int64_t grid_units) {
  using acc_t = acc_type<scalar_t>;
  std::mt19937 gen(5);
  std::normal_distribution<double> normal(0.0, 2.0);
  const int64_t rows = batch * channels;
  std::vector<scalar_t> x(batch_stride * (batch - 1) + channel_stride * (channels - 1) +
                          positions);
  for (auto& v : x) v = from_double<scalar_t>(normal(gen));
  const RowsPlan plan = plan_forward_rows(rows, positions, kPack,
                                          kLoadsPerRound<scalar_t, kPack>, 1024, {132, true});
  const int64_t teams_per_block = plan.threads / plan.team;
  const RowStep step = make_row_step(grid_units * teams_per_block, channels);
  std::vector<int> visits(rows, 0);
  for (int64_t unit = 0; unit < grid_units; ++unit) {
    for (int team_index = 0; team_index < teams_per_block; ++team_index) {
      const int64_t first_row = unit * teams_per_block;
      RowCursor cursor(first_row + team_index, channels);
      for (int64_t team_row = first_row; team_row < rows;
           team_row += step.rows, cursor.advance(step, channels)) {
        const int64_t row = team_row + team_index;
        if (row >= rows) continue;
        CHECK(cursor.n * channels + cursor.c == row, "cursor at (%ld, %ld) for row %ld",
              (long)cursor.n, (long)cursor.c, (long)row);
        ++visits[row];
        const scalar_t* start = x.data() + cursor.n * batch_stride + cursor.c * channel_stride;
        const RowResult<acc_t> got =
            finalize(emulate_row<scalar_t, kPack>(start, positions, plan), positions);
        std::vector<double> values(positions);
        for (int64_t i = 0; i < positions; ++i) values[i] = to_acc(start[i]);
        const Reference want = reference(values);
        CHECK(close(got.entropy, want.entropy, 1e-4, 1e-4), "%s strided row %ld: H %g, want %g",
              name, (long)row, (double)got.entropy, want.entropy);
      }
    }
  }
  for (int v : visits) CHECK(v == 1, "%s strided rows: a row visited %d times", name, v);
}

// entropy_fwd_channels_last_kernel over (N, L, C) stored with `extra_channels` more
// channels per position (a position stride > C, as for a channel slice).
template <typename scalar_t, int kPack>
void check_channels_last_forward(const char* name, int64_t batch, int64_t channels,
                                 int64_t positions, const DeviceInfo& dev, double rtol,
                                 int64_t extra_channels = 0) {
  using acc_t = acc_type<scalar_t>;
  const int64_t position_stride = channels + extra_channels;
  std::mt19937 gen(99 + static_cast<unsigned>(channels));
  std::normal_distribution<double> normal(0.0, 2.0);
  std::vector<scalar_t> x(batch * positions * position_stride);
  for (auto& v : x) v = from_double<scalar_t>(normal(gen));
  x[5 * channels % x.size()] = from_double<scalar_t>(-INFINITY);
  const ChannelsLastPlan plan = plan_forward_channels_last(
      batch, channels, positions, kPack, kLoadsPerRound<scalar_t, kPack>, dev);
  const int64_t channel_packs = channels / kPack;
  std::vector<int> visits(batch * channels, 0);
  for (int64_t tile = 0; tile < batch * plan.tiles_per_sample; ++tile) {
    const int64_t n = tile / plan.tiles_per_sample;
    for (int tx = 0; tx < plan.width; ++tx) {
      const int64_t pack_index = (tile - n * plan.tiles_per_sample) * plan.width + tx;
      if (pack_index >= channel_packs) continue;
      const scalar_t* column = x.data() + n * positions * position_stride + pack_index * kPack;
      EntropyState<acc_t> total[kPack];
      for (int rank = 0; rank < plan.cluster; ++rank) {
        const int64_t begin = positions * rank / plan.cluster;
        const int64_t end = positions * (rank + 1) / plan.cluster;
        std::vector<std::vector<EntropyState<acc_t>>> per_channel(kPack);
        for (int ty = 0; ty < plan.height; ++ty) {
          EntropyState<acc_t> states[kPack];
          for (auto& s : states) s = empty_state<acc_t>();
          accumulate_channel_pack<kPack>(column, position_stride, begin + ty, end, plan.height,
                                         states);
          for (int k = 0; k < kPack; ++k) per_channel[k].push_back(states[k]);
        }
        for (int k = 0; k < kPack; ++k) {
          const EntropyState<acc_t> block = emulate_y_tree(per_channel[k]);
          if (rank == 0) {
            total[k] = block;
          } else {
            total[k].merge(block);
          }
        }
      }
      for (int k = 0; k < kPack; ++k) {
        const int64_t c = pack_index * kPack + k;
        ++visits[n * channels + c];
        std::vector<double> values(positions);
        for (int64_t l = 0; l < positions; ++l) {
          values[l] = to_acc(x[(n * positions + l) * position_stride + c]);
        }
        const Reference want = reference(values);
        const RowResult<acc_t> got = finalize(total[k], positions);
        CHECK(close(got.entropy, want.entropy, rtol, rtol) &&
                  close(got.sparsity, want.sparsity, rtol, rtol),
              "%s channels last N=%ld C=%ld L=%ld (n %ld, c %ld; block %dx%d, cluster %d): "
              "H %g, want %g",
              name, (long)batch, (long)channels, (long)positions, (long)n, (long)c, plan.width,
              plan.height, plan.cluster, (double)got.entropy, want.entropy);
      }
    }
  }
  for (int v : visits) CHECK(v == 1, "%s channels last: a row visited %d times", name, v);
}

// The backward thread functions over the planned grid (capped at `grid_cap` blocks to
// exercise the grid-stride loops), x every other sample of a twice larger batch, grad_x
// dense, grad_perplexity expanded (strides 0) and grad_sparsity broadcast over the batch.
template <typename scalar_t, int kPack>
void check_backward(const char* name, int64_t batch, int64_t channels, int64_t positions,
                    RowLayout layout, int64_t grid_cap, double rtol) {
  using acc_t = acc_type<scalar_t>;
  std::mt19937 gen(7 + static_cast<unsigned>(positions));
  std::normal_distribution<double> normal(0.0, 1.5);
  const int64_t rows = batch * channels, sample = channels * positions;
  const bool by_rows = layout == RowLayout::kRows;
  auto x_at = [&](int64_t n, int64_t c, int64_t l) {
    return n * 2 * sample + (by_rows ? c * positions + l : l * channels + c);
  };
  auto grad_at = [&](int64_t n, int64_t c, int64_t l) {
    return n * sample + (by_rows ? c * positions + l : l * channels + c);
  };
  std::vector<scalar_t> x(2 * rows * positions);
  for (auto& v : x) v = from_double<scalar_t>(normal(gen));
  x[x_at(batch / 2, channels / 2, positions / 2)] = from_double<scalar_t>(-INFINITY);
  std::vector<scalar_t> grad_entropy(rows), grad_perplexity(1), grad_sparsity(channels);
  for (auto& v : grad_entropy) v = from_double<scalar_t>(normal(gen));
  for (auto& v : grad_sparsity) v = from_double<scalar_t>(normal(gen));
  grad_perplexity[0] = from_double<scalar_t>(0.3);
  std::vector<acc_t> stats(3 * rows);
  std::vector<Reference> refs(rows);
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t c = 0; c < channels; ++c) {
      std::vector<double> values(positions);
      for (int64_t l = 0; l < positions; ++l) values[l] = to_acc(x[x_at(n, c, l)]);
      const Reference r = refs[n * channels + c] = reference(values);
      stats[n * channels + c] = static_cast<acc_t>(r.max);
      stats[rows + n * channels + c] = static_cast<acc_t>(r.log_sum);
      stats[2 * rows + n * channels + c] = static_cast<acc_t>(r.mean_shift);
    }
  }
  std::vector<scalar_t> grad(rows * positions, from_double<scalar_t>(12345.0));
  BackwardParams p{};
  p.x = x.data();
  p.row_stats = stats.data();
  p.grad_entropy = grad_entropy.data();
  p.grad_perplexity = grad_perplexity.data();
  p.grad_sparsity = grad_sparsity.data();
  const int64_t grad_strides[3][2] = {{channels, 1}, {0, 0}, {0, 1}};
  std::memcpy(p.grad_strides, grad_strides, sizeof(grad_strides));
  p.grad_x = grad.data();
  p.batch = batch;
  p.channels = channels;
  p.positions = positions;
  p.layout = layout;
  p.x_strides = by_rows ? RowStrides{2 * sample, positions, 1}
                        : RowStrides{2 * sample, 1, channels};
  p.grad_x_strides = by_rows ? RowStrides{sample, positions, 1}
                             : RowStrides{sample, 1, channels};
  constexpr int kLoads = kLoadsPerRound<scalar_t, kPack>;
  if (by_rows) {
    BackwardRowsPlan plan = plan_backward_rows(rows, positions, kPack, kLoads);
    plan.grid = std::min(plan.grid, grid_cap);
    const RowStep step = make_row_step(plan.grid * (plan.threads / plan.team), channels);
    for (int64_t b = 0; b < plan.grid; ++b) {
      for (int t = 0; t < plan.threads; ++t) {
        backward_rows_thread<scalar_t, kPack>(p, plan.team, plan.segments, step,
                                              GridCoords{t, 0, plan.threads, 1, b, plan.grid});
      }
    }
  } else {
    const ChannelsLastPlan plan = plan_channels_last(batch, channels, positions, kPack, kLoads);
    const int64_t chunk_positions =
        static_cast<int64_t>(plan.height) * kLoads * kBackwardRoundsPerItem;
    const int64_t grid = std::min(
        batch * plan.tiles_per_sample * ceil_div(positions, chunk_positions), grid_cap);
    for (int64_t b = 0; b < grid; ++b) {
      for (int ty = 0; ty < plan.height; ++ty) {
        for (int tx = 0; tx < plan.width; ++tx) {
          backward_channels_last_thread<scalar_t, kPack>(
              p, plan.tiles_per_sample, chunk_positions,
              GridCoords{tx, ty, plan.width, plan.height, b, grid});
        }
      }
    }
  }
  int bad = 0;
  const double length = static_cast<double>(positions);
  for (int64_t n = 0; n < batch; ++n) {
    for (int64_t c = 0; c < channels; ++c) {
      const Reference& r = refs[n * channels + c];
      const double coef = -(to_acc(grad_entropy[n * channels + c]) +
                            r.perplexity * to_acc(grad_perplexity[0]) -
                            (positions > 1 ? r.perplexity * to_acc(grad_sparsity[c]) /
                                                 (length - 1)
                                           : 0.0));
      for (int64_t l = 0; l < positions; ++l) {
        const double xv = to_acc(x[x_at(n, c, l)]);
        const double want =
            coef * std::exp(xv - r.max - r.log_sum) * (xv - r.max - r.mean_shift);
        const double got = to_acc(grad[grad_at(n, c, l)]);
        // Masked positions of a finite row get exactly 0; a NaN row gets NaN everywhere.
        const bool masked = xv == -INFINITY && r.entropy == r.entropy;
        if ((masked ? got != 0.0 : !close(got, want, rtol, rtol * 1e-2)) && ++bad <= 3) {
          std::printf("  at (%ld, %ld, %ld): %g, want %g\n", (long)n, (long)c, (long)l, got,
                      want);
        }
      }
    }
  }
  CHECK(bad == 0, "%s backward %s N=%ld C=%ld L=%ld grid cap %ld: %d elements off", name,
        by_rows ? "rows" : "channels last", (long)batch, (long)channels, (long)positions,
        (long)grid_cap, bad);
}

template <typename scalar_t>
void check_dtype(const char* name, double rtol) {
  constexpr int kPack = kRowsPack<scalar_t>;
  constexpr int kClPack = kChannelsLastPack<scalar_t>;
  const DeviceInfo h100{132, true}, a100{108, false};
  for (const DeviceInfo& dev : {h100, a100}) {
    for (int kind : {0, 1}) {
      check_rows_forward<scalar_t, 1>(name, 16, 49, kind, dev, rtol);
      check_rows_forward<scalar_t, 1>(name, 8, 1, kind, dev, rtol);
      check_rows_forward<scalar_t, 1>(name, 8, 2, kind, dev, rtol);
      check_rows_forward<scalar_t, 1>(name, 8, 1000, kind, dev, rtol);
      check_rows_forward<scalar_t, 1>(name, 8, 3001, kind, dev, rtol);
      check_rows_forward<scalar_t, kPack>(name, 8, 784, kind, dev, rtol);
      check_rows_forward<scalar_t, kPack>(name, 8, 16 * 40, kind, dev, rtol);
      check_rows_forward<scalar_t, kPack>(name, 8, 3136, kind, dev, rtol);
      check_rows_forward<scalar_t, kPack>(name, 8, kPack, kind, dev, rtol);
      check_rows_forward<scalar_t, 1>(name, 8, 300001, kind, dev, rtol);
      check_rows_forward<scalar_t, kPack>(name, 2, 300000, kind, dev, rtol);
    }
    check_channels_last_forward<scalar_t, kClPack>(name, 2, 64, 49, dev, rtol);
    check_channels_last_forward<scalar_t, 1>(name, 3, 3, 50, dev, rtol);
    check_channels_last_forward<scalar_t, kClPack>(name, 2, 8, 3136, dev, rtol);
    check_channels_last_forward<scalar_t, kClPack>(name, 1, 256, 7, dev, rtol);
    check_channels_last_forward<scalar_t, 1>(name, 1, 2, 100000, dev, rtol);
    check_channels_last_forward<scalar_t, kClPack>(name, 1, 4, 1, dev, rtol);
    check_channels_last_forward<scalar_t, kClPack>(name, 2, 8, 300, dev, rtol, 8);
    check_channels_last_forward<scalar_t, 1>(name, 2, 5, 300, dev, rtol, 3);
  }
  for (int64_t units : {1, 2, 3, 1000}) {
    check_strided_rows_forward<scalar_t, 1>(name, 7, 13, 49, 49, 13 * 49, units);     // dense
    check_strided_rows_forward<scalar_t, 1>(name, 7, 13, 49, 98, 2 * 13 * 98, units);  // sliced
    check_strided_rows_forward<scalar_t, 1>(name, 7, 13, 9, 9, 0, units);              // expanded
    check_strided_rows_forward<scalar_t, kPack>(name, 5, 3, 16 * kPack, 32 * kPack, 0, units);
    check_strided_rows_forward<scalar_t, kPack>(name, 3, 1, 2000 * kPack, 0, 2000 * kPack,
                                                units);
  }
  for (int64_t cap : {int64_t(1), int64_t(2), int64_t(3), kMaxGridX}) {
    check_backward<scalar_t, 1>(name, 7, 13, 49, RowLayout::kRows, cap, rtol);
    check_backward<scalar_t, 1>(name, 5, 31, 9, RowLayout::kRows, cap, rtol);
    check_backward<scalar_t, 1>(name, 2, 3, 1, RowLayout::kRows, cap, rtol);
    check_backward<scalar_t, kPack>(name, 2, 3, 784, RowLayout::kRows, cap, rtol);
    check_backward<scalar_t, 1>(name, 1, 2, 30001, RowLayout::kRows, cap, rtol);
    check_backward<scalar_t, kPack>(name, 1, 2, 40000, RowLayout::kRows, cap, rtol);
    check_backward<scalar_t, kClPack>(name, 2, 8, 49, RowLayout::kChannelsLast, cap, rtol);
    check_backward<scalar_t, 1>(name, 2, 3, 1000, RowLayout::kChannelsLast, cap, rtol);
    check_backward<scalar_t, kClPack>(name, 1, 68, 3000, RowLayout::kChannelsLast, cap, rtol);
  }
}

// The plans of the headline shapes on an H100 (132 SMs), for the log.
void print_plans() {
  const DeviceInfo h100{132, true};
  struct RowsCase {
    const char* what;
    int64_t rows, positions;
    int pack;
  };
  const RowsCase rows_cases[] = {
      {"(128,512,7,7) f32", 128 * 512, 49, 1},    {"(128,64,28,28) f32", 128 * 64, 784, 4},
      {"(64,64,56,56) f32", 64 * 64, 3136, 4},    {"(64,64,56,56) bf16", 64 * 64, 3136, 8},
      {"(1,2,300000) f32", 2, 300000, 4},         {"(8,1,10^6) bf16", 8, 1000000, 8},
      {"(2,1,2^30+7) bf16", 2, (int64_t(1) << 30) + 7, 1}};
  for (const RowsCase& s : rows_cases) {
    const int loads = s.pack > 1 ? 2 : 8;
    const RowsPlan f = plan_forward_rows(s.rows, s.positions, s.pack, loads, 1024, h100);
    const BackwardRowsPlan b = plan_backward_rows(s.rows, s.positions, s.pack, loads);
    std::printf("%-20s forward team %4d of %4d threads, cluster %d, grid %ld | backward team "
                "%3d, %ld segments, grid %ld\n",
                s.what, f.team, f.threads, f.cluster, (long)f.grid, b.team, (long)b.segments,
                (long)b.grid);
  }
}

}  // namespace

int main() {
  check_dtype<float>("float", 2e-5);
  check_dtype<double>("double", 1e-12);
  check_dtype<__half>("half", 4e-3);
  check_dtype<__nv_bfloat16>("bfloat16", 3e-2);
  print_plans();
  std::printf(failures ? "FAILURES: %d\n" : "all host checks passed\n", failures);
  return failures ? 1 : 0;
}
