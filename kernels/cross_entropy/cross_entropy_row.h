// Per-element and per-row arithmetic of the softmax cross-entropy row kernel that does not depend on the
// GPU: the logit softcap, the online log-sum-exp (one element at a time, and the merge of two partial
// states that the warp/block reductions use), the loss of a row and the gradient of one logit. Used by
// kernels/cross_entropy/cross_entropy.cu and, compiled by a plain C++ compiler, by
// tests/kernels/cross_entropy_row_test.cc (so this arithmetic is tested without a GPU).
//
// The math is that of codex_ml.ops.cross_entropy._chunk_rows (and kernels/cross_entropy/triton.py), with
// z = softcap * tanh(x / softcap) (z = x without a softcap), lse = logsumexp(z), t the target, s the
// label smoothing and V the vocabulary:
//   loss = lse - (1 - s) z_t - s mean(z) + z_loss lse^2
//   d(scale * loss)/dx_j = scale ((1 + 2 z_loss lse) softmax(z)_j - s / V - (1 - s) [j == t]) dz_j/dx_j,
//   dz/dx = 1 - (z / softcap)^2 (1 without a softcap).
// Ignored rows (target == ignore_index) have loss 0, lse 0 and gradient 0. All arithmetic is fp32.
#ifndef CODEX_ML_KERNELS_CROSS_ENTROPY_ROW_H_
#define CODEX_ML_KERNELS_CROSS_ENTROPY_ROW_H_

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define CODEX_CE_HD __host__ __device__ __forceinline__
#else
#define CODEX_CE_HD inline
#endif

namespace codex_cross_entropy {

// softcap * tanh(x / softcap), or x itself when softcap <= 0 (no cap).
CODEX_CE_HD float softcap_apply(float x, float softcap) { return softcap > 0.0f ? softcap * tanhf(x / softcap) : x; }

// dz/dx of the softcap, written in terms of the capped value z: 1 - (z / softcap)^2 (1 without a cap).
CODEX_CE_HD float softcap_grad(float z, float softcap) {
  if (softcap <= 0.0f) return 1.0f;
  const float r = z / softcap;
  return 1.0f - r * r;
}

// What a pass over (part of) a row accumulates: the running max m and the sum s of exp(z - m) (online
// log-sum-exp), and the plain sum of z (for the label-smoothing term). Empty: m = -inf, s = 0, zsum = 0.
struct RowStats {
  float m;
  float s;
  float zsum;
};

CODEX_CE_HD RowStats stats_init() { return RowStats{-INFINITY, 0.0f, 0.0f}; }

// Adds one (capped) logit. z = -inf (a masked logit) adds nothing to s (no NaN from -inf - -inf);
// a NaN logit makes s NaN, so it shows in the loss.
CODEX_CE_HD RowStats stats_push(RowStats st, float z) {
  if (z > st.m) {
    st.s = st.s * expf(st.m - z) + 1.0f;  // m = -inf: exp(-inf) = 0, s = 1
    st.m = z;
  } else if (z != -INFINITY) {
    st.s += expf(z - st.m);
  }
  st.zsum += z;
  return st;
}

// Combines the states of two disjoint parts of a row (associative and commutative up to rounding, so
// any reduction tree gives the same result within fp32 rounding). Empty parts (m = -inf) contribute 0.
CODEX_CE_HD RowStats stats_merge(RowStats a, RowStats b) {
  const float m = a.m > b.m ? a.m : b.m;
  RowStats r;
  r.m = m;
  if (m == -INFINITY) {
    r.s = a.s + b.s;  // both empty (or all -inf): 0
  } else {
    r.s = (a.m == -INFINITY ? 0.0f : a.s * expf(a.m - m)) + (b.m == -INFINITY ? 0.0f : b.s * expf(b.m - m));
  }
  r.zsum = a.zsum + b.zsum;
  return r;
}

// Natural log-sum-exp of the row: m + log(s) (-inf for a row of only -inf logits).
CODEX_CE_HD float stats_lse(RowStats st) { return st.m + logf(st.s); }

// Whether a row takes part in the loss.
CODEX_CE_HD bool row_valid(int64_t target, int64_t ignore_index) { return target != ignore_index; }

// Whether a (non-ignored) target indexes the vocabulary; the kernel reads z_t only then (NaN loss otherwise).
CODEX_CE_HD bool target_in_range(int64_t target, int64_t v) { return target >= 0 && target < v; }

// The loss of a non-ignored row from its lse, its target's capped logit z_t and the sum of capped logits.
// Without label smoothing the mean term is skipped, not multiplied by 0, so that a masked (-inf) logit
// gives a finite loss (as in torch.nn.functional.cross_entropy).
CODEX_CE_HD float row_loss(float lse, float zt, float zsum, int64_t v, float label_smoothing, float z_loss) {
  const float smooth = label_smoothing > 0.0f ? label_smoothing * (zsum / static_cast<float>(v)) : 0.0f;
  return lse - (1.0f - label_smoothing) * zt - smooth + z_loss * lse * lse;
}

// Per-row coefficients of the gradient, so that one logit costs one exp:
//   g_j = (softmax_coef * exp(z_j - lse) - uniform - [j == t] target_coef) * dz_j/dx_j.
struct GradCoeffs {
  float lse;
  float softmax_coef;  // scale * (1 + 2 z_loss lse)
  float uniform;       // scale * label_smoothing / V
  float target_coef;   // scale * (1 - label_smoothing)
  float softcap;
};

CODEX_CE_HD GradCoeffs grad_coeffs(float lse, float scale, int64_t v, float label_smoothing, float z_loss,
                                   float softcap) {
  return GradCoeffs{lse, scale * (1.0f + 2.0f * z_loss * lse), scale * label_smoothing / static_cast<float>(v),
                    scale * (1.0f - label_smoothing), softcap};
}

// d(scale * loss)/dx of one logit, given its capped value z (softcap_apply of the raw logit).
CODEX_CE_HD float row_grad(float z, bool is_target, GradCoeffs k) {
  float g = k.softmax_coef * expf(z - k.lse) - k.uniform;
  if (is_target) g -= k.target_coef;
  return g * softcap_grad(z, k.softcap);
}

}  // namespace codex_cross_entropy

#endif  // CODEX_ML_KERNELS_CROSS_ENTROPY_ROW_H_
