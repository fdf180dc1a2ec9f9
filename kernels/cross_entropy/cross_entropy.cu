// Softmax cross-entropy of fp32 logit rows, with the gradient written over the logits in place: the
// plain-CUDA counterpart of kernels/cross_entropy/triton.py, used by codex_ml.ops.cross_entropy (impl="cuda") on
// each chunk of logits (the matrix products stay in cuBLAS). Plain C ABI: raw pointers, sizes and a
// cudaStream_t; loaded by python/codex_ml/ops/_loss_cuda.py with ctypes.
//
// One group of threads per row: a warp (8 rows per 256-thread block) for V <= 2048, else the whole block
// (256 threads up to V = 16384, 512 above); blocks stride over the rows. Two passes over the row:
//   1. each thread runs the online log-sum-exp (running max, sum of exp) and the sum of the capped logits
//      over its elements; the partial states are merged by warp shuffles and, for a block-wide group,
//      through shared memory -> lse, and the row's loss (lane 0 also reads the target's logit);
//   2. with row_scale, each logit is replaced by d(row_scale * loss)/dlogit.
// Loads and stores are 16-byte float4 vectors from the first 16-byte boundary of the row (a scalar head and
// tail take the rest), so any V and any row alignment work. The arithmetic (softcap, online merge, loss,
// gradient) is the shared, host-tested code of kernels/cross_entropy/cross_entropy_row.h.
#include <cuda_runtime.h>
#include <stdint.h>

#include "kernels/cross_entropy/cross_entropy_row.h"

namespace {

namespace ce = codex_cross_entropy;

__device__ __forceinline__ ce::RowStats shfl_xor(ce::RowStats st, int mask) {
  return ce::RowStats{__shfl_xor_sync(0xffffffffu, st.m, mask), __shfl_xor_sync(0xffffffffu, st.s, mask),
                      __shfl_xor_sync(0xffffffffu, st.zsum, mask)};
}

__device__ __forceinline__ ce::RowStats warp_reduce(ce::RowStats st) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) st = ce::stats_merge(st, shfl_xor(st, mask));
  return st;
}

// Merges the states of the G threads of a row's group; every thread of the group gets the result. For G
// larger than a warp (G == the block), `partial` holds one state per warp and `total` the result. Also a
// barrier of the group: every memory access before it happens before every one after it.
template <int G>
__device__ __forceinline__ ce::RowStats group_reduce(ce::RowStats st, ce::RowStats* partial, ce::RowStats* total) {
  st = warp_reduce(st);
  if constexpr (G == 32) {
    __syncwarp();
    return st;
  } else {
    constexpr int kWarps = G / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = st;
    __syncthreads();
    if (warp == 0) {
      ce::RowStats r = lane < kWarps ? partial[lane] : ce::stats_init();
      r = warp_reduce(r);
      if (lane == 0) *total = r;
    }
    __syncthreads();
    return *total;
  }
}

// Number of leading elements of the row before its first 16-byte boundary (rows are 4-byte aligned).
__device__ __forceinline__ int64_t head_length(const float* row, int64_t v) {
  const int64_t head = ((16 - (reinterpret_cast<uintptr_t>(row) & 15)) & 15) / 4;
  return head < v ? head : v;
}

// Calls f(x) for the elements of the row that lane `lane` of a G-thread group owns.
template <int G, typename F>
__device__ __forceinline__ void visit_row(const float* row, int64_t v, int lane, F&& f) {
  const int64_t head = head_length(row, v);
  if (lane < head) f(row[lane]);
  const int64_t nvec = (v - head) / 4;
  const float4* vec = reinterpret_cast<const float4*>(row + head);
  for (int64_t i = lane; i < nvec; i += G) {
    const float4 q = vec[i];
    f(q.x);
    f(q.y);
    f(q.z);
    f(q.w);
  }
  for (int64_t j = head + 4 * nvec + lane; j < v; j += G) f(row[j]);
}

// Replaces each element x_j the lane owns by f(j, x_j).
template <int G, typename F>
__device__ __forceinline__ void update_row(float* row, int64_t v, int lane, F&& f) {
  const int64_t head = head_length(row, v);
  if (lane < head) row[lane] = f(static_cast<int64_t>(lane), row[lane]);
  const int64_t nvec = (v - head) / 4;
  float4* vec = reinterpret_cast<float4*>(row + head);
  for (int64_t i = lane; i < nvec; i += G) {
    float4 q = vec[i];
    const int64_t j = head + 4 * i;
    q.x = f(j, q.x);
    q.y = f(j + 1, q.y);
    q.z = f(j + 2, q.z);
    q.w = f(j + 3, q.w);
    vec[i] = q;
  }
  for (int64_t j = head + 4 * nvec + lane; j < v; j += G) row[j] = f(j, row[j]);
}

template <int G, int kThreads>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_rows_kernel(float* __restrict__ logits, const int64_t* __restrict__ target,
                              const float* __restrict__ row_scale, float* __restrict__ loss,
                              float* __restrict__ lse_out, int64_t n, int64_t v, int64_t ignore_index,
                              float label_smoothing, float z_loss, float softcap) {
  static_assert(kThreads % G == 0 && G % 32 == 0, "a row's group is whole warps of the block");
  constexpr int kRowsPerBlock = kThreads / G;
  __shared__ ce::RowStats partial[G > 32 ? G / 32 : 1];
  __shared__ ce::RowStats total;
  const int lane = threadIdx.x % G;
  // Every thread of a group walks the same rows, so a block-wide group stays uniform at its barriers.
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / G; r < n;
       r += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    float* row = logits + r * v;
    const int64_t t = target[r];
    if (!ce::row_valid(t, ignore_index)) {
      if (lane == 0) {
        loss[r] = 0.0f;
        lse_out[r] = 0.0f;
      }
      if (row_scale != nullptr) update_row<G>(row, v, lane, [](int64_t, float) { return 0.0f; });
      continue;
    }
    ce::RowStats st = ce::stats_init();
    visit_row<G>(row, v, lane, [&](float x) { st = ce::stats_push(st, ce::softcap_apply(x, softcap)); });
    // The target's logit, read before the barrier in group_reduce (pass 2 overwrites it).
    float zt = NAN;
    if (lane == 0 && ce::target_in_range(t, v)) zt = ce::softcap_apply(row[t], softcap);
    st = group_reduce<G>(st, partial, &total);
    const float lse = ce::stats_lse(st);
    if (lane == 0) {
      loss[r] = ce::row_loss(lse, zt, st.zsum, v, label_smoothing, z_loss);
      lse_out[r] = lse;
    }
    if (row_scale != nullptr) {
      const ce::GradCoeffs k = ce::grad_coeffs(lse, row_scale[r], v, label_smoothing, z_loss, softcap);
      update_row<G>(row, v, lane,
                    [&](int64_t j, float x) { return ce::row_grad(ce::softcap_apply(x, softcap), j == t, k); });
    }
  }
}

template <int G, int kThreads>
cudaError_t launch(float* logits, const int64_t* target, const float* row_scale, float* loss, float* lse, int64_t n,
                   int64_t v, int64_t ignore_index, float label_smoothing, float z_loss, float softcap,
                   cudaStream_t stream) {
  constexpr int64_t kRowsPerBlock = kThreads / G;
  constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // more rows are strided over
  int64_t blocks = (n + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  cross_entropy_rows_kernel<G, kThreads><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      logits, target, row_scale, loss, lse, n, v, ignore_index, label_smoothing, z_loss, softcap);
  return cudaGetLastError();
}

}  // namespace

extern "C" {

// Per-row loss [n] and lse [n] (fp32) of the contiguous fp32 logits [n, v] against target [n] (int64).
// With row_scale [n] (fp32), logits is overwritten by d(sum_i row_scale[i] * loss_i)/dlogits; with
// row_scale == NULL it is left unchanged. softcap <= 0 means no cap. Rows with target == ignore_index get
// loss 0, lse 0 and gradient 0; a target outside [0, v) (and not ignore_index) gets a NaN loss. Runs on
// `stream` (a cudaStream_t; NULL is the default stream) and returns a cudaError_t: cudaErrorInvalidValue for
// bad sizes or null pointers, otherwise the launch's status.
int codex_cross_entropy_rows(float* logits, const int64_t* target, const float* row_scale, float* loss, float* lse,
                             int64_t n, int64_t v, int64_t ignore_index, float label_smoothing, float z_loss,
                             float softcap, void* stream) {
  if (n < 0 || v <= 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (logits == nullptr || target == nullptr || loss == nullptr || lse == nullptr) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(logits) % alignof(float) != 0) return cudaErrorMisalignedAddress;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (v <= 2048) {
    return launch<32, 256>(logits, target, row_scale, loss, lse, n, v, ignore_index, label_smoothing, z_loss, softcap,
                           s);
  }
  if (v <= 16384) {
    return launch<256, 256>(logits, target, row_scale, loss, lse, n, v, ignore_index, label_smoothing, z_loss,
                            softcap, s);
  }
  return launch<512, 512>(logits, target, row_scale, loss, lse, n, v, ignore_index, label_smoothing, z_loss, softcap,
                          s);
}

}  // extern "C"
