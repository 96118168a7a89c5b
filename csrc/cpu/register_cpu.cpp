// CPU registration of the channel_stats and l1_stats operators: tensors -> params -> the
// kernel build for this process's CPU capability (cpu_capability.h).
#include <torch/library.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../host_prepare.h"
#include "channel_stats_cpu.h"
#include "l1_stats_cpu.h"

namespace sparsity_ext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x) {
  ForwardCall call = prepare_forward(x);
  if (call.entropy.numel() > 0) SPARSITY_EXT_CPU_KERNEL(channel_stats_forward_cpu)(call.params);
  return call.outputs();
}

// grad_x is freshly allocated and as large as x: first-touch page faults of 4 KB pages
// cost more than the kernel itself (float32, 64x64x56x56: ~15 of ~19 ms on 2 cores).
// Asking for transparent huge pages on its 2 MB-aligned interior cuts them 512-fold
// where THP is in "madvise" mode; it changes nothing where THP is "always" or "never".
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

void backward_cpu(const at::Tensor& x, const at::Tensor& row_stats,
                   const at::Tensor& grad_entropy, const at::Tensor& grad_perplexity,
                   const at::Tensor& grad_sparsity, at::Tensor& grad_x) {
  const BackwardCall call =
      prepare_backward(x, row_stats, grad_entropy, grad_perplexity, grad_sparsity, grad_x);
  if (grad_x.numel() == 0) return;
  advise_huge_pages(grad_x);
  SPARSITY_EXT_CPU_KERNEL(channel_stats_backward_cpu)(call.params);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> l1_forward_cpu(const at::Tensor& x) {
  const ForwardCall call = prepare_forward(x, kL1Stats);
  if (call.entropy.numel() > 0) SPARSITY_EXT_CPU_KERNEL(l1_stats_forward_cpu)(call.params);
  return call.outputs();
}

void l1_backward_cpu(const at::Tensor& x, const at::Tensor& row_stats,
                     const at::Tensor& grad_entropy, const at::Tensor& grad_perplexity,
                     const at::Tensor& grad_sparsity, at::Tensor& grad_x) {
  const BackwardCall call = prepare_backward(x, row_stats, grad_entropy, grad_perplexity,
                                             grad_sparsity, grad_x, kL1Stats);
  if (grad_x.numel() == 0) return;
  advise_huge_pages(grad_x);
  SPARSITY_EXT_CPU_KERNEL(l1_stats_backward_cpu)(call.params);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsity_ext, CPU, m) {
  m.impl("channel_stats_forward", &forward_cpu);
  m.impl("channel_stats_backward.out", &backward_cpu);
  m.impl("l1_stats_forward", &l1_forward_cpu);
  m.impl("l1_stats_backward.out", &l1_backward_cpu);
}

}  // namespace sparsity_ext
