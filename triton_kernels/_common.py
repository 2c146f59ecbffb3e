"""Device helpers shared by the forward and backward kernels (one place for the epilogue math).

Everything here is a small ``@triton.jit`` function inlined into the kernels:

* ``_mma``            — ``tl.dot`` with the accumulator in fp32 (fp64 for fp64 inputs); works around the
                        interpreter's broken bf16 dot by upcasting there (``UPCAST``, a constexpr).
* ``_cast``          — downcast with round-to-nearest-even also under the interpreter.
* ``_as_operand``    — a W tile rounded to x's dtype for the products (mixed precision: float32 W, 16-bit x).
* ``_load_k``        — tile load masked only along D (row indices are clamped into range instead);
                        ``_load_k_kept`` the same through L1, for the operand a program reuses.
* ``_cos_tile``       — the recomputed (BLOCK_M x BLOCK_N) cosine tile: for every subcenter s of the
                        column's class, one K-loop over D that both accumulates x . w_r (``tl.dot``) and the
                        row sums of squares of W (gathered while the W tile is loaded, never a normalized copy
                        of W); then c = max_s cos_s (first s on ties, NaN wins so that it propagates).
* ``_nontarget_phi``  — phi(c) and dphi/dc for non-target columns, and ``_nontarget_max_abs_dphi`` their
                        largest |dphi/dc| (what the fp16 gradient scale is computed from): the Triton home
                        of the non-target modes (Python: marginops/non_target.py; C++: csrc/margin_math.h,
                        ``nontarget_phi_dphi``; filter first, then CurricularFace, else identity).
* ``_logits``         — z_ij: target column -> target_logit[i], other columns -> row_scale[i] * phi,
                        padding columns -> -inf.

Index arithmetic: row indices (of x and of W) are cast to int64 before being multiplied by D, so that
R * D >= 2^31 is safe.  Labels are only compared to column indices, never used as addresses.
"""

import triton
import triton.language as tl

# Same eps as F.normalize and csrc/margin_math.h (kNormEps).
NORM_EPS = tl.constexpr(1e-12)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _log2e(acc_ty: tl.constexpr):
    """log2(e) in the accumulation dtype (a bare literal would be an fp32 constant in fp64 kernels).  The epilogues
    take exp(v) as exp2(v log2 e) with log2 e folded into their per-row constants: one FFMA and the ex2 unit per
    logit (``tl.exp`` adds three multiplies and a range test around ex2 on sm_90; bench.gpu_static)."""
    return tl.full((1,), LOG2E, acc_ty)


@triton.jit
def _mma(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a @ b with acc's dtype (fp32, or fp64 for fp64 operands)."""
    if UPCAST:
        # The CPU interpreter's bf16 tl.dot returns garbage (triton 3.8); fp32 is exact for bf16 products.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    # out_dtype spelled out: triton 3.6 defaults it to fp32 and rejects an fp64 accumulator
    return tl.dot(a, b, acc, input_precision=DOT_PREC, out_dtype=acc.dtype)


@triton.jit
def _cast(v, ty: tl.constexpr, FIX: tl.constexpr):
    """v.to(ty), rounding to nearest even.  FIX (bf16 under the interpreter, = UPCAST): the interpreter's
    fp32 -> bf16 conversion truncates (triton 3.8) while the GPU rounds; round the fp32 bits by hand first so
    that CPU tests see GPU numerics."""
    if FIX:
        if ty == tl.bfloat16:
            bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
    return v.to(ty)


@triton.jit
def _as_operand(w, ty: tl.constexpr, FIX: tl.constexpr):
    """A W tile as a product operand of x's dtype ``ty``.  Mixed precision (float32 W, 16-bit x): rounded here,
    tile by tile as it is loaded (never a 16-bit copy of W); the same dtype passes through untouched, so the
    pure-dtype kernels compile to the same code."""
    if w.dtype == ty:
        return w
    return _cast(w, ty, FIX)


@triton.jit
def _load_k(ptrs, kk, D, EVEN: tl.constexpr):
    """Load a tile whose rows are always in range (clamped indices); mask only the feature axis, and only
    when D is not a multiple of the tile width (EVEN, decided by the launcher)."""
    if EVEN:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=(kk < D)[None, :], other=0.0)


@triton.jit
def _load_k_kept(ptrs, kk, D, EVEN: tl.constexpr):
    """``_load_k`` through L1 (cp.async.ca, not the L2-only .cg): for the operand tile a program reuses across
    its tiles, so that only its first tile reads it from L2 (while it fits beside the shared memory)."""
    if EVEN:
        return tl.load(ptrs, cache_modifier=".ca")
    else:
        return tl.load(ptrs, mask=(kk < D)[None, :], other=0.0, cache_modifier=".ca")


@triton.jit
def _split_tiles(N, pid_s, SPLITS, BLOCK_N: tl.constexpr):
    """[t_lo, t_hi): the class tiles that split pid_s of SPLITS streams over (contiguous, in order)."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    per_split = tl.cdiv(n_tiles, SPLITS)
    t_lo = pid_s * per_split
    return t_lo, tl.minimum(t_lo + per_split, n_tiles)


@triton.jit
def _class_rows(ci_ptr, cols_ld, SUBC: tl.constexpr, HAS_CI: tl.constexpr):
    """First W row (subcenter 0) of the class of each (clamped, in-range) column, as int64: cls(j) * SUBC."""
    if HAS_CI:
        cls = tl.load(ci_ptr + cols_ld).to(tl.int64)
    else:
        cls = cols_ld.to(tl.int64)
    return cls * SUBC


@triton.jit
def _cos_tile(
    x_ptr,
    w_ptr,
    rows_ld,
    base_r,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    SUBC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    KEEP: tl.constexpr,
    inv_ptr=None,
    inv_q=None,
    inv_mask=None,
    inv_write=None,
    INV_OUT: tl.constexpr = False,
):
    """Cosine tile c (BLOCK_M, BLOCK_N), the subcenter achieving it and that subcenter row's 1/n_r (a (1, BLOCK_N)
    row with one subcenter, since every row of the tile shares it).

    c_ij = max_s (x_i . w_{r_s(j)}) / max(||w_{r_s(j)}||, eps) with r_s(j) = base_r[j] + s.
    rows_ld (int64) and base_r are clamped into range by the caller (padding rows/columns repeat the last
    real one), so the only load mask is on D; the caller masks padding in the epilogue and at the stores.
    Keeping masks off the row/column axes saves ~60 registers per thread on sm_90.
    KEEP ("x", "w" or ""): the operand the calling program reuses across its tiles (the forward's and dX's row
    tile, dW's class tile), loaded through L1 (``_load_k_kept``): without it every class tile re-read its x
    tile from L2 (16 GB of L2 traffic in the forward at B = 1024, C = 1M, D = 512; bench/gpu_model.py).
    INV_OUT: also store (where inv_write, a scalar) every subcenter row's 1/n_r at inv_ptr[inv_q * SUBC + s] (where
    inv_mask), negated where ||w_r|| <= eps (no projection there), so that later kernels use these very values
    (hybrid_bwd.py: the fp16 operands split 1/n_r = f 2^e across two kernels, and a 1/n_r summed in another order
    can fall on the other side of a power of two).
    """
    acc_ty: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    cmax = tl.full((BLOCK_M, BLOCK_N), float("-inf"), acc_ty)
    sub = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    inv_sel = tl.zeros((BLOCK_M, BLOCK_N), acc_ty)
    x_row = x_ptr + rows_ld[:, None] * D
    for s in tl.static_range(SUBC):
        w_row = w_ptr + (base_r + s)[:, None] * D
        acc = tl.zeros((BLOCK_M, BLOCK_N), acc_ty)
        sumsq = tl.zeros((BLOCK_N,), acc_ty)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            if KEEP == "x":
                xt = _load_k_kept(x_row + kk[None, :], kk, D, EVEN_K)
            else:
                xt = _load_k(x_row + kk[None, :], kk, D, EVEN_K)
            if KEEP == "w":
                wt = _load_k_kept(w_row + kk[None, :], kk, D, EVEN_K)
            else:
                wt = _load_k(w_row + kk[None, :], kk, D, EVEN_K)
            wf = wt.to(acc_ty)  # norms from W as stored (float32 in mixed precision)
            sumsq += tl.sum(wf * wf, axis=1)
            acc = _mma(xt, tl.trans(_as_operand(wt, xt.dtype, UPCAST)), acc, DOT_PREC, UPCAST)
        # eps as an acc-dtype constant: a bare 1e-12 literal would be rounded to fp32 in fp64 kernels
        norm = tl.sqrt(sumsq)
        inv = 1.0 / tl.maximum(norm, tl.full((BLOCK_N,), NORM_EPS, acc_ty))
        if INV_OUT:
            if inv_write:
                tl.store(inv_ptr + inv_q * SUBC + s, tl.where(norm > NORM_EPS, inv, -inv), mask=inv_mask)
        cos = acc * inv[None, :]
        if SUBC == 1:
            cmax = cos
            inv_sel = inv[None, :]  # (1, BLOCK_N): what the callers compute from 1/n stays per column
        else:
            # strict '>' keeps the first subcenter on ties; a NaN cosine is taken so that it propagates
            take = (cos > cmax) | (cos != cos)
            cmax = tl.where(take, cos, cmax)
            sub = tl.where(take, s, sub)
            inv_sel = tl.where(take, inv[None, :], inv_sel)
    return cmax, sub, inv_sel


@triton.jit
def _row_inv_norm(w_ptr, r, D, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """(1 / max(||w_r||, eps), ||w_r|| > eps) for a vector of (in-range) W rows r (int64)."""
    acc_ty: tl.constexpr = tl.float64 if w_ptr.dtype.element_ty == tl.float64 else tl.float32
    sumsq = tl.zeros((BLOCK_N,), acc_ty)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        wf = _load_k(w_ptr + r[:, None] * D + kk[None, :], kk, D, EVEN_K).to(acc_ty)
        sumsq += tl.sum(wf * wf, axis=1)
    norm = tl.sqrt(sumsq)
    eps = tl.full((BLOCK_N,), NORM_EPS, acc_ty)
    return 1.0 / tl.maximum(norm, eps), norm > eps


@triton.jit
def _nontarget_phi(c, thr, modulation_t, filter_threshold, NON_TARGET: tl.constexpr, FILTER: tl.constexpr):
    """phi(c), dphi/dc for non-target columns (marginops/non_target.py; csrc/margin_math.h nontarget_phi_dphi).

    c: (BLOCK_M, BLOCK_N); thr: (BLOCK_M,) per-row thresholds; modulation_t: the mode's scalar (the op's
    the op's non_target_param).  Filtered (c > filter_threshold) -> (0, 0); CurricularFace (NON_TARGET == 1) and c > thr
    -> (c (t + c), t + 2c); else (c, 1).  NaN cosines fall through to the plain branch, so NaN propagates.
    A new mode also needs its bound in ``_nontarget_max_abs_dphi``.  FILTER (launch.filters): False when the
    threshold is >= 2, which no cosine exceeds, so that the test is not compiled in.
    """
    phi = c
    dphi = tl.full(c.shape, 1.0, c.dtype)
    if NON_TARGET == 1:
        curr = c > thr[:, None]
        phi = tl.where(curr, c * (modulation_t + c), phi)
        dphi = tl.where(curr, modulation_t + 2.0 * c, dphi)
    if FILTER:
        filt = c > filter_threshold
        phi = tl.where(filt, 0.0, phi)
        dphi = tl.where(filt, 0.0, dphi)
    return phi, dphi


@triton.jit
def _nontarget_max_abs_dphi(modulation_t, NON_TARGET: tl.constexpr):
    """max over c in [-1, 1] of |dphi/dc| of ``_nontarget_phi`` (marginops/non_target.py
    non_target_max_abs_dphi): the bound the fp16 gradient operands are scaled by.  Understating it lets
    those operands overflow silently."""
    if NON_TARGET == 1:
        return tl.abs(modulation_t) + 2.0  # |t + 2c| <= |t| + 2
    else:
        return 1.0


@triton.jit
def _logits(c, phi, col0, col_mask, lab, tgt, rscale, BLOCK_N: tl.constexpr):
    """z_ij: target_logit on the label column, row_scale * phi elsewhere, -inf on padding columns.

    The label test is done tile-relative in int32 (lab - col0 against the constant arange), which keeps
    no per-column int64 index tensor alive in registers.
    """
    is_t = tl.arange(0, BLOCK_N)[None, :] == (lab - col0).to(tl.int32)[:, None]
    z = tl.where(is_t, tgt[:, None], rscale[:, None] * phi)
    z = tl.where(col_mask[None, :], z, float("-inf"))
    return z, is_t
