// Emulator stand-in: the current stream (a null handle) and the emulated device's properties.
#pragma once
#include "cuda_runtime.h"

namespace at {
namespace cuda {
struct EmulatedStream {
  cudaStream_t stream() const { return nullptr; }
};
inline EmulatedStream getCurrentCUDAStream() { return {}; }
inline const cudaDeviceProp* getCurrentDeviceProperties() { return &emu::device_props(); }
}  // namespace cuda
}  // namespace at
