// csrc/cuda/fused_lse_cuda.cpp (argument checks, grid planning, workspaces, dispatch) compiled against the
// emulator and exposed to Python as forward / backward on CPU tensors.  Two substitutions, both local to this
// file: the op's "is this a CUDA tensor" check accepts CPU tensors, and its dispatcher registration for the
// CUDA key is compiled into an unused function (the real CPU kernels keep the CPU key).
#include <torch/extension.h>
#include <torch/library.h>

#include "cuda_runtime.h"

#define is_cuda is_cpu
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, key, m) [[maybe_unused]] static void emulator_skips_registration(torch::Library& m)
#include "fused_lse_cuda.cpp"
#undef is_cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "csrc/cuda kernels run by the CPU emulator (tests only)";
  m.def("fused_lse", &marginops::cuda::fused_lse_cuda);
  m.def("fused_lse_backward", &marginops::cuda::fused_lse_backward_cuda);
  // the class-chunked path (csrc/cpu/chunk_loop.h with the kernels of csrc/cuda/chunked_epilogue.cuh)
  m.def("fused_lse_chunked", &marginops::cuda::fused_lse_chunked_cuda);
  m.def("fused_lse_backward_chunked", &marginops::cuda::fused_lse_backward_chunked_cuda);
  m.def("chunked_gemm_flops", &marginops::cuda::chunked_gemm_flops);
}
