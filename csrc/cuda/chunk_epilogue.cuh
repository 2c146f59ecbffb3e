// CUDA kernels of the class-chunked path (loop: csrc/cpu/chunk_loop.h; host side: fused_lse_chunked.cu).
// Per chunk: row_norms_kernel (one warp per weight row), then one epilogue launch (one block per batch row of
// the tile: forward or backward), and in the backward weight_rows_kernel (one warp per weight row).  Every
// output element has one writer and the running per-row state is updated by one thread per row in chunk
// order: no atomics, bitwise deterministic.  All offsets are 64-bit.  The CPU emulator (tests/cuda_emu)
// compiles this file with the host compiler.
#pragma once

#include <cstdint>

#include "fused_lse_common.cuh"  // device helpers (to_acc, Conv, exp_acc)
#include "launch.cuh"
#include "margin_math.h"
#include "chunk_loop.h"

namespace marginops {
namespace cuda {
namespace detail {

#ifdef MARGINOPS_CUDA_EMULATOR
constexpr int kEpiThreads = 64;  // one host thread per CUDA thread: small blocks keep the emulator fast
#else
constexpr int kEpiThreads = 256;
#endif
constexpr int kRowWarps = 4;  // weight rows per block of the row kernels (one warp each)

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Online log-sum-exp state: sum = sum_j exp(z_j - max).  -inf logits contribute 0; NaN logits never become
// the max and make the sum NaN.
template <class T>
struct Lse {
  T m, s;
  __device__ __forceinline__ void add(T z) {
    if (z > m) {
      s = s * exp_acc(m - z) + T(1);  // m = -inf: exp(-inf) = 0
      m = z;
    } else if (z != neg_inf<T>()) {
      s += exp_acc(z - m);  // NaN z: NaN sum
    }
  }
  __device__ __forceinline__ void merge(T om, T os) {
    const T nm = om > m ? om : m;
    if (nm == neg_inf<T>()) {
      s += os;
      return;
    }
    s = s * exp_acc(m - nm) + os * exp_acc(om - nm);
    m = nm;
  }
};

// Best (cosine, column): larger cosine wins, the smaller column on ties; NaN never wins.
template <class T>
struct Best {
  T c;
  int64_t j;
  __device__ __forceinline__ void merge(T oc, int64_t oj) {
    if (oc > c || (oc == c && oj < j)) {
      c = oc;
      j = oj;
    }
  }
};

// inv = f * 2^e with f in [1, 2): the fp16 scheme's split of 1 / n_r between the gradient block (f) and the
// dX operand (the row times 2^e, exact in fp16 whatever the norm: a bf16 or fp16 value times a power of two).
__device__ __forceinline__ float split_pow2(float v, int* e) {
  const float m = frexpf(v, e);
  *e -= 1;
  return 2.0f * m;
}
__device__ __forceinline__ double split_pow2(double v, int* e) {
  const double m = frexp(v, e);
  *e -= 1;
  return 2.0 * m;
}

// The class cosine of column j (max over its k rows, NaN wins as in torch.max) and the winning row q.
template <class T>
__device__ __forceinline__ T class_cos(const T* srow, const T* inv, int64_t j, int64_t k, int64_t* arg) {
  return subcenter_max(srow + j * k, inv + j * k, k, arg);
}

// The label's column inside the chunk, or -1 (labels are only compared, never used to read).
template <class T>
__device__ __forceinline__ int64_t chunk_target(const chunked::EpiArgs<T>& a, int64_t i) {
  return target_in_chunk(a.labels[i], a.first_col, a.cols);
}

template <class T>
__global__ void __launch_bounds__(kEpiThreads) chunk_forward_kernel(const chunked::EpiArgs<T> a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t t = blockIdx.x;  // row within the tile
  const int64_t i = a.row0 + t;
  const T* srow = a.S + t * a.ld;
  const int64_t target = chunk_target(a, i);
  const T tl = a.target_logit[i], rs = a.row_scale[i], thr = a.threshold[i];
  Lse<T> lse{neg_inf<T>(), T(0)};
  Best<T> best{neg_inf<T>(), INT64_MAX};
  for (int64_t j = threadIdx.x; j < a.cols; j += blockDim.x) {
    int64_t q;
    const T c = class_cos(srow, a.inv, j, a.k, &q);
    if (c > best.c) {  // a thread's columns increase: the first maximum stays
      best.c = c;
      best.j = j;
    }
    T dphi;
    lse.add(j == target ? tl : rs * nontarget_phi(c, thr, a.params, &dphi));
  }
  // warp, then block reduction (fixed order: deterministic)
  for (int off = 16; off > 0; off >>= 1) {
    lse.merge(__shfl_xor_sync(0xffffffffu, lse.m, off), __shfl_xor_sync(0xffffffffu, lse.s, off));
    best.merge(__shfl_xor_sync(0xffffffffu, best.c, off), __shfl_xor_sync(0xffffffffu, best.j, off));
  }
  T* sm = reinterpret_cast<T*>(smem);
  int64_t* sj = reinterpret_cast<int64_t*>(smem + 3 * sizeof(T) * (kEpiThreads / 32));
  const int warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  if (threadIdx.x % 32 == 0) {
    sm[3 * warp] = lse.m;
    sm[3 * warp + 1] = lse.s;
    sm[3 * warp + 2] = best.c;
    sj[warp] = best.j;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < nwarps; ++w) {
      lse.merge(sm[3 * w], sm[3 * w + 1]);
      best.merge(sm[3 * w + 2], sj[w]);
    }
    // merge into the running state (this thread is row i's only writer; chunks arrive in order)
    Lse<T> run{a.run_max[i], a.run_sum[i]};
    run.merge(lse.m, lse.s);
    a.run_max[i] = run.m;
    a.run_sum[i] = run.s;
    if (best.c > a.run_cos[i]) {  // strict: the earlier chunk (smaller column) wins ties
      a.run_cos[i] = best.c;
      a.run_col[i] = a.first_col + best.j;
    }
  }
}

// G_ir (row r = the winning subcenter of its class; the others get 0) = dcos_ir / n_r, or in fp16
// (row_gscale) sigma_i f_r dcos_ir with 1 / n_r = f_r 2^e_r (split_pow2; 2^e_r goes to the dX operand).  G may alias S (32/64-bit): each thread reads its column's k entries before writing
// them.
template <class T, class G>
__global__ void __launch_bounds__(kEpiThreads) chunk_backward_kernel(const chunked::EpiArgs<T> a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t t = blockIdx.x;
  const int64_t i = a.row0 + t;
  const T* srow = a.S + t * a.ld;
  G* grow = static_cast<G*>(a.G) + t * a.ld;
  const int64_t target = chunk_target(a, i);
  const T rs = a.row_scale[i], thr = a.threshold[i], g = a.grad_lse[i], l = a.lse[i];
  const T sigma = a.row_gscale != nullptr ? a.row_gscale[i] : T(1);
  T total = T(0);
  for (int64_t j = threadIdx.x; j < a.cols; j += blockDim.x) {
    int64_t q;
    const T c = class_cos(srow, a.inv, j, a.k, &q);
    T dphi;
    const T phi = nontarget_phi(c, thr, a.params, &dphi);
    const T dz = g * exp_acc(rs * phi - l);
    const bool keep = j != target;
    const T dcos = keep ? dz * rs * dphi : T(0);
    total += keep ? dz * phi : T(0);
    const int64_t base = j * a.k;
    int e;
    const T v = a.row_gscale != nullptr ? dcos * sigma * split_pow2(a.inv[base + q], &e) : dcos * a.inv[base + q];
    for (int64_t r = 0; r < a.k; ++r) grow[base + r] = Conv<G>::from(r == q ? v : T(0));
    if (a.G_lo != nullptr) {  // fp16 inputs: the rounding error of G as a second fp16 block (hi + lo)
      G* lrow = static_cast<G*>(a.G_lo) + t * a.ld;
      const T lo = v - static_cast<T>(to_acc(grow[base + q]));
      for (int64_t r = 0; r < a.k; ++r) lrow[base + r] = Conv<G>::from(r == q ? lo : T(0));
    }
  }
  total = warp_sum(total);
  T* sm = reinterpret_cast<T*>(smem);
  const int warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  if (threadIdx.x % 32 == 0) sm[warp] = total;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < nwarps; ++w) total += sm[w];
    a.grad_scale[i] += total;
    if (target >= 0) a.grad_target[i] = g * exp_acc(a.target_logit[i] - l);
  }
}

// sumsq[r], inv[r] = 1 / max(||w_r||, eps) and (What != nullptr) the row times 2^e_r in fp16 (inv = f 2^e_r,
// split_pow2): its norm lies in (1/2, 1], so it fits fp16 whatever ||w_r||, and the conversion is exact (a
// bf16 / fp16 value times a power of two; only entries below 2^-24 of the row's scale round, as subnormals).
template <class io_t, class T>
__global__ void __launch_bounds__(32 * kRowWarps) chunk_row_norms_kernel(const io_t* W, int64_t rows, int64_t D,
                                                                          T* sumsq, T* inv, __half* What) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  if (r >= rows) return;  // whole warps leave: no block barrier in this kernel
  const int lane = threadIdx.x % 32;
  const io_t* w = W + r * D;
  T s = T(0);
  for (int64_t d = lane; d < D; d += 32) {
    const T v = to_acc(w[d]);
    s += v * v;
  }
  s = warp_sum(s);
  const T iv = inv_row_norm(s);
  if (lane == 0) {
    sumsq[r] = s;
    inv[r] = iv;
  }
  if (What != nullptr) {
    int e;
    split_pow2(iv, &e);
    __half* o = What + r * D;
    for (int64_t d = lane; d < D; d += 32) o[d] = __float2half_rn(ldexpf(static_cast<float>(to_acc(w[d])), e));
  }
}

// grad_weight row of chunk row r from U_r = raw product row:
//   G = dcos / n (32/64-bit):  dW_r = U_r - (U_r . w^_r) w^_r
//   G = sigma f dcos (fp16):   dW_r = 2^e_r / sigma_min (U_r - (U_r . w^_r) w^_r)   (inv_r = f_r 2^e_r)
// without the projection term below eps; written (cast) to its weight row, through class_index.
template <class io_t, class T>
__global__ void __launch_bounds__(32 * kRowWarps) chunk_weight_rows_kernel(const chunked::WeightRowArgs<T> a) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  if (r >= a.rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t D = a.D;
  const T* u = a.U + r * D;
  const io_t* w = static_cast<const io_t*>(a.W) + r * D;
  const T iv = a.inv[r];
  const bool proj = norm_has_projection(a.sumsq[r]);
  T dot = T(0);
  if (proj) {
    for (int64_t d = lane; d < D; d += 32) dot += u[d] * (to_acc(w[d]) * iv);
    dot = warp_sum(dot);
  }
  int e = 0;
  split_pow2(iv, &e);
  const T alpha = a.gscale_min != nullptr ? static_cast<T>(ldexp(1.0, e)) / *a.gscale_min : T(1);
  const int64_t dst_row = a.class_index != nullptr ? a.class_index[r / a.k] * a.k + r % a.k : a.first_row + r;
  io_t* out = static_cast<io_t*>(a.grad_weight) + dst_row * D;
  for (int64_t d = lane; d < D; d += 32) {
    const T v = proj ? u[d] - dot * (to_acc(w[d]) * iv) : u[d];
    out[d] = Conv<io_t>::from(alpha * v);
  }
}

inline unsigned int row_blocks(int64_t rows) { return static_cast<unsigned int>((rows + kRowWarps - 1) / kRowWarps); }

// The epilogue policy of chunked::forward / chunked::backward for the CUDA kernels (io_t: device element type
// of x / weight; T: accumulation type).
template <class io_t, class T>
struct CudaEpilogue {
  cudaStream_t stream;

  void row_norms(const at::Tensor& W, at::Tensor& sumsq, at::Tensor& inv, const at::Tensor& What) {
    const int64_t rows = W.size(0);
    if (rows == 0) return;
    launch_kernel(chunk_row_norms_kernel<io_t, T>, row_blocks(rows), 32 * kRowWarps, 0, stream,
                  static_cast<const io_t*>(W.data_ptr()), rows, W.size(1), sumsq.data_ptr<T>(), inv.data_ptr<T>(),
                  What.defined() ? static_cast<__half*>(What.data_ptr()) : static_cast<__half*>(nullptr));
  }

  void forward(const chunked::EpiArgs<T>& a) {
    const size_t smem = (3 * sizeof(T) + sizeof(int64_t)) * (kEpiThreads / 32);
    launch_kernel(chunk_forward_kernel<T>, static_cast<unsigned int>(a.bt), kEpiThreads, smem, stream, a);
  }

  void backward(const chunked::EpiArgs<T>& a) {
    const size_t smem = sizeof(T) * (kEpiThreads / 32);
    if (a.row_gscale != nullptr) {
      launch_kernel(chunk_backward_kernel<T, __half>, static_cast<unsigned int>(a.bt), kEpiThreads, smem, stream, a);
    } else {
      launch_kernel(chunk_backward_kernel<T, T>, static_cast<unsigned int>(a.bt), kEpiThreads, smem, stream, a);
    }
  }

  void weight_rows(const chunked::WeightRowArgs<T>& a) {
    if (a.rows == 0) return;
    launch_kernel(chunk_weight_rows_kernel<io_t, T>, row_blocks(a.rows), 32 * kRowWarps, 0, stream, a);
  }
};

}  // namespace detail
}  // namespace cuda
}  // namespace marginops
