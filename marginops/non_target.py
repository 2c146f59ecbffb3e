"""Non-target modes of the fused op: how a non-target logit's value φ(c) is formed from its cosine c.

This module is the one Python home of that math: φ, dφ/dc and the largest |dφ/dc| (the bound the 16-bit
gradient scaling of the kernels is computed from) for every mode.  The reference oracle
(marginops/reference.py), the margin specs (marginops/margins.py) and the Triton launchers
(triton_kernels/launch.py) call it.  The same math lives once in each other language:

* C++ (CPU kernels csrc/cpu and CUDA kernels csrc/cuda): ``NonTargetMode``, ``nontarget_phi_dphi`` and
  ``nontarget_max_abs_dphi`` in csrc/margin_math.h;
* Triton: ``_nontarget_phi`` and ``_nontarget_max_abs_dphi`` in triton_kernels/_common.py.

A new mode is a value in ``NonTargetMode`` here and in margin_math.h's enum, and its branch in each of those
functions (the kernels and the op's argument checks follow).  Inter-class filtering (c > filter_threshold
→ φ = 0, dφ = 0) is applied on top of every mode; the kernels fold it into their φ helpers, the reference
applies it separately.
"""

from __future__ import annotations

import enum

import torch


class NonTargetMode(enum.IntEnum):
    """The op's ``non_target`` argument (the same values as csrc/margin_math.h ``NonTargetMode``)."""

    PLAIN = 0  # φ(c) = c
    CURRICULAR = 1  # CurricularFace: φ(c) = c·(t + c) where c > threshold_i, else c


# every mode's value, in order (tests loop over them; a value's name: NonTargetMode(value).name);
# re-exported as marginops.margins.NON_TARGET_MODES
NON_TARGET_MODES = tuple(int(mode) for mode in NonTargetMode)


def _mode(mode: int) -> NonTargetMode:
    try:
        return NonTargetMode(int(mode))
    except ValueError:
        names = ", ".join(f"{int(m)} ({m.name.lower()})" for m in NonTargetMode)
        raise ValueError(f"non_target must be one of {names}, got {mode!r}") from None


def non_target_phi(mode: int, cos: torch.Tensor, threshold: torch.Tensor, modulation_t: float, *, with_dphi=False):
    """φ(c) of a (B, N) block of non-target cosines; ``threshold`` is the (B,) per-row threshold and
    ``modulation_t`` the mode's scalar (CurricularFace's t; the op's ``non_target_param``), a number or a
    tensor.  With ``with_dphi``, (φ, dφ/dc).  Differentiable through autograd (dφ is there for checking the
    kernels' hand-written backward).  NaN cosines take the plain branch (NaN > threshold is false), as in the
    kernels."""
    mode = _mode(mode)
    if mode == NonTargetMode.CURRICULAR:
        above = cos > threshold[:, None]
        phi = torch.where(above, cos * (modulation_t + cos), cos)
        if not with_dphi:
            return phi
        return phi, torch.where(above, modulation_t + 2.0 * cos, torch.ones_like(cos))
    # NonTargetMode.PLAIN
    return (cos, torch.ones_like(cos)) if with_dphi else cos


def non_target_max_abs_dphi(mode: int, modulation_t):
    """max over c ∈ [−1, 1] of |dφ/dc| (filtered columns have dφ = 0): the bound on |dcos| / |g·s| the
    16-bit backward products are scaled by.  Under-stating it overflows fp16 gradient operands silently.
    A tensor ``modulation_t`` gives a tensor (never read on the host, so traceable), a number a float."""
    mode = _mode(mode)
    if mode == NonTargetMode.CURRICULAR:
        # |t + 2c| ≤ |t| + 2
        return modulation_t.abs() + 2.0 if isinstance(modulation_t, torch.Tensor) else abs(float(modulation_t)) + 2.0
    return torch.ones_like(modulation_t) if isinstance(modulation_t, torch.Tensor) else 1.0
