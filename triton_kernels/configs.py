"""Launch configurations: Hopper autotune tables keyed on (D, dtype), and one small config for the interpreter.

Each kernel gets its own ``triton.autotune`` wrapper per (kernel, D bucket, dtype class, split mode), built
lazily and cached, so the candidate list is already specialized to D and the dtype (the autotuner's own key is
``D``; it appends the tensors' dtypes itself).  Tuned: BLOCK_M, BLOCK_N, num_warps, num_stages.  Fixed per
(D, dtype) by the launcher (``tile_k_dv``), so that the kernels know at compile time whether D needs a mask
(EVEN_K / EVEN_DV): BLOCK_K, the K chunk of the cosine GEMM, and BLOCK_DV, the slice of D whose dX / dW
accumulator (BLOCK x BLOCK_DV fp32) a backward program keeps in registers for its whole reduction.

Candidates target an H100/H200 (sm_90: 228 KB shared memory, 64K registers per SM).  None was timed (no GPU
was available when they were written); each was compiled offline for sm_90a and checked with ``ptxas -v``
(D=512 bf16; spills in bytes of stack):

* forward: 128x128 / 8 warps / 3-4 stages, 64x256 / 8, 64x128 / 4 and 128x64 / 4: 255 registers, no spills
  (wgmma, cp.async pipelined K loop).  128x256 spilled ~800 B and is not a candidate.
* backward, fp16 with the hi+lo gradient split (default): BLOCK_DV = 256 (64x256 accumulator).  With
  BLOCK_DV = 512 the two chained dots per tile spilled ~4.5 KB, so D = 512 runs as 2 d-chunks.
* backward without the split (bf16, which always uses one fp16 product; fp16 with ``FAST_GRAD_DOTS``):
  BLOCK_DV = 512 (D <= 512 in one chunk), 64x64 / 8 warps: ~80 B of spills (measured for bf16 operands
  before bf16 moved to fp16 ones; same sizes); 64x128 and 128x64 spilled ~600-900 B and are only candidates
  at BLOCK_DV <= 256.
* float32 (D=128): IEEE fp32 dots (the default) do not use tensor cores and lower to FMA with large register
  footprints: forward 64x64 / 4 warps and backward 64-wide d-chunks are the spill-free choices.  With TF32
  (``ALLOW_TF32``) the dots use wgmma and the half-precision-like tables apply.

Under ``TRITON_INTERPRET=1`` a single small config is used (nothing is benchmarked: autotuning in the
interpreter would take minutes); its tiles (16 x 32, BLOCK_K = BLOCK_DV = 32) make tests cross several row
tiles, class tiles, K chunks and d-chunks even at B=37, D=61.  ``MARGINOPS_TRITON_AUTOTUNE=0`` uses the first
candidate without benchmarking.  Deterministic mode is bitwise reproducible for a fixed configuration; across
processes the autotuner's choice is cached on disk (``cache_results=True``), or pin it with
MARGINOPS_TRITON_AUTOTUNE=0.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from .fused_lse_bwd import _bwd_dw_kernel, _bwd_dx_kernel
from .fused_lse_fwd import _lse_fwd_kernel


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotune_enabled() -> bool:
    return os.environ.get("MARGINOPS_TRITON_AUTOTUNE", "1") != "0"


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


def block_dv(dp2: int, dcls: str, split: bool, tf32: bool) -> int:
    """Slice of D owned by one backward program (the grid gets ceil(D / BLOCK_DV) d-chunks, each of which
    recomputes the cosine tiles; one chunk is cheapest while the accumulator fits in registers)."""
    if interpreting():
        return min(dp2, 32)
    if dcls == "half":
        return min(dp2, 256 if split else 512)
    if dcls == "fp32":
        # IEEE fp32 dots run on FMA units with register-hungry operand layouts: 64-wide chunks
        return min(dp2, 256 if tf32 else 64)
    return min(dp2, 64)


def fwd_configs(dp2: int, dcls: str, split: bool, tf32: bool) -> list[triton.Config]:
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


def _bwd_configs(dp2: int, dcls: str, split: bool, tf32: bool, acc_rows: str) -> list[triton.Config]:
    """Backward candidates; ``acc_rows`` names the tile dimension of the register accumulator ("BLOCK_M" for
    dX, "BLOCK_N" for dW).  Candidates whose accumulator would exceed 128 fp32 registers per thread are
    dropped."""
    if interpreting():
        return [_cfg(4, 1, BLOCK_M=16, BLOCK_N=32)]
    dv = block_dv(dp2, dcls, split, tf32)
    if dcls == "half":
        table = [(64, 64, 8, 3), (64, 64, 8, 2)]
        if dv <= 256:
            table += [(64, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3)]
    elif dcls == "fp32" and tf32:
        table = [(64, 64, 8, 2), (64, 32, 4, 2)]
    elif dcls == "fp32":
        table = [(64, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2)]
        if acc_rows == "BLOCK_N":
            table = [(32, 32, 4, 2), (64, 32, 4, 2), (64, 64, 8, 2)]
    else:
        table = [(32, 32, 4, 2)]
    out = []
    for bm, bn, w, s in table:
        rows = bm if acc_rows == "BLOCK_M" else bn
        if rows * dv <= 128 * 32 * w:
            out.append(_cfg(w, s, BLOCK_M=bm, BLOCK_N=bn))
    return out or [_cfg(4, 2, BLOCK_M=32, BLOCK_N=32)]


def bwd_dx_configs(dp2: int, dcls: str, split: bool, tf32: bool) -> list[triton.Config]:
    return _bwd_configs(dp2, dcls, split, tf32, "BLOCK_M")


def bwd_dw_configs(dp2: int, dcls: str, split: bool, tf32: bool) -> list[triton.Config]:
    return _bwd_configs(dp2, dcls, split, tf32, "BLOCK_N")


_KERNELS = {
    "fwd": (_lse_fwd_kernel, fwd_configs),
    "dx": (_bwd_dx_kernel, bwd_dx_configs),
    "dw": (_bwd_dw_kernel, bwd_dw_configs),
}


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, dp2: int, dcls: str, split: bool, tf32: bool, interp: bool, autotune: bool):
    fn, make = _KERNELS[kind]
    cfgs = make(dp2, dcls, split, tf32)
    if not autotune:
        cfgs = cfgs[:1]
    return triton.autotune(configs=cfgs, key=["D"], cache_results=len(cfgs) > 1)(fn)


def kernel(kind: str, D: int, dtype: torch.dtype, split: bool = False, tf32: bool = False, *, tune: bool = True):
    """The autotuned kernel ``kind`` ("fwd", "dx", "dw") for feature size D, input dtype, gradient split
    (bf16/fp16 backward) and TF32 (fp32) modes.

    ``tune=False`` pins the first candidate (used by the atomic backward, whose accumulating outputs must not
    be run once per candidate).
    """
    return _tuned(kind, d_pow2(D), _dtype_class(dtype), split, tf32, interpreting(),
                  tune and _autotune_enabled())


def tile_k_dv(D: int, dtype: torch.dtype, split: bool = False, tf32: bool = False) -> dict:
    """BLOCK_K, BLOCK_DV and the EVEN_* flags that let the kernels drop their D masks."""
    dcls = _dtype_class(dtype)
    bk, dv = block_k(dcls), block_dv(d_pow2(D), dcls, split, tf32)
    return dict(BLOCK_K=bk, EVEN_K=D % bk == 0, BLOCK_DV=dv, EVEN_DV=D % dv == 0)
