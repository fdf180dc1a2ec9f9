// Tile arithmetic of flash attention that does not depend on the GPU: masking, block ranges, the
// online-softmax update and the backward's dS. Used by kernels/attention/attention.cu and, compiled by a
// plain C++ compiler, by tests/kernels/attention_tile_test.cc (so this arithmetic is tested without a GPU).
//
// Conventions (the same as kernels/attention/triton.py): scores are kept in base-2 units,
// s2 = (q . k) * scale * log2(e), so that exp(x) = exp2(x * log2(e)); window <= 0 means no window;
// causal: key j visible to query i iff j <= i (and i - j < window); not causal: |i - j| < window.
#ifndef CODEX_ML_KERNELS_ATTENTION_TILE_H_
#define CODEX_ML_KERNELS_ATTENTION_TILE_H_

#include <math.h>

#ifdef __CUDACC__
#define CODEX_HD __host__ __device__ __forceinline__
#else
#define CODEX_HD inline
#endif

namespace codex_attention {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Multiplier turning q . k into a base-2 score.
CODEX_HD float score_scale_log2(float scale) { return scale * kLog2e; }

// Whether query i may attend to key j (both < T).
CODEX_HD bool allowed(int i, int j, int T, bool causal, int window) {
  if (i >= T || j >= T) return false;
  const int dist = i - j;
  if (causal && dist < 0) return false;
  if (window > 0 && (dist >= window || (!causal && -dist >= window))) return false;
  return true;
}

// Keys [*lo, *hi) that query rows [q_start, q_start + rows) may see; *lo is a multiple of block_n so
// that key tiles stay aligned. Tiles wholly outside the range are skipped (causal / window skipping).
CODEX_HD void key_range(int q_start, int rows, int T, bool causal, int window, int block_n, int* lo, int* hi) {
  int end = T;
  if (causal) {
    end = q_start + rows;
  } else if (window > 0) {
    end = q_start + rows + window - 1;
  }
  *hi = end < T ? end : T;
  int start = 0;
  if (window > 0) start = q_start - window + 1 > 0 ? q_start - window + 1 : 0;
  *lo = start / block_n * block_n;
}

// Query rows [*lo, *hi) that may see keys [k_start, k_start + cols); *lo is a multiple of block_m.
CODEX_HD void query_range(int k_start, int cols, int T, bool causal, int window, int block_m, int* lo, int* hi) {
  int start = 0;
  if (causal) {
    start = k_start;
  } else if (window > 0) {
    start = k_start - window + 1 > 0 ? k_start - window + 1 : 0;
  }
  *lo = start / block_m * block_m;
  int end = window > 0 ? k_start + cols + window - 1 : T;
  *hi = end < T ? end : T;
}

// Online softmax of one row, fed tile by tile: running max m (base 2) and sum l of exp2(s - m).
// A row that has seen only masked scores (-inf) keeps m = -inf; the shift then is 0, so its
// probabilities and rescale factor are exp2(-inf) = 0 instead of NaN.
struct RowState {
  float m;
  float l;
};

CODEX_HD RowState row_init() { return RowState{-INFINITY, 0.0f}; }

CODEX_HD float row_shift(float m) { return m == -INFINITY ? 0.0f : m; }

// New running max after a tile whose largest (base-2) score is tile_max.
CODEX_HD float row_new_max(float m, float tile_max) { return m > tile_max ? m : tile_max; }

// Factor rescaling the old sum and accumulator when the running max moves from m_old to m_new.
CODEX_HD float row_rescale(float m_old, float m_new) { return exp2f(m_old - row_shift(m_new)); }

// Unnormalized probability of a (base-2) score under running max m (masked scores are -inf -> 0).
CODEX_HD float row_prob(float s2, float m) { return exp2f(s2 - row_shift(m)); }

// Completes a tile: l = l * rescale + tile_sum (the sum of row_prob over the tile), m = m_new.
CODEX_HD RowState row_update(RowState state, float m_new, float tile_sum) {
  return RowState{m_new, state.l * row_rescale(state.m, m_new) + tile_sum};
}

// Natural-log log-sum-exp of the row (saved for the backward); -inf for a row with no visible key.
CODEX_HD float row_lse(RowState state) {
  return state.l > 0.0f ? (state.m + log2f(state.l)) * kLn2 : -INFINITY;
}

// 1 / l for normalizing the accumulator (0 for a row with no visible key, whose accumulator is 0).
CODEX_HD float row_inv_sum(RowState state) { return state.l > 0.0f ? 1.0f / state.l : 0.0f; }

// Backward: probability recomputed from the saved natural lse, and dS = P * (dP - delta),
// delta = rowsum(dO * O). dS is in units of the unscaled score; the caller multiplies dQ, dK by scale.
CODEX_HD float prob_from_lse(float s2, float lse) { return lse == -INFINITY ? 0.0f : exp2f(s2 - lse * kLog2e); }

CODEX_HD float grad_score(float p, float dp, float delta) { return p * (dp - delta); }

}  // namespace codex_attention

#endif  // CODEX_ML_KERNELS_ATTENTION_TILE_H_
