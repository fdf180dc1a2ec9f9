// Vectorized fp32 exp for the CPU kernels, and the run-time ISA dispatch around it. The extensions compile
// with -O3 and no -march (so they run on any x86-64 CPU); functions marked CODEX_AVX2 are compiled for
// AVX2+FMA and may only be called when cpu::has_avx2() says the CPU has both, those marked CODEX_AVX512 for
// AVX-512F and only called when cpu::has_avx512() says so. Elsewhere (not x86-64, or not GCC/Clang)
// CODEX_HAS_AVX2_PATH is 0 and the callers keep to their plain loops. PyTorch's ATEN_CPU_CAPABILITY
// environment variable caps the choice as it does for ATen's own kernels ("avx2": no AVX-512; "default":
// neither).
//
// exp256/exp512 are Cephes' expf: range reduction to [-ln2/2, ln2/2], a degree-6 polynomial, relative error
// about 1e-7. Arguments are clamped at -87 below (exp(-87) ~ 1.6e-38 stands in for 0) and are NOT clamped
// above: callers pass x <= 0 (the kernels arrange their formulas so; see sigmoid256).
#ifndef CODEX_ML_KERNELS_CPU_EXP_H_
#define CODEX_ML_KERNELS_CPU_EXP_H_

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define CODEX_HAS_AVX2_PATH 1
#define CODEX_AVX2 __attribute__((target("avx2,fma")))
#define CODEX_AVX512 __attribute__((target("avx512f,avx2,fma")))
#else
#define CODEX_HAS_AVX2_PATH 0
#define CODEX_AVX2
#define CODEX_AVX512
#endif

#include <cstdlib>
#include <cstring>

namespace codex_ml::cpu {

// ATEN_CPU_CAPABILITY as a rank: 0 "default", 1 "avx2", 2 anything else or unset (no cap).
inline int capability_cap() {
  const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
  if (cap == nullptr) return 2;
  if (std::strcmp(cap, "default") == 0) return 0;
  return std::strcmp(cap, "avx2") == 0 ? 1 : 2;
}

// Whether the CPU running this process has AVX2 and FMA (checked once).
inline bool has_avx2() {
#if CODEX_HAS_AVX2_PATH
  static const bool supported =
      capability_cap() >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

// Whether the CPU running this process has AVX-512F (and AVX2 and FMA; checked once).
inline bool has_avx512() {
#if CODEX_HAS_AVX2_PATH
  static const bool supported = has_avx2() && capability_cap() >= 2 && __builtin_cpu_supports("avx512f");
  return supported;
#else
  return false;
#endif
}

#if CODEX_HAS_AVX2_PATH
CODEX_AVX2 inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// 1 / (1 + exp(-x)) from e = exp(-|x|) in (0, 1], so exp256 only ever sees arguments <= 0:
// 1 / (1 + e) for x >= 0 and e / (1 + e) for x < 0. The reciprocal of 1 + e (in [1, 2]) is the 12-bit
// estimate refined by one Newton step (relative error ~1e-7), cheaper than a division.
CODEX_AVX2 inline __m256 sigmoid256(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 minus_abs = _mm256_or_ps(x, _mm256_set1_ps(-0.0f));
  // exp256 clamps its argument at -87 (exp = 1.6e-38): below that e is 0, so sigmoid(-1e38) is 0, not 1.6e-38.
  const __m256 e = _mm256_blendv_ps(exp256(minus_abs), _mm256_setzero_ps(),
                                    _mm256_cmp_ps(minus_abs, _mm256_set1_ps(-87.0f), _CMP_LT_OQ));
  const __m256 d = _mm256_add_ps(one, e);
  __m256 r = _mm256_rcp_ps(d);
  r = _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
  return _mm256_blendv_ps(r, _mm256_mul_ps(e, r), _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
}

CODEX_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

CODEX_AVX2 inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// The two 8-lane halves of a 16-lane vector (AVX-512F only; GCC 12's _mm512_reduce_* warn spuriously).
CODEX_AVX512 inline __m256 low_half(__m512 v) { return _mm512_castps512_ps256(v); }
CODEX_AVX512 inline __m256 high_half(__m512 v) {
  return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}
CODEX_AVX512 inline float hsum(__m512 v) { return hsum(_mm256_add_ps(low_half(v), high_half(v))); }
CODEX_AVX512 inline float hmax(__m512 v) { return hmax(_mm256_max_ps(low_half(v), high_half(v))); }

// exp256 on 16 lanes.
CODEX_AVX512 inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#endif

}  // namespace codex_ml::cpu

#endif  // CODEX_ML_KERNELS_CPU_EXP_H_
