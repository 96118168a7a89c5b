// Run-time choice among the linked builds of the CPU kernels (see cpu_capability.h).
#include "cpu_capability.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace sparsity_ext {
namespace {

constexpr bool kLinked[] = {
#if defined(SPARSITY_EXT_CPU_KERNELS_DEFAULT)
    true,
#else
    false,
#endif
#if defined(SPARSITY_EXT_CPU_KERNELS_AVX2)
    true,
#else
    false,
#endif
#if defined(SPARSITY_EXT_CPU_KERNELS_AVX512)
    true,
#else
    false,
#endif
};

// at::get_cpu_capability() is what DispatchStub dispatches on, as a name ("AVX512", ...;
// other names on other architectures). Its enum twin is not exported.
CpuCapability atens_capability() {
  const std::string name = at::get_cpu_capability();
  if (name == "AVX512") return CpuCapability::kAvx512;
  if (name == "AVX2") return CpuCapability::kAvx2;
  return CpuCapability::kDefault;
}

std::string linked_names() {
  std::string names;
  for (int c = 0; c < 3; ++c) {
    if (!kLinked[c]) continue;
    if (!names.empty()) names += ", ";
    names += cpu_capability_name(static_cast<CpuCapability>(c));
  }
  return names;
}

CpuCapability choose() {
  const CpuCapability allowed = atens_capability();
  for (int c = static_cast<int>(allowed); c >= 0; --c) {
    if (kLinked[c]) return static_cast<CpuCapability>(c);
  }
  TORCH_CHECK(false, "sparsity_ext: the CPU kernels were built for ", linked_names(),
              " only, but this process runs with CPU capability ",
              cpu_capability_name(allowed),
              " (the CPU's, or ATEN_CPU_CAPABILITY's): rebuild with `python -m sparsity_ext "
              "build` in this environment");
}

// CPUID leaf 7 sub-leaf 1, EAX bit 5: AVX512_BF16 (sub-leaf 1 exists when sub-leaf 0's
// EAX, the last sub-leaf, is at least 1).
bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || eax < 1) return false;
  return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax & (1u << 5)) != 0;
#else
  return false;
#endif
}

}  // namespace

const bool kCpuRoundsBfloat16Natively = [] {
  const char* setting = std::getenv("SPARSITY_EXT_AVX512_BF16");
  return !(setting != nullptr && std::strcmp(setting, "0") == 0) && cpu_has_avx512_bf16();
}();

CpuCapability cpu_kernel_capability() {
  static const CpuCapability chosen = choose();
  return chosen;
}

const char* cpu_capability_name(CpuCapability capability) {
  switch (capability) {
    case CpuCapability::kAvx512: return "AVX512";
    case CpuCapability::kAvx2: return "AVX2";
    case CpuCapability::kDefault: break;
  }
  return "DEFAULT";
}

}  // namespace sparsity_ext

// For the Python loader (ctypes): which build runs here, and which are linked, e.g.
// "AVX2 of DEFAULT, AVX2, AVX512", with "; bfloat16 rounded by AVX512_BF16" where the
// AVX512 build uses that instruction; an explanation instead when no build fits.
extern "C" const char* sparsity_ext_cpu_kernels() {
  static const std::string text = [] {
    try {
      using namespace sparsity_ext;
      const CpuCapability chosen = cpu_kernel_capability();
      return std::string(cpu_capability_name(chosen)) + " of " + linked_names() +
             (chosen == CpuCapability::kAvx512 && kCpuRoundsBfloat16Natively
                  ? "; bfloat16 rounded by AVX512_BF16"
                  : "");
    } catch (const c10::Error& e) {
      return std::string(e.what_without_backtrace());
    }
  }();
  return text.c_str();
}
