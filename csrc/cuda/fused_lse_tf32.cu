// Kernel instantiations for float32 inputs on TF32 tensor cores (opt-in: MARGINOPS_CUDA_TF32=1).
// One translation unit per path so that ninja can build them in parallel.
#include "fused_lse_kernels.cuh"

MARGINOPS_DEFINE_PATH(tf32, TrTf32)
