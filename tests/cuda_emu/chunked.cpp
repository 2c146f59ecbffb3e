// The class-chunked path of csrc/cuda (chunk loop + epilogue kernels), compiled for the CPU emulator.
#include "fused_lse_chunked.cu"
