// Parameters of the fused CUDA kernels and the entry points of each path: the interface between the op layer
// (fused_lse_cuda.cpp: checks, allocation, dispatch) and the per-path files (fused_lse_<path>.cu).  Nothing
// here needs nvcc or torch, so the .cpp and the .cu files both include it.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace marginops {
namespace cuda {

// One kernel family per input dtype (and per fp32 math mode).
enum class KernelPath : int {
  kBf16 = 0,  // WMMA bf16 x bf16 -> fp32
  kFp16 = 1,  // WMMA fp16 x fp16 -> fp32
  kFp32 = 2,  // SIMT fp32 (exact fp32 FMA; the default for float32 inputs)
  kTf32 = 3,  // WMMA tf32 x tf32 -> fp32 (opt-in for float32 inputs: MARGINOPS_CUDA_TF32=1)
  kFp64 = 4,  // SIMT fp64
};

// Which kernel an occupancy query is about.
enum class KernelKind : int { kForward = 0, kBackwardW = 1, kBackwardX = 2 };

// Tile constants shared by the host planner and the kernels.
constexpr int kFwdBM = 64;    // x rows per forward CTA
constexpr int kFwdBN = 128;   // W-row slots per forward class tile (classes per tile = kFwdBN / k)
constexpr int kBwdBM = 64;    // x rows per backward row tile
constexpr int kBwdBN = 64;    // W-row slots per backward class tile (classes per tile = kBwdBN / k)
constexpr int kMaxSubcenters = kBwdBN;

// Width of the D-chunk a backward CTA accumulates (dW / dX accumulators live in registers).
inline int backward_dchunk(KernelPath p) { return p == KernelPath::kFp64 ? 128 : 512; }

struct FusedLseParams {
  // ---- inputs (device pointers; element types follow the path: io = x/weight dtype, acc = fp32 or fp64)
  const void* x = nullptr;             // (B, D) io
  const void* weight = nullptr;        // (R, D) io
  const int64_t* labels = nullptr;     // (B,)  column index or -1
  const void* target_logit = nullptr;  // (B,) acc
  const void* row_scale = nullptr;     // (B,) acc
  const void* threshold = nullptr;     // (B,) acc
  const int64_t* class_index = nullptr;  // (N,) or nullptr
  const void* grad_lse = nullptr;      // (B,) acc, backward only
  const void* lse = nullptr;           // (B,) acc, backward only (saved forward output)

  int64_t B = 0, D = 0, R = 0, N = 0, C_total = 0;
  int k = 1;                // subcenters
  int cpt_fwd = 1;          // classes per forward class tile  = kFwdBN / k
  int cpt_bwd = 1;          // classes per backward class tile = kBwdBN / k
  int n_tiles_bwd = 1;      // backward class tiles = ceil(N / cpt_bwd)
  double non_target_param = 0;  // the non-target mode's scalar (CurricularFace t)
  int non_target = 0;       // 0 plain, 1 CurricularFace
  double filter = 2.0;      // inter-class filter threshold (2 = off)
  bool vec = false;         // 16-byte global loads allowed (D * elem % 16 == 0 and 16-byte aligned bases)
  bool split_dcos = true;   // fp16 backward: dcos as hi + lo fp16 pair (fp32-accurate) vs one rounding
  int splits = 1;           // class splits (forward and backward-dX grids)
  int dchunks = 1;          // backward D chunks

  // ---- forward outputs and workspace
  void* lse_out = nullptr;       // (B,) acc
  int64_t* argmax_out = nullptr; // (B,)
  void* part_m = nullptr;        // (splits, B) acc: running max
  void* part_s = nullptr;        // (splits, B) acc: running sum of exp(z - m)
  void* part_c = nullptr;        // (splits, B) acc: best cosine
  int64_t* part_j = nullptr;     // (splits, B): best column

  // ---- backward outputs and workspace
  void* grad_x = nullptr;             // (B, D) io
  void* grad_weight = nullptr;        // (R, D) io (pre-zeroed by the caller when class_index is given)
  void* grad_target_logit = nullptr;  // (B,) acc
  void* grad_row_scale = nullptr;     // (B,) acc
  void* part_dx = nullptr;            // (splits, B, D) acc
  void* part_grs = nullptr;           // (splits, B) acc
  void* part_gtl = nullptr;           // (splits, B) acc

  cudaStream_t stream = nullptr;
};

// Entry points of each path, defined in fused_lse_<path>.cu (launch templates: fused_lse_launch.cuh).
// <path>_occupancy returns CTAs per SM for the kernel on the current device and its dynamic shared memory in
// *smem_bytes (the attribute is raised before the query).
int bf16_occupancy(KernelKind kind, int* smem_bytes);
void bf16_forward(const FusedLseParams& p);
void bf16_backward(const FusedLseParams& p);

int fp16_occupancy(KernelKind kind, int* smem_bytes);
void fp16_forward(const FusedLseParams& p);
void fp16_backward(const FusedLseParams& p);

int fp32_occupancy(KernelKind kind, int* smem_bytes);
void fp32_forward(const FusedLseParams& p);
void fp32_backward(const FusedLseParams& p);

int tf32_occupancy(KernelKind kind, int* smem_bytes);
void tf32_forward(const FusedLseParams& p);
void tf32_backward(const FusedLseParams& p);

int fp64_occupancy(KernelKind kind, int* smem_bytes);
void fp64_forward(const FusedLseParams& p);
void fp64_backward(const FusedLseParams& p);

}  // namespace cuda
}  // namespace marginops
