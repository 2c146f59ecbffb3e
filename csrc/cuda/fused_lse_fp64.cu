// Kernel instantiations for float64 inputs.
// One translation unit per path so that ninja can build them in parallel.
#include "fused_lse_kernels.cuh"

MARGINOPS_DEFINE_PATH(fp64, TrFp64)
