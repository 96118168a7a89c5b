// One build of each CPU kernel file per CPU capability, chosen at run time as ATen's
// DispatchStub chooses its own kernels.
//
// Convention for a CPU kernel file (listed once in CPU_KERNEL_SOURCES, _extension.py):
//  - the build compiles it once per capability with -DCPU_CAPABILITY=<cap>,
//    -DCPU_CAPABILITY_<cap> and that capability's -m flags (ahead of time: DEFAULT, AVX2,
//    AVX512; just in time: the host's capability only);
//  - it defines its entry points in `namespace sparsity_ext::CPU_CAPABILITY` and keeps
//    everything else in an anonymous namespace, so the builds never share a symbol (a
//    shared inline function could be linked from the AVX-512 build into the DEFAULT one);
//  - its header declares the entry points for every capability with
//    SPARSITY_EXT_DECLARE_CPU_KERNELS, and callers reach them through SPARSITY_EXT_CPU_KERNEL.
// The other sources see SPARSITY_EXT_CPU_KERNELS_<cap> for each capability that is linked.
#pragma once

#include <cstdint>

namespace sparsity_ext {

enum class CpuCapability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The best linked build that ATen's capability for this process allows
// (at::get_cpu_capability(): the CPU's, lowered by ATEN_CPU_CAPABILITY); fixed at first use.
// Throws if none is (a just-in-time build made for a better CPU than this one).
CpuCapability cpu_kernel_capability();

// "DEFAULT", "AVX2" or "AVX512".
const char* cpu_capability_name(CpuCapability capability);

// Whether the AVX512 build rounds bfloat16 with AVX512_BF16's VCVTNE2PS2BF16
// (store_from_float.h): the CPU has it and SPARSITY_EXT_AVX512_BF16 is not "0". Set when
// the library loads; it matters only where cpu_kernel_capability() is kAvx512. A constant
// rather than a call, since the kernels read it on every store.
extern const bool kCpuRoundsBfloat16Natively;

template <typename Fn>
Fn select_cpu_kernel(Fn default_build, Fn avx2_build, Fn avx512_build) {
  switch (cpu_kernel_capability()) {
    case CpuCapability::kAvx512: return avx512_build;
    case CpuCapability::kAvx2: return avx2_build;
    case CpuCapability::kDefault: break;
  }
  return default_build;
}

}  // namespace sparsity_ext

#define SPARSITY_EXT_DECLARE_CPU_KERNELS(...)         \
  namespace sparsity_ext::DEFAULT { __VA_ARGS__ }    \
  namespace sparsity_ext::AVX2 { __VA_ARGS__ }       \
  namespace sparsity_ext::AVX512 { __VA_ARGS__ }

#if defined(SPARSITY_EXT_CPU_KERNELS_DEFAULT)
#define SPARSITY_EXT_DEFAULT_BUILD(fn) &::sparsity_ext::DEFAULT::fn
#else
#define SPARSITY_EXT_DEFAULT_BUILD(fn) nullptr
#endif
#if defined(SPARSITY_EXT_CPU_KERNELS_AVX2)
#define SPARSITY_EXT_AVX2_BUILD(fn) &::sparsity_ext::AVX2::fn
#else
#define SPARSITY_EXT_AVX2_BUILD(fn) nullptr
#endif
#if defined(SPARSITY_EXT_CPU_KERNELS_AVX512)
#define SPARSITY_EXT_AVX512_BUILD(fn) &::sparsity_ext::AVX512::fn
#else
#define SPARSITY_EXT_AVX512_BUILD(fn) nullptr
#endif

// The build of kernel entry point `fn` for this process, e.g.
//   SPARSITY_EXT_CPU_KERNEL(channel_stats_forward_cpu)(params);
#define SPARSITY_EXT_CPU_KERNEL(fn)                                                \
  ::sparsity_ext::select_cpu_kernel<decltype(&::sparsity_ext::DEFAULT::fn)>(       \
      SPARSITY_EXT_DEFAULT_BUILD(fn), SPARSITY_EXT_AVX2_BUILD(fn), SPARSITY_EXT_AVX512_BUILD(fn))
