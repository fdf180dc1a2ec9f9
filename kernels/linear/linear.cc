// y = x @ weight^T + bias on the CPU in fp32, with its backward, the products going to kernels/common/cpu_gemm.h
// (oneDNN or ATen's MKL by CPU vendor) instead of always to MKL as nn.Linear's do: on AMD CPUs MKL's generic
// path leaves a fifth to a third of the speed unused (docs/kernels.md). x is [N, H] (the Python side flattens
// the leading dims), weight [V, H], bias [V]; any strides.
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels/common/cpu_gemm.h"
#include "kernels/common/stable.h"

namespace {

using codex_ml::cpu::shape;
using codex_ml::cpu::Tensor;
using torch::headeronly::ScalarType;

void check_inputs(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const char* name) {
  STD_TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), name,
                  ": expected x [N, H] and weight [V, H], got ", shape(x), " and ", shape(weight));
  STD_TORCH_CHECK(x.scalar_type() == ScalarType::Float && weight.scalar_type() == ScalarType::Float, name,
                  ": this kernel takes fp32 tensors");
  STD_TORCH_CHECK(x.is_cpu() && weight.is_cpu(), name, ": this kernel runs on CPU tensors");
  if (bias.has_value()) {
    STD_TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                        bias->scalar_type() == ScalarType::Float && bias->is_cpu(),
                    name, ": expected an fp32 CPU bias [", weight.size(0), "], got ", shape(*bias));
  }
}

Tensor linear(Tensor x, Tensor weight, std::optional<Tensor> bias) {
  check_inputs(x, weight, bias, "linear");
  Tensor y = codex_ml::cpu::empty({x.size(0), weight.size(0)}, ScalarType::Float);
  if (bias.has_value()) torch::stable::copy_(y, *bias);  // broadcast over the rows
  codex_ml::cpu::gemm(x, codex_ml::cpu::transposed(weight), y, /*accumulate=*/bias.has_value());
  return y;
}

// (grad_x [N, H], grad_weight [V, H], grad_bias [V]); an entry not asked for in `mask` is a 0-element tensor.
std::tuple<Tensor, Tensor, Tensor> linear_backward(Tensor grad, Tensor x, Tensor weight, std::vector<bool> mask) {
  check_inputs(x, weight, std::nullopt, "linear_backward");
  STD_TORCH_CHECK(grad.dim() == 2 && grad.size(0) == x.size(0) && grad.size(1) == weight.size(0) &&
                      grad.scalar_type() == ScalarType::Float,
                  "linear_backward: expected an fp32 grad [", x.size(0), ", ", weight.size(0), "], got ",
                  shape(grad));
  STD_TORCH_CHECK(mask.size() == 3, "linear_backward: mask must be 3 bools");
  Tensor gx = codex_ml::cpu::empty({0}, ScalarType::Float), gw = codex_ml::cpu::empty({0}, ScalarType::Float);
  Tensor gb = codex_ml::cpu::empty({0}, ScalarType::Float);
  if (mask[0]) {
    gx = codex_ml::cpu::empty(x.sizes(), ScalarType::Float);
    codex_ml::cpu::gemm(grad, weight, gx, /*accumulate=*/false);
  }
  if (mask[1]) {
    gw = codex_ml::cpu::empty(weight.sizes(), ScalarType::Float);
    codex_ml::cpu::gemm(codex_ml::cpu::transposed(grad), x, gw, /*accumulate=*/false);
  }
  if (mask[2]) gb = codex_ml::cpu::sum_rows(grad);
  return {gx, gw, gb};
}

// Which backend the products of this extension use in this process: 1 oneDNN, 0 ATen.
int64_t cpu_gemm_onednn() { return static_cast<int64_t>(codex_ml::cpu::use_onednn()); }

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(codex_ml_cpu, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_backward(Tensor grad, Tensor x, Tensor weight, bool[3] mask) -> (Tensor, Tensor, Tensor)");
  m.def("cpu_gemm_onednn() -> int");
}

STABLE_TORCH_LIBRARY_IMPL(codex_ml_cpu, CPU, m) {
  m.impl("linear", TORCH_BOX(&linear));
  m.impl("linear_backward", TORCH_BOX(&linear_backward));
}

// No tensor arguments, so no dispatch key: registered as the catch-all kernel.
STABLE_TORCH_LIBRARY_IMPL(codex_ml_cpu, CompositeExplicitAutograd, m) {
  m.impl("cpu_gemm_onednn", TORCH_BOX(&cpu_gemm_onednn));
}
