// Flash attention forward and backward on tensor cores (nvcuda::wmma 16x16x16 bf16/fp16 fragments,
// fp32 accumulation; sm_80 and newer). Plain C ABI: raw pointers, sizes and a cudaStream_t; loaded by
// python/codex_ml/ops/_attention_cuda.py with ctypes.
//
// Layout: q, o, do [B, H, T, D] and k, v [B, Hkv, T, D], contiguous; query head h reads K/V head
// h / (H / Hkv). One thread block of 4 warps handles 64 rows; each warp owns 16 of them. Tiles of 64
// keys (or queries) go through shared memory; the softmax arithmetic (masking, online update, lse,
// dS) is the shared, host-tested code of kernels/attention/attention_tile.h.
//
// - Forward: per key tile, S = Q K^T (wmma) -> online softmax per row (two lanes per row) -> P in the
//   input dtype -> O = O * rescale + P V (wmma, O accumulated in fp32 shared memory). Saves O and lse.
// - Backward: delta = rowsum(dO * O); dK/dV kernel per key tile over the query tiles of every query head
//   of its group (P^T and dS^T recomputed from lse, dK and dV in wmma accumulators); dQ kernel per query
//   tile. P and dS are rounded to the input dtype before their products, as in FlashAttention-2.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <type_traits>

#include "kernels/attention/attention_tile.h"

namespace {

using namespace nvcuda;
namespace ca = codex_attention;

constexpr int kBlock = 64;    // rows of a query tile and of a key tile
constexpr int kWarps = 4;     // each owns 16 rows
constexpr int kThreads = 32 * kWarps;
constexpr int kLdS = kBlock + 4;   // fp32 score tiles, padded against bank conflicts
constexpr int kLdP = kBlock + 8;   // P / dS tiles in the input dtype

// x as a To, between fp32 and the input dtype (__half or __nv_bfloat16) either way, rounding to nearest even.
template <typename To, typename From>
__device__ __forceinline__ To convert(From x) {
  if constexpr (std::is_same_v<From, __half>) return __half2float(x);
  else if constexpr (std::is_same_v<From, __nv_bfloat16>) return __bfloat162float(x);
  else if constexpr (std::is_same_v<To, __half>) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}

using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
template <typename E>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major>;
template <typename E>
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major>;
template <typename E>
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major>;

// Copies rows [row0, row0 + kBlock) of a [T, D] matrix into shared memory (leading dimension ld),
// 16 bytes per thread and step; rows past T are zero.
template <typename E, int D>
__device__ void load_tile(E* dst, int ld, const E* src, int row0, int T) {
  constexpr int kVec = 16 / sizeof(E);
  constexpr int kPerRow = D / kVec;
  for (int idx = threadIdx.x; idx < kBlock * kPerRow; idx += kThreads) {
    const int r = idx / kPerRow, c = (idx % kPerRow) * kVec;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (row0 + r < T) val = *reinterpret_cast<const uint4*>(src + static_cast<size_t>(row0 + r) * D + c);
    *reinterpret_cast<uint4*>(dst + r * ld + c) = val;
  }
}

// C[16, 16 * N_TILES] = A[16, K] B[K, 16 * N_TILES] for one warp, B given as rows of a [n, K] matrix
// (so B = that matrix transposed, read column-major); the result goes to fp32 shared memory.
template <typename E, int K, int N_TILES>
__device__ void warp_a_bt(float* c, int ldc, const E* a, int lda, const E* b_rows, int ldb) {
  Acc acc[N_TILES];
#pragma unroll
  for (int n = 0; n < N_TILES; ++n) wmma::fill_fragment(acc[n], 0.0f);
#pragma unroll
  for (int kk = 0; kk < K; kk += 16) {
    FragA<E> fa;
    wmma::load_matrix_sync(fa, a + kk, lda);
#pragma unroll
    for (int n = 0; n < N_TILES; ++n) {
      FragBCol<E> fb;
      wmma::load_matrix_sync(fb, b_rows + n * 16 * ldb + kk, ldb);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
#pragma unroll
  for (int n = 0; n < N_TILES; ++n) wmma::store_matrix_sync(c + n * 16, acc[n], ldc, wmma::mem_row_major);
}

// acc[D / 16] += A[16, kBlock] B[kBlock, D] for one warp (A and B row-major in shared memory).
template <typename E, int D>
__device__ void warp_accumulate_ab(Acc* acc, const E* a, int lda, const E* b, int ldb) {
#pragma unroll
  for (int kk = 0; kk < kBlock; kk += 16) {
    FragA<E> fa;
    wmma::load_matrix_sync(fa, a + kk, lda);
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      FragBRow<E> fb;
      wmma::load_matrix_sync(fb, b + kk * ldb + n * 16, ldb);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
}

// Writes a block's [kBlock, D] accumulators (each warp its 16 rows) times `scale` to global rows
// [row0, row0 + kBlock) < T, through the fp32 shared buffer `stage` ([kBlock, D + 8] floats).
template <typename E, int D>
__device__ void store_acc(E* dst, const Acc* acc, float* stage, float scale, int row0, int T) {
  constexpr int kLd = D + 8;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    wmma::store_matrix_sync(stage + warp * 16 * kLd + n * 16, acc[n], kLd, wmma::mem_row_major);
  }
  __syncwarp();
  for (int idx = lane; idx < 16 * D; idx += 32) {
    const int r = warp * 16 + idx / D, d = idx % D;
    if (row0 + r < T) dst[static_cast<size_t>(row0 + r) * D + d] = convert<E>(stage[r * kLd + d] * scale);
  }
}

template <int D>
constexpr size_t fwd_smem_bytes() {
  return sizeof(__half) * (3 * kBlock * (D + 8) + kBlock * kLdP) + sizeof(float) * (kBlock * kLdS + kBlock * (D + 4));
}

template <typename E, int D>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const E* q, const E* k, const E* v, E* o,
                                                                 float* lse, float scale, int T, int H,
                                                                 int groups, bool causal, int window) {
  constexpr int kLdE = D + 8, kLdO = D + 4;
  extern __shared__ __align__(128) unsigned char smem[];
  E* s_q = reinterpret_cast<E*>(smem);
  E* s_k = s_q + kBlock * kLdE;
  E* s_v = s_k + kBlock * kLdE;
  E* s_p = s_v + kBlock * kLdE;
  float* s_s = reinterpret_cast<float*>(s_p + kBlock * kLdP);
  float* s_o = s_s + kBlock * kLdS;

  const int q0 = blockIdx.x * kBlock;
  const size_t bh = blockIdx.y, bkv = (bh / H) * (H / groups) + (bh % H) / groups;
  q += bh * T * D;
  o += bh * T * D;
  k += bkv * T * D;
  v += bkv * T * D;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = warp * 16 + lane / 2, half = lane % 2;  // two lanes per row, half of the columns each
  const int i = q0 + row;

  load_tile<E, D>(s_q, kLdE, q, q0, T);
  for (int idx = threadIdx.x; idx < kBlock * D; idx += kThreads) s_o[(idx / D) * kLdO + idx % D] = 0.0f;
  ca::RowState state = ca::row_init();
  const float c = ca::score_scale_log2(scale);
  int lo, hi;
  ca::key_range(q0, kBlock, T, causal, window, kBlock, &lo, &hi);
  for (int k0 = lo; k0 < hi; k0 += kBlock) {
    __syncthreads();  // the previous tile's K/V are no longer read
    load_tile<E, D>(s_k, kLdE, k, k0, T);
    load_tile<E, D>(s_v, kLdE, v, k0, T);
    __syncthreads();
    warp_a_bt<E, D, kBlock / 16>(s_s + warp * 16 * kLdS, kLdS, s_q + warp * 16 * kLdE, kLdE, s_k, kLdE);
    __syncwarp();
    float* s_row = s_s + row * kLdS;
    float tile_max = -INFINITY;
    for (int jj = half * 32; jj < half * 32 + 32; ++jj) {
      const float s2 = ca::allowed(i, k0 + jj, T, causal, window) ? s_row[jj] * c : -INFINITY;
      s_row[jj] = s2;
      tile_max = fmaxf(tile_max, s2);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float m_new = ca::row_new_max(state.m, tile_max);
    float tile_sum = 0.0f;
    for (int jj = half * 32; jj < half * 32 + 32; ++jj) {
      const float p = ca::row_prob(s_row[jj], m_new);
      s_p[row * kLdP + jj] = convert<E>(p);
      tile_sum += p;
    }
    tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, 1);
    const float alpha = ca::row_rescale(state.m, m_new);
    state = ca::row_update(state, m_new, tile_sum);
    for (int d = half * (D / 2); d < (half + 1) * (D / 2); ++d) s_o[row * kLdO + d] *= alpha;
    __syncwarp();
    for (int dn = 0; dn < D; dn += 16) {  // O[16, dn:dn+16] += P V[:, dn:dn+16]
      Acc acc;
      wmma::load_matrix_sync(acc, s_o + warp * 16 * kLdO + dn, kLdO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kBlock; kk += 16) {
        FragA<E> fa;
        FragBRow<E> fb;
        wmma::load_matrix_sync(fa, s_p + warp * 16 * kLdP + kk, kLdP);
        wmma::load_matrix_sync(fb, s_v + kk * kLdE + dn, kLdE);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(s_o + warp * 16 * kLdO + dn, acc, kLdO, wmma::mem_row_major);
    }
    __syncwarp();
  }
  __syncwarp();
  if (i < T) {
    const float inv = ca::row_inv_sum(state);
    for (int d = half * (D / 2); d < (half + 1) * (D / 2); ++d) {
      o[static_cast<size_t>(i) * D + d] = convert<E>(s_o[row * kLdO + d] * inv);
    }
    if (half == 0) lse[bh * T + i] = ca::row_lse(state);
  }
}

// delta[row] = sum_d dO[row, d] * O[row, d]: one warp per row.
template <typename E>
__global__ void attention_delta_kernel(const E* dout, const E* out, float* delta, long rows, int D) {
  const long row = (static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  float sum = 0.0f;
  for (int d = lane; d < D; d += 32) sum += convert<float>(dout[row * D + d]) * convert<float>(out[row * D + d]);
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) delta[row] = sum;
}

template <int D>
constexpr size_t bwd_smem_bytes() {
  return sizeof(__half) * (4 * kBlock * (D + 8) + 2 * kBlock * kLdP) + sizeof(float) * (2 * kBlock * kLdS + 2 * kBlock);
}

// The backward kernels' shared memory (bwd_smem_bytes): K, V, Q and dO tiles, P and dS in the input dtype, the
// fp32 score tiles S and dP, and the query tile's lse and delta. The dQ kernel leaves P, lse and delta unused.
template <typename E, int D>
struct BwdTiles {
  static constexpr int kLdE = D + 8;
  E *k, *v, *q, *dout, *p, *ds;
  float *s, *dp, *lse, *delta;

  __device__ explicit BwdTiles(unsigned char* smem) {
    k = reinterpret_cast<E*>(smem);
    v = k + kBlock * kLdE;
    q = v + kBlock * kLdE;
    dout = q + kBlock * kLdE;
    p = dout + kBlock * kLdE;
    ds = p + kBlock * kLdP;
    s = reinterpret_cast<float*>(ds + kBlock * kLdP);
    dp = s + kBlock * kLdS;
    lse = dp + kBlock * kLdS;
    delta = lse + kBlock;
  }
};

template <typename E, int D>
__global__ void __launch_bounds__(kThreads) attention_dkdv_kernel(const E* q, const E* k, const E* v,
                                                                  const E* dout, const float* lse,
                                                                  const float* delta, E* dk, E* dv, float scale,
                                                                  int T, int H, int groups, bool causal,
                                                                  int window) {
  constexpr int kLdE = BwdTiles<E, D>::kLdE;
  extern __shared__ __align__(128) unsigned char smem[];
  const BwdTiles<E, D> t(smem);
  E *s_k = t.k, *s_v = t.v, *s_q = t.q, *s_do = t.dout, *s_p = t.p, *s_ds = t.ds;
  float *s_s = t.s, *s_dp = t.dp, *s_lse = t.lse, *s_delta = t.delta;

  const int k0 = blockIdx.x * kBlock;
  const size_t bkv = blockIdx.y;
  const int hkv = H / groups;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = warp * 16 + lane / 2, half = lane % 2;
  const int j = k0 + row;  // this lane's key
  load_tile<E, D>(s_k, kLdE, k + bkv * T * D, k0, T);
  load_tile<E, D>(s_v, kLdE, v + bkv * T * D, k0, T);
  Acc acc_dk[D / 16], acc_dv[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    wmma::fill_fragment(acc_dk[n], 0.0f);
    wmma::fill_fragment(acc_dv[n], 0.0f);
  }
  const float c = ca::score_scale_log2(scale);
  int lo, hi;
  ca::query_range(k0, kBlock, T, causal, window, kBlock, &lo, &hi);
  for (int g = 0; g < groups; ++g) {  // every query head reading this K/V head
    const size_t bh = (bkv / hkv) * H + (bkv % hkv) * groups + g;
    for (int q0 = lo; q0 < hi; q0 += kBlock) {
      __syncthreads();  // the previous query tile is no longer read
      load_tile<E, D>(s_q, kLdE, q + bh * T * D, q0, T);
      load_tile<E, D>(s_do, kLdE, dout + bh * T * D, q0, T);
      for (int r = threadIdx.x; r < kBlock; r += kThreads) {
        s_lse[r] = q0 + r < T ? lse[bh * T + q0 + r] : -INFINITY;
        s_delta[r] = q0 + r < T ? delta[bh * T + q0 + r] : 0.0f;
      }
      __syncthreads();
      // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys.
      warp_a_bt<E, D, kBlock / 16>(s_s + warp * 16 * kLdS, kLdS, s_k + warp * 16 * kLdE, kLdE, s_q, kLdE);
      warp_a_bt<E, D, kBlock / 16>(s_dp + warp * 16 * kLdS, kLdS, s_v + warp * 16 * kLdE, kLdE, s_do, kLdE);
      __syncwarp();
      for (int ii = half * 32; ii < half * 32 + 32; ++ii) {
        const float p = ca::allowed(q0 + ii, j, T, causal, window)
                            ? ca::prob_from_lse(s_s[row * kLdS + ii] * c, s_lse[ii]) : 0.0f;
        s_p[row * kLdP + ii] = convert<E>(p);
        s_ds[row * kLdP + ii] = convert<E>(ca::grad_score(p, s_dp[row * kLdS + ii], s_delta[ii]));
      }
      __syncwarp();
      warp_accumulate_ab<E, D>(acc_dv, s_p + warp * 16 * kLdP, kLdP, s_do, kLdE);  // dV += P^T dO
      warp_accumulate_ab<E, D>(acc_dk, s_ds + warp * 16 * kLdP, kLdP, s_q, kLdE);  // dK += dS^T Q
    }
  }
  __syncthreads();  // the Q/dO tiles become the fp32 staging buffer
  float* stage = reinterpret_cast<float*>(s_q);
  store_acc<E, D>(dk + bkv * T * D, acc_dk, stage, scale, k0, T);
  __syncwarp();
  store_acc<E, D>(dv + bkv * T * D, acc_dv, stage, 1.0f, k0, T);
}

template <typename E, int D>
__global__ void __launch_bounds__(kThreads) attention_dq_kernel(const E* q, const E* k, const E* v,
                                                                const E* dout, const float* lse,
                                                                const float* delta, E* dq, float scale, int T,
                                                                int H, int groups, bool causal, int window) {
  constexpr int kLdE = BwdTiles<E, D>::kLdE;
  extern __shared__ __align__(128) unsigned char smem[];
  const BwdTiles<E, D> t(smem);
  E *s_q = t.q, *s_do = t.dout, *s_k = t.k, *s_v = t.v, *s_ds = t.ds;
  float *s_s = t.s, *s_dp = t.dp;

  const int q0 = blockIdx.x * kBlock;
  const size_t bh = blockIdx.y, bkv = (bh / H) * (H / groups) + (bh % H) / groups;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = warp * 16 + lane / 2, half = lane % 2;
  const int i = q0 + row;  // this lane's query
  const float row_lse = i < T ? lse[bh * T + i] : -INFINITY;
  const float row_delta = i < T ? delta[bh * T + i] : 0.0f;
  load_tile<E, D>(s_q, kLdE, q + bh * T * D, q0, T);
  load_tile<E, D>(s_do, kLdE, dout + bh * T * D, q0, T);
  Acc acc_dq[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(acc_dq[n], 0.0f);
  const float c = ca::score_scale_log2(scale);
  int lo, hi;
  ca::key_range(q0, kBlock, T, causal, window, kBlock, &lo, &hi);
  for (int k0 = lo; k0 < hi; k0 += kBlock) {
    __syncthreads();
    load_tile<E, D>(s_k, kLdE, k + bkv * T * D, k0, T);
    load_tile<E, D>(s_v, kLdE, v + bkv * T * D, k0, T);
    __syncthreads();
    warp_a_bt<E, D, kBlock / 16>(s_s + warp * 16 * kLdS, kLdS, s_q + warp * 16 * kLdE, kLdE, s_k, kLdE);
    warp_a_bt<E, D, kBlock / 16>(s_dp + warp * 16 * kLdS, kLdS, s_do + warp * 16 * kLdE, kLdE, s_v, kLdE);
    __syncwarp();
    for (int jj = half * 32; jj < half * 32 + 32; ++jj) {
      const float p = ca::allowed(i, k0 + jj, T, causal, window)
                          ? ca::prob_from_lse(s_s[row * kLdS + jj] * c, row_lse) : 0.0f;
      s_ds[row * kLdP + jj] = convert<E>(ca::grad_score(p, s_dp[row * kLdS + jj], row_delta));
    }
    __syncwarp();
    warp_accumulate_ab<E, D>(acc_dq, s_ds + warp * 16 * kLdP, kLdP, s_k, kLdE);  // dQ += dS K
  }
  __syncthreads();  // the K/V tiles (one after the other) become the fp32 staging buffer
  store_acc<E, D>(dq + bh * T * D, acc_dq, reinterpret_cast<float*>(s_k), scale, q0, T);
}

template <typename E, int D>
cudaError_t forward(const void* q, const void* k, const void* v, void* o, float* lse, int B, int H, int Hkv,
                    int T, float scale, bool causal, int window, cudaStream_t stream) {
  constexpr size_t smem = fwd_smem_bytes<D>();
  auto kernel = attention_fwd_kernel<E, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  dim3 grid((T + kBlock - 1) / kBlock, B * H);
  kernel<<<grid, kThreads, smem, stream>>>(static_cast<const E*>(q), static_cast<const E*>(k),
                                           static_cast<const E*>(v), static_cast<E*>(o), lse, scale, T, H,
                                           H / Hkv, causal, window);
  return cudaGetLastError();
}

template <typename E, int D>
cudaError_t backward(const void* dout, const void* q, const void* k, const void* v, const void* o,
                     const float* lse, float* delta, void* dq, void* dk, void* dv, int B, int H, int Hkv, int T,
                     float scale, bool causal, int window, cudaStream_t stream) {
  const long rows = static_cast<long>(B) * H * T;
  attention_delta_kernel<E><<<(rows * 32 + 255) / 256, 256, 0, stream>>>(
      static_cast<const E*>(dout), static_cast<const E*>(o), delta, rows, D);
  constexpr size_t smem = bwd_smem_bytes<D>();
  auto dkdv = attention_dkdv_kernel<E, D>;
  auto dq_kernel = attention_dq_kernel<E, D>;
  cudaError_t err = cudaFuncSetAttribute(dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err == cudaSuccess) err = cudaFuncSetAttribute(dq_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const int tiles = (T + kBlock - 1) / kBlock;
  dkdv<<<dim3(tiles, B * Hkv), kThreads, smem, stream>>>(
      static_cast<const E*>(q), static_cast<const E*>(k), static_cast<const E*>(v), static_cast<const E*>(dout),
      lse, delta, static_cast<E*>(dk), static_cast<E*>(dv), scale, T, H, H / Hkv, causal, window);
  dq_kernel<<<dim3(tiles, B * H), kThreads, smem, stream>>>(
      static_cast<const E*>(q), static_cast<const E*>(k), static_cast<const E*>(v), static_cast<const E*>(dout),
      lse, delta, static_cast<E*>(dq), scale, T, H, H / Hkv, causal, window);
  return cudaGetLastError();
}

template <typename E>
cudaError_t forward_any_dim(int D, const void* q, const void* k, const void* v, void* o, float* lse, int B, int H,
                            int Hkv, int T, float scale, bool causal, int window, cudaStream_t stream) {
  switch (D) {
    case 16: return forward<E, 16>(q, k, v, o, lse, B, H, Hkv, T, scale, causal, window, stream);
    case 32: return forward<E, 32>(q, k, v, o, lse, B, H, Hkv, T, scale, causal, window, stream);
    case 64: return forward<E, 64>(q, k, v, o, lse, B, H, Hkv, T, scale, causal, window, stream);
    case 128: return forward<E, 128>(q, k, v, o, lse, B, H, Hkv, T, scale, causal, window, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename E>
cudaError_t backward_any_dim(int D, const void* dout, const void* q, const void* k, const void* v, const void* o,
                             const float* lse, float* delta, void* dq, void* dk, void* dv, int B, int H, int Hkv,
                             int T, float scale, bool causal, int window, cudaStream_t stream) {
#define CODEX_ATTENTION_BACKWARD(DIM) \
  backward<E, DIM>(dout, q, k, v, o, lse, delta, dq, dk, dv, B, H, Hkv, T, scale, causal, window, stream)
  switch (D) {
    case 16: return CODEX_ATTENTION_BACKWARD(16);
    case 32: return CODEX_ATTENTION_BACKWARD(32);
    case 64: return CODEX_ATTENTION_BACKWARD(64);
    case 128: return CODEX_ATTENTION_BACKWARD(128);
    default: return cudaErrorInvalidValue;
  }
#undef CODEX_ATTENTION_BACKWARD
}

}  // namespace

extern "C" {

// o [B, H, T, D] and lse [B, H, T] (fp32, natural log) from q [B, H, T, D], k, v [B, Hkv, T, D].
// dtype: 0 fp16, 1 bf16; D in {16, 32, 64, 128}; window <= 0: none. Returns a cudaError_t
// (cudaErrorInvalidValue for an unsupported dtype or head dim).
int codex_attention_forward(int dtype, const void* q, const void* k, const void* v, void* o, float* lse, int B,
                            int H, int Hkv, int T, int D, float scale, int causal, int window,
                            cudaStream_t stream) {
  if (B <= 0 || H <= 0 || Hkv <= 0 || H % Hkv || T <= 0) return cudaErrorInvalidValue;
  if (dtype == 0) return forward_any_dim<__half>(D, q, k, v, o, lse, B, H, Hkv, T, scale, causal, window, stream);
  if (dtype == 1) {
    return forward_any_dim<__nv_bfloat16>(D, q, k, v, o, lse, B, H, Hkv, T, scale, causal, window, stream);
  }
  return cudaErrorInvalidValue;
}

// dq, dk, dv from dout, the forward's inputs, o and lse; delta is a [B, H, T] fp32 workspace.
int codex_attention_backward(int dtype, const void* dout, const void* q, const void* k, const void* v,
                             const void* o, const float* lse, float* delta, void* dq, void* dk, void* dv, int B,
                             int H, int Hkv, int T, int D, float scale, int causal, int window,
                             cudaStream_t stream) {
  if (B <= 0 || H <= 0 || Hkv <= 0 || H % Hkv || T <= 0) return cudaErrorInvalidValue;
  if (dtype == 0) {
    return backward_any_dim<__half>(D, dout, q, k, v, o, lse, delta, dq, dk, dv, B, H, Hkv, T, scale, causal,
                                    window, stream);
  }
  if (dtype == 1) {
    return backward_any_dim<__nv_bfloat16>(D, dout, q, k, v, o, lse, delta, dq, dk, dv, B, H, Hkv, T, scale, causal,
                                           window, stream);
  }
  return cudaErrorInvalidValue;
}

}  // extern "C"
