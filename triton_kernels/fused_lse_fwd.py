"""Forward kernels of the fused op: per-row log-sum-exp and argmax over N class columns.

Design
------
Grid = (row tiles of BLOCK_M rows) x (SPLITS class splits).  Program (m, s) streams over the class tiles of
split s (a contiguous range of ceil(ceil(N / BLOCK_N) / SPLITS) tiles of BLOCK_N columns), recomputing the
cosine tile with ``tl.dot`` (fp32 accumulation) in a K-loop that also gathers the W row sums of squares,
applies the epilogue (target column, CurricularFace, filtering, subcenter max) and keeps an online
(max, sum-exp) and an (argmax value, index) per row.  It writes O(B x SPLITS) partials (m, l, best, arg);
``_lse_merge_kernel`` combines them in split order (deterministic: no atomics anywhere in the forward).

Why this grid (B=1024, C=1M, D=512 on an H100 with 132 SMs): a grid of row tiles alone gives 8-16 programs
(B / BLOCK_M), a fraction of the SMs; one program per (row tile, class tile) gives 60k programs and a
B x (C / BLOCK_N) partial buffer.  Row tiles x up to ~4 waves' worth of splits, the split count chosen so
that the last wave is (nearly) full (launch.py ``_fwd_splits``, triton_kernels/_waves.py), gives partials of
B x ~66 floats, and since axis 0 (the row tile) varies fastest, the B / BLOCK_M programs of one split run at
the same time and stream the same W tiles: W is read from HBM about once, the other row tiles hit in L2
(x itself, 1 MB in bf16, stays L2-resident).  The work is one (B x C x D) GEMM, bound by tensor cores.

Memory beyond inputs/outputs: 4 x SPLITS x B partial values (m, l, best in the acc dtype; arg int64).
"""

import triton
import triton.language as tl

from ._common import _class_rows, _cos_tile, _log2e, _logits, _nontarget_phi, _split_tiles


@triton.jit
def _lse_fwd_kernel(
    x_ptr,
    w_ptr,
    ci_ptr,
    labels_ptr,
    tgt_ptr,
    rscale_ptr,
    thr_ptr,
    m_part_ptr,
    l_part_ptr,
    best_part_ptr,
    arg_part_ptr,
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
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    acc_ty: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    non_target_param = tl.load(t_ptr)  # acc-dtype scalars (see launch.py)
    filter_threshold = tl.load(filt_ptr)
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    # padding rows repeat row B-1 (clamped index: unmasked loads); their results are never stored
    rows_ld = tl.minimum(rows, B - 1).to(tl.int64)
    lab = tl.load(labels_ptr + rows_ld)
    tgt = tl.load(tgt_ptr + rows_ld)
    rscale = tl.load(rscale_ptr + rows_ld)
    thr = tl.load(thr_ptr + rows_ld)

    log2e = _log2e(acc_ty)
    m_i = tl.full((BLOCK_M,), float("-inf"), acc_ty)
    l_i = tl.zeros((BLOCK_M,), acc_ty)
    best = tl.full((BLOCK_M,), float("-inf"), acc_ty)
    arg = tl.zeros((BLOCK_M,), tl.int64)

    t_lo, t_hi = _split_tiles(N, pid_s, SPLITS, BLOCK_N)
    for t in range(t_lo, t_hi):
        col0 = t * BLOCK_N
        col_mask = tl.arange(0, BLOCK_N) < N - col0
        base_r = _class_rows(ci_ptr, tl.minimum(col0 + tl.arange(0, BLOCK_N), N - 1), SUBC, HAS_CI)
        c, _sub, _inv = _cos_tile(
            x_ptr, w_ptr, rows_ld, base_r, D, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, SUBC, DOT_PREC, UPCAST, "x"
        )

        # argmax of the raw cosine: NaN ranks above everything (as torch.argmax), smallest index on ties;
        # a later tile only wins with a strictly larger value
        key = tl.where(c != c, float("inf"), c)
        key = tl.where(col_mask[None, :], key, float("-inf"))
        t_best = tl.max(key, axis=1)
        t_arg = tl.min(tl.where(key == t_best[:, None], tl.arange(0, BLOCK_N)[None, :], BLOCK_N), axis=1)
        upd = t_best > best
        best = tl.where(upd, t_best, best)
        arg = tl.where(upd, col0 + t_arg.to(tl.int64), arg)

        phi, _dphi = _nontarget_phi(c, thr, non_target_param, filter_threshold, NON_TARGET, FILTER)
        z, _is_t = _logits(c, phi, col0, col_mask, lab, tgt, rscale, BLOCK_N)
        # online log-sum-exp; m_safe avoids (-inf) - (-inf) while a row has seen no column yet; exp as exp2 with
        # log2(e) folded into the row constant (one FFMA and the ex2 unit per logit)
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        m2 = m_safe * log2e
        l_i = l_i * tl.exp2(m_i * log2e - m2) + tl.sum(tl.exp2(z * log2e - m2[:, None]), axis=1)
        m_i = m_new

    out = pid_s.to(tl.int64) * B + rows
    tl.store(m_part_ptr + out, m_i, mask=row_mask)
    tl.store(l_part_ptr + out, l_i, mask=row_mask)
    tl.store(best_part_ptr + out, best, mask=row_mask)
    tl.store(arg_part_ptr + out, arg, mask=row_mask)


@triton.jit
def _lse_merge_kernel(
    m_part_ptr,
    l_part_ptr,
    best_part_ptr,
    arg_part_ptr,
    lse_ptr,
    argmax_ptr,
    B,
    SPLITS,
    BLOCK: tl.constexpr,
):
    """lse = M + log(sum_s l_s exp(m_s - M)); argmax from the first split holding the best value."""
    acc_ty: tl.constexpr = lse_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < B
    rows64 = rows.to(tl.int64)
    m_tot = tl.full((BLOCK,), float("-inf"), acc_ty)
    for s in range(SPLITS):
        m_s = tl.load(m_part_ptr + s * B + rows64, mask=mask, other=float("-inf"))
        m_tot = tl.maximum(m_tot, m_s)
    m_safe = tl.where(m_tot == float("-inf"), 0.0, m_tot)
    l_tot = tl.zeros((BLOCK,), acc_ty)
    best = tl.full((BLOCK,), float("-inf"), acc_ty)
    arg = tl.zeros((BLOCK,), tl.int64)
    for s in range(SPLITS):
        off = s * B + rows64
        m_s = tl.load(m_part_ptr + off, mask=mask, other=float("-inf"))
        l_s = tl.load(l_part_ptr + off, mask=mask, other=0.0)
        l_tot += l_s * tl.exp(m_s - m_safe)
        b_s = tl.load(best_part_ptr + off, mask=mask, other=float("-inf"))
        a_s = tl.load(arg_part_ptr + off, mask=mask, other=0)
        upd = b_s > best
        best = tl.where(upd, b_s, best)
        arg = tl.where(upd, a_s, arg)
    l_tot = tl.where(mask, l_tot, 1.0)  # padding rows: avoid log(0) noise
    tl.store(lse_ptr + rows64, m_safe + tl.log(l_tot), mask=mask)
    tl.store(argmax_ptr + rows64, arg, mask=mask)
