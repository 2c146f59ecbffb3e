// Emulator stand-in: the CUDA error-check macros (TORCH_CHECK comes from the real c10 header).
#pragma once
#include <c10/util/Exception.h>

#include "cuda_runtime.h"

#define C10_CUDA_CHECK(EXPR)                                                                      \
  do {                                                                                            \
    const cudaError_t emu_err_ = (EXPR);                                                          \
    TORCH_CHECK(emu_err_ == cudaSuccess, "CUDA emulator error: ", cudaGetErrorString(emu_err_));  \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
