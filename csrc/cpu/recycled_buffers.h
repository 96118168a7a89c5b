// Memory for large CPU outputs (grad_x) that is already mapped: buffers freed by earlier
// outputs, kept in a small cache.
//
// Why: grad_x is as large as x and written once. Fresh memory of that size comes from
// mmap and is paid for with one page fault per 4 KB page when the kernel first writes it:
// float32 (64,64,56,56) is 51 MB, 12,544 faults, ~21 ms of kernel (sys) time per call on
// 2 cores, more than the backward kernel itself. Transparent huge pages cut that to ~790
// faults but stall on a VM: a freed 2 MB block is handed back to the host (free page
// reporting), and the next huge-page fault on it waits for the host to back it again
// (60-140 ms calls in a fresh process and after other allocations). A recycled buffer has
// no faults at all. Like the CUDA caching allocator, the cache holds memory its tensors
// no longer use, at most SPARSITY_EXT_CPU_CACHE_MB (default 256; 0 turns it off), evicting
// the least recently freed buffers first. Buffers below 1 MB use the ordinary allocator.
#pragma once

#include <ATen/core/Tensor.h>

namespace sparsity_ext {

// An uninitialised contiguous CPU tensor of `size` with like's dtype, in recycled memory
// when it is large enough: the CPU functional backwards' grad_x (register_cpu.cpp).
at::Tensor empty_recycled(const at::Tensor& like, at::IntArrayRef size);

}  // namespace sparsity_ext
