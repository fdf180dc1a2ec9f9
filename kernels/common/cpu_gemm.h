// fp32 matrix products for the CPU kernels: out = a @ b (accumulate: out += a @ b), with a, b and out 2-D
// fp32 tensors of any strides ATen accepts (transposed views included).
//
// Two backends, both inside libtorch: ATen's at::mm (MKL in the official builds) and oneDNN's matmul
// (at::native::mkldnn_matmul, the entry ATen itself uses for bf16). MKL picks its kernels by CPU vendor and
// on AMD CPUs runs a slower generic path: on a 2-core AMD EPYC (Zen 4) the loss's logits and weight-gradient
// products ran 1.3-1.6x faster in oneDNN, whose JIT kernels follow the CPU's ISA flags (kernels/bench,
// docs/kernels.md). So "auto" uses oneDNN on x86-64 CPUs that are not Intel's (where PyTorch's oneDNN entry
// takes fp32 at all: it requires AVX-512, which the probe below finds out) and ATen elsewhere; the choice is
// made once per process, by vendor rather than by timing, so that a run's numerics do not depend on a noisy
// measurement. CODEX_CPU_GEMM=aten|onednn|auto overrides it.
#ifndef CODEX_ML_KERNELS_CPU_GEMM_H_
#define CODEX_ML_KERNELS_CPU_GEMM_H_

#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Context.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

#if AT_MKLDNN_ENABLED()
namespace at::native {
// Declared in ATen/native/mkldnn/Matmul.h, which the wheel does not ship; exported by libtorch_cpu.
// result = beta * result + alpha * (mat1 @ mat2).
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta, float alpha);
}  // namespace at::native
#endif

namespace codex_ml::cpu {

inline bool cpu_is_intel() {
#if defined(__x86_64__) && defined(__GNUC__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
  char vendor[13];
  std::memcpy(vendor, &ebx, 4);
  std::memcpy(vendor + 4, &edx, 4);
  std::memcpy(vendor + 8, &ecx, 4);
  vendor[12] = '\0';
  return std::strcmp(vendor, "GenuineIntel") == 0;
#else
  return false;
#endif
}

// Whether "auto" picks oneDNN on this machine, given that it runs fp32 here: on x86-64 CPUs not made by Intel.
inline bool vendor_prefers_onednn() {
#if defined(__x86_64__)
  return !cpu_is_intel();
#else
  return false;
#endif
}

// Whether oneDNN runs fp32 products here, from one 2 x 2 product: a CPU or build where it refuses them gets
// ATen for the whole run (or, asked for oneDNN by name, an error), never a switch in the middle of one.
inline bool onednn_works() {
#if AT_MKLDNN_ENABLED()
  try {
    const at::Tensor a = at::eye(2, at::kFloat), b = at::full({2, 2}, 3.0f), out = at::empty({2, 2});
    at::native::mkldnn_matmul(a, b, out, 0.0f, 1.0f);
    return at::equal(out, b);
  } catch (const c10::Error&) {
    return false;
  }
#else
  return false;
#endif
}

// Whether products go to oneDNN: CODEX_CPU_GEMM read once per extension module that includes this header (an
// unknown value is an error that says the choices).
inline bool use_onednn() {
  static const bool flag = [] {
    const char* env = std::getenv("CODEX_CPU_GEMM");
    std::string choice = env == nullptr || *env == '\0' ? "auto" : env;
    TORCH_CHECK(choice == "auto" || choice == "aten" || choice == "onednn",
                "CODEX_CPU_GEMM=", choice, " is not a CPU matrix-product backend: use aten, onednn or auto (unset)");
    if (choice == "aten" || (choice == "auto" && !vendor_prefers_onednn())) return false;
    const bool works = onednn_works();
    TORCH_CHECK(works || choice == "auto",
                "CODEX_CPU_GEMM=onednn, but PyTorch's oneDNN does not run fp32 products on this CPU (it needs "
                "AVX-512, and a PyTorch built with oneDNN): use aten");
    return works;
  }();
  return flag;
}

// Products under this many multiply-adds stay with ATen: oneDNN sets up each call (about 15 us on the 2-core
// machine), which outweighs its speed there.
constexpr int64_t kOnednnMinMacs = int64_t{1} << 22;

inline void gemm(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool accumulate) {
#if AT_MKLDNN_ENABLED()
  // torch.backends.mkldnn.enabled = False is honoured, as ATen does.
  if (use_onednn() && out.numel() * a.size(1) >= kOnednnMinMacs && at::globalContext().userEnabledMkldnn()) {
    at::native::mkldnn_matmul(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
    return;
  }
#endif
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

}  // namespace codex_ml::cpu

#endif  // CODEX_ML_KERNELS_CPU_GEMM_H_
