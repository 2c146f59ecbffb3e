// The class-chunked CUDA path: the chunk loop of csrc/cpu/chunk_loop.h (matrix products by cuBLAS through
// ATen) instantiated with the CUDA epilogue kernels of chunk_epilogue.cuh, per weight dtype (the epilogue reads
// and writes weight rows; x only meets the matrix products, so a float32 weight with 16-bit x, mixed precision,
// runs the float32 epilogue).
#include "chunk_epilogue.cuh"
#include "fused_lse_chunked.h"

namespace marginops {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> chunked_forward(const chunked::Problem& P, cudaStream_t stream) {
  switch (P.weight.scalar_type()) {
    case at::kFloat: {
      detail::CudaEpilogue<float, float> epi{stream, P.x.options()};
      return chunked::forward<float>(P, epi);
    }
    case at::kDouble: {
      detail::CudaEpilogue<double, double> epi{stream, P.x.options()};
      return chunked::forward<double>(P, epi);
    }
    case at::kHalf: {
      detail::CudaEpilogue<__half, float> epi{stream, P.x.options()};
      return chunked::forward<float>(P, epi);
    }
    case at::kBFloat16: {
      detail::CudaEpilogue<__nv_bfloat16, float> epi{stream, P.x.options()};
      return chunked::forward<float>(P, epi);
    }
    default:
      TORCH_CHECK(false, "marginops.fused_lse (cuda, chunked): unsupported dtype ", P.x.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunked_backward(const chunked::Problem& P,
                                                                            const at::Tensor& grad_lse,
                                                                            const at::Tensor& lse, bool need_x,
                                                                            bool need_weight, cudaStream_t stream) {
  switch (P.weight.scalar_type()) {
    case at::kFloat: {
      detail::CudaEpilogue<float, float> epi{stream, P.x.options()};
      return chunked::backward<float>(P, grad_lse, lse, need_x, need_weight, epi);
    }
    case at::kDouble: {
      detail::CudaEpilogue<double, double> epi{stream, P.x.options()};
      return chunked::backward<double>(P, grad_lse, lse, need_x, need_weight, epi);
    }
    case at::kHalf: {
      detail::CudaEpilogue<__half, float> epi{stream, P.x.options()};
      return chunked::backward<float>(P, grad_lse, lse, need_x, need_weight, epi);
    }
    case at::kBFloat16: {
      detail::CudaEpilogue<__nv_bfloat16, float> epi{stream, P.x.options()};
      return chunked::backward<float>(P, grad_lse, lse, need_x, need_weight, epi);
    }
    default:
      TORCH_CHECK(false, "marginops.fused_lse (cuda, chunked): unsupported dtype ", P.x.scalar_type());
  }
}

int64_t chunked_gemm_flops() { return chunked::gemm_flop_counter().load(); }

}  // namespace cuda
}  // namespace marginops
