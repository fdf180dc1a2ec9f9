// Vectorized fp32 exp for the CPU kernels, and the run-time ISA dispatch around it. The extensions compile
// with -O3 and no -march (so they run on any x86-64 CPU); functions marked CODEX_AVX2 are compiled for
// AVX2+FMA and may only be called when cpu::has_avx2() says the CPU has both, those marked CODEX_AVX512 for
// AVX-512F and only called when cpu::has_avx512() says so. Elsewhere (not x86-64, or not GCC/Clang)
// CODEX_HAS_AVX2_PATH is 0 and the callers keep to their plain loops. PyTorch's ATEN_CPU_CAPABILITY
// environment variable caps the choice as it does for ATen's own kernels ("avx2": no AVX-512; "default":
// neither).
//
// Avx2::exp and Avx512::exp are Cephes' expf: range reduction to [-ln2/2, ln2/2], a degree-6 polynomial, relative
// error about 1e-7. Arguments are clamped at -87 below (exp(-87) ~ 1.6e-38 stands in for 0) and are NOT clamped
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

#include <cstdint>
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

// The vector types of the kernels' loops: Avx2 (8 lanes, AVX2+FMA) and Avx512 (16 lanes, AVX-512F), each a table
// of the operations the loops use, compiled for its instruction set. Intel spells each operation _mm<bits>_<op>,
// so one list serves both widths. A loop written once as an always-inlined template over S, called from a
// CODEX_AVX2 or CODEX_AVX512 function, runs on that function's vectors.
#define CODEX_VECTOR_TYPE(Name, BITS, TARGET)                                                                         \
  struct Name {                                                                                                       \
    using Vec = __m##BITS;                                                                                            \
    static constexpr int64_t kLanes = BITS / 32;                                                                      \
    TARGET static Vec set1(float x) { return _mm##BITS##_set1_ps(x); }                                                \
    TARGET static Vec load(const float* p) { return _mm##BITS##_loadu_ps(p); }                                        \
    TARGET static void store(float* p, Vec x) { _mm##BITS##_storeu_ps(p, x); }                                        \
    TARGET static Vec max(Vec a, Vec b) { return _mm##BITS##_max_ps(a, b); }                                          \
    TARGET static Vec add(Vec a, Vec b) { return _mm##BITS##_add_ps(a, b); }                                          \
    TARGET static Vec sub(Vec a, Vec b) { return _mm##BITS##_sub_ps(a, b); }                                          \
    TARGET static Vec mul(Vec a, Vec b) { return _mm##BITS##_mul_ps(a, b); }                                          \
    TARGET static Vec floor(Vec x) { return _mm##BITS##_floor_ps(x); }                                                \
    /* a * b + c, c - a * b and a * b - c, each rounded once */                                                       \
    TARGET static Vec fmadd(Vec a, Vec b, Vec c) { return _mm##BITS##_fmadd_ps(a, b, c); }                            \
    TARGET static Vec fnmadd(Vec a, Vec b, Vec c) { return _mm##BITS##_fnmadd_ps(a, b, c); }                          \
    TARGET static Vec fmsub(Vec a, Vec b, Vec c) { return _mm##BITS##_fmsub_ps(a, b, c); }                            \
    /* 2^n for integer-valued n in [-126, 127], built in the exponent bits */                                         \
    TARGET static Vec pow2(Vec n) {                                                                                   \
      const auto biased = _mm##BITS##_add_epi32(_mm##BITS##_cvtps_epi32(n), _mm##BITS##_set1_epi32(127));             \
      return _mm##BITS##_castsi##BITS##_ps(_mm##BITS##_slli_epi32(biased, 23));                                       \
    }                                                                                                                 \
    /* Cephes' expf (see the top of this file) */                                                                     \
    TARGET static Vec exp(Vec x) {                                                                                    \
      x = max(x, set1(-87.0f));                                                                                       \
      const Vec n = floor(fmadd(x, set1(1.44269504088896341f), set1(0.5f)));                                          \
      Vec r = fnmadd(n, set1(0.693359375f), x);                                                                       \
      r = fnmadd(n, set1(-2.12194440e-4f), r);                                                                        \
      Vec p = set1(1.9875691500e-4f);                                                                                 \
      p = fmadd(p, r, set1(1.3981999507e-3f));                                                                        \
      p = fmadd(p, r, set1(8.3334519073e-3f));                                                                        \
      p = fmadd(p, r, set1(4.1665795894e-2f));                                                                        \
      p = fmadd(p, r, set1(1.6666665459e-1f));                                                                        \
      p = fmadd(p, r, set1(5.0000001201e-1f));                                                                        \
      p = fmadd(p, mul(r, r), add(r, set1(1.0f)));                                                                    \
      return mul(p, pow2(n));                                                                                         \
    }                                                                                                                 \
    TARGET static float hsum(Vec x) { return codex_ml::cpu::hsum(x); }                                                \
    TARGET static float hmax(Vec x) { return codex_ml::cpu::hmax(x); }                                                \
  }

CODEX_VECTOR_TYPE(Avx2, 256, CODEX_AVX2);
CODEX_VECTOR_TYPE(Avx512, 512, CODEX_AVX512);
#undef CODEX_VECTOR_TYPE

// 1 / (1 + exp(-x)) from e = exp(-|x|) in (0, 1], so Avx2::exp only ever sees arguments <= 0:
// 1 / (1 + e) for x >= 0 and e / (1 + e) for x < 0. The reciprocal of 1 + e (in [1, 2]) is the 12-bit
// estimate refined by one Newton step (relative error ~1e-7), cheaper than a division.
CODEX_AVX2 inline __m256 sigmoid256(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 minus_abs = _mm256_or_ps(x, _mm256_set1_ps(-0.0f));
  // exp clamps its argument at -87 (exp = 1.6e-38): below that e is 0, so sigmoid(-1e38) is 0, not 1.6e-38.
  const __m256 e = _mm256_blendv_ps(Avx2::exp(minus_abs), _mm256_setzero_ps(),
                                    _mm256_cmp_ps(minus_abs, _mm256_set1_ps(-87.0f), _CMP_LT_OQ));
  const __m256 d = _mm256_add_ps(one, e);
  __m256 r = _mm256_rcp_ps(d);
  r = _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
  return _mm256_blendv_ps(r, _mm256_mul_ps(e, r), _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
}
#endif

}  // namespace codex_ml::cpu

#endif  // CODEX_ML_KERNELS_CPU_EXP_H_
