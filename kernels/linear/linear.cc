// y = x @ weight^T + bias on the CPU in fp32, with its backward, the products going to kernels/common/cpu_gemm.h
// (oneDNN or ATen's MKL by CPU vendor) instead of always to MKL as nn.Linear's do: on AMD CPUs MKL's generic
// path leaves a fifth to a third of the speed unused (docs/kernels.md). x is [N, H] (the Python side flattens
// the leading dims), weight [V, H], bias [V]; any strides.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "kernels/common/cpu_gemm.h"

namespace {

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  const char* name) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), name,
              ": expected x [N, H] and weight [V, H], got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, name,
              ": this kernel takes fp32 tensors");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), name, ": this kernel runs on CPU tensors");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == at::kFloat &&
                    bias->device().is_cpu(),
                name, ": expected an fp32 CPU bias [", weight.size(0), "], got ", bias->sizes());
  }
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_inputs(x, weight, bias, "linear");
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  if (bias.has_value()) y.copy_(bias->unsqueeze(0).expand_as(y));
  codex_ml::cpu::gemm(x, weight.t(), y, /*accumulate=*/bias.has_value());
  return y;
}

// (grad_x [N, H], grad_weight [V, H], grad_bias [V]); an entry not asked for in `mask` is a 0-element tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                const at::Tensor& weight, std::array<bool, 3> mask) {
  check_inputs(x, weight, c10::nullopt, "linear_backward");
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == x.size(0) && grad.size(1) == weight.size(0) &&
                  grad.scalar_type() == at::kFloat,
              "linear_backward: expected an fp32 grad [", x.size(0), ", ", weight.size(0), "], got ", grad.sizes());
  at::Tensor gx = at::empty({0}, x.options()), gw = at::empty({0}, x.options()), gb = at::empty({0}, x.options());
  if (mask[0]) {
    gx = at::empty(x.sizes(), x.options());
    codex_ml::cpu::gemm(grad, weight, gx, /*accumulate=*/false);
  }
  if (mask[1]) {
    gw = at::empty(weight.sizes(), weight.options());
    codex_ml::cpu::gemm(grad.t(), x, gw, /*accumulate=*/false);
  }
  if (mask[2]) gb = grad.sum(0);
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(codex_ml_cpu, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_backward(Tensor grad, Tensor x, Tensor weight, bool[3] mask) -> (Tensor, Tensor, Tensor)");
  // Which backend the products of this extension use in this process: 1 oneDNN, 0 ATen.
  m.def("cpu_gemm_onednn() -> int");
}

TORCH_LIBRARY_IMPL(codex_ml_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("linear_backward", &linear_backward);
}

// No tensor arguments, so no dispatch key: registered as the catch-all kernel.
TORCH_LIBRARY_IMPL(codex_ml_cpu, CompositeExplicitAutograd, m) {
  m.impl("cpu_gemm_onednn", [] { return static_cast<int64_t>(codex_ml::cpu::use_onednn()); });
}
