// The class-chunked execution of marginops::fused_lse / fused_lse_backward (issue 13), shared by the CPU backend
// (csrc/cpu/fused_lse_cpu.cpp) and the class-chunked CUDA path (csrc/cuda/fused_lse_chunked.cu): one loop over
// class chunks (and row tiles) in C++, never in Python and never inside a traced op.  Per chunk the cosine block
// comes from an ATen matrix product with fp32 (fp64 for fp64 inputs) output into a preallocated buffer, and the
// epilogue consumes it.  The loop is templated over the device's policy `Epi` (its contract is above forward()
// below): how a chunk's rows are loaded, the epilogue kernels, and the plan: the CPU runs chunks on all its
// threads, each with its own buffers and per-chunk partials merged in chunk order, with all B rows in one tile of
// an L2-sized chunk and 16-bit operands widened to fp32; the GPU runs chunks in order on large blocks with 16-bit
// products (the kernels of csrc/cuda/chunk_epilogue.cuh, on a GPU or under the CPU emulator of tests/cuda_emu).
// Everything here is device-agnostic ATen.
//
// Matrix products per forward + backward: 4 x 2*B*C*D FLOPs (cosines in the forward, cosines again, dX and
// dW in the backward; 6 x for fp16 products, see below), counted by gemm_flop_counter() (tests/test_chunked.py).
//
// Precision of the backward's gradient block G (decided by measurement against the docs/DESIGN.md §4 rule of
// tests/op_cases.py; tests/test_chunked.py runs the same cases through this path):
//   * float32 / float64 products (all CPU inputs, float32 / float64 GPU inputs): G in the products' dtype,
//     G_ir = dcos_ir / n_r, raw W rows as the dX operand.
//   * bf16 / fp16 products (GPU): G in fp16 with a per-row power-of-two scale sigma_i = 2^floor(log2(2^13 /
//     (|g_i s_i| max|dphi|))) (|dcos| <= |g s| max|dphi|, so G never overflows; a row with a tiny upstream
//     gradient keeps its own precision in dX), G_ir = sigma_i f_r dcos_ir where 1 / n_r = f_r 2^e_r, f_r in
//     [1, 2); the dX operand is w_r 2^e_r in fp16 (exact: a 16-bit value times a power of two, norm in
//     (1/2, 1] whatever ||w_r||), the dW operand x_i sigma_min / sigma_i in fp16.  For fp16 inputs G is
//     also kept as hi + lo (lo = the fp16 rounding error of hi, a second block and two more products):
//     one fp16 rounding of G is within the rule for bf16 inputs but not for fp16 ones, whose reference
//     error (2^-12 of an output) is 4 x smaller.
//     Measured, error / (same-dtype reference error), max over the precision cases of tests/op_backends.py
//     (cuda_chunked_emu) + a B=64, D=128, C=3000 case (float emulation of the products): bf16 inputs with G
//     rounded to bf16: grad_x 2.03, grad_weight 2.68 (fails the 2x rule); bf16 inputs with one fp16 block:
//     grad_x 1.06, grad_weight 1.07; fp16 inputs with one fp16 block: grad_x 1.43, grad_weight 1.66 in that
//     emulation and 2.2 (a failure) on this path's k=3 class_index case (tests/test_chunked.py); G in fp32:
//     1.00 / 1.00.  Hence: fp32 / fp64 / bf16 inputs 4 GEMM-equivalents per forward + backward, fp16 inputs 6
//     (hi + lo for dX and dW); MARGINOPS_CUDA_FAST_BWD=1 (Problem::fast_backward, as for the fused kernels)
//     drops lo: 4, less accurate.
//
// GPU workspace (bytes; bt = min(B, 8192) rows per tile, Rc = class rows per chunk = clamp(64 MiB / (4 bt),
// 8192, 32768), D = 512, 16-bit inputs, k = 1: block_plan), independent of C:
//   forward:  S bt*Rc*4 (+ gathered rows Rc*D*2 with class_index) + O(Rc + B) (+ the CUDA policy's norms of up
//             to 64 chunks ahead, 64*Rc*8)
//   backward: S bt*Rc*4 + G bt*Rc*2 (x 2 for fp16 inputs) + rescaled fp16 rows Rc*D*2 + U Rc*D*4 (+ gathered rows Rc*D*2)
//             + dX accumulator B*D*4 + x' B*D*2
//   B = 1024:  Rc = 16384: forward 64 MiB, backward 64 + 32 + 16 + 32 + 2 + 1 = 147 MiB (+16 class_index)
//   B = 8192:  Rc = 8192:  forward 256 MiB, backward 256 + 128 + 8 + 16 + 16 + 8 = 432 MiB (+8)
//   B = 65536: bt = 8192, Rc = 8192: forward 256 MiB, backward 256 + 128 + 8 + 16 + 128 + 64 = 600 MiB (+8)
// Mixed precision (a float32 weight with bf16 / fp16 x): the products run in x's dtype on the chunk's weight rows
// cast into a buffer of Rc*D*2 bytes (16 MiB at Rc = 16384, D = 512) as each chunk is used, never a 16-bit copy of
// all of W; row norms, the dX operand (w_r 2^e_r in fp16, rounded once from float32) and grad_weight come from
// the float32 rows, grad_weight in float32.  The epilogue's element type is the weight's.  The CPU's workspace is
// in csrc/cpu/fused_lse_cpu.cpp.
// MARGINOPS_CHUNK_COLS / MARGINOPS_CHUNK_ROWS (read by each forward and each backward: planning only) override
// the classes per chunk and the rows per tile of either policy (tests: many chunks and row tiles at small shapes).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "margin_math.h"
#include "switches.h"

namespace marginops {
namespace chunked {

// Matrix-product FLOPs issued by Products in this library (a debug counter for the FLOP-count tests).
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

inline const c10::OperatorHandle* find_op(const char* name, const char* overload) {
  auto op = c10::Dispatcher::singleton().findOp({name, overload});
  return op.has_value() ? new c10::OperatorHandle(*op) : nullptr;
}

// The matrix products of one op call: out = a @ b (accumulate = false) or out += a @ b, for out in the
// accumulation dtype (fp32 / fp64) and a, b in one dtype (the products' dtype, or fp16 for the 16-bit backward).
// 16-bit operands go through aten::mm.dtype_out / aten::addmm.dtype_out where the device has them (cuBLAS, fp32
// accumulation); otherwise the operands are widened to fp32 first (same math: products of 16-bit numbers are exact
// in fp32), which costs a temporary the size of the operands (bounded by the chunk).
//
// addmm.dtype_out with an fp32 addend: torch releases whose check wants the addend in the operands' dtype reject it
// (before any work); then the call's later accumulations go through mm.dtype_out and an add.  That is learnt per op
// call (one object per call), so no failure, of that check or a transient one, outlives the call.
class Products {
 public:
  void operator()(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
    gemm_flop_counter().fetch_add(2 * a.size(0) * a.size(1) * b.size(1), std::memory_order_relaxed);
    if (a.scalar_type() == out.scalar_type()) {
      if (accumulate) {
        out.addmm_(a, b);
      } else {
        at::mm_out(out, a, b);
      }
      return;
    }
    static const c10::OperatorHandle* mm_dtype = find_op("aten::mm", "dtype_out");
    static const c10::OperatorHandle* addmm_dtype = find_op("aten::addmm", "dtype_out");
    if (!accumulate && has_kernel(mm_dtype, out)) {
      mm_dtype->typed<at::Tensor&(const at::Tensor&, const at::Tensor&, at::ScalarType, at::Tensor&)>().call(
          a, b, out.scalar_type(), out);
      return;
    }
    if (accumulate && addmm_dtype_ok_.load() && has_kernel(addmm_dtype, out)) {
      try {
        addmm_dtype
            ->typed<at::Tensor&(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::ScalarType,
                                const at::Scalar&, const at::Scalar&, at::Tensor&)>()
            .call(out, a, b, out.scalar_type(), 1, 1, out);
        return;
      } catch (const c10::Error&) {
        addmm_dtype_ok_.store(false);
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

  // Whether this call still uses addmm.dtype_out for its accumulations (tests).
  bool uses_addmm_dtype() const { return addmm_dtype_ok_.load(); }

 private:
  std::atomic<bool> addmm_dtype_ok_{true};
};

// Arguments of the forward / backward epilogue for one (row tile, class chunk) block.
template <typename T>
struct EpiArgs {
  T* S = nullptr;           // (bt, ld) x_i . w_r of the chunk's rows (raw, before 1 / n_r); the CPU epilogue
                            // overwrites it (logits, or G in place)
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
  // forward: per-row state (B), indexed by batch row: the running state merged in chunk order, or (Plan::
  // chunk_partials) this chunk's own slot, which starts as the merge's identity
  T* run_max = nullptr;
  T* run_sum = nullptr;
  T* run_cos = nullptr;
  int64_t* run_col = nullptr;
  // backward
  const T* grad_lse = nullptr;
  const T* lse = nullptr;
  const T* row_gscale = nullptr;  // (B) sigma_i of the fp16 gradient block, or nullptr: G = dcos / n
  void* G = nullptr;              // (bt, ld) gradient block: T (then it aliases S) or fp16
  void* G_lo = nullptr;           // (bt, ld) fp16: G's rounding error (fp16 inputs), or nullptr
  T* grad_target = nullptr;       // (B)
  T* grad_scale = nullptr;        // (B) running sum over chunks, or this chunk's slot (starts at 0)
};

// Arguments of the weight-row step for one chunk.
template <typename T>
struct WeightRowArgs {
  T* U = nullptr;             // (rows, D) raw product G^T x (fp32 / fp64); the CPU step finishes it in place
  const void* W = nullptr;    // (rows, D) the chunk's weight rows as the policy loaded them (ChunkRows::stored)
  const T* sumsq = nullptr;   // (rows)
  const T* inv = nullptr;     // (rows)
  const T* gscale_min = nullptr;  // 0-dim sigma_min (fp16 scheme: dW = inv / sigma_min * ...), or nullptr
  void* grad_weight = nullptr;    // (R, D) output (weight dtype)
  const int64_t* class_index = nullptr;  // chunk's slice of class_index, or nullptr (rows are contiguous)
  int64_t first_row = 0;      // without class_index: global weight row of the chunk's first row
  int64_t rows = 0, k = 1, D = 0;
};

// One op call's checked inputs (the op layers of csrc/cpu and csrc/cuda check them and fill this in).
struct Problem {
  at::Tensor x, weight, labels, target_logit, row_scale, threshold;  // contiguous
  std::optional<at::Tensor> class_index;
  double non_target_param = 0;  // the non-target mode's scalar
  int64_t non_target = 0;
  double filter = 2.0;
  int64_t B = 0, D = 0, R = 0, N = 0, k = 1;
  bool fast_backward = false;  // MARGINOPS_CUDA_FAST_BWD as the op call decided it (csrc/switches.h)
};

// How one call runs its chunks.  A policy proposes it (Epi::plan); the switches then override the tiling.
struct Plan {
  int64_t rows_per_tile = 1, cols_per_chunk = 1;
  int64_t num_chunks = 1;
  // host threads that run chunks at once, each with its own workspace, taking the next chunk (forward) or group
  // (backward) when done; 1: the calling thread runs the chunks in order
  int64_t threads = 1;
  // each chunk writes its own forward partials and grad_row_scale part, merged in chunk order at the end (on the
  // host: the threaded schedule's tensors are CPU tensors), so the results do not depend on which thread ran
  // which chunk; false: the epilogue merges into running per-row state, chunk after chunk (threads must be 1)
  bool chunk_partials = false;
  // grad_x partial sums, each over a fixed run of consecutive chunks, added in order at the end
  int64_t dx_groups = 1;
};

// The plan of a device whose products are vendor GEMMs on large blocks (CUDA): 64 MiB fp32 cosine blocks, rows
// per tile and class rows per chunk as in the workspace table at the top of this file.
inline Plan block_plan(const Problem& P) {
  constexpr int64_t kMaxTileRows = 8192;
  constexpr int64_t kBlockBytes = int64_t(64) << 20;
  Plan plan;
  plan.rows_per_tile = std::min(P.B, kMaxTileRows);
  int64_t rows = kBlockBytes / std::max<int64_t>(1, plan.rows_per_tile * 4);
  rows = std::min<int64_t>(std::max<int64_t>(rows, 8192), 32768);
  plan.cols_per_chunk = std::max<int64_t>(1, rows / P.k);
  return plan;
}

// The policy's plan with MARGINOPS_CHUNK_ROWS / MARGINOPS_CHUNK_COLS applied (read at each call: planning only).
inline Plan make_plan(const Problem& P, Plan plan) {
  if (const std::optional<int64_t> r = read_switch(kChunkRows)) plan.rows_per_tile = *r;
  if (const std::optional<int64_t> c = read_switch(kChunkCols)) plan.cols_per_chunk = *c;
  plan.rows_per_tile = std::max<int64_t>(1, std::min(plan.rows_per_tile, P.B));
  plan.cols_per_chunk = std::max<int64_t>(1, std::min(plan.cols_per_chunk, P.N));
  plan.num_chunks = (P.N + plan.cols_per_chunk - 1) / plan.cols_per_chunk;
  TORCH_CHECK(plan.chunk_partials || plan.threads == 1,
              "marginops chunk loop: a threaded plan needs per-chunk partials (internal error)");
  TORCH_CHECK(!plan.chunk_partials || P.x.device().type() == c10::DeviceType::CPU,
              "marginops chunk loop: per-chunk partials are merged on the host (internal error)");
  plan.threads = std::max<int64_t>(1, plan.threads);
  plan.dx_groups = plan.chunk_partials ? std::max<int64_t>(1, std::min(plan.dx_groups, plan.num_chunks)) : 1;
  return plan;
}

inline at::ScalarType acc_type(const Problem& P) {
  return P.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_16bit(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// Class columns [first_col, first_col + cols) of the problem, k weight rows each.
struct Chunk {
  int64_t index, first_col, cols, rows;
};

inline Chunk chunk_at(const Problem& P, const Plan& plan, int64_t index) {
  const int64_t c0 = index * plan.cols_per_chunk;
  const int64_t cols = std::min(plan.cols_per_chunk, P.N - c0);
  return {index, c0, cols, cols * P.k};
}

// A chunk's weight rows as its matrix products read them (Epi::load).
struct ChunkRows {
  at::Tensor product;           // (rows, D) in the products' dtype: the B operand of x . w^T
  at::Tensor dx;                // (rows, D) the operand of dX += G . w (the products' dtype, fp16 with a 16-bit G)
  const void* stored = nullptr;  // what WeightRowArgs::W gets
  // (rows) T: sum of squares and 1 / max(||w||, eps) of the chunk's rows; the scratch's, or where the policy
  // computed them ahead for several chunks at once
  const void* sumsq = nullptr;
  const void* inv = nullptr;
};

// What a pass needs from the policy's workspace and loads.
struct Pass {
  bool backward = false, need_x = false, need_weight = false;
  bool fp16_grad = false;  // the backward's gradient block is fp16 (16-bit products): the dX operand is fp16 too
};

// The buffers of one thread of the loop (the policy's own are in its Workspace).
template <typename T>
struct Scratch {
  at::Tensor S;      // (bt * k * cols) cosine block, fp32 / fp64
  at::Tensor G;      // gradient block: fp16 (two with hi + lo), or S itself
  at::Tensor sumsq, inv;
};

template <typename T>
Scratch<T> make_scratch(const Problem& P, const Plan& plan, const Pass& pass, bool split) {
  const auto opts = P.x.options().dtype(acc_type(P));
  const int64_t rmax = plan.cols_per_chunk * P.k;
  Scratch<T> s;
  s.S = at::empty({plan.rows_per_tile * rmax}, opts);
  s.G = pass.backward && pass.fp16_grad
            ? at::empty({(split ? 2 : 1) * plan.rows_per_tile * rmax}, P.x.options().dtype(at::kHalf))
            : s.S;  // 32/64-bit: in place
  s.sumsq = at::empty({rmax}, opts);
  s.inv = at::empty({rmax}, opts);
  return s;
}

// Runs body(scratch, workspace, group, chunk) over the chunks, grouped into `groups` runs of consecutive chunks:
// in order on this thread, or (plan.threads > 1) on host threads that each take the next group.
template <typename T, class Epi, class Body>
void for_each_chunk(const Problem& P, const Plan& plan, const Pass& pass, bool split, int64_t groups, Epi& epi,
                    Body&& body) {
  const int64_t nch = plan.num_chunks;
  auto run_group = [&](Scratch<T>& s, typename Epi::Workspace& ws, int64_t g) {
    for (int64_t chunk = g * nch / groups, last = (g + 1) * nch / groups; chunk < last; ++chunk) {
      body(s, ws, g, chunk_at(P, plan, chunk));
    }
  };
  const int64_t threads = std::min(plan.threads, groups);
  if (threads <= 1) {
    Scratch<T> s = make_scratch<T>(P, plan, pass, split);
    typename Epi::Workspace ws = epi.workspace(P, plan, pass);
    for (int64_t g = 0; g < groups; ++g) run_group(s, ws, g);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;  // raw buffers: no autograd bookkeeping in the threads
    for (int64_t t = begin; t < end; ++t) {
      Scratch<T> s = make_scratch<T>(P, plan, pass, split);
      typename Epi::Workspace ws = epi.workspace(P, plan, pass);
      for (int64_t g = next.fetch_add(1); g < groups; g = next.fetch_add(1)) run_group(s, ws, g);
    }
  });
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

// lse and argmax from per-chunk partials (slots, B), merged in chunk order: the largest shift first, then the sum
// (one term per chunk); the best cosine by strict comparison, so the earlier chunk (smaller column) wins ties.
template <typename T>
void merge_forward_partials(const at::Tensor& max_z, const at::Tensor& sum_exp, const at::Tensor& best_cos,
                            const at::Tensor& best_col, at::Tensor& lse, at::Tensor& argmax) {
  const int64_t nch = max_z.size(0), B = max_z.size(1);
  const T* mz = max_z.data_ptr<T>();
  const T* se = sum_exp.data_ptr<T>();
  const T* bc = best_cos.data_ptr<T>();
  const int64_t* bj = best_col.data_ptr<int64_t>();
  T* lse_p = lse.data_ptr<T>();
  int64_t* arg_p = argmax.data_ptr<int64_t>();
  const T neg_inf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, B, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T m = neg_inf;
      for (int64_t ch = 0; ch < nch; ++ch) m = std::max(m, mz[ch * B + i]);
      const T shift = m == neg_inf ? T(0) : m;  // every logit -inf: the sum is 0, lse = log(0) = -inf
      T sum = 0;
      T best = neg_inf;
      int64_t best_at = bj[i];
      for (int64_t ch = 0; ch < nch; ++ch) {
        const int64_t idx = ch * B + i;
        sum += se[idx] * std::exp(mz[idx] - shift);
        if (bc[idx] > best) {
          best = bc[idx];
          best_at = bj[idx];
        }
      }
      lse_p[i] = shift + std::log(sum);
      arg_p[i] = best_at;
    }
  });
}

// Epi, the device's policy (T: the accumulation type, float or double; on a GPU all launches on its stream):
//   Plan plan(P)                            the tiling and schedule it wants (the switches then override the tiling)
//   at::ScalarType product_dtype(P)         the dtype of the products' operands: x's (16-bit products with fp32
//                                           output) or T (16-bit inputs widened first)
//   Workspace workspace(P, plan, pass)      one thread's buffers besides Scratch
//   ChunkRows load(P, ws, chunk, pass, sumsq, inv)   the chunk's rows (a view, gathered through class_index and / or
//                                           converted) and where their sumsq / inv = 1 / max(||w||, eps) are (the
//                                           scratch tensors given, or the policy's own)
//   forward(EpiArgs, ws)                    the chunk's logits and their max / sum / argmax, merged into the state
//   backward(EpiArgs, ws)                   the chunk's logit-gradient block G, grad_row_scale and grad_target_logit
//   at::Tensor grad_rows(P, ws, chunk, grad_weight)   where U = G^T x of the chunk goes: (rows, D) in T
//   weight_rows(WeightRowArgs, ws)          grad_weight rows of the chunk from U: the normalization's projection,
//                                           the cast and the class_index scatter
template <typename T, class Epi>
std::tuple<at::Tensor, at::Tensor> forward(const Problem& P, Epi& epi) {
  const auto opts = P.x.options().dtype(acc_type(P));
  const Plan plan = make_plan(P, epi.plan(P));
  const int64_t B = P.B, bt = plan.rows_per_tile;
  const int64_t slots = plan.chunk_partials ? plan.num_chunks : 1;
  at::Tensor run_max = at::full({slots, B}, -INFINITY, opts);
  at::Tensor run_sum = at::zeros({slots, B}, opts);
  at::Tensor run_cos = at::full({slots, B}, -INFINITY, opts);
  at::Tensor run_col = at::zeros({slots, B}, P.x.options().dtype(at::kLong));
  const at::Tensor x_op = P.x.to(epi.product_dtype(P));  // a no-op unless the policy widens 16-bit x
  Pass pass;
  Products gemm;
  const EpiArgs<T> base = base_args<T>(P);
  for_each_chunk<T>(P, plan, pass, false, plan.num_chunks, epi,
                    [&](Scratch<T>& s, typename Epi::Workspace& ws, int64_t, const Chunk& ch) {
    const ChunkRows rows = epi.load(P, ws, ch, pass, s.sumsq, s.inv);
    const int64_t slot = plan.chunk_partials ? ch.index : 0;
    EpiArgs<T> a = base;
    a.inv = static_cast<const T*>(rows.inv);
    a.run_max = run_max[slot].template data_ptr<T>();
    a.run_sum = run_sum[slot].template data_ptr<T>();
    a.run_cos = run_cos[slot].template data_ptr<T>();
    a.run_col = run_col[slot].template data_ptr<int64_t>();
    a.ld = ch.rows;
    a.cols = ch.cols;
    a.first_col = ch.first_col;
    for (int64_t r0 = 0; r0 < B; r0 += bt) {
      const int64_t n = std::min(bt, B - r0);
      at::Tensor block = s.S.narrow(0, 0, n * ch.rows).view({n, ch.rows});
      gemm(block, x_op.narrow(0, r0, n), rows.product.t(), false);
      a.S = block.template data_ptr<T>();
      a.bt = n;
      a.row0 = r0;
      epi.forward(a, ws);
    }
  });
  if (!plan.chunk_partials) {
    // run_max = -inf (every logit -inf) leaves run_sum = 0: lse = -inf, as log(0)
    return {at::add(run_max[0], at::log(run_sum[0])), run_col[0]};
  }
  at::Tensor lse = at::empty({B}, opts), argmax = at::empty({B}, P.x.options().dtype(at::kLong));
  merge_forward_partials<T>(run_max, run_sum, run_cos, run_col, lse, argmax);
  return {lse, argmax};
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
  const Plan plan = make_plan(P, epi.plan(P));
  const int64_t B = P.B, D = P.D, bt = plan.rows_per_tile;
  const auto product_dtype = epi.product_dtype(P);
  Pass pass;
  pass.backward = true;
  pass.need_x = need_x;
  pass.need_weight = need_weight;
  pass.fp16_grad = is_16bit(product_dtype);
  const bool half = pass.fp16_grad;
  const bool split = half && P.x.scalar_type() == at::kHalf && !P.fast_backward;

  at::Tensor grad_target = at::zeros({B}, opts);
  const int64_t slots = plan.chunk_partials ? plan.num_chunks : 1;
  at::Tensor grad_scale_slots = at::zeros({slots, B}, opts);
  at::Tensor grad_weight = !need_weight                  ? at::empty({0}, P.weight.options())
                           : P.class_index.has_value() ? at::zeros_like(P.weight)
                                                       : at::empty_like(P.weight);

  const at::Tensor x_op = P.x.to(product_dtype);
  // fp16 scheme (see the top of this file): per-row power-of-two scale of the gradient block
  at::Tensor gscale, gscale_min, x_prod = x_op;
  if (half) {
    const double dmax = nontarget_max_abs_dphi<double>(static_cast<int>(P.non_target), P.non_target_param);
    const at::Tensor bound = at::mul(at::abs(at::mul(grad_lse, P.row_scale)), dmax);
    // 2^13: G = sigma f dcos with f < 2 (the mantissa of 1 / n_r, see chunk_epilogue.cuh) stays below 2^14
    // a NaN upstream gradient: scale 1 (that row's G is NaN whatever its scale)
    gscale = at::nan_to_num(
        at::clamp(at::exp2(at::floor(at::log2(at::div(at::scalar_tensor(8192.0, opts), bound)))),
                  std::ldexp(1.0, -64), std::ldexp(1.0, 64)),
        1.0);
    if (need_weight) {
      // sigma_min over the rows with a gradient (bound > 0: not 0, not NaN), as the hybrid launcher: a NaN row
      // would make every row of x' NaN, and with it every class's grad_weight, filtered or not
      gscale_min = at::amin(at::where(at::gt(bound, 0), gscale, at::amax(gscale)));
      x_prod = at::mul(P.x.to(acc), at::div(gscale_min, gscale).unsqueeze(1)).to(at::kHalf);
    }
  }
  const int64_t groups = plan.dx_groups;
  at::Tensor dx_parts = need_x ? at::zeros({groups, B, D}, opts) : at::Tensor();

  EpiArgs<T> base = base_args<T>(P);
  base.grad_lse = grad_lse.data_ptr<T>();
  base.lse = lse.data_ptr<T>();
  base.row_gscale = half ? gscale.data_ptr<T>() : nullptr;
  base.grad_target = grad_target.data_ptr<T>();

  WeightRowArgs<T> wbase;
  wbase.gscale_min = half && need_weight ? gscale_min.data_ptr<T>() : nullptr;
  wbase.grad_weight = need_weight ? grad_weight.data_ptr() : nullptr;
  wbase.k = P.k;
  wbase.D = D;

  Products gemm;
  for_each_chunk<T>(P, plan, pass, split, groups, epi,
                    [&](Scratch<T>& s, typename Epi::Workspace& ws, int64_t group, const Chunk& ch) {
    const ChunkRows rows = epi.load(P, ws, ch, pass, s.sumsq, s.inv);
    at::Tensor U = need_weight ? epi.grad_rows(P, ws, ch, grad_weight) : at::Tensor();
    EpiArgs<T> a = base;
    a.inv = static_cast<const T*>(rows.inv);
    a.grad_scale = grad_scale_slots[plan.chunk_partials ? ch.index : 0].template data_ptr<T>();
    a.ld = ch.rows;
    a.cols = ch.cols;
    a.first_col = ch.first_col;
    const int64_t rmax = plan.cols_per_chunk * P.k;
    for (int64_t r0 = 0; r0 < B; r0 += bt) {
      const int64_t n = std::min(bt, B - r0);
      at::Tensor block = s.S.narrow(0, 0, n * ch.rows).view({n, ch.rows});
      at::Tensor gblock = s.G.narrow(0, 0, n * ch.rows).view({n, ch.rows});
      at::Tensor glo = split ? s.G.narrow(0, bt * rmax, n * ch.rows).view({n, ch.rows}) : at::Tensor();
      gemm(block, x_op.narrow(0, r0, n), rows.product.t(), false);
      a.S = block.template data_ptr<T>();
      a.G = gblock.data_ptr();
      a.G_lo = split ? glo.data_ptr() : nullptr;
      a.bt = n;
      a.row0 = r0;
      epi.backward(a, ws);
      if (need_x) {
        at::Tensor dx = dx_parts[group].narrow(0, r0, n);
        gemm(dx, gblock, rows.dx, true);
        if (split) gemm(dx, glo, rows.dx, true);
      }
      if (need_weight) gemm(U, gblock.t(), x_prod.narrow(0, r0, n), r0 > 0);
      if (need_weight && split) gemm(U, glo.t(), x_prod.narrow(0, r0, n), true);
    }
    if (need_weight) {
      WeightRowArgs<T> w = wbase;
      w.U = U.template data_ptr<T>();
      w.W = rows.stored;
      w.sumsq = static_cast<const T*>(rows.sumsq);
      w.inv = static_cast<const T*>(rows.inv);
      w.class_index = P.class_index.has_value() ? P.class_index->data_ptr<int64_t>() + ch.first_col : nullptr;
      w.first_row = ch.first_col * P.k;
      w.rows = ch.rows;
      epi.weight_rows(w, ws);
    }
  });

  // grad_x: the groups added in order (one group: its sum is the result)
  at::Tensor grad_x = at::empty({0}, P.x.options());
  if (need_x) {
    at::Tensor dx = dx_parts[0];
    for (int64_t g = 1; g < groups; ++g) dx.add_(dx_parts[g]);
    if (half) {
      grad_x = at::div(dx, gscale.unsqueeze(1)).to(P.x.scalar_type());
    } else if (P.x.scalar_type() != acc) {
      grad_x = dx.to(P.x.scalar_type());
    } else {
      grad_x = groups > 1 ? dx.clone() : dx;  // not a view of all the groups' partials
    }
  }
  at::Tensor grad_scale = grad_scale_slots[0];
  if (plan.chunk_partials) {
    grad_scale = at::empty({B}, opts);
    const T* parts = grad_scale_slots.data_ptr<T>();
    T* out = grad_scale.data_ptr<T>();
    const int64_t nch = plan.num_chunks;
    for (int64_t i = 0; i < B; ++i) {
      T sum = 0;
      for (int64_t ch = 0; ch < nch; ++ch) sum += parts[ch * B + i];  // chunk order
      out[i] = sum;
    }
  }
  return {grad_x, grad_weight, grad_target, grad_scale};
}

}  // namespace chunked
}  // namespace marginops
