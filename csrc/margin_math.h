// Margin math shared by the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda).
// Only the non-target epilogue lives here: target logits come from the Python pre-pass
// (docs/DESIGN.md §3), so a new target-only margin never touches a kernel.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MARGINOPS_HD __host__ __device__ __forceinline__
#else
#define MARGINOPS_HD inline
#endif

namespace marginops {

// Same eps as F.normalize: rows are divided by max(||w||, eps).
constexpr double kNormEps = 1e-12;

// How non-target logits are formed from the cosine c.
enum NonTargetMode : int {
  kPlain = 0,       // z = s * c
  kCurricular = 1,  // z = s * c * (t + c) where c > threshold_i (CurricularFace), else s * c
};

// Parameters of the non-target epilogue that are the same for every row.
template <typename acc_t>
struct NonTargetParams {
  int mode;            // NonTargetMode
  acc_t curricular_t;  // CurricularFace's t
  acc_t filter;        // inter-class filtering: c > filter -> logit 0, no gradient (2 = off)
};

// phi(c) for a non-target column, and d phi / d c in *dphi.  A filtered column
// returns 0 with dphi = 0.  NaN cosines fall through to the plain branch, so NaN
// propagates into the log-sum-exp instead of being filtered away.
template <typename acc_t>
MARGINOPS_HD acc_t nontarget_phi(acc_t c, acc_t row_threshold, const NonTargetParams<acc_t>& p,
                                 acc_t* dphi) {
  if (c > p.filter) {
    *dphi = acc_t(0);
    return acc_t(0);
  }
  if (p.mode == kCurricular && c > row_threshold) {
    *dphi = p.curricular_t + acc_t(2) * c;
    return c * (p.curricular_t + c);
  }
  *dphi = acc_t(1);
  return c;
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

}  // namespace marginops
