// Storing float vectors as the kernel's element type, for the CPU kernel files: the one
// place that rounds grad_x to bfloat16 or float16. On AVX2, also bfloat16 read and written
// as its even and odd elements (load_bfloat16_even_odd, store_bfloat16_even_odd).
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

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
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

#if defined(CPU_CAPABILITY_AVX2)
// 16 bfloat16 as float vectors of the even and of the odd elements, for passes that treat
// every element alike: 3 instructions where at::vec's in-order conversion takes 6 or 7.
inline void load_bfloat16_even_odd(const c10::BFloat16* p, __m256& even, __m256& odd) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32(-65536)));
}

// The inverse of load_bfloat16_even_odd: rounds as at::vec's cvtfp32_bf16 (to nearest
// even, NaN as 0xffff), so the same bits, and interleaves by a shift and a word blend
// where at::vec packs and permutes (15 instructions where it takes 17).
inline void store_bfloat16_even_odd(c10::BFloat16* p, __m256 even, __m256 odd) {
  // The rounded bfloat16 in the high half of each lane (0xffff there for NaN).
  const auto round = [](__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded =
        _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    const __m256i ordered = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q));
    return _mm256_blendv_epi8(_mm256_set1_epi32(-1), rounded, ordered);
  };
  const __m256i words =  // even elements in the low halves, odd in the high halves
      _mm256_blend_epi16(_mm256_srli_epi32(round(even), 16), round(odd), 0xaa);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), words);
}
#endif

}  // namespace
}  // namespace sparsity_ext
