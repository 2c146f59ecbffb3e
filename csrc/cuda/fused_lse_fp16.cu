// The fused kernels' fp16 path (float16 inputs: WMMA fp16 x fp16 -> fp32).
// Its entry points, declared in fused_lse_params.h; one translation unit per path so that ninja builds them
// in parallel.
#include "fused_lse_launch.cuh"

namespace marginops {
namespace cuda {

int fp16_occupancy(KernelKind kind, int* smem_bytes) {
  return detail::path_occupancy<detail::TrFp16>(kind, smem_bytes);
}

void fp16_forward(const FusedLseParams& p) { detail::run_forward<detail::TrFp16>(p); }

void fp16_backward(const FusedLseParams& p) { detail::run_backward<detail::TrFp16>(p); }

}  // namespace cuda
}  // namespace marginops
