// The class-chunked execution of marginops::fused_lse / fused_lse_backward on vendor matrix products
// (issue 13): one loop over class chunks (and, for large batches, row tiles) in C++, never in Python and
// never inside a traced op.  Per chunk the cosine block comes from an ATen matrix product with fp32 (fp64
// for fp64 inputs) output into a preallocated buffer, and one epilogue launch consumes it.  The loop is
// templated over the epilogue policy `Epi` (where and how the per-chunk kernels run: the CUDA kernels of
// csrc/cuda/chunk_epilogue.cuh, on a GPU or under the CPU emulator of tests/cuda_emu); everything here is
// device-agnostic ATen.
//
// Epi provides (T: the accumulation type, float or double; all launches on the current stream):
//   row_norms(W (rows, D) io tensor, sumsq, inv, What)  sumsq / inv = 1 / max(||w||, eps) of the rows;
//                                     What (optional, fp16): the rows times 2^e (1 / max(||w||, eps) = f 2^e)
//   forward(EpiArgs<T>)               the chunk's logits and their online max / sum / argmax, merged into
//                                     the O(B) running state
//   backward(EpiArgs<T>)              the chunk's logit-gradient block G, grad_row_scale (running sum) and
//                                     grad_target_logit
//   weight_rows(WeightRowArgs<T>)     grad_weight rows of the chunk from the raw product U = G^T x: the
//                                     normalization's projection, the cast and the class_index scatter
//
// Matrix products per forward + backward: 4 x 2*B*C*D FLOPs (cosines in the forward, cosines again, dX and
// dW in the backward; 6 x for fp16 inputs, see below), counted by gemm_flop_counter() (tests/test_chunked.py).
//
// Precision of the backward's gradient block G (decided by measurement against the docs/DESIGN.md §4 rule of
// tests/op_cases.py; tests/test_chunked.py runs the same cases through this path):
//   * float32 / float64 inputs: G in the input dtype, G_ir = dcos_ir / n_r, raw W rows as the dX operand
//     (exactly the CPU backend's arithmetic).
//   * bf16 / fp16 inputs: G in fp16 with a per-row power-of-two scale sigma_i = 2^floor(log2(2^13 /
//     (|g_i s_i| max|dphi|))) (|dcos| <= |g s| max|dphi|, so G never overflows; a row with a tiny upstream
//     gradient keeps its own precision in dX), G_ir = sigma_i f_r dcos_ir where 1 / n_r = f_r 2^e_r, f_r in
//     [1, 2); the dX operand is w_r 2^e_r in fp16 (exact: a 16-bit value times a power of two, norm in
//     (1/2, 1] whatever ||w_r||), the dW operand x_i sigma_min / sigma_i in fp16.  For fp16 inputs G is
//     also kept as hi + lo (lo = the fp16 rounding error of hi, a second block and two more products):
//     one fp16 rounding of G is within the rule for bf16 inputs but not for fp16 ones, whose reference
//     error (2^-12 of an output) is 4 x smaller.
//     Measured, error / (same-dtype reference error), max over PRECISION_CONFIGS + a B=64, D=128, C=3000
//     case (float emulation of the products): bf16 inputs with G rounded to bf16: grad_x 2.03, grad_weight
//     2.68 (fails the 2x rule); bf16 inputs with one fp16 block: grad_x 1.06, grad_weight 1.07; fp16
//     inputs with one fp16 block: grad_x 1.43, grad_weight 1.66 in that emulation and 2.2 (a failure) on
//     this path's k=3 class_index case (tests/test_chunked.py); G in fp32: 1.00 / 1.00.  Hence: fp32 /
//     fp64 / bf16 inputs 4 GEMM-equivalents per forward + backward, fp16 inputs 6 (hi + lo for dX and dW);
//     MARGINOPS_CUDA_FAST_BWD=1 (Problem::fast_backward, as for the fused kernels) drops lo: 4, less accurate.
//
// Workspace (bytes; bt = min(B, 8192) rows per tile, Rc = class rows per chunk = clamp(64 MiB / (4 bt),
// 8192, 32768), D = 512, 16-bit inputs, k = 1), independent of C:
//   forward:  S bt*Rc*4 (+ gathered rows Rc*D*2 with class_index) + O(Rc + B)
//   backward: S bt*Rc*4 + G bt*Rc*2 (x 2 for fp16 inputs) + rescaled fp16 rows Rc*D*2 + U Rc*D*4 (+ gathered rows Rc*D*2)
//             + dX accumulator B*D*4 + x' B*D*2
//   B = 1024:  Rc = 16384: forward 64 MiB, backward 64 + 32 + 16 + 32 + 2 + 1 = 147 MiB (+16 class_index)
//   B = 8192:  Rc = 8192:  forward 256 MiB, backward 256 + 128 + 8 + 16 + 16 + 8 = 432 MiB (+8)
//   B = 65536: bt = 8192, Rc = 8192: forward 256 MiB, backward 256 + 128 + 8 + 16 + 128 + 64 = 600 MiB (+8)
// Mixed precision (a float32 weight with bf16 / fp16 x): the products run in x's dtype on the chunk's weight rows
// cast into a buffer of Rc*D*2 bytes (16 MiB at Rc = 16384, D = 512) as each chunk is used, never a 16-bit copy of
// all of W; row norms, the dX operand (w_r 2^e_r in fp16, rounded once from float32) and grad_weight come from
// the float32 rows, grad_weight in float32.  The epilogue's element type is the weight's.
// MARGINOPS_CHUNK_COLS / MARGINOPS_CHUNK_ROWS (read by each forward and each backward: planning only) override
// the classes per chunk and the rows per tile (tests: many chunks and row tiles at small shapes).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "switches.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "margin_math.h"

namespace marginops {
namespace chunked {

// Matrix-product FLOPs issued by gemm() in this library (a debug counter for the FLOP-count tests).
inline std::atomic<int64_t>& gemm_flop_counter() {
  static std::atomic<int64_t> counter{0};
  return counter;
}

// The dtype overloads of the matrix products (fp32 output from 16-bit operands) are looked up at run time
// (below): torch builds without them, or without a kernel for the tensors' device (CPU), take the fallback.
inline bool has_kernel(const c10::OperatorHandle* op, const at::Tensor& t) {
  // (device().type(), not is_cuda(): the emulator build redefines is_cuda)
  const bool cuda = t.device().type() == c10::DeviceType::CUDA;
  return op != nullptr && op->hasKernelForDispatchKey(cuda ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU);
}

// out = a @ b (accumulate = false) or out += a @ b, for out in the accumulation dtype (fp32 / fp64) and
// a, b in one dtype (the input dtype, or fp16 for the 16-bit backward).  16-bit operands go through
// aten::mm.dtype_out / aten::addmm.dtype_out where the device has them (cuBLAS, fp32 accumulation);
// otherwise the operands are widened to fp32 first (same math: products of 16-bit numbers are exact in
// fp32), which costs a temporary the size of the operands (bounded by the chunk).
inline void gemm(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  gemm_flop_counter().fetch_add(2 * a.size(0) * a.size(1) * b.size(1), std::memory_order_relaxed);
  if (a.scalar_type() == out.scalar_type()) {
    if (accumulate) {
      out.addmm_(a, b);
    } else {
      at::mm_out(out, a, b);
    }
    return;
  }
  static const c10::OperatorHandle* mm_dtype = [] {
    auto op = c10::Dispatcher::singleton().findOp({"aten::mm", "dtype_out"});
    return op.has_value() ? new c10::OperatorHandle(*op) : nullptr;
  }();
  static const c10::OperatorHandle* addmm_dtype = [] {
    auto op = c10::Dispatcher::singleton().findOp({"aten::addmm", "dtype_out"});
    return op.has_value() ? new c10::OperatorHandle(*op) : nullptr;
  }();
  if (!accumulate && has_kernel(mm_dtype, out)) {
    mm_dtype->typed<at::Tensor&(const at::Tensor&, const at::Tensor&, at::ScalarType, at::Tensor&)>().call(
        a, b, out.scalar_type(), out);
    return;
  }
  // addmm.dtype_out with an fp32 addend: torch releases whose check wants the addend in the operands' dtype
  // reject it (before any work); then every later accumulation goes through mm.dtype_out and an add.
  static std::atomic<bool> addmm_dtype_ok{true};
  if (accumulate && addmm_dtype_ok.load() && has_kernel(addmm_dtype, out)) {
    try {
      addmm_dtype
          ->typed<at::Tensor&(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::ScalarType,
                              const at::Scalar&, const at::Scalar&, at::Tensor&)>()
          .call(out, a, b, out.scalar_type(), 1, 1, out);
      return;
    } catch (const c10::Error&) {
      addmm_dtype_ok.store(false);
    }
  }
  if (accumulate && has_kernel(mm_dtype, out)) {
    at::Tensor tmp = at::empty_like(out);
    mm_dtype->typed<at::Tensor&(const at::Tensor&, const at::Tensor&, at::ScalarType, at::Tensor&)>().call(
        a, b, out.scalar_type(), tmp);
    out.add_(tmp);
    return;
  }
  const at::Tensor wa = a.to(out.scalar_type()), wb = b.to(out.scalar_type());
  if (accumulate) {
    out.addmm_(wa, wb);
  } else {
    at::mm_out(out, wa, wb);
  }
}

// Arguments of the forward / backward epilogue for one (row tile, class chunk) block.
template <typename T>
struct EpiArgs {
  const T* S = nullptr;     // (bt, ld) x_i . w_r of the chunk's rows (raw, before 1 / n_r)
  int64_t ld = 0;           // k * cols
  const T* inv = nullptr;   // (ld) 1 / max(||w_r||, eps)
  int64_t bt = 0;           // rows of the tile
  int64_t row0 = 0;         // first batch row of the tile
  int64_t cols = 0, k = 1;  // classes of the chunk, subcenters
  int64_t first_col = 0;    // global column of the chunk's first class
  const int64_t* labels = nullptr;
  const T* target_logit = nullptr;
  const T* row_scale = nullptr;
  const T* threshold = nullptr;
  NonTargetParams<T> params{};
  // forward: running state (B), merged in chunk order
  T* run_max = nullptr;
  T* run_sum = nullptr;
  T* run_cos = nullptr;
  int64_t* run_col = nullptr;
  // backward
  const T* grad_lse = nullptr;
  const T* lse = nullptr;
  const T* row_gscale = nullptr;  // (B) sigma_i of the fp16 gradient block, or nullptr: G = dcos / n
  void* G = nullptr;              // (bt, ld) gradient block: T (may alias S) or fp16
  void* G_lo = nullptr;           // (bt, ld) fp16: G's rounding error (fp16 inputs), or nullptr
  T* grad_target = nullptr;       // (B)
  T* grad_scale = nullptr;        // (B) running sum over chunks
};

// Arguments of the weight-row kernel for one chunk.
template <typename T>
struct WeightRowArgs {
  const T* U = nullptr;       // (rows, D) raw product G^T x (fp32 / fp64)
  const void* W = nullptr;    // (rows, D) the chunk's weight rows (input dtype)
  const T* sumsq = nullptr;   // (rows)
  const T* inv = nullptr;     // (rows)
  const T* gscale_min = nullptr;  // 0-dim sigma_min (fp16 scheme: dW = inv / sigma_min * ...), or nullptr
  void* grad_weight = nullptr;    // (R, D) output (input dtype)
  const int64_t* class_index = nullptr;  // chunk's slice of class_index, or nullptr (rows are contiguous)
  int64_t first_row = 0;      // without class_index: global weight row of the chunk's first row
  int64_t rows = 0, k = 1, D = 0;
};

struct Problem {
  at::Tensor x, weight, labels, target_logit, row_scale, threshold;
  std::optional<at::Tensor> class_index;
  double non_target_param = 0;  // the non-target mode's scalar
  int64_t non_target = 0;
  double filter = 2.0;
  int64_t B = 0, D = 0, R = 0, N = 0, k = 1;
  bool fast_backward = false;  // MARGINOPS_CUDA_FAST_BWD as the op call decided it (csrc/switches.h)
};

struct Plan {
  int64_t rows_per_tile, cols_per_chunk;
};

inline Plan make_plan(const Problem& P) {
  constexpr int64_t kMaxTileRows = 8192;
  constexpr int64_t kBlockBytes = int64_t(64) << 20;
  Plan plan;
  plan.rows_per_tile = std::min(P.B, kMaxTileRows);
  int64_t rows = kBlockBytes / std::max<int64_t>(1, plan.rows_per_tile * 4);
  rows = std::min<int64_t>(std::max<int64_t>(rows, 8192), 32768);
  plan.cols_per_chunk = std::max<int64_t>(1, rows / P.k);
  if (const std::optional<int64_t> r = read_switch(kChunkRows)) plan.rows_per_tile = *r;
  if (const std::optional<int64_t> c = read_switch(kChunkCols)) plan.cols_per_chunk = *c;
  plan.rows_per_tile = std::max<int64_t>(1, std::min(plan.rows_per_tile, P.B));
  plan.cols_per_chunk = std::max<int64_t>(1, std::min(plan.cols_per_chunk, P.N));
  return plan;
}

inline at::ScalarType acc_type(const Problem& P) {
  return P.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_16bit(const Problem& P) {
  return P.x.scalar_type() == at::kHalf || P.x.scalar_type() == at::kBFloat16;
}

// Mixed precision: the weight (float32) is wider than x (16-bit); products need its rows in x's dtype.
inline bool casts_weight(const Problem& P) { return P.weight.scalar_type() != P.x.scalar_type(); }

// The chunk's rows as the products see them: W itself, or W rounded into `cast` (x's dtype).
inline at::Tensor product_rows(const at::Tensor& W, at::Tensor& cast) {
  if (!cast.defined()) return W;
  return cast.narrow(0, 0, W.size(0)).copy_(W);
}

// The chunk's weight rows (k per class, in class order): a view of weight, or gathered into `gathered`
// through class_index (the bounded gather of Partial FC).
inline at::Tensor chunk_rows(const Problem& P, int64_t c0, int64_t cols, at::Tensor& gathered) {
  if (!P.class_index.has_value()) return P.weight.narrow(0, c0 * P.k, cols * P.k);
  const at::Tensor blocks = P.weight.view({P.R / P.k, P.k * P.D});
  at::Tensor out = gathered.narrow(0, 0, cols * P.k).view({cols, P.k * P.D});
  at::index_select_out(out, blocks, 0, P.class_index->narrow(0, c0, cols));
  return gathered.narrow(0, 0, cols * P.k);
}

template <typename T>
EpiArgs<T> base_args(const Problem& P) {
  EpiArgs<T> a;
  a.labels = P.labels.data_ptr<int64_t>();
  a.target_logit = P.target_logit.data_ptr<T>();
  a.row_scale = P.row_scale.data_ptr<T>();
  a.threshold = P.threshold.data_ptr<T>();
  a.k = P.k;
  a.params.mode = static_cast<int>(P.non_target);
  a.params.param = static_cast<T>(P.non_target_param);
  a.params.filter = static_cast<T>(P.filter);
  return a;
}

template <typename T, class Epi>
std::tuple<at::Tensor, at::Tensor> forward(const Problem& P, Epi& epi) {
  const auto acc = acc_type(P);
  const auto opts = P.x.options().dtype(acc);
  const Plan plan = make_plan(P);
  const int64_t B = P.B, bt = plan.rows_per_tile, cmax = plan.cols_per_chunk, rmax = cmax * P.k;
  at::Tensor run_max = at::full({B}, -INFINITY, opts);
  at::Tensor run_sum = at::zeros({B}, opts);
  at::Tensor run_cos = at::full({B}, -INFINITY, opts);
  at::Tensor run_col = at::zeros({B}, P.x.options().dtype(at::kLong));
  at::Tensor S = at::empty({bt * rmax}, opts);
  at::Tensor sumsq = at::empty({rmax}, opts), inv = at::empty({rmax}, opts);
  at::Tensor gathered = P.class_index.has_value() ? at::empty({rmax, P.D}, P.weight.options()) : at::Tensor();
  at::Tensor cast = casts_weight(P) ? at::empty({rmax, P.D}, P.x.options()) : at::Tensor();
  EpiArgs<T> a = base_args<T>(P);
  a.inv = inv.data_ptr<T>();
  a.run_max = run_max.data_ptr<T>();
  a.run_sum = run_sum.data_ptr<T>();
  a.run_cos = run_cos.data_ptr<T>();
  a.run_col = run_col.data_ptr<int64_t>();
  for (int64_t c0 = 0; c0 < P.N; c0 += cmax) {
    const int64_t cols = std::min(cmax, P.N - c0), rows = cols * P.k;
    const at::Tensor W = chunk_rows(P, c0, cols, gathered);
    epi.row_norms(W, sumsq, inv, at::Tensor());
    const at::Tensor Wp = product_rows(W, cast);
    for (int64_t r0 = 0; r0 < B; r0 += bt) {
      const int64_t n = std::min(bt, B - r0);
      at::Tensor block = S.narrow(0, 0, n * rows).view({n, rows});
      gemm(block, P.x.narrow(0, r0, n), Wp.t(), false);
      a.S = block.data_ptr<T>();
      a.ld = rows;
      a.bt = n;
      a.row0 = r0;
      a.cols = cols;
      a.first_col = c0;
      epi.forward(a);
    }
  }
  // run_max = -inf (every logit -inf) leaves run_sum = 0: lse = -inf, as log(0)
  at::Tensor lse = at::add(run_max, at::log(run_sum));
  return {lse, run_col};
}

// Backward; need_x / need_weight: which of grad_x / grad_weight the caller wants (an unwanted one comes back
// as an empty tensor and costs no matrix product and no allocation: 3 GEMM-equivalents instead of 4 for a
// frozen weight or frozen embeddings, 2 if both are frozen).
template <typename T, class Epi>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(const Problem& P, const at::Tensor& grad_lse,
                                                                    const at::Tensor& lse, bool need_x,
                                                                    bool need_weight, Epi& epi) {
  const auto acc = acc_type(P);
  const auto opts = P.x.options().dtype(acc);
  const bool half = is_16bit(P);
  const Plan plan = make_plan(P);
  const int64_t B = P.B, D = P.D, bt = plan.rows_per_tile, cmax = plan.cols_per_chunk, rmax = cmax * P.k;

  at::Tensor grad_target = at::zeros({B}, opts);
  at::Tensor grad_scale = at::zeros({B}, opts);
  at::Tensor grad_x = at::empty({0}, P.x.options());
  at::Tensor grad_weight = !need_weight                  ? at::empty({0}, P.weight.options())
                           : P.class_index.has_value() ? at::zeros_like(P.weight)
                                                       : at::empty_like(P.weight);

  at::Tensor S = at::empty({bt * rmax}, opts);
  const bool split = P.x.scalar_type() == at::kHalf && !P.fast_backward;
  at::Tensor G = half ? at::empty({(split ? 2 : 1) * bt * rmax}, P.x.options().dtype(at::kHalf)) : S;  // 32/64: in place
  at::Tensor sumsq = at::empty({rmax}, opts), inv = at::empty({rmax}, opts);
  at::Tensor gathered = P.class_index.has_value() ? at::empty({rmax, D}, P.weight.options()) : at::Tensor();
  at::Tensor cast = casts_weight(P) ? at::empty({rmax, D}, P.x.options()) : at::Tensor();
  at::Tensor W_hat = half && need_x ? at::empty({rmax, D}, P.x.options().dtype(at::kHalf)) : at::Tensor();
  at::Tensor U = need_weight ? at::empty({rmax, D}, opts) : at::Tensor();

  // fp16 scheme (see the top of this file): per-row power-of-two scale of the gradient block
  at::Tensor gscale, gscale_min, x_prod, dx_acc;
  if (half) {
    const double dmax = nontarget_max_abs_dphi<double>(static_cast<int>(P.non_target), P.non_target_param);
    const at::Tensor bound = at::mul(at::abs(at::mul(grad_lse, P.row_scale)), dmax);
    // 2^13: G = sigma f dcos with f < 2 (the mantissa of 1 / n_r, see chunk_epilogue.cuh) stays below 2^14
    gscale = at::clamp(at::exp2(at::floor(at::log2(at::div(at::scalar_tensor(8192.0, opts), bound)))),
                       std::ldexp(1.0, -64), std::ldexp(1.0, 64));
    if (need_weight) {
      gscale_min = at::amin(gscale);
      x_prod = at::mul(P.x.to(acc), at::div(gscale_min, gscale).unsqueeze(1)).to(at::kHalf);
    }
    if (need_x) dx_acc = at::zeros({B, D}, opts);
  } else {
    x_prod = P.x;
    if (need_x) dx_acc = grad_x = at::zeros({B, D}, opts);
  }

  EpiArgs<T> a = base_args<T>(P);
  a.inv = inv.data_ptr<T>();
  a.grad_lse = grad_lse.data_ptr<T>();
  a.lse = lse.data_ptr<T>();
  a.row_gscale = half ? gscale.data_ptr<T>() : nullptr;
  a.grad_target = grad_target.data_ptr<T>();
  a.grad_scale = grad_scale.data_ptr<T>();

  WeightRowArgs<T> w;
  w.sumsq = sumsq.data_ptr<T>();
  w.inv = inv.data_ptr<T>();
  w.gscale_min = half && need_weight ? gscale_min.data_ptr<T>() : nullptr;
  w.grad_weight = need_weight ? grad_weight.data_ptr() : nullptr;
  w.k = P.k;
  w.D = D;

  for (int64_t c0 = 0; c0 < P.N; c0 += cmax) {
    const int64_t cols = std::min(cmax, P.N - c0), rows = cols * P.k;
    const at::Tensor W = chunk_rows(P, c0, cols, gathered);
    const at::Tensor Wh = W_hat.defined() ? W_hat.narrow(0, 0, rows) : at::Tensor();
    epi.row_norms(W, sumsq, inv, Wh);
    const at::Tensor Wp = product_rows(W, cast);
    at::Tensor Uc = need_weight ? U.narrow(0, 0, rows) : at::Tensor();
    for (int64_t r0 = 0; r0 < B; r0 += bt) {
      const int64_t n = std::min(bt, B - r0);
      at::Tensor block = S.narrow(0, 0, n * rows).view({n, rows});
      at::Tensor gblock = G.narrow(0, 0, n * rows).view({n, rows});
      at::Tensor glo = split ? G.narrow(0, bt * rmax, n * rows).view({n, rows}) : at::Tensor();
      gemm(block, P.x.narrow(0, r0, n), Wp.t(), false);
      a.S = block.data_ptr<T>();
      a.G = gblock.data_ptr();
      a.G_lo = split ? glo.data_ptr() : nullptr;
      a.ld = rows;
      a.bt = n;
      a.row0 = r0;
      a.cols = cols;
      a.first_col = c0;
      epi.backward(a);
      if (need_x) gemm(dx_acc.narrow(0, r0, n), gblock, half ? Wh : W, true);
      if (need_x && split) gemm(dx_acc.narrow(0, r0, n), glo, Wh, true);
      if (need_weight) gemm(Uc, gblock.t(), x_prod.narrow(0, r0, n), r0 > 0);
      if (need_weight && split) gemm(Uc, glo.t(), x_prod.narrow(0, r0, n), true);
    }
    if (need_weight) {
      w.U = Uc.data_ptr<T>();
      w.W = W.data_ptr();
      w.class_index = P.class_index.has_value() ? P.class_index->data_ptr<int64_t>() + c0 : nullptr;
      w.first_row = c0 * P.k;
      w.rows = rows;
      epi.weight_rows(w);
    }
  }
  if (need_x && half) grad_x = at::div(dx_acc, gscale.unsqueeze(1)).to(P.x.scalar_type());
  return {grad_x, grad_weight, grad_target, grad_scale};
}

}  // namespace chunked
}  // namespace marginops
