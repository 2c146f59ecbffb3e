// CPU kernels of marginops::fused_lse and fused_lse_backward (the contract is in marginops/ops.py): the CPU
// policy of the shared chunk loop (csrc/chunk_loop.h) and the op entry points.
//
// Classes are processed in chunks of a few hundred to a few thousand columns. Each thread takes
// whole chunks: it multiplies x by the chunk's raw weight rows with ATen's matrix product (one
// thread each, inside the parallel region) and runs the epilogue on the B x chunk block while it
// is still in cache. Row norms of W are recomputed per chunk, never stored as a normalized copy.
// Extra memory: O(threads * B * chunk) for the blocks, O(B * num_chunks) for the partials, and
// O(threads * B * D) for the grad_x partial sums of the backward; never O(B * C).
// MARGINOPS_CHUNK_COLS / MARGINOPS_CHUNK_ROWS override the classes per chunk and the rows per tile
// (one tile of all B rows by default), as for the CUDA path.
//
// Dtypes: x and weight both float32 or both float64 (T = their dtype), both bfloat16 or both
// float16, or x bfloat16 / float16 with a float32 weight (mixed precision); with 16-bit x, T =
// float and the per-row tensors (target_logit, row_scale, threshold, grad_lse, lse) are float32.
// 16-bit x is widened to float32 once (B x D, exact). Each chunk's weight rows are widened into
// the thread's workspace (rounded through x's dtype first for a float32 weight), on the same pass as
// the class_index gather, and the float32 products and epilogue run on them: products of two 16-bit
// values are exact in float32, so this is a 16-bit GEMM with float32 accumulation (ATen's public
// CPU API has no bf16 / fp16 GEMM with float32 output). Mixed precision takes the row norms and
// the norm term of grad_weight from the float32 rows, as the contract says. grad_x is summed in
// float32 and cast to x's dtype at the end; 16-bit grad_weight rows are formed in the workspace and
// cast as they are written. Extra memory of 16-bit inputs: B x D float32 for x, and per thread
// k * chunk x D float32 rows (always, not only with class_index) plus, in the backward with a
// 16-bit weight, as many for their gradient.
//
// Determinism: the forward writes one partial (max, sum, best cosine, its column) per chunk and
// row and merges them in chunk order, so its result does not depend on the thread count or on
// which thread ran which chunk. The backward sums grad_x per fixed group of consecutive chunks and
// then over the groups in order (bitwise reproducible for a given thread count, which fixes the
// number of groups); grad_row_scale is merged from per-chunk partials; every other output element
// has exactly one writer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "chunk_epilogue.h"
#include "chunk_loop.h"
#include "margin_math.h"
#include "op_args.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define MARGINOPS_F16C 1
#include <immintrin.h>
#else
#define MARGINOPS_F16C 0
#endif

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#pragma message("marginops: built without -fopenmp, so the CPU op runs on one thread")
#endif

namespace marginops {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// 16-bit weight rows (S: c10::BFloat16 or c10::Half) to and from the float32 rows of the products.

// fp16 <-> float32 eight values at a time with F16C (every AVX2 CPU has it): c10::Half converts
// with bit manipulation per value unless the build targets F16C, which made an fp16 forward +
// backward 1.2x the time of float32 (B = D = 256, C = 20000, one thread); with F16C it is 1.0x.
// Both round to nearest even, so the bits are the same. Each returns how many leading values it
// converted; the scalar loops do the rest.
#if MARGINOPS_F16C
bool has_f16c() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  }();
  return yes;
}

__attribute__((target("avx,f16c"))) int64_t half_to_float(const c10::Half* src, float* dst,
                                                          int64_t n) {
  int64_t e = 0;
  for (; e + 8 <= n; e += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + e));
    _mm256_storeu_ps(dst + e, _mm256_cvtph_ps(h));
  }
  return e;
}

__attribute__((target("avx,f16c"))) int64_t float_to_half(const float* src, c10::Half* dst,
                                                          int64_t n) {
  int64_t e = 0;
  for (; e + 8 <= n; e += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + e), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + e), h);
  }
  return e;
}

__attribute__((target("avx,f16c"))) int64_t round_through_half(const float* src, float* dst,
                                                               int64_t n) {
  int64_t e = 0;
  for (; e + 8 <= n; e += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + e), _MM_FROUND_TO_NEAREST_INT);
    _mm256_storeu_ps(dst + e, _mm256_cvtph_ps(h));
  }
  return e;
}
#endif

template <typename S>
void widen_rows(const void* base, int64_t first, float* dst, int64_t n) {
  const S* src = static_cast<const S*>(base) + first;
  int64_t e = 0;
#if MARGINOPS_F16C
  if constexpr (std::is_same_v<S, c10::Half>) {
    if (has_f16c()) e = half_to_float(src, dst, n);
  }
#endif
  for (; e < n; ++e) dst[e] = static_cast<float>(src[e]);
}

// A float32 weight as 16-bit x's products see it: each value rounded to S (nearest even, as
// Tensor.to does) and widened back.
template <typename S>
void round_rows(const void* base, int64_t first, float* dst, int64_t n) {
  const float* src = static_cast<const float*>(base) + first;
  int64_t e = 0;
#if MARGINOPS_F16C
  if constexpr (std::is_same_v<S, c10::Half>) {
    if (has_f16c()) e = round_through_half(src, dst, n);
  }
#endif
  for (; e < n; ++e) dst[e] = static_cast<float>(static_cast<S>(src[e]));
}

template <typename S>
void narrow_rows(const float* src, void* base, int64_t first, int64_t n) {
  S* dst = static_cast<S*>(base) + first;
  int64_t e = 0;
#if MARGINOPS_F16C
  if constexpr (std::is_same_v<S, c10::Half>) {
    if (has_f16c()) e = float_to_half(src, dst, n);
  }
#endif
  for (; e < n; ++e) dst[e] = static_cast<S>(src[e]);
}

// ---------------------------------------------------------------------------------------------
// The CPU policy of the chunk loop (the Epi of csrc/chunk_loop.h).

// Weight rows turned into the T rows of the products (16-bit inputs; T = float): base is the
// stored weight, first and n count elements.
template <typename T>
using ConvertRows = void (*)(const void* base, int64_t first, T* dst, int64_t n);
// Gradient rows in T cast to the stored 16-bit weight's dtype.
template <typename T>
using StoreRows = void (*)(const T* src, void* base, int64_t first, int64_t n);

template <typename T>
Tensor wrap(const T* data, int64_t rows, int64_t cols) {
  // Borrowed views of raw buffers; nothing here requires grad, so ATen records no graph.
  return at::from_blob(const_cast<T*>(data), {rows, cols},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Columns per chunk. It must not depend on the thread count: the forward's result is then the
// same bits for any number of threads.
int64_t choose_chunk(int64_t B, int64_t k, int64_t N, int64_t elem_size) {
  // Keep the B x (k * chunk) block near the size of a core's L2, so the epilogue reads it from
  // cache right after the matrix product wrote it.
  constexpr int64_t kBlockBytes = int64_t(2) << 20;
  int64_t cols = kBlockBytes / std::max<int64_t>(1, B * k * elem_size);
  cols = std::min<int64_t>(std::max<int64_t>(cols, 256), 8192);
  // Small problems still get ~16 chunks to spread over the threads.
  cols = std::min(cols, std::max<int64_t>((N + 15) / 16, 64));
  cols = (cols + 15) / 16 * 16;
  return std::max<int64_t>(1, std::min(cols, N));
}

template <typename T>
class CpuChunks {
 public:
  // One thread's buffers besides the loop's, carved from a single allocation: every buffer starts
  // on a 64-byte boundary, so a chunk's matrix products see the same alignment whichever thread
  // runs them.
  struct Workspace {
    Tensor storage;
    T* colsum = nullptr;     // k * chunk: sum_i dcos cos / n (backward)
    T* rows = nullptr;       // k * chunk x D: gathered or converted weight rows (class_index or 16-bit)
    T* grad_rows = nullptr;  // k * chunk x D: their gradient before the scatter or cast (backward)
  };

  explicit CpuChunks(const chunked::Problem& P) : k_(P.k), D_(P.D) {
    const auto xt = P.x.scalar_type(), wt = P.weight.scalar_type();
    weight_ = wt == chunked::acc_type(P) ? P.weight.data_ptr<T>() : nullptr;
    weight_raw_ = P.weight.data_ptr();
    if constexpr (std::is_same_v<T, float>) {
      if (wt == at::kBFloat16) {
        convert_ = widen_rows<c10::BFloat16>;
        narrow_ = narrow_rows<c10::BFloat16>;
      } else if (wt == at::kHalf) {
        convert_ = widen_rows<c10::Half>;
        narrow_ = narrow_rows<c10::Half>;
      } else if (xt == at::kBFloat16) {
        convert_ = round_rows<c10::BFloat16>;
        rounds_ = true;
      } else if (xt == at::kHalf) {
        convert_ = round_rows<c10::Half>;
        rounds_ = true;
      }
    }
    class_index_ = P.class_index.has_value() ? P.class_index->data_ptr<int64_t>() : nullptr;
  }

  // All B rows in one tile against chunks that keep the block in a core's L2; every thread runs chunks.
  chunked::Plan plan(const chunked::Problem& P) const {
    chunked::Plan plan;
    plan.rows_per_tile = P.B;
    plan.cols_per_chunk = choose_chunk(P.B, P.k, P.N, sizeof(T));
    plan.threads = std::max<int64_t>(1, at::get_num_threads());
    plan.chunk_partials = true;
    plan.dx_groups = 4 * plan.threads;
    return plan;
  }

  // ATen's CPU matrix products take no 16-bit operands with a float32 result: 16-bit inputs are widened.
  at::ScalarType product_dtype(const chunked::Problem& P) const { return chunked::acc_type(P); }

  Workspace workspace(const chunked::Problem& P, const chunked::Plan& plan, const chunked::Pass& pass) const {
    const int64_t nr = k_ * plan.cols_per_chunk;
    auto aligned = [](int64_t n) { return (n + 15) / 16 * 16; };
    const bool rows = class_index_ != nullptr || convert_ != nullptr;
    const bool grad_rows = pass.need_weight && (class_index_ != nullptr || narrow_ != nullptr);
    const int64_t colsum_size = pass.backward ? aligned(nr) : 0;
    const int64_t rows_size = rows ? aligned(nr * D_) : 0;
    Workspace ws;
    ws.storage = at::empty({colsum_size + rows_size + (grad_rows ? aligned(nr * D_) : 0)},
                           P.x.options().dtype(c10::CppTypeToScalarType<T>::value));
    T* base = ws.storage.template data_ptr<T>();
    ws.colsum = pass.backward ? base : nullptr;
    ws.rows = rows ? base + colsum_size : nullptr;
    ws.grad_rows = grad_rows ? base + colsum_size + rows_size : nullptr;
    return ws;
  }

  // The chunk's weight rows (k per column, in column order) in T, their norms; colsum zeroed (backward).
  chunked::ChunkRows load(const chunked::Problem& P, Workspace& ws, const chunked::Chunk& ch,
                          const chunked::Pass& pass, Tensor& sumsq_t, Tensor& inv_t) const {
    T* sumsq = sumsq_t.data_ptr<T>();
    T* inv = inv_t.data_ptr<T>();
    const int64_t block = k_ * D_;
    const int64_t* ci = class_index_ != nullptr ? class_index_ + ch.first_col : nullptr;
    const T* w;
    if (convert_) {
      if (ci) {
        for (int64_t j = 0; j < ch.cols; ++j) convert_(weight_raw_, ci[j] * block, ws.rows + j * block, block);
      } else {
        convert_(weight_raw_, ch.first_col * block, ws.rows, ch.cols * block);
      }
      w = ws.rows;
    } else if (ci) {
      for (int64_t j = 0; j < ch.cols; ++j) {
        std::memcpy(ws.rows + j * block, weight_ + ci[j] * block, sizeof(T) * block);
      }
      w = ws.rows;
    } else {
      w = weight_ + ch.first_col * block;
    }
    if (!rounds_) {
      cpu::row_norms(w, ch.rows, D_, sumsq, inv);
    } else if (ci) {
      for (int64_t j = 0; j < ch.cols; ++j) {
        const int64_t r = j * k_;
        cpu::row_norms(stored_row(ci, ch.first_col, w, r), k_, D_, sumsq + r, inv + r);
      }
    } else {
      cpu::row_norms(stored_row(ci, ch.first_col, w, 0), ch.rows, D_, sumsq, inv);
    }
    if (pass.backward) std::fill(ws.colsum, ws.colsum + ch.rows, T(0));
    const Tensor rows = wrap(w, ch.rows, D_);
    return {rows, rows, w, sumsq, inv};
  }

  // Each (chunk, row) is written once, into the chunk's own slot (Plan::chunk_partials).
  void forward(const chunked::EpiArgs<T>& a, Workspace& ws) const { cpu::forward_rows(rows_of(a, ws)); }

  // G = dcos / n in place of S (the products are in T, so the loop's G is S).
  void backward(const chunked::EpiArgs<T>& a, Workspace& ws) const {
    TORCH_INTERNAL_ASSERT(a.G == a.S && a.row_gscale == nullptr);
    cpu::backward_rows(rows_of(a, ws));
  }

  // U straight into grad_weight's rows where they are stored in T and contiguous, else into the workspace.
  Tensor grad_rows(const chunked::Problem& P, Workspace& ws, const chunked::Chunk& ch, Tensor& grad_weight) const {
    if (class_index_ != nullptr || narrow_ != nullptr) return wrap(ws.grad_rows, ch.rows, D_);
    return wrap(grad_weight.data_ptr<T>() + ch.first_col * k_ * D_, ch.rows, D_);
  }

  // grad w_r = sum_i dcos_ir x_i / n_r - (sum_i dcos_ir cos_ir) w_r / n_r^2: U less the norm term, then cast
  // and / or scattered to the weight's rows.
  void weight_rows(const chunked::WeightRowArgs<T>& a, Workspace& ws) const {
    const int64_t D = a.D, block = a.k * D, cols = a.rows / a.k, first_col = a.first_row / a.k;
    const T* w = static_cast<const T*>(a.W);
    for (int64_t r = 0; r < a.rows; ++r) {
      const T coef = norm_has_projection(a.sumsq[r]) ? ws.colsum[r] * a.inv[r] : T(0);
      T* dst = a.U + r * D;
      const T* src = stored_row(a.class_index, first_col, w, r);
      for (int64_t d = 0; d < D; ++d) dst[d] -= coef * src[d];
    }
    if (narrow_) {
      if (a.class_index) {
        for (int64_t j = 0; j < cols; ++j) narrow_(a.U + j * block, a.grad_weight, a.class_index[j] * block, block);
      } else {
        narrow_(a.U, a.grad_weight, a.first_row * D, a.rows * D);
      }
    } else if (a.class_index) {
      for (int64_t j = 0; j < cols; ++j) {
        std::memcpy(static_cast<T*>(a.grad_weight) + a.class_index[j] * block, a.U + j * block, sizeof(T) * block);
      }
    }
  }

 private:
  // Row r of the chunk as stored, in T: the product rows w unless those are a rounding (mixed
  // precision), whose norms and norm term come from the float32 rows.  ci: the chunk's class_index.
  const T* stored_row(const int64_t* ci, int64_t first_col, const T* w, int64_t r) const {
    if (!rounds_) return w + r * D_;
    const int64_t cls = ci ? ci[r / k_] : first_col + r / k_;
    return weight_ + (cls * k_ + r % k_) * D_;
  }

  // The epilogue kernels' view of one (row tile, chunk) block: per-row arrays from the tile's first row (the
  // forward's outputs or the backward's inputs and outputs; the other pass's are nullptr).
  static cpu::ChunkRows<T> rows_of(const chunked::EpiArgs<T>& a, Workspace& ws) {
    auto tile = [&a](auto* rows) { return rows != nullptr ? rows + a.row0 : rows; };
    cpu::ChunkRows<T> r{};
    r.dots = a.S;
    r.inv = a.inv;
    r.colsum = ws.colsum;
    r.B = a.bt;
    r.cols = a.cols;
    r.k = a.k;
    r.first_col = a.first_col;
    r.labels = tile(a.labels);
    r.target_logit = tile(a.target_logit);
    r.row_scale = tile(a.row_scale);
    r.threshold = tile(a.threshold);
    r.params = a.params;
    r.grad_lse = tile(a.grad_lse);
    r.lse = tile(a.lse);
    r.max_z = tile(a.run_max);
    r.sum_exp = tile(a.run_sum);
    r.best_cos = tile(a.run_cos);
    r.best_col = tile(a.run_col);
    r.grad_target = tile(a.grad_target);
    r.grad_scale = tile(a.grad_scale);
    return r;
  }

  int64_t k_, D_;
  const T* weight_ = nullptr;  // the weight if stored in T, else nullptr
  const void* weight_raw_ = nullptr;
  // nullptr: the products use the weight rows in place. Else the rows are converted into the
  // workspace: widened (16-bit weight) or rounded through x's dtype (float32 weight, 16-bit x).
  ConvertRows<T> convert_ = nullptr;
  bool rounds_ = false;            // convert_ rounds: norms and the norm term come from the stored rows
  StoreRows<T> narrow_ = nullptr;  // 16-bit weight: how grad_weight rows are written; nullptr: in place
  const int64_t* class_index_ = nullptr;  // nullptr: column j is class j
};

// ---------------------------------------------------------------------------------------------
// Validation and the ops.

void check_vector(const Tensor& t, const char* name, int64_t B, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "marginops fused_lse (CPU): ", name,
              " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "marginops fused_lse (CPU): ", name,
              " must have shape (", B, ",) (one entry per row of x), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "marginops fused_lse (CPU): ", name, " must have dtype ",
              dtype, ", got ", t.scalar_type());
}

bool is_16bit(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

chunked::Problem check_inputs(const Tensor& x, const Tensor& weight, const Tensor& labels, const Tensor& target_logit,
                              const Tensor& row_scale, const Tensor& threshold,
                              const std::optional<Tensor>& class_index, const Tensor& non_target_param,
                              int64_t non_target, double filter_threshold, int64_t subcenters,
                              bool need_unique_classes) {
  const char* op = "marginops fused_lse (CPU): ";
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), op,
              "x and weight must be CPU tensors, got ", x.device(), " and ", weight.device());
  TORCH_CHECK(x.dim() == 2, op, "x must be 2-D (B, D), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, op, "weight must be 2-D (R, D), got shape ", weight.sizes());
  const auto xt = x.scalar_type(), wt = weight.scalar_type();
  TORCH_CHECK(is_16bit(xt) || xt == at::kFloat || xt == at::kDouble, op,
              "x must be bfloat16, float16, float32 or float64, got ", xt);
  TORCH_CHECK(wt == xt || (is_16bit(xt) && wt == at::kFloat), op, "weight dtype ", wt,
              " does not go with x dtype ", xt, ": weight must have x's dtype, or be float32 ",
              "with bfloat16 / float16 x (mixed precision)");
  TORCH_CHECK(weight.size(1) == x.size(1), op, "weight has ", weight.size(1),
              " features per row but x has ", x.size(1));
  TORCH_CHECK(subcenters >= 1, op, "subcenters must be >= 1, got ", subcenters);
  TORCH_CHECK(weight.size(0) % subcenters == 0, op, "weight has ", weight.size(0),
              " rows, not a multiple of subcenters=", subcenters);
  TORCH_CHECK(is_nontarget_mode(non_target), op, "non_target must be in [0, ",
              static_cast<int>(kNumNonTargetModes), ") (NonTargetMode of csrc/margin_math.h), got ",
              non_target);
  const int64_t B = x.size(0);
  check_vector(labels, "labels", B, at::kLong);
  const auto acc = xt == at::kDouble ? at::kDouble : at::kFloat;
  check_vector(target_logit, "target_logit", B, acc);
  check_vector(row_scale, "row_scale", B, acc);
  check_vector(threshold, "threshold", B, acc);

  chunked::Problem P;
  P.B = B;
  P.D = x.size(1);
  P.R = weight.size(0);
  P.k = subcenters;
  const int64_t classes = P.R / subcenters;
  P.x = x.contiguous();
  P.weight = weight.contiguous();
  P.labels = labels.contiguous();
  P.target_logit = target_logit.contiguous();
  P.row_scale = row_scale.contiguous();
  P.threshold = threshold.contiguous();
  P.non_target_param = non_target_param_value(non_target_param, op);
  P.non_target = non_target;
  P.filter = filter_threshold;
  if (class_index.has_value()) {
    const Tensor& ci = *class_index;
    TORCH_CHECK(ci.device().is_cpu(), op, "class_index must be a CPU tensor, got ", ci.device());
    TORCH_CHECK(ci.dim() == 1 && ci.scalar_type() == at::kLong, op,
                "class_index must be a 1-D int64 tensor, got shape ", ci.sizes(), " dtype ",
                ci.scalar_type());
    P.class_index = ci.contiguous();
    P.N = ci.numel();
    if (P.N > 0) {
      // The kernels read weight rows at these ids: never trust them.
      const int64_t* p = P.class_index->data_ptr<int64_t>();
      const auto [lo, hi] = std::minmax_element(p, p + P.N);
      TORCH_CHECK(*lo >= 0 && *hi < classes, op, "class_index values must lie in [0, ",
                  classes, ") (weight has ", P.R, " rows / subcenters=", P.k, "), got min ", *lo,
                  " max ", *hi);
      if (need_unique_classes) {
        // Each gathered class's gradient rows are written by one chunk; a repeated id would race.
        std::vector<uint8_t> seen(static_cast<size_t>(classes), 0);
        for (int64_t j = 0; j < P.N; ++j) {
          TORCH_CHECK(!seen[p[j]], op, "class_index must not repeat a class, ", p[j],
                      " appears more than once");
          seen[p[j]] = 1;
        }
      }
    }
  } else {
    P.N = classes;
  }
  TORCH_CHECK(P.N > 0, op, "there are no class columns (weight has ", P.R,
              " rows and class_index is ", class_index.has_value() ? "empty" : "absent", ")");
  return P;
}

std::tuple<Tensor, Tensor> fused_lse_cpu(const Tensor& x, const Tensor& weight,
                                         const Tensor& labels, const Tensor& target_logit,
                                         const Tensor& row_scale, const Tensor& threshold,
                                         const std::optional<Tensor>& class_index,
                                         const Tensor& non_target_param, int64_t non_target,
                                         double filter_threshold, int64_t subcenters,
                                         bool /*deterministic: always, see the file comment*/,
                                         int64_t /*switches: none read per call on the CPU*/) {
  const chunked::Problem P = check_inputs(x, weight, labels, target_logit, row_scale, threshold, class_index,
                                          non_target_param, non_target, filter_threshold, subcenters,
                                          /*need_unique_classes=*/false);
  const auto acc = chunked::acc_type(P);
  if (P.B == 0) {
    return {at::empty({0}, x.options().dtype(acc)), at::empty({0}, x.options().dtype(at::kLong))};
  }
  std::tuple<Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(acc, "marginops_fused_lse_cpu", [&] {
    CpuChunks<scalar_t> epi(P);
    out = chunked::forward<scalar_t>(P, epi);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_lse_backward_cpu(
    const Tensor& grad_lse, const Tensor& lse, const Tensor& x, const Tensor& weight,
    const Tensor& labels, const Tensor& target_logit, const Tensor& row_scale,
    const Tensor& threshold, const std::optional<Tensor>& class_index, const Tensor& non_target_param,
    int64_t non_target, double filter_threshold, int64_t subcenters, bool /*deterministic*/,
    bool need_grad_x, bool need_grad_weight, int64_t /*switches*/) {
  const chunked::Problem P = check_inputs(x, weight, labels, target_logit, row_scale, threshold, class_index,
                                          non_target_param, non_target, filter_threshold, subcenters,
                                          /*need_unique_classes=*/true);
  const auto acc = chunked::acc_type(P);
  check_vector(grad_lse, "grad_lse", P.B, acc);
  check_vector(lse, "lse", P.B, acc);
  if (P.B == 0) {
    return {need_grad_x ? at::zeros_like(P.x) : at::empty({0}, P.x.options()),
            need_grad_weight ? at::zeros_like(P.weight) : at::empty({0}, P.weight.options()),
            at::zeros_like(P.target_logit), at::zeros_like(P.row_scale)};
  }
  const Tensor g = grad_lse.contiguous();
  const Tensor l = lse.contiguous();
  std::tuple<Tensor, Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(acc, "marginops_fused_lse_backward_cpu", [&] {
    CpuChunks<scalar_t> epi(P);
    out = chunked::backward<scalar_t>(P, g, l, need_grad_x, need_grad_weight, epi);
  });
  return out;
}

}  // namespace
}  // namespace marginops

TORCH_LIBRARY_IMPL(marginops, CPU, m) {
  m.impl("fused_lse", &marginops::fused_lse_cpu);
  m.impl("fused_lse_backward", &marginops::fused_lse_backward_cpu);
}
