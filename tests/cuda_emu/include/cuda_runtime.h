// CPU emulation of the slice of the CUDA runtime and device API that csrc/cuda uses, so the real kernel
// sources run on the host (tests/test_op_suite.py).  One host thread per CUDA thread (a pool kept across
// launches); blocks of a grid run one after another and share one shared-memory buffer.  It is strict where the hardware is lenient, so
// that kernel bugs show up here:
//   * __syncthreads / __syncwarp are real barriers; one that not every live thread reaches is reported
//     as a deadlock (divergent barrier) instead of hanging.
//   * cp.async copies land only at the cp.async.wait_group that retires their group; reading a stage
//     before waiting sees the bytes that were there before.
//   * shared memory is filled with 0xFF (NaN for every float type) before each block, so reading a
//     value nobody wrote poisons the result; under AddressSanitizer the bytes past the requested
//     dynamic size are poisoned too.
//   * WMMA fragments check the documented pointer alignment (256 bits) and leading dimensions;
//     each lane stores only its share of an accumulator, so a missing __syncwarp before another lane
//     reads the tile can be seen.
//   * a launch checks the dynamic shared memory against the opt-in limit and the attribute the
//     kernel set (more than 48 KiB needs cudaFuncSetAttribute, as on a device).
// What it does not model (a GPU run still has to show these): the tensor cores' accumulation order and
// rounding (here exact products summed in k order in fp32, round to nearest), FMA contraction (nvcc
// contracts a*b+c by default, g++ -O2 does not: last-bit differences), cp.async copies landing early
// (here always at the wait: a missing barrier before a stage is reused shows only under ThreadSanitizer),
// ex2.approx's approximation (exp2 here, with its flush of results below 2^-126), races between CTAs (blocks
// run one after another), warp convergence of WMMA / shuffle calls and their
// masks, __syncthreads after some threads exited (counted as arrived; undefined on hardware), register
// limits and __launch_bounds__, and CUDA-graph capture (the op's capture-status query always says "none").
#pragma once

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

#define MARGINOPS_CUDA_EMULATOR 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(16) int4 {
  int x, y, z, w;
};
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }

extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

// ---- runtime API (one emulated device)
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaDeviceProp {
  char name[256];
  int major, minor, multiProcessorCount;
  size_t sharedMemPerBlockOptin;
};
const char* cudaGetErrorString(cudaError_t e);

namespace emu {
// Device the emulator pretends to be (MARGINOPS_EMU_SMS sets the SM count: it shapes the class splits).
const cudaDeviceProp& device_props();
cudaError_t set_dynamic_smem_limit(const void* kernel, int bytes);
int occupancy(const void* kernel, int threads, size_t smem);
// How long a barrier may wait before the launch fails as a deadlock (120 s unless a test shortens it).
void set_barrier_timeout_ms(int ms);
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);
// Kernel launches so far (tests count a path's launches: on a GPU each costs microseconds of idle device).
long long launch_count();

void syncthreads();
void syncwarp();
// Exchange 8 bytes with lane (lane ^ off) of this warp.
uint64_t exchange_xor(uint64_t v, int off);
// cp.async emulation: queue a 16-byte copy, close the open group, retire all but the newest n groups.
void async_copy16(void* dst, const void* src);
void async_commit();
void async_wait(int n);
// Abort the launch with a message (reported to the caller as an exception).
[[noreturn]] void fail(const char* fmt, ...);
}  // namespace emu

inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = static_cast<int>(emu::device_props().sharedMemPerBlockOptin);
  return cudaSuccess;
}
template <class Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return emu::set_dynamic_smem_limit(reinterpret_cast<const void*>(kernel), value);
}
template <class Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, Kernel kernel, int threads, size_t smem) {
  *n = emu::occupancy(reinterpret_cast<const void*>(kernel), threads, smem);
  return cudaSuccess;
}

// ---- device intrinsics
inline void __syncthreads() { emu::syncthreads(); }
// Blocks run one after another, so a fence has nothing to order between them; the atomic keeps the counter right
// for the threads of one block (and visible to ThreadSanitizer).
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::syncwarp(); }
template <class T>
T __shfl_xor_sync(unsigned, T v, int off, int = 32) {
  static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = emu::exchange_xor(bits, off);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

namespace marginops {
namespace cuda {
namespace detail {
// The emulator's stand-ins for the inline-PTX helpers of fused_lse_common.cuh.
inline void cp_async16(void* smem_dst, const void* gmem_src) { emu::async_copy16(smem_dst, gmem_src); }
inline void cp_async_commit() { emu::async_commit(); }
template <int N>
inline void cp_async_wait() {
  emu::async_wait(N);
}
// ... and for the kernel launch helper of fused_lse_kernels.cuh.
template <class... KArgs, class... Args>
inline void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
                          const Args&... args) {
  emu::run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, [&] { kernel(args...); });
}
}  // namespace detail
}  // namespace cuda
}  // namespace marginops
