// The fp32 (SIMT), tf32 and fp64 kernel files of csrc/cuda, compiled for the CPU emulator.
#include "fused_lse_fp32.cu"
#include "fused_lse_tf32.cu"
#include "fused_lse_fp64.cu"
