// The class-chunked CUDA path: the shared chunk loop of csrc/chunk_loop.h (matrix products by cuBLAS through
// ATen) with the CUDA policy below, whose kernels are those of chunk_epilogue.cuh, per weight dtype (the epilogue
// reads and writes weight rows; x only meets the matrix products, so a float32 weight with 16-bit x, mixed
// precision, runs the float32 epilogue).
#include "chunk_epilogue.cuh"
#include "fused_lse_chunked.h"

namespace marginops {
namespace cuda {
namespace {

// The chunk loop's policy on a GPU: chunks in order on the calling thread (the kernels merge into running per-row
// state), large blocks (chunked::block_plan), 16-bit products with fp32 output, the chunk's rows as ATen views,
// gathers and casts on the stream.
template <class io_t, class T>
struct CudaChunks : detail::CudaEpilogue<io_t, T> {
  using Kernels = detail::CudaEpilogue<io_t, T>;

  struct Workspace {
    at::Tensor gathered;  // (Rc, D) weight dtype: the chunk's rows through class_index
    at::Tensor cast;      // (Rc, D) x's dtype: the chunk's float32 rows rounded for 16-bit products (mixed)
    at::Tensor W_hat;     // (Rc, D) fp16: the rows times 2^e_r, the dX operand of the fp16 gradient block
    at::Tensor U;         // (Rc, D) T: G^T x of the chunk
  };

  // chunks whose norms one launch computes (load): 8 bytes per row, 8 MiB at 64 chunks of 16384 rows; the
  // chunks run in order on one stream, so a later refill is ordered after every read of the previous one
  static constexpr int64_t kNormsAhead = 64;
  at::Tensor ahead_sumsq, ahead_inv;     // (rows) the norms of weight rows ahead_first .. ahead_first + ahead_rows
  int64_t ahead_first = 0, ahead_rows = 0;

  chunked::Plan plan(const chunked::Problem& P) const { return chunked::block_plan(P); }

  at::ScalarType product_dtype(const chunked::Problem& P) const { return P.x.scalar_type(); }

  Workspace workspace(const chunked::Problem& P, const chunked::Plan& plan, const chunked::Pass& pass) const {
    const int64_t rmax = plan.cols_per_chunk * P.k;
    Workspace ws;
    if (P.class_index.has_value()) ws.gathered = at::empty({rmax, P.D}, P.weight.options());
    if (P.weight.scalar_type() != P.x.scalar_type()) ws.cast = at::empty({rmax, P.D}, P.x.options());
    if (pass.fp16_grad && pass.need_x) ws.W_hat = at::empty({rmax, P.D}, P.x.options().dtype(at::kHalf));
    if (pass.need_weight) ws.U = at::empty({rmax, P.D}, P.x.options().dtype(chunked::acc_type(P)));
    return ws;
  }

  chunked::ChunkRows load(const chunked::Problem& P, Workspace& ws, const chunked::Chunk& ch,
                          const chunked::Pass& pass, at::Tensor& sumsq, at::Tensor& inv) {
    // the chunk's weight rows (k per class, in class order): a view of weight, or gathered through class_index
    // (the bounded gather of Partial FC)
    at::Tensor W;
    if (P.class_index.has_value()) {
      const at::Tensor blocks = P.weight.view({P.R / P.k, P.k * P.D});
      at::Tensor out = ws.gathered.narrow(0, 0, ch.rows).view({ch.cols, P.k * P.D});
      at::index_select_out(out, blocks, 0, P.class_index->narrow(0, ch.first_col, ch.cols));
      W = ws.gathered.narrow(0, 0, ch.rows);
    } else {
      W = P.weight.narrow(0, ch.first_col * P.k, ch.rows);
    }
    const at::Tensor Wh = ws.W_hat.defined() ? ws.W_hat.narrow(0, 0, ch.rows) : at::Tensor();
    // as the products see them: W itself, or W rounded into x's dtype
    const at::Tensor product = ws.cast.defined() ? ws.cast.narrow(0, 0, ch.rows).copy_(W) : W;
    const int64_t row0 = ch.first_col * P.k;
    if (Wh.defined() || P.class_index.has_value()) {
      Kernels::row_norms(W, sumsq, inv, Wh);  // W_hat from the same pass, or gathered rows: per chunk
      return {product, pass.fp16_grad ? Wh : W, W.data_ptr(), sumsq.data_ptr(), inv.data_ptr()};
    }
    // the weight's own rows and no W_hat: the norms of up to kNormsAhead chunks in one launch (the forward makes
    // three launches per chunk instead of four; the launches, not the bytes, are what the norms cost)
    if (row0 < ahead_first || row0 + ch.rows > ahead_first + ahead_rows) {
      ahead_rows = std::min(P.R - row0, kNormsAhead * ch.rows);  // (only the last chunk is shorter)
      ahead_first = row0;
      if (!ahead_sumsq.defined() || ahead_sumsq.numel() < ahead_rows) {
        ahead_sumsq = at::empty({ahead_rows}, sumsq.options());
        ahead_inv = at::empty({ahead_rows}, inv.options());
      }
      at::Tensor s = ahead_sumsq.narrow(0, 0, ahead_rows), v = ahead_inv.narrow(0, 0, ahead_rows);
      Kernels::row_norms(P.weight.narrow(0, row0, ahead_rows), s, v, at::Tensor());
    }
    const int64_t off = row0 - ahead_first;
    return {product, W, W.data_ptr(), ahead_sumsq.data_ptr<T>() + off, ahead_inv.data_ptr<T>() + off};
  }

  void forward(const chunked::EpiArgs<T>& a, Workspace&) { Kernels::forward(a); }
  void backward(const chunked::EpiArgs<T>& a, Workspace&) { Kernels::backward(a); }

  at::Tensor grad_rows(const chunked::Problem&, Workspace& ws, const chunked::Chunk& ch, at::Tensor&) const {
    return ws.U.narrow(0, 0, ch.rows);
  }

  void weight_rows(const chunked::WeightRowArgs<T>& a, Workspace&) { Kernels::weight_rows(a); }
};

template <class io_t, class T>
CudaChunks<io_t, T> policy(cudaStream_t stream, const at::TensorOptions& options) {
  CudaChunks<io_t, T> epi;
  epi.stream = stream;
  epi.options = options;  // the device of the epilogue's own workspace (column-split partials)
  return epi;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> chunked_forward(const chunked::Problem& P, cudaStream_t stream) {
  switch (P.weight.scalar_type()) {
    case at::kFloat: {
      auto epi = policy<float, float>(stream, P.x.options());
      return chunked::forward<float>(P, epi);
    }
    case at::kDouble: {
      auto epi = policy<double, double>(stream, P.x.options());
      return chunked::forward<double>(P, epi);
    }
    case at::kHalf: {
      auto epi = policy<__half, float>(stream, P.x.options());
      return chunked::forward<float>(P, epi);
    }
    case at::kBFloat16: {
      auto epi = policy<__nv_bfloat16, float>(stream, P.x.options());
      return chunked::forward<float>(P, epi);
    }
    default:
      TORCH_CHECK(false, "marginops.fused_lse (cuda, chunked): unsupported dtype ", P.x.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunked_backward(const chunked::Problem& P,
                                                                            const at::Tensor& grad_lse,
                                                                            const at::Tensor& lse, bool need_x,
                                                                            bool need_weight, cudaStream_t stream) {
  switch (P.weight.scalar_type()) {
    case at::kFloat: {
      auto epi = policy<float, float>(stream, P.x.options());
      return chunked::backward<float>(P, grad_lse, lse, need_x, need_weight, epi);
    }
    case at::kDouble: {
      auto epi = policy<double, double>(stream, P.x.options());
      return chunked::backward<double>(P, grad_lse, lse, need_x, need_weight, epi);
    }
    case at::kHalf: {
      auto epi = policy<__half, float>(stream, P.x.options());
      return chunked::backward<float>(P, grad_lse, lse, need_x, need_weight, epi);
    }
    case at::kBFloat16: {
      auto epi = policy<__nv_bfloat16, float>(stream, P.x.options());
      return chunked::backward<float>(P, grad_lse, lse, need_x, need_weight, epi);
    }
    default:
      TORCH_CHECK(false, "marginops.fused_lse (cuda, chunked): unsupported dtype ", P.x.scalar_type());
  }
}

int64_t chunked_gemm_flops() { return chunked::gemm_flop_counter().load(); }

}  // namespace cuda
}  // namespace marginops
