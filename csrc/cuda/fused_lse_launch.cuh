// Host launch templates of the fused CUDA kernels (fused_lse_kernels.cuh), instantiated once per path by the
// entry points in fused_lse_<path>.cu (declared in fused_lse_params.h): occupancy queries, the forward's and the
// backward's launch sequences.
#pragma once

#include "fused_lse_kernels.cuh"
#include "launch.cuh"

namespace marginops {
namespace cuda {
namespace detail {

template <class Tr>
int path_occupancy(KernelKind kind, int* smem_bytes) {
  int occ = 0;
  switch (kind) {
    case KernelKind::kForward:
      *smem_bytes = static_cast<int>(FwdLayout<Tr>::kBytes);
      prepare_kernel(fused_lse_fwd_kernel<Tr>, FwdLayout<Tr>::kBytes, FwdLayout<Tr>::NT, &occ);
      break;
    case KernelKind::kBackwardW:
      *smem_bytes = static_cast<int>(BwdLayout<Tr>::kBytes);
      prepare_kernel(fused_lse_bwd_w_kernel<Tr>, BwdLayout<Tr>::kBytes, BwdLayout<Tr>::NT, &occ);
      break;
    case KernelKind::kBackwardX:
      *smem_bytes = static_cast<int>(BwdLayout<Tr>::kBytes);
      prepare_kernel(fused_lse_bwd_x_kernel<Tr>, BwdLayout<Tr>::kBytes, BwdLayout<Tr>::NT, &occ);
      break;
  }
  return occ;
}

inline unsigned int ceil_div_u(int64_t a, int64_t b) { return static_cast<unsigned int>((a + b - 1) / b); }

template <class Tr>
void run_forward(const FusedLseParams& p) {
  using L = FwdLayout<Tr>;
  if (p.B == 0) return;
  prepare_kernel(fused_lse_fwd_kernel<Tr>, L::kBytes, L::NT, nullptr);
  const dim3 grid(ceil_div_u(p.B, L::BM), static_cast<unsigned int>(p.splits));
  launch_kernel(fused_lse_fwd_kernel<Tr>, grid, L::NT, L::kBytes, p.stream, p);
  launch_kernel(fused_lse_fwd_merge_kernel<typename Tr::acc_t>, ceil_div_u(p.B, 256), 256, 0, p.stream, p);
}

template <class Tr>
void run_backward(const FusedLseParams& p) {
  using L = BwdLayout<Tr>;
  if (p.B == 0) return;
  TORCH_CHECK(p.dchunks == (p.D + L::DC - 1) / L::DC || (p.D == 0 && p.dchunks == 1),
              "marginops.fused_lse (cuda): D-chunk plan does not match the kernel's chunk width");
  const int cpt = p.cpt_bwd;
  if (p.N > 0 && p.D > 0 && p.grad_weight != nullptr) {  // nullptr: a frozen weight, no dW
    prepare_kernel(fused_lse_bwd_w_kernel<Tr>, L::kBytes, L::NT, nullptr);
    const dim3 grid_w(ceil_div_u(p.N, cpt), static_cast<unsigned int>(p.dchunks));
    launch_kernel(fused_lse_bwd_w_kernel<Tr>, grid_w, L::NT, L::kBytes, p.stream, p);
  }
  prepare_kernel(fused_lse_bwd_x_kernel<Tr>, L::kBytes, L::NT, nullptr);
  const dim3 grid_x(ceil_div_u(p.B, L::BM), static_cast<unsigned int>(p.splits),
                    static_cast<unsigned int>(p.dchunks));
  launch_kernel(fused_lse_bwd_x_kernel<Tr>, grid_x, L::NT, L::kBytes, p.stream, p);
  const int64_t n = p.B * p.D;
  if (n > 0) {
    const int64_t blocks = (n + 255) / 256;
    launch_kernel(fused_lse_bwd_reduce_dx_kernel<Tr>, static_cast<unsigned int>(blocks < 65536 ? blocks : 65536),
                  256, 0, p.stream, p);
  }
  launch_kernel(fused_lse_bwd_reduce_rows_kernel<typename Tr::acc_t>, ceil_div_u(p.B, 256), 256, 0, p.stream, p);
}

}  // namespace detail
}  // namespace cuda
}  // namespace marginops
