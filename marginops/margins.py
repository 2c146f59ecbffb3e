"""Margin specs (DESIGN.md §1) and the pre-pass that turns one of them into the fused op's inputs.

Every margin here changes only the target logit (a function of the one cosine c_iy per row) and,
for CurricularFace, the non-target logits through a per-row threshold and a scalar t.  The pre-pass
computes those in plain PyTorch (O(B·D)), so autograd differentiates the margins and the kernels
stay margin-agnostic (DESIGN.md §2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

# F.normalize's eps: rows are divided by max(‖v‖, NORM_EPS).
NORM_EPS = 1e-12
# sin θ is written sqrt(max(1 − c², SIN_EPS)) so that its gradient is finite at c = ±1.
SIN_EPS = 1e-12

# Non-target modes understood by the kernels (csrc/margin_math.h, triton_kernels).
NON_TARGET_PLAIN = 0
NON_TARGET_CURRICULAR = 1
# filter_threshold value that turns inter-class filtering off (cosines never exceed 1).
FILTER_OFF = 2.0


def sin_theta(c: torch.Tensor) -> torch.Tensor:
    """sin(acos(c)) with a finite gradient everywhere, c = ±1 included."""
    return torch.sqrt(torch.clamp(1.0 - c * c, min=SIN_EPS))


def cos_theta_plus(c: torch.Tensor, m: float) -> torch.Tensor:
    """cos(acos(c) + m) without differentiating acos."""
    return c * math.cos(m) - sin_theta(c) * math.sin(m)


def theta(c: torch.Tensor) -> torch.Tensor:
    """acos(c) through atan2, whose gradient stays finite at c = ±1."""
    return torch.atan2(sin_theta(c), c)


def chebyshev_cos(c: torch.Tensor, m: int) -> torch.Tensor:
    """cos(m·acos(c)) for integer m ≥ 0 as the Chebyshev polynomial T_m(c): a polynomial, so smooth at ±1."""
    prev, cur = torch.ones_like(c), c
    if m == 0:
        return prev
    for _ in range(m - 1):
        prev, cur = cur, 2.0 * c * cur - prev
    return cur


class Margin:
    """Base class of the margin specs: how the target logit and the non-target logits are formed.

    ``row_scale(x_norm)`` is the factor every logit of a row carries (s, or ‖x‖·scale for SphereFace);
    ``psi(c)`` the target value before that factor; ``threshold(c)`` CurricularFace's per-row
    threshold.  Subclasses are frozen dataclasses so that they can be compared and hashed.
    """

    non_target_mode: int = NON_TARGET_PLAIN
    curricular_t: float = 0.0

    def row_scale(self, x_norm: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x_norm, float(self.s))

    def psi(self, c: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target_logit(self, c: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
        if getattr(self, "detach_margin", False):
            return row_scale * (c + (self.psi(c) - c).detach())
        return row_scale * self.psi(c)

    def threshold(self, c: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(c)

    def phi(self, cos: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """Non-target value for a (B, N) block of cosines; threshold is (B,)."""
        return cos

    def validate(self) -> None:
        pass


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


@dataclass(frozen=True)
class NormFace(Margin):
    """z_iy = s·c, z_ij = s·c (normalized softmax, no margin)."""

    s: float = 64.0

    def __post_init__(self):
        _check_positive("NormFace.s", self.s)

    def psi(self, c):
        return c


@dataclass(frozen=True)
class CosFace(Margin):
    """Additive cosine margin: z_iy = s·(c − m)."""

    s: float = 64.0
    m: float = 0.35

    def __post_init__(self):
        _check_positive("CosFace.s", self.s)

    def psi(self, c):
        return c - self.m


@dataclass(frozen=True)
class ArcFace(Margin):
    """Additive angular margin: z_iy = s·cos(θ + m), falling back to s·(c − m·sin m) past θ = π − m.

    easy_margin: cos(θ + m) where c > 0, else c.  detach_margin: z_iy = s·(c + stopgrad(ψ(c) − c)).
    """

    s: float = 64.0
    m: float = 0.5
    easy_margin: bool = False
    detach_margin: bool = False

    def __post_init__(self):
        _check_positive("ArcFace.s", self.s)
        if not 0.0 <= self.m < math.pi:
            raise ValueError(f"ArcFace.m must be in [0, pi), got {self.m!r}")

    def psi(self, c):
        shifted = cos_theta_plus(c, self.m)
        if self.easy_margin:
            return torch.where(c > 0, shifted, c)
        return torch.where(c >= math.cos(math.pi - self.m), shifted, c - self.m * math.sin(self.m))


@dataclass(frozen=True)
class CombinedMargin(Margin):
    """insightface's combined margin: z_iy = s·(cos(m1·θ + m2) − m3), no fallback."""

    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0

    def __post_init__(self):
        _check_positive("CombinedMargin.s", self.s)
        _check_positive("CombinedMargin.m1", self.m1)

    def psi(self, c):
        if self.m1 == 1.0:
            return cos_theta_plus(c, self.m2) - self.m3
        return torch.cos(self.m1 * theta(c) + self.m2) - self.m3


@dataclass(frozen=True)
class SphereFace(Margin):
    """A-Softmax: x is not normalized.  z_iy = ‖x‖·scale·(Ψ(θ) + λ·c)/(1 + λ), z_ij = ‖x‖·scale·c,
    Ψ(θ) = (−1)^k·cos(mθ) − 2k with k = ⌊mθ/π⌋ and integer m."""

    m: int = 4
    lambda_: float = 0.0
    scale: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.m, int) and self.m >= 1):
            raise ValueError(f"SphereFace.m must be an integer >= 1, got {self.m!r}")
        if not (math.isfinite(self.lambda_) and self.lambda_ >= 0):
            raise ValueError(f"SphereFace.lambda_ must be >= 0, got {self.lambda_!r}")
        _check_positive("SphereFace.scale", self.scale)

    def row_scale(self, x_norm):
        return x_norm * self.scale

    def psi(self, c):
        with torch.no_grad():
            k = torch.floor(self.m * theta(c) / math.pi).clamp_(0, self.m)
            sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        big_psi = sign * chebyshev_cos(c, self.m) - 2.0 * k
        return (big_psi + self.lambda_ * c) / (1.0 + self.lambda_)


@dataclass(frozen=True)
class CurricularFace(Margin):
    """CurricularFace: target as ArcFace; non-target c·(t + c) where c > cos(θ_iy + m), else c.

    The functional form takes t as given; the module (nn.CurricularFaceLoss) keeps it as an EMA.
    """

    s: float = 64.0
    m: float = 0.5
    t: float = 0.0

    non_target_mode = NON_TARGET_CURRICULAR

    def __post_init__(self):
        _check_positive("CurricularFace.s", self.s)
        if not 0.0 <= self.m < math.pi:
            raise ValueError(f"CurricularFace.m must be in [0, pi), got {self.m!r}")

    @property
    def curricular_t(self) -> float:
        return float(self.t)

    def psi(self, c):
        shifted = cos_theta_plus(c, self.m)
        return torch.where(c >= math.cos(math.pi - self.m), shifted, c - self.m * math.sin(self.m))

    def threshold(self, c):
        with torch.no_grad():
            return cos_theta_plus(c, self.m)

    def phi(self, cos, threshold):
        return torch.where(cos > threshold[:, None], cos * (self.t + cos), cos)


@dataclass
class PrePass:
    """What the pre-pass hands to the fused op (all (B,) in the accumulation dtype, autograd-connected)."""

    x_hat: torch.Tensor  # (B, D) normalized embeddings
    cos_target: torch.Tensor  # c_iy (clamped to [-1, 1]; 0 for ignored rows)
    target_logit: torch.Tensor  # z_iy
    row_scale: torch.Tensor  # factor of every logit of the row
    threshold: torch.Tensor  # CurricularFace threshold (unused otherwise)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pre_pass(
    margin: Margin,
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    safe_labels: torch.Tensor,
    subcenters: int = 1,
) -> PrePass:
    """Target cosines, target logits and per-row factors, in O(B·D), differentiable.

    ``safe_labels`` holds a valid class for every row (ignored rows carry any valid class; their
    loss is masked later).  With ``subcenters`` = k, class c owns rows c·k … c·k+k−1 of ``weight``
    and its cosine is the max over them.
    """
    acc = accumulation_dtype(embeddings.dtype)
    x = embeddings.to(acc)
    x_norm = torch.linalg.vector_norm(x, dim=1)
    x_hat = x / x_norm.clamp_min(NORM_EPS)[:, None]
    if subcenters == 1:
        w_y = weight.index_select(0, safe_labels).to(acc)
        cos_y = (x_hat * w_y).sum(1) / torch.linalg.vector_norm(w_y, dim=1).clamp_min(NORM_EPS)
    else:
        rows = safe_labels[:, None] * subcenters + torch.arange(subcenters, device=safe_labels.device)
        w_y = weight.index_select(0, rows.reshape(-1)).to(acc).reshape(rows.shape[0], subcenters, -1)
        cos_all = (x_hat[:, None, :] * w_y).sum(2) / torch.linalg.vector_norm(w_y, dim=2).clamp_min(NORM_EPS)
        cos_y = cos_all.max(dim=1).values
    cos_y = cos_y.clamp(-1.0, 1.0)
    row_scale = margin.row_scale(x_norm)
    return PrePass(
        x_hat=x_hat,
        cos_target=cos_y,
        target_logit=margin.target_logit(cos_y, row_scale),
        row_scale=row_scale,
        threshold=margin.threshold(cos_y),
    )


def describe(margin: Optional[Margin]) -> str:
    return type(margin).__name__ if margin is not None else "None"
