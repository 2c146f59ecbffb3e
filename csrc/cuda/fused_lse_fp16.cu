// Kernel instantiations for float16 inputs.
// One translation unit per path so that ninja can build them in parallel.
#include "fused_lse_kernels.cuh"

MARGINOPS_DEFINE_PATH(fp16, TrFp16)
