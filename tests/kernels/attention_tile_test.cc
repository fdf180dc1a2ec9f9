// Host test of kernels/attention/attention_tile.h, the tile math shared with the CUDA attention kernel:
// the online softmax fed in random-size tiles against a direct two-pass softmax in double, the masking
// predicate against its definition, and the block ranges against the set of visible pairs.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kernels/attention/attention_tile.h"

namespace ca = codex_attention;

static int failures = 0;

#define EXPECT(cond, ...)                                   \
  do {                                                      \
    if (!(cond)) {                                          \
      ++failures;                                           \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                    \
      std::fprintf(stderr, "\n");                           \
    }                                                       \
  } while (0)

// Online softmax over tiles vs two passes in double: lse and the probability-weighted sum of values.
static void test_online_softmax_matches_two_pass(std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> length(1, 300), tile(1, 70), spread(0, 3);
  for (int trial = 0; trial < 500; ++trial) {
    const int n = length(rng);
    const float magnitude = std::pow(10.0f, static_cast<float>(spread(rng)));  // scores up to ~1e3
    const float scale = 0.125f;
    std::vector<float> dot(n), value(n);
    std::vector<bool> visible(n);
    bool any = false;
    for (int j = 0; j < n; ++j) {
      dot[j] = magnitude * normal(rng);
      value[j] = normal(rng);
      visible[j] = (rng() % 4) != 0 || j == n - 1;  // some masked keys, at least one visible
      any = any || visible[j];
    }
    // Reference in double: natural-log lse of scale * dot over visible keys, and sum softmax * value.
    double max_score = -INFINITY;
    for (int j = 0; j < n; ++j) {
      if (visible[j]) max_score = std::fmax(max_score, static_cast<double>(scale) * dot[j]);
    }
    double sum = 0.0, weighted = 0.0;
    for (int j = 0; j < n; ++j) {
      if (!visible[j]) continue;
      const double e = std::exp(static_cast<double>(scale) * dot[j] - max_score);
      sum += e;
      weighted += e * value[j];
    }
    const double ref_lse = max_score + std::log(sum), ref_out = weighted / sum;

    // The kernel's way: tiles of random width, masked scores -inf, accumulator rescaled.
    ca::RowState state = ca::row_init();
    float acc = 0.0f;
    const float c = ca::score_scale_log2(scale);
    for (int start = 0; start < n;) {
      const int end = std::min(n, start + tile(rng));
      float tile_max = -INFINITY;
      for (int j = start; j < end; ++j) {
        if (visible[j]) tile_max = std::fmax(tile_max, dot[j] * c);
      }
      const float m_new = ca::row_new_max(state.m, tile_max);
      float tile_sum = 0.0f, tile_acc = 0.0f;
      for (int j = start; j < end; ++j) {
        const float p = ca::row_prob(visible[j] ? dot[j] * c : -INFINITY, m_new);
        tile_sum += p;
        tile_acc += p * value[j];
      }
      acc = acc * ca::row_rescale(state.m, m_new) + tile_acc;
      state = ca::row_update(state, m_new, tile_sum);
      start = end;
    }
    const float lse = ca::row_lse(state), out = acc * ca::row_inv_sum(state);
    EXPECT(any && std::isfinite(lse) && std::isfinite(out), "non-finite result, trial %d", trial);
    // fp32 rounds a score s to within |s| * 6e-8, so probabilities carry a relative error of ~|s| * 1e-7:
    // the bound grows with the largest score (up to ~125 here).
    const double bound = 1e-6 * std::fmax(10.0, std::fabs(max_score));
    EXPECT(std::fabs(lse - ref_lse) <= bound * std::fmax(1.0, std::fabs(ref_lse)), "lse %f vs %f", lse, ref_lse);
    EXPECT(std::fabs(out - ref_out) <= bound * std::fmax(1.0, std::fabs(ref_out)), "out %f vs %f", out, ref_out);
    // The backward's recomputed probabilities sum to one over the visible keys.
    double p_sum = 0.0;
    for (int j = 0; j < n; ++j) p_sum += ca::prob_from_lse(visible[j] ? dot[j] * c : -INFINITY, lse);
    EXPECT(std::fabs(p_sum - 1.0) < 1e-4, "recomputed probabilities sum to %f", p_sum);
  }
}

// A row whose first tiles are fully masked: no NaN, and they contribute nothing.
static void test_fully_masked_tiles_give_no_nan() {
  ca::RowState state = ca::row_init();
  float m_new = ca::row_new_max(state.m, -INFINITY);
  EXPECT(ca::row_prob(-INFINITY, m_new) == 0.0f, "masked probability is not 0");
  EXPECT(ca::row_rescale(state.m, m_new) == 0.0f, "rescale of an empty row is not 0");
  state = ca::row_update(state, m_new, 0.0f);
  EXPECT(state.l == 0.0f && ca::row_lse(state) == -INFINITY && ca::row_inv_sum(state) == 0.0f, "empty row");
  m_new = ca::row_new_max(state.m, 2.0f);
  EXPECT(ca::row_rescale(state.m, m_new) == 0.0f && !std::isnan(ca::row_rescale(state.m, m_new)), "rescale NaN");
  state = ca::row_update(state, m_new, ca::row_prob(2.0f, m_new));
  EXPECT(state.m == 2.0f && state.l == 1.0f, "m %f l %f", state.m, state.l);
  EXPECT(ca::prob_from_lse(1.0f, -INFINITY) == 0.0f, "probability of a row without keys");
  EXPECT(ca::grad_score(0.5f, 3.0f, 1.0f) == 1.0f, "dS = P (dP - delta)");
}

static bool visible_by_definition(int i, int j, int T, bool causal, int window) {
  if (i >= T || j >= T) return false;
  if (causal && j > i) return false;
  if (window > 0) return causal ? i - j < window : std::abs(i - j) < window;
  return true;
}

// The block ranges of one side, query blocks (key_range) or key blocks (query_range): for each block, the range
// [lo, hi) of the other side's rows it scans starts aligned to the other side's blocks and holds every visible pair.
static void check_block_ranges(bool query_blocks, int T, bool causal, int window, int block_m, int block_n) {
  const int block = query_blocks ? block_m : block_n, other_block = query_blocks ? block_n : block_m;
  const char* side = query_blocks ? "query" : "key";
  const char* other = query_blocks ? "key" : "query";
  for (int r0 = 0; r0 < T; r0 += block) {
    int lo, hi;
    if (query_blocks) {
      ca::key_range(r0, block_m, T, causal, window, block_n, &lo, &hi);
    } else {
      ca::query_range(r0, block_n, T, causal, window, block_m, &lo, &hi);
    }
    EXPECT(lo % other_block == 0 && lo >= 0 && hi <= T, "%s range [%d, %d)", other, lo, hi);
    for (int r = r0; r < r0 + block; ++r) {
      for (int c = 0; c < T; ++c) {
        const bool visible = query_blocks ? ca::allowed(r, c, T, causal, window) : ca::allowed(c, r, T, causal, window);
        if (visible) {
          EXPECT(lo <= c && c < hi, "%s %d of %s %d outside [%d, %d) (T=%d causal=%d window=%d)", other, c, side, r,
                 lo, hi, T, causal, window);
        }
      }
    }
  }
}

// The predicate matches its definition, and the block ranges cover every visible pair (so skipping
// tiles outside them loses nothing) with aligned starts.
static void test_masks_and_block_ranges() {
  const int block_m = 16, block_n = 8;
  for (int T : {1, 7, 17, 40}) {
    for (bool causal : {true, false}) {
      for (int window : {0, 1, 3, 9, 100}) {
        for (int i = 0; i < T + 3; ++i) {
          for (int j = 0; j < T + 3; ++j) {
            EXPECT(ca::allowed(i, j, T, causal, window) == visible_by_definition(i, j, T, causal, window),
                   "allowed(%d, %d, T=%d, causal=%d, window=%d)", i, j, T, causal, window);
          }
        }
        for (bool query_blocks : {true, false}) check_block_ranges(query_blocks, T, causal, window, block_m, block_n);
      }
    }
  }
  // Skipping is real: a causal, windowed query block does not scan from key 0 or to the end.
  int lo, hi;
  ca::key_range(64, 16, 200, true, 8, 8, &lo, &hi);
  EXPECT(lo == 56 && hi == 80, "causal window key range [%d, %d), expected [56, 80)", lo, hi);
}

int main() {
  std::mt19937 rng(1234);
  test_online_softmax_matches_two_pass(rng);
  test_fully_masked_tiles_give_no_nan();
  test_masks_and_block_ranges();
  if (failures) {
    std::fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  std::printf("attention_tile_test: all checks passed\n");
  return 0;
}
