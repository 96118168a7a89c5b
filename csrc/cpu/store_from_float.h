// Storing float vectors as the kernel's element type, for the CPU kernel files: the one
// place that rounds grad_x to bfloat16 or float16.
//
// bfloat16 on AVX-512: CPUs with AVX512_BF16 (Cooper Lake, Sapphire Rapids and later Xeons,
// AMD Zen 4 and later) round 32 floats to nearest even in one instruction,
// VCVTNE2PS2BF16, where at::vec's rounding takes about 16 integer instructions: on the
// bfloat16 backward of 128x64x32x32 that is 17 % of the kernel (1.55 -> 1.29 ms, AMD EPYC
// Zen 4, 2 threads). The instruction treats subnormal inputs as zero, at::vec rounds them
// (to a subnormal bfloat16 or the smallest normal one), so a pack holding a subnormal
// takes at::vec's path: the stored bits are the same either way, but for a NaN's payload.
// It is written as inline assembly so that the AVX512 build needs no -mavx512bf16 and
// still runs on AVX-512 CPUs without it; there, and with SPARSITY_EXT_AVX512_BF16=0 (for
// tests), at::vec rounds every pack.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512)
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace sparsity_ext {
namespace {

#if defined(CPU_CAPABILITY_AVX512)
// CPUID leaf 7, sub-leaf 1, EAX bit 5: AVX512_BF16. The AVX512 build only runs where ATen
// found AVX-512 and the OS saving its registers, so this bit is all that is left to check.
inline bool rounds_bfloat16_natively() {
  const char* setting = std::getenv("SPARSITY_EXT_AVX512_BF16");
  if (setting != nullptr && std::strcmp(setting, "0") == 0) return false;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax & (1u << 5)) != 0;
}

inline const bool kRoundsBfloat16Natively = rounds_bfloat16_natively();
#endif

// The first `count` (<= 2 Vectorized<float>::size()) values of lo then hi, rounded to
// scalar_t, stored at p (float16 and bfloat16 only).
template <typename scalar_t>
inline void store_from_float(scalar_t* p, int64_t count, const at::vec::Vectorized<float>& lo,
                             const at::vec::Vectorized<float>& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    constexpr int kSubnormal = 0x20;  // fpclass category
    if (kRoundsBfloat16Natively &&
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
