// CPU epilogue kernels (interface in chunk_epilogue.h): for each row of a class chunk, from the raw dot
// products x_i . w_r to the chunk's log-sum-exp partial and argmax (forward), or to dcos / n_r,
// the grad_row_scale part and grad_target_logit (backward).
//
// The inner loops are written with GCC/Clang vector extensions. GCC does not auto-vectorize them
// without -ffast-math, and -ffast-math would let it drop the NaN handling the contract needs. Each
// kernel is a template on the vector width; x86 builds also compile it for AVX2 and AVX-512
// (function target attributes) and pick the widest the CPU has at run time, so the build needs no
// -march flag. The vector loops and the scalar tails (the whole row on compilers without vector
// extensions) form phi and dphi with the same function, nontarget_phi_dphi of margin_math.h.
#include "chunk_epilogue.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "switches.h"

#if defined(__GNUC__) || defined(__clang__)
#define MARGINOPS_SIMD 1
#define MARGINOPS_ALWAYS_INLINE inline __attribute__((always_inline))
#define MARGINOPS_RESTRICT __restrict__
#if !defined(__clang__)
// Vectors wider than the default target only live inside the always-inlined kernels.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#else
#define MARGINOPS_SIMD 0
#define MARGINOPS_ALWAYS_INLINE inline
#define MARGINOPS_RESTRICT
#endif

#if MARGINOPS_SIMD && (defined(__x86_64__) || defined(__i386__))
#define MARGINOPS_X86_WIDTHS 1
#define MARGINOPS_TARGET_256 __attribute__((target("avx2,fma")))
#define MARGINOPS_TARGET_512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")))
#else
#define MARGINOPS_X86_WIDTHS 0
#endif

namespace marginops {
namespace cpu {
namespace {

#if MARGINOPS_SIMD
template <typename T, int kBytes>
struct Simd {
  typedef T V __attribute__((vector_size(kBytes)));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> E;  // lane ints: masks, columns
  typedef E M __attribute__((vector_size(kBytes)));
  static constexpr int W = kBytes / static_cast<int>(sizeof(T));
};

template <typename V, typename S>
MARGINOPS_ALWAYS_INLINE V splat(S s) {
  V v = {};
  return v + static_cast<std::remove_reference_t<decltype(v[0])>>(s);
}

template <typename V, typename T>
MARGINOPS_ALWAYS_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V, typename T>
MARGINOPS_ALWAYS_INLINE void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}

template <typename M>
MARGINOPS_ALWAYS_INLINE M lane_iota() {
  M m;
  for (int l = 0; l < static_cast<int>(sizeof(M) / sizeof(m[0])); ++l) m[l] = l;
  return m;
}

// Sum of the lanes in a fixed pairwise order.
template <typename T, typename V>
MARGINOPS_ALWAYS_INLINE T lane_sum(const V& v) {
  constexpr int W = sizeof(V) / sizeof(T);
  T a[W];
  std::memcpy(a, &v, sizeof a);
  for (int width = W / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) a[l] += a[l + width];
  }
  return a[0];
}

// exp of a float vector without a libm call: Cody-Waite reduction to |r| <= ln2/2 and the Cephes
// degree-6 polynomial (about 1 ulp). 2^n is applied as two factors so that overflow and gradual
// underflow come out as expf gives them; NaN stays NaN.
template <typename V>
MARGINOPS_ALWAYS_INLINE V vexp_f32(V x) {
  typedef int32_t M __attribute__((vector_size(sizeof(V))));
  const V hi = splat<V>(89.0f), lo = splat<V>(-104.0f), zero = splat<V>(0.0f);
  V xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  xc = x == x ? xc : zero;  // keeps the float -> int conversion defined for NaN
  const V magic = splat<V>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const V nf = (xc * splat<V>(1.44269504088896341f) + magic) - magic;
  const V r = (xc - nf * splat<V>(0.693359375f)) + nf * splat<V>(2.12194440e-4f);
  V p = splat<V>(1.9875691500e-4f);
  p = p * r + splat<V>(1.3981999507e-3f);
  p = p * r + splat<V>(8.3334519073e-3f);
  p = p * r + splat<V>(4.1665795894e-2f);
  p = p * r + splat<V>(1.6666665459e-1f);
  p = p * r + splat<V>(5.0000001201e-1f);
  const V y = p * (r * r) + r + splat<V>(1.0f);
  const M n = __builtin_convertvector(nf, M);
  const M n1 = n >> 1;
  const M n2 = n - n1;
  const V e = y * (V)((n1 + 127) << 23) * (V)((n2 + 127) << 23);
  const V out = x < lo ? zero : e;
  return x == x ? out : x;
}

template <typename T, typename V>
MARGINOPS_ALWAYS_INLINE V vexp(V x) {
  if constexpr (std::is_same_v<T, float>) {
    return vexp_f32(x);
  } else {
    // float64 is the accuracy path (tests, small problems): libm per lane.
    V out;
    for (int l = 0; l < static_cast<int>(sizeof(V) / sizeof(T)); ++l) out[l] = std::exp(x[l]);
    return out;
  }
}
#endif  // MARGINOPS_SIMD

template <typename T, int kBytes>
MARGINOPS_ALWAYS_INLINE void row_norms_impl(const T* w, int64_t rows, int64_t D, T* sumsq, T* inv) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* v = w + r * D;
    T total = 0;
    int64_t d = 0;
#if MARGINOPS_SIMD
    typedef typename Simd<T, kBytes>::V V;
    constexpr int W = Simd<T, kBytes>::W;
    if (D >= W) {
      V acc = splat<V>(0);
      for (; d + W <= D; d += W) {
        const V a = load<V>(v + d);
        acc += a * a;
      }
      total = lane_sum<T>(acc);
    }
#endif
    for (; d < D; ++d) total += v[d] * v[d];
    sumsq[r] = total;
    inv[r] = inv_row_norm(total);
  }
}

// The class cosine of each column (subcenter_max of margin_math.h), written to s[j] (s[j * k + q] holds the
// raw dot products; writing s[j] never overwrites an unread entry).
template <typename T>
MARGINOPS_ALWAYS_INLINE void reduce_subcenters(T* s, const T* inv, int64_t n, int64_t k) {
  for (int64_t j = 0; j < n; ++j) {
    int64_t arg;
    s[j] = subcenter_max(s + j * k, inv + j * k, k, &arg);
  }
}

template <typename T>
struct RowForward {
  T max_z;           // shift of sum_exp
  T sum_exp;         // sum_j exp(z_j - max_z)
  T best_cos;        // largest raw cosine of the row in this chunk
  int64_t best_col;  // its column in the chunk (smallest on ties)
};

// Forward of one row. s[j] holds x_i . w_j (kScale: still to multiply by inv[j]) or, with
// subcenters, the cosine itself; it is overwritten with the logit z_j. target: the column of the
// row's label in this chunk, or -1.
template <typename T, int kBytes, bool kScale>
MARGINOPS_ALWAYS_INLINE RowForward<T> forward_row(T* MARGINOPS_RESTRICT s,
                                                  const T* MARGINOPS_RESTRICT inv, int64_t n,
                                                  int64_t target, T target_logit, T row_scale,
                                                  T threshold, const NonTargetParams<T>& params) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  RowForward<T> out{neg_inf, T(0), neg_inf, 0};
  int64_t j = 0;
#if MARGINOPS_SIMD
  typedef typename Simd<T, kBytes>::V V;
  typedef typename Simd<T, kBytes>::M M;
  typedef typename Simd<T, kBytes>::E E;
  constexpr int W = Simd<T, kBytes>::W;
  if (n >= W) {
    const V vthr = splat<V>(threshold), vfilter = splat<V>(params.filter);
    const V vt = splat<V>(params.param), vscale = splat<V>(row_scale);
    const V vtarget_logit = splat<V>(target_logit);
    const M vtarget = splat<M>(E(target));  // chunks are far below 2^31 columns
    const M step = splat<M>(E(W));
    M col = lane_iota<M>();
    V best = splat<V>(neg_inf), zmax = splat<V>(neg_inf);
    M best_at = splat<M>(E(0));
    for (; j + W <= n; j += W, col += step) {
      V c = load<V>(s + j);
      if (kScale) c *= load<V>(inv + j);
      const M better = c > best;  // strict: each lane keeps its first maximum
      best = better ? c : best;
      best_at = better ? col : best_at;
      V dphi;
      V z = vscale * nontarget_phi_dphi<T>(c, vthr, params.mode, vt, vfilter, &dphi);
      z = col == vtarget ? vtarget_logit : z;
      store(s + j, z);
      zmax = z > zmax ? z : zmax;
    }
    for (int l = 0; l < W; ++l) {
      out.max_z = zmax[l] > out.max_z ? zmax[l] : out.max_z;
      if (best[l] > out.best_cos || (best[l] == out.best_cos && best_at[l] < out.best_col)) {
        out.best_cos = best[l];
        out.best_col = best_at[l];
      }
    }
  }
#endif
  for (; j < n; ++j) {
    const T c = kScale ? s[j] * inv[j] : s[j];
    if (c > out.best_cos) {
      out.best_cos = c;
      out.best_col = j;
    }
    T dphi;
    const T z = j == target ? target_logit : row_scale * nontarget_phi(c, threshold, params, &dphi);
    s[j] = z;
    out.max_z = z > out.max_z ? z : out.max_z;
  }

  // All logits -inf: every term is 0 (a shift of -inf would make them exp(nan)). NaN logits never
  // become the max; they reach the sum and make it NaN.
  const T shift = out.max_z == neg_inf ? T(0) : out.max_z;
  T sum = 0;
  j = 0;
#if MARGINOPS_SIMD
  if (n >= W) {
    const V vshift = splat<V>(shift);
    V acc = splat<V>(0);
    for (; j + W <= n; j += W) acc += vexp<T>(load<V>(s + j) - vshift);
    sum = lane_sum<T>(acc);
  }
#endif
  for (; j < n; ++j) sum += std::exp(s[j] - shift);
  out.sum_exp = sum;
  return out;
}

// Backward of one row with one weight row per class. s[j] holds x_i . w_j on entry and
// g_j = dcos_ij / n_j on exit; colsum[j] accumulates g_j * cos_ij (the normalization term of
// grad_weight). Returns the row's grad_row_scale part. The target column gets nothing here: its
// gradient leaves through target_logit.
template <typename T, int kBytes>
MARGINOPS_ALWAYS_INLINE T backward_row(T* MARGINOPS_RESTRICT s, const T* MARGINOPS_RESTRICT inv,
                                       T* MARGINOPS_RESTRICT colsum, int64_t n, int64_t target,
                                       T row_scale, T threshold, T grad, T lse,
                                       const NonTargetParams<T>& params) {
  T total = 0;
  int64_t j = 0;
#if MARGINOPS_SIMD
  typedef typename Simd<T, kBytes>::V V;
  typedef typename Simd<T, kBytes>::M M;
  typedef typename Simd<T, kBytes>::E E;
  constexpr int W = Simd<T, kBytes>::W;
  if (n >= W) {
    const V zero = splat<V>(0);
    const V vthr = splat<V>(threshold), vfilter = splat<V>(params.filter);
    const V vt = splat<V>(params.param), vscale = splat<V>(row_scale);
    const V vgrad = splat<V>(grad), vlse = splat<V>(lse);
    const M vtarget = splat<M>(E(target));
    const M step = splat<M>(E(W));
    M col = lane_iota<M>();
    V acc = zero;
    for (; j + W <= n; j += W, col += step) {
      const V vi = load<V>(inv + j);
      const V c = load<V>(s + j) * vi;
      V dphi;
      const V phi = nontarget_phi_dphi<T>(c, vthr, params.mode, vt, vfilter, &dphi);
      const V dz = vgrad * vexp<T>(vscale * phi - vlse);
      const M keep = col != vtarget;
      const V g = keep ? zero_if_filtered(c, vfilter, dz * vscale * dphi * vi) : zero;
      acc += keep ? dz * phi : zero;
      store(s + j, g);
      store(colsum + j, load<V>(colsum + j) + g * c);
    }
    total = lane_sum<T>(acc);
  }
#endif
  for (; j < n; ++j) {
    const T c = s[j] * inv[j];
    T dphi;
    const T phi = nontarget_phi(c, threshold, params, &dphi);
    const T dz = grad * std::exp(row_scale * phi - lse);
    const bool keep = j != target;
    const T g = keep ? zero_if_filtered(c, params.filter, dz * row_scale * dphi * inv[j]) : T(0);
    total += keep ? dz * phi : T(0);
    s[j] = g;
    colsum[j] += g * c;
  }
  return total;
}

// The same with k subcenters per class: only the row achieving the max (first on ties) gets dcos.
template <typename T>
MARGINOPS_ALWAYS_INLINE T backward_row_subcenters(T* s, const T* inv, T* colsum, int64_t n,
                                                  int64_t k, int64_t target, T row_scale,
                                                  T threshold, T grad, T lse,
                                                  const NonTargetParams<T>& params) {
  T total = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t base = j * k;
    int64_t arg;
    const T c = subcenter_max(s + base, inv + base, k, &arg);
    T dphi;
    const T phi = nontarget_phi(c, threshold, params, &dphi);
    const T dz = grad * std::exp(row_scale * phi - lse);
    const bool keep = j != target;
    const T g = keep ? dz * row_scale * dphi * inv[base + arg] : T(0);
    total += keep ? dz * phi : T(0);
    for (int64_t q = 0; q < k; ++q) s[base + q] = T(0);
    s[base + arg] = g;
    colsum[base + arg] += g * c;
  }
  return total;
}

template <typename T, int kBytes>
MARGINOPS_ALWAYS_INLINE void forward_rows_impl(const ChunkRows<T>& a) {
  const int64_t rows = a.k * a.cols;
  for (int64_t i = 0; i < a.B; ++i) {
    T* s = a.dots + i * rows;
    const int64_t target = target_in_chunk(a.labels[i], a.first_col, a.cols);
    RowForward<T> r;
    if (a.k == 1) {
      r = forward_row<T, kBytes, true>(s, a.inv, a.cols, target, a.target_logit[i], a.row_scale[i],
                                       a.threshold[i], a.params);
    } else {
      reduce_subcenters(s, a.inv, a.cols, a.k);
      r = forward_row<T, kBytes, false>(s, nullptr, a.cols, target, a.target_logit[i],
                                        a.row_scale[i], a.threshold[i], a.params);
    }
    a.max_z[i] = r.max_z;
    a.sum_exp[i] = r.sum_exp;
    a.best_cos[i] = r.best_cos;
    a.best_col[i] = a.first_col + r.best_col;
  }
}

template <typename T, int kBytes>
MARGINOPS_ALWAYS_INLINE void backward_rows_impl(const ChunkRows<T>& a) {
  const int64_t rows = a.k * a.cols;
  for (int64_t i = 0; i < a.B; ++i) {
    T* s = a.dots + i * rows;
    const int64_t target = target_in_chunk(a.labels[i], a.first_col, a.cols);
    if (a.k == 1) {
      a.grad_scale[i] = backward_row<T, kBytes>(s, a.inv, a.colsum, a.cols, target, a.row_scale[i],
                                                a.threshold[i], a.grad_lse[i], a.lse[i], a.params);
    } else {
      a.grad_scale[i] = backward_row_subcenters(s, a.inv, a.colsum, a.cols, a.k, target,
                                                a.row_scale[i], a.threshold[i], a.grad_lse[i],
                                                a.lse[i], a.params);
    }
    if (target >= 0) a.grad_target[i] = a.grad_lse[i] * std::exp(a.target_logit[i] - a.lse[i]);
  }
}

// One copy of each kernel per vector width.
#define MARGINOPS_WIDTH_VARIANTS(T)                                                            \
  void forward_rows_128(const ChunkRows<T>& a) { forward_rows_impl<T, 16>(a); }                \
  void backward_rows_128(const ChunkRows<T>& a) { backward_rows_impl<T, 16>(a); }              \
  void row_norms_128(const T* w, int64_t n, int64_t D, T* ss, T* inv) {                        \
    row_norms_impl<T, 16>(w, n, D, ss, inv);                                                   \
  }                                                                                            \
  MARGINOPS_X86_VARIANTS(T)

#if MARGINOPS_X86_WIDTHS
#define MARGINOPS_X86_VARIANTS(T)                                                              \
  MARGINOPS_TARGET_256 void forward_rows_256(const ChunkRows<T>& a) {                          \
    forward_rows_impl<T, 32>(a);                                                               \
  }                                                                                            \
  MARGINOPS_TARGET_256 void backward_rows_256(const ChunkRows<T>& a) {                         \
    backward_rows_impl<T, 32>(a);                                                              \
  }                                                                                            \
  MARGINOPS_TARGET_256 void row_norms_256(const T* w, int64_t n, int64_t D, T* ss, T* inv) {   \
    row_norms_impl<T, 32>(w, n, D, ss, inv);                                                   \
  }                                                                                            \
  MARGINOPS_TARGET_512 void forward_rows_512(const ChunkRows<T>& a) {                          \
    forward_rows_impl<T, 64>(a);                                                               \
  }                                                                                            \
  MARGINOPS_TARGET_512 void backward_rows_512(const ChunkRows<T>& a) {                         \
    backward_rows_impl<T, 64>(a);                                                              \
  }                                                                                            \
  MARGINOPS_TARGET_512 void row_norms_512(const T* w, int64_t n, int64_t D, T* ss, T* inv) {   \
    row_norms_impl<T, 64>(w, n, D, ss, inv);                                                   \
  }
#else
#define MARGINOPS_X86_VARIANTS(T)
#endif

MARGINOPS_WIDTH_VARIANTS(float)
MARGINOPS_WIDTH_VARIANTS(double)

#if MARGINOPS_X86_WIDTHS
// Widest vectors the CPU (and OS) support; MARGINOPS_CPU_VECTOR (128-512) caps it (tests, comparisons).
// Read once, at the first call (width() keeps the answer).
int detect_width() {
  const int cap = static_cast<int>(read_switch(kCpuVector).value_or(512));
  __builtin_cpu_init();
  if (cap >= 512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")) {
    return 512;
  }
  if (cap >= 256 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 256;
  return 128;
}

int width() {
  static const int w = detect_width();
  return w;
}
#endif

}  // namespace

#if MARGINOPS_X86_WIDTHS
#define MARGINOPS_DISPATCH(name, ...)       \
  switch (width()) {                        \
    case 512:                               \
      return name##_512(__VA_ARGS__);       \
    case 256:                               \
      return name##_256(__VA_ARGS__);       \
    default:                                \
      return name##_128(__VA_ARGS__);       \
  }
#else
#define MARGINOPS_DISPATCH(name, ...) return name##_128(__VA_ARGS__);
#endif

void forward_rows(const ChunkRows<float>& a) { MARGINOPS_DISPATCH(forward_rows, a) }
void forward_rows(const ChunkRows<double>& a) { MARGINOPS_DISPATCH(forward_rows, a) }
void backward_rows(const ChunkRows<float>& a) { MARGINOPS_DISPATCH(backward_rows, a) }
void backward_rows(const ChunkRows<double>& a) { MARGINOPS_DISPATCH(backward_rows, a) }
void row_norms(const float* w, int64_t rows, int64_t D, float* sumsq, float* inv) {
  MARGINOPS_DISPATCH(row_norms, w, rows, D, sumsq, inv)
}
void row_norms(const double* w, int64_t rows, int64_t D, double* sumsq, double* inv) {
  MARGINOPS_DISPATCH(row_norms, w, rows, D, sumsq, inv)
}

}  // namespace cpu
}  // namespace marginops
