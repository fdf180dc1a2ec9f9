// Fused linear cross-entropy on the CPU: loss = CE(softcap(hidden @ weight^T + bias), target), chunked
// over tokens so that only a [chunk, V] block of logits ever exists. The matrix products go to
// kernels/common/cpu_gemm.h (oneDNN or ATen's MKL, whichever is faster on the CPU's vendor); the softmax,
// loss and logit gradient of each chunk overwrite its logits in place.
//
// With row_scale given, the same pass also accumulates the gradients of hidden, weight and bias, the
// gradient of row i scaled by row_scale[i] (the Python side passes 1/n_valid for "mean", 1 for "sum",
// or grad_output for "none" in a recomputing backward).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "kernels/common/cpu_exp.h"
#include "kernels/common/cpu_gemm.h"
#include "kernels/common/stable.h"

namespace {

using codex_ml::cpu::Tensor;
using torch::headeronly::ScalarType;

// Logits block per chunk, unless the caller gives the rows: 128 MiB (1,024 rows at V = 32k). Each chunk runs three
// matrix products whose large operand is the whole [V, H] weight (or its gradient), and with few rows they run well
// below the speed of the same products over all rows: most of all the logits product, whose rows are the chunk's
// (docs/kernels.md, "Against what a user would pick instead").
constexpr int64_t kChunkBytes = int64_t{128} << 20;

struct RowOptions {
  float smoothing, z_loss, cap;
};

// The three row passes (max; sum of exp(z - max) and of z; the gradient a * exp(z - lse) - b), with AVX-512
// or AVX2+FMA where the CPU has them (checked at run time, so the extension still runs on any x86-64 CPU) and
// plain loops otherwise. The vector types and their exp (Cephes' expf) are kernels/common/cpu_exp.h's; exp's
// arguments are <= 0 here.
struct RowPasses {
  float max, sum, zsum;
};

RowPasses row_stats_scalar(const float* z, int64_t V) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < V; ++j) mx = std::max(mx, z[j]);
  float sum = 0.0f, zsum = 0.0f;
  for (int64_t j = 0; j < V; ++j) {
    sum += std::exp(z[j] - mx);
    zsum += z[j];
  }
  return {mx, sum, zsum};
}

void row_grad_scalar(float* z, int64_t V, float a, float b, float lse) {
  for (int64_t j = 0; j < V; ++j) z[j] = a * std::exp(z[j] - lse) - b;
}

#if CODEX_HAS_AVX2_PATH
using codex_ml::cpu::Avx2;
using codex_ml::cpu::Avx512;

// The row passes on S's vectors, the last V % kLanes values by the plain loops. Always inlined into the wrappers
// below, so each copy is compiled for its wrapper's instruction set only.
template <class S>
__attribute__((always_inline)) inline RowPasses row_stats_simd(const float* z, int64_t V) {
  const int64_t Vv = V - V % S::kLanes;
  auto vmax = S::set1(-INFINITY);
  for (int64_t j = 0; j < Vv; j += S::kLanes) vmax = S::max(vmax, S::load(z + j));
  float mx = S::hmax(vmax);
  for (int64_t j = Vv; j < V; ++j) mx = std::max(mx, z[j]);
  const auto vm = S::set1(mx);
  auto vsum = S::set1(0.0f), vz = S::set1(0.0f);
  for (int64_t j = 0; j < Vv; j += S::kLanes) {
    const auto x = S::load(z + j);
    vsum = S::add(vsum, S::exp(S::sub(x, vm)));
    vz = S::add(vz, x);
  }
  float sum = S::hsum(vsum), zsum = S::hsum(vz);
  for (int64_t j = Vv; j < V; ++j) {
    sum += std::exp(z[j] - mx);
    zsum += z[j];
  }
  return {mx, sum, zsum};
}

template <class S>
__attribute__((always_inline)) inline void row_grad_simd(float* z, int64_t V, float a, float b, float lse) {
  const int64_t Vv = V - V % S::kLanes;
  const auto va = S::set1(a), vb = S::set1(b), vl = S::set1(lse);
  for (int64_t j = 0; j < Vv; j += S::kLanes) S::store(z + j, S::fmsub(va, S::exp(S::sub(S::load(z + j), vl)), vb));
  for (int64_t j = Vv; j < V; ++j) z[j] = a * std::exp(z[j] - lse) - b;
}

CODEX_AVX2 RowPasses row_stats_avx2(const float* z, int64_t V) { return row_stats_simd<Avx2>(z, V); }
CODEX_AVX2 void row_grad_avx2(float* z, int64_t V, float a, float b, float lse) {
  row_grad_simd<Avx2>(z, V, a, b, lse);
}
CODEX_AVX512 RowPasses row_stats_avx512(const float* z, int64_t V) { return row_stats_simd<Avx512>(z, V); }
CODEX_AVX512 void row_grad_avx512(float* z, int64_t V, float a, float b, float lse) {
  row_grad_simd<Avx512>(z, V, a, b, lse);
}

#else
RowPasses row_stats_avx2(const float* z, int64_t V) { return row_stats_scalar(z, V); }
void row_grad_avx2(float* z, int64_t V, float a, float b, float lse) { row_grad_scalar(z, V, a, b, lse); }
RowPasses row_stats_avx512(const float* z, int64_t V) { return row_stats_scalar(z, V); }
void row_grad_avx512(float* z, int64_t V, float a, float b, float lse) { row_grad_scalar(z, V, a, b, lse); }
#endif

const bool kHasAvx2 = codex_ml::cpu::has_avx2();
const bool kHasAvx512 = codex_ml::cpu::has_avx512();

RowPasses row_stats(const float* z, int64_t V) {
  return kHasAvx512 ? row_stats_avx512(z, V) : kHasAvx2 ? row_stats_avx2(z, V) : row_stats_scalar(z, V);
}

void row_grad(float* z, int64_t V, float a, float b, float lse) {
  if (kHasAvx512) {
    row_grad_avx512(z, V, a, b, lse);
  } else if (kHasAvx2) {
    row_grad_avx2(z, V, a, b, lse);
  } else {
    row_grad_scalar(z, V, a, b, lse);
  }
}

// One row of logits z [V] (fp32, overwritten when grad): its loss and lse, and with grad, in place,
// d(scale * loss)/dz. Three passes over a row that stays in the L2 cache (32k floats = 128 KB) rather than
// whole-chunk passes that each stream the chunk through memory; exp is recomputed in the gradient pass
// rather than stored (cheaper than another write and read).
void row_loss(float* z, int64_t V, int64_t t, bool grad, float scale, RowOptions o, float* loss, float* lse) {
  if (o.cap > 0) {
    for (int64_t j = 0; j < V; ++j) z[j] = o.cap * std::tanh(z[j] / o.cap);
  }
  const RowPasses st = row_stats(z, V);
  const float row_lse = st.max + std::log(st.sum);
  const float zt = z[t];
  *loss = row_lse - (1 - o.smoothing) * zt - (o.smoothing > 0 ? o.smoothing * st.zsum / V : 0.0f) +
          o.z_loss * row_lse * row_lse;
  *lse = row_lse;
  if (!grad) return;
  // softmax * (1 + 2 z_loss lse) - smoothing / V - (1 - smoothing) [v == t], all times the row scale; with a
  // softcap, times its derivative 1 - tanh^2 = 1 - (z / cap)^2 of the capped logit z.
  const float a = scale * (1 + 2 * o.z_loss * row_lse), b = scale * o.smoothing / V;
  if (o.cap > 0) {
    for (int64_t j = 0; j < V; ++j) {
      const float u = z[j] / o.cap;
      z[j] = (a * std::exp(z[j] - row_lse) - b) * (1 - u * u);
    }
    const float ut = zt / o.cap;
    z[t] -= (1 - o.smoothing) * scale * (1 - ut * ut);
  } else {
    row_grad(z, V, a, b, row_lse);
    z[t] -= (1 - o.smoothing) * scale;
  }
}

// One chunk of logits z [n, V]: rows in parallel. Ignored rows get loss 0, lse 0 and a zero gradient.
void chunk_loss(float* data, int64_t n, int64_t V, const int64_t* target, const float* scale, int64_t ignore_index,
                RowOptions o, float* loss, float* lse) {
  torch::stable::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* row = data + i * V;
      if (target[i] == ignore_index) {
        loss[i] = lse[i] = 0.0f;
        if (scale != nullptr) std::fill(row, row + V, 0.0f);
        continue;
      }
      row_loss(row, V, target[i], scale != nullptr, scale != nullptr ? scale[i] : 0.0f, o, loss + i, lse + i);
    }
  });
}

// gb [V] += the column sums of z [n, V] (the bias gradient of one chunk): columns in parallel, rows in order.
void add_column_sums(const float* z, int64_t n, int64_t V, float* gb) {
  torch::stable::parallel_for(0, V, 1 << 12, [&](int64_t begin, int64_t end) {
    for (int64_t i = 0; i < n; ++i) {
      const float* row = z + i * V;
#pragma omp simd
      for (int64_t j = begin; j < end; ++j) gb[j] += row[j];
    }
  });
}

// Returns (loss [N], lse [N], grad_hidden [N, H], grad_weight [V, H], grad_bias [V]); the gradients are
// empty tensors when row_scale is not given; chunk_rows: rows per chunk of logits (0: kChunkBytes' worth).
// Ignored rows give loss 0, lse 0 and zero gradients.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_cross_entropy(
    Tensor hidden, Tensor weight, std::optional<Tensor> bias, Tensor target, std::optional<Tensor> row_scale,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap, int64_t chunk_rows) {
  namespace cpu = codex_ml::cpu;
  STD_TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && target.dim() == 1,
                  "expected hidden [N, H], weight [V, H], target [N]");
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  STD_TORCH_CHECK(weight.size(1) == H && target.size(0) == N, "shape mismatch");
  STD_TORCH_CHECK(chunk_rows >= 0, "chunk_rows must be >= 0 (0: the kernel's choice), got ", chunk_rows);
  const bool grad = row_scale.has_value();
  const ScalarType f32 = ScalarType::Float;
  Tensor w = cpu::contiguous(cpu::to(weight, f32));
  std::optional<Tensor> b;
  if (bias.has_value()) b = cpu::contiguous(cpu::to(*bias, f32));
  Tensor tgt = cpu::contiguous(cpu::to(target, ScalarType::Long));
  Tensor loss = cpu::zeros({N}, f32), lse = cpu::zeros({N}, f32);
  Tensor gh = grad ? cpu::empty({N, H}, f32) : cpu::empty({0}, f32);
  // The first chunk's product writes grad_weight (no zero fill and read of [V, H] first); the others add to it.
  Tensor gw = grad ? (N > 0 ? cpu::empty({V, H}, f32) : cpu::zeros({V, H}, f32)) : cpu::empty({0}, f32);
  Tensor gb = grad && b.has_value() ? cpu::zeros({V}, f32) : cpu::empty({0}, f32);
  std::optional<Tensor> scale;
  if (grad) scale = cpu::contiguous(cpu::to(*row_scale, f32));
  const int64_t rows = chunk_rows > 0 ? chunk_rows : kChunkBytes / (4 * std::max<int64_t>(V, 1));
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(N, rows));
  Tensor logits_buf = cpu::empty({chunk, V}, f32);
  const Tensor wt = cpu::transposed(w);
  const RowOptions options{static_cast<float>(label_smoothing), static_cast<float>(z_loss),
                           static_cast<float>(softcap)};

  for (int64_t start = 0; start < N; start += chunk) {
    const int64_t n = std::min(chunk, N - start);
    Tensor h = cpu::to(torch::stable::narrow(hidden, 0, start, n), f32);
    Tensor logits = torch::stable::narrow(logits_buf, 0, 0, n);
    if (b.has_value()) torch::stable::copy_(logits, *b);  // broadcast over the rows
    cpu::gemm(h, wt, logits, /*accumulate=*/b.has_value());
    float* z = logits.mutable_data_ptr<float>();
    chunk_loss(z, n, V, tgt.const_data_ptr<int64_t>() + start,
               grad ? scale->const_data_ptr<float>() + start : nullptr, ignore_index, options,
               loss.mutable_data_ptr<float>() + start, lse.mutable_data_ptr<float>() + start);
    if (grad) {
      Tensor gh_rows = torch::stable::narrow(gh, 0, start, n);
      cpu::gemm(logits, w, gh_rows, /*accumulate=*/false);
      cpu::gemm(cpu::transposed(logits), h, gw, /*accumulate=*/start > 0);
      if (gb.numel()) add_column_sums(z, n, V, gb.mutable_data_ptr<float>());
    }
  }
  return {loss, lse, gh, gw, gb};
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(codex_ml_cpu, m) {
  m.def(
      "linear_cross_entropy(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor? row_scale, "
      "int ignore_index, float label_smoothing, float z_loss, float softcap, int chunk_rows=0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(codex_ml_cpu, CPU, m) { m.impl("linear_cross_entropy", TORCH_BOX(&linear_cross_entropy)); }
