// The fused kernels' fp32 path (float32 inputs: exact SIMT fp32 FMA, the default).
// Its entry points, declared in fused_lse_params.h; one translation unit per path so that ninja builds them
// in parallel.
#include "fused_lse_launch.cuh"

namespace marginops {
namespace cuda {

int fp32_occupancy(KernelKind kind, int* smem_bytes) {
  return detail::path_occupancy<detail::TrFp32>(kind, smem_bytes);
}

void fp32_forward(const FusedLseParams& p) { detail::run_forward<detail::TrFp32>(p); }

void fp32_backward(const FusedLseParams& p) { detail::run_backward<detail::TrFp32>(p); }

}  // namespace cuda
}  // namespace marginops
