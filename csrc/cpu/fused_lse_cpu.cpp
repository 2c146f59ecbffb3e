// CPU kernels of marginops::fused_lse and fused_lse_backward (the contract is in marginops/ops.py).
//
// Classes are processed in chunks of a few hundred to a few thousand columns. Each thread takes
// whole chunks: it multiplies x by the chunk's raw weight rows with ATen's matrix product (one
// thread each, inside the parallel region) and runs the epilogue on the B x chunk block while it
// is still in cache. Row norms of W are recomputed per chunk, never stored as a normalized copy.
// Extra memory: O(threads * B * chunk) for the blocks, O(B * num_chunks) for the partials, and
// O(threads * B * D) for the grad_x partial sums of the backward; never O(B * C).
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
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "chunk_epilogue.h"
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
// Chunk plumbing.

// Weight rows turned into the T rows of the products (16-bit inputs; T = float): base is the
// stored weight, first and n count elements.
template <typename T>
using ConvertRows = void (*)(const void* base, int64_t first, T* dst, int64_t n);
// Gradient rows in T cast to the stored 16-bit weight's dtype.
template <typename T>
using StoreRows = void (*)(const T* src, void* base, int64_t first, int64_t n);

template <typename T>
struct Problem {
  const T* x;       // in T (16-bit x: its float32 copy)
  const T* weight;  // the weight if stored in T, else nullptr
  const void* weight_raw;
  // nullptr: the products use the weight rows in place. Else the rows are converted into the
  // workspace: widened (16-bit weight) or rounded through x's dtype (float32 weight, 16-bit x).
  ConvertRows<T> convert;
  bool rounds;           // convert rounds: norms and the norm term come from the stored rows
  StoreRows<T> narrow;   // 16-bit weight: how grad_weight rows are written; nullptr: in place
  const int64_t* labels;
  const T* target_logit;
  const T* row_scale;
  const T* threshold;
  const int64_t* class_index;  // nullptr: column j is class j
  int64_t B, D, k, N;
  NonTargetParams<T> params;
  int64_t chunk, num_chunks;
};

// One thread's scratch, carved from a single allocation. Every buffer starts on a 64-byte
// boundary, so a chunk's matrix products see the same alignment whichever thread runs them.
template <typename T>
struct Workspace {
  T* dots;       // B x (k * chunk): dot products, then the chunk's logits or gradients
  T* sumsq;      // k * chunk: squared row norms
  T* inv;        // k * chunk: 1 / max(norm, eps)
  T* colsum;     // k * chunk: sum_i dcos cos / n (backward)
  T* rows;       // k * chunk x D: gathered or converted weight rows (class_index or 16-bit)
  T* grad_rows;  // k * chunk x D: their gradient before the scatter or cast (backward)

  static int64_t aligned(int64_t n) { return (n + 15) / 16 * 16; }

  // Lays the buffers out from base (nullptr: only measures); returns the size in elements.
  int64_t carve(const Problem<T>& P, bool backward, T* base) {
    const int64_t nr = P.k * P.chunk;
    int64_t used = 0;
    auto take = [&](int64_t n) {
      T* p = base ? base + used : nullptr;
      used += aligned(n);
      return p;
    };
    dots = take(P.B * nr);
    sumsq = take(nr);
    inv = take(nr);
    colsum = take(nr);
    rows = P.class_index || P.convert ? take(nr * P.D) : nullptr;
    grad_rows = (P.class_index || P.narrow) && backward ? take(nr * P.D) : nullptr;
    return used;
  }

  static int64_t size(const Problem<T>& P, bool backward) {
    return Workspace().carve(P, backward, nullptr);
  }

  Workspace() = default;
  Workspace(const Problem<T>& P, bool backward, T* base) { carve(P, backward, base); }
};

template <typename T>
Tensor wrap(const T* data, int64_t rows, int64_t cols) {
  // Borrowed views of raw buffers; nothing here requires grad, so ATen records no graph.
  return at::from_blob(const_cast<T*>(data), {rows, cols},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

struct ChunkRange {
  int64_t first_col, cols, rows;
};

template <typename T>
ChunkRange chunk_range(const Problem<T>& P, int64_t chunk_id) {
  const int64_t c0 = chunk_id * P.chunk;
  const int64_t nc = std::min(P.chunk, P.N - c0);
  return {c0, nc, nc * P.k};
}

template <typename T>
int64_t chunk_class(const Problem<T>& P, const ChunkRange& ch, int64_t j) {
  return P.class_index ? P.class_index[ch.first_col + j] : ch.first_col + j;
}

// Row r of the chunk as stored, in T: the product rows w unless those are a rounding (mixed
// precision), whose norms and norm term come from the float32 rows.
template <typename T>
const T* stored_row(const Problem<T>& P, const ChunkRange& ch, const T* w, int64_t r) {
  if (!P.rounds) return w + r * P.D;
  return P.weight + (chunk_class(P, ch, r / P.k) * P.k + r % P.k) * P.D;
}

// The chunk's weight rows (k per column, in column order), their norms and x . w^T.
template <typename T>
const T* load_chunk(const Problem<T>& P, Workspace<T>& ws, const ChunkRange& ch) {
  const int64_t D = P.D;
  const T* w;
  if (P.convert) {
    const int64_t block = P.k * D;
    if (P.class_index) {
      for (int64_t j = 0; j < ch.cols; ++j) {
        P.convert(P.weight_raw, chunk_class(P, ch, j) * block, ws.rows + j * block, block);
      }
    } else {
      P.convert(P.weight_raw, ch.first_col * block, ws.rows, ch.cols * block);
    }
    w = ws.rows;
  } else if (P.class_index) {
    const int64_t block = P.k * D;
    for (int64_t j = 0; j < ch.cols; ++j) {
      const int64_t cls = P.class_index[ch.first_col + j];
      std::memcpy(ws.rows + j * block, P.weight + cls * block, sizeof(T) * block);
    }
    w = ws.rows;
  } else {
    w = P.weight + ch.first_col * P.k * D;
  }
  if (!P.rounds) {
    cpu::row_norms(w, ch.rows, D, ws.sumsq, ws.inv);
  } else if (P.class_index) {
    for (int64_t j = 0; j < ch.cols; ++j) {
      const int64_t r = j * P.k;
      cpu::row_norms(stored_row(P, ch, w, r), P.k, D, ws.sumsq + r, ws.inv + r);
    }
  } else {
    cpu::row_norms(stored_row(P, ch, w, 0), ch.rows, D, ws.sumsq, ws.inv);
  }
  Tensor dots = wrap(ws.dots, P.B, ch.rows);
  at::mm_out(dots, wrap(P.x, P.B, D), wrap(w, ch.rows, D).t());
  return w;
}

template <typename T>
struct ForwardPartials {
  T* max_z;
  T* sum_exp;
  T* best_cos;
  int64_t* best_col;  // global column
};

// Arguments of the epilogue kernels for one chunk.
template <typename T>
cpu::ChunkRows<T> chunk_rows(const Problem<T>& P, Workspace<T>& ws, const ChunkRange& ch) {
  cpu::ChunkRows<T> a{};
  a.dots = ws.dots;
  a.inv = ws.inv;
  a.colsum = ws.colsum;
  a.B = P.B;
  a.cols = ch.cols;
  a.k = P.k;
  a.first_col = ch.first_col;
  a.labels = P.labels;
  a.target_logit = P.target_logit;
  a.row_scale = P.row_scale;
  a.threshold = P.threshold;
  a.params = P.params;
  return a;
}

template <typename T>
void forward_chunk(const Problem<T>& P, Workspace<T>& ws, int64_t chunk_id,
                   const ForwardPartials<T>& out) {
  const ChunkRange ch = chunk_range(P, chunk_id);
  load_chunk(P, ws, ch);
  cpu::ChunkRows<T> a = chunk_rows(P, ws, ch);
  const int64_t at = chunk_id * P.B;
  a.max_z = out.max_z + at;
  a.sum_exp = out.sum_exp + at;
  a.best_cos = out.best_cos + at;
  a.best_col = out.best_col + at;
  cpu::forward_rows(a);
}

template <typename T>
void backward_chunk(const Problem<T>& P, Workspace<T>& ws, int64_t chunk_id, const T* grad_lse,
                    const T* lse, T* grad_target, T* grad_scale_partial, void* grad_weight,
                    T* grad_x_part) {
  const ChunkRange ch = chunk_range(P, chunk_id);
  const T* w = load_chunk(P, ws, ch);
  std::fill(ws.colsum, ws.colsum + ch.rows, T(0));
  cpu::ChunkRows<T> a = chunk_rows(P, ws, ch);
  a.grad_lse = grad_lse;
  a.lse = lse;
  a.grad_target = grad_target;
  a.grad_scale = grad_scale_partial + chunk_id * P.B;
  cpu::backward_rows(a);
  const int64_t D = P.D;
  const Tensor g = wrap(ws.dots, P.B, ch.rows);  // dcos / n, per (row i, weight row r)
  // grad_x += sum_r dcos_ir / n_r * w_r  (grad_x_part == nullptr: not wanted, no product)
  if (grad_x_part != nullptr) {
    Tensor gx = wrap(grad_x_part, P.B, D);
    gx.addmm_(g, wrap(w, ch.rows, D));
  }
  if (grad_weight == nullptr) return;  // a frozen weight: no product, nothing written
  // grad w_r = sum_i dcos_ir x_i / n_r - (sum_i dcos_ir cos_ir) w_r / n_r^2
  const int64_t block = P.k * D;
  T* gw = P.class_index || P.narrow ? ws.grad_rows
                                    : static_cast<T*>(grad_weight) + ch.first_col * block;
  Tensor gw_t = wrap(gw, ch.rows, D);
  at::mm_out(gw_t, g.t(), wrap(P.x, P.B, D));
  for (int64_t r = 0; r < ch.rows; ++r) {
    const T coef = norm_has_projection(ws.sumsq[r]) ? ws.colsum[r] * ws.inv[r] : T(0);
    T* dst = gw + r * D;
    const T* src = stored_row(P, ch, w, r);
    for (int64_t d = 0; d < D; ++d) dst[d] -= coef * src[d];
  }
  if (P.narrow) {
    if (P.class_index) {
      for (int64_t j = 0; j < ch.cols; ++j) {
        P.narrow(gw + j * block, grad_weight, chunk_class(P, ch, j) * block, block);
      }
    } else {
      P.narrow(gw, grad_weight, ch.first_col * block, ch.cols * block);
    }
  } else if (P.class_index) {
    for (int64_t j = 0; j < ch.cols; ++j) {
      const int64_t cls = P.class_index[ch.first_col + j];
      std::memcpy(static_cast<T*>(grad_weight) + cls * block, gw + j * block, sizeof(T) * block);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Validation and the ops.

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

void check_vector(const Tensor& t, const char* name, int64_t B, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "marginops fused_lse (CPU): ", name,
              " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "marginops fused_lse (CPU): ", name,
              " must have shape (", B, ",) (one entry per row of x), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "marginops fused_lse (CPU): ", name, " must have dtype ",
              dtype, ", got ", t.scalar_type());
}

bool is_16bit(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

struct Checked {
  Tensor x, weight, labels, target_logit, row_scale, threshold;
  Tensor x_acc;         // x in the accumulation dtype (16-bit x: widened to float32)
  at::ScalarType acc;   // float64 for float64 inputs, else float32
  std::optional<Tensor> class_index;
  int64_t B, D, R, k, C_total, N;
};

Checked check_inputs(const Tensor& x, const Tensor& weight, const Tensor& labels,
                     const Tensor& target_logit, const Tensor& row_scale, const Tensor& threshold,
                     const std::optional<Tensor>& class_index, int64_t non_target,
                     int64_t subcenters, bool need_unique_classes) {
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

  Checked c;
  c.B = B;
  c.D = x.size(1);
  c.R = weight.size(0);
  c.k = subcenters;
  c.C_total = c.R / subcenters;
  c.acc = acc;
  c.x = x.contiguous();
  c.x_acc = c.x.to(acc);  // a no-op for float32 / float64 x
  c.weight = weight.contiguous();
  c.labels = labels.contiguous();
  c.target_logit = target_logit.contiguous();
  c.row_scale = row_scale.contiguous();
  c.threshold = threshold.contiguous();
  if (class_index.has_value()) {
    const Tensor& ci = *class_index;
    TORCH_CHECK(ci.device().is_cpu(), op, "class_index must be a CPU tensor, got ", ci.device());
    TORCH_CHECK(ci.dim() == 1 && ci.scalar_type() == at::kLong, op,
                "class_index must be a 1-D int64 tensor, got shape ", ci.sizes(), " dtype ",
                ci.scalar_type());
    c.class_index = ci.contiguous();
    c.N = ci.numel();
    if (c.N > 0) {
      // The kernels read weight rows at these ids: never trust them.
      const int64_t* p = c.class_index->data_ptr<int64_t>();
      const auto [lo, hi] = std::minmax_element(p, p + c.N);
      TORCH_CHECK(*lo >= 0 && *hi < c.C_total, op, "class_index values must lie in [0, ",
                  c.C_total, ") (weight has ", c.R, " rows / subcenters=", c.k, "), got min ", *lo,
                  " max ", *hi);
      if (need_unique_classes) {
        // Each gathered class's gradient rows are written by one chunk; a repeated id would race.
        std::vector<uint8_t> seen(static_cast<size_t>(c.C_total), 0);
        for (int64_t j = 0; j < c.N; ++j) {
          TORCH_CHECK(!seen[p[j]], op, "class_index must not repeat a class, ", p[j],
                      " appears more than once");
          seen[p[j]] = 1;
        }
      }
    }
  } else {
    c.N = c.C_total;
  }
  TORCH_CHECK(c.N > 0, op, "there are no class columns (weight has ", c.R,
              " rows and class_index is ", class_index.has_value() ? "empty" : "absent", ")");
  return c;
}

template <typename T>
Problem<T> make_problem(const Checked& c, double non_target_param, int64_t non_target,
                        double filter_threshold) {
  Problem<T> P;
  P.x = c.x_acc.data_ptr<T>();
  const auto xt = c.x.scalar_type(), wt = c.weight.scalar_type();
  P.weight = wt == c.acc ? c.weight.data_ptr<T>() : nullptr;
  P.weight_raw = c.weight.data_ptr();
  P.convert = nullptr;
  P.rounds = false;
  P.narrow = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    if (wt == at::kBFloat16) {
      P.convert = widen_rows<c10::BFloat16>;
      P.narrow = narrow_rows<c10::BFloat16>;
    } else if (wt == at::kHalf) {
      P.convert = widen_rows<c10::Half>;
      P.narrow = narrow_rows<c10::Half>;
    } else if (xt == at::kBFloat16) {
      P.convert = round_rows<c10::BFloat16>;
      P.rounds = true;
    } else if (xt == at::kHalf) {
      P.convert = round_rows<c10::Half>;
      P.rounds = true;
    }
  }
  P.labels = c.labels.data_ptr<int64_t>();
  P.target_logit = c.target_logit.data_ptr<T>();
  P.row_scale = c.row_scale.data_ptr<T>();
  P.threshold = c.threshold.data_ptr<T>();
  P.class_index = c.class_index.has_value() ? c.class_index->data_ptr<int64_t>() : nullptr;
  P.B = c.B;
  P.D = c.D;
  P.k = c.k;
  P.N = c.N;
  P.params.mode = static_cast<int>(non_target);
  P.params.param = static_cast<T>(non_target_param);
  P.params.filter = static_cast<T>(filter_threshold);
  P.chunk = choose_chunk(c.B, c.k, c.N, sizeof(T));
  P.num_chunks = (c.N + P.chunk - 1) / P.chunk;
  return P;
}

// Number of workspaces: one per thread that can have work.
template <typename T>
int64_t num_slices(const Problem<T>& P) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), P.num_chunks));
}

template <typename T>
void forward_impl(const Checked& c, const Problem<T>& P, Tensor& lse, Tensor& argmax) {
  const int64_t B = P.B, nch = P.num_chunks;
  const auto opts = c.x_acc.options();
  Tensor partials = at::empty({3, nch, B}, opts);
  Tensor best_col = at::empty({nch, B}, opts.dtype(at::kLong));
  ForwardPartials<T> out{partials[0].data_ptr<T>(), partials[1].data_ptr<T>(),
                         partials[2].data_ptr<T>(), best_col.data_ptr<int64_t>()};
  const int64_t slices = num_slices(P);
  const int64_t ws_size = Workspace<T>::size(P, false);
  Tensor scratch = at::empty({slices, ws_size}, opts);
  T* scratch_ptr = scratch.data_ptr<T>();
  // Chunks are handed out dynamically: the per-chunk partials make the result independent of
  // which thread computed what.
  std::atomic<int64_t> next{0};
  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t t = begin; t < end; ++t) {
      Workspace<T> ws(P, false, scratch_ptr + t * ws_size);
      for (int64_t chunk = next.fetch_add(1); chunk < nch; chunk = next.fetch_add(1)) {
        forward_chunk(P, ws, chunk, out);
      }
    }
  });

  lse = at::empty({B}, opts);
  argmax = at::empty({B}, opts.dtype(at::kLong));
  T* lse_p = lse.data_ptr<T>();
  int64_t* arg_p = argmax.data_ptr<int64_t>();
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < B; ++i) {
    T m = neg_inf;
    for (int64_t ch = 0; ch < nch; ++ch) m = std::max(m, out.max_z[ch * B + i]);
    const T shift = m == neg_inf ? T(0) : m;
    T sum = 0;
    T best = neg_inf;
    int64_t best_at = out.best_col[i];
    for (int64_t ch = 0; ch < nch; ++ch) {
      const int64_t at = ch * B + i;
      sum += out.sum_exp[at] * std::exp(out.max_z[at] - shift);
      if (out.best_cos[at] > best) {  // strict: the earlier chunk (smaller column) wins ties
        best = out.best_cos[at];
        best_at = out.best_col[at];
      }
    }
    lse_p[i] = shift + std::log(sum);
    arg_p[i] = best_at;
  }
}

template <typename T>
void backward_impl(const Checked& c, const Problem<T>& P, const Tensor& grad_lse, const Tensor& lse,
                   bool need_x, bool need_weight, Tensor& grad_x, Tensor& grad_weight, Tensor& grad_target,
                   Tensor& grad_scale) {
  const int64_t B = P.B, D = P.D, nch = P.num_chunks;
  const auto opts = c.x_acc.options();
  const auto w_opts = c.weight.options();
  // With class_index only the gathered classes' rows are written; the rest must be exactly 0.  An unwanted
  // gradient is an empty tensor: no C x D (or B x D) allocation, no matrix product.
  grad_weight = !need_weight ? at::empty({0}, w_opts)
                : P.class_index ? at::zeros({c.R, D}, w_opts) : at::empty({c.R, D}, w_opts);
  grad_target = at::zeros({B}, opts);
  Tensor scale_partial = at::empty({nch, B}, opts);
  const int64_t slices = num_slices(P);
  const int64_t ws_size = Workspace<T>::size(P, true);
  Tensor scratch = at::empty({slices, ws_size}, opts);
  T* scratch_ptr = scratch.data_ptr<T>();
  // grad_x is summed per group of consecutive chunks, in chunk order, then over the groups in
  // group order. Groups go to threads dynamically (a busy core only delays its current group);
  // the result depends on the number of groups, which is fixed for a given thread count.
  const int64_t groups = std::min<int64_t>(nch, 4 * std::max<int64_t>(1, at::get_num_threads()));
  Tensor grad_x_parts = need_x ? at::zeros({groups, B, D}, opts) : Tensor();
  T* gxp = need_x ? grad_x_parts.data_ptr<T>() : nullptr;
  const T* g = grad_lse.data_ptr<T>();
  const T* l = lse.data_ptr<T>();
  T* gt = grad_target.data_ptr<T>();
  T* gsp = scale_partial.data_ptr<T>();
  void* gw = need_weight ? grad_weight.data_ptr() : nullptr;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t t = begin; t < end; ++t) {
      Workspace<T> ws(P, true, scratch_ptr + t * ws_size);
      for (int64_t grp = next.fetch_add(1); grp < groups; grp = next.fetch_add(1)) {
        const int64_t first = grp * nch / groups, last = (grp + 1) * nch / groups;
        for (int64_t chunk = first; chunk < last; ++chunk) {
          backward_chunk(P, ws, chunk, g, l, gt, gsp, gw, need_x ? gxp + grp * B * D : nullptr);
        }
      }
    }
  });

  if (need_x && c.x.scalar_type() != c.acc) {
    // 16-bit x: the groups are summed in float32 into the first one, then cast once
    for (int64_t grp = 1; grp < groups; ++grp) {
      const T* part = gxp + grp * B * D;
      for (int64_t e = 0; e < B * D; ++e) gxp[e] += part[e];
    }
    grad_x = grad_x_parts[0].to(c.x.scalar_type());
  } else if (need_x) {
    grad_x = at::empty({B, D}, opts);  // not a view of the partials: they are freed on return
    T* gx = grad_x.data_ptr<T>();
    std::copy(gxp, gxp + B * D, gx);
    for (int64_t grp = 1; grp < groups; ++grp) {
      const T* part = gxp + grp * B * D;
      for (int64_t e = 0; e < B * D; ++e) gx[e] += part[e];
    }
  } else {
    grad_x = at::empty({0}, c.x.options());
  }
  grad_scale = at::empty({B}, opts);
  T* gs = grad_scale.data_ptr<T>();
  for (int64_t i = 0; i < B; ++i) {
    T sum = 0;
    for (int64_t ch = 0; ch < nch; ++ch) sum += gsp[ch * B + i];
    gs[i] = sum;
  }
}

std::tuple<Tensor, Tensor> fused_lse_cpu(const Tensor& x, const Tensor& weight,
                                         const Tensor& labels, const Tensor& target_logit,
                                         const Tensor& row_scale, const Tensor& threshold,
                                         const std::optional<Tensor>& class_index,
                                         const Tensor& non_target_param, int64_t non_target,
                                         double filter_threshold, int64_t subcenters,
                                         bool /*deterministic: always, see the file comment*/,
                                         int64_t /*switches: none read per call on the CPU*/) {
  const Checked c = check_inputs(x, weight, labels, target_logit, row_scale, threshold, class_index,
                                 non_target, subcenters, /*need_unique_classes=*/false);
  const double t = non_target_param_value(non_target_param, "marginops fused_lse (CPU): ");
  Tensor lse, argmax;
  if (c.B == 0) {
    return {at::empty({0}, x.options().dtype(c.acc)), at::empty({0}, x.options().dtype(at::kLong))};
  }
  AT_DISPATCH_FLOATING_TYPES(c.acc, "marginops_fused_lse_cpu", [&] {
    const auto P = make_problem<scalar_t>(c, t, non_target, filter_threshold);
    forward_impl<scalar_t>(c, P, lse, argmax);
  });
  return {lse, argmax};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_lse_backward_cpu(
    const Tensor& grad_lse, const Tensor& lse, const Tensor& x, const Tensor& weight,
    const Tensor& labels, const Tensor& target_logit, const Tensor& row_scale,
    const Tensor& threshold, const std::optional<Tensor>& class_index, const Tensor& non_target_param,
    int64_t non_target, double filter_threshold, int64_t subcenters, bool /*deterministic*/,
    bool need_grad_x, bool need_grad_weight, int64_t /*switches*/) {
  const Checked c = check_inputs(x, weight, labels, target_logit, row_scale, threshold, class_index,
                                 non_target, subcenters, /*need_unique_classes=*/true);
  const double t = non_target_param_value(non_target_param, "marginops fused_lse (CPU): ");
  check_vector(grad_lse, "grad_lse", c.B, c.acc);
  check_vector(lse, "lse", c.B, c.acc);
  const Tensor g = grad_lse.contiguous();
  const Tensor l = lse.contiguous();
  Tensor grad_x, grad_weight, grad_target, grad_scale;
  if (c.B == 0) {
    return {need_grad_x ? at::zeros_like(c.x) : at::empty({0}, c.x.options()),
            need_grad_weight ? at::zeros_like(c.weight) : at::empty({0}, c.weight.options()),
            at::zeros_like(c.target_logit), at::zeros_like(c.row_scale)};
  }
  AT_DISPATCH_FLOATING_TYPES(c.acc, "marginops_fused_lse_backward_cpu", [&] {
    const auto P = make_problem<scalar_t>(c, t, non_target, filter_threshold);
    backward_impl<scalar_t>(c, P, g, l, need_grad_x, need_grad_weight, grad_x, grad_weight, grad_target,
                            grad_scale);
  });
  return {grad_x, grad_weight, grad_target, grad_scale};
}

}  // namespace
}  // namespace marginops

TORCH_LIBRARY_IMPL(marginops, CPU, m) {
  m.impl("fused_lse", &marginops::fused_lse_cpu);
  m.impl("fused_lse_backward", &marginops::fused_lse_backward_cpu);
}
