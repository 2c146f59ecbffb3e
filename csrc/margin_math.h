// Margin math shared by the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda), written once for both.
// Only the non-target epilogue lives here: target logits come from the Python pre-pass
// (docs/DESIGN.md §3), so a new target-only margin never touches a kernel.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MARGINOPS_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
// always inlined: the CPU kernels call these with vectors wider than the default target, inside
// functions compiled for AVX2 / AVX-512 (csrc/cpu/chunk_epilogue.cpp)
#define MARGINOPS_HD inline __attribute__((always_inline))
#else
#define MARGINOPS_HD inline
#endif

namespace marginops {

// Same eps as F.normalize: rows are divided by max(||w||, eps).
constexpr double kNormEps = 1e-12;

// ---------------------------------------------------------------------------------------------------
// Non-target modes: how a non-target logit's value phi(c) is formed from its cosine c.  This is the one
// C++ home of phi, dphi/dc and max |dphi/dc| (used by the CPU kernels csrc/cpu, the CUDA kernels and the
// CUDA op's argument checks csrc/cuda); the same math lives once in Python (marginops/non_target.py, for
// the reference and the Triton launchers) and once in Triton (triton_kernels/_common.py).  A new mode is
// a value below (before kNumNonTargetModes), its branch in nontarget_phi_dphi and its bound in
// nontarget_max_abs_dphi.

enum NonTargetMode : int {
  kPlain = 0,       // phi = c
  kCurricular = 1,  // phi = c * (t + c) where c > threshold_i (CurricularFace), else c
  kNumNonTargetModes = 2,
};

// Whether `mode` is a NonTargetMode (the ops' argument checks).
MARGINOPS_HD bool is_nontarget_mode(int64_t mode) { return mode >= 0 && mode < kNumNonTargetModes; }

// Parameters of the non-target epilogue that are the same for every row.
template <typename acc_t>
struct NonTargetParams {
  int mode;            // NonTargetMode
  acc_t param;         // the mode's scalar: CurricularFace's t (the op's non_target_param)
  acc_t filter;        // inter-class filtering: c > filter -> logit 0, no gradient (2 = off)
};

// phi(c) of a non-target column, and d phi / d c in *dphi.  Written once, branch-free, for a scalar
// (V = T: the CUDA kernels, the CPU kernels' scalar loops) and for a vector of lanes (V a GCC/Clang
// vector of T: the CPU kernels' SIMD loops), where a comparison gives a lane mask, ?: selects per lane
// and scalar operands are splatted.  row_threshold: the row's threshold; modulation_t: the mode's scalar
// (CurricularFace's t); filter: inter-class filtering (c > filter -> phi = 0, dphi = 0, whatever the
// mode).  NaN cosines fall through to the plain branch, so NaN propagates into the log-sum-exp instead of
// being filtered away.
template <typename T, typename V>
MARGINOPS_HD V nontarget_phi_dphi(V c, V row_threshold, int mode, V modulation_t, V filter, V* dphi) {
  const V zero{};
  const V one = zero + T(1);
  // 0 / 1 for scalars, a lane mask (0 / -1) for vectors
  const auto curricular = (c > row_threshold) & (mode == kCurricular ? -1 : 0);
  const V phi = curricular ? c * (modulation_t + c) : c;
  const V d = curricular ? modulation_t + T(2) * c : one;
  const auto filtered = c > filter;
  *dphi = filtered ? zero : d;
  return filtered ? zero : phi;
}

// v, or exactly 0 where the column is filtered (c > filter): a filtered logit is a constant, so no upstream value
// reaches its cosine, not even a NaN or an inf (dz * dphi would be NaN * 0); autograd's where gives 0 there too.
// Scalars or vectors of lanes, as nontarget_phi_dphi.
template <typename V>
MARGINOPS_HD V zero_if_filtered(V c, V filter, V v) {
  return c > filter ? V{} : v;
}

// The scalar form with the row-independent parameters in one struct.
template <typename acc_t>
MARGINOPS_HD acc_t nontarget_phi(acc_t c, acc_t row_threshold, const NonTargetParams<acc_t>& p,
                                 acc_t* dphi) {
  return nontarget_phi_dphi<acc_t>(c, row_threshold, p.mode, p.param, p.filter, dphi);
}

// max over c in [-1, 1] of |dphi / dc| (filtered columns have 0): the bound on |dcos| / |g * s| that the
// fp16 gradient operands of the CUDA backward are scaled by.  Understating it overflows them silently.
template <typename acc_t>
MARGINOPS_HD acc_t nontarget_max_abs_dphi(int mode, acc_t modulation_t) {
  return mode == kCurricular ? fabs(modulation_t) + acc_t(2) : acc_t(1);  // |t + 2c| <= |t| + 2
}

// 1 / max(||w||, eps) from the sum of squares of a row.
template <typename acc_t>
MARGINOPS_HD acc_t inv_row_norm(acc_t sumsq) {
  acc_t n = sqrt(sumsq);
  return acc_t(1) / (n > acc_t(kNormEps) ? n : acc_t(kNormEps));
}

// Whether the normalization Jacobian has its projection term (||w|| > eps);
// below eps the row is divided by the constant eps and the Jacobian is I / eps.
template <typename acc_t>
MARGINOPS_HD bool norm_has_projection(acc_t sumsq) {
  return sqrt(sumsq) > acc_t(kNormEps);
}

// ---------------------------------------------------------------------------------------------------
// Per-column pieces of the chunk epilogues (CPU: csrc/cpu/chunk_epilogue.cpp, CUDA: csrc/cuda/chunk_epilogue.cuh).

// The class cosine of a column with k sub-centre rows: max over q < k of dots[q] * inv[q] (raw dot products
// times 1 / ||w_q||), its row in *arg.  NaN wins, as in torch.max, so a NaN cosine reaches the loss; the first
// row wins ties, so the gradient goes to one sub-centre as in the reference.
template <typename T>
MARGINOPS_HD T subcenter_max(const T* dots, const T* inv, int64_t k, int64_t* arg) {
  T best = dots[0] * inv[0];
  int64_t row = 0;
  for (int64_t q = 1; q < k; ++q) {
    const T v = dots[q] * inv[q];
    if (v > best || (v != v && best == best)) {
      best = v;
      row = q;
    }
  }
  *arg = row;
  return best;
}

// The label's column inside the chunk [first_col, first_col + cols), or -1.  Any int64 label: compared before
// subtracting (no overflow), and only compared, never used to read.
MARGINOPS_HD int64_t target_in_chunk(int64_t label, int64_t first_col, int64_t cols) {
  return (label >= first_col && label - first_col < cols) ? label - first_col : -1;
}

}  // namespace marginops
