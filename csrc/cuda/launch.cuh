// Kernel launches shared by the fused kernels and the class-chunked path: every launch goes through
// launch_kernel (launch on the given stream, then check it); the CPU emulator of these kernels (tests/cuda_emu)
// supplies its own launch_kernel that runs the grid on host threads.  prepare_kernel raises a kernel's dynamic
// shared-memory limit and queries its occupancy.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace marginops {
namespace cuda {
namespace detail {

#ifndef MARGINOPS_CUDA_EMULATOR
template <class... KArgs, class... Args>
inline void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          const Args&... args) {
  kernel<<<grid, block, smem, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif  // MARGINOPS_CUDA_EMULATOR

template <class Kernel>
inline int prepare_kernel(Kernel kernel, size_t smem, int threads, int* occupancy) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (static_cast<size_t>(optin) < smem) {
    if (occupancy) *occupancy = 0;
    return 0;
  }
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  if (occupancy) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(occupancy, kernel, threads, smem));
  }
  return 1;
}

}  // namespace detail
}  // namespace cuda
}  // namespace marginops
