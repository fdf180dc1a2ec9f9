// Fused linear cross-entropy on the CPU: loss = CE(softcap(hidden @ weight^T + bias), target), chunked
// over tokens so that only a [chunk, V] block of logits ever exists. The matrix products go to ATen
// (MKL / oneDNN); the softmax, loss and logit gradient of each chunk overwrite its logits in place.
//
// With row_scale given, the same pass also accumulates the gradients of hidden, weight and bias, the
// gradient of row i scaled by row_scale[i] (the Python side passes 1/n_valid for "mean", 1 for "sum",
// or grad_output for "none" in a recomputing backward).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace {

constexpr int64_t kChunkBytes = 16 << 20;  // logits block per chunk: bounded whatever N and V are

// One chunk of logits z [n, V] (fp32, overwritten): writes loss and lse of its rows and, when scale [n]
// is defined, replaces z by d(sum_i scale_i * loss_i)/dz. Whole-chunk ATen ops (vectorized exp,
// multi-threaded) rather than a scalar loop per row: the softmax then costs a fraction of the matmul.
void chunk_loss(at::Tensor z, const at::Tensor& target, const at::Tensor& valid, const at::Tensor& scale,
                double smoothing, double z_loss, double cap, at::Tensor loss, at::Tensor lse) {
  const int64_t V = z.size(1);
  at::Tensor t = target.clamp(0, V - 1).unsqueeze(1);
  at::Tensor cap_grad;
  if (cap > 0) {
    z.div_(cap).tanh_();
    if (scale.defined()) cap_grad = 1 - z * z;  // d(cap*tanh(x/cap))/dx
    z.mul_(cap);
  }
  at::Tensor mx = std::get<0>(z.max(1, /*keepdim=*/true));
  at::Tensor zt = z.gather(1, t);
  at::Tensor zmean = smoothing > 0 ? z.mean(1, true) : at::zeros_like(mx);
  z.sub_(mx).exp_();  // exp(z - max), in place
  at::Tensor sum = z.sum(1, true);
  at::Tensor row_lse = mx + sum.log();
  at::Tensor rows = row_lse - (1 - smoothing) * zt - smoothing * zmean + z_loss * row_lse * row_lse;
  loss.copy_(rows.squeeze(1) * valid);
  lse.copy_(row_lse.squeeze(1) * valid);
  if (!scale.defined()) return;
  at::Tensor s = (scale * valid).unsqueeze(1);
  // softmax * (1 + 2 z_loss lse) - smoothing / V - (1 - smoothing) [v == t], all times the row scale.
  z.mul_(s * (1 + 2 * z_loss * row_lse) / sum);
  if (smoothing > 0) z.sub_(s * (smoothing / V));
  z.scatter_add_(1, t, -(1 - smoothing) * s);
  if (cap_grad.defined()) z.mul_(cap_grad);
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
  at::Tensor valid = target.ne(ignore_index).to(at::kFloat);
  at::Tensor loss = at::zeros({N}, f32), lse = at::zeros({N}, f32);
  at::Tensor gh = grad ? at::empty({N, H}, f32) : at::empty({0}, f32);
  at::Tensor gw = grad ? at::zeros({V, H}, f32) : at::empty({0}, f32);
  at::Tensor gb = grad && bias.has_value() ? at::zeros({V}, f32) : at::empty({0}, f32);
  at::Tensor scale = grad ? row_scale->to(at::kFloat) : at::Tensor();
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(N, kChunkBytes / (4 * std::max<int64_t>(V, 1))));
  at::Tensor logits_buf = at::empty({chunk, V}, f32);

  for (int64_t start = 0; start < N; start += chunk) {
    const int64_t n = std::min(chunk, N - start);
    at::Tensor h = hidden.narrow(0, start, n).to(at::kFloat);
    at::Tensor logits = logits_buf.narrow(0, 0, n);
    if (b.defined()) {
      at::addmm_out(logits, b, h, w.t());
    } else {
      at::mm_out(logits, h, w.t());
    }
    chunk_loss(logits, target.narrow(0, start, n), valid.narrow(0, start, n),
               grad ? scale.narrow(0, start, n) : at::Tensor(), label_smoothing, z_loss, softcap,
               loss.narrow(0, start, n), lse.narrow(0, start, n));
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
