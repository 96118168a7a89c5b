// Storing float vectors as the kernel's element type, for the CPU kernel files: the one
// place that rounds grad_x to bfloat16 or float16.
//
// bfloat16 on AVX-512: CPUs with AVX512_BF16 (Cooper Lake, Sapphire Rapids and later Xeons,
// AMD Zen 4 and later) round 32 floats to nearest even in one instruction,
// VCVTNE2PS2BF16, where at::vec's rounding takes about 16 integer instructions: the
// bfloat16 backward kernel of 128x64x32x32 takes 1.29-1.40 ms instead of 1.78-1.84, of
// 128x512x7x7 0.67-0.78 instead of 0.84-0.90 (AMD EPYC Zen 4, 2 threads, two processes
// each way). The flag is a constant read on every store: a function-local static there
// (a guard check) cost all of that gain.
//
// The instruction treats subnormal inputs as zero, at::vec rounds them (to a subnormal
// bfloat16 or the smallest normal one), so a pack holding a subnormal takes at::vec's
// path: the stored bits are the same either way, but for a NaN's sign and payload. It is
// written as inline assembly so that the AVX512 build needs no -mavx512bf16 and still runs
// on AVX-512 CPUs without it; there, and with SPARSITY_EXT_AVX512_BF16=0 (for tests),
// at::vec rounds every pack (the choice: kCpuRoundsBfloat16Natively, cpu_capability.h;
// `python -m sparsity_ext info` shows it).
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "cpu_capability.h"

namespace sparsity_ext {
namespace {

// The first `count` (<= 2 Vectorized<float>::size()) values of lo then hi, rounded to
// scalar_t, stored at p (float16 and bfloat16 only).
template <typename scalar_t>
inline void store_from_float(scalar_t* p, int64_t count, const at::vec::Vectorized<float>& lo,
                             const at::vec::Vectorized<float>& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    constexpr int kSubnormal = 0x20;  // fpclass category
    if (kCpuRoundsBfloat16Natively &&
        (_mm512_fpclass_ps_mask(lo, kSubnormal) | _mm512_fpclass_ps_mask(hi, kSubnormal)) == 0) {
      const __m512 low = lo, high = hi;
      __m512i rounded;
      // AT&T operand order: the second source fills the low half of the result.
      asm("vcvtne2ps2bf16 %2, %1, %0" : "=v"(rounded) : "v"(high), "v"(low));
      if (count == 32) {
        _mm512_storeu_si512(p, rounded);
      } else {
        _mm512_mask_storeu_epi16(p, static_cast<__mmask32>((uint64_t{1} << count) - 1), rounded);
      }
      return;
    }
  }
#endif
  at::vec::convert_from_float<scalar_t>(lo, hi).store(p, count);
}

}  // namespace
}  // namespace sparsity_ext
