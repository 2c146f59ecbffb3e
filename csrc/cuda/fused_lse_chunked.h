// Host interface of the class-chunked CUDA path (csrc/chunk_loop.h run with the epilogue kernels of
// chunk_epilogue.cuh): called by the op layer (fused_lse_cuda.cpp) after its argument checks.
#pragma once

#include <tuple>

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include "chunk_loop.h"

namespace marginops {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> chunked_forward(const chunked::Problem& P, cudaStream_t stream);

// need_x / need_weight: which of grad_x / grad_weight to form (an unwanted one comes back empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunked_backward(const chunked::Problem& P,
                                                                            const at::Tensor& grad_lse,
                                                                            const at::Tensor& lse, bool need_x,
                                                                            bool need_weight, cudaStream_t stream);

// Matrix-product FLOPs issued by the chunk loop so far in this library (tests).
int64_t chunked_gemm_flops();

}  // namespace cuda
}  // namespace marginops
