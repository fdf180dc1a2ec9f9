// libcodex_onednn_gemm.so: PyTorch's oneDNN fp32 matmul (at::native::mkldnn_matmul) behind a C interface, for
// kernels/common/cpu_gemm.h. This one library is built against the C++ ABI of the torch the package is built
// with, and cpu_gemm.h opens it only under that release; the extensions themselves use the stable ABI alone.
// Tensors arrive as the stable ABI's handles, which are at::Tensor pointers inside libtorch.
#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Context.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>

#if AT_MKLDNN_ENABLED()
namespace at::native {
// Declared in ATen/native/mkldnn/Matmul.h, which the wheel does not ship; exported by libtorch_cpu.
// result = beta * result + alpha * (mat1 @ mat2).
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta, float alpha);
}  // namespace at::native
#endif

namespace {
const at::Tensor& tensor(AtenTensorHandle handle) { return *reinterpret_cast<at::Tensor*>(handle); }

// out = beta * out + a @ b on oneDNN; false where oneDNN refused or PyTorch was built without it.
bool matmul(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, float beta) {
#if AT_MKLDNN_ENABLED()
  try {
    at::native::mkldnn_matmul(a, b, out, beta, 1.0f);
    return true;
  } catch (const c10::Error&) {
    return false;
  }
#else
  return false;
#endif
}
}  // namespace

// out = beta * out + a @ b; 0 on success, 1 where oneDNN refused.
extern "C" __attribute__((visibility("default"))) int codex_onednn_gemm(AtenTensorHandle a, AtenTensorHandle b,
                                                                         AtenTensorHandle out, float beta) {
  return matmul(tensor(a), tensor(b), tensor(out), beta) ? 0 : 1;
}

// 1 where oneDNN runs fp32 products here, from one 2 x 2 product.
extern "C" __attribute__((visibility("default"))) int codex_onednn_works() {
  const at::Tensor a = at::eye(2, at::kFloat), b = at::full({2, 2}, 3.0f), out = at::empty({2, 2});
  return matmul(a, b, out, 0.0f) && at::equal(out, b) ? 1 : 0;
}

// 1 unless torch.backends.mkldnn.enabled was set False.
extern "C" __attribute__((visibility("default"))) int codex_onednn_enabled() {
  return at::globalContext().userEnabledMkldnn() ? 1 : 0;
}
