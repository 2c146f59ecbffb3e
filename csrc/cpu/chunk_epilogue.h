// Interface of the CPU epilogue kernels (csrc/cpu/chunk_epilogue.cpp): everything the fused op does to
// one class chunk after the matrix product x . W_chunk^T, row by row. The kernels are compiled for
// several x86 vector widths and picked at run time (see chunk_epilogue.cpp).
#pragma once

#include <cstdint>

#include "margin_math.h"

namespace marginops {
namespace cpu {

template <typename T>
struct ChunkRows {
  T* dots;           // B x (k * cols): x_i . w_r on entry; logits (forward) or dcos / n (backward)
  const T* inv;      // k * cols: 1 / max(||w_r||, eps)
  T* colsum;         // k * cols, zeroed by the caller: sum_i (dcos_ir / n_r) cos_ir (backward)
  int64_t B, cols, k;
  int64_t first_col;  // global column of the chunk's first column
  const int64_t* labels;
  const T* target_logit;
  const T* row_scale;
  const T* threshold;
  const T* grad_lse;  // backward
  const T* lse;       // backward
  NonTargetParams<T> params;
  // forward outputs, one per row: this chunk's log-sum-exp partial and argmax candidate
  T* max_z;
  T* sum_exp;
  T* best_cos;
  int64_t* best_col;  // global column
  // backward outputs, one per row
  T* grad_target;  // written only for rows whose label lies in this chunk
  T* grad_scale;   // this chunk's part of grad_row_scale
};

void forward_rows(const ChunkRows<float>& a);
void forward_rows(const ChunkRows<double>& a);
void backward_rows(const ChunkRows<float>& a);
void backward_rows(const ChunkRows<double>& a);

// sumsq[r] = ||w_r||^2 and inv[r] = 1 / max(||w_r||, eps) for rows x D row-major weights.
void row_norms(const float* w, int64_t rows, int64_t D, float* sumsq, float* inv);
void row_norms(const double* w, int64_t rows, int64_t D, double* sumsq, double* inv);

}  // namespace cpu
}  // namespace marginops
