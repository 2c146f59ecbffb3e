// Kernel instantiations for bfloat16 inputs.
// One translation unit per path so that ninja can build them in parallel.
#include "fused_lse_kernels.cuh"

MARGINOPS_DEFINE_PATH(bf16, TrBf16)
