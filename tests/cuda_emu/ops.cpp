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

// The ops with the schema's defaults: `switches` (last; -1: read the environment at the call) and, for the
// backward, need_grad_x / need_grad_weight (default true).
template <class F>
void def_forward(pybind11::module& m, const char* name, F f) {
  m.def(name, f);
  m.def(name, [f](const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels, const at::Tensor& tl,
                  const at::Tensor& rs, const at::Tensor& thr, const std::optional<at::Tensor>& ci, const at::Tensor& t,
                  int64_t nt, double filter, int64_t k, bool det) {
    return f(x, w, labels, tl, rs, thr, ci, t, nt, filter, k, det, -1);
  });
}

template <class F>
void def_backward(pybind11::module& m, const char* name, F f) {
  m.def(name, f);
  m.def(name, [f](const at::Tensor& g, const at::Tensor& lse, const at::Tensor& x, const at::Tensor& w,
                  const at::Tensor& labels, const at::Tensor& tl, const at::Tensor& rs, const at::Tensor& thr,
                  const std::optional<at::Tensor>& ci, const at::Tensor& t, int64_t nt, double filter, int64_t k,
                  bool det, bool need_x, bool need_w) {
    return f(g, lse, x, w, labels, tl, rs, thr, ci, t, nt, filter, k, det, need_x, need_w, -1);
  });
  m.def(name, [f](const at::Tensor& g, const at::Tensor& lse, const at::Tensor& x, const at::Tensor& w,
                  const at::Tensor& labels, const at::Tensor& tl, const at::Tensor& rs, const at::Tensor& thr,
                  const std::optional<at::Tensor>& ci, const at::Tensor& t, int64_t nt, double filter, int64_t k,
                  bool det) {
    return f(g, lse, x, w, labels, tl, rs, thr, ci, t, nt, filter, k, det, true, true, -1);
  });
}

double emulator_selftest(const std::string& which);  // selftest.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "csrc/cuda kernels run by the CPU emulator (tests only)";
  def_forward(m, "fused_lse", &marginops::cuda::fused_lse_cuda);
  def_backward(m, "fused_lse_backward", &marginops::cuda::fused_lse_backward_cuda);
  // the class-chunked path (csrc/chunk_loop.h with the kernels of csrc/cuda/chunk_epilogue.cuh)
  def_forward(m, "fused_lse_chunked", &marginops::cuda::fused_lse_chunked_cuda);
  def_backward(m, "fused_lse_backward_chunked", &marginops::cuda::fused_lse_backward_chunked_cuda);
  // what the op runs on CUDA tensors: the path MARGINOPS_CUDA_PATH (or `switches`) picks
  def_forward(m, "fused_lse_default", &marginops::cuda::fused_lse_cuda_default);
  def_backward(m, "fused_lse_backward_default", &marginops::cuda::fused_lse_backward_cuda_default);
  m.def("read_cuda_switches", &marginops::read_cuda_switches);
  m.def("chunked_gemm_flops", &marginops::cuda::chunked_gemm_flops);
  m.def("launch_count", &emu::launch_count);
  // deliberately broken kernels (selftest.cpp) and the deadlock timeout, to show that each bug is reported
  m.def("selftest", &emulator_selftest);
  m.def("set_barrier_timeout_ms", &emu::set_barrier_timeout_ms);
}
