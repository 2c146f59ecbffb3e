// The fused kernels' bf16 path (bfloat16 inputs: WMMA bf16 x bf16 -> fp32).
// Its entry points, declared in fused_lse_params.h; one translation unit per path so that ninja builds them
// in parallel.
#include "fused_lse_launch.cuh"

namespace marginops {
namespace cuda {

int bf16_occupancy(KernelKind kind, int* smem_bytes) {
  return detail::path_occupancy<detail::TrBf16>(kind, smem_bytes);
}

void bf16_forward(const FusedLseParams& p) { detail::run_forward<detail::TrBf16>(p); }

void bf16_backward(const FusedLseParams& p) { detail::run_backward<detail::TrBf16>(p); }

}  // namespace cuda
}  // namespace marginops
