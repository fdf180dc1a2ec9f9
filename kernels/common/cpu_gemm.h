// fp32 matrix products for the CPU kernels: out = a @ b (accumulate: out += a @ b), with a, b and out 2-D
// fp32 tensors of any strides ATen accepts (transposed views included).
//
// Two backends: ATen's mm/addmm (MKL in the official builds), reached through the stable ABI's C shim, and
// oneDNN's matmul (at::native::mkldnn_matmul, the entry ATen itself uses for bf16). MKL picks its kernels by CPU
// vendor and on AMD CPUs runs a slower generic path: on a 2-core AMD EPYC (Zen 4) the loss's logits and
// weight-gradient products ran 1.3-1.6x faster in oneDNN, whose JIT kernels follow the CPU's ISA flags
// (kernels/bench, docs/kernels.md). So "auto" uses oneDNN on x86-64 CPUs that are not Intel's (where PyTorch's
// oneDNN entry takes fp32 at all: it requires AVX-512, which the probe finds out) and ATen elsewhere; the choice
// is made once per process, by vendor rather than by timing, so that a run's numerics do not depend on a noisy
// measurement. CODEX_CPU_GEMM=aten|onednn|auto overrides it.
//
// mkldnn_matmul is not part of the stable ABI: it lives in libcodex_onednn_gemm.so (onednn_gemm.cc), built
// against the C++ ABI of the torch the package was built with and opened only under that very release
// (aoti_torch_abi_version() says which is running). Under any other torch the products go to ATen.
#ifndef CODEX_ML_KERNELS_CPU_GEMM_H_
#define CODEX_ML_KERNELS_CPU_GEMM_H_

#include <dlfcn.h>
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels/common/stable.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
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

// The entry points of libcodex_onednn_gemm.so (onednn_gemm.cc); all null where it is not usable.
struct OnednnLibrary {
  int (*gemm)(AtenTensorHandle, AtenTensorHandle, AtenTensorHandle, float) = nullptr;
  int (*works)() = nullptr;
  int (*enabled)() = nullptr;
  std::string why_not;  // where gemm is null: why
};

// Opens kernels/common/libcodex_onednn_gemm.so beside this extension's folder, once per extension, under the
// torch release it was built for only.
inline const OnednnLibrary& onednn_library() {
  static const OnednnLibrary library = [] {
    OnednnLibrary lib;
    if (aoti_torch_abi_version() != TORCH_ABI_VERSION) {
      lib.why_not = "PyTorch's oneDNN matmul is reachable only under the torch release codex_ml was built with (" +
                    std::string(TORCH_VERSION) + ")";
      return lib;
    }
    Dl_info info;
    if (dladdr(reinterpret_cast<void*>(&onednn_library), &info) == 0 || info.dli_fname == nullptr) {
      lib.why_not = "the extension cannot find its own file";
      return lib;
    }
    std::string path = info.dli_fname;
    path = path.substr(0, path.rfind('/'));             // .../codex_ml/kernels/<op>
    path = path.substr(0, path.rfind('/') + 1) + "common/libcodex_onednn_gemm.so";
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      const char* error = dlerror();
      lib.why_not = "the oneDNN library " + path + " does not load (" + (error ? error : "unknown error") + ")";
      return lib;
    }
    lib.gemm = reinterpret_cast<decltype(lib.gemm)>(dlsym(handle, "codex_onednn_gemm"));
    lib.works = reinterpret_cast<decltype(lib.works)>(dlsym(handle, "codex_onednn_works"));
    lib.enabled = reinterpret_cast<decltype(lib.enabled)>(dlsym(handle, "codex_onednn_enabled"));
    if (lib.gemm == nullptr || lib.works == nullptr || lib.enabled == nullptr) {
      lib = OnednnLibrary{};
      lib.why_not = "the oneDNN library " + path + " lacks its entry points";
    }
    return lib;
  }();
  return library;
}

// Whether products go to oneDNN: CODEX_CPU_GEMM read once per extension module that includes this header (an
// unknown value is an error that says the choices). A CPU or build where oneDNN refuses fp32 products (one 2 x 2
// probe) gets ATen for the whole run (or, asked for oneDNN by name, an error), never a switch in the middle of one.
inline bool use_onednn() {
  static const bool flag = [] {
    const char* env = std::getenv("CODEX_CPU_GEMM");
    std::string choice = env == nullptr || *env == '\0' ? "auto" : env;
    STD_TORCH_CHECK(choice == "auto" || choice == "aten" || choice == "onednn", "CODEX_CPU_GEMM=", choice,
                    " is not a CPU matrix-product backend: use aten, onednn or auto (unset)");
    if (choice == "aten" || (choice == "auto" && !vendor_prefers_onednn())) return false;
    const OnednnLibrary& lib = onednn_library();
    STD_TORCH_CHECK(lib.gemm != nullptr || choice == "auto", "CODEX_CPU_GEMM=onednn, but ", lib.why_not,
                    ": use aten");
    const bool works = lib.gemm != nullptr && lib.works() == 1;
    STD_TORCH_CHECK(works || choice == "auto",
                    "CODEX_CPU_GEMM=onednn, but PyTorch's oneDNN does not run fp32 products on this CPU (it needs "
                    "AVX-512, and a PyTorch built with oneDNN): use aten");
    return works;
  }();
  return flag;
}

// Products under this many multiply-adds stay with ATen: oneDNN sets up each call (about 15 us on the 2-core
// machine), which outweighs its speed there.
constexpr int64_t kOnednnMinMacs = int64_t{1} << 22;

inline void gemm(const Tensor& a, const Tensor& b, Tensor& out, bool accumulate) {
  // torch.backends.mkldnn.enabled = False is honoured, as ATen does.
  if (use_onednn() && out.numel() * a.size(1) >= kOnednnMinMacs && onednn_library().enabled() == 1) {
    STD_TORCH_CHECK(onednn_library().gemm(a.get(), b.get(), out.get(), accumulate ? 1.0f : 0.0f) == 0,
                    "oneDNN refused a ", shape(a), " @ ", shape(b), " product: set CODEX_CPU_GEMM=aten");
    return;
  }
  if (accumulate) {
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_addmm_out(out.get(), out.get(), a.get(), b.get(), 1.0, 1.0));
  } else {
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_mm_out(out.get(), a.get(), b.get()));
  }
}

}  // namespace codex_ml::cpu

#endif  // CODEX_ML_KERNELS_CPU_GEMM_H_
