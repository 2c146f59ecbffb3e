// CUDA kernels of the class-chunked path (loop: csrc/chunk_loop.h; host side: fused_lse_chunked.cu).
// Per chunk: row_norms_kernel (one warp per weight row), then one epilogue launch (forward or backward), and in
// the backward weight_rows_kernel (one warp per weight row).
//
// Epilogue kernels (docs/CHUNKED.md, "Epilogue kernels"): a block owns kEpiRows batch rows of the tile and one
// column span of the chunk; the grid is row blocks x column splits, the splits planned by whole waves
// (wave_plan.h).  With one row per class (k = 1) and 16-byte aligned rows, each loop step of a thread loads one
// 16-byte vector of 1 / n_r and, per row, 16 bytes of the fp32 (fp64) block (kVec columns; 8 columns and one
// 16-byte store of 8 halves when the gradient block is fp16); with sub-centres or a ragged leading dimension it
// takes one column per step.  In-chunk indices are 32-bit (row x ld + column, from the block's 64-bit base pointer),
// and the exponentials are base 2 (ex2.approx for fp32) with log2(e) folded into the row's scale and lse.  Each
// block writes one partial per row (online max / sum / argmax, or the grad_row_scale sum); the last block of its
// row block to finish (an integer counter) merges the splits' partials in split order into the O(B) running
// state.  Every output element has one writer, no floating-point atomics: bitwise deterministic.  The CPU
// emulator (tests/cuda_emu) compiles this file with the host compiler.
//
// bench/gpu_static.py counts the SASS instructions of the epilogue kernels' 16-byte loop per logit: it divides
// by the product of their last two template arguments (rows per block x columns per step).
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <ATen/cuda/CUDAContext.h>

#include "fused_lse_common.cuh"  // device helpers (to_acc, Conv, exp_acc)
#include "launch.cuh"
#include "margin_math.h"
#include "wave_plan.h"
#include "chunk_loop.h"

namespace marginops {
namespace cuda {
namespace detail {

#ifdef MARGINOPS_CUDA_EMULATOR
constexpr int kEpiThreads = 64;  // one host thread per CUDA thread: small blocks keep the emulator fast
constexpr int kEpiMinSteps = 1;  // small chunks still split their columns (tests)
#else
constexpr int kEpiThreads = 256;
constexpr int kEpiMinSteps = 4;  // column splits leave every thread at least this many loop steps
#endif
constexpr int kEpiWarps = kEpiThreads / 32;
constexpr int kEpiRows = 4;   // batch rows per epilogue block: one load of 1 / n_r serves them all
// resident epilogue blocks per SM the registers must allow: 2 (up to 128 registers) keeps the 4 rows' 16-byte
// vectors of a step in registers (ptxas spilled at its own choice of 64-80)
constexpr int kEpiMinBlocks = 2;
constexpr int kRowWarps = 4;  // weight rows per block of the row kernels (one warp each)

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <class T>
__device__ __forceinline__ T log2e() {
  return T(1.4426950408889634074);
}
template <class T>
__device__ __forceinline__ T ln2() {
  return T(0.69314718055994530942);
}

// 2^x for the per-logit exponentials: the SFU's ex2.approx.ftz for fp32 (about 2 ulp; results below 2^-126, which
// no sum or fp16 gradient can hold next to its largest term, become 0), exp2 for fp64.  The emulator models the
// flush to zero, not the approximation.
__device__ __forceinline__ float exp2_fast(float x) {
#ifdef MARGINOPS_CUDA_EMULATOR
  const float y = exp2f(x);
  return y < 1.17549435e-38f ? 0.0f : y;  // NaN compares false and stays NaN
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}
__device__ __forceinline__ double exp2_fast(double x) { return exp2(x); }

// max(a, b) where a NaN operand loses (fmax): NaN never becomes the running max or the best cosine.
__device__ __forceinline__ float max_num(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_num(double a, double b) { return fmax(a, b); }

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }

// a where x == y, else b, always as a select: left to itself the compiler moves b's computation (the non-target
// value of a logit) into a branch around the rare equal case (its target column), which costs more per logit than
// computing b every time.
__device__ __forceinline__ float select_eq(int x, int y, float a, float b) {
#ifdef MARGINOPS_CUDA_EMULATOR
  return x == y ? a : b;
#else
  float r;
  asm("{\n\t.reg .pred p;\n\tsetp.eq.s32 p, %1, %2;\n\tselp.f32 %0, %3, %4, p;\n\t}"
      : "=f"(r)
      : "r"(x), "r"(y), "f"(a), "f"(b));
  return r;
#endif
}
__device__ __forceinline__ double select_eq(int x, int y, double a, double b) {
#ifdef MARGINOPS_CUDA_EMULATOR
  return x == y ? a : b;
#else
  double r;
  asm("{\n\t.reg .pred p;\n\tsetp.eq.s32 p, %1, %2;\n\tselp.f64 %0, %3, %4, p;\n\t}"
      : "=d"(r)
      : "r"(x), "r"(y), "d"(a), "d"(b));
  return r;
#endif
}

// Online log-sum-exp state: sum = sum_j exp(z_j - max) (Lse, natural units: the O(B) running state) or
// sum_j 2^(z_j - max) (Lse2, z in units of log2: the kernels' own).  -inf logits contribute 0; NaN logits never
// become the max and make the sum NaN.
template <class T>
struct Lse {
  T m, s;
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

template <class T>
struct Lse2 {
  T m, s;
  __device__ __forceinline__ void add(T z) {
    if (z > m) {
      s = s * exp2_fast(m - z) + T(1);  // m = -inf: 2^-inf = 0
      m = z;
    } else if (z != neg_inf<T>()) {
      s += exp2_fast(z - m);  // NaN z: NaN sum
    }
  }
  // N logits at once: one rescale of the sum per step instead of a branch per logit.  All -inf: the offset is
  // 0, so no -inf - (-inf).
  template <int N>
  __device__ __forceinline__ void add(const T (&z)[N]) {
    T zm = z[0];
#pragma unroll
    for (int q = 1; q < N; ++q) zm = max_num(zm, z[q]);
    const T nm = max_num(m, zm);
    const T off = nm == neg_inf<T>() ? T(0) : nm;
    T acc = s * exp2_fast(m - off);
#pragma unroll
    for (int q = 0; q < N; ++q) acc += exp2_fast(z[q] - off);
    s = acc;
    m = nm;
  }
  __device__ __forceinline__ void merge(T om, T os) {
    const T nm = om > m ? om : m;
    if (nm == neg_inf<T>()) {
      s += os;
      return;
    }
    s = s * exp2_fast(m - nm) + os * exp2_fast(om - nm);
    m = nm;
  }
};

// Best (cosine, column in the chunk): larger cosine wins, the smaller column on ties; NaN never wins.
template <class T>
struct Best {
  T c;
  int j;
  __device__ __forceinline__ void merge(T oc, int oj) {
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

__device__ __forceinline__ uint32_t float_bits(float v) {
#ifdef MARGINOPS_CUDA_EMULATOR
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b;
#else
  return __float_as_uint(v);
#endif
}
__device__ __forceinline__ float bits_float(uint32_t b) {
#ifdef MARGINOPS_CUDA_EMULATOR
  float v;
  std::memcpy(&v, &b, 4);
  return v;
#else
  return __uint_as_float(b);
#endif
}

// The f of split_pow2(v) without frexp, for every v the same value: the mantissa under a zero exponent; 0, inf
// and NaN come back unchanged (as from 2 * frexp), subnormals are scaled into the normal range first (exact).
__device__ __forceinline__ float pow2_fraction(float v) {
  const float w = (float_bits(v) & 0x7f800000u) == 0u ? v * 16777216.0f : v;
  const uint32_t b = float_bits(w);
  const bool special = w == 0.0f || (b & 0x7f800000u) == 0x7f800000u;
  return special ? w : bits_float((b & 0x807fffffu) | 0x3f800000u);
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

// kN elements at a 16-byte aligned address, in 16-byte accesses (LDG.128 / STG.128).
template <class T>
struct alignas(16) Vec16 {
  T v[16 / sizeof(T)];
};
template <int kN, class T>
__device__ __forceinline__ void load_vec(const T* p, T (&out)[kN]) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  static_assert(kN % kPer == 0, "whole 16-byte vectors");
#pragma unroll
  for (int u = 0; u < kN / kPer; ++u) {
    const Vec16<T> w = reinterpret_cast<const Vec16<T>*>(p)[u];
#pragma unroll
    for (int q = 0; q < kPer; ++q) out[u * kPer + q] = w.v[q];
  }
}
template <int kN, class T>
__device__ __forceinline__ void store_vec(T* p, const T (&in)[kN]) {
  constexpr int kPer = 16 / static_cast<int>(sizeof(T));
  static_assert(kN % kPer == 0, "whole 16-byte vectors");
#pragma unroll
  for (int u = 0; u < kN / kPer; ++u) {
    Vec16<T> w;
#pragma unroll
    for (int q = 0; q < kPer; ++q) w.v[q] = in[u * kPer + q];
    reinterpret_cast<Vec16<T>*>(p)[u] = w;
  }
}

// A partial written by another block of this launch: read past L1 (which is not coherent between SMs).
template <class T>
__device__ __forceinline__ T load_partial(const T* p) {
#ifdef MARGINOPS_CUDA_EMULATOR
  return *p;
#else
  return __ldcg(p);
#endif
}

// A launch's split of the chunk's columns and its partials (planned by CudaEpilogue::plan).
template <class T>
struct SplitArgs {
  int splits = 1;             // column splits (gridDim.y)
  int span = 0;               // columns per split, a multiple of the step's columns
  bool vec = false;           // the 16-byte path (k = 1, aligned rows and leading dimension)
  T* part = nullptr;          // per (split, row slot): forward max (base 2), sum, best cosine; backward the sum
  int* part_col = nullptr;    // forward: per (split, row slot) the best column in the chunk
  unsigned* done = nullptr;   // per row block: splits finished (the merging block resets it to 0)
};

// Whether this block is the last of its row block to finish (then it merges the partials).  The partials are
// written before; every thread fenced its own writes.
__device__ __forceinline__ bool last_split(unsigned* done, int splits, int* flag) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) *flag = splits == 1 || atomicAdd(done + blockIdx.x, 1u) == static_cast<unsigned>(splits - 1);
  __syncthreads();
  return *flag != 0;
}

// Forward: the chunk's logits of kRows rows x one column span and their online max / sum / argmax, merged into the
// O(B) running state by the last split.  kVec: columns per step of the 16-byte path.
template <class T, int kRows, int kVec>
__global__ void __launch_bounds__(kEpiThreads, kEpiMinBlocks)
    chunk_forward_kernel(const chunked::EpiArgs<T> a, const SplitArgs<T> sp) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int bt = static_cast<int>(a.bt);
  const int t0 = static_cast<int>(blockIdx.x) * kRows;
  const int c_lo = static_cast<int>(blockIdx.y) * sp.span;
  const int c_hi = std::min(static_cast<int>(a.cols), c_lo + sp.span);
  const T l2e = log2e<T>();
  int row[kRows];  // in-chunk index of the row's first element (32-bit: checked by the launch)
  int target[kRows];
  T rs2[kRows], thr[kRows], tl2[kRows];
  Lse2<T> lse[kRows];
  Best<T> best[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int t = std::min(t0 + r, bt - 1);  // a partial row block repeats its last row (results not kept)
    const int64_t i = a.row0 + t;
    row[r] = t * static_cast<int>(a.ld);
    target[r] = static_cast<int>(chunk_target(a, i));
    rs2[r] = a.row_scale[i] * l2e;
    thr[r] = a.threshold[i];
    tl2[r] = a.target_logit[i] * l2e;
    lse[r] = Lse2<T>{neg_inf<T>(), T(0)};
    best[r] = Best<T>{neg_inf<T>(), INT_MAX};
  }
  if (sp.vec) {
#pragma unroll 1
    for (int j = c_lo + static_cast<int>(threadIdx.x) * kVec; j < c_hi; j += kEpiThreads * kVec) {
      T iv[kVec], cs[kRows][kVec];
      load_vec(a.inv + j, iv);
#pragma unroll
      for (int r = 0; r < kRows; ++r) load_vec(a.S + (row[r] + j), cs[r]);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        T(&c)[kVec] = cs[r];
        T z[kVec];
#pragma unroll
        for (int q = 0; q < kVec; ++q) c[q] *= iv[q];
        T cm = c[0];
#pragma unroll
        for (int q = 1; q < kVec; ++q) cm = max_num(cm, c[q]);
        if (cm > best[r].c) {  // the step's first column; its lane is found after the loop
          best[r].c = cm;
          best[r].j = j;
        }
#pragma unroll
        for (int q = 0; q < kVec; ++q) {
          T dphi;
          z[q] = select_eq(j + q, target[r], tl2[r], rs2[r] * nontarget_phi(c[q], thr[r], a.params, &dphi));
        }
        lse[r].add(z);
      }
    }
    // the first column of the best step that has the best cosine (the same products as in the loop)
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (best[r].j == INT_MAX) continue;
      T iv[kVec], c[kVec];
      load_vec(a.inv + best[r].j, iv);
      load_vec(a.S + (row[r] + best[r].j), c);
      int lane = 0;
#pragma unroll
      for (int q = kVec - 1; q >= 0; --q) lane = c[q] * iv[q] == best[r].c ? q : lane;
      best[r].j += lane;
    }
  } else {
    for (int j = c_lo + static_cast<int>(threadIdx.x); j < c_hi; j += kEpiThreads) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (t0 + r >= bt) break;
        int64_t q;
        const T c = class_cos(a.S + row[r], a.inv, j, a.k, &q);
        if (c > best[r].c) {  // a thread's columns increase: the first maximum stays
          best[r].c = c;
          best[r].j = j;
        }
        T dphi;
        lse[r].add(j == target[r] ? tl2[r] : rs2[r] * nontarget_phi(c, thr[r], a.params, &dphi));
      }
    }
  }
  // per row: warp, then block reduction (fixed order: deterministic), one partial per row and split
  int* flag = reinterpret_cast<int*>(smem);
  T* sm = reinterpret_cast<T*>(smem + 16);  // [kRows][kEpiWarps][3]
  int* sj = reinterpret_cast<int*>(smem + 16 + 3 * sizeof(T) * kRows * kEpiWarps);  // [kRows][kEpiWarps]
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    for (int off = 16; off > 0; off >>= 1) {
      lse[r].merge(__shfl_xor_sync(0xffffffffu, lse[r].m, off), __shfl_xor_sync(0xffffffffu, lse[r].s, off));
      best[r].merge(__shfl_xor_sync(0xffffffffu, best[r].c, off), __shfl_xor_sync(0xffffffffu, best[r].j, off));
    }
    if (threadIdx.x % 32 == 0) {
      T* o = sm + 3 * (r * kEpiWarps + warp);
      o[0] = lse[r].m;
      o[1] = lse[r].s;
      o[2] = best[r].c;
      sj[r * kEpiWarps + warp] = best[r].j;
    }
  }
  __syncthreads();
  const int slots = static_cast<int>(gridDim.x) * kRows;
  const int r = threadIdx.x;  // thread r < kRows: row t0 + r
  if (r < kRows) {
    Lse2<T> l{sm[3 * r * kEpiWarps], sm[3 * r * kEpiWarps + 1]};
    Best<T> b{sm[3 * r * kEpiWarps + 2], sj[r * kEpiWarps]};
    for (int w = 1; w < kEpiWarps; ++w) {
      const T* o = sm + 3 * (r * kEpiWarps + w);
      l.merge(o[0], o[1]);
      b.merge(o[2], sj[r * kEpiWarps + w]);
    }
    const int64_t p = static_cast<int64_t>(blockIdx.y) * slots + t0 + r;
    sp.part[3 * p] = l.m;
    sp.part[3 * p + 1] = l.s;
    sp.part[3 * p + 2] = b.c;
    sp.part_col[p] = b.j;
  }
  if (!last_split(sp.done, sp.splits, flag)) return;
  if (r < kRows && t0 + r < bt) {
    const int64_t i = a.row0 + t0 + r;
    Lse2<T> l{load_partial(sp.part + 3 * (t0 + r)), load_partial(sp.part + 3 * (t0 + r) + 1)};
    Best<T> b{load_partial(sp.part + 3 * (t0 + r) + 2), load_partial(sp.part_col + t0 + r)};
    for (int s = 1; s < sp.splits; ++s) {
      const int64_t p = static_cast<int64_t>(s) * slots + t0 + r;
      l.merge(load_partial(sp.part + 3 * p), load_partial(sp.part + 3 * p + 1));
      b.merge(load_partial(sp.part + 3 * p + 2), load_partial(sp.part_col + p));
    }
    // merge into the running state in natural units (this thread is row i's only writer; chunks arrive in order)
    Lse<T> run{a.run_max[i], a.run_sum[i]};
    run.merge(l.m * ln2<T>(), l.s);
    a.run_max[i] = run.m;
    a.run_sum[i] = run.s;
    if (b.c > a.run_cos[i]) {  // strict: the earlier chunk (smaller column) wins ties
      a.run_cos[i] = b.c;
      a.run_col[i] = a.first_col + b.j;
    }
  }
  if (threadIdx.x == 0 && sp.splits > 1) sp.done[blockIdx.x] = 0;
}

// Backward: G_ir (row r = the winning subcenter of its class; the others get 0) = dcos_ir / n_r, or in fp16
// (row_gscale) sigma_i f_r dcos_ir with 1 / n_r = f_r 2^e_r (split_pow2; 2^e_r goes to the dX operand), formed as
// 2^(s_i phi / ln 2 - lse_i / ln 2) (g_i s_i sigma_i) (dphi f_r); kLo: also G's fp16 rounding error (fp16 inputs,
// hi + lo).  G may alias S (32/64-bit): each thread reads its columns of a row before writing them.  The row's
// grad_row_scale sum is merged over the splits by the last one, which also writes grad_target_logit.
template <class T, class G, bool kLo, int kRows, int kVec>
__global__ void __launch_bounds__(kEpiThreads, kEpiMinBlocks)
    chunk_backward_kernel(const chunked::EpiArgs<T> a, const SplitArgs<T> sp) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int bt = static_cast<int>(a.bt);
  const int t0 = static_cast<int>(blockIdx.x) * kRows;
  const int c_lo = static_cast<int>(blockIdx.y) * sp.span;
  const int c_hi = std::min(static_cast<int>(a.cols), c_lo + sp.span);
  constexpr bool kScaled = std::is_same<G, __half>::value;  // fp16 G (row_gscale): f_r in G, 2^e_r in the dX operand
  const T l2e = log2e<T>();
  G* const gb = static_cast<G*>(a.G);
  G* const lb = static_cast<G*>(a.G_lo);
  int row[kRows];  // in-chunk index of the row's first element (32-bit: checked by the launch)
  int target[kRows];
  T rs2[kRows], thr[kRows], l2[kRows], gain[kRows], total[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int t = std::min(t0 + r, bt - 1);  // a partial row block repeats its last row in the 16-byte loop
    const int64_t i = a.row0 + t;
    row[r] = t * static_cast<int>(a.ld);
    target[r] = static_cast<int>(chunk_target(a, i));
    const T rs = a.row_scale[i];
    rs2[r] = rs * l2e;
    thr[r] = a.threshold[i];
    l2[r] = a.lse[i] * l2e;
    gain[r] = a.grad_lse[i] * rs * (kScaled ? a.row_gscale[i] : T(1));
    total[r] = T(0);
  }
  if (sp.vec) {
#pragma unroll 1
    for (int j = c_lo + static_cast<int>(threadIdx.x) * kVec; j < c_hi; j += kEpiThreads * kVec) {
      T iv[kVec];
      load_vec(a.inv + j, iv);
      T f[kVec];  // the column's factor of G: f_r (fp16 G) or 1 / n_r
#pragma unroll
      for (int q = 0; q < kVec; ++q) {
        if constexpr (kScaled) {
          f[q] = pow2_fraction(iv[q]);
        } else {
          f[q] = iv[q];
        }
      }
      // every row's values before any store: G may alias S, and a partial row block repeats its last row
      T ss[kRows][kVec];
#pragma unroll
      for (int r = 0; r < kRows; ++r) load_vec(a.S + (row[r] + j), ss[r]);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const T(&s)[kVec] = ss[r];
        G hi[kVec], lo[kVec];
#pragma unroll
        for (int q = 0; q < kVec; ++q) {
          T dphi;
          const T c = s[q] * iv[q];
          const T phi = nontarget_phi(c, thr[r], a.params, &dphi);
          const T e = exp2_fast(fma_acc(rs2[r], phi, -l2[r]));  // exp(s phi - lse)
          total[r] += select_eq(j + q, target[r], T(0), e * phi);
          const T v = select_eq(j + q, target[r], T(0),
                                zero_if_filtered(c, a.params.filter, (e * gain[r]) * (dphi * f[q])));
          hi[q] = Conv<G>::from(v);
          if constexpr (kLo) lo[q] = Conv<G>::from(v - static_cast<T>(to_acc(hi[q])));
        }
        store_vec(gb + (row[r] + j), hi);
        if constexpr (kLo) store_vec(lb + (row[r] + j), lo);
      }
    }
  } else {
    for (int j = c_lo + static_cast<int>(threadIdx.x); j < c_hi; j += kEpiThreads) {
      const int64_t base = static_cast<int64_t>(j) * a.k;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (t0 + r >= bt) break;  // not the repeated last row: it would read the G written in place just before
        int64_t q;
        const T c = class_cos(a.S + row[r], a.inv, j, a.k, &q);
        T dphi;
        const T phi = nontarget_phi(c, thr[r], a.params, &dphi);
        const T e = exp2_fast(fma_acc(rs2[r], phi, -l2[r]));
        const bool keep = j != target[r];
        total[r] += keep ? e * phi : T(0);
        T fq = a.inv[base + q];
        if constexpr (kScaled) fq = pow2_fraction(fq);
        const T v = keep ? zero_if_filtered(c, a.params.filter, (e * gain[r]) * (dphi * fq)) : T(0);
        const G hi = Conv<G>::from(v);
        for (int64_t w = 0; w < a.k; ++w) gb[row[r] + base + w] = w == q ? hi : Conv<G>::from(T(0));
        if constexpr (kLo) {
          const G lo = Conv<G>::from(v - static_cast<T>(to_acc(hi)));
          for (int64_t w = 0; w < a.k; ++w) lb[row[r] + base + w] = w == q ? lo : Conv<G>::from(T(0));
        }
      }
    }
  }
  int* flag = reinterpret_cast<int*>(smem);
  T* sm = reinterpret_cast<T*>(smem + 16);  // [kRows][kEpiWarps]
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const T w = warp_sum(total[r]);
    if (threadIdx.x % 32 == 0) sm[r * kEpiWarps + warp] = w;
  }
  __syncthreads();
  const int slots = static_cast<int>(gridDim.x) * kRows;
  const int r = threadIdx.x;  // thread r < kRows: row t0 + r
  if (r < kRows) {
    T sum = sm[r * kEpiWarps];
    for (int w = 1; w < kEpiWarps; ++w) sum += sm[r * kEpiWarps + w];
    sp.part[static_cast<int64_t>(blockIdx.y) * slots + t0 + r] = sum;
  }
  if (!last_split(sp.done, sp.splits, flag)) return;
  if (r < kRows && t0 + r < bt) {
    const int64_t i = a.row0 + t0 + r;
    T sum = load_partial(sp.part + t0 + r);
    for (int s = 1; s < sp.splits; ++s) sum += load_partial(sp.part + static_cast<int64_t>(s) * slots + t0 + r);
    const T g = a.grad_lse[i];
    a.grad_scale[i] += g * sum;
    if (chunk_target(a, i) >= 0) a.grad_target[i] = g * exp_acc(a.target_logit[i] - a.lse[i]);
  }
  if (threadIdx.x == 0 && sp.splits > 1) sp.done[blockIdx.x] = 0;
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

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The epilogue policy of chunked::forward / chunked::backward for the CUDA kernels (io_t: device element type
// of x / weight; T: accumulation type).  options: the device of the launches' workspace (partials and split
// counters, grown as needed and kept for the whole op call).
template <class io_t, class T>
struct CudaEpilogue {
  cudaStream_t stream;
  at::TensorOptions options;
  at::Tensor partials, columns, counters;

  // columns per step of the 16-byte path: 16 bytes of the fp32 / fp64 block, or 8 columns when G is fp16
  static constexpr int kVecFwd = 16 / static_cast<int>(sizeof(T));
  static constexpr int kVecBwd32 = 16 / static_cast<int>(sizeof(T));
  static constexpr int kVecBwd16 = 8;

  void row_norms(const at::Tensor& W, at::Tensor& sumsq, at::Tensor& inv, const at::Tensor& What) {
    const int64_t rows = W.size(0);
    if (rows == 0) return;
    launch_kernel(chunk_row_norms_kernel<io_t, T>, row_blocks(rows), 32 * kRowWarps, 0, stream,
                  static_cast<const io_t*>(W.data_ptr()), rows, W.size(1), sumsq.data_ptr<T>(), inv.data_ptr<T>(),
                  What.defined() ? static_cast<__half*>(What.data_ptr()) : static_cast<__half*>(nullptr));
  }

  // Resident blocks per SM of an epilogue kernel (asked once per kernel: the callers keep it in a static).
  template <class Kernel>
  static int occupancy_of(Kernel kernel, size_t smem) {
    int occ = 0;
    prepare_kernel(kernel, smem, kEpiThreads, &occ);
    return occ > 0 ? occ : 1;
  }

  // The grid (row blocks x column splits) of one epilogue launch: splits by whole waves of the kernel's resident
  // blocks (wave_plan.h), each thread left at least kEpiMinSteps steps; per_slot: T values per partial.
  dim3 plan(int occupancy, const chunked::EpiArgs<T>& a, bool vec, int width, int per_slot, SplitArgs<T>* sp) {
    TORCH_CHECK(a.bt * a.ld <= INT_MAX - 2 * kEpiThreads * 8, "marginops.fused_lse (cuda, chunked): a block of ",
                a.bt, " rows x ", a.ld, " columns is beyond the epilogue's 32-bit in-chunk indices (lower ",
                kChunkCols.name, " or ", kChunkRows.name, ")");
    const int64_t units = (a.bt + kEpiRows - 1) / kEpiRows;
    const int64_t step = vec ? width : 1;
    const int64_t steps = (a.cols + step - 1) / step;
    const int64_t slots = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * occupancy;
    const int64_t limit = std::max<int64_t>(1, std::min<int64_t>(65535, steps / (kEpiThreads * kEpiMinSteps)));
    int64_t splits = whole_wave_splits(units, slots, 2, limit);
    const int64_t span = (steps + splits - 1) / splits * step;
    splits = (a.cols + span - 1) / span;
    sp->splits = static_cast<int>(splits);
    sp->span = static_cast<int>(span);
    sp->vec = vec;
    const int64_t n = splits * units * kEpiRows;
    // grown only: the stream orders an earlier launch's reads before a later allocation reuses the memory
    if (!partials.defined() || partials.numel() < per_slot * n) {
      partials = at::empty({per_slot * n}, options.dtype(c10::CppTypeToScalarType<T>::value));
    }
    if (per_slot == 3 && (!columns.defined() || columns.numel() < n)) {
      columns = at::empty({n}, options.dtype(at::kInt));
    }
    if (!counters.defined() || counters.numel() < units) {
      counters = at::zeros({units}, options.dtype(at::kInt));  // then kept at 0 by the merging blocks
    }
    sp->part = partials.data_ptr<T>();
    sp->part_col = per_slot == 3 ? columns.data_ptr<int>() : nullptr;
    sp->done = reinterpret_cast<unsigned*>(counters.data_ptr<int>());
    return dim3(static_cast<unsigned int>(units), static_cast<unsigned int>(splits));
  }

  void forward(const chunked::EpiArgs<T>& a) {
    auto* kernel = chunk_forward_kernel<T, kEpiRows, kVecFwd>;
    const size_t smem = 16 + (3 * sizeof(T) + sizeof(int)) * kEpiRows * kEpiWarps;
    static const int occupancy = occupancy_of(kernel, smem);
    const bool vec = a.k == 1 && a.ld % kVecFwd == 0 && aligned16(a.S) && aligned16(a.inv);
    SplitArgs<T> sp;
    const dim3 grid = plan(occupancy, a, vec, kVecFwd, 3, &sp);
    launch_kernel(kernel, grid, kEpiThreads, smem, stream, a, sp);
  }

  template <class G, bool kLo, int kVec>
  void backward_with(const chunked::EpiArgs<T>& a) {
    auto* kernel = chunk_backward_kernel<T, G, kLo, kEpiRows, kVec>;
    const size_t smem = 16 + sizeof(T) * kEpiRows * kEpiWarps;
    static const int occupancy = occupancy_of(kernel, smem);
    const bool vec = a.k == 1 && a.ld % kVec == 0 && aligned16(a.S) && aligned16(a.inv) && aligned16(a.G) &&
                     (!kLo || aligned16(a.G_lo));
    SplitArgs<T> sp;
    const dim3 grid = plan(occupancy, a, vec, kVec, 1, &sp);
    launch_kernel(kernel, grid, kEpiThreads, smem, stream, a, sp);
  }

  void backward(const chunked::EpiArgs<T>& a) {
    if constexpr (std::is_same<T, float>::value) {
      if (a.row_gscale != nullptr) {
        if (a.G_lo != nullptr) {
          backward_with<__half, true, kVecBwd16>(a);
        } else {
          backward_with<__half, false, kVecBwd16>(a);
        }
        return;
      }
    }
    TORCH_CHECK(a.row_gscale == nullptr && a.G_lo == nullptr, "marginops.fused_lse (cuda, chunked): an fp16 gradient "
                "block needs float32 accumulation");
    backward_with<T, false, kVecBwd32>(a);
  }

  void weight_rows(const chunked::WeightRowArgs<T>& a) {
    if (a.rows == 0) return;
    launch_kernel(chunk_weight_rows_kernel<io_t, T>, row_blocks(a.rows), 32 * kRowWarps, 0, stream, a);
  }
};

}  // namespace detail
}  // namespace cuda
}  // namespace marginops
