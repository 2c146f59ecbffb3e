// The fused kernels' fp64 path (float64 inputs: SIMT fp64).
// Its entry points, declared in fused_lse_params.h; one translation unit per path so that ninja builds them
// in parallel.
#include "fused_lse_launch.cuh"

namespace marginops {
namespace cuda {

int fp64_occupancy(KernelKind kind, int* smem_bytes) {
  return detail::path_occupancy<detail::TrFp64>(kind, smem_bytes);
}

void fp64_forward(const FusedLseParams& p) { detail::run_forward<detail::TrFp64>(p); }

void fp64_backward(const FusedLseParams& p) { detail::run_backward<detail::TrFp64>(p); }

}  // namespace cuda
}  // namespace marginops
