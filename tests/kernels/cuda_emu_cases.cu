// Small kernels, each right or with one deliberate bug, that tests/kernels/cuda_emu_test.py runs through
// cuda_emu to check that the emulator catches what it claims to catch (tools/cuda_emu/include/cuda_emu.h).
// Every entry point returns the launch's cudaError_t.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

namespace {

using namespace nvcuda;

// out[i] = what thread i wrote to shared memory, read back by thread (i + 1) % 128, with or without the barrier.
__global__ void neighbour_kernel(float* out, bool barrier) {
  __shared__ float slots[128];
  slots[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (barrier) __syncthreads();
  out[threadIdx.x] = slots[(threadIdx.x + 1) % 128];
}

// The same within a warp, with or without __syncwarp.
__global__ void warp_neighbour_kernel(float* out, bool barrier) {
  __shared__ float slots[32];
  slots[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (barrier) __syncwarp();
  out[threadIdx.x] = slots[(threadIdx.x + 1) % 32];
}

// Each warp reads the tile the next warp is about to overwrite; without the second barrier a warp that runs
// ahead overwrites it first (a write-after-read race across warps).
__global__ void overwrite_kernel(float* out, bool barrier) {
  __shared__ float tile[128];
  tile[threadIdx.x] = 1.0f;
  __syncthreads();
  const float seen = tile[(threadIdx.x + 32) % 128];
  if (barrier) __syncthreads();
  tile[threadIdx.x] = 2.0f;
  __syncthreads();
  out[threadIdx.x] = seen;
}

// Sum over the warp by butterfly shuffles: every lane gets 0 + 1 + ... + 31.
__global__ void shuffle_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  for (int mask = 16; mask > 0; mask >>= 1) v += __shfl_xor_sync(0xffffffffu, v, mask);
  out[threadIdx.x] = v;
}

// c = a b for 16x16 fp16 matrices (row-major) with one warp, through shared memory at `offset` halves.
__global__ void wmma_kernel(const __half* a, const __half* b, float* c, int offset, int ldm_pad) {
  extern __shared__ __align__(128) unsigned char smem[];
  __half* s = reinterpret_cast<__half*>(smem) + offset;
  const int ld = 16 + ldm_pad;
  for (int i = threadIdx.x; i < 256; i += 32) {
    s[(i / 16) * ld + i % 16] = a[i];
    s[16 * ld + (i / 16) * ld + i % 16] = b[i];
  }
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::load_matrix_sync(fa, s, ld);
  wmma::load_matrix_sync(fb, s + 16 * ld, ld);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

// Writes one float past the dynamic shared memory it was given when `overflow`.
__global__ void smem_kernel(int floats, bool overflow) {
  extern __shared__ float buf[];
  buf[threadIdx.x % floats] = 1.0f;
  if (overflow && threadIdx.x == 0) buf[floats] = 1.0f;
}

// Half the block waits at __syncthreads, the other half at __syncwarp of a warp whose other lanes are gone
// to the block barrier: no barrier can complete.
__global__ void deadlock_kernel() {
  if (threadIdx.x % 32 < 16) {
    __syncthreads();
  } else {
    __syncwarp();
  }
}

// Reads a static __shared__ value no thread wrote.
__global__ void uninitialized_kernel(float* out) {
  __shared__ float never_written;
  out[threadIdx.x] = never_written;
}

}  // namespace

extern "C" {

int emu_neighbour(float* out, int barrier) {
  neighbour_kernel<<<1, 128>>>(out, barrier != 0);
  return cudaGetLastError();
}

int emu_warp_neighbour(float* out, int barrier) {
  warp_neighbour_kernel<<<1, 32>>>(out, barrier != 0);
  return cudaGetLastError();
}

int emu_overwrite(float* out, int barrier) {
  overwrite_kernel<<<1, 128>>>(out, barrier != 0);
  return cudaGetLastError();
}

int emu_shuffle(float* out) {
  shuffle_kernel<<<1, 32>>>(out);
  return cudaGetLastError();
}

int emu_wmma(const void* a, const void* b, float* c, int offset, int ldm_pad) {
  const size_t smem = sizeof(__half) * (offset + 32 * (16 + ldm_pad));
  wmma_kernel<<<1, 32, smem>>>(static_cast<const __half*>(a), static_cast<const __half*>(b), c, offset, ldm_pad);
  return cudaGetLastError();
}

// `bytes` of dynamic shared memory, with the kernel's opt-in limit set to `attribute` bytes (0: the default 48 KB).
int emu_smem(int bytes, int attribute, int overflow) {
  const int limit = attribute > 0 ? attribute : 48 * 1024;
  const cudaError_t err = cudaFuncSetAttribute(smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit);
  if (err != cudaSuccess) return err;
  smem_kernel<<<2, 64, bytes>>>(bytes / 4, overflow != 0);
  return cudaGetLastError();
}

int emu_deadlock() {
  deadlock_kernel<<<1, 64>>>();
  return cudaGetLastError();
}

int emu_uninitialized(float* out) {
  uninitialized_kernel<<<1, 32>>>(out);
  return cudaGetLastError();
}

}  // extern "C"
