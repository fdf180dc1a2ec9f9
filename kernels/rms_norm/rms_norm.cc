// RMSNorm on the CPU, one pass over the rows each way:
//   forward   y = (x * r).to(x.dtype) * weight,  r = rsqrt(mean(x^2) + eps) per row (saved, fp32)
//   backward  n = x * r,  dx = r * (g * w - n * mean(g * w * n)),  dweight = sum over rows of g * n.to(x.dtype)
// x [rows, H] contiguous in fp32, bf16 or fp16; the output dtype is promote(x, weight), as in the eager
// module (codex_ml.models.gpt.RMSNorm). All arithmetic is fp32. Each row's loops are compiled twice, plain
// (SSE) and for AVX2+FMA, and the AVX2 copy runs where the CPU has it.
//
// The weight gradient is a reduction over rows: each of a fixed number of row blocks accumulates its own fp32
// partial sum (no atomics, and the same result whatever thread runs which block), then the partials are added.
#include <torch/headeronly/core/Dispatch.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "kernels/common/cpu_exp.h"
#include "kernels/common/stable.h"

namespace {

using codex_ml::cpu::shape;
using codex_ml::cpu::Tensor;
using torch::headeronly::ScalarType;

// Rows per task: enough elements that a task outweighs the cost of starting it.
int64_t grain_rows(int64_t H) { return std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(H, 1)); }

// The eager module rounds the normalized x to x's dtype before multiplying by the weight.
template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

template <typename T, typename O>
__attribute__((always_inline)) inline void forward_rows(const T* x, const float* w, O* y, float* rstd, int64_t H,
                                                        float eps, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const T* xr = x + i * H;
    O* yr = y + i * H;
    float sumsq = 0.0f;
#pragma omp simd reduction(+ : sumsq)
    for (int64_t j = 0; j < H; ++j) {
      const float v = static_cast<float>(xr[j]);
      sumsq += v * v;
    }
    const float r = 1.0f / std::sqrt(sumsq / static_cast<float>(H) + eps);
    rstd[i] = r;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) yr[j] = static_cast<O>(round_to<T>(static_cast<float>(xr[j]) * r) * w[j]);
  }
}

template <typename T, typename O>
__attribute__((always_inline)) inline void backward_rows(const O* g, const T* x, const float* w, const float* rstd,
                                                         T* gx, float* gw, int64_t H, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const O* gr = g + i * H;
    const T* xr = x + i * H;
    T* gxr = gx + i * H;
    const float r = rstd[i];
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < H; ++j) dot += static_cast<float>(gr[j]) * w[j] * static_cast<float>(xr[j]);
    const float c = dot * r / static_cast<float>(H);  // mean(g * w * n), with n = x * r
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const float gj = static_cast<float>(gr[j]), n = static_cast<float>(xr[j]) * r;
      gxr[j] = static_cast<T>(r * (gj * w[j] - n * c));
      gw[j] += gj * round_to<T>(n);
    }
  }
}

template <typename T, typename O>
void forward_plain(const T* x, const float* w, O* y, float* rstd, int64_t H, float eps, int64_t b, int64_t e) {
  forward_rows(x, w, y, rstd, H, eps, b, e);
}

template <typename T, typename O>
void backward_plain(const O* g, const T* x, const float* w, const float* rstd, T* gx, float* gw, int64_t H, int64_t b,
                    int64_t e) {
  backward_rows(g, x, w, rstd, gx, gw, H, b, e);
}

// Without an AVX2 path (not x86-64) CODEX_AVX2 is empty and has_avx2() is false, so these are never called.
template <typename T, typename O>
CODEX_AVX2 void forward_avx2(const T* x, const float* w, O* y, float* rstd, int64_t H, float eps, int64_t b,
                             int64_t e) {
  forward_rows(x, w, y, rstd, H, eps, b, e);
}

template <typename T, typename O>
CODEX_AVX2 void backward_avx2(const O* g, const T* x, const float* w, const float* rstd, T* gx, float* gw, int64_t H,
                              int64_t b, int64_t e) {
  backward_rows(g, x, w, rstd, gx, gw, H, b, e);
}

// Calls fn.template operator()<T, O>() for x's dtype T (fp32, bf16, fp16) and the output dtype O, which is
// either T or fp32 (the promotion of x's dtype with any of those weight dtypes).
template <typename Fn>
void dispatch(ScalarType x_type, ScalarType out_type, const char* name, Fn&& fn) {
  STD_TORCH_CHECK(out_type == x_type || out_type == ScalarType::Float, name, ": output dtype ", out_type,
                  " is neither x's dtype nor float32");
  THO_DISPATCH_SWITCH(x_type, "rms_norm",
                      THO_DISPATCH_CASE(ScalarType::Float, [&] { fn.template operator()<scalar_t, float>(); })
                      THO_DISPATCH_CASE(ScalarType::BFloat16, [&] {
                        if (out_type == x_type) fn.template operator()<scalar_t, scalar_t>();
                        else fn.template operator()<scalar_t, float>();
                      })
                      THO_DISPATCH_CASE(ScalarType::Half, [&] {
                        if (out_type == x_type) fn.template operator()<scalar_t, scalar_t>();
                        else fn.template operator()<scalar_t, float>();
                      }));
}

void check_inputs(const Tensor& x, const Tensor& weight) {
  STD_TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && x.size(x.dim() - 1) == weight.size(0),
                  "rms_norm: expected x [..., H] and weight [H], got ", shape(x), " and ", shape(weight));
  STD_TORCH_CHECK(x.is_cpu() && weight.is_cpu(), "rms_norm: this kernel runs on CPU tensors");
}

// Returns (y [..., H] in promote(x, weight), rstd [rows] fp32).
std::tuple<Tensor, Tensor> rms_norm(Tensor x, Tensor weight, double eps) {
  check_inputs(x, weight);
  const int64_t H = x.size(x.dim() - 1), rows = H == 0 ? 0 : x.numel() / H;
  const Tensor xc = codex_ml::cpu::contiguous(x);
  const Tensor w = codex_ml::cpu::contiguous(codex_ml::cpu::to(weight, ScalarType::Float));
  Tensor y = codex_ml::cpu::empty(x.sizes(), codex_ml::cpu::promote(x.scalar_type(), weight.scalar_type()));
  Tensor rstd = codex_ml::cpu::empty({rows}, ScalarType::Float);
  const bool avx2 = codex_ml::cpu::has_avx2();
  dispatch(x.scalar_type(), y.scalar_type(), "rms_norm", [&]<typename T, typename O>() {
    const T* xp = xc.const_data_ptr<T>();
    O* yp = y.mutable_data_ptr<O>();
    float* rp = rstd.mutable_data_ptr<float>();
    const float* wp = w.const_data_ptr<float>();
    torch::stable::parallel_for(0, rows, grain_rows(H), [&](int64_t begin, int64_t end) {
      if (avx2) {
        forward_avx2(xp, wp, yp, rp, H, static_cast<float>(eps), begin, end);
      } else {
        forward_plain(xp, wp, yp, rp, H, static_cast<float>(eps), begin, end);
      }
    });
  });
  return {y, rstd};
}

// Returns (grad_x like x, grad_weight like weight) for grad_y [..., H] (the output's dtype).
std::tuple<Tensor, Tensor> rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor rstd) {
  check_inputs(x, weight);
  STD_TORCH_CHECK(codex_ml::cpu::same_sizes(grad, x), "rms_norm_backward: grad ", shape(grad), " does not match x ",
                  shape(x));
  const int64_t H = x.size(x.dim() - 1), rows = H == 0 ? 0 : x.numel() / H;
  STD_TORCH_CHECK(rstd.scalar_type() == ScalarType::Float && rstd.numel() == rows,
                  "rms_norm_backward: rstd must be fp32 [rows]");
  const Tensor xc = codex_ml::cpu::contiguous(x), gc = codex_ml::cpu::contiguous(grad);
  const Tensor w = codex_ml::cpu::contiguous(codex_ml::cpu::to(weight, ScalarType::Float));
  const Tensor rc = codex_ml::cpu::contiguous(rstd);
  Tensor gx = codex_ml::cpu::empty(x.sizes(), x.scalar_type());
  // Fixed row blocks, one fp32 partial weight gradient each (see the top of the file).
  const int64_t blocks = std::max<int64_t>(
      1, std::min<int64_t>(torch::stable::get_num_threads(), (rows + grain_rows(H) - 1) / grain_rows(H)));
  Tensor partials = codex_ml::cpu::zeros({blocks, H}, ScalarType::Float);
  const bool avx2 = codex_ml::cpu::has_avx2();
  dispatch(x.scalar_type(), grad.scalar_type(), "rms_norm_backward", [&]<typename T, typename O>() {
    const O* gp = gc.const_data_ptr<O>();
    const T* xp = xc.const_data_ptr<T>();
    T* gxp = gx.mutable_data_ptr<T>();
    const float* wp = w.const_data_ptr<float>();
    const float* rp = rc.const_data_ptr<float>();
    float* pp = partials.mutable_data_ptr<float>();
    torch::stable::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
      for (int64_t blk = first; blk < last; ++blk) {
        const int64_t begin = rows * blk / blocks, end = rows * (blk + 1) / blocks;
        if (avx2) {
          backward_avx2(gp, xp, wp, rp, gxp, pp + blk * H, H, begin, end);
        } else {
          backward_plain(gp, xp, wp, rp, gxp, pp + blk * H, H, begin, end);
        }
      }
    });
  });
  return {gx, codex_ml::cpu::to(codex_ml::cpu::sum_rows(partials), weight.scalar_type())};
}

}  // namespace

CODEX_ML_CPU_OP_WITH_BACKWARD(
    rms_norm, "rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)",
    rms_norm_backward, "rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)")
