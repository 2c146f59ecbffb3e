"""Backward kernels of the hybrid path (backend ``"hybrid"``): Triton for the logit-gradient block and the weight
rows, vendor GEMMs for the two products (launcher: hybrid_launch.py; design: docs/CHUNKED.md, "The hybrid path").

Per class chunk of Cc columns (Rc = Cc * k weight rows) and row tile of bt rows:

* ``_hybrid_grad_block_kernel``: recomputes the cosine tile (``_cos_tile``, as the forward) and writes the
  gradient block G (bt x Rc, row-major): G[i, j k + s] = dcos_ij scaled as below if s is the subcenter that won
  column j, else exactly 0 (a NaN cosine of a winning subcenter cannot reach its siblings).  Beside it:
    - the per-row sums of grad_target_logit and grad_row_scale, accumulated in place across chunks in one slot per
      (column group, row) (the launcher sums the groups once, in order: no atomics, no per-chunk launches);
    - on the first row tile, every chunk row's 1/n_r (negated where ||w_r|| <= eps), which the weight-rows kernel
      reads instead of recomputing it: G carries f_r and W_hat 2^e_r of 1/n_r = f_r 2^e_r, and a 1/n_r summed in
      another order could fall on the other side of a power of two (a factor of 2 in that row's gradients).
  Grid: row tiles x column groups; a program walks the contiguous column tiles of its group keeping its x tile in
  L1 (``_cos_tile``'s KEEP), so that the chunk's x tile is read from L2 once per program instead of once per tile.
    - 32/64-bit inputs: G = dcos / n_r, in the input dtype (the dX operand is the raw row).
    - 16-bit inputs (bf16 too, docs/DESIGN.md §5.2): G = sigma_i f_r dcos in fp16 (``_pow2_split``), sigma_i the
      row's power of two (launcher: |sigma_i dcos_ij| < 2^15 for any upstream gradient) so that a row with a tiny
      upstream gradient keeps its precision; fp16 inputs also write lo = fp16(G - hi), the rounding error of hi
      (``_split``), beside hi in the same row: [hi_i | lo_i] times the stacked W_hat is dX's hi + lo in one GEMM,
      and the same block read as (2 bt x Rc) rows hi_0, lo_0, hi_1, ... against x' with each row repeated gives
      dW's.
    - with RADIAL (16-bit inputs, the batch in one row tile): per row program and chunk row, the program's share of
      t_r = U_r . w^_r = sum_i G_ir x'_i . w^_r = sum_i G_ir c_ir sigma_min / sigma_i, from the rounded G (what the
      dW product sums), in fp32: ``_hybrid_dw_kernel`` sums the shares in program order.
* ``_hybrid_dw_kernel`` (RADIAL's partner): U = G^T x' on wgmma and, in its epilogue, the row kernel's grad_w_r
  below with t_r from the shares, so that U never reaches memory; W_hat from the same W tiles.
* ``_hybrid_weight_rows_kernel`` (several row tiles, 32/64-bit inputs, or W_hat alone), with U = G^T x' by a
  vendor GEMM (x' = x sigma_min / sigma_i in fp16 for 16-bit inputs, so that U_r = sigma_min f_r sum_i dcos_ir x_i;
  x itself otherwise):
      grad_w_r = alpha_r (U_r - (U_r . w^_r) w^_r)    (projection only where ||w_r|| > eps)
  with alpha_r = 2^e_r / sigma_min (16-bit) or 1 (G = dcos / n), cast to the weight's dtype and written to the
  chunk row's weight row (class_index and subcenter, 64-bit offsets).  In the same pass over W it writes the dX
  operand W_hat (a batch of one row tile; otherwise a launch of its own after the first gradient block): for
  16-bit inputs W_hat_r = w_r 2^e_r in fp16 (exact: a 16-bit value times a power of two, |W_hat_r| <= 2 whatever
  ||w_r||); for 32/64-bit inputs the raw rows gathered through class_index.

Every output element has one writer per launch and launches run in a fixed order: bitwise deterministic.
"""

import triton
import triton.language as tl

from ._common import _as_operand, _cast, _class_rows, _cos_tile, _load_k, _split_tiles
from .fused_lse_bwd import _bwd_tile, _pow2_split, _row_vectors, _rows_to_prod, _split, _unsplit


@triton.jit
def _chunk_weight_rows(ci_ptr, c0, q_ld, SUBC: tl.constexpr, HAS_CI: tl.constexpr):
    """Weight row (int64) of chunk rows q_ld (clamped into range): class cls(c0 + q // k), subcenter q % k."""
    return _class_rows(ci_ptr, c0 + q_ld // SUBC, SUBC, HAS_CI) + (q_ld % SUBC)


@triton.jit
def _hybrid_grad_block_kernel(
    x_ptr,
    w_ptr,
    ci_ptr,
    labels_ptr,
    tgt_ptr,
    rscale_ptr,
    thr_ptr,
    lse_ptr,
    g_ptr,
    sigma_ptr,
    gblk_ptr,
    gtl_part_ptr,
    grs_part_ptr,
    inv_ptr,
    radial_ptr,
    xfac_ptr,
    B,
    D,
    row0,
    n_rows,
    c0,
    n_cols,
    n_groups,
    write_inv,
    t_ptr,
    filt_ptr,
    SUBC: tl.constexpr,
    NON_TARGET: tl.constexpr,
    FILTER: tl.constexpr,
    HAS_CI: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    SCALE16: tl.constexpr,
    SPLIT: tl.constexpr,
    WRITE_G: tl.constexpr,
    RADIAL: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    non_target_param = tl.load(t_ptr)  # acc-dtype scalars (see launch.py)
    filter_threshold = tl.load(filt_ptr)
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)

    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of the tile
    row_mask = local < n_rows
    rows_ld, lab, tgt, rscale, thr, lse, g = _row_vectors(
        labels_ptr, tgt_ptr, rscale_ptr, thr_ptr, lse_ptr, g_ptr, row0 + local, B
    )
    if SCALE16:
        sigma = tl.load(sigma_ptr + rows_ld)
    if RADIAL:
        # x'_i . w^_r = xfac_i c_ir (xfac_i = sigma_min / sigma_i); 0 on padding rows, which repeat row B - 1
        xfac = tl.where(row_mask, tl.load(xfac_ptr + rows_ld), 0.0)
    acc_ty: tl.constexpr = lse.dtype
    inv_writer = (pid_m == 0) & (write_inv != 0)  # 1/n's one writer per chunk row
    gtl_sum = tl.zeros((BLOCK_M,), acc_ty)
    grs_sum = tl.zeros((BLOCK_M,), acc_ty)
    t_lo, t_hi = _split_tiles(n_cols, pid_g, n_groups, BLOCK_N)
    for t in range(t_lo, t_hi):
        jl = t * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of the chunk
        col_mask = jl < n_cols
        col0 = c0 + t * BLOCK_N  # global column of the tile's first column (labels are global columns)
        base_r = _class_rows(ci_ptr, c0 + tl.minimum(jl, n_cols - 1), SUBC, HAS_CI)
        c, sub, inv_sel = _cos_tile(
            x_ptr, w_ptr, rows_ld, base_r, D, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, SUBC, DOT_PREC, UPCAST, "x",
            inv_ptr, jl, col_mask, inv_writer, True,
        )  # fmt: skip
        dz, dphi, gtl, grs = _bwd_tile(
            c,
            col0,
            n_cols - t * BLOCK_N,
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
        gtl_sum += gtl
        grs_sum += grs

        if WRITE_G:
            g_ty: tl.constexpr = gblk_ptr.dtype.element_ty
            # dcos = dz row_scale dphi, times the row's and the column's factors (per row / per column, once)
            if SCALE16:
                # 1/n = f 2^e: f into G, 2^e into W_hat (_hybrid_weight_rows_kernel); sigma_i keeps the row in fp16
                f, _p2 = _pow2_split(inv_sel)
                v = dz * (rscale * sigma)[:, None] * (dphi * f)
            else:
                v = dz * rscale[:, None] * (dphi * inv_sel)
            # row i of the block: [hi_i | lo_i] with SPLIT (one GEMM of twice the depth forms hi + lo), else hi_i
            ld = n_cols * SUBC
            offs = local.to(tl.int64)[:, None] * (2 * ld if SPLIT else ld) + (jl * SUBC)[None, :]
            mask = row_mask[:, None] & col_mask[None, :]
            if RADIAL:
                # this program's rows' share of U_r . w^_r = sum_i G_ir x'_i . w^_r, per chunk row, from the
                # rounded G (what the dW product sums) and the cosine: the projection needs no pass over U
                cx = c * xfac[:, None]
                rad_row = pid_m.to(tl.int64) * (n_cols * SUBC)
            for s in tl.static_range(SUBC):
                vs = v if SUBC == 1 else tl.where(sub == s, v, 0.0)
                hi, lo = _split(vs, g_ty, SPLIT, UPCAST)
                tl.store(gblk_ptr + offs + s, hi, mask=mask)
                if SPLIT:
                    tl.store(gblk_ptr + offs + ld + s, lo, mask=mask)
                if RADIAL:
                    # in fp32: the shares cancel most of U_r where D is small (fp16-rounded terms fail the rule at
                    # D <= 3); on the tensor cores as fp16 hi + lo they cost as much as this shuffle tree
                    rad = tl.sum(_unsplit(hi, lo, acc_ty, SPLIT) * cx, axis=0)
                    tl.store(radial_ptr + rad_row + jl * SUBC + s, rad, mask=col_mask)
    # this (group, row) slot's running sum over the chunks so far: one writer per launch, launches in order
    part = pid_g.to(tl.int64) * B + row0 + local
    tl.store(gtl_part_ptr + part, tl.load(gtl_part_ptr + part, mask=row_mask) + gtl_sum, mask=row_mask)
    tl.store(grs_part_ptr + part, tl.load(grs_part_ptr + part, mask=row_mask) + grs_sum, mask=row_mask)


@triton.jit
def _hybrid_weight_rows_kernel(
    u_ptr,
    x_ptr,
    w_ptr,
    ci_ptr,
    inv_ptr,
    dw_ptr,
    what_ptr,
    sigma_min_ptr,
    c0,
    n_rows,
    D,
    SUBC: tl.constexpr,
    HAS_CI: tl.constexpr,
    SCALE16: tl.constexpr,
    UPCAST: tl.constexpr,
    NEED_W: tl.constexpr,
    WRITE_WHAT: tl.constexpr,
    DUP: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """BLOCK_R chunk rows: grad_weight's rows from U (NEED_W) and / or the dX operand W_hat (module docstring)."""
    in_ty: tl.constexpr = x_ptr.dtype.element_ty  # the products' dtype (W may be float32: mixed precision)
    acc_ty: tl.constexpr = tl.float64 if in_ty == tl.float64 else tl.float32
    q = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    q_mask = q < n_rows
    q_ld = tl.minimum(q, n_rows - 1).to(tl.int64)
    r = _chunk_weight_rows(ci_ptr, c0, q_ld, SUBC, HAS_CI)
    inv_signed = tl.load(inv_ptr + q_ld)  # _hybrid_grad_block_kernel's 1/n_r, negative: no projection
    inv = tl.abs(inv_signed)
    if SCALE16:
        _f, p2 = _pow2_split(inv)
    u_row = u_ptr + q_ld[:, None] * D
    w_row = w_ptr + r[:, None] * D
    if NEED_W:
        # U_r . w^_r (the normalization's projection), over D in chunks
        dot = tl.zeros((BLOCK_R,), acc_ty)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            u = _load_k(u_row + dd[None, :], dd, D, EVEN_D)
            w = _load_k(w_row + dd[None, :], dd, D, EVEN_D).to(acc_ty)
            dot += tl.sum(u * w, axis=1)
        coef = tl.where(inv_signed > 0, dot * inv * inv, 0.0)  # (U . w^) / n: the w_r term's factor
        if SCALE16:
            alpha = p2 / tl.load(sigma_min_ptr)
        else:
            alpha = tl.full((BLOCK_R,), 1.0, acc_ty)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        mask = q_mask[:, None] & (dd < D)[None, :]
        w = _load_k(w_row + dd[None, :], dd, D, EVEN_D)
        if NEED_W:
            u = _load_k(u_row + dd[None, :], dd, D, EVEN_D)
            dw = alpha[:, None] * (u - coef[:, None] * w.to(acc_ty))
            tl.store(dw_ptr + r[:, None] * D + dd[None, :], _cast(dw, dw_ptr.dtype.element_ty, UPCAST), mask=mask)
        if WRITE_WHAT:
            if SCALE16:
                # mixed precision: rounded to x's dtype first, as every product sees W (marginops/ops.py)
                wh = _rows_to_prod(_as_operand(w, in_ty, UPCAST), p2, in_ty, what_ptr.dtype.element_ty)
            else:
                wh = w
            h_offs = q.to(tl.int64)[:, None] * D + dd[None, :]
            tl.store(what_ptr + h_offs, wh, mask=mask)
            if DUP:  # rows n_rows.. repeat them: the operand of [G_hi | G_lo] (the hi + lo product as one GEMM)
                tl.store(what_ptr + h_offs + n_rows * D, wh, mask=mask)


@triton.jit
def _hybrid_dw_tile(acc, d, q, q_mask, r, coef, alpha, p2, w_ptr, dw_ptr, what_ptr, c0, n_rows, D,
                    in_ty: tl.constexpr, SUBC: tl.constexpr, HAS_CI: tl.constexpr, UPCAST: tl.constexpr,
                    WRITE_WHAT: tl.constexpr, DUP: tl.constexpr, EVEN_D: tl.constexpr):  # fmt: skip
    """One BLOCK_N span of D of ``_hybrid_dw_kernel``'s epilogue: grad_w = alpha (U - coef w), W_hat."""
    if EVEN_D:
        mask = q_mask[:, None]
    else:
        mask = q_mask[:, None] & (d < D)[None, :]
    # chunk row q's offset q D + d (32-bit: the launcher keeps n_rows D below 2^31) serves W_hat and, without
    # class_index, W and grad_w from the chunk's first row: one offset per element instead of two 64-bit ones
    h_offs = q[:, None] * D + d[None, :]
    if HAS_CI:
        w_offs = r[:, None] * D + d[None, :]
        w_base = w_ptr
        dw_base = dw_ptr
    else:
        w_offs = h_offs
        w_base = w_ptr + c0.to(tl.int64) * SUBC * D
        dw_base = dw_ptr + c0.to(tl.int64) * SUBC * D
    w = tl.load(w_base + w_offs, mask=mask, other=0.0)
    w_op = _as_operand(w, in_ty, UPCAST)  # W as the cosines saw it (rounded to x's dtype in mixed precision)
    dw = alpha[:, None] * (acc - coef[:, None] * w_op.to(tl.float32))
    tl.store(dw_base + w_offs, _cast(dw, dw_ptr.dtype.element_ty, UPCAST), mask=mask)
    if WRITE_WHAT:
        # W reloaded (an L1 hit) rather than held across the grad_weight stores: fewer live registers
        w_op = _as_operand(tl.load(w_base + w_offs, mask=mask, other=0.0), in_ty, UPCAST)
        wh = _rows_to_prod(w_op, p2, in_ty, what_ptr.dtype.element_ty)
        tl.store(what_ptr + h_offs, wh, mask=mask)
        if DUP:
            tl.store(what_ptr + n_rows * D + h_offs, wh, mask=mask)


@triton.jit
def _hybrid_dw_kernel(
    g_ptr,
    xr_ptr,
    x_ptr,
    w_ptr,
    ci_ptr,
    inv_ptr,
    radial_ptr,
    dw_ptr,
    what_ptr,
    sigma_min_ptr,
    c0,
    n_rows,
    K,
    D,
    n_slots,
    SUBC: tl.constexpr,
    HAS_CI: tl.constexpr,
    UPCAST: tl.constexpr,
    WRITE_WHAT: tl.constexpr,
    DUP: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """grad_weight's rows (BLOCK_M chunk rows x 2 BLOCK_N of D) as one product with the projection in its epilogue,
    16-bit inputs, a batch of one row tile: U = G^T x' over the K = depth * bt rows of the block (G read as
    (K, n_rows) rows: hi_0, lo_0, hi_1, ... with SPLIT), then grad_w_r = alpha_r (U_r - (t_r / n_r) w_r) with
    t_r = U_r . w^_r summed from the gradient-block kernel's per-program slots, cast and written through
    class_index; with WRITE_WHAT the dX operand W_hat from the same W tile (as ``_hybrid_weight_rows_kernel``).
    Two accumulators of BLOCK_N columns share each G tile (G is re-read from L2 D / (2 BLOCK_N) times) while the
    epilogue holds one span's W tile at a time (one 128 x 256 accumulator's epilogue spills on sm_90)."""
    in_ty: tl.constexpr = x_ptr.dtype.element_ty  # the products' dtype (W may be float32: mixed precision)
    # the D halves fastest: the programs of one row block run together and share its G tiles in L2 (one grid axis:
    # a chunk of any size fits it)
    halves = tl.cdiv(D, 2 * BLOCK_N)
    pid_n = tl.program_id(0) % halves
    pid_m = tl.program_id(0) // halves
    q = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_mask = q < n_rows
    d0 = pid_n * (2 * BLOCK_N) + tl.arange(0, BLOCK_N)
    d1 = d0 + BLOCK_N
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    # masked loads (0 past K, n_rows or D), not clamped indices: the contiguous axis keeps its vector loads
    g_col = g_ptr + q[None, :]
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < K
        kk64 = kk.to(tl.int64)[:, None]
        gt = tl.trans(tl.load(g_col + kk64 * n_rows, mask=k_mask[:, None] & q_mask[None, :], other=0.0))
        if EVEN_D:
            x0 = tl.load(xr_ptr + kk64 * D + d0[None, :], mask=k_mask[:, None], other=0.0)
            x1 = tl.load(xr_ptr + kk64 * D + d1[None, :], mask=k_mask[:, None], other=0.0)
        else:
            x0 = tl.load(xr_ptr + kk64 * D + d0[None, :], mask=k_mask[:, None] & (d0 < D)[None, :], other=0.0)
            x1 = tl.load(xr_ptr + kk64 * D + d1[None, :], mask=k_mask[:, None] & (d1 < D)[None, :], other=0.0)
        acc0 = tl.dot(gt, x0, acc0)
        acc1 = tl.dot(gt, x1, acc1)
    q64 = tl.minimum(q, n_rows - 1).to(tl.int64)
    r = _chunk_weight_rows(ci_ptr, c0, q64, SUBC, HAS_CI)
    inv_signed = tl.load(inv_ptr + q64)  # the gradient-block kernel's 1/n_r, negative: no projection
    inv = tl.abs(inv_signed)
    _f, p2 = _pow2_split(inv)
    radial = tl.zeros((BLOCK_M,), tl.float32)
    for slot in range(n_slots):  # in slot order: deterministic
        radial += tl.load(radial_ptr + slot * n_rows + q64)
    coef = tl.where(inv_signed > 0, radial * inv, 0.0)
    alpha = p2 / tl.load(sigma_min_ptr)
    _hybrid_dw_tile(acc0, d0, q, q_mask, r, coef, alpha, p2, w_ptr, dw_ptr, what_ptr, c0, n_rows, D, in_ty, SUBC,
                    HAS_CI, UPCAST, WRITE_WHAT, DUP, EVEN_D)  # fmt: skip
    _hybrid_dw_tile(acc1, d1, q, q_mask, r, coef, alpha, p2, w_ptr, dw_ptr, what_ptr, c0, n_rows, D, in_ty, SUBC,
                    HAS_CI, UPCAST, WRITE_WHAT, DUP, EVEN_D)  # fmt: skip
