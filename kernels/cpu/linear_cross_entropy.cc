// Fused linear cross-entropy on the CPU: loss = CE(softcap(hidden @ weight^T + bias), target), chunked
// over tokens so that only a [chunk, V] block of logits ever exists. The matrix products go to ATen
// (MKL / oneDNN); the softmax, loss and logit gradient of each chunk are fused in one parallel pass
// that overwrites the logits with their gradient in place.
//
// With row_scale given, the same pass also accumulates the gradients of hidden, weight and bias, the
// gradient of row i scaled by row_scale[i] (the Python side passes 1/n_valid for "mean", 1 for "sum",
// or grad_output for "none" in a recomputing backward).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

namespace {

constexpr int64_t kChunkBytes = 16 << 20;  // logits block per chunk: bounded whatever N and V are

// One row: logits z[0..V) (already soft-capped if cap > 0) -> loss, lse; overwrites z with dloss/dlogit
// (times scale) when grad is true.
inline void row_loss(float* z, int64_t V, int64_t t, float smoothing, float z_loss, float cap, bool grad,
                     float scale, float* loss_out, float* lse_out) {
  float mx = -std::numeric_limits<float>::infinity();
  double zsum = 0.0;
  for (int64_t v = 0; v < V; ++v) {
    if (cap > 0.f) z[v] = cap * std::tanh(z[v] / cap);
    mx = std::max(mx, z[v]);
    zsum += z[v];
  }
  double sum = 0.0;
  for (int64_t v = 0; v < V; ++v) sum += std::exp(static_cast<double>(z[v] - mx));
  const float lse = mx + static_cast<float>(std::log(sum));
  const float zt = z[t];
  *lse_out = lse;
  *loss_out = lse - (1.f - smoothing) * zt - smoothing * static_cast<float>(zsum / V) + z_loss * lse * lse;
  if (!grad) return;
  const float pscale = scale * (1.f + 2.f * z_loss * lse);
  const float uniform = scale * smoothing / static_cast<float>(V);
  for (int64_t v = 0; v < V; ++v) {
    const float zv = z[v];
    float g = pscale * std::exp(zv - lse) - uniform;
    if (v == t) g -= scale * (1.f - smoothing);
    if (cap > 0.f) g *= 1.f - (zv / cap) * (zv / cap);  // d(cap*tanh(x/cap))/dx
    z[v] = g;
  }
}

// Returns (loss [N], lse [N], grad_hidden [N, H], grad_weight [V, H], grad_bias [V]); the gradients are
// empty tensors when row_scale is not given. Ignored rows give loss 0, lse 0 and zero gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& row_scale, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && target.dim() == 1, "expected hidden [N, H], weight [V, H], target [N]");
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  TORCH_CHECK(weight.size(1) == H && target.size(0) == N, "shape mismatch");
  const bool grad = row_scale.has_value();
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor tgt = target.contiguous();
  at::Tensor loss = at::zeros({N}, f32), lse = at::zeros({N}, f32);
  at::Tensor gh = grad ? at::zeros({N, H}, f32) : at::empty({0}, f32);
  at::Tensor gw = grad ? at::zeros({V, H}, f32) : at::empty({0}, f32);
  at::Tensor gb = grad && bias.has_value() ? at::zeros({V}, f32) : at::empty({0}, f32);
  at::Tensor scale = grad ? row_scale->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(N, kChunkBytes / (4 * std::max<int64_t>(V, 1))));
  at::Tensor logits_buf = at::empty({chunk, V}, f32);
  const int64_t* t_ptr = tgt.data_ptr<int64_t>();

  for (int64_t start = 0; start < N; start += chunk) {
    const int64_t n = std::min(chunk, N - start);
    at::Tensor h = hidden.narrow(0, start, n).to(at::kFloat);
    at::Tensor logits = logits_buf.narrow(0, 0, n);
    if (b.defined()) {
      at::addmm_out(logits, b, h, w.t());
    } else {
      at::mm_out(logits, h, w.t());
    }
    float* z = logits.data_ptr<float>();
    float* loss_ptr = loss.data_ptr<float>() + start;
    float* lse_ptr = lse.data_ptr<float>() + start;
    const float* s_ptr = grad ? scale.data_ptr<float>() + start : nullptr;
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t = t_ptr[start + i];
        float* row = z + i * V;
        if (t == ignore_index) {
          if (grad) std::fill(row, row + V, 0.f);
          continue;
        }
        row_loss(row, V, t, static_cast<float>(label_smoothing), static_cast<float>(z_loss),
                 static_cast<float>(softcap), grad, grad ? s_ptr[i] : 1.f, loss_ptr + i, lse_ptr + i);
      }
    });
    if (grad) {
      at::Tensor gh_rows = gh.narrow(0, start, n);
      at::mm_out(gh_rows, logits, w);
      gw.addmm_(logits.t(), h);
      if (gb.numel()) gb.add_(logits.sum(0));
    }
  }
  return {loss, lse, gh, gw, gb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(codex_ml_cpu, m) {
  m.def(
      "linear_cross_entropy(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor? row_scale, "
      "int ignore_index, float label_smoothing, float z_loss, float softcap) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(codex_ml_cpu, CPU, m) { m.impl("linear_cross_entropy", &linear_cross_entropy); }
