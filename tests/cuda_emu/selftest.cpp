// Deliberately broken kernels, one per kind of bug the emulator claims to catch: tests/test_op_backend_specific.py
// runs each and checks that it is reported, so that a clean run of the real kernels means something.
// Plain C++ (no torch headers, which would triple this file's compile time in every sanitizer build).
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_runtime.h"

namespace marginops {
namespace cuda {
namespace detail {
extern unsigned char smem[];
}  // namespace detail
}  // namespace cuda
}  // namespace marginops

namespace {
using marginops::cuda::detail::launch_kernel;
using marginops::cuda::detail::smem;

// every thread writes its shared-memory word and reads its neighbour's; `synced` puts the barrier between
__global__ void shared_handoff_kernel(float* out, bool synced) {
  auto* s = reinterpret_cast<float*>(smem);
  s[threadIdx.x] = 1.0f;
  if (synced) __syncthreads();
  const float v = s[(threadIdx.x + 1) % blockDim.x];
  if (threadIdx.x == 0) out[0] = v;
}

// reads one element past the end of `in`
__global__ void overread_kernel(const float* in, float* out, int n) {
  if (threadIdx.x == 0) out[0] = in[n];
}

// lane 0 waits at the block barrier while lanes 1-31 wait at the warp barrier for it: a deadlock
__global__ void divergent_barrier_kernel() {
  if (threadIdx.x == 0)
    __syncthreads();
  else
    __syncwarp();
}
}  // namespace

// which: "race", "synced", "overread" or "divergent_barrier"; returns the kernel's output word
double emulator_selftest(const std::string& which) {
  std::vector<float> out(1, 0.0f), in(3, 1.0f);  // separate heap blocks: ASan borders each with a redzone
  if (which == "race" || which == "synced") {
    launch_kernel(shared_handoff_kernel, dim3(1), dim3(64), 64 * sizeof(float), nullptr, out.data(),
                  which == "synced");
  } else if (which == "overread") {
    launch_kernel(overread_kernel, dim3(1), dim3(32), 0, nullptr, static_cast<const float*>(in.data()), out.data(),
                  static_cast<int>(in.size()));
  } else if (which == "divergent_barrier") {
    launch_kernel(divergent_barrier_kernel, dim3(1), dim3(64), 0, nullptr);
  } else {
    throw std::invalid_argument("unknown self-test " + which);
  }
  return out[0];
}
