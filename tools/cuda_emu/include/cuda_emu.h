// cuda_emu: runs this project's plain-CUDA kernels (kernels/<op>/*.cu) on the CPU, so that the CPU test
// suite executes the kernels themselves and not only the tile math they share with a host test.
//
// A .cu file is compiled as C++ after tools/cuda_emu/rewrite_cu.py has turned its launches
// (k<<<grid, block, smem, stream>>>(...)) and __shared__ declarations into calls of this header, with
// the stand-in <cuda_runtime.h>, <cuda_fp16.h>, <cuda_bf16.h> and <mma.h> of this folder.
//
// How it runs: the blocks of a launch one after another; the threads of a block as fibers (ucontext)
// on one OS thread, each running until it reaches a barrier. It is strict where the hardware is
// allowed to be unkind, so that the usual kernel bugs show up as wrong numbers or a launch error:
// - a warp runs as far as its barriers let it before another warp moves, and the lanes of a warp run in
//   a random order between two barriers, so a missing __syncthreads / __syncwarp lets a thread read
//   what another has not written yet, or overwrite what another has still to read;
// - dynamic and static shared memory are filled with 0xFF bytes (NaN in fp32, fp16 and bf16) at the
//   start of every block, and guard bytes around dynamic shared memory are checked after it;
// - warp-collective operations (__syncwarp, __shfl_xor_sync, the wmma fragment operations) need every
//   lane of the warp alive and the full mask; a wmma store writes each element from one lane only, so
//   reading another lane's elements needs the __syncwarp the hardware needs;
// - wmma pointers must be 32-byte aligned and ldm a multiple of 16 bytes (as the CUDA guide requires),
//   dynamic shared memory over 48 KB needs cudaFuncSetAttribute and at most sm_80's 163 KB;
// - a barrier that can never complete (threads waiting at different kinds of barrier) is reported as
//   a deadlock instead of hanging.
// Each violation prints one line to stderr and makes the launch's cudaGetLastError() an error.
// Not modelled: inter-block concurrency (blocks run in order), atomics, the exact rounding of the
// device's math functions (host libm is used) and the order of a tensor-core product's additions.
#ifndef CODEX_ML_TOOLS_CUDA_EMU_H_
#define CODEX_ML_TOOLS_CUDA_EMU_H_

#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <immintrin.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// Everything below has internal linkage: each emulated library keeps its own state even when several
// are loaded into one process.
namespace {

// ---- vector types and built-in variables -------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
constexpr int warpSize = 32;

// ---- runtime API subset --------------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorIllegalAddress = 700,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;

// ---- fp16 / bf16 (bit layouts of the device types, round to nearest even) -------------------------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
// With the CPU's F16C instructions where it has them (chosen at run time), else GCC's software conversions:
// both round to nearest even, so the results are the same bits.
__attribute__((target("f16c"))) inline float half_to_float_f16c(uint16_t bits) { return _cvtsh_ss(bits); }
__attribute__((target("f16c"))) inline uint16_t float_to_half_f16c(float x) {
  return static_cast<uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT));
}
inline bool has_f16c() {
  static const bool yes = __builtin_cpu_supports("f16c");
  return yes;
}
inline float __half2float(__half h) {
  if (has_f16c()) return half_to_float_f16c(h.bits);
  _Float16 f;
  memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  if (has_f16c()) return __half{float_to_half_f16c(x)};
  const _Float16 f = static_cast<_Float16>(x);
  __half h;
  memcpy(&h.bits, &f, 2);
  return h;
}
inline __half __float2half(float x) { return __float2half_rn(x); }
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  if (std::isnan(x)) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float x) { return __float2bfloat16_rn(x); }

namespace cuda_emu {

constexpr size_t kDefaultDynamicSmem = 48 * 1024;  // without cudaFuncSetAttribute
constexpr size_t kMaxDynamicSmem = 166912;         // sm_80's 163 KB per block (sm_90 allows more)
constexpr size_t kGuardBytes = 4096;
constexpr unsigned char kGuard = 0xA5;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kPage = 4096;

struct Barrier {
  int arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;  // kStackBytes + a guard page below, mmap'ed once and reused
  bool done = false;
  uint3 idx{0, 0, 0};
};

struct State {
  std::function<void()> body;  // the kernel call of the current launch
  std::vector<Fiber> fibers;
  std::vector<unsigned> order;
  ucontext_t scheduler;
  unsigned current = 0;
  int live = 0;
  bool progressed = false;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<int> warp_live, warp_size;
  std::vector<uint64_t> shuffle_slots;  // 32 per warp
  std::vector<unsigned char> dynamic_smem;  // guard bytes, then dynamic_bytes from dynamic_offset, then guard
  size_t dynamic_offset = 0, dynamic_bytes = 0;
  uint64_t block_epoch = 0;
  uint64_t rng = 0;
  cudaError_t error = cudaSuccess;  // the launch's; returned (and reset) by cudaGetLastError
  int reports = 0;
  std::map<const void*, size_t> max_dynamic_smem;
};

State& state() {
  static State s;
  return s;
}

void fail(cudaError_t err, const char* what) {
  State& s = state();
  if (s.error == cudaSuccess) s.error = err;
  if (s.reports++ < 8) {
    std::fprintf(stderr, "cuda_emu: %s (block (%u, %u, %u), thread (%u, %u, %u))\n", what, blockIdx.x, blockIdx.y,
                 blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  }
}

void yield() {
  State& s = state();
  swapcontext(&s.fibers[s.current].ctx, &s.scheduler);
}

// Waits until `members` threads (counting this one) have arrived at b.
void wait(Barrier& b, int members) {
  State& s = state();
  const uint64_t generation = b.generation;
  s.progressed = true;
  if (++b.arrived >= members) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  do {
    yield();
  } while (b.generation == generation);
  s.progressed = true;
}

void release_if_complete(Barrier& b, int members) {
  if (b.arrived > 0 && b.arrived >= members) {
    b.arrived = 0;
    ++b.generation;
  }
}

unsigned linear_thread() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
unsigned warp_of_thread() { return linear_thread() / 32; }
unsigned lane() { return linear_thread() % 32; }

void warp_sync(unsigned mask, const char* what) {
  State& s = state();
  const unsigned w = warp_of_thread();
  const unsigned full = s.warp_size[w] == 32 ? 0xffffffffu : (1u << s.warp_size[w]) - 1;
  if ((mask & full) != full) fail(cudaErrorLaunchFailure, "partial warp masks are not emulated");
  if (s.warp_live[w] != s.warp_size[w]) {
    fail(cudaErrorLaunchFailure, what);  // a lane of this warp has exited
  }
  wait(s.warp_barriers[w], s.warp_live[w]);
}

void fiber_main() {
  State& s = state();
  s.body();
  Fiber& f = s.fibers[s.current];
  f.done = true;
  s.progressed = true;
  --s.live;
  const unsigned w = warp_of_thread();
  --s.warp_live[w];
  release_if_complete(s.block_barrier, s.live);
  release_if_complete(s.warp_barriers[w], s.warp_live[w]);
  // Returning resumes the scheduler (uc_link).
}

void allocate_fibers(size_t n) {
  State& s = state();
  while (s.fibers.size() < n) {
    Fiber f;
    void* p = mmap(nullptr, kStackBytes + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) {
      std::perror("cuda_emu: mmap");
      std::abort();
    }
    mprotect(p, kPage, PROT_NONE);  // a stack overflow faults instead of corrupting the next stack
    f.stack = static_cast<char*>(p);
    s.fibers.push_back(f);
  }
}

uint64_t next_random() {
  State& s = state();
  s.rng = s.rng * 6364136223846793005ull + 1442695040888963407ull;
  return s.rng >> 33;
}

void shuffle(std::vector<unsigned>& v) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[next_random() % i]);
}

// Shuffles the first n elements of state().order.
void shuffle_prefix(unsigned n) {
  std::vector<unsigned>& v = state().order;
  for (unsigned i = n; i > 1; --i) std::swap(v[i - 1], v[next_random() % i]);
}

// Runs one block to completion; false on a deadlock.
bool run_block(unsigned threads) {
  State& s = state();
  s.live = static_cast<int>(threads);
  const unsigned warps = (threads + 31) / 32;
  s.block_barrier = Barrier{};
  s.warp_barriers.assign(warps, Barrier{});
  s.warp_live.assign(warps, 0);
  s.warp_size.assign(warps, 0);
  s.shuffle_slots.assign(warps * 32, 0);
  for (unsigned t = 0; t < threads; ++t) {
    ++s.warp_live[t / 32];
    ++s.warp_size[t / 32];
  }
  ++s.block_epoch;
  memset(s.dynamic_smem.data() + s.dynamic_offset, 0xFF, s.dynamic_bytes);
  s.order.resize(threads);
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = s.fibers[t];
    f.done = false;
    f.idx = uint3{t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack + kPage;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &s.scheduler;
    makecontext(&f.ctx, fiber_main, 0);
  }
  // Rounds: the warps in a random order, each run until all its lanes wait at barriers (so one warp gets as
  // far ahead of the others as a __syncthreads lets it), its lanes resumed in a random order each time.
  std::vector<unsigned> warp_order(warps);
  for (unsigned w = 0; w < warps; ++w) warp_order[w] = w;
  while (s.live > 0) {
    shuffle(warp_order);
    bool any = false;
    for (unsigned w : warp_order) {
      for (bool again = true; again;) {
        again = false;
        const unsigned first = w * 32, count = static_cast<unsigned>(s.warp_size[w]);
        for (unsigned i = 0; i < count; ++i) s.order[i] = first + i;
        shuffle_prefix(count);
        for (unsigned i = 0; i < count; ++i) {
          Fiber& f = s.fibers[s.order[i]];
          if (f.done) continue;
          s.current = s.order[i];
          threadIdx = f.idx;
          s.progressed = false;
          swapcontext(&s.scheduler, &f.ctx);
          again = again || s.progressed;
        }
        any = any || again;
      }
    }
    if (!any) {
      // The abandoned fibers are never resumed; their contexts are rebuilt for the next block.
      fail(cudaErrorLaunchFailure, "deadlock: the block's threads wait at barriers that cannot complete");
      return false;
    }
  }
  const size_t end = s.dynamic_offset + s.dynamic_bytes;
  for (size_t i = 0; i < s.dynamic_smem.size(); ++i) {
    if ((i < s.dynamic_offset || i >= end) && s.dynamic_smem[i] != kGuard) {
      fail(cudaErrorIllegalAddress, "dynamic shared memory written out of its bounds");
      memset(s.dynamic_smem.data(), kGuard, s.dynamic_offset);
      memset(s.dynamic_smem.data() + end, kGuard, s.dynamic_smem.size() - end);
      break;
    }
  }
  return true;
}

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem) {
  State& s = state();
  const size_t threads = static_cast<size_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu) {
    fail(cudaErrorInvalidConfiguration, "invalid launch configuration");
    return;
  }
  const auto it = s.max_dynamic_smem.find(kernel);
  const size_t limit = it == s.max_dynamic_smem.end() ? kDefaultDynamicSmem : it->second;
  if (smem > limit) {
    fail(cudaErrorInvalidValue, "dynamic shared memory over the kernel's limit (cudaFuncSetAttribute)");
    return;
  }
  s.dynamic_bytes = smem;
  s.dynamic_smem.assign(smem + 2 * kGuardBytes + 128, kGuard);
  const uintptr_t start = reinterpret_cast<uintptr_t>(s.dynamic_smem.data()) + kGuardBytes;
  s.dynamic_offset = kGuardBytes + (128 - start % 128) % 128;
  allocate_fibers(threads);
  blockDim = block;
  gridDim = grid;
  s.rng = 0x9e3779b97f4a7c15ull;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        if (!run_block(static_cast<unsigned>(threads))) return;
      }
    }
  }
}

// The start of dynamic shared memory (extern __shared__ arrays), 128-byte aligned like the device's.
unsigned char* dynamic_shared() {
  State& s = state();
  return s.dynamic_smem.data() + s.dynamic_offset;
}

// A static __shared__ variable of type T (one per declaration, `Id`), poisoned at each new block.
template <typename T, int Id>
T& block_shared() {
  alignas(64) static unsigned char storage[sizeof(T)];
  static uint64_t epoch = 0;
  if (epoch != state().block_epoch) {
    memset(storage, 0xFF, sizeof(T));
    epoch = state().block_epoch;
  }
  return *reinterpret_cast<T*>(storage);
}

// k<<<grid, block, smem, stream>>>(args...) becomes launch(k, grid, block, smem, stream)(args...).
template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... args) const {
    // Arguments are converted to the parameter types once, as a launch copies them; each thread then
    // gets its own copies (kernels may modify their parameters).
    const std::tuple<P...> params(std::forward<A>(args)...);
    auto* fn = kernel;
    state().body = [fn, &params]() { std::apply(fn, params); };
    run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem);
    state().body = nullptr;
  }
};

template <typename... P>
Launcher<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return Launcher<P...>{kernel, grid, block, smem};
}

}  // namespace cuda_emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t err = cuda_emu::state().error;
  cuda_emu::state().error = cudaSuccess;
  cuda_emu::state().reports = 0;
  return err;
}
inline cudaError_t cudaPeekAtLastError() { return cuda_emu::state().error; }
inline cudaError_t cudaDeviceSynchronize() { return cuda_emu::state().error; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cuda_emu::state().error; }
inline const char* cudaGetErrorString(cudaError_t err) { return err == cudaSuccess ? "no error" : "cuda_emu error"; }

template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > cuda_emu::kMaxDynamicSmem) {
    return cudaErrorInvalidValue;
  }
  cuda_emu::state().max_dynamic_smem[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}

// ---- synchronization and warp shuffles ------------------------------------------------------------
inline void __syncthreads() {
  cuda_emu::State& s = cuda_emu::state();
  cuda_emu::wait(s.block_barrier, s.live);
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  cuda_emu::warp_sync(mask, "__syncwarp with an exited lane");
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "a 1-8 byte value");
  cuda_emu::State& s = cuda_emu::state();
  if (width != 32) cuda_emu::fail(cudaErrorLaunchFailure, "__shfl_xor_sync: only width 32 is emulated");
  uint64_t* slots = s.shuffle_slots.data() + cuda_emu::warp_of_thread() * 32;
  memcpy(&slots[cuda_emu::lane()], &value, sizeof(T));
  cuda_emu::warp_sync(mask, "__shfl_xor_sync with an exited lane");
  T result;
  memcpy(&result, &slots[(cuda_emu::lane() ^ static_cast<unsigned>(lane_mask)) % 32], sizeof(T));
  cuda_emu::warp_sync(mask, "__shfl_xor_sync with an exited lane");  // nobody overwrites a slot still to be read
  return result;
}

}  // namespace

#endif  // CODEX_ML_TOOLS_CUDA_EMU_H_
