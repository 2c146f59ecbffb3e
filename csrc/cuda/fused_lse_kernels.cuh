// Fused LSE kernels (docs/DESIGN.md §2, contract in marginops/ops.py):
//
//   forward   fwd_kernel     grid (row tiles of 64, class splits)      -> per-(split, row) partials
//             fwd_merge      one thread per row, splits in fixed order -> lse, argmax
//   backward  bwd_w_kernel   grid (class tiles of 64 W rows, D chunks) -> grad_weight (written once per row)
//             bwd_x_kernel   grid (row tiles, class splits, D chunks)  -> per-split dX / row-grad partials
//             bwd_reduce_*   splits summed in fixed order              -> grad_x, grad_row_scale, grad_target_logit
//
// Tiles.  Every kernel computes cosine tiles S = X_tile . W_tile^T with a K loop over D in chunks of
// Tr::BK, staged in shared memory by cp.async (two stages), on tensor cores (WMMA) for bf16 / fp16
// (and tf32 when opted in) and with a SIMT warp tile for fp32 / fp64.
//   forward : 256 threads, S tile 64 rows x 128 W-row slots (8 warps of 32 x 32), 2 CTAs / SM (16-bit)
//   backward: 256 threads, S tile 64 x 64 (8 warps of 16 x 32); dW / dX accumulators 64 x DC in registers
//             (8 warps of 32 x DC/4, DC = 512, 128 for fp64), 1 CTA / SM; D > DC runs D chunks in the grid
//             (each chunk recomputes S).  Register / shared-memory report: RESOURCES.md.  Launch templates:
//             fused_lse_launch.cuh; entry points per path: fused_lse_<path>.cu.
// W-row sums of squares are gathered from the staged W chunks inside the K loop (never a normalized
// copy of W); the epilogue applies 1/n.  A class tile is
// a set of "slots": slot s holds W row cls(col0 + s / k) * k + s % k, gathered through class_index by
// pointer (no copy); slots of a missing or out-of-range class are zero rows that are skipped.
//
// Backward.  dcos for a (row tile, class tile) is formed in shared memory from the recomputed tile:
//   dW[r] = (sum_i dcos_ir x_i) / n_r - (sum_i dcos_ir cos_r(i)) w_r / n_r^2
// bwd_w owns a class tile (and a D chunk) and loops over *all* row tiles inside the CTA, accumulating
// dcos^T X in registers: every W row is written by exactly one CTA, no atomics, deterministic.
//   dX[i] = sum_r dcos_ir w_r / n_r
// bwd_x owns a row tile and the class tiles split, split + splits, ... (a "split") and accumulates
// dcos W / n in registers, then writes one partial per split; a small kernel sums the splits in a
// fixed order.
// This is the default and the only dX mode: the partial buffer is splits x B x D floats (a few MB at
// B = 1024, D = 512), its reduction costs microseconds, and it makes every output bitwise reproducible
// run to run, so `deterministic=False` runs the same code (an atomicAdd variant would save nothing).
// Cost: two recomputations of S (one per backward kernel) -> 1 + 2 + 2 matmul-equivalents in total
// (x2 on the dW / dX products with the default split dcos for 16-bit inputs, see below).
//
// Precision of dcos for bf16 / fp16 inputs.  The dW / dX products run on tensor cores, so dcos must
// be a 16-bit operand; both products use fp16 operands (Tr::Prod), also for bf16 inputs, where x and
// the rescaled W rows (below) convert to fp16 with their bf16 precision (bar fp16 subnormals, entries below
// 2^-14 of the row's scale: negligible) and dcos keeps 11 mantissa bits instead of bf16's 8:
// within the docs/DESIGN.md §4 bound with one rounding (tests/test_op_suite.py measures it on the emulator), so
// bf16 pays one MMA per product step.  fp16 inputs have a reference 8x more precise to match: there dcos is stored as
// hi + lo (hi = round(v), lo = round(v - hi)) and both halves are multiplied (fp32-accurate, twice the
// tensor-core work of the two products); MARGINOPS_CUDA_FAST_BWD=1 keeps only hi.
// fp16 range: dcos is multiplied by S = 2^(15 - e), 2^e > |g * s| * max dphi (kScaleDcos; the products are
// divided by S in fp32), so |S * dcos| < 2^15 for any upstream gradient: in dW with one S from the largest
// |g_i s_i| (computed by every dW CTA), in dX with each row's own (a row's dX depends on its g only, so a
// row with a tiny upstream gradient keeps its precision).  The dX operand A = dcos / n_r could still overflow for
// tiny-norm rows (1/n up to 1e12), so it uses A = dcos * f_r and B = w_r * 2^e_r with 1/n_r = f_r * 2^e_r,
// f_r in [0.5, 1): exact scaling, |B| <= 2 |w_r / n_r|.

// Indexing: every row * D offset is int64; labels are only compared with column indices; class_index
// values outside [0, C_total) are skipped (the op layer and the Python layer reject them before the call).
// Requires sm_80+ (cp.async, bf16 WMMA); the op layer checks the device.
#pragma once

#include "fused_lse_common.cuh"

namespace marginops {
namespace cuda {
namespace detail {

// ------------------------------------------------------------------------------------------------
// Shared-memory layouts
// ------------------------------------------------------------------------------------------------
template <class Tr>
struct FwdLayout {
  using io_t = typename Tr::io_t;
  using acc_t = typename Tr::acc_t;
  static constexpr int BM = kFwdBM, BN = kFwdBN, NT = 256;
  static constexpr int WARPS_N = 4;            // 2 x 4 warps, 32 x 32 each
  static constexpr int FM = 2, FN = 2;
  static constexpr int TPR = NT / BM;          // epilogue threads per row (4)
  static constexpr int TPS = NT / BN;          // sum-of-squares threads per slot (2)
  static constexpr int PAD = 16 / static_cast<int>(sizeof(io_t));
  static constexpr int LDK = Tr::BK + PAD;     // stage row stride (elements)
  static constexpr int LDS = BN + 4;           // S tile row stride (acc_t), = TPR (mod 32): no bank conflicts
  static constexpr size_t kStageX = static_cast<size_t>(BM) * LDK * sizeof(io_t);
  static constexpr size_t kStageW = static_cast<size_t>(BN) * LDK * sizeof(io_t);
  static constexpr size_t kUnion = cmax(2 * (kStageX + kStageW), static_cast<size_t>(BM) * LDS * sizeof(acc_t));
  static constexpr size_t kWrowOff = align_up(kUnion, 128);
  static constexpr size_t kInvOff = align_up(kWrowOff + BN * sizeof(int64_t), 128);
  static constexpr size_t kSqOff = align_up(kInvOff + BN * sizeof(acc_t), 128);
  static constexpr size_t kBytes = align_up(kSqOff + NT * sizeof(acc_t), 128);
  static_assert(Tr::BK % TPS == 0, "sum-of-squares split");
  static_assert(BM * TPR == NT && BN * TPS == NT, "thread mapping");
  static_assert((BM / (16 * FM)) * (BN / (16 * FN)) == NT / 32, "warp tiling");
};

// Per-row scalars of a backward row tile, kept in shared memory (registers are reserved for the
// dW / dX accumulators).
template <class acc_t, int BM>
struct RowSmem {
  int64_t label[BM];
  acc_t tl[BM], rs[BM], thr[BM], g[BM], lse[BM];
  acc_t grs[BM * 8], gtl[BM * 8];  // dX kernel: private per-thread accumulators (thread tid owns [tid])
  acc_t dscale;                    // dW kernel: power of two applied to dcos in the product (kScaleDcos)
  acc_t xscale[BM];                // dX kernel: the same per row (a row's dX depends on its own g only)
};

template <class acc_t, int BM>
__device__ __forceinline__ void load_row_smem(RowSmem<acc_t, BM>* rsm, const FusedLseParams& p, int64_t i0) {
  for (int r = threadIdx.x; r < BM; r += blockDim.x) {
    const int64_t i = i0 + r;
    const bool ok = i < p.B;
    rsm->label[r] = ok ? p.labels[i] : int64_t(-1);
    rsm->tl[r] = ok ? static_cast<const acc_t*>(p.target_logit)[i] : acc_t(0);
    rsm->rs[r] = ok ? static_cast<const acc_t*>(p.row_scale)[i] : acc_t(0);
    rsm->thr[r] = ok ? static_cast<const acc_t*>(p.threshold)[i] : acc_t(0);
    rsm->g[r] = ok ? static_cast<const acc_t*>(p.grad_lse)[i] : acc_t(0);
    rsm->lse[r] = ok ? static_cast<const acc_t*>(p.lse)[i] : acc_t(0);
  }
}

template <class Tr>
struct BwdLayout {
  using io_t = typename Tr::io_t;
  using acc_t = typename Tr::acc_t;
  using prod_t = typename Tr::Prod::io_t;  // operand type of the dW / dX products
  // 256 threads (8 warps), so that a thread may hold up to 255 registers: the dW / dX accumulators of a
  // 64 x DC tile take 64 * DC / 256 of them (128 for DC = 512 fp32).
  static constexpr int BM = kBwdBM, BN = kBwdBN, NT = 256;
  static constexpr int NWARPS = NT / 32;
  static constexpr int TPR = NT / BM;          // epilogue threads per row (4)
  static constexpr int TPS = NT / BN;          // sum-of-squares / corr threads per slot (4)
  static constexpr int DC = Tr::DC;
  // S tile BM x BN: 4 x 2 warps of 16 x 32.
  static constexpr int S_WARPS_N = 2, S_FM = 1, S_FN = 2;
  // dW tile (BN slots x DC) and dX tile (BM rows x DC): 2 x 4 warps of 32 x DC/4.
  static constexpr int P_WARPS_N = 4, P_FM = 2, P_FN = DC / 64;
  static constexpr int PAD = 16 / static_cast<int>(sizeof(io_t));
  static constexpr int LDK = Tr::BK + PAD;     // S stage row stride
  static constexpr int PADP = 16 / static_cast<int>(sizeof(prod_t));
  static constexpr int LDB = DC + PADP;        // product stage row stride (prod_t)
  static constexpr int LDS = BN + 4;           // S tile (acc_t), = TPR (mod 32): conflict-free epilogue
  static constexpr int LDD = BN + PADP;        // dcos tile (prod_t)
  static constexpr size_t kStageS = 2 * static_cast<size_t>(BM + BN) * LDK * sizeof(io_t);
  static constexpr size_t kStageP = 2 * static_cast<size_t>(Tr::BKP) * LDB * sizeof(prod_t);
  static constexpr size_t kStaging = static_cast<size_t>(NWARPS) * 256 * sizeof(acc_t);
  static constexpr size_t kUnion = cmax(cmax(kStageS, kStageP), kStaging);
  static constexpr size_t kSsOff = align_up(kUnion, 128);
  static constexpr size_t kDchOff = align_up(kSsOff + static_cast<size_t>(BM) * LDS * sizeof(acc_t), 128);
  static constexpr size_t kDclOff = align_up(kDchOff + static_cast<size_t>(BM) * LDD * sizeof(prod_t), 128);
  static constexpr size_t kDclBytes = Tr::kSplit ? static_cast<size_t>(BM) * LDD * sizeof(prod_t) : 0;
  static constexpr size_t kWrowOff = align_up(kDclOff + kDclBytes, 128);
  static constexpr size_t kInvOff = align_up(kWrowOff + BN * sizeof(int64_t), 128);
  static constexpr size_t kAuxOff = kInvOff + BN * sizeof(acc_t);   // corr (dW) or A factor (dX)
  static constexpr size_t kAux2Off = kAuxOff + BN * sizeof(acc_t);  // projection flag (dW) or B scale (dX)
  static constexpr size_t kRowOff = align_up(kAux2Off + BN * sizeof(acc_t), 128);  // RowSmem<acc_t, BM>
  static constexpr size_t kSqOff = align_up(kRowOff + sizeof(RowSmem<acc_t, BM>), 128);
  static constexpr size_t kBytes = align_up(kSqOff + NT * sizeof(acc_t), 128);
  static_assert(BM * TPR == NT && BN * TPS == NT, "thread mapping");
  static_assert(NT <= BM * 8, "RowSmem row accumulators");
  static_assert((BM / 16 / S_FM) * (BN / 16 / S_FN) == NWARPS, "S warp tiling");
  static_assert((BM / 16 / P_FM) * P_WARPS_N == NWARPS && BN == BM, "product warp tiling");
  static_assert(Tr::BK % TPS == 0 || TPS % Tr::BK == 0, "sum-of-squares split");
  static_assert(BM % Tr::BKP == 0 && BN % Tr::BKP == 0, "product K chunks");
  static_assert(DC % 64 == 0, "D chunk");
};

// The shared-memory map of both backward kernels (offsets in BwdLayout).  The S stages, the product stages
// and the final staging alias one region: each is used only after the previous one is done.
template <class Tr>
struct BwdSmem {
  using L = BwdLayout<Tr>;
  using io_t = typename Tr::io_t;
  using acc_t = typename Tr::acc_t;
  using prod_t = typename L::prod_t;
  io_t* Xs;      // S stages: x rows, then W rows
  io_t* Ws;
  prod_t* Bs;    // product stages
  acc_t* stg;    // final accumulator staging, 256 values per warp
  acc_t* Ss;     // S tile
  prod_t* dch;   // dcos tile (hi) and its lo half
  prod_t* dcl;
  int64_t* wrow_s;  // slot -> W row
  acc_t* inv_s;     // slot -> 1 / n
  acc_t* aux_s;     // dW: corr per slot;            dX: A factor per slot
  acc_t* aux2_s;    // dW: projection flag per slot; dX: B scale per slot
  RowSmem<acc_t, L::BM>* rsm;
  acc_t* sq_s;      // per-thread scratch (sums of squares)

  __device__ __forceinline__ explicit BwdSmem(unsigned char* base)
      : Xs(reinterpret_cast<io_t*>(base)),
        Ws(reinterpret_cast<io_t*>(base) + 2 * L::BM * L::LDK),
        Bs(reinterpret_cast<prod_t*>(base)),
        stg(reinterpret_cast<acc_t*>(base)),
        Ss(reinterpret_cast<acc_t*>(base + L::kSsOff)),
        dch(reinterpret_cast<prod_t*>(base + L::kDchOff)),
        dcl(reinterpret_cast<prod_t*>(base + L::kDclOff)),
        wrow_s(reinterpret_cast<int64_t*>(base + L::kWrowOff)),
        inv_s(reinterpret_cast<acc_t*>(base + L::kInvOff)),
        aux_s(reinterpret_cast<acc_t*>(base + L::kAuxOff)),
        aux2_s(reinterpret_cast<acc_t*>(base + L::kAux2Off)),
        rsm(reinterpret_cast<RowSmem<acc_t, L::BM>*>(base + L::kRowOff)),
        sq_s(reinterpret_cast<acc_t*>(base + L::kSqOff)) {}
};

// Hand a warp's (16*FM) x (16*FN) accumulator tile, one 16 x 16 fragment at a time through the warp's
// 256-value staging slot `my`, to emit(row, col, vals): the lane's row of the fragment (row m0 + ..), its 8
// consecutive columns starting at col (n0 + ..) and their values.  Fragments at columns >= n_fill are skipped.
template <int FM, int FN, class Warp, class acc_t, class Emit>
__device__ __forceinline__ void drain_accumulator(const Warp& acc, acc_t* my, int m0, int n0, int n_fill, Emit emit) {
  const int lane = threadIdx.x & 31;
  const int r = lane >> 1, cb = (lane & 1) * 8;
#pragma unroll
  for (int fm = 0; fm < FM; ++fm) {
#pragma unroll
    for (int fn = 0; fn < FN; ++fn) {
      const int nf = n0 + fn * 16;
      if (nf < n_fill) {
        acc.store_frag(my, 16, fm, fn);
        __syncwarp();
        emit(m0 + fm * 16 + r, nf + cb, my + r * 16 + cb);
        __syncwarp();
      }
    }
  }
}

// Per-row scalars the epilogues need (one row per thread group).
template <class acc_t>
struct RowInfo {
  int64_t label = -1;
  acc_t tl = 0, rs = 0, thr = 0, g = 0, lse = 0;
};

template <class acc_t>
__device__ __forceinline__ RowInfo<acc_t> load_row_info(const FusedLseParams& p, int64_t i, bool backward) {
  RowInfo<acc_t> ri;
  ri.label = p.labels[i];
  ri.tl = static_cast<const acc_t*>(p.target_logit)[i];
  ri.rs = static_cast<const acc_t*>(p.row_scale)[i];
  ri.thr = static_cast<const acc_t*>(p.threshold)[i];
  if (backward) {
    ri.g = static_cast<const acc_t*>(p.grad_lse)[i];
    ri.lse = static_cast<const acc_t*>(p.lse)[i];
  }
  return ri;
}

// Fill the slot -> W row table of class tile starting at column col0 (cpt classes per tile).
template <int BN, int NT>
__device__ __forceinline__ void setup_slots(int64_t* wrow_s, const FusedLseParams& p, int64_t col0, int cpt) {
  for (int s = threadIdx.x; s < BN; s += NT) {
    const int q = s / p.k;
    const int u = s - q * p.k;
    const int64_t col = col0 + q;
    int64_t row = -1;
    if (q < cpt && col < p.N) {
      const int64_t cls = p.class_index != nullptr ? p.class_index[col] : col;
      if (cls >= 0 && cls < p.C_total) row = cls * p.k + u;
    }
    wrow_s[s] = row;
  }
}

// K loop of one S tile: acc += X[i0 .. i0+BM) . W[slots]^T over all of D.  When want_sq, also
// accumulates this thread's share of the staged W rows' sums of squares (slot tid / TPS, columns
// (tid % TPS) * BK / TPS ..) into sq_s[tid], a private shared-memory slot (no register next to the
// accumulators).  Ends with a __syncthreads (stages free for reuse).
template <class Tr, int BM, int BN, int NT, int LDK, int TPS, class Warp>
__device__ __forceinline__ void s_tile_loop(Warp& acc, typename Tr::io_t* Xs, typename Tr::io_t* Ws,
                                            const FusedLseParams& p, const int64_t* wrow_s, int64_t i0,
                                            int wm0, int wn0, bool want_sq, typename Tr::acc_t* sq_s) {
  using io_t = typename Tr::io_t;
  using acc_t = typename Tr::acc_t;
  constexpr int BK = Tr::BK;
  const io_t* x = static_cast<const io_t*>(p.x);
  const io_t* w = static_cast<const io_t*>(p.weight);
  const int64_t D = p.D;
  const int64_t B = p.B;
  const int nk = static_cast<int>((D + BK - 1) / BK);

  auto load_stage = [&](int stage, int64_t k0) {
    const int nv = static_cast<int>(D - k0 < BK ? D - k0 : BK);
    load_rows<io_t, BM, NT>(
        Xs + stage * BM * LDK, LDK,
        [&](int r) -> const io_t* {
          const int64_t i = i0 + r;
          return i < B ? x + i * D + k0 : nullptr;
        },
        nv, BK, p.vec);
    load_rows<io_t, BN, NT>(
        Ws + stage * BN * LDK, LDK,
        [&](int r) -> const io_t* {
          const int64_t wr = wrow_s[r];
          return wr >= 0 ? w + wr * D + k0 : nullptr;
        },
        nv, BK, p.vec);
  };

  constexpr int SQ_T = TPS <= BK ? TPS : BK;  // threads per slot that read (BK may be < TPS)
  constexpr int SQ_N = BK / SQ_T;
  const int sq_slot = threadIdx.x / TPS;
  const int sq_part = threadIdx.x % TPS;

  if (nk > 0) {
    load_stage(0, 0);
    cp_async_commit();
  }
  for (int kt = 0; kt < nk; ++kt) {
    if (kt + 1 < nk) {
      load_stage((kt + 1) & 1, static_cast<int64_t>(kt + 1) * BK);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const io_t* xs = Xs + (kt & 1) * BM * LDK;
    const io_t* ws = Ws + (kt & 1) * BN * LDK;
    if (want_sq && sq_part < SQ_T) {
      const io_t* rp = ws + sq_slot * LDK + sq_part * SQ_N;
      acc_t sq = sq_s[threadIdx.x];
#pragma unroll
      for (int e = 0; e < SQ_N; ++e) {
        const acc_t v = to_acc(rp[e]);
        sq += v * v;
      }
      sq_s[threadIdx.x] = sq;
    }
    acc.template mma<BK, true, false>(xs + wm0 * LDK, nullptr, LDK, ws + wn0 * LDK, LDK, BN);
    __syncthreads();
  }
}

// Reduce the per-thread sums of squares over the TPS consecutive lanes of a slot (fixed butterfly).
template <int TPS, class acc_t>
__device__ __forceinline__ acc_t reduce_sq(acc_t sq) {
#pragma unroll
  for (int off = 1; off < TPS; off <<= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
  return sq;
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
template <class Tr>
__global__ void __launch_bounds__(256, Tr::kFwdMinBlocks) fused_lse_fwd_kernel(const FusedLseParams p) {
  using L = FwdLayout<Tr>;
  using io_t = typename Tr::io_t;
  using acc_t = typename Tr::acc_t;
  constexpr int BM = L::BM, BN = L::BN, NT = L::NT, TPR = L::TPR, TPS = L::TPS, LDK = L::LDK, LDS = L::LDS;

  extern __shared__ __align__(128) unsigned char smem[];
  io_t* Xs = reinterpret_cast<io_t*>(smem);
  io_t* Ws = reinterpret_cast<io_t*>(smem + 2 * L::kStageX);
  acc_t* Ss = reinterpret_cast<acc_t*>(smem);  // aliases the stages (used after the K loop)
  int64_t* wrow_s = reinterpret_cast<int64_t*>(smem + L::kWrowOff);
  acc_t* inv_s = reinterpret_cast<acc_t*>(smem + L::kInvOff);
  acc_t* sq_s = reinterpret_cast<acc_t*>(smem + L::kSqOff);

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int split = blockIdx.y;
  const int k = p.k;
  const int cpt = p.cpt_fwd;
  const int n_tiles = static_cast<int>((p.N + cpt - 1) / cpt);  // N < 2^31 (host check)
  const int t_begin = static_cast<int>(static_cast<int64_t>(n_tiles) * split / p.splits);
  const int t_end = static_cast<int>(static_cast<int64_t>(n_tiles) * (split + 1) / p.splits);

  const int erow = tid / TPR, esub = tid % TPR;
  const int64_t ei = i0 + erow;
  const bool erow_ok = ei < p.B;
  RowInfo<acc_t> ri;
  if (erow_ok) ri = load_row_info<acc_t>(p, ei, false);
  const NonTargetParams<acc_t> np{p.non_target, static_cast<acc_t>(p.non_target_param), static_cast<acc_t>(p.filter)};

  acc_t m = neg_inf<acc_t>(), s = acc_t(0), bc = neg_inf<acc_t>();
  int64_t bj = INT64_MAX;

  WarpMma<Tr, L::FM, L::FN> wm;
  const int wm0 = (warp / L::WARPS_N) * 16 * L::FM;
  const int wn0 = (warp % L::WARPS_N) * 16 * L::FN;

  for (int t = t_begin; t < t_end; ++t) {
    const int64_t col0 = static_cast<int64_t>(t) * cpt;
    setup_slots<BN, NT>(wrow_s, p, col0, cpt);
    __syncthreads();

    wm.zero();
    sq_s[tid] = acc_t(0);
    s_tile_loop<Tr, BM, BN, NT, LDK, TPS>(wm, Xs, Ws, p, wrow_s, i0, wm0, wn0, true, sq_s);

    wm.store(Ss + wm0 * LDS + wn0, LDS);
    const acc_t sq = reduce_sq<TPS>(sq_s[tid]);
    if (tid % TPS == 0) inv_s[tid / TPS] = inv_row_norm(sq);
    __syncthreads();

    if (erow_ok) {
      const acc_t* srow = Ss + erow * LDS;
      for (int q = esub; q < cpt; q += TPR) {
        const int64_t col = col0 + q;
        if (col >= p.N) break;
        const int s0 = q * k;
        if (wrow_s[s0] < 0) continue;
        acc_t c = srow[s0] * inv_s[s0];
        for (int u = 1; u < k; ++u) {
          const acc_t v = srow[s0 + u] * inv_s[s0 + u];
          if (sub_better(v, c)) c = v;
        }
        if (arg_better(c, col, bc, bj)) {
          bc = c;
          bj = col;
        }
        acc_t z;
        if (col == ri.label) {
          z = ri.tl;
        } else {
          acc_t dphi;
          z = ri.rs * nontarget_phi(c, ri.thr, np, &dphi);
        }
        lse_add(m, s, z);
      }
    }
    __syncthreads();  // Ss / wrow_s reused by the next tile
  }

  // Combine the TPR threads of a row (consecutive lanes), fixed butterfly order.
#pragma unroll
  for (int off = 1; off < TPR; off <<= 1) {
    const acc_t m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const acc_t s2 = __shfl_xor_sync(0xffffffffu, s, off);
    const acc_t c2 = __shfl_xor_sync(0xffffffffu, bc, off);
    const int64_t j2 = __shfl_xor_sync(0xffffffffu, bj, off);
    lse_merge(m, s, m2, s2);
    if (arg_better(c2, j2, bc, bj)) {
      bc = c2;
      bj = j2;
    }
  }
  if (erow_ok && esub == 0) {
    const int64_t o = static_cast<int64_t>(split) * p.B + ei;
    static_cast<acc_t*>(p.part_m)[o] = m;
    static_cast<acc_t*>(p.part_s)[o] = s;
    static_cast<acc_t*>(p.part_c)[o] = bc;
    p.part_j[o] = bj;
  }
}

template <class acc_t>
__global__ void fused_lse_fwd_merge_kernel(const FusedLseParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.B) return;
  acc_t m = neg_inf<acc_t>(), s = acc_t(0), bc = neg_inf<acc_t>();
  int64_t bj = INT64_MAX;
  for (int sp = 0; sp < p.splits; ++sp) {
    const int64_t o = static_cast<int64_t>(sp) * p.B + i;
    lse_merge(m, s, static_cast<const acc_t*>(p.part_m)[o], static_cast<const acc_t*>(p.part_s)[o]);
    const acc_t c2 = static_cast<const acc_t*>(p.part_c)[o];
    const int64_t j2 = p.part_j[o];
    if (arg_better(c2, j2, bc, bj)) {
      bc = c2;
      bj = j2;
    }
  }
  static_cast<acc_t*>(p.lse_out)[i] = m + log_acc(s);
  p.argmax_out[i] = bj == INT64_MAX ? 0 : bj;
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

// Store v into the dcos tile (product operand type) as hi (+ lo when split); returns what it holds (hi, or hi + lo).
template <class Tr>
__device__ __forceinline__ typename Tr::acc_t store_dcos(typename Tr::Prod::io_t* hi, typename Tr::Prod::io_t* lo,
                                                         typename Tr::acc_t v, bool split) {
  using prod_t = typename Tr::Prod::io_t;
  const prod_t h = Conv<prod_t>::from(v);
  *hi = h;
  if constexpr (Tr::kSplit) {
    if (split) {
      const prod_t l = Conv<prod_t>::from(v - to_acc(h));
      *lo = l;
      return to_acc(h) + to_acc(l);
    }
  }
  return to_acc(h);
}

// The power of two S = 2^(15 - e) with bound < 2^e: |S * v| < 2^15 for |v| <= bound, so fp16 product operands
// keep their precision and cannot overflow.  1 for a bound of 0, inf or NaN (NaN / inf then propagate).
template <class acc_t>
__device__ __forceinline__ acc_t fp16_operand_scale(acc_t bound) {
  if (!(bound > acc_t(0) && bound < static_cast<acc_t>(INFINITY))) return acc_t(1);
  int e = 0;
  frexp(bound, &e);  // bound < 2^e
  e = 15 - e;
  return ldexp(acc_t(1), e < -100 ? -100 : (e > 100 ? 100 : e));
}

// max |dphi| of the non-target epilogue (margin_math.h nontarget_max_abs_dphi).
template <class acc_t>
__device__ __forceinline__ acc_t max_dphi(const FusedLseParams& p) {
  return nontarget_max_abs_dphi(p.non_target, static_cast<acc_t>(p.non_target_param));
}

// dW kernel: the power of two S that dcos is multiplied by before it becomes an fp16 product operand
// (kScaleDcos; 1 otherwise), from |dcos| = |g * p * s * dphi| <= max_i |g_i s_i| * max dphi.  The rows are
// the product's K dimension, so one S for all of them: every dW CTA computes it from all rows (a few loads
// per row, order-independent: deterministic) into rsm->dscale.  Uses scratch[0 .. NT).  Ends with a
// __syncthreads.
template <class Tr, int NT, class RowSmemT>
__device__ __forceinline__ void compute_dcos_scale(const FusedLseParams& p, RowSmemT* rsm,
                                                   typename Tr::acc_t* scratch) {
  using acc_t = typename Tr::acc_t;
  if constexpr (!Tr::kScaleDcos) {
    if (threadIdx.x == 0) rsm->dscale = acc_t(1);
  } else {
    const acc_t* g = static_cast<const acc_t*>(p.grad_lse);
    const acc_t* rs = static_cast<const acc_t*>(p.row_scale);
    acc_t m = acc_t(0);
    for (int64_t i = threadIdx.x; i < p.B; i += NT) m = fmax(m, fabs(g[i] * rs[i]));  // fmax drops NaN
    scratch[threadIdx.x] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int t = 1; t < NT; ++t) m = fmax(m, scratch[t]);
      rsm->dscale = fp16_operand_scale(m * max_dphi<acc_t>(p));
    }
  }
  __syncthreads();
}

// dX kernel: per-row scales of the row tile into rsm->xscale, by the thread that loaded the row in
// load_row_smem (same mapping: no barrier needed between the two).
template <class Tr, int BM, class RowSmemT>
__device__ __forceinline__ void compute_row_scales(const FusedLseParams& p, RowSmemT* rsm) {
  using acc_t = typename Tr::acc_t;
  for (int r = threadIdx.x; r < BM; r += blockDim.x) {
    rsm->xscale[r] = Tr::kScaleDcos ? fp16_operand_scale(fabs(rsm->g[r] * rsm->rs[r]) * max_dphi<acc_t>(p))
                                    : acc_t(1);
  }
}

// dcos of one (row tile, class tile) from the recomputed raw dot products Ss.  Every slot of the
// tile is written (zeros where nothing flows), so the MMA that follows can read the whole tile.
//   FOR_DX = false (dW kernel): dcos tile = dc * S; Ss[row][slot] <- dc * cos (for the Jacobian term).
//   FOR_DX = true  (dX kernel): dcos tile = dc * a_scale[slot] * S_row (a_scale: 1/n, or its fp16 fraction);
//                               grs += dz * phi, gtl += g * p at the target column.
template <class Tr, int BM, int BN, int TPR, int LDS, int LDD, bool FOR_DX>
__device__ __forceinline__ void bwd_tile_epilogue(typename Tr::acc_t* Ss, const typename Tr::acc_t* inv_s,
                                                  const typename Tr::acc_t* a_scale, const int64_t* wrow_s,
                                                  typename Tr::Prod::io_t* dch, typename Tr::Prod::io_t* dcl, bool split,
                                                  int erow, int esub, bool erow_ok,
                                                  const RowSmem<typename Tr::acc_t, BM>* rsm,
                                                  const NonTargetParams<typename Tr::acc_t>& np, int64_t col0,
                                                  int cpt, int k, int64_t N, typename Tr::acc_t& grs,
                                                  typename Tr::acc_t& gtl) {
  using acc_t = typename Tr::acc_t;
  using prod_t = typename Tr::Prod::io_t;
  acc_t* srow = Ss + erow * LDS;
  prod_t* hrow = dch + erow * LDD;
  prod_t* lrow = dcl + erow * LDD;
  const acc_t dscale = !Tr::kScaleDcos ? acc_t(1) : (FOR_DX ? rsm->xscale[erow] : rsm->dscale);
  for (int q = esub; q * k < BN; q += TPR) {
    const int s0 = q * k;
    const int nsub = (BN - s0) < k ? (BN - s0) : k;
    const int64_t col = col0 + q;
    const bool ok = erow_ok && q < cpt && col < N && wrow_s[s0] >= 0;
    int sub = 0;
    acc_t c = acc_t(0), dc = acc_t(0);
    if (ok) {
      c = srow[s0] * inv_s[s0];
      for (int u = 1; u < k; ++u) {
        const acc_t v = srow[s0 + u] * inv_s[s0 + u];
        if (sub_better(v, c)) {
          c = v;
          sub = u;
        }
      }
      const acc_t g = rsm->g[erow], lse = rsm->lse[erow];
      if (col == rsm->label[erow]) {
        if (FOR_DX) gtl += g * exp_acc(rsm->tl[erow] - lse);
      } else if (!(c > np.filter)) {
        acc_t dphi;
        const acc_t rs = rsm->rs[erow];
        const acc_t phi = nontarget_phi(c, rsm->thr[erow], np, &dphi);
        const acc_t dz = g * exp_acc(rs * phi - lse);
        if (FOR_DX) grs += dz * phi;
        dc = dz * rs * dphi;
      }
    }
    for (int u = 0; u < nsub; ++u) {
      const int sl = s0 + u;
      acc_t v = u == sub ? dc : acc_t(0);
      if (FOR_DX) v *= a_scale[sl];
      const acc_t held = store_dcos<Tr>(hrow + sl, lrow + sl, v * dscale, split);
      if (!FOR_DX) {
        // dcos * cos of this W row, from the dcos the dW product multiplies (rounded to its operand type): the
        // product and this projection term then cancel along w as in exact arithmetic (with D = 1 that is all
        // of grad_weight).  Exactly 0 for the other subcenters (0 * c would turn a NaN / inf winning cosine
        // into NaN in their Jacobian term).
        srow[sl] = u == sub ? held / dscale * c : acc_t(0);
      }
    }
  }
}

// acc ((16*FM) x (16*FN) warp tile at rows a_m0 of A, columns wn0 of B) += A[:, 0..KTOT) . Bstage, with the
// B rows streamed from global memory in chunks of BKP rows (two stages).  A and the stages hold the product
// operand type Tr::Prod::io_t; brow(r) is the global address (io_t) of row r's window (or nullptr) and
// bscale(r) its power-of-two scale (SCALE_B).  Rows that need a conversion or a scale are staged with plain
// loads, the others with cp.async.  Ends with a __syncthreads.
template <class Tr, int KTOT, int NT, int LDB, bool A_ROW, bool SCALE_B, class Warp, class RowFn, class ScaleFn>
__device__ __forceinline__ void product_loop(Warp& acc, const typename Tr::Prod::io_t* A,
                                             const typename Tr::Prod::io_t* A2, int lda, int a_m0,
                                             typename Tr::Prod::io_t* Bs, RowFn brow, ScaleFn bscale, int n_valid,
                                             int n_fill, bool vec, int wn0) {
  using io_t = typename Tr::io_t;
  using prod_t = typename Tr::Prod::io_t;
  constexpr bool kConvert = SCALE_B || !std::is_same<io_t, prod_t>::value;
  constexpr int BKP = Tr::BKP;
  constexpr int NKK = KTOT / BKP;
  auto load_stage = [&](int stage, int kk) {
    prod_t* dst = Bs + stage * BKP * LDB;
    auto rowfn = [&](int r) -> const io_t* { return brow(kk * BKP + r); };
    if constexpr (kConvert) {
      load_rows_convert<io_t, prod_t, BKP, NT>(
          dst, LDB, rowfn, [&](int r) { return SCALE_B ? bscale(kk * BKP + r) : 1.0f; }, n_valid, n_fill);
    } else {
      load_rows<io_t, BKP, NT>(dst, LDB, rowfn, n_valid, n_fill, vec);
    }
  };
  load_stage(0, 0);
  cp_async_commit();
#pragma unroll 1
  for (int kk = 0; kk < NKK; ++kk) {
    if (kk + 1 < NKK) {
      load_stage((kk + 1) & 1, kk + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const prod_t* bs = Bs + (kk & 1) * BKP * LDB;
    const int a_off = A_ROW ? a_m0 * lda + kk * BKP : (kk * BKP) * lda + a_m0;
    acc.template mma<BKP, A_ROW, true>(A + a_off, A2 != nullptr ? A2 + a_off : nullptr, lda, bs + wn0, LDB,
                                       n_fill - wn0);
    __syncthreads();
  }
}

// grad_weight for one class tile (BN W-row slots) and one D chunk; loops over all row tiles.
template <class Tr>
__global__ void __launch_bounds__(256, 1) fused_lse_bwd_w_kernel(const FusedLseParams p) {
  using L = BwdLayout<Tr>;
  using io_t = typename Tr::io_t;
  using acc_t = typename Tr::acc_t;
  using prod_t = typename L::prod_t;
  constexpr int BM = L::BM, BN = L::BN, NT = L::NT, TPR = L::TPR, TPS = L::TPS;
  constexpr int LDK = L::LDK, LDB = L::LDB, LDS = L::LDS, LDD = L::LDD, DC = L::DC;

  extern __shared__ __align__(128) unsigned char smem[];
  const BwdSmem<Tr> sm(smem);
  io_t *Xs = sm.Xs, *Ws = sm.Ws;
  prod_t *Bs = sm.Bs, *dch = sm.dch, *dcl = sm.dcl;
  acc_t *Ss = sm.Ss, *inv_s = sm.inv_s, *sq_s = sm.sq_s;
  acc_t* corr_s = sm.aux_s;
  acc_t* proj_s = sm.aux2_s;
  const int64_t* wrow_s = sm.wrow_s;
  RowSmem<acc_t, BM>* rsm = sm.rsm;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * p.cpt_bwd;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * DC;
  const int64_t D = p.D;
  const int n_valid = static_cast<int>(D - d0 < DC ? D - d0 : DC);
  const int n_fill = ((n_valid + 15) / 16) * 16;
  const bool split = Tr::kSplit && p.split_dcos;
  const io_t* x = static_cast<const io_t*>(p.x);
  const io_t* w = static_cast<const io_t*>(p.weight);

  setup_slots<BN, NT>(sm.wrow_s, p, col0, p.cpt_bwd);
  if (tid < BN) corr_s[tid] = acc_t(0);
  compute_dcos_scale<Tr, NT>(p, rsm, sq_s);  // ends with a __syncthreads

  WarpMma<Tr, L::S_FM, L::S_FN> sw;
  const int s_m0 = (warp / L::S_WARPS_N) * 16 * L::S_FM, s_n0 = (warp % L::S_WARPS_N) * 16 * L::S_FN;
  WarpMma<typename Tr::Prod, L::P_FM, L::P_FN> dw;  // rows = slots, columns = d0 + ...
  const int w_m0 = (warp / L::P_WARPS_N) * 16 * L::P_FM, w_n0 = (warp % L::P_WARPS_N) * (DC / L::P_WARPS_N);
  dw.zero();

  const int erow = tid / TPR, esub = tid % TPR;
  const NonTargetParams<acc_t> np{p.non_target, static_cast<acc_t>(p.non_target_param), static_cast<acc_t>(p.filter)};
  const int64_t row_tiles = (p.B + BM - 1) / BM;
  acc_t unused_grs = acc_t(0), unused_gtl = acc_t(0);

  for (int64_t rt = 0; rt < row_tiles; ++rt) {
    const int64_t i0 = rt * BM;
    load_row_smem<acc_t, BM>(rsm, p, i0);  // read after the __syncthreads below
    sw.zero();
    sq_s[tid] = acc_t(0);
    s_tile_loop<Tr, BM, BN, NT, LDK, TPS>(sw, Xs, Ws, p, wrow_s, i0, s_m0, s_n0, rt == 0, sq_s);
    sw.store(Ss + s_m0 * LDS + s_n0, LDS);
    if (rt == 0) {
      const acc_t sq = reduce_sq<TPS>(sq_s[tid]);
      if (tid % TPS == 0) {
        inv_s[tid / TPS] = inv_row_norm(sq);
        proj_s[tid / TPS] = norm_has_projection(sq) ? acc_t(1) : acc_t(0);
      }
    }
    __syncthreads();

    const bool erow_ok = i0 + erow < p.B;
    bwd_tile_epilogue<Tr, BM, BN, TPR, LDS, LDD, false>(Ss, inv_s, nullptr, wrow_s, dch, dcl, split, erow, esub,
                                                        erow_ok, rsm, np, col0, p.cpt_bwd, p.k, p.N, unused_grs,
                                                        unused_gtl);
    __syncthreads();

    // corr[slot] += sum over the tile's rows of dcos * cos (fixed order: TPS lanes, then butterfly).
    {
      const int slot = tid / TPS, part = tid % TPS;
      acc_t v = acc_t(0);
      for (int r = part; r < BM; r += TPS) v += Ss[r * LDS + slot];
      v = reduce_sq<TPS>(v);
      if (part == 0) corr_s[slot] += v;
    }

    // dW[slots, d0 ..) += dcos^T . X[i0 .. i0+BM, d0 ..)
    product_loop<Tr, BM, NT, LDB, /*A_ROW=*/false, /*SCALE_B=*/false>(
        dw, dch, split ? dcl : nullptr, LDD, w_m0, Bs,
        [&](int r) -> const io_t* {
          const int64_t i = i0 + r;
          return i < p.B ? x + i * D + d0 : nullptr;
        },
        [](int) { return 1.0f; }, n_valid, n_fill, p.vec, w_n0);
  }
  __syncthreads();

  // grad_weight = acc / (S n) - corr * w / n^2 (projection term only when ||w|| > eps).
  io_t* gw = static_cast<io_t*>(p.grad_weight);
  const acc_t unscale = Tr::kScaleDcos ? acc_t(1) / rsm->dscale : acc_t(1);  // exact: a power of two
  drain_accumulator<L::P_FM, L::P_FN>(dw, sm.stg + warp * 256, w_m0, w_n0, n_fill,
                                      [&](int slot, int col, const acc_t* vals) {
    const int64_t wr = wrow_s[slot];
    if (wr < 0) return;
    const acc_t inv = inv_s[slot];
    const acc_t inv_acc = inv * unscale;
    const acc_t corr = proj_s[slot] != acc_t(0) ? corr_s[slot] : acc_t(0);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int64_t d = d0 + col + e;
      if (d < D) {
        const acc_t wv = to_acc(w[wr * D + d]);
        gw[wr * D + d] = Conv<io_t>::from(vals[e] * inv_acc - corr * wv * inv * inv);
      }
    }
  });
}

// dX partial (and row-gradient partials) for one row tile, one class split and one D chunk.
template <class Tr>
__global__ void __launch_bounds__(256, 1) fused_lse_bwd_x_kernel(const FusedLseParams p) {
  using L = BwdLayout<Tr>;
  using io_t = typename Tr::io_t;
  using acc_t = typename Tr::acc_t;
  using prod_t = typename L::prod_t;
  constexpr int BM = L::BM, BN = L::BN, NT = L::NT, TPR = L::TPR, TPS = L::TPS;
  constexpr int LDK = L::LDK, LDB = L::LDB, LDS = L::LDS, LDD = L::LDD, DC = L::DC;

  extern __shared__ __align__(128) unsigned char smem[];
  const BwdSmem<Tr> sm(smem);
  io_t *Xs = sm.Xs, *Ws = sm.Ws;
  prod_t *Bs = sm.Bs, *dch = sm.dch, *dcl = sm.dcl;
  acc_t *Ss = sm.Ss, *inv_s = sm.inv_s, *sq_s = sm.sq_s;
  acc_t* ascale_s = sm.aux_s;
  acc_t* bscale_s = sm.aux2_s;
  int64_t* wrow_s = sm.wrow_s;
  RowSmem<acc_t, BM>* rsm = sm.rsm;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int split_id = blockIdx.y;
  const int64_t d0 = static_cast<int64_t>(blockIdx.z) * DC;
  const int64_t D = p.D;
  const int n_valid = static_cast<int>(D - d0 < DC ? D - d0 : DC);
  const int n_fill = ((n_valid + 15) / 16) * 16;
  const bool split = Tr::kSplit && p.split_dcos;
  const io_t* w = static_cast<const io_t*>(p.weight);

  const int erow = tid / TPR, esub = tid % TPR;
  const int64_t ei = i0 + erow;
  const bool erow_ok = ei < p.B;
  load_row_smem<acc_t, BM>(rsm, p, i0);  // read after the first __syncthreads of the tile loop
  const NonTargetParams<acc_t> np{p.non_target, static_cast<acc_t>(p.non_target_param), static_cast<acc_t>(p.filter)};
  compute_row_scales<Tr, BM>(p, rsm);     // read after the first __syncthreads of the tile loop
  rsm->grs[tid] = acc_t(0);  // private per-thread accumulators
  rsm->gtl[tid] = acc_t(0);

  WarpMma<Tr, L::S_FM, L::S_FN> sw;
  const int s_m0 = (warp / L::S_WARPS_N) * 16 * L::S_FM, s_n0 = (warp % L::S_WARPS_N) * 16 * L::S_FN;
  WarpMma<typename Tr::Prod, L::P_FM, L::P_FN> dx;  // rows = x rows, columns = d0 + ...
  const int x_m0 = (warp / L::P_WARPS_N) * 16 * L::P_FM, x_n0 = (warp % L::P_WARPS_N) * (DC / L::P_WARPS_N);
  dx.zero();

  // This split's class tiles: split_id, split_id + splits, ... < n_tiles_bwd.  N < 2^31 (host check).
  for (int t = split_id; t < p.n_tiles_bwd; t += p.splits) {
    const int64_t col0 = static_cast<int64_t>(t) * p.cpt_bwd;
    setup_slots<BN, NT>(wrow_s, p, col0, p.cpt_bwd);
    __syncthreads();

    sw.zero();
    sq_s[tid] = acc_t(0);
    s_tile_loop<Tr, BM, BN, NT, LDK, TPS>(sw, Xs, Ws, p, wrow_s, i0, s_m0, s_n0, true, sq_s);
    sw.store(Ss + s_m0 * LDS + s_n0, LDS);
    const acc_t sq = reduce_sq<TPS>(sq_s[tid]);
    if (tid % TPS == 0) {
      const int sl = tid / TPS;
      const acc_t inv = inv_row_norm(sq);
      inv_s[sl] = inv;
      if constexpr (Tr::kScaleW) {
        int e = 0;
        const acc_t f = frexp(inv, &e);  // inv = f * 2^e, f in [0.5, 1)
        ascale_s[sl] = f;
        bscale_s[sl] = ldexp(acc_t(1), e);
      } else {
        ascale_s[sl] = inv;
        bscale_s[sl] = acc_t(1);
      }
    }
    __syncthreads();

    bwd_tile_epilogue<Tr, BM, BN, TPR, LDS, LDD, true>(Ss, inv_s, ascale_s, wrow_s, dch, dcl, split, erow, esub,
                                                       erow_ok, rsm, np, col0, p.cpt_bwd, p.k, p.N, rsm->grs[tid],
                                                       rsm->gtl[tid]);
    __syncthreads();

    // dX[rows, d0 ..) += (dcos / n)[rows, slots] . W[slots, d0 ..)
    product_loop<Tr, BN, NT, LDB, /*A_ROW=*/true, /*SCALE_B=*/Tr::kScaleW>(
        dx, dch, split ? dcl : nullptr, LDD, x_m0, Bs,
        [&](int r) -> const io_t* {
          const int64_t wr = wrow_s[r];
          return wr >= 0 ? w + wr * D + d0 : nullptr;
        },
        [&](int r) { return static_cast<float>(bscale_s[r]); }, n_valid, n_fill, p.vec, x_n0);
  }
  __syncthreads();

  // Partial dX of this split (every element of the row tile x D chunk is written, zeros included).
  acc_t* pdx = static_cast<acc_t*>(p.part_dx);
  const int64_t B = p.B;  // a copy: capturing the kernel parameter p by reference would copy it to local memory
  drain_accumulator<L::P_FM, L::P_FN>(dx, sm.stg + warp * 256, x_m0, x_n0, n_fill,
                                      [&](int row, int col, const acc_t* vals) {
    const int64_t i = i0 + row;
    if (i >= B) return;
    const acc_t unscale = Tr::kScaleDcos ? acc_t(1) / rsm->xscale[row] : acc_t(1);  // exact: a power of two
    const int64_t base = (static_cast<int64_t>(split_id) * B + i) * D;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int64_t d = d0 + col + e;
      if (d < D) pdx[base + d] = vals[e] * unscale;
    }
  });

  // Row-gradient partials: sum the TPR threads of a row (fixed butterfly), D chunk 0 writes.
  acc_t grs = rsm->grs[tid], gtl = rsm->gtl[tid];
#pragma unroll
  for (int off = 1; off < TPR; off <<= 1) {
    grs += __shfl_xor_sync(0xffffffffu, grs, off);
    gtl += __shfl_xor_sync(0xffffffffu, gtl, off);
  }
  if (blockIdx.z == 0 && erow_ok && esub == 0) {
    const int64_t o = static_cast<int64_t>(split_id) * p.B + ei;
    static_cast<acc_t*>(p.part_grs)[o] = grs;
    static_cast<acc_t*>(p.part_gtl)[o] = gtl;
  }
}

template <class Tr>
__global__ void fused_lse_bwd_reduce_dx_kernel(const FusedLseParams p) {
  using io_t = typename Tr::io_t;
  using acc_t = typename Tr::acc_t;
  const int64_t n = p.B * p.D;
  const acc_t* part = static_cast<const acc_t*>(p.part_dx);
  io_t* gx = static_cast<io_t*>(p.grad_x);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t v = acc_t(0);
    for (int sp = 0; sp < p.splits; ++sp) v += part[static_cast<int64_t>(sp) * n + e];
    gx[e] = Conv<io_t>::from(v);
  }
}

template <class acc_t>
__global__ void fused_lse_bwd_reduce_rows_kernel(const FusedLseParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.B) return;
  acc_t grs = acc_t(0), gtl = acc_t(0);
  for (int sp = 0; sp < p.splits; ++sp) {
    const int64_t o = static_cast<int64_t>(sp) * p.B + i;
    grs += static_cast<const acc_t*>(p.part_grs)[o];
    gtl += static_cast<const acc_t*>(p.part_gtl)[o];
  }
  static_cast<acc_t*>(p.grad_row_scale)[i] = grs;
  static_cast<acc_t*>(p.grad_target_logit)[i] = gtl;
}

}  // namespace detail
}  // namespace cuda
}  // namespace marginops
