// Run-time choice among the linked builds of the CPU kernels (see cpu_capability.h).
#include "cpu_capability.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <string>

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

}  // namespace

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
// "AVX2 of DEFAULT, AVX2, AVX512"; an explanation instead when none fits this process.
extern "C" const char* sparsity_ext_cpu_kernels() {
  static const std::string text = [] {
    try {
      return std::string(sparsity_ext::cpu_capability_name(sparsity_ext::cpu_kernel_capability())) +
             " of " + sparsity_ext::linked_names();
    } catch (const c10::Error& e) {
      return std::string(e.what_without_backtrace());
    }
  }();
  return text.c_str();
}
