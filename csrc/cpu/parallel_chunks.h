// at::parallel_for with the work balanced while it runs, for the CPU kernels.
//
// Why: at::parallel_for gives each thread an equal share up front, so a call lasts as long
// as its slowest thread. On a VM the virtual CPUs share cores with other guests and do not
// run at the same speed: on the 2-core VM of bench/results, one thread of a 7x7 forward
// finished 100 us (a fifth of the call) after the other in one call of five. Here a thread
// that is done takes over the chunks the other has not started.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

namespace sparsity_ext {
namespace {  // compiled once per CPU capability (cpu_capability.h): each build its own copy

// Calls f(begin, end) once on each chunk [k chunk, min(n, (k + 1) chunk)) of [0, n), on up
// to at::get_num_threads() threads: a thread takes the chunks of its own equal share in
// order, then, from their fronts, those left in the others' shares. Which thread runs a
// chunk, and in which order chunks run, must not matter to f: its results may depend on
// the chunk only (the chunks are fixed by n and chunk, whatever the thread count).
template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, const F& f) {
  if (n <= 0) return;
  chunk = std::max<int64_t>(chunk, 1);
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t shares = std::min<int64_t>(at::get_num_threads(), chunks);
  if (shares <= 1 || at::in_parallel_region()) {
    for (int64_t k = 0; k < chunks; ++k) f(k * chunk, std::min(n, (k + 1) * chunk));
    return;
  }
  // The next chunk of each share, each on its own cache line: its owner's until another
  // thread has run out of chunks.
  struct alignas(64) Next {
    std::atomic<int64_t> chunk;
  };
  const std::unique_ptr<Next[]> next(new Next[shares]);
  const auto share_begin = [&](int64_t s) { return s * chunks / shares; };
  for (int64_t s = 0; s < shares; ++s) next[s].chunk.store(share_begin(s));
  at::parallel_for(0, shares, 1, [&](int64_t first_share, int64_t end_share) {
    for (int64_t own = first_share; own < end_share; ++own) {
      for (int64_t k = 0; k < shares; ++k) {
        const int64_t s = (own + k) % shares, stop = share_begin(s + 1);
        for (int64_t c; (c = next[s].chunk.fetch_add(1, std::memory_order_relaxed)) < stop;) {
          f(c * chunk, std::min(n, (c + 1) * chunk));
        }
      }
    }
  });
}

}  // namespace
}  // namespace sparsity_ext
