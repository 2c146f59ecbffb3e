"""Backward kernels of the fused op.

Per (row i, column j) the tile is recomputed exactly as in the forward (same helpers, same K-loop), then
    p = exp(z - lse_i),  dz = g_i p (0 on the target column and on padding),
    grad_target_logit_i = g_i sum_j [j == label_i] p,   grad_row_scale_i = sum_j dz phi,
    dc = dz * row_scale_i * dphi   (assigned to the subcenter row r = sub_ij that achieved the max)
    grad_x_i  = sum_j dc_ij w_r / n_r
    grad_w_r  = (sum_i dc_ir x_i) / n_r - (sum_i dc_ir cos_r(i)) w_r / n_r^2   (2nd term only if ||w_r|| > eps)
All sums accumulate in fp32 (fp64 for fp64 inputs).  The dX product takes dc / n_r against the W tile, the
dW product dc against x (scaled by 1/n_r afterwards, in fp32).

Precision and range of the 16-bit products.  One rounding of dc to bf16 gave errors of ~0.3% in grad_x /
grad_weight, above the docs/DESIGN.md §4 bound.  So the dW product runs on **fp16** operands for bf16 and fp16
inputs (``prod_ty`` in the kernels): for bf16 inputs x and W convert to fp16 with their bf16 precision intact and
dc keeps 11 mantissa bits, within the bound with one rounding (as the CUDA kernels, measured in
tests/test_op_suite.py).  The dX product of bf16 inputs instead splits dc into bf16 hi + lo halves (~16 bits)
against the W tile as loaded: converting that tile to fp16 passes it through registers that the kernel's
BLOCK_M x BLOCK_DV accumulator leaves no room for (it spilled).  fp16 inputs must match a reference 8x more
precise and split dc into fp16 hi + lo halves in both products (``_split``, SPLIT; ~16 bits for 2x the product
GEMMs; ``FAST_GRAD_DOTS`` turns it off).  The dW projection sum takes dc as the product rounds it (hi, or
hi + lo), so that the two terms of grad_w cancel along w_r as they do in exact arithmetic (with D = 1 that
cancellation is all of grad_w).  fp16's range: in the dW product dc is multiplied by the power of two ``dscale``
(launch.py: from max |g * s|, so that |dc * dscale| < 2^15 whatever the upstream gradient) and the accumulator
divided by it.  The fp16 dX product scales per row instead (``xs``: a row's dX depends on its own g only, so
a tiny upstream gradient keeps its precision) and splits 1/n_r = f 2^k into the gradient operand (f) and the W
rows (2^k, exact), so that a tiny-norm W row cannot overflow either operand.  Nothing saturates: NaN and inf propagate.
Mixed precision (float32 W, 16-bit x): ``in_ty`` is x's dtype; W tiles are rounded to it before they become
product operands (``_as_operand``), the norms and the w_r term of grad_w use the float32 values, and grad_w is
stored in float32.

Two modes (the op's ``deterministic`` flag):

* deterministic=True (the default we recommend to the Python layer): no float atomics, bitwise identical
  results run to run for a fixed kernel configuration.
    - ``_bwd_dw_kernel``: grid (class tiles x d-chunks, SUBC); each program owns BLOCK_N class columns, one
      subcenter and one d-chunk, loops over *all* row tiles in a fixed order keeping its dW tile
      (BLOCK_N x BLOCK_DV, fp32, accumulated transposed: the product x^T dc has the d-chunk as its M side, on
      wgmma) in registers, and writes it once.
    - ``_bwd_dx_kernel``: grid (row tiles x d-chunks, SPLITS); each program loops over the class tiles of
      its split keeping a dX tile (BLOCK_M x BLOCK_DV) in registers and writes an fp32 partial
      (SPLITS x B x D) plus per-row partials of grad_row_scale / grad_target_logit (SPLITS x B).
    - ``_bwd_reduce_kernel`` sums the partials over splits in split order and casts to the output dtype.
  Cost: each kernel recomputes the cosine GEMM once per d-chunk, plus its own update GEMM.
* deterministic=False ("atomic"): ``_bwd_dw_kernel`` with FUSE_DX=True also forms the dX contribution of its
  tile and ``tl.atomic_add``s it into an fp32 (B x D) buffer (and the per-row grads into (B,) buffers), so
  the cosine GEMM is recomputed in one kernel only.  The price is (N / BLOCK_N) x SUBC x B x D fp32 atomics
  (~4e9 red.add for B=1024, C=1M, D=512, growing with C), a second accumulator tile in registers (it spills
  at BLOCK_DV=256-512) and run-to-run non-determinism: it is not the default, and not yet measured
  against the deterministic pair; it can only win at small C.

Why dW programs loop over all rows and dX programs over (a split of) the classes: each keeps its
accumulator in registers across the whole reduction, so no B x C or C x D x (anything) intermediate exists.
With subcenters k > 1, a dW program owns one subcenter s but must recompute all k cosines to know which
subcenter each (i, j) selected (k^2 + k tile GEMMs instead of 2k: subcenters are the rare case).

Memory beyond inputs/outputs: SPLITS x B x (D + 2) fp32 partials (deterministic; SPLITS is capped so that
this stays near 64 MB) or B x (D + 2) fp32 accumulators (atomic).
"""

import triton
import triton.language as tl

from ._common import (
    _as_operand,
    _cast,
    _class_rows,
    _cos_tile,
    _load_k,
    _log2e,
    _mma,
    _nontarget_max_abs_dphi,
    _nontarget_phi,
    _row_inv_norm,
    _split_tiles,
)


@triton.jit
def _bwd_tile(
    c,
    col0,
    n_real,
    lab,
    tgt,
    rscale,
    thr,
    lse,
    g,
    non_target_param,
    filter_threshold,
    NON_TARGET: tl.constexpr,
    FILTER: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dz = g p on the tile's non-target columns (0 on the target column, the filtered columns and the padding
    columns from n_real on), dphi/dc, and this tile's contributions to grad_target_logit and grad_row_scale;
    dc = dz row_scale dphi (the callers fold row_scale into their own per-row factors)."""
    phi, dphi = _nontarget_phi(c, thr, non_target_param, filter_threshold, NON_TARGET, FILTER)
    log2e = _log2e(lse.dtype)
    lse2 = lse * log2e
    # p = exp(row_scale phi - lse) of the non-target columns as exp2 with log2(e) in the row constants
    p = tl.exp2(phi * (rscale * log2e)[:, None] - lse2[:, None])
    lab_col = (lab - col0).to(tl.int32)  # the label's column in the tile (compared, never an address)
    is_t = tl.arange(0, BLOCK_N)[None, :] == lab_col[:, None]
    dz = tl.where(is_t | (tl.arange(0, BLOCK_N) >= n_real)[None, :], 0.0, g[:, None] * p)
    if FILTER:
        # a filtered logit is a constant: no upstream value reaches its cosine, not even a NaN (dz * dphi would be
        # NaN * 0), as autograd's where gives 0 there (csrc/margin_math.h zero_if_filtered)
        dz = tl.where(c > filter_threshold, 0.0, dz)
    grs = tl.sum(dz * phi, axis=1)
    # the target column's p = exp(target_logit - lse), per row, where the label is one of the tile's real columns
    on_tile = (lab_col >= 0) & (lab_col < BLOCK_N) & (lab_col < n_real)
    gtl = g * tl.where(on_tile, tl.exp2(tgt * log2e - lse2), 0.0)
    return dz, dphi, gtl, grs


@triton.jit
def _pow2_split(v):
    """v (fp32, >= 0) = f * 2^k with f in [0.5, 1): returns (f, 2^k), both exact (v = 0 gives f = 0)."""
    e = (v.to(tl.int32, bitcast=True) >> 23) & 0xFF
    p2 = ((e + 1) << 23).to(tl.float32, bitcast=True)
    # times 1/p2 = 2^(126 - e), exact like the division it replaces (a division per element is ~10 instructions);
    # v = 1/max(||w||, eps) <= 1e12 keeps e far below 253, where 1/p2 would leave the exponent range
    return v * ((253 - e) << 23).to(tl.float32, bitcast=True), p2


@triton.jit
def _pow2_scale(bound):
    """The power of two S = 2^(15 - e) with bound < 2^e, so that |S * v| < 2^15 for |v| <= bound: fp16 operands
    keep their full precision without overflow.  Exponent clamped to [-100, 100] (bound 0, inf or NaN)."""
    e = (bound.to(tl.int32, bitcast=True) >> 23) & 0xFF  # bound < 2^(e - 126)
    k = tl.minimum(tl.maximum(141 - e, -100), 100)
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _rows_to_prod(w, p2, in_ty: tl.constexpr, prod_ty: tl.constexpr):
    """W rows (BLOCK_N, BLOCK_DV) times their power of two p2 (BLOCK_N,), as product operands.  With
    p2 = 2^k from 1/n = f 2^k, |w 2^k| <= 2 |w / n|: fp16 holds any row, tiny norms included."""
    if prod_ty == in_ty and in_ty != tl.float16:
        return w  # 32/64-bit inputs: no rescaling
    return (w.to(tl.float32) * p2[:, None]).to(prod_ty)


@triton.jit
def _split(v, in_ty: tl.constexpr, SPLIT: tl.constexpr, FIX: tl.constexpr):
    """v (fp32) as hi + lo in the dot dtype, so that hi @ b + lo @ b keeps ~16 mantissa bits of v instead of
    8 (bf16) / 11 (fp16).  Without SPLIT, lo is unused.  The callers scale v into the dot dtype's range
    (no saturation here: a NaN or inf gradient propagates)."""
    hi = _cast(v, in_ty, FIX)
    if SPLIT:
        lo = _cast(v - hi.to(v.dtype), in_ty, FIX)
    else:
        lo = hi
    return hi, lo


@triton.jit
def _unsplit(hi, lo, acc_ty: tl.constexpr, SPLIT: tl.constexpr):
    """The value ``_split``'s operands stand for in the products (hi, or hi + lo), in acc_ty."""
    if SPLIT:
        return hi.to(acc_ty) + lo.to(acc_ty)
    else:
        return hi.to(acc_ty)


@triton.jit
def _mma_split(hi, lo, b, acc, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    acc = _mma(hi, b, acc, DOT_PREC, UPCAST)
    if SPLIT:
        acc = _mma(lo, b, acc, DOT_PREC, UPCAST)
    return acc


@triton.jit
def _mma_split_rhs(a, hi, lo, acc, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a @ hi (+ a @ lo): ``_mma_split`` with the split operand on the right."""
    acc = _mma(a, hi, acc, DOT_PREC, UPCAST)
    if SPLIT:
        acc = _mma(a, lo, acc, DOT_PREC, UPCAST)
    return acc


@triton.jit
def _mma_split_k(hi, lo, b, acc, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc += hi @ b + lo @ b as *one* product of K = 2 x hi's columns: [hi_0, lo_0, hi_1, lo_1, ...] against
    b's rows each taken twice.  Same sum as ``_mma_split``, but one wgmma chain: the two chained products
    kept both gradient operands and the accumulator live at once and spilled (bench.gpu_static, dX kernel,
    fp16 with the split)."""
    if SPLIT:
        M: tl.constexpr = hi.shape[0]
        K: tl.constexpr = hi.shape[1]
        N: tl.constexpr = b.shape[1]
        a2 = tl.reshape(tl.join(hi, lo), (M, 2 * K))
        b2 = tl.reshape(tl.permute(tl.join(b, b), (0, 2, 1)), (2 * K, N))
        return _mma(a2, b2, acc, DOT_PREC, UPCAST)
    else:
        return _mma(hi, b, acc, DOT_PREC, UPCAST)


@triton.jit
def _row_vectors(labels_ptr, tgt_ptr, rscale_ptr, thr_ptr, lse_ptr, g_ptr, rows, B):
    """Per-row inputs of a row tile.  Padding rows repeat row B-1 (clamped, unmasked loads) except g, which
    is 0 there, so that padding rows contribute nothing to dW."""
    rows_ld = tl.minimum(rows, B - 1).to(tl.int64)
    lab = tl.load(labels_ptr + rows_ld)
    tgt = tl.load(tgt_ptr + rows_ld)
    rscale = tl.load(rscale_ptr + rows_ld)
    thr = tl.load(thr_ptr + rows_ld)
    lse = tl.load(lse_ptr + rows_ld)
    g = tl.where(rows < B, tl.load(g_ptr + rows_ld), 0.0)
    return rows_ld, lab, tgt, rscale, thr, lse, g


@triton.jit
def _bwd_dw_kernel(
    x_ptr,
    xp_ptr,
    w_ptr,
    ci_ptr,
    labels_ptr,
    tgt_ptr,
    rscale_ptr,
    thr_ptr,
    lse_ptr,
    g_ptr,
    dw_ptr,
    dx_acc_ptr,
    gtl_acc_ptr,
    grs_acc_ptr,
    B,
    N,
    D,
    t_ptr,
    filt_ptr,
    ds_ptr,
    SUBC: tl.constexpr,
    NON_TARGET: tl.constexpr,
    FILTER: tl.constexpr,
    HAS_CI: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    FUSE_DX: tl.constexpr,
    SPLIT: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    acc_ty: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    in_ty: tl.constexpr = x_ptr.dtype.element_ty  # the products' dtype (W may be float32: mixed precision)
    prod_ty: tl.constexpr = tl.float16 if in_ty == tl.bfloat16 else in_ty  # operands of the dW / dX products
    SCALE16: tl.constexpr = prod_ty == tl.float16  # fp16 operands: rescale into fp16's range
    non_target_param = tl.load(t_ptr)  # acc-dtype scalars (see launch.py)
    filter_threshold = tl.load(filt_ptr)
    dscale = tl.load(ds_ptr)  # power of two applied to dc in the dW product (1 for 32/64-bit inputs)
    inv_dscale = 1.0 / dscale  # exact (a power of two): a multiply per element instead of a division
    dphi_max = _nontarget_max_abs_dphi(non_target_param, NON_TARGET)
    n_dv = tl.cdiv(D, BLOCK_DV)
    pid = tl.program_id(0)
    # the d-chunks of one class tile are neighbours in launch order: they share the W rows in L2
    pid_n = pid // n_dv
    pid_d = pid % n_dv
    s_own = tl.program_id(1)

    col0 = pid_n * BLOCK_N
    col_mask = tl.arange(0, BLOCK_N) < N - col0
    base_r = _class_rows(ci_ptr, tl.minimum(col0 + tl.arange(0, BLOCK_N), N - 1), SUBC, HAS_CI)
    r_own = base_r + s_own
    inv_own, has_proj = _row_inv_norm(w_ptr, r_own, D, BLOCK_N, BLOCK_K, EVEN_K)
    dcols = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    w_own_ptrs = w_ptr + r_own[:, None] * D + dcols[None, :]

    # dW^T (BLOCK_DV x BLOCK_N) += x^T dc: the d-chunk is the product's M side, so that a narrow class tile
    # (BLOCK_N = 32, below wgmma's 64 rows) still runs on wgmma rather than mma.sync
    dacc_t = tl.zeros((BLOCK_DV, BLOCK_N), acc_ty)
    proj = tl.zeros((BLOCK_N,), acc_ty)
    for m0 in range(0, B, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rows_ld, lab, tgt, rscale, thr, lse, g = _row_vectors(
            labels_ptr, tgt_ptr, rscale_ptr, thr_ptr, lse_ptr, g_ptr, rows, B
        )
        c, sub, _inv = _cos_tile(
            x_ptr, w_ptr, rows_ld, base_r, D, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, SUBC, DOT_PREC, UPCAST, "w"
        )
        dz, dphi, gtl, grs = _bwd_tile(
            c,
            col0,
            N - col0,
            lab,
            tgt,
            rscale,
            thr,
            lse,
            g,
            non_target_param,
            filter_threshold,
            NON_TARGET,
            FILTER,
            BLOCK_N,
        )
        dc = dz * rscale[:, None] * dphi
        dcs = tl.where(sub == s_own, dc, 0.0)
        # x in the products' dtype, converted once by the launcher: loaded as it is multiplied, it stays a
        # shared-memory operand (a conversion here would stage it through registers, which spilled)
        xv = _load_k(xp_ptr + rows_ld[:, None] * D + dcols[None, :], dcols, D, EVEN_DV).to(prod_ty)
        hi, lo = _split(dcs * dscale, prod_ty, SPLIT, UPCAST)
        # the projection term from the dc the product sees (rounded to 16 bits), not the fp32 dc: the two terms
        # cancel exactly along w_r, and with D = 1 they are all there is (issue 24: bf16 dW off by 1e3x)
        proj += tl.sum(_unsplit(hi, lo, acc_ty, SPLIT) * inv_dscale * c, axis=0)
        dacc_t = _mma_split_rhs(tl.trans(xv), hi, lo, dacc_t, SPLIT, DOT_PREC, UPCAST)
        if FUSE_DX:
            w_own_t = _load_k(w_own_ptrs, dcols, D, EVEN_DV)
            if SCALE16:  # 1/n = f 2^k: f into the gradient operand, 2^k into W; a power of two per row
                f_own, p2_own = _pow2_split(inv_own)
                xs = _pow2_scale(tl.abs(g * rscale) * dphi_max)
                hi, lo = _split(dcs * f_own[None, :] * xs[:, None], prod_ty, SPLIT, UPCAST)
                w_own_t = _rows_to_prod(_as_operand(w_own_t, in_ty, UPCAST), p2_own, in_ty, prod_ty)
            else:
                xs = tl.full((BLOCK_M,), 1.0, acc_ty)
                hi, lo = _split(dcs * inv_own[None, :], prod_ty, SPLIT, UPCAST)
            dxc = _mma_split(hi, lo, w_own_t, tl.zeros((BLOCK_M, BLOCK_DV), acc_ty), SPLIT, DOT_PREC, UPCAST)
            dxc = dxc * (1.0 / xs)[:, None]  # a power of two: exact
            tl.atomic_add(
                dx_acc_ptr + rows_ld[:, None] * D + dcols[None, :], dxc, mask=(rows < B)[:, None] & (dcols < D)[None, :]
            )
            if (s_own == 0) & (pid_d == 0):
                tl.atomic_add(gtl_acc_ptr + rows_ld, gtl, mask=rows < B)
                tl.atomic_add(grs_acc_ptr + rows_ld, grs, mask=rows < B)

    dacc = tl.trans(dacc_t)
    w_own = _load_k(w_own_ptrs, dcols, D, EVEN_DV).to(acc_ty)
    coef = tl.where(has_proj, proj * inv_own * inv_own, 0.0)
    dw = dacc * (inv_own / dscale)[:, None] - coef[:, None] * w_own
    tl.store(
        dw_ptr + r_own[:, None] * D + dcols[None, :],
        _cast(dw, dw_ptr.dtype.element_ty, UPCAST),
        mask=col_mask[:, None] & (dcols < D)[None, :],
    )


@triton.jit
def _bwd_dx_kernel(
    x_ptr,
    w_ptr,
    ci_ptr,
    labels_ptr,
    tgt_ptr,
    rscale_ptr,
    thr_ptr,
    lse_ptr,
    g_ptr,
    dx_part_ptr,
    gtl_part_ptr,
    grs_part_ptr,
    B,
    N,
    D,
    SPLITS,
    t_ptr,
    filt_ptr,
    SUBC: tl.constexpr,
    NON_TARGET: tl.constexpr,
    FILTER: tl.constexpr,
    HAS_CI: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    SPLIT: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    acc_ty: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    in_ty: tl.constexpr = x_ptr.dtype.element_ty  # the products' dtype (W may be float32: mixed precision)
    # the products run in x's dtype: bf16 inputs take dc as bf16 hi + lo against the W tile as loaded (a conversion
    # of W to fp16 in registers would cost this kernel its last registers); fp16 inputs rescale into fp16's range
    SPLIT_DX: tl.constexpr = SPLIT or in_ty == tl.bfloat16
    SCALE16: tl.constexpr = in_ty == tl.float16
    non_target_param = tl.load(t_ptr)  # acc-dtype scalars (see launch.py)
    filter_threshold = tl.load(filt_ptr)
    dphi_max = _nontarget_max_abs_dphi(non_target_param, NON_TARGET)
    n_dv = tl.cdiv(D, BLOCK_DV)
    pid = tl.program_id(0)
    pid_m = pid // n_dv
    pid_d = pid % n_dv
    pid_s = tl.program_id(1)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    rows_ld, lab, tgt, rscale, thr, lse, g = _row_vectors(
        labels_ptr, tgt_ptr, rscale_ptr, thr_ptr, lse_ptr, g_ptr, rows, B
    )
    dcols = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)

    dacc = tl.zeros((BLOCK_M, BLOCK_DV), acc_ty)
    gtl_acc = tl.zeros((BLOCK_M,), acc_ty)
    grs_acc = tl.zeros((BLOCK_M,), acc_ty)
    # per-row power of two for the fp16 gradient operand: dX row i only depends on g_i, so a row with a tiny
    # upstream gradient keeps its precision whatever the other rows' gradients are
    xs = _pow2_scale(tl.abs(g * rscale) * dphi_max) if SCALE16 else tl.full((BLOCK_M,), 1.0, acc_ty)
    t_lo, t_hi = _split_tiles(N, pid_s, SPLITS, BLOCK_N)
    for t in range(t_lo, t_hi):
        col0 = t * BLOCK_N
        base_r = _class_rows(ci_ptr, tl.minimum(col0 + tl.arange(0, BLOCK_N), N - 1), SUBC, HAS_CI)
        c, sub, inv_sel = _cos_tile(
            x_ptr, w_ptr, rows_ld, base_r, D, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, SUBC, DOT_PREC, UPCAST, "x"
        )
        dz, dphi, gtl, grs = _bwd_tile(
            c,
            col0,
            N - col0,
            lab,
            tgt,
            rscale,
            thr,
            lse,
            g,
            non_target_param,
            filter_threshold,
            NON_TARGET,
            FILTER,
            BLOCK_N,
        )
        gtl_acc += gtl
        grs_acc += grs
        for s in tl.static_range(SUBC):
            wv = _load_k(w_ptr + (base_r + s)[:, None] * D + dcols[None, :], dcols, D, EVEN_DV)
            mine = sub == s
            # dcos = dz row_scale dphi, scaled by per-row and per-column factors (each formed once)
            if SCALE16:
                # 1/n_r = f 2^k: f goes into the gradient operand, 2^k into the W rows (exact; they pass through
                # registers anyway for the fp16 conversion), so neither operand can leave fp16's range
                if SUBC == 1:
                    inv_s = tl.reshape(inv_sel, (BLOCK_N,))
                else:
                    inv_s = tl.max(tl.where(mine, inv_sel, 0.0), axis=0)  # 1/n of row base_r + s (0: unselected)
                f_s, p2_s = _pow2_split(inv_s)
                dcn = dz * (rscale * xs)[:, None] * (dphi * f_s[None, :])
                wv = _rows_to_prod(_as_operand(wv, in_ty, UPCAST), p2_s, in_ty, in_ty)
            else:
                dcn = dz * rscale[:, None] * (dphi * inv_sel)  # dcos / n_r of the selected row, W stays raw
                wv = _as_operand(wv, in_ty, UPCAST)  # mixed precision: rounded to x's dtype
            if SUBC == 1:
                hi, lo = _split(dcn, in_ty, SPLIT_DX, UPCAST)
            else:
                hi, lo = _split(tl.where(mine, dcn, 0.0), in_ty, SPLIT_DX, UPCAST)
            dacc = _mma_split_k(hi, lo, wv, dacc, SPLIT_DX, DOT_PREC, UPCAST)

    prow = pid_s.to(tl.int64) * B + rows
    tl.store(
        dx_part_ptr + prow[:, None] * D + dcols[None, :],
        dacc * (1.0 / xs)[:, None],  # a power of two: exact, and no division per element
        mask=row_mask[:, None] & (dcols < D)[None, :],
    )
    if pid_d == 0:
        tl.store(gtl_part_ptr + prow, gtl_acc, mask=row_mask)
        tl.store(grs_part_ptr + prow, grs_acc, mask=row_mask)


@triton.jit
def _bwd_reduce_kernel(
    dx_part_ptr,
    gtl_part_ptr,
    grs_part_ptr,
    dx_ptr,
    gtl_ptr,
    grs_ptr,
    B,
    D,
    SPLITS,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FIX: tl.constexpr,
):
    """grad_x = sum_s dx_part[s] (cast to x's dtype), and the per-row grads, summed in split order."""
    acc_ty: tl.constexpr = gtl_ptr.dtype.element_ty
    n_d = tl.cdiv(D, BLOCK_D)
    pid = tl.program_id(0)
    pid_m = pid // n_d
    pid_d = pid % n_d
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (dcols < D)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_D), acc_ty)
    gtl = tl.zeros((BLOCK_M,), acc_ty)
    grs = tl.zeros((BLOCK_M,), acc_ty)
    for s in range(SPLITS):
        prow = rows64 + s * B
        acc += tl.load(dx_part_ptr + prow[:, None] * D + dcols[None, :], mask=mask, other=0.0)
        gtl += tl.load(gtl_part_ptr + prow, mask=row_mask, other=0.0)
        grs += tl.load(grs_part_ptr + prow, mask=row_mask, other=0.0)
    tl.store(dx_ptr + rows64[:, None] * D + dcols[None, :], _cast(acc, dx_ptr.dtype.element_ty, FIX), mask=mask)
    if pid_d == 0:
        tl.store(gtl_ptr + rows64, gtl, mask=row_mask)
        tl.store(grs_ptr + rows64, grs, mask=row_mask)


@triton.jit
def _cast_rows_kernel(src_ptr, dst_ptr, numel, BLOCK: tl.constexpr, FIX: tl.constexpr):
    """dst = src.to(dst dtype) (atomic mode: the fp32 dX accumulator to x's dtype)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    tl.store(dst_ptr + offs, _cast(tl.load(src_ptr + offs, mask=mask), dst_ptr.dtype.element_ty, FIX), mask=mask)
