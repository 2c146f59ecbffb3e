// The fused kernels' tf32 path (float32 inputs, MARGINOPS_CUDA_TF32=1: WMMA tf32 -> fp32).
// Its entry points, declared in fused_lse_params.h; one translation unit per path so that ninja builds them
// in parallel.
#include "fused_lse_launch.cuh"

namespace marginops {
namespace cuda {

int tf32_occupancy(KernelKind kind, int* smem_bytes) {
  return detail::path_occupancy<detail::TrTf32>(kind, smem_bytes);
}

void tf32_forward(const FusedLseParams& p) { detail::run_forward<detail::TrTf32>(p); }

void tf32_backward(const FusedLseParams& p) { detail::run_backward<detail::TrTf32>(p); }

}  // namespace cuda
}  // namespace marginops
