// Device queries for the Python side: whether this library can run kernels on this machine.
#include <cuda_runtime.h>

extern "C" {

// Number of visible CUDA devices, or a negative cudaError_t when the runtime cannot start
// (on a machine without a driver: -cudaErrorInsufficientDriver or -cudaErrorNoDevice).
int codex_cuda_device_count() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  return err == cudaSuccess ? count : -static_cast<int>(err);
}

// The CUDA runtime version this library was built with (e.g. 13000 for 13.0).
int codex_cuda_runtime_version() { return CUDART_VERSION; }

}  // extern "C"
