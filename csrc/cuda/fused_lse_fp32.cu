// Kernel instantiations for float32 inputs, exact SIMT fp32 path (the default for float32).
// One translation unit per path so that ninja can build them in parallel.
#include "fused_lse_kernels.cuh"

MARGINOPS_DEFINE_PATH(fp32, TrFp32)
