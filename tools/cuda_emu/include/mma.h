// cuda_emu's <mma.h>: nvcuda::wmma 16x16x16 fragments (fp16/bf16 inputs, fp32 accumulators) on the CPU.
// Every lane holds the whole 16x16 matrix (the device spreads it over the lanes in an unspecified
// layout, so kernels can only use a fragment whole or element-wise alike, which this keeps).
// Memory ordering is as strict as the CUDA memory model allows: a load reads when its lane gets there (so
// what other lanes wrote before it needs a __syncwarp first) and no lane goes on until all have read; a
// store waits for all lanes, then each element is written by one lane only (element e by lane e % 32), so
// reading a stored tile element by element needs a __syncwarp too.
#ifndef CODEX_ML_TOOLS_CUDA_EMU_MMA_H_
#define CODEX_ML_TOOLS_CUDA_EMU_MMA_H_

#include "cuda_emu.h"

namespace nvcuda {
namespace wmma {
namespace {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "cuda_emu models the 16x16x16 shape only");
  static constexpr int num_elements = 256;
  float x[256];  // row-major; inputs converted exactly to fp32
};

inline float element_to_float(__half h) { return __half2float(h); }
inline float element_to_float(__nv_bfloat16 b) { return __bfloat162float(b); }
inline float element_to_float(float f) { return f; }

// value rounded to the fragment's element type, back in fp32.
template <typename T>
float rounded(float value) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(__float2half_rn(value));
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(__float2bfloat16_rn(value));
  return value;
}

template <typename T>
void check_operand(const void* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    ::cuda_emu::fail(cudaErrorMisalignedAddress, "wmma: the matrix pointer is not 256-bit (32-byte) aligned");
  }
  if ((ldm * sizeof(T)) % 16 != 0) ::cuda_emu::fail(cudaErrorMisalignedAddress, "wmma: ldm is not a multiple of 16 bytes");
}

void collective_enter() { ::cuda_emu::warp_sync(0xffffffffu, "a wmma operation with an exited lane"); }
void collective_end() { collective_enter(); }

// Element (r, c) of a 16x16 matrix at p: row-major p[r * ldm + c], column-major p[c * ldm + r].
template <typename T>
void load(float* x, const T* p, unsigned ldm, bool row) {
  check_operand<T>(p, ldm);
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) x[r * 16 + c] = element_to_float(row ? p[r * ldm + c] : p[c * ldm + r]);
  }
  collective_end();  // every lane has read before any lane writes again
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load takes a layout_t");
  load(f.x, p, ldm, std::is_same_v<Layout, row_major>);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  load(f.x, p, ldm, layout == mem_row_major);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  check_operand<float>(p, ldm);
  collective_enter();
  for (int e = static_cast<int>(::cuda_emu::lane()); e < 256; e += 32) {
    const int r = e / 16, c = e % 16;
    p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.x[e];
  }
}

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float value) {
  const float v = rounded<T>(value);
  for (float& e : f.x) e = v;
}

// d = a b + c in fp32 (d may be c).
template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "fp16 or bf16 inputs");
  float out[256];
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 16; ++n) {
      float sum = c.x[r * 16 + n];
      for (int k = 0; k < 16; ++k) sum += a.x[r * 16 + k] * b.x[k * 16 + n];
      out[r * 16 + n] = sum;
    }
  }
  memcpy(d.x, out, sizeof(out));
}

}  // namespace
}  // namespace wmma
}  // namespace nvcuda

#endif  // CODEX_ML_TOOLS_CUDA_EMU_MMA_H_
