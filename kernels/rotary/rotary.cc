// Rotary position embedding (rotate-half convention) on the CPU, for x [B, H, T, D] with D even:
//   forward   y  = x * cos + rotate_half(x) * sin,  rotate_half(x) = cat(-x[D/2:], x[:D/2])
//   backward  gx[i] = g[i] cos[i] + g[i + D/2] sin[i + D/2],  gx[i + D/2] = g[i + D/2] cos[i + D/2] - g[i] sin[i]
// (i < D/2), with cos, sin [T, D] fp32. Arithmetic is fp32; the output has x's dtype.
//
// In the model x is a transposed view of a projection ([B, T, H, D] memory, [B, H, T, D] shape), so the
// kernel reads rows of D elements through arbitrary strides of the first three dims (the last must be 1) and
// writes outputs with the strides the caller allocated (x's, via empty_like): no copy on either side. Rows
// are visited in the output's memory order.
#include <torch/headeronly/core/Dispatch.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "kernels/common/cpu_exp.h"
#include "kernels/common/stable.h"

namespace {

using codex_ml::cpu::shape;
using codex_ml::cpu::Tensor;
using torch::headeronly::ScalarType;

// Out = a * cos + rotate(a) * sin for one row; kBackward selects the transposed rotation (see the top).
template <bool kBackward, typename T>
__attribute__((always_inline)) inline void rotate_row(const T* a, T* out, const float* c, const float* s,
                                                      int64_t half) {
  const float* s_lo = kBackward ? s + half : s;  // multiplies a[i + half] into out[i]
  const float* s_hi = kBackward ? s : s + half;  // multiplies a[i] into out[i + half]
  constexpr float sign_lo = kBackward ? 1.0f : -1.0f;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float lo = static_cast<float>(a[i]), hi = static_cast<float>(a[i + half]);
    out[i] = static_cast<T>(lo * c[i] + sign_lo * hi * s_lo[i]);
    out[i + half] = static_cast<T>(hi * c[i + half] - sign_lo * lo * s_hi[i]);
  }
}

// The three leading dims of x (rows of D elements), permuted into the loop order, outermost first.
struct RowWalk {
  std::array<int64_t, 3> sizes, in_strides, out_strides;  // in loop order
  std::array<int64_t, 3> t_strides;                        // 1 for the T dim, 0 otherwise (cos/sin row)
};

// Rows [begin, end) of the walk's loop order; the index is advanced like an odometer, not divided per row.
template <bool kBackward, typename T>
__attribute__((always_inline)) inline void rotate_rows(const RowWalk& w, const T* in, T* out, const float* cos,
                                                       const float* sin, int64_t D, int64_t begin, int64_t end) {
  std::array<int64_t, 3> idx{begin / (w.sizes[1] * w.sizes[2]), begin / w.sizes[2] % w.sizes[1],
                             begin % w.sizes[2]};
  for (int64_t r = begin; r < end; ++r) {
    int64_t in_off = 0, out_off = 0, t = 0;
    for (int k = 0; k < 3; ++k) {
      in_off += idx[k] * w.in_strides[k];
      out_off += idx[k] * w.out_strides[k];
      t += idx[k] * w.t_strides[k];
    }
    rotate_row<kBackward>(in + in_off, out + out_off, cos + t * D, sin + t * D, D / 2);
    for (int k = 2; k >= 0 && ++idx[k] == w.sizes[k]; --k) idx[k] = 0;
  }
}

template <bool kBackward, typename T>
void rotate_plain(const RowWalk& w, const T* in, T* out, const float* cos, const float* sin, int64_t D, int64_t b,
                  int64_t e) {
  rotate_rows<kBackward>(w, in, out, cos, sin, D, b, e);
}

// Without an AVX2 path (not x86-64) CODEX_AVX2 is empty and has_avx2() is false, so this is never called.
template <bool kBackward, typename T>
CODEX_AVX2 void rotate_avx2(const RowWalk& w, const T* in, T* out, const float* cos, const float* sin, int64_t D,
                            int64_t b, int64_t e) {
  rotate_rows<kBackward>(w, in, out, cos, sin, D, b, e);
}

// out = rotary(in) (forward) or its transpose (backward); `out` is allocated by the caller, any strides with
// stride(-1) == 1.
template <bool kBackward>
void rotate(const Tensor& in_tensor, Tensor& out, const Tensor& cos_tensor, const Tensor& sin_tensor) {
  const Tensor in = in_tensor.stride(3) == 1 ? in_tensor : codex_ml::cpu::contiguous(in_tensor);
  const Tensor cos = codex_ml::cpu::contiguous(cos_tensor), sin = codex_ml::cpu::contiguous(sin_tensor);
  const int64_t D = in.size(3), rows = in.size(0) * in.size(1) * in.size(2);
  if (rows == 0 || D == 0) return;
  // Loop order: the output's dims by decreasing stride, so that writes (and for x's layout, reads) stream.
  std::array<int, 3> order{0, 1, 2};
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return out.stride(a) > out.stride(b); });
  RowWalk walk;
  for (int k = 0; k < 3; ++k) {
    walk.sizes[k] = in.size(order[k]);
    walk.in_strides[k] = in.stride(order[k]);
    walk.out_strides[k] = out.stride(order[k]);
    walk.t_strides[k] = order[k] == 2 ? 1 : 0;
  }
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / D);
  const bool avx2 = codex_ml::cpu::has_avx2();
  const float *cp = cos.const_data_ptr<float>(), *sp = sin.const_data_ptr<float>();
  const auto run = [&]<typename T>() {
    const T* ip = in.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    torch::stable::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
      if (avx2) {
        rotate_avx2<kBackward>(walk, ip, op, cp, sp, D, b, e);
      } else {
        rotate_plain<kBackward>(walk, ip, op, cp, sp, D, b, e);
      }
    });
  };
  THO_DISPATCH_SWITCH(in.scalar_type(), "rotary",
                      THO_DISPATCH_CASE(ScalarType::Float, [&] { run.template operator()<scalar_t>(); })
                      THO_DISPATCH_CASE(ScalarType::BFloat16, [&] { run.template operator()<scalar_t>(); })
                      THO_DISPATCH_CASE(ScalarType::Half, [&] { run.template operator()<scalar_t>(); }));
}

void check_inputs(const Tensor& x, const Tensor& cos, const Tensor& sin, const char* name) {
  STD_TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, name, ": expected x [B, H, T, D] with D even, got ",
                  shape(x));
  STD_TORCH_CHECK(cos.dim() == 2 && cos.size(0) == x.size(2) && cos.size(1) == x.size(3) &&
                      codex_ml::cpu::same_sizes(sin, cos),
                  name, ": expected cos and sin [T, D] = [", x.size(2), ", ", x.size(3), "], got ", shape(cos),
                  " and ", shape(sin));
  STD_TORCH_CHECK(cos.scalar_type() == ScalarType::Float && sin.scalar_type() == ScalarType::Float, name,
                  ": cos and sin must be float32");
  STD_TORCH_CHECK(x.is_cpu() && cos.is_cpu() && sin.is_cpu(), name, ": this kernel runs on CPU tensors");
}

// y = rotary(x), with x's strides (empty_like) when x's last dim is contiguous.
Tensor rotary(Tensor x, Tensor cos, Tensor sin) {
  check_inputs(x, cos, sin, "rotary");
  const Tensor xin = x.stride(3) == 1 ? x : codex_ml::cpu::contiguous(x);
  Tensor y = torch::stable::empty_like(xin);
  rotate<false>(xin, y, cos, sin);
  return y;
}

// The gradient of x for grad of the output, allocated with the given strides (the forward output's).
Tensor rotary_backward(Tensor grad, Tensor cos, Tensor sin, std::vector<int64_t> strides) {
  check_inputs(grad, cos, sin, "rotary_backward");
  STD_TORCH_CHECK(strides.size() == 4 && strides[3] == 1, "rotary_backward: strides must be 4 ints ending in 1, got ",
                  shape(codex_ml::cpu::IntArrayRef(strides.data(), strides.size())));
  Tensor gx = codex_ml::cpu::empty_strided(grad.sizes(), codex_ml::cpu::IntArrayRef(strides.data(), strides.size()),
                                           grad.scalar_type());
  rotate<true>(grad, gx, cos, sin);
  return gx;
}

}  // namespace

CODEX_ML_CPU_OP_WITH_BACKWARD(
    rotary, "rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor",
    rotary_backward, "rotary_backward(Tensor grad, Tensor cos, Tensor sin, int[] strides) -> Tensor")
