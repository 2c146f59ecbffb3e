// The bf16 and fp16 kernel files of csrc/cuda, compiled for the CPU emulator.
#include "fused_lse_bf16.cu"
#include "fused_lse_fp16.cu"
