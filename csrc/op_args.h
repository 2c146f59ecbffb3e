// Host-side reading of the op's tensor-valued scalars, shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/ATen.h>

namespace marginops {

// The non-target mode's scalar (CurricularFace's t) from the op's non_target_param: a one-element floating-point
// tensor, read on the host (free for the CPU tensor marginops passes; one device sync for a device tensor).
inline double non_target_param_value(const at::Tensor& param, const char* op) {
  TORCH_CHECK(param.numel() == 1 && param.is_floating_point(), op,
              "non_target_param must be a one-element floating-point tensor (the non-target mode's scalar), "
              "got shape ",
              param.sizes(), ", dtype ", param.scalar_type());
  return param.item<double>();
}

}  // namespace marginops
