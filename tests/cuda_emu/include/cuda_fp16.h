// Emulated __half with the conversion intrinsics csrc/cuda uses (GCC's _Float16: IEEE binary16, round to
// nearest even).
#pragma once
#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

struct __half {
  uint16_t bits;
};

inline float __half2float(__half v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, 2);
  return static_cast<float>(h);
}
inline __half __float2half_rn(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  __half out;
  std::memcpy(&out.bits, &h, 2);
  return out;
}
inline __half __ushort_as_half(unsigned short v) { return __half{v}; }
