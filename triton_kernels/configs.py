"""Launch configurations: Hopper autotune tables keyed on (D, dtype), and one small config for the interpreter.

Each kernel gets its own ``triton.autotune`` wrapper per (kernel, D bucket, dtype class, split mode), built
lazily and cached, so the candidate list is already specialized to D and the dtype (the autotuner's own key is
``D``; it appends the tensors' dtypes itself).  Tuned: BLOCK_M, BLOCK_N, num_warps, num_stages.  Fixed per
(D, dtype) by the launcher (``tile_k_dv``), so that the kernels know at compile time whether D needs a mask
(EVEN_K / EVEN_DV): BLOCK_K, the K chunk of the cosine GEMM, and BLOCK_DV, the slice of D whose dX / dW
accumulator (BLOCK x BLOCK_DV fp32) a backward program keeps in registers for its whole reduction.

Candidates target an H100/H200 (sm_90: 228 KB shared memory, 64K registers per SM).  None has been timed on a
GPU yet.  What they compile to is not written here (hand-copied numbers
drift): ``python -m bench.gpu_static --out DIR --triton-only [--default-configs]`` compiles every candidate
ahead of time for sm_90a and reports registers, spills, shared memory, CTAs per SM, wgmma use and the wave
efficiency of the planned grid; tests/test_gpu_static.py requires the **default** candidate (the first of
each list, the one ``MARGINOPS_TRITON_AUTOTUNE=0`` pins) of every streaming kernel to spill nothing inside a loop
(nor outside them), to use wgmma for 16-bit / TF32 inputs and to fill whole waves.  The choices the report led to:

* forward: 128 x 128 / 8 warps first for 16-bit and TF32 inputs; IEEE fp32 and fp64 dots lower to FMA with
  large register footprints, hence their small tiles.
* backward: a program keeps a (BLOCK x BLOCK_DV) fp32 accumulator in registers and stages a 16-bit
  (BLOCK x BLOCK_DV) operand tile (W rows for dX) through registers for its conversion to the product dtype, so
  the default candidates keep that tile's other side narrow (BLOCK_N = 32; 64 x 64 tiles spilled).  The dW kernel
  forms dW^T = x^T dc, so that its 32-class tiles are the product's N side and the d-chunk its M side: wgmma, where
  dW = dc^T x had 32 rows, below wgmma's 64, and ran on mma.sync; its x operand comes converted from the launcher.
  fp16 with the hi + lo gradient split (default) runs BLOCK_DV = 256, its dX product as one
  K = 2 x BLOCK_N product (``fused_lse_bwd._mma_split_k``; two chained ones spilled), which leaves room for
  64 x 64 tiles there; bf16 and fp16 with ``FAST_GRAD_DOTS`` run BLOCK_DV = 512 (D <= 512 in one d-chunk): bf16
  dX multiplies its W tile as loaded (dc as bf16 hi + lo), which no longer passes through registers (as fp16
  operands it left that kernel 8 bytes a thread to spill).  IEEE fp32 runs 64-wide d-chunks.
* mixed precision (16-bit x, float32 W) runs the 16-bit candidates: the forward's float32 W tiles double their
  shared memory, which every candidate still fits in 227 KB; the backward kernels whose dX product stages
  float32 W rows (dX, atomic dW) take 256-wide d-chunks (``block_dv``), 512 spilled.
* ``_DEFAULT_CTAS_PER_SM`` below holds the CTAs per SM of the default candidates, which the split planners
  (launch.py) size whole waves with; the report test checks it against the compiled code.

Under ``TRITON_INTERPRET=1`` a single small config is used (nothing is benchmarked: autotuning in the
interpreter would take minutes); its tiles (16 x 32, BLOCK_K = BLOCK_DV = 32) make tests cross several row
tiles, class tiles, K chunks and d-chunks even at B=37, D=61.  ``MARGINOPS_TRITON_AUTOTUNE=0`` uses the first
candidate without benchmarking.  Deterministic mode is bitwise reproducible for a fixed configuration; across
processes the autotuner's choice is cached on disk (``cache_results=True``), or pin it with
MARGINOPS_TRITON_AUTOTUNE=0.
"""

from __future__ import annotations

import functools

import torch
import triton

from .fused_lse_bwd import _bwd_dw_kernel, _bwd_dx_kernel
from .fused_lse_fwd import _lse_fwd_kernel


def interpreting() -> bool:
    """TRITON_INTERPRET, now, as Triton reads it (its knob)."""
    return bool(triton.knobs.runtime.interpret)


def _dtype_class(dtype: torch.dtype) -> str:
    if dtype == torch.float64:
        return "fp64"
    if dtype == torch.float32:
        return "fp32"
    return "half"  # bfloat16, float16


def _cfg(num_warps: int, num_stages: int, **kw: int) -> triton.Config:
    return triton.Config(dict(kw), num_warps=num_warps, num_stages=num_stages)


def d_pow2(D: int) -> int:
    return max(16, triton.next_power_of_2(max(int(D), 1)))


def block_k(dcls: str) -> int:
    """K chunk of the cosine GEMM."""
    if interpreting():
        return 32
    return {"half": 64, "fp32": 32, "fp64": 16}[dcls]


def block_dv(dp2: int, dcls: str, split: bool, tf32: bool, mixed: bool = False) -> int:
    """Slice of D owned by one backward program (the grid gets ceil(D / BLOCK_DV) d-chunks, each of which
    recomputes the cosine tiles; one chunk is cheapest while the accumulator fits in registers).  ``mixed``: the
    program's dX product stages float32 W rows (mixed precision), twice the registers of 16-bit ones."""
    if interpreting():
        return min(dp2, 32)
    if dcls == "half":
        # float32 W rows of 512 columns spilled next to the dX accumulator (bench.gpu_static, bf16 x + fp32 W)
        return min(dp2, 256 if split or mixed else 512)
    if dcls == "fp32":
        # IEEE fp32 dots run on FMA units with register-hungry operand layouts: 64-wide chunks
        return min(dp2, 256 if tf32 else 64)
    return min(dp2, 64)


def fwd_configs(dp2: int, dcls: str, split: bool, tf32: bool, mixed: bool = False) -> list[triton.Config]:
    # mixed precision stages float32 W tiles (2x their shared memory): every half candidate still fits in 227 KB
    if interpreting():
        return [_cfg(4, 1, BLOCK_M=16, BLOCK_N=32)]
    if dcls == "half":
        table = [(128, 128, 8, 3), (128, 128, 8, 4), (64, 256, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4)]
    elif dcls == "fp32" and tf32:
        table = [(128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)]
    elif dcls == "fp32":
        table = [(64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3)]
    else:
        table = [(32, 32, 4, 2), (64, 32, 4, 2)]
    return [_cfg(w, s, BLOCK_M=bm, BLOCK_N=bn) for bm, bn, w, s in table]


# default dX candidate of 16-bit inputs, with 512 / 256-wide d-chunks (without / with the hi + lo gradient split or
# mixed precision)
HALF_DX_DEFAULT = {False: (64, 32, 8, 3), True: (64, 64, 8, 3)}


def _bwd_configs(dp2: int, dcls: str, split: bool, tf32: bool, mixed: bool, acc_rows: str) -> list[triton.Config]:
    """Backward candidates; ``acc_rows`` names the tile dimension of the register accumulator ("BLOCK_M" for
    dX, "BLOCK_N" for dW).  Candidates whose accumulator would exceed 128 fp32 registers per thread are
    dropped."""
    if interpreting():
        return [_cfg(4, 1, BLOCK_M=16, BLOCK_N=32)]
    dv = block_dv(dp2, dcls, split, tf32, mixed)
    if dcls == "half":
        # first: BLOCK_N = 32, the narrow side of the product tile (see the module docstring)
        first = HALF_DX_DEFAULT[split or mixed] if acc_rows == "BLOCK_M" else (64, 32, 8, 3)
        table = [first, (64, 64, 8, 3), (64, 64, 8, 2)]
        if dv <= 256:
            table += [(64, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3)]
    elif dcls == "fp32" and tf32:
        table = [(64, 64, 8, 2), (64, 32, 4, 2)]
    elif dcls == "fp32":
        table = [(32, 32, 4, 2), (64, 32, 4, 2), (64, 64, 8, 2)]
    else:
        table = [(32, 32, 4, 2)]
    out = []
    for bm, bn, w, s in dict.fromkeys(table):  # in order, without repeats
        rows = bm if acc_rows == "BLOCK_M" else bn
        if rows * dv <= 128 * 32 * w:
            out.append(_cfg(w, s, BLOCK_M=bm, BLOCK_N=bn))
    return out or [_cfg(4, 2, BLOCK_M=32, BLOCK_N=32)]


def bwd_dx_configs(dp2: int, dcls: str, split: bool, tf32: bool, mixed: bool = False) -> list[triton.Config]:
    return _bwd_configs(dp2, dcls, split, tf32, mixed, "BLOCK_M")


def bwd_dw_configs(dp2: int, dcls: str, split: bool, tf32: bool, mixed: bool = False) -> list[triton.Config]:
    return _bwd_configs(dp2, dcls, split, tf32, mixed, "BLOCK_N")


# The hybrid backward's gradient-block kernel (hybrid_bwd.py): a (BLOCK_M x BLOCK_N) cosine tile per step and its
# stores, no accumulator across tiles.  The forward's 128 x 128 / 8 warps spilled 32 bytes (the epilogue keeps c,
# 1/n and dc tiles live); 128 x 64 / 8 warps does not for any 16-bit or mixed input (4 warps: 255 registers and
# 8 bytes of spills with fp16's hi + lo); bench.gpu_static reports each.  Fixed rather than autotuned: the
# launcher sizes the per-row partials by BLOCK_N.
def hybrid_block_config(dtype: torch.dtype, tf32: bool = False) -> dict:
    """BLOCK_M, BLOCK_N, num_warps, num_stages of ``_hybrid_grad_block_kernel``."""
    if interpreting():
        bm, bn, w, s = 16, 32, 4, 1
    else:
        bm, bn, w, s = {"half": (128, 64, 8, 3), "fp32": (128, 64, 8, 3) if tf32 else (64, 64, 4, 3)}.get(
            _dtype_class(dtype), (32, 32, 4, 2)
        )
        if dtype == torch.float16:
            s = 2  # hi + lo and the 1/n store: a third stage's registers spilled (bench.gpu_static)
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)


def hybrid_dw_config(D: int, mixed: bool = False) -> dict:
    """BLOCK_M (weight rows) x 2 BLOCK_N (of D) output tiles, BLOCK_K (batch rows per step) of
    ``_hybrid_dw_kernel``: 128 x (2 x 128) on wgmma (two warpgroups), so that G is re-read from L2 D / 256 times
    and x' Rc / 128 times; 2 x 64 with a float32 weight (its epilogue's fp32 W tile spilled at 2 x 128)."""
    if interpreting():
        bn = 16
        cfg = dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=16, num_warps=4, num_stages=1)
    else:
        bn = max(16, min(64 if mixed else 128, d_pow2(D) // 2))
        cfg = dict(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=64, num_warps=8, num_stages=3)
    return dict(cfg, EVEN_D=D % (2 * bn) == 0)


def hybrid_rows_config(D: int) -> dict:
    """BLOCK_R (weight rows per program), BLOCK_D and EVEN_D of the hybrid path's row kernel (bandwidth-bound)."""
    bd = 32 if interpreting() else min(128, d_pow2(D))
    return dict(BLOCK_R=16 if interpreting() else 32, BLOCK_D=bd, EVEN_D=D % bd == 0, num_warps=4)


# CTAs per SM of each streaming kernel's default candidate (the first one), as bench.gpu_static reads it from
# the compiled sm_90a code (registers, shared memory): the split planners (launch.py) size whole waves of
# programs with it.  tests/test_gpu_static.py checks it against the report, so a config or compiler change
# that moves the occupancy fails there rather than silently leaving a second, almost empty wave.
_DEFAULT_CTAS_PER_SM = {
    # (kind, dtype class, split, tf32)
    ("fwd", "half", False, False): 1,
    ("fwd", "fp32", False, True): 1,
    ("fwd", "fp32", False, False): 2,
    ("fwd", "fp64", False, False): 4,
    ("dx", "half", False, False): 1,
    ("dx", "half", True, False): 1,
    ("dx", "fp32", False, True): 1,
    ("dx", "fp32", False, False): 3,
    ("dx", "fp64", False, False): 2,
}


def default_plan(
    kind: str, D: int, dtype: torch.dtype, split: bool = False, tf32: bool = False, mixed: bool = False
) -> tuple[int, int, int]:
    """(BLOCK_M, CTAs per SM, BLOCK_N) of the default candidate of ``kind`` ("fwd", "dx"): what the grid
    planners need to size whole waves.  Mixed precision keeps the 16-bit occupancy (one CTA per SM)."""
    dcls = _dtype_class(dtype)
    cfg = _KERNELS[kind][1](d_pow2(D), dcls, split, tf32, mixed)[0]
    key = (kind, dcls, split and dcls == "half" and kind != "fwd", tf32 and dcls == "fp32")
    ctas = 1 if interpreting() else _DEFAULT_CTAS_PER_SM[key]
    return cfg.kwargs["BLOCK_M"], ctas, cfg.kwargs["BLOCK_N"]


_KERNELS = {
    "fwd": (_lse_fwd_kernel, fwd_configs),
    "dx": (_bwd_dx_kernel, bwd_dx_configs),
    "dw": (_bwd_dw_kernel, bwd_dw_configs),
}


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, dp2: int, dcls: str, split: bool, tf32: bool, mixed: bool, interp: bool, autotune: bool):
    fn, make = _KERNELS[kind]
    cfgs = make(dp2, dcls, split, tf32, mixed)
    if not autotune:
        cfgs = cfgs[:1]
    return triton.autotune(configs=cfgs, key=["D"], cache_results=len(cfgs) > 1)(fn)


def kernel(
    kind: str,
    D: int,
    dtype: torch.dtype,
    split: bool = False,
    tf32: bool = False,
    *,
    tune: bool = True,
    mixed: bool = False,
):
    """The autotuned kernel ``kind`` ("fwd", "dx", "dw") for feature size D, input (x) dtype, gradient split
    (bf16/fp16 backward) and TF32 (fp32) modes.

    ``tune=False`` pins the first candidate (the atomic backward, whose accumulating outputs must not be run once
    per candidate, and the launchers when their caller turned autotuning off: MARGINOPS_TRITON_AUTOTUNE=0).
    ``mixed``: the kernel's dX product stages float32 W rows (a float32 weight with 16-bit x), which narrows its
    d-chunks (``block_dv``).
    """
    dcls = _dtype_class(dtype)
    return _tuned(kind, d_pow2(D), dcls, split, tf32, mixed, interpreting(), tune)


def tile_k_dv(D: int, dtype: torch.dtype, split: bool = False, tf32: bool = False, mixed: bool = False) -> dict:
    """BLOCK_K, BLOCK_DV and the EVEN_* flags that let the kernels drop their D masks."""
    dcls = _dtype_class(dtype)
    bk, dv = block_k(dcls), block_dv(d_pow2(D), dcls, split, tf32, mixed)
    return dict(BLOCK_K=bk, EVEN_K=D % bk == 0, BLOCK_DV=dv, EVEN_DV=D % dv == 0)
