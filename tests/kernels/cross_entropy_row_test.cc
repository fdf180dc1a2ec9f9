// Host test of kernels/cross_entropy/cross_entropy_row.h, the per-row arithmetic shared with the CUDA cross-entropy
// kernel (kernels/cross_entropy/cross_entropy.cu). Random rows (V from 1 to a few thousand, odd sizes included,
// logits up to ~1e3 and some masked -inf ones) are processed the kernel's way: the row dealt out to G lanes
// (G = 1, 32, 256, 512, strided in 4-element vectors after a random head, like the kernel's float4 loads),
// each lane's online log-sum-exp, then the xor-butterfly merge of a warp and the merge of the warps'
// states. The loss, lse and every gradient element are checked against a float64 reference (the formula of
// codex_ml.ops.cross_entropy._chunk_rows) for every combination of label smoothing, z-loss, softcap and ignored rows.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "kernels/cross_entropy/cross_entropy_row.h"

namespace ce = codex_cross_entropy;

static int failures = 0;
static int checks = 0;

#define EXPECT(cond, ...)                                       \
  do {                                                          \
    ++checks;                                                   \
    if (!(cond)) {                                              \
      if (++failures <= 30) {                                   \
        std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
        std::fprintf(stderr, __VA_ARGS__);                      \
        std::fprintf(stderr, "\n");                             \
      }                                                         \
    }                                                           \
  } while (0)

struct Options {
  float label_smoothing;
  float z_loss;
  float softcap;  // <= 0: none
};

struct Reference {
  double loss, lse;
  std::vector<double> grad;
};

// float64 reference of one row: _chunk_rows in codex_ml.ops.cross_entropy.py.
static Reference reference_row(const std::vector<float>& x, int64_t t, int64_t ignore_index, double scale,
                               const Options& o) {
  const int64_t v = static_cast<int64_t>(x.size());
  Reference ref{0.0, 0.0, std::vector<double>(v, 0.0)};
  if (t == ignore_index) return ref;
  std::vector<double> z(v);
  for (int64_t j = 0; j < v; ++j) z[j] = o.softcap > 0 ? o.softcap * std::tanh(x[j] / double(o.softcap)) : x[j];
  double m = -INFINITY, zsum = 0.0;
  for (double zj : z) {
    m = std::max(m, zj);
    zsum += zj;
  }
  double s = 0.0;
  for (double zj : z) s += std::exp(zj - m);
  const double lse = m + std::log(s), ls = o.label_smoothing;
  ref.lse = lse;
  ref.loss = lse - (1 - ls) * z[t] - (ls > 0 ? ls * zsum / v : 0.0) + o.z_loss * lse * lse;
  for (int64_t j = 0; j < v; ++j) {
    double g = std::exp(z[j] - lse) * (1 + 2 * o.z_loss * lse) - ls / v - (j == t ? 1 - ls : 0.0);
    g *= scale;
    if (o.softcap > 0) g *= 1 - (z[j] / o.softcap) * (z[j] / o.softcap);
    ref.grad[j] = g;
  }
  return ref;
}

// The kernel's reduction: per-lane states merged by a warp's xor butterfly, then the warps' states merged
// by the first warp's butterfly (lanes past the warp count contribute empty states).
static ce::RowStats reduce_like_kernel(std::vector<ce::RowStats> lanes) {
  const int g = static_cast<int>(lanes.size());
  if (g == 1) return lanes[0];
  auto butterfly = [](std::vector<ce::RowStats>& w) {  // w has 32 entries; afterwards every one holds the total
    for (int mask = 16; mask > 0; mask >>= 1) {
      std::vector<ce::RowStats> next(32);
      for (int lane = 0; lane < 32; ++lane) next[lane] = ce::stats_merge(w[lane], w[lane ^ mask]);
      w = next;
    }
  };
  std::vector<ce::RowStats> partial;
  for (int w0 = 0; w0 < g; w0 += 32) {
    std::vector<ce::RowStats> warp(lanes.begin() + w0, lanes.begin() + w0 + 32);
    butterfly(warp);
    for (int lane = 1; lane < 32; ++lane) {  // all lanes agree bit for bit
      EXPECT(warp[lane].m == warp[0].m && (warp[lane].s == warp[0].s || std::isnan(warp[0].s)),
             "butterfly lanes disagree");
    }
    partial.push_back(warp[0]);
  }
  if (partial.size() == 1) return partial[0];
  std::vector<ce::RowStats> first(32, ce::stats_init());
  std::copy(partial.begin(), partial.end(), first.begin());
  butterfly(first);
  return first[0];
}

struct Result {
  float loss, lse;
  std::vector<float> grad;  // empty without a gradient
};

// One row, the kernel's way, with a group of g lanes and the row starting `head` elements before a 16-byte
// boundary (0..3): lane i owns element i of the head, the 4-vectors i, i + g, ... and the tail's strided
// elements. with_grad: the second pass over the (raw) logits, in place.
static Result kernel_row(std::vector<float> x, int64_t t, int64_t ignore_index, float scale, const Options& o,
                         int g, int64_t head, bool with_grad) {
  const int64_t v = static_cast<int64_t>(x.size());
  if (head >= g) head = 0;  // the kernel's head is at most 3 elements, always fewer than its lanes (G >= 32)
  head = std::min(head, v);
  const int64_t nvec = (v - head) / 4, tail = head + 4 * nvec;
  auto owner = [&](int64_t j) -> int {
    if (j < head) return static_cast<int>(j);
    if (j < tail) return static_cast<int>(((j - head) / 4) % g);
    return static_cast<int>((j - tail) % g);
  };
  Result out{0.0f, 0.0f, {}};
  if (!ce::row_valid(t, ignore_index)) {
    if (with_grad) out.grad.assign(v, 0.0f);
    return out;
  }
  std::vector<ce::RowStats> lanes(g, ce::stats_init());
  // Each lane visits its elements in order: head element, vectors, tail.
  for (int64_t j = 0; j < v; ++j) lanes[owner(j)] = ce::stats_push(lanes[owner(j)], ce::softcap_apply(x[j], o.softcap));
  const ce::RowStats st = reduce_like_kernel(lanes);
  const float zt = ce::target_in_range(t, v) ? ce::softcap_apply(x[t], o.softcap) : NAN;
  out.lse = ce::stats_lse(st);
  out.loss = ce::row_loss(out.lse, zt, st.zsum, v, o.label_smoothing, o.z_loss);
  if (with_grad) {
    const ce::GradCoeffs k = ce::grad_coeffs(out.lse, scale, v, o.label_smoothing, o.z_loss, o.softcap);
    for (int64_t j = 0; j < v; ++j) x[j] = ce::row_grad(ce::softcap_apply(x[j], o.softcap), j == t, k);
    out.grad = x;
  }
  return out;
}

static void test_rows_match_float64(std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> spread(0, 3), heads(0, 3);
  const int64_t sizes[] = {1, 2, 3, 5, 31, 32, 33, 127, 1000, 1001, 2049, 4099};
  const int groups[] = {1, 32, 256, 512};
  const int64_t ignore_index = -100;
  int trial = 0;
  for (float ls : {0.0f, 0.1f}) {
    for (float zl : {0.0f, 1e-3f}) {
      for (float cap : {0.0f, 30.0f}) {
        for (bool ignored : {false, true}) {
          for (int64_t v : sizes) {
            for (int g : groups) {
              ++trial;
              const Options o{ls, zl, cap};
              const float magnitude = std::pow(10.0f, static_cast<float>(spread(rng)) - 1.0f);  // 0.1 .. 100
              std::vector<float> x(v);
              for (float& xj : x) xj = magnitude * normal(rng);
              const int64_t t = ignored ? ignore_index : static_cast<int64_t>(rng() % v);
              if (v > 3 && !ignored && cap == 0 && ls == 0 && trial % 3 == 0) {
                x[(t + 1) % v] = -INFINITY;  // a masked logit (not the target): no NaN, probability 0
              }
              const float scale = 0.25f + static_cast<float>(rng() % 1000) / 1000.0f;
              const Reference ref = reference_row(x, t, ignore_index, scale, o);
              const Result got = kernel_row(x, t, ignore_index, scale, o, g, heads(rng), true);
              const Result no_grad = kernel_row(x, t, ignore_index, scale, o, g, heads(rng), false);
              // fp32 rounds a logit z to |z| * 6e-8, which moves exp(z - lse) by a relative |z| * 6e-8, and sums
              // over V add ~V * 6e-8 at worst: the bound grows with the largest logit and with V.
              double max_abs = 1.0;
              for (float xj : x) {
                if (std::isfinite(xj)) max_abs = std::max(max_abs, static_cast<double>(std::fabs(xj)));
              }
              const double rel = 2e-6 * std::max(10.0, max_abs) + 1e-7 * std::sqrt(double(v));
              const double scale_loss = std::max({1.0, std::fabs(ref.lse), max_abs, zl * ref.lse * ref.lse});
              EXPECT(std::isfinite(got.loss) && std::isfinite(got.lse), "non-finite loss %f lse %f (trial %d)",
                     got.loss, got.lse, trial);
              EXPECT(std::fabs(got.lse - ref.lse) <= rel * std::max(1.0, std::fabs(ref.lse)),
                     "lse %.9g vs %.9g (V=%lld G=%d ls=%g z=%g cap=%g)", got.lse, ref.lse, (long long)v, g, ls, zl, cap);
              EXPECT(std::fabs(got.loss - ref.loss) <= rel * scale_loss,
                     "loss %.9g vs %.9g (V=%lld G=%d ls=%g z=%g cap=%g)", got.loss, ref.loss, (long long)v, g, ls, zl,
                     cap);
              EXPECT(no_grad.loss == got.loss || std::fabs(no_grad.loss - got.loss) <= rel * scale_loss,
                     "loss without gradient %.9g vs %.9g", no_grad.loss, got.loss);
              if (ignored) {
                EXPECT(got.loss == 0.0f && got.lse == 0.0f, "ignored row: loss %f lse %f", got.loss, got.lse);
              }
              // Gradient: each element against the reference, relative to the size of the terms it is made of
              // (scale * (1 + 2 z_loss |lse|), and the row's largest |gradient|), so that tiny probabilities and
              // cancelling terms (V = 1) are compared absolutely.
              double grad_scale = scale * (1 + 2 * zl * std::fabs(ref.lse)), grad_sum = 0.0, ref_sum = 0.0;
              for (double gj : ref.grad) grad_scale = std::max(grad_scale, std::fabs(gj));
              if (ignored) grad_scale = 1.0;
              bool grad_ok = static_cast<int64_t>(got.grad.size()) == v;
              int64_t worst = 0;
              double worst_err = 0.0;
              for (int64_t j = 0; grad_ok && j < v; ++j) {
                const double err = std::fabs(got.grad[j] - ref.grad[j]);
                if (!(err <= rel * grad_scale)) grad_ok = false;
                if (err > worst_err || std::isnan(err)) worst_err = err, worst = j;
                grad_sum += got.grad[j];
                ref_sum += ref.grad[j];
              }
              EXPECT(grad_ok, "gradient element %lld: %.9g vs %.9g (V=%lld G=%d ls=%g z=%g cap=%g scale=%g)",
                     (long long)worst, got.grad.empty() ? 0.0 : got.grad[worst], ref.grad[worst], (long long)v, g, ls,
                     zl, cap, scale);
              if (ignored) {
                EXPECT(std::all_of(got.grad.begin(), got.grad.end(), [](float gj) { return gj == 0.0f; }),
                       "ignored row has a nonzero gradient");
              }
              // Without z-loss and softcap the gradient of a row sums to 0 (softmax sums to 1).
              if (zl == 0 && cap == 0) {
                EXPECT(std::fabs(grad_sum) <= 1e-5 * scale * std::max(1.0, std::sqrt(double(v))),
                       "gradient sums to %g (reference %g), V=%lld", grad_sum, ref_sum, (long long)v);
              }
            }
          }
        }
      }
    }
  }
}

// The online state is independent of the order elements arrive in and of how the row is split.
static void test_merge_is_order_and_split_independent(std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 20.0f);
  for (int trial = 0; trial < 300; ++trial) {
    const int v = 1 + static_cast<int>(rng() % 700);
    std::vector<float> z(v);
    for (float& zj : z) zj = normal(rng);
    ce::RowStats serial = ce::stats_init();
    for (float zj : z) serial = ce::stats_push(serial, zj);
    std::shuffle(z.begin(), z.end(), rng);
    // Random split into parts, each pushed, then merged in a random order.
    std::vector<ce::RowStats> parts;
    for (int start = 0; start < v;) {
      const int end = std::min(v, start + 1 + static_cast<int>(rng() % 60));
      ce::RowStats p = ce::stats_init();
      for (int j = start; j < end; ++j) p = ce::stats_push(p, z[j]);
      parts.push_back(p);
      if (rng() % 4 == 0) parts.push_back(ce::stats_init());  // empty parts (idle lanes)
      start = end;
    }
    std::shuffle(parts.begin(), parts.end(), rng);
    ce::RowStats merged = ce::stats_init();
    for (const ce::RowStats& p : parts) merged = ce::stats_merge(p, merged);
    EXPECT(merged.m == serial.m, "max %f vs %f", merged.m, serial.m);
    EXPECT(std::fabs(ce::stats_lse(merged) - ce::stats_lse(serial)) <= 1e-5f * std::max(1.0f, std::fabs(serial.m)),
           "lse %f vs %f", ce::stats_lse(merged), ce::stats_lse(serial));
    EXPECT(std::fabs(merged.zsum - serial.zsum) <= 1e-4f * v * 20.0f, "zsum %f vs %f", merged.zsum, serial.zsum);
  }
}

// Edge cases: empty states, masked logits, huge logits, V = 1, out-of-range targets, the softcap.
static void test_edge_cases() {
  const ce::RowStats empty = ce::stats_init();
  ce::RowStats e2 = ce::stats_merge(empty, empty);
  EXPECT(e2.m == -INFINITY && e2.s == 0.0f && e2.zsum == 0.0f && !std::isnan(e2.s), "merge of two empty states");
  ce::RowStats masked = ce::stats_push(empty, -INFINITY);
  EXPECT(masked.m == -INFINITY && masked.s == 0.0f, "a -inf logit into an empty state: m %f s %f", masked.m, masked.s);
  ce::RowStats one = ce::stats_push(masked, 2.0f);
  EXPECT(one.m == 2.0f && one.s == 1.0f, "first finite logit: m %f s %f", one.m, one.s);
  EXPECT(ce::stats_merge(one, masked).s == 1.0f && ce::stats_merge(masked, one).s == 1.0f, "merge with -inf part");
  EXPECT(ce::stats_lse(one) == 2.0f, "lse of one logit");
  // Logits of magnitude 1e4 stay finite (max-subtracted exponentials), including the gradient.
  ce::RowStats big = ce::stats_init();
  for (float z : {1e4f, -1e4f, 9999.0f, 3e4f}) big = ce::stats_push(big, z);
  const float lse = ce::stats_lse(big);
  EXPECT(std::isfinite(lse) && std::fabs(lse - 3e4f) < 1e-2f, "lse of huge logits %f", lse);
  const ce::GradCoeffs k = ce::grad_coeffs(lse, 1.0f, 4, 0.0f, 0.0f, 0.0f);
  EXPECT(std::fabs(ce::row_grad(3e4f, true, k)) < 1e-6f && ce::row_grad(1e4f, false, k) == 0.0f,
         "gradient of huge logits");
  // V = 1: loss 0 (without options), gradient 0.
  ce::RowStats single = ce::stats_push(ce::stats_init(), 5.0f);
  EXPECT(ce::row_loss(ce::stats_lse(single), 5.0f, 5.0f, 1, 0.1f, 0.0f) == 0.0f, "V = 1 loss");
  EXPECT(ce::row_grad(5.0f, true, ce::grad_coeffs(5.0f, 1.0f, 1, 0.1f, 0.0f, 0.0f)) == 0.0f, "V = 1 gradient");
  // Targets and ignored rows.
  EXPECT(!ce::row_valid(-100, -100) && ce::row_valid(0, -100) && ce::row_valid(-100, 7), "row_valid");
  EXPECT(ce::target_in_range(0, 3) && ce::target_in_range(2, 3) && !ce::target_in_range(3, 3) &&
             !ce::target_in_range(-1, 3), "target_in_range");
  // The softcap: bounded by the cap, odd, the identity without one, and its derivative in terms of z.
  EXPECT(ce::softcap_apply(1e6f, 30.0f) <= 30.0f && ce::softcap_apply(-1e6f, 30.0f) >= -30.0f, "softcap bound");
  EXPECT(ce::softcap_apply(-3.0f, 30.0f) == -ce::softcap_apply(3.0f, 30.0f), "softcap is odd");
  EXPECT(ce::softcap_apply(123.5f, 0.0f) == 123.5f && ce::softcap_grad(123.5f, 0.0f) == 1.0f, "no softcap");
  for (float x : {-50.0f, -3.0f, 0.0f, 0.5f, 10.0f, 40.0f}) {
    const double h = 1e-3, numeric = (30.0 * std::tanh((x + h) / 30.0) - 30.0 * std::tanh((x - h) / 30.0)) / (2 * h);
    EXPECT(std::fabs(ce::softcap_grad(ce::softcap_apply(x, 30.0f), 30.0f) - numeric) < 1e-5,
           "softcap derivative at %f: %f vs %f", x, ce::softcap_grad(ce::softcap_apply(x, 30.0f), 30.0f), numeric);
  }
}

int main() {
  std::mt19937 rng(20261128);
  test_rows_match_float64(rng);
  test_merge_is_order_and_split_independent(rng);
  test_edge_cases();
  if (failures) {
    std::fprintf(stderr, "%d of %d checks failed\n", failures, checks);
    return 1;
  }
  std::printf("cross_entropy_row_test: all %d checks passed\n", checks);
  return 0;
}
