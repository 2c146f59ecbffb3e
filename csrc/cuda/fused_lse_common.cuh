// Device building blocks of the fused LSE kernels: dtype traits, conversions, cp.async staging loads,
// a warp-level tile MMA (WMMA tensor cores or a SIMT fallback with the same interface) and the
// online log-sum-exp / argmax helpers.  Kernels are in fused_lse_kernels.cuh.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "margin_math.h"
#include "fused_lse_params.h"

namespace marginops {
namespace cuda {
namespace detail {

namespace wmma = nvcuda::wmma;

// ------------------------------------------------------------------------------------------------
// Element conversions.  torch builds extensions with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, so every conversion is an explicit intrinsic.
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <class T>
struct Conv;
template <>
struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ __nv_bfloat16 zero() { return __ushort_as_bfloat16((unsigned short)0); }
};
template <>
struct Conv<__half> {
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ __half zero() { return __ushort_as_half((unsigned short)0); }
};
template <>
struct Conv<float> {
  static __device__ __forceinline__ float from(float v) { return v; }
  static __device__ __forceinline__ float zero() { return 0.0f; }
};
template <>
struct Conv<double> {
  static __device__ __forceinline__ double from(double v) { return v; }
  static __device__ __forceinline__ double zero() { return 0.0; }
};

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }
__device__ __forceinline__ float log_acc(float v) { return logf(v); }
__device__ __forceinline__ double log_acc(double v) { return log(v); }

template <class T>
__device__ __forceinline__ T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// ------------------------------------------------------------------------------------------------
// Traits: one per KernelPath.
//   io_t  : element type of x / weight / grad_x / grad_weight, and of the S-product shared-memory tiles
//   acc_t : accumulation type (fp32, or fp64 for fp64 inputs)
//   Prod  : traits of the backward's dW / dX products (operand type Prod::io_t).  bf16 inputs use fp16
//           operands there: dcos keeps 11 mantissa bits instead of 8, and x and the rescaled W rows convert
//           with their bf16 precision (only entries below 2^-14 of the row's scale lose bits, as fp16
//           subnormals: negligible for the sums), accurate enough without a hi + lo split
//           (tests/test_op_suite.py measures it on the emulator)
//   kTC   : tensor cores through WMMA (else the SIMT warp tile below)
//   kTf32 : WMMA tf32 fragments (operands rounded to tf32 when loaded from shared memory)
//   kSplit: backward dcos may be stored as a hi + lo pair of Prod::io_t (fp16 inputs)
//   kScaleW: the dX product uses A = dcos * frac(1/n) and B = W * 2^exp(1/n), so that fp16 operands cannot
//            overflow for tiny-norm rows (see fused_lse_kernels.cuh, dX kernel)
//   kScaleDcos: fp16 products: dcos is multiplied by a power of two chosen from max |g * s| so that it
//            fits the fp16 range whatever the upstream gradient (loss scaling included)
//   KSTEP : WMMA k of one fragment;  BK: K (= D) chunk of one S-product stage;
//   BKP   : K chunk (rows of X / W) of one dW / dX product stage;  DC: D columns a backward CTA owns
//   kFwdMinBlocks: forward CTAs per SM the register allocation must allow (2 = at most 128 registers)
// ------------------------------------------------------------------------------------------------
struct TrFp16 {
  using io_t = __half;
  using acc_t = float;
  using wmma_t = __half;
  using Prod = TrFp16;
  static constexpr bool kTC = true, kTf32 = false, kSplit = true, kScaleW = true, kScaleDcos = true;
  static constexpr int KSTEP = 16, BK = 32, BKP = 16, kFwdMinBlocks = 2, DC = 512;
};
struct TrBf16 {
  using io_t = __nv_bfloat16;
  using acc_t = float;
  using wmma_t = __nv_bfloat16;
  using Prod = TrFp16;
  static constexpr bool kTC = true, kTf32 = false, kSplit = false, kScaleW = true, kScaleDcos = true;
  static constexpr int KSTEP = 16, BK = 32, BKP = 16, kFwdMinBlocks = 2, DC = 512;
};
struct TrTf32 {
  using io_t = float;
  using acc_t = float;
  using wmma_t = wmma::precision::tf32;
  using Prod = TrTf32;
  static constexpr bool kTC = true, kTf32 = true, kSplit = false, kScaleW = false, kScaleDcos = false;
  static constexpr int KSTEP = 8, BK = 16, BKP = 16, kFwdMinBlocks = 2, DC = 512;
};
struct TrFp32 {
  using io_t = float;
  using acc_t = float;
  using wmma_t = float;  // unused
  using Prod = TrFp32;
  static constexpr bool kTC = false, kTf32 = false, kSplit = false, kScaleW = false, kScaleDcos = false;
  static constexpr int KSTEP = 8, BK = 16, BKP = 16, kFwdMinBlocks = 1, DC = 512;
};
struct TrFp64 {
  using io_t = double;
  using acc_t = double;
  using wmma_t = double;  // unused
  using Prod = TrFp64;
  static constexpr bool kTC = false, kTf32 = false, kSplit = false, kScaleW = false, kScaleDcos = false;
  static constexpr int KSTEP = 8, BK = 8, BKP = 8, kFwdMinBlocks = 1, DC = 128;
};

// ------------------------------------------------------------------------------------------------
// cp.async (sm_80+) helpers.  The CPU emulator of these kernels (tests/cuda_emu) cannot compile inline PTX
// and supplies its own synchronous versions of these three functions.
// ------------------------------------------------------------------------------------------------
#ifndef MARGINOPS_CUDA_EMULATOR
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif  // MARGINOPS_CUDA_EMULATOR
__device__ __forceinline__ void st_zero16(void* smem_dst) {
  *reinterpret_cast<int4*>(smem_dst) = make_int4(0, 0, 0, 0);
}

// Stage a ROWS x n_fill window into shared memory (row stride ld elements).  row_ptr(r) gives the
// global address of element 0 of row r's window, or nullptr for a row that does not exist (zeros).
// Columns in [n_valid, n_fill) are zero-filled.  vec: 16-byte cp.async (requires n_valid, n_fill, ld
// and every row start to be multiples of 16 bytes); else plain element loads.
template <class T, int ROWS, int NT, class RowFn>
__device__ __forceinline__ void load_rows(T* sm, int ld, RowFn row_ptr, int n_valid, int n_fill, bool vec) {
  if (n_fill <= 0) return;
  if (vec) {
    constexpr int V = 16 / static_cast<int>(sizeof(T));
    const int cpr = n_fill / V;  // chunks per row
    const int total = ROWS * cpr;
    for (int c = threadIdx.x; c < total; c += NT) {
      const int r = c / cpr;
      const int cc = (c - r * cpr) * V;
      const T* src = row_ptr(r);
      T* dst = sm + r * ld + cc;
      if (src != nullptr && cc < n_valid) {
        cp_async16(dst, src + cc);
      } else {
        st_zero16(dst);
      }
    }
  } else {
    const int total = ROWS * n_fill;
    for (int e = threadIdx.x; e < total; e += NT) {
      const int r = e / n_fill;
      const int cc = e - r * n_fill;
      const T* src = row_ptr(r);
      sm[r * ld + cc] = (src != nullptr && cc < n_valid) ? src[cc] : Conv<T>::zero();
    }
  }
}

// As load_rows, converting the source type S to the stage type T, with row r multiplied by scale(r) (a
// power of two: exact unless the result leaves the T range).  Plain loads (the values pass through
// registers).
template <class S, class T, int ROWS, int NT, class RowFn, class ScaleFn>
__device__ __forceinline__ void load_rows_convert(T* sm, int ld, RowFn row_ptr, ScaleFn scale, int n_valid,
                                                  int n_fill) {
  if (n_fill <= 0) return;
  const int total = ROWS * n_fill;
  for (int e = threadIdx.x; e < total; e += NT) {
    const int r = e / n_fill;
    const int cc = e - r * n_fill;
    const S* src = row_ptr(r);
    T v = Conv<T>::zero();
    if (src != nullptr && cc < n_valid) v = Conv<T>::from(to_acc(src[cc]) * scale(r));
    sm[r * ld + cc] = v;
  }
}

// ------------------------------------------------------------------------------------------------
// Warp tile MMA: a warp accumulates a (16*FM) x (16*FN) tile C += A * B over a K chunk whose operands
// are in shared memory.  A(m, k) = A_ROW ? A[m*lda + k] : A[k*lda + m];
// B(k, n) = B_ROW ? B[k*ldb + n] : B[n*ldb + k].  Optional A2 (same layout/ld as A) adds A2 * B too
// (the lo half of a split operand).  Fragment columns fn*16 >= n_valid are skipped (warp-uniform).
// Both implementations place the same logical tile, so kernels only see mma / store_frag / store.
// ------------------------------------------------------------------------------------------------
template <class Tr, int FM, int FN, bool TC = Tr::kTC>
struct WarpMma;

// Tensor cores (WMMA m16n16k16 bf16/fp16 or m16n16k8 tf32, fp32 accumulation).
template <class Tr, int FM, int FN>
struct WarpMma<Tr, FM, FN, true> {
  using io_t = typename Tr::io_t;
  using acc_t = float;
  static constexpr int K = Tr::KSTEP;
  wmma::fragment<wmma::accumulator, 16, 16, K, float> c[FM][FN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::fill_fragment(c[i][j], 0.0f);
  }

  template <class Frag>
  __device__ __forceinline__ static void to_tf32(Frag& f) {
    if constexpr (Tr::kTf32) {
#pragma unroll
      for (int t = 0; t < f.num_elements; ++t) f.x[t] = wmma::__float_to_tf32(f.x[t]);
    }
  }

  template <int KSIZE, bool A_ROW, bool B_ROW>
  __device__ __forceinline__ void mma(const io_t* A, const io_t* A2, int lda, const io_t* B, int ldb,
                                      int n_valid) {
    // The lo half (A2) is a second pass over the same B fragments rather than a second live A
    // fragment: fewer registers next to the large dW / dX accumulators.
    mma_pass<KSIZE, A_ROW, B_ROW>(A, lda, B, ldb, n_valid);
    if (A2 != nullptr) mma_pass<KSIZE, A_ROW, B_ROW>(A2, lda, B, ldb, n_valid);
  }

  template <int KSIZE, bool A_ROW, bool B_ROW>
  __device__ __forceinline__ void mma_pass(const io_t* A, int lda, const io_t* B, int ldb, int n_valid) {
    using LA = typename std::conditional<A_ROW, wmma::row_major, wmma::col_major>::type;
    using LB = typename std::conditional<B_ROW, wmma::row_major, wmma::col_major>::type;
    static_assert(KSIZE % K == 0, "K chunk must be a multiple of the fragment k");
#pragma unroll
    for (int k0 = 0; k0 < KSIZE; k0 += K) {
      wmma::fragment<wmma::matrix_a, 16, 16, K, typename Tr::wmma_t, LA> a[FM];
#pragma unroll
      for (int fm = 0; fm < FM; ++fm) {
        const io_t* pa = A_ROW ? A + (fm * 16) * lda + k0 : A + k0 * lda + fm * 16;
        wmma::load_matrix_sync(a[fm], pa, lda);
        to_tf32(a[fm]);
      }
#pragma unroll
      for (int fn = 0; fn < FN; ++fn) {
        if (fn * 16 < n_valid) {
          wmma::fragment<wmma::matrix_b, 16, 16, K, typename Tr::wmma_t, LB> b;
          const io_t* pb = B_ROW ? B + k0 * ldb + fn * 16 : B + (fn * 16) * ldb + k0;
          wmma::load_matrix_sync(b, pb, ldb);
          to_tf32(b);
#pragma unroll
          for (int fm = 0; fm < FM; ++fm) wmma::mma_sync(c[fm][fn], a[fm], b, c[fm][fn]);
        }
      }
    }
  }

  // Store fragment (fm, fn) row-major at C (its top-left element), leading dimension ldc.
  __device__ __forceinline__ void store_frag(acc_t* C, int ldc, int fm, int fn) const {
    wmma::store_matrix_sync(C, c[fm][fn], ldc, wmma::mem_row_major);
  }
  __device__ __forceinline__ void store(acc_t* C, int ldc) const {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) store_frag(C + (i * 16) * ldc + j * 16, ldc, i, j);
  }
};

// SIMT fallback (exact fp32 / fp64 FMA): lane owns row (lane >> 1) and 8 columns ((lane & 1) * 8 ..) of
// every 16 x 16 fragment.
template <class Tr, int FM, int FN>
struct WarpMma<Tr, FM, FN, false> {
  using io_t = typename Tr::io_t;
  using acc_t = typename Tr::acc_t;
  acc_t c[FM][FN][8];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j)
#pragma unroll
        for (int e = 0; e < 8; ++e) c[i][j][e] = acc_t(0);
  }

  template <int KSIZE, bool A_ROW, bool B_ROW>
  __device__ __forceinline__ void mma(const io_t* A, const io_t* /*A2: never split here*/, int lda,
                                      const io_t* B, int ldb, int n_valid) {
    const int lane = threadIdx.x & 31;
    const int mr = lane >> 1;
    const int nc = (lane & 1) * 8;
#pragma unroll 4
    for (int k = 0; k < KSIZE; ++k) {
      acc_t a[FM];
#pragma unroll
      for (int fm = 0; fm < FM; ++fm) {
        const int m = fm * 16 + mr;
        a[fm] = to_acc(A_ROW ? A[m * lda + k] : A[k * lda + m]);
      }
#pragma unroll
      for (int fn = 0; fn < FN; ++fn) {
        if (fn * 16 < n_valid) {
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const int n = fn * 16 + nc + e;
            const acc_t b = to_acc(B_ROW ? B[k * ldb + n] : B[n * ldb + k]);
#pragma unroll
            for (int fm = 0; fm < FM; ++fm) c[fm][fn][e] = fma(a[fm], b, c[fm][fn][e]);
          }
        }
      }
    }
  }

  __device__ __forceinline__ void store_frag(acc_t* C, int ldc, int fm, int fn) const {
    const int lane = threadIdx.x & 31;
    const int mr = lane >> 1;
    const int nc = (lane & 1) * 8;
#pragma unroll
    for (int e = 0; e < 8; ++e) C[mr * ldc + nc + e] = c[fm][fn][e];
  }
  __device__ __forceinline__ void store(acc_t* C, int ldc) const {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) store_frag(C + (i * 16) * ldc + j * 16, ldc, i, j);
  }
};

// ------------------------------------------------------------------------------------------------
// Online log-sum-exp and argmax.
// State (m, s): lse = m + log(s).  m is never NaN; a NaN logit turns s into NaN for good, so NaN
// propagates into the result (fmax-style max alone would drop it).
// ------------------------------------------------------------------------------------------------
template <class T>
__device__ __forceinline__ void lse_add(T& m, T& s, T z) {
  if (z > m) {
    s = s * exp_acc(m - z) + T(1);  // m = -inf, s = 0: 0 * 0 + 1
    m = z;
  } else if (z == z) {
    if (z == m) {
      s += T(1);  // also covers z == m == +inf
    } else if (z > neg_inf<T>()) {
      s += exp_acc(z - m);
    }
  } else {
    s = z;  // NaN
  }
}

template <class T>
__device__ __forceinline__ void lse_merge(T& m, T& s, T m2, T s2) {
  if (m2 > m) {
    s = s * exp_acc(m - m2) + s2;
    m = m2;
  } else if (m2 == m) {
    s += s2;
  } else {
    s += s2 * exp_acc(m2 - m);  // m2 = -inf: s2 * 0 (s2 = 0, or NaN which stays NaN)
  }
}

// Argmax order: NaN above everything (as torch.argmax), then larger value, then smaller index.
template <class T>
__device__ __forceinline__ bool arg_better(T c1, int64_t j1, T c2, int64_t j2) {
  const bool n1 = c1 != c1, n2 = c2 != c2;
  if (n1 != n2) return n1;
  if (!n1 && c1 != c2) return c1 > c2;
  return j1 < j2;
}

// Subcenter max: NaN wins, then larger, first on ties.
template <class T>
__device__ __forceinline__ bool sub_better(T v, T best) {
  return v > best || (v != v && best == best);
}

__host__ __device__ constexpr size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }
__host__ __device__ constexpr size_t cmax(size_t a, size_t b) { return a > b ? a : b; }

}  // namespace detail
}  // namespace cuda
}  // namespace marginops
