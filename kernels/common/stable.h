// What the CPU kernels use of LibTorch, all of it through LibTorch's stable ABI (torch/csrc/stable: tensors,
// the dispatcher, parallel_for), so that one build of an extension loads in the torch it was built with and in
// later releases (docs/using-the-wheel.md). The extensions compile with TORCH_STABLE_ONLY: including ATen by
// mistake is a compile error.
#ifndef CODEX_ML_KERNELS_STABLE_H_
#define CODEX_ML_KERNELS_STABLE_H_

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>

namespace codex_ml::cpu {

using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;

inline torch::stable::Device cpu_device() { return torch::stable::Device(torch::headeronly::DeviceType::CPU); }

// A new uninitialized CPU tensor.
inline Tensor empty(IntArrayRef sizes, ScalarType dtype) {
  return torch::stable::empty(sizes, dtype, std::nullopt, cpu_device());
}

inline Tensor zeros(IntArrayRef sizes, ScalarType dtype) {
  Tensor t = empty(sizes, dtype);
  torch::stable::zero_(t);
  return t;
}

// A new uninitialized CPU tensor with the given strides.
inline Tensor empty_strided(IntArrayRef sizes, IntArrayRef strides, ScalarType dtype) {
  std::array<StableIValue, 6> stack{
      torch::stable::detail::from(sizes),        torch::stable::detail::from(strides),
      torch::stable::detail::from(std::optional<ScalarType>(dtype)), torch::stable::detail::from(std::nullopt),
      torch::stable::detail::from(std::optional<torch::stable::Device>(cpu_device())),
      torch::stable::detail::from(std::nullopt)};
  STABLE_TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher("aten::empty_strided", "", stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

// t itself where it already has that dtype, else a converted copy (as Tensor.to).
inline Tensor to(const Tensor& t, ScalarType dtype) { return torch::stable::to(t, dtype); }

inline Tensor contiguous(const Tensor& t) { return torch::stable::contiguous(t); }

// The transpose of a 2-D tensor (a view).
inline Tensor transposed(const Tensor& m) { return torch::stable::transpose(m, 0, 1); }

// Sum over dim 0 of a 2-D tensor: [n, m] -> [m].
inline Tensor sum_rows(const Tensor& m) {
  const std::array<int64_t, 1> dims{0};
  return torch::stable::sum(m, IntArrayRef(dims.data(), dims.size()));
}

// The result dtype of x op weight among fp32, bf16, fp16 and fp64 (torch.promote_types on those).
inline ScalarType promote(ScalarType a, ScalarType b) {
  if (a == b) return a;
  return a == ScalarType::Double || b == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

inline bool same_sizes(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != b.size(d)) return false;
  }
  return true;
}

// "[2, 3]", for error messages.
inline std::string shape(IntArrayRef sizes) {
  std::string s = "[";
  for (size_t d = 0; d < sizes.size(); ++d) s += (d ? ", " : "") + std::to_string(sizes[d]);
  return s + "]";
}

inline std::string shape(const Tensor& t) { return shape(t.sizes()); }

}  // namespace codex_ml::cpu

// Registers an op and its backward as torch.ops.codex_ml_cpu.<forward> and <backward>: their schemas, and the C++
// functions of the same names as their CPU kernels.
#define CODEX_ML_CPU_OP_WITH_BACKWARD(forward, forward_schema, backward, backward_schema) \
  STABLE_TORCH_LIBRARY_FRAGMENT(codex_ml_cpu, m) {                                         \
    m.def(forward_schema);                                                                \
    m.def(backward_schema);                                                               \
  }                                                                                       \
  STABLE_TORCH_LIBRARY_IMPL(codex_ml_cpu, CPU, m) {                                        \
    m.impl(#forward, TORCH_BOX(&forward));                                                \
    m.impl(#backward, TORCH_BOX(&backward));                                              \
  }

#endif  // CODEX_ML_KERNELS_STABLE_H_
