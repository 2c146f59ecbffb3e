// Emulated nvcuda::wmma for the shapes csrc/cuda uses (m16n16k16 bf16 / fp16, m16n16k8 tf32, fp32
// accumulators).  Every lane holds the whole operand tiles; lane l owns the accumulator elements
// e with e % 32 == l (the real element-to-lane map is unspecified, kernels must not depend on it), so
// mma_sync and store_matrix_sync touch only those.  Products are exact in fp32 and summed in k order in
// fp32, as the tensor cores do up to their internal rounding.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace emu {
int lane_id();
}

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

template <class T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};

template <class Use, int M, int N, int K>
struct extent;
template <int M, int N, int K>
struct extent<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct extent<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct extent<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  using element_type = typename storage<T>::type;
  using use = Use;
  using layout = Layout;
  static constexpr int rows = extent<Use, M, N, K>::rows, cols = extent<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  element_type x[num_elements];  // row-major (rows x cols) in this emulation
};

inline float to_float(float v) { return v; }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float to_float(__half v) { return __half2float(v); }

// CUDA documents: mptr 256-bit aligned, ldm a multiple of 8 (16-bit elements) or 4 (32-bit elements).
template <class E>
inline void check_tile_pointer(const void* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu::fail("%s: pointer %p is not 256-bit aligned", what, p);
  if ((ldm * sizeof(E)) % 16 != 0) emu::fail("%s: ldm %u is not a multiple of 16 bytes", what, ldm);
}

inline float __float_to_tf32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) {  // finite: round the 13 dropped mantissa bits, ties away from zero
    u += 0x1000u;
    u &= 0xffffe000u;
  }
  std::memcpy(&f, &u, 4);
  return f;
}

template <class Use, int M, int N, int K, class T, class L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = static_cast<typename fragment<Use, M, N, K, T, L>::element_type>(v);
}

template <class Use, int M, int N, int K, class T, class L, class P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, L>;
  static_assert(std::is_same<P, typename F::element_type>::value, "pointer type must match the fragment");
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads are not used");
  check_tile_pointer<P>(p, ldm, "wmma::load_matrix_sync");
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = std::is_same<L, row_major>::value ? p[r * ldm + c] : p[c * ldm + r];
}

template <int M, int N, int K, class TA, class LA, class TB, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  const int lane = emu::lane_id();
  for (int e = lane; e < M * N; e += 32) {
    const int m = e / N, n = e % N;
    float acc = c.x[e];
    for (int k = 0; k < K; ++k) acc += to_float(a.x[m * K + k]) * to_float(b.x[k * N + n]);
    d.x[e] = acc;
  }
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  check_tile_pointer<float>(p, ldm, "wmma::store_matrix_sync");
  const int lane = emu::lane_id();
  for (int e = lane; e < M * N; e += 32) {
    const int m = e / N, n = e % N;
    if (layout == mem_row_major) {
      p[m * ldm + n] = f.x[e];
    } else {
      p[n * ldm + m] = f.x[e];
    }
  }
}

}  // namespace wmma
}  // namespace nvcuda
