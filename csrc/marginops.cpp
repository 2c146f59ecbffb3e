// Schemas of the fused op (docs/DESIGN.md §2; contract in marginops/ops.py).
// need_grad_x / need_grad_weight (the backward's last two arguments): a gradient the caller does not want
// (a frozen weight, embeddings that do not require grad) comes back as an empty tensor (0 elements) and, in
// the CPU kernels and the chunked CUDA path, costs no matrix product and no allocation.
// non_target_param: the non-target mode's scalar (CurricularFace's t) as a one-element floating-point tensor, so
// that a module's state buffer flows into the op without a Python float (torch.compile traces it; a CPU tensor
// is read without a device sync).
// switches (the last argument of each op): the backend's per-call environment switches as the forward decided
// them, so that its backward runs the same path and precision (csrc/switches.h); -1 reads them at the call.
// marginops/ops.py passes read_cuda_switches() (CUDA) or the Triton backend's own reading to the forward and
// the same value to the backward.
// Only the schemas live here: the CPU kernels (csrc/cpu, same extension) and the CUDA kernels
// (csrc/cuda, a second extension loaded after this one) register with TORCH_LIBRARY_IMPL, and
// marginops/ops.py registers the fake impls and autograd from Python.  The two switch readers below need no
// tensor and are defined with their kernels here, in the extension that always loads.
#include <torch/library.h>

#include "switches.h"

TORCH_LIBRARY(marginops, m) {
  m.def(
      "fused_lse(Tensor x, Tensor weight, Tensor labels, Tensor target_logit, Tensor row_scale, "
      "Tensor threshold, Tensor? class_index, Tensor non_target_param, int non_target, "
      "float filter_threshold, int subcenters, bool deterministic, int switches=-1) -> (Tensor lse, Tensor argmax)");
  m.def(
      "fused_lse_backward(Tensor grad_lse, Tensor lse, Tensor x, Tensor weight, Tensor labels, "
      "Tensor target_logit, Tensor row_scale, Tensor threshold, Tensor? class_index, "
      "Tensor non_target_param, int non_target, float filter_threshold, int subcenters, "
      "bool deterministic, bool need_grad_x=True, bool need_grad_weight=True, int switches=-1) -> (Tensor grad_x, "
      "Tensor grad_weight, Tensor grad_target_logit, Tensor grad_row_scale)");
  // The fused CUDA kernels (csrc/cuda) under their own name, for backend="cuda_fused": fused_lse on CUDA
  // tensors runs the class-chunked path unless MARGINOPS_CUDA_PATH=fused.  Same schemas as above.
  m.def(
      "fused_lse_cuda_fused(Tensor x, Tensor weight, Tensor labels, Tensor target_logit, Tensor row_scale, "
      "Tensor threshold, Tensor? class_index, Tensor non_target_param, int non_target, "
      "float filter_threshold, int subcenters, bool deterministic, int switches=-1) -> (Tensor lse, Tensor argmax)");
  m.def(
      "fused_lse_cuda_fused_backward(Tensor grad_lse, Tensor lse, Tensor x, Tensor weight, Tensor labels, "
      "Tensor target_logit, Tensor row_scale, Tensor threshold, Tensor? class_index, "
      "Tensor non_target_param, int non_target, float filter_threshold, int subcenters, "
      "bool deterministic, bool need_grad_x=True, bool need_grad_weight=True, int switches=-1) -> (Tensor grad_x, "
      "Tensor grad_weight, Tensor grad_target_logit, Tensor grad_row_scale)");
  // The CUDA op's switches, read now and packed for its `switches` argument (opaque to Python).
  m.def("read_cuda_switches() -> int", [] { return marginops::read_cuda_switches(); });
  // Test hook: a C++ switch's value as the C++ parser reads it (tests/test_switches.py compares it with
  // marginops.config.parsed, spelling by spelling).
  m.def("_read_switch(str name) -> str", [](const std::string& name) { return marginops::read_switch_text(name); });
}
