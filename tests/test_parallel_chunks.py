"""The CPU kernels' thread scheduler (csrc/cpu/parallel_chunks.h), compiled on its own:
every chunk runs exactly once with its exact bounds, whatever the thread count, and while a
thread is held up in one chunk, another thread takes over the rest of its share."""

import pytest

from sparsity_ext import _extension
from testing import at_thread_counts

pytestmark = pytest.mark.build  # compiles a small extension (about 30 s)

SOURCE = r"""
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "parallel_chunks.h"

// For each chunk of [0, n): the number of calls it got and whether their bounds were exact.
std::vector<int64_t> calls_per_chunk(int64_t n, int64_t chunk) {
  const int64_t chunks = (n + chunk - 1) / chunk;
  std::vector<std::atomic<int64_t>> calls(chunks), exact(chunks);
  for (auto& e : exact) e = 1;
  sparsity_ext::parallel_chunks(n, chunk, [&](int64_t begin, int64_t end) {
    const int64_t k = begin / chunk;
    calls[k] += 1;
    if (begin != k * chunk || end != std::min(n, (k + 1) * chunk)) exact[k] = 0;
  });
  std::vector<int64_t> out;
  for (int64_t k = 0; k < chunks; ++k) out.insert(out.end(), {calls[k].load(), exact[k].load()});
  return out;
}

// `chunks` chunks of one item on two threads; the call on chunk 0 does not return until
// another thread has run a chunk of chunk 0's share (the first half), or 10 s have passed.
// True when it was overtaken so: with equal shares fixed up front it never is.
bool held_up_share_is_taken_over(int64_t chunks) {
  std::atomic<int64_t> share_threads{0};  // bit t: thread t ran a chunk of the first share
  std::atomic<bool> overtaken{false};
  sparsity_ext::parallel_chunks(chunks, 1, [&](int64_t begin, int64_t) {
    const int64_t me = int64_t{1} << at::get_thread_num();
    if (begin >= chunks / 2) return;
    share_threads |= me;
    if (begin != 0) return;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < deadline) {
      if (share_threads.load() & ~me) {
        overtaken = true;
        return;
      }
      std::this_thread::yield();
    }
  });
  return overtaken.load();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("calls_per_chunk", &calls_per_chunk);
  m.def("held_up_share_is_taken_over", &held_up_share_is_taken_over);
}
"""


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    from torch.utils import cpp_extension  # after sparsity_ext chose CUDA_HOME
    folder = tmp_path_factory.mktemp("parallel_chunks")
    source = folder / "parallel_chunks_test.cpp"
    source.write_text(SOURCE)
    return cpp_extension.load("sparsity_ext_parallel_chunks_test", [str(source)],
                              extra_include_paths=[str(_extension.csrc_dir() / "cpu")],
                              extra_cflags=["-O1", "-fopenmp"], extra_ldflags=["-fopenmp"],
                              build_directory=str(folder))


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("n, chunk", [(0, 4), (1, 4), (7, 7), (100, 7), (1000, 1), (5, 100)])
def test_every_chunk_runs_once_with_its_bounds(scheduler, threads, n, chunk):
    flat, = at_thread_counts([threads], lambda: scheduler.calls_per_chunk(n, chunk))
    assert len(flat) == 2 * -(-n // chunk)
    assert flat == [1, 1] * (len(flat) // 2), flat


def test_a_held_up_threads_share_is_taken_over(scheduler):
    assert at_thread_counts([2], lambda: scheduler.held_up_share_is_taken_over(64)) == [True]
