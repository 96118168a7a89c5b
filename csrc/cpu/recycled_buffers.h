// Memory for the CPU ops' outputs (grad_x, the forwards' outputs) that is already mapped:
// buffers freed by earlier outputs, kept in a small cache.
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
// the least recently freed buffers first. Buffers below 128 KB (glibc's first mmap
// threshold) use the ordinary allocator.
//
// The forwards' outputs and row statistics come from here too: with grad_x held here,
// glibc handed them (1.5 MB for 128x512 rows) fresh pages again after other allocations
// had come and gone, 160 page faults per forward in tests/test_recycled_buffers.py and
// about 355 in the benchmark's forward+backward. So does the contiguous copy of an x whose
// strides the kernels cannot read in place.
#pragma once

#include <ATen/core/Tensor.h>

namespace sparsity_ext {

// An uninitialised contiguous CPU tensor of `size` and `dtype`, in recycled memory when it
// is large enough: the CPU forwards' outputs and functional backwards' grad_x
// (register_cpu.cpp).
at::Tensor empty_recycled(at::IntArrayRef size, at::ScalarType dtype);

}  // namespace sparsity_ext
