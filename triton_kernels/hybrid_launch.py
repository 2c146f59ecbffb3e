"""Launcher of the hybrid path's backward (backend ``"hybrid"``; forward: the Triton forward, launch.py).

Per class chunk and row tile: ``_hybrid_grad_block_kernel`` (the gradient block G, the per-row sums, on the first
row tile the chunk rows' 1/n, and with one row tile of 16-bit inputs the radial shares), then grad_weight's rows:
``_hybrid_dw_kernel`` (16-bit inputs, one row tile: the product with the projection in its epilogue, and the dX
operand W_hat), else U = G^T x' by ``torch.mm`` and on the last row tile ``_hybrid_weight_rows_kernel``
(grad_weight's rows, and W_hat in the same pass when the batch is one row tile); then dX += G W_hat by
``torch.mm`` (cuBLAS on a GPU, 16-bit operands accumulated into the fp32 U / dX in place; CPU tensors under the
interpreter: float32 products of the 16-bit values, which are exact, summed in float32).  Kernels and numerics:
hybrid_bwd.py; design, product count, workspace and cost model: docs/CHUNKED.md ("The hybrid path").

Written for ``torch.library.triton_op`` like launch.py: no host sync, no control flow on tensor values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch import Tensor
from torch.torch_version import TorchVersion

from . import configs
from ._waves import MIN_SPLIT_CHOICES, whole_wave_splits
from .hybrid_bwd import _hybrid_dw_kernel, _hybrid_grad_block_kernel, _hybrid_weight_rows_kernel
from .launch import (
    _decided,
    _dot_precision,
    _grad_bounds,
    _launches,
    _num_columns,
    _scalars,
    _sm_count,
    _split_grad_dots,
    _upcast,
    filters,
    pow2_scales,
    wrap_triton,
)

MAX_TILE_ROWS = 8192  # rows per tile (bt): a batch up to this size is one tile
G_BLOCK_BYTES = 64 << 20  # the gradient block(s) of one (row tile, chunk): 32768 weight rows at bt = 1024
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 8192, 32768  # weight rows per chunk (Rc = Cc k): the GEMMs' K / M dimension
MAX_SMS = 256  # the column groups are planned for up to this many SMs (more than any GPU the kernels target)


@dataclass(frozen=True)
class HybridPlan:
    """Row tile and class chunk of one backward call, and the workspace (bytes) the launcher allocates for them."""

    B: int
    D: int
    N: int
    k: int
    rows_per_tile: int  # bt
    cols_per_chunk: int  # Cc
    g_blocks: int  # gradient blocks per tile: 0 (neither product), 1, 2 (fp16 hi + lo)
    g_item: int  # bytes per element of G (fp16 for 16-bit inputs, else the input dtype)
    acc_item: int  # bytes per element of the accumulation dtype
    half: bool  # 16-bit inputs (scaled fp16 operands)
    w_hat: bool  # the dX operand is formed (16-bit inputs, or rows gathered through class_index)
    need_x: bool
    need_weight: bool
    block_n: int  # columns per gradient-block tile
    block_m: int  # rows per gradient-block program
    fused_add: bool  # 16-bit products accumulate into an fp32 U / dX in place (cuBLAS), no product buffer
    fused_dw: bool  # grad_weight by _hybrid_dw_kernel (16-bit inputs, one row tile): no U, no row pass over it

    @property
    def chunk_rows(self) -> int:
        return self.cols_per_chunk * self.k

    def workspace_bytes(self) -> int:
        """A bound on the peak extra memory on a GPU beyond the inputs and the outputs: every buffer the launcher
        holds during the chunk loop, or while it forms x' if that is more; the same for every C once a chunk is
        full.  (CPU tensors under the interpreter add the float32 copies of one chunk's operands.)"""
        bt, rc, D, B, acc = self.rows_per_tile, self.chunk_rows, self.D, self.B, self.acc_item
        depth = self.g_blocks or 1  # hi + lo: G rows twice as long, W_hat stacked twice, x' rows repeated
        rows = 4 * B * acc + 1024  # sigma, the per-row bounds, the partials' sums; scalars
        loop = rows + self.g_blocks * bt * rc * self.g_item  # G
        loop += 2 * self.groups * B * acc + rc * acc  # per-row partials (a slot per column group and row), 1/n
        if self.w_hat:
            loop += depth * rc * D * self.g_item
        if self.fused_dw:
            loop += self.radial_slots * rc * acc  # the per-program shares of U_r . w^_r
        if self.need_weight and not self.fused_dw:
            # U (+ a later row tile's product before its add, where the GEMM cannot accumulate in place)
            loop += rc * D * acc * (2 if B > bt and not self.fused_add else 1)
        if self.need_weight:
            loop += depth * B * D * 2 if self.half else 0  # x' in fp16 (rows repeated for hi + lo)
        if self.need_x and self.half:
            loop += B * D * acc + (bt * D * acc if not self.fused_add else 0)  # fp32 dX (+ one product)
        # forming x': x in fp32 and its rescaled copy, or the fp16 copy and its repetition
        prep = rows + max(2 * B * D * acc, (1 + depth) * B * D * 2) if self.half and self.need_weight else 0
        return max(loop, prep)

    @property
    def radial_slots(self) -> int:
        """Row programs of the gradient-block grid: one slot of U_r . w^_r shares each (fused_dw)."""
        return triton.cdiv(self.rows_per_tile, self.block_m) if self.fused_dw else 0

    @property
    def groups(self) -> int:
        """Column groups of the gradient-block grid at most (``_column_groups``)."""
        return max_groups(triton.cdiv(self.rows_per_tile, self.block_m), triton.cdiv(self.cols_per_chunk, self.block_n))


def plan(
    B: int,
    D: int,
    N: int,
    k: int,
    dtype: torch.dtype,
    split: bool,
    need_x: bool = True,
    need_weight: bool = True,
    class_index: bool = False,
    tf32: bool = False,
    rows_per_tile: Optional[int] = None,
    cols_per_chunk: Optional[int] = None,
    fused_add: bool = True,
) -> HybridPlan:
    """bt = min(B, 8192) rows per tile; Rc = clamp(64 MiB / (bt x the bytes of a G element, x 2 for hi + lo), 8192,
    32768) weight rows per chunk (Cc = Rc / k classes), never more than the problem has.  ``rows_per_tile`` /
    ``cols_per_chunk`` override bt / Cc (the caller's MARGINOPS_CHUNK_ROWS / MARGINOPS_CHUNK_COLS; tests: many
    chunks and row tiles at small shapes)."""
    half = dtype in (torch.bfloat16, torch.float16)
    g_item = 2 if half else dtype.itemsize
    blocks = (2 if split else 1) if (need_x or need_weight) else 0
    bt = min(B, MAX_TILE_ROWS)
    rows = min(max(G_BLOCK_BYTES // max(1, (2 if split else 1) * g_item * bt), MIN_CHUNK_ROWS), MAX_CHUNK_ROWS)
    cols = max(1, rows // k)
    bt = rows_per_tile or bt
    cols = cols_per_chunk or cols
    blk = configs.hybrid_block_config(dtype, tf32)
    bt, cols = max(1, min(bt, B)), max(1, min(cols, N))
    # _hybrid_dw_kernel: 16-bit inputs, the batch in one row tile, and its 32-bit in-chunk offsets (W_hat stacked
    # twice: 2 Rc D elements) in range
    fused_dw = half and need_weight and blocks > 0 and bt >= B and 2 * cols * k * D < 2**31
    return HybridPlan(
        B=B,
        D=D,
        N=N,
        k=k,
        rows_per_tile=bt,
        cols_per_chunk=cols,
        g_blocks=blocks,
        g_item=g_item,
        acc_item=8 if dtype == torch.float64 else 4,
        half=half,
        w_hat=need_x and (half or class_index),
        need_x=need_x,
        need_weight=need_weight,
        block_n=blk["BLOCK_N"],
        block_m=blk["BLOCK_M"],
        fused_add=fused_add,
        fused_dw=fused_dw,
    )


def max_groups(row_tiles: int, col_tiles: int) -> int:
    """The most column groups ``_column_groups`` plans: ~2 waves of MAX_SMS SMs, at least MIN_SPLIT_CHOICES,
    never more than the column tiles (the per-row partials hold a slot per group and row)."""
    return max(1, min(col_tiles, max(triton.cdiv(2 * MAX_SMS, row_tiles), MIN_SPLIT_CHOICES)))


def _column_groups(row_tiles: int, col_tiles: int, device: torch.device) -> int:
    """Column groups of the gradient-block grid (row tiles x groups; a program walks its group's column tiles with
    its x tile kept in L1): whole waves of the one CTA per SM the kernel compiles to (bench.gpu_static), up to ~2
    waves; under the interpreter 3 groups, so that tests cross group boundaries and empty groups."""
    if device.type != "cuda":
        return max(1, min(3, col_tiles))
    return whole_wave_splits(row_tiles, _sm_count(device), 2, max_groups(row_tiles, col_tiles))


def _mm(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """a @ b in ``acc`` (fp32 accumulation of 16-bit operands: cuBLAS's fp32-output GEMM on a GPU)."""
    if a.dtype == acc:
        return torch.mm(a, b)
    if a.device.type == "cuda":
        return torch.mm(a, b, out_dtype=acc)
    # no fp32-output 16-bit GEMM on the CPU: products of 16-bit values are exact in fp32, so widening computes the
    # same sums (in torch's CPU order); the copies are one chunk's operands
    return torch.mm(a.to(acc), b.to(acc))


def fused_add(device: torch.device) -> bool:
    """Whether out += a @ b runs as one GEMM accumulating 16-bit products into an fp32 ``out`` (cuBLAS through
    ``addmm``'s out_dtype, torch >= 2.15, whose fake-tensor path, what torch.compile traces, knows out_dtype;
    older torch and the CPU form the product, then add it)."""
    return device.type == "cuda" and TorchVersion(torch.__version__) >= "2.15"


def _mm_add(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b (out in the accumulation dtype)."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    elif fused_add(out.device):
        torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    else:
        out.add_(_mm(a, b, out.dtype))


def hybrid_backward(
    grad_lse: Tensor,
    lse: Tensor,
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    target_logit: Tensor,
    row_scale: Tensor,
    threshold: Tensor,
    class_index: Optional[Tensor],
    non_target_param: Tensor,
    non_target: int,
    filter_threshold: float,
    subcenters: int,
    deterministic: bool,
    need_grad_x: bool = True,
    need_grad_weight: bool = True,
    switches: int = -1,
    *,
    max_abs_dphi: Tensor,
    rows_per_tile: Optional[int] = None,
    cols_per_chunk: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_target_logit, grad_row_scale) of the fused op (marginops/ops.py).  Always
    deterministic (``deterministic`` is accepted for the schema); an unwanted grad_x / grad_weight comes back
    empty, without its product or its allocation.  ``switches``: the Triton switches its forward ran with
    (launch.pack_switches; -1: the defaults).  ``max_abs_dphi``: as for launch.fused_lse_backward;
    ``rows_per_tile`` / ``cols_per_chunk``: the caller's overrides of the plan (``plan``)."""
    B, D = x.shape
    N = _num_columns(weight, class_index, subcenters)
    k = subcenters
    acc = target_logit.dtype
    dev = x.device
    half = x.dtype in (torch.bfloat16, torch.float16)
    need_x, need_w = need_grad_x, need_grad_weight
    empty = B == 0 or D == 0 or N == 0
    # every weight row of a chunk is written; rows outside class_index must read 0
    grad_w = (
        weight.new_empty(0)
        if not need_w
        else torch.zeros_like(weight)
        if class_index is not None or empty
        else torch.empty_like(weight)
    )
    grad_x = (torch.zeros_like(x) if empty else torch.empty_like(x)) if need_x else x.new_empty(0)
    gtl = torch.zeros((B,), dtype=acc, device=dev)
    grs = torch.zeros((B,), dtype=acc, device=dev)
    if empty or not _launches(x):
        return grad_x, grad_w, gtl, grs

    switches = _decided(switches)
    split = _split_grad_dots(x.dtype, switches)
    tf32 = _dot_precision(x.dtype, switches) == "tf32"
    has_ci = class_index is not None
    p = plan(B, D, N, k, x.dtype, split, need_x, need_w, has_ci, tf32, rows_per_tile, cols_per_chunk, fused_add(dev))
    bt, cols, rmax = p.rows_per_tile, p.cols_per_chunk, p.chunk_rows
    upcast = _upcast(x.dtype)
    g = grad_lse.to(acc).contiguous()
    lse = lse.to(acc).contiguous()
    t_buf, f_buf = _scalars(non_target_param, filter_threshold, acc, dev)
    ci = class_index if has_ci else labels  # placeholder pointer when HAS_CI is False
    g_dtype = torch.float16 if half else x.dtype

    # per-row power of two of the fp16 gradient block (hybrid_bwd.py), the dW operand x' = x sigma_min / sigma_i
    # (a power of two <= 1: exact but for entries that fall below fp16's normal range).  sigma_min is taken over
    # the rows with a gradient: a row with g = 0 (or NaN / inf, scale 1) would otherwise push every other row's x'
    # into fp16's subnormals; its own G row is 0 (or non-finite) whatever x' is, which stays finite (ratio <= 1).
    sigma_min = sigma = g
    if half:
        bounds = _grad_bounds(g, row_scale, max_abs_dphi)
        sigma = pow2_scales(bounds)
        sigma_min = torch.where(bounds > 0, sigma, sigma.amax()).amin().reshape(1)
    x_rows = x
    if half and need_w:
        x_factor = (sigma_min / sigma).clamp(max=1.0)  # x'_i . w^_r = x_factor_i c_ir (the radial shares)
        x_rows = (x.to(acc) * x_factor[:, None]).to(torch.float16)
    dx_acc = None
    if need_x:
        dx_acc = torch.zeros((B, D), dtype=acc, device=dev) if half else grad_x.zero_()

    # fp16's hi + lo: rows [hi_i | lo_i] of G, W_hat stacked twice, x' rows repeated (hybrid_bwd.py): one GEMM each
    depth = 2 if split else 1
    G = torch.empty((bt * depth * rmax,), dtype=g_dtype, device=dev) if p.g_blocks else None
    if split and need_w:
        x_rows = x_rows.repeat_interleave(2, dim=0)
    blk = configs.hybrid_block_config(x.dtype, tf32)
    n_ct = triton.cdiv(cols, blk["BLOCK_N"])
    groups = _column_groups(triton.cdiv(bt, blk["BLOCK_M"]), n_ct, dev)
    parts = torch.zeros((2, groups, B), dtype=acc, device=dev)  # per (column group, row): sums over the chunks
    inv = torch.empty((rmax,), dtype=acc, device=dev)  # the chunk rows' signed 1/n (hybrid_bwd.py)
    w_hat = torch.empty((depth * rmax, D), dtype=g_dtype, device=dev) if p.w_hat else None
    rows_cfg = configs.hybrid_rows_config(D)
    dw_cfg = configs.hybrid_dw_config(D, weight.dtype != x.dtype)
    # the gradient-block programs' shares of U_r . w^_r, a slot per row program (fused_dw)
    radial = torch.empty((p.radial_slots, rmax), dtype=acc, device=dev) if p.fused_dw else inv
    tiles = configs.tile_k_dv(D, x.dtype, split, tf32)
    common = dict(SUBC=k, HAS_CI=has_ci, SCALE16=half, UPCAST=upcast)

    def weight_rows(c0: int, nr: int, u_c: Optional[Tensor], write_what: bool) -> None:
        """grad_weight's rows from U (when given) and / or W_hat, for the chunk's nr rows."""
        wrap_triton(_hybrid_weight_rows_kernel)[(triton.cdiv(nr, rows_cfg["BLOCK_R"]),)](
            inv if u_c is None else u_c,
            x,
            weight,
            ci,
            inv,
            inv if u_c is None else grad_w,
            w_hat if write_what else inv,
            sigma_min,
            c0,
            nr,
            D,
            NEED_W=u_c is not None,
            WRITE_WHAT=write_what,
            DUP=split,
            **common,
            **rows_cfg,
        )

    for c0 in range(0, N, cols):
        nc = min(cols, N - c0)
        nr = nc * k
        w_c = w_hat[: depth * nr] if p.w_hat else weight[c0 * k : c0 * k + nr]
        u_c = None
        for r0 in range(0, B, bt):
            n = min(bt, B - r0)
            first, last = r0 == 0, r0 + bt >= B
            g_blk = G[: n * depth * nr].view(n, depth * nr) if G is not None else g
            grid = (triton.cdiv(n, blk["BLOCK_M"]), groups)
            wrap_triton(_hybrid_grad_block_kernel)[grid](
                x,
                weight,
                ci,
                labels,
                target_logit,
                row_scale,
                threshold,
                lse,
                g,
                sigma,
                g_blk,
                parts[0],
                parts[1],
                inv,
                radial,
                x_factor if p.fused_dw else sigma,
                B,
                D,
                r0,
                n,
                c0,
                nc,
                groups,
                int(first),
                t_buf,
                f_buf,
                NON_TARGET=non_target,
                FILTER=filters(filter_threshold),
                DOT_PREC="tf32" if tf32 else "ieee",
                SPLIT=split and G is not None,
                WRITE_G=G is not None,
                RADIAL=p.fused_dw,
                EVEN_K=tiles["EVEN_K"],
                BLOCK_K=tiles["BLOCK_K"],
                **common,
                **blk,
            )
            # W_hat from the grad_weight kernel when that runs before this tile's dX product, else on its own
            what_with_w = need_w and first and last  # (always so with fused_dw: one row tile)
            if p.w_hat and first and not what_with_w:
                weight_rows(c0, nr, None, True)
            if p.fused_dw:
                dw_grid = (triton.cdiv(D, 2 * dw_cfg["BLOCK_N"]) * triton.cdiv(nr, dw_cfg["BLOCK_M"]),)
                wrap_triton(_hybrid_dw_kernel)[dw_grid](
                    g_blk,
                    x_rows,
                    x,
                    weight,
                    ci,
                    inv,
                    radial,
                    grad_w,
                    w_hat if p.w_hat else inv,
                    sigma_min,
                    c0,
                    nr,
                    depth * n,
                    D,
                    triton.cdiv(n, blk["BLOCK_M"]),
                    SUBC=k,
                    HAS_CI=has_ci,
                    UPCAST=upcast,
                    WRITE_WHAT=p.w_hat,
                    DUP=split,
                    **dw_cfg,
                )
            elif need_w:
                g_t = g_blk.view(depth * n, nr).t()
                x_t = x_rows[depth * r0 : depth * (r0 + n)]
                if u_c is None:
                    u_c = _mm(g_t, x_t, acc)
                else:
                    _mm_add(u_c, g_t, x_t)
                if last:
                    weight_rows(c0, nr, u_c, p.w_hat and what_with_w)
            if need_x:
                _mm_add(dx_acc[r0 : r0 + n], g_blk, w_c)
    # per-row sums: each slot summed over the chunks in order by the kernel, then the groups in order here
    sums = parts.sum(dim=1)
    gtl += sums[0]
    grs += sums[1]
    if need_x and half:
        grad_x.copy_(dx_acc.div_(sigma[:, None]))  # a power of two per row: exact, then one rounding to x's dtype
    return grad_x, grad_w, gtl, grs
