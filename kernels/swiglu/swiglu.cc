// SwiGLU on the CPU, elementwise over gate and up (same shape and dtype: fp32, bf16 or fp16):
//   forward   out = silu(gate) * up = gate * s * up,  s = sigmoid(gate)
//   backward  d_gate = g * up * s * (1 + gate * (1 - s)),  d_up = g * gate * s
// The backward recomputes s from the saved gate (nothing else is saved). Arithmetic is fp32: bf16/fp16 are
// converted in blocks of kBlock elements to fp32 scratch, computed, and converted back. The sigmoid uses
// kernels/common/cpu_exp.h's AVX2 exp where the CPU has AVX2+FMA, std::exp otherwise.
#include <torch/headeronly/core/Dispatch.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "kernels/common/cpu_exp.h"
#include "kernels/common/stable.h"

namespace {

using codex_ml::cpu::shape;
using codex_ml::cpu::Tensor;
using torch::headeronly::ScalarType;

constexpr int64_t kGrain = 1 << 14;  // elements per task at least
constexpr int64_t kBlock = 512;      // elements per fp32 scratch block (bf16/fp16)

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

void forward_plain(const float* gate, const float* up, float* out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) out[i] = gate[i] * sigmoid(gate[i]) * up[i];
}

void backward_plain(const float* grad, const float* gate, const float* up, float* d_gate, float* d_up, int64_t begin,
                    int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float s = sigmoid(gate[i]), gs = gate[i] * s;
    d_up[i] = grad[i] * gs;
    d_gate[i] = grad[i] * up[i] * (s + gs * (1.0f - s));
  }
}

#if CODEX_HAS_AVX2_PATH
using codex_ml::cpu::sigmoid256;

CODEX_AVX2 void forward_avx2(const float* gate, const float* up, float* out, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid256(g)), _mm256_loadu_ps(up + i)));
  }
  forward_plain(gate, up, out, i, end);
}

CODEX_AVX2 void backward_avx2(const float* grad, const float* gate, const float* up, float* d_gate, float* d_up,
                              int64_t begin, int64_t end) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i), dy = _mm256_loadu_ps(grad + i);
    const __m256 s = sigmoid256(g), gs = _mm256_mul_ps(g, s);
    _mm256_storeu_ps(d_up + i, _mm256_mul_ps(dy, gs));
    const __m256 dsilu = _mm256_fmadd_ps(gs, _mm256_sub_ps(one, s), s);  // s + gate * s * (1 - s)
    _mm256_storeu_ps(d_gate + i, _mm256_mul_ps(_mm256_mul_ps(dy, _mm256_loadu_ps(up + i)), dsilu));
  }
  backward_plain(grad, gate, up, d_gate, d_up, i, end);
}
#else
void forward_avx2(const float* gate, const float* up, float* out, int64_t begin, int64_t end) {
  forward_plain(gate, up, out, begin, end);
}
void backward_avx2(const float* grad, const float* gate, const float* up, float* d_gate, float* d_up, int64_t begin,
                   int64_t end) {
  backward_plain(grad, gate, up, d_gate, d_up, begin, end);
}
#endif

const bool kHasAvx2 = codex_ml::cpu::has_avx2();

void forward_f32(const float* gate, const float* up, float* out, int64_t begin, int64_t end) {
  kHasAvx2 ? forward_avx2(gate, up, out, begin, end) : forward_plain(gate, up, out, begin, end);
}

void backward_f32(const float* grad, const float* gate, const float* up, float* d_gate, float* d_up, int64_t begin,
                  int64_t end) {
  kHasAvx2 ? backward_avx2(grad, gate, up, d_gate, d_up, begin, end)
           : backward_plain(grad, gate, up, d_gate, d_up, begin, end);
}

// bf16/fp16 <-> fp32 for the scratch blocks: 8 at a time with AVX2 (bf16: bit shifts, rounding to nearest
// even as c10::BFloat16 does) and F16C (fp16), where the CPU has them; one at a time through c10 otherwise.
template <typename S, typename D>
void convert_plain(const S* src, D* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<D>(src[i]);
}

#if CODEX_HAS_AVX2_PATH
#define CODEX_F16C __attribute__((target("avx2,f16c")))
const bool kHasF16c = kHasAvx2 && __builtin_cpu_supports("f16c");

CODEX_AVX2 void convert_bf16(const c10::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
  }
  convert_plain(src + i, dst + i, n - i);
}

CODEX_AVX2 void convert_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(src + i);
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i h = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
    h = _mm256_blendv_epi8(h, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
  }
  convert_plain(src + i, dst + i, n - i);
}

CODEX_F16C void convert_fp16(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  convert_plain(src + i, dst + i, n - i);
}

CODEX_F16C void convert_fp16(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  convert_plain(src + i, dst + i, n - i);
}
#endif

template <typename S, typename D>
void convert(const S* src, D* dst, int64_t n) {
#if CODEX_HAS_AVX2_PATH
  if constexpr (std::is_same_v<S, c10::BFloat16> || std::is_same_v<D, c10::BFloat16>) {
    if (kHasAvx2) return convert_bf16(src, dst, n);
  } else if constexpr (std::is_same_v<S, c10::Half> || std::is_same_v<D, c10::Half>) {
    if (kHasF16c) return convert_fp16(src, dst, n);
  }
#endif
  convert_plain(src, dst, n);
}

// Elements [begin, end) of the forward: in place for fp32, through fp32 scratch blocks otherwise.
template <typename T>
void forward_range(const T* gate, const T* up, T* out, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<T, float>) {
    forward_f32(gate, up, out, begin, end);
  } else {
    float g[kBlock], u[kBlock], o[kBlock];
    for (int64_t s = begin; s < end; s += kBlock) {
      const int64_t n = std::min(kBlock, end - s);
      convert(gate + s, g, n);
      convert(up + s, u, n);
      forward_f32(g, u, o, 0, n);
      convert(o, out + s, n);
    }
  }
}

template <typename T>
void backward_range(const T* grad, const T* gate, const T* up, T* d_gate, T* d_up, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<T, float>) {
    backward_f32(grad, gate, up, d_gate, d_up, begin, end);
  } else {
    float dy[kBlock], g[kBlock], u[kBlock], dg[kBlock], du[kBlock];
    for (int64_t s = begin; s < end; s += kBlock) {
      const int64_t n = std::min(kBlock, end - s);
      convert(grad + s, dy, n);
      convert(gate + s, g, n);
      convert(up + s, u, n);
      backward_f32(dy, g, u, dg, du, 0, n);
      convert(dg, d_gate + s, n);
      convert(du, d_up + s, n);
    }
  }
}

// Calls fn.template operator()<T>() for T = float, BFloat16 or Half.
template <typename Fn>
void dispatch(ScalarType type, const Fn& fn) {
  THO_DISPATCH_SWITCH(type, "swiglu",
                      THO_DISPATCH_CASE(ScalarType::Float, [&] { fn.template operator()<scalar_t>(); })
                      THO_DISPATCH_CASE(ScalarType::BFloat16, [&] { fn.template operator()<scalar_t>(); })
                      THO_DISPATCH_CASE(ScalarType::Half, [&] { fn.template operator()<scalar_t>(); }));
}

void check_inputs(const Tensor& gate, const Tensor& up, const char* name) {
  STD_TORCH_CHECK(codex_ml::cpu::same_sizes(gate, up) && gate.scalar_type() == up.scalar_type(), name,
                  ": gate and up must have one shape and dtype, got ", shape(gate), " ", gate.scalar_type(), " and ",
                  shape(up), " ", up.scalar_type());
  STD_TORCH_CHECK(gate.is_cpu() && up.is_cpu(), name, ": this kernel runs on CPU tensors");
}

// silu(gate) * up, contiguous, in gate's dtype.
Tensor swiglu(Tensor gate, Tensor up) {
  check_inputs(gate, up, "swiglu");
  const Tensor g = codex_ml::cpu::contiguous(gate), u = codex_ml::cpu::contiguous(up);
  Tensor out = codex_ml::cpu::empty(gate.sizes(), gate.scalar_type());
  const auto run = [&]<typename T>() {
    const T *gp = g.const_data_ptr<T>(), *upp = u.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    torch::stable::parallel_for(0, g.numel(), kGrain, [&](int64_t b, int64_t e) { forward_range(gp, upp, op, b, e); });
  };
  dispatch(gate.scalar_type(), run);
  return out;
}

// (d_gate, d_up) for grad of the output, both contiguous in gate's dtype.
std::tuple<Tensor, Tensor> swiglu_backward(Tensor grad, Tensor gate, Tensor up) {
  check_inputs(gate, up, "swiglu_backward");
  STD_TORCH_CHECK(codex_ml::cpu::same_sizes(grad, gate), "swiglu_backward: grad ", shape(grad),
                  " does not match gate ", shape(gate));
  const Tensor dy = codex_ml::cpu::contiguous(codex_ml::cpu::to(grad, gate.scalar_type()));
  const Tensor g = codex_ml::cpu::contiguous(gate), u = codex_ml::cpu::contiguous(up);
  Tensor d_gate = codex_ml::cpu::empty(gate.sizes(), gate.scalar_type());
  Tensor d_up = codex_ml::cpu::empty(gate.sizes(), gate.scalar_type());
  const auto run = [&]<typename T>() {
    const T *dyp = dy.const_data_ptr<T>(), *gp = g.const_data_ptr<T>(), *upp = u.const_data_ptr<T>();
    T *dgp = d_gate.mutable_data_ptr<T>(), *dup = d_up.mutable_data_ptr<T>();
    torch::stable::parallel_for(0, g.numel(), kGrain,
                                [&](int64_t b, int64_t e) { backward_range(dyp, gp, upp, dgp, dup, b, e); });
  };
  dispatch(gate.scalar_type(), run);
  return {d_gate, d_up};
}

}  // namespace

CODEX_ML_CPU_OP_WITH_BACKWARD(
    swiglu, "swiglu(Tensor gate, Tensor up) -> Tensor",
    swiglu_backward, "swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)")
