// Deliberately broken kernels, one per kind of bug the emulator claims to catch: tests/test_op_backend_specific.py
// runs each and checks that it is reported, so that a clean run of the real kernels means something.
#include <torch/extension.h>

#include <string>

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
  auto out = torch::zeros({1}, torch::kFloat32);
  auto in = torch::ones({3}, torch::kFloat32);
  if (which == "race" || which == "synced") {
    launch_kernel(shared_handoff_kernel, dim3(1), dim3(64), 64 * sizeof(float), nullptr, out.data_ptr<float>(),
                  which == "synced");
  } else if (which == "overread") {
    launch_kernel(overread_kernel, dim3(1), dim3(32), 0, nullptr, in.data_ptr<float>(), out.data_ptr<float>(),
                  static_cast<int>(in.numel()));
  } else if (which == "divergent_barrier") {
    launch_kernel(divergent_barrier_kernel, dim3(1), dim3(64), 0, nullptr);
  } else {
    TORCH_CHECK(false, "unknown self-test ", which);
  }
  return out.item<double>();
}
