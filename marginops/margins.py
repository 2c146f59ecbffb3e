"""Margin specs (docs/DESIGN.md §1) and the pre-pass that turns one of them into the fused op's inputs.

Every margin here changes only the target logit (a function of the one cosine c_iy per row) and,
for CurricularFace, the non-target logits through a per-row threshold and a scalar t.  The pre-pass
computes those in plain PyTorch (O(B·D)), so autograd differentiates the margins and the kernels
stay margin-agnostic (docs/DESIGN.md §3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import non_target
from ._scalar_checks import check_finite_fields, check_number
from .non_target import NonTargetMode, non_target_phi

# F.normalize's eps: rows are divided by max(‖v‖, NORM_EPS).
NORM_EPS = 1e-12
# sin θ is written sqrt(max(1 − c², SIN_EPS)) so that its gradient is finite at c = ±1.
SIN_EPS = 1e-12

# Non-target modes understood by the kernels; their math (phi, dphi, max |dphi|): marginops/non_target.py.
NON_TARGET_PLAIN = int(NonTargetMode.PLAIN)
NON_TARGET_CURRICULAR = int(NonTargetMode.CURRICULAR)
# Every non-target mode the op defines (tests/test_op_suite.py runs each one on every backend).
NON_TARGET_MODES = non_target.NON_TARGET_MODES
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


def arcface_psi(c: torch.Tensor, m: float) -> torch.Tensor:
    """cos(θ + m) for θ ≤ π − m, else c − m·sin m (past π − m cos(θ + m) would stop decreasing)."""
    return torch.where(c >= math.cos(math.pi - m), cos_theta_plus(c, m), c - m * math.sin(m))


class Margin:
    """Base class of the margin specs: how the target logit and the non-target logits are formed.

    ``row_scale(x_norm)`` is the factor every logit of a row carries (s, or ‖x‖·scale for SphereFace);
    ``psi(c)`` the target value before that factor; ``threshold(c)`` CurricularFace's per-row
    threshold.  Subclasses are frozen dataclasses so that they can be compared and hashed.
    """

    non_target_mode: int = NON_TARGET_PLAIN
    # the non-target mode's scalar (the op's non_target_param): CurricularFace's t, a number or a 0-dim tensor
    non_target_param: float = 0.0
    # class c owns rows c·k … c·k+k−1 of the weight; its cosine is the max over them (Sub-center ArcFace)
    subcenters: int = 1

    def row_scale(self, x_norm: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x_norm, float(self.s))

    def psi(self, c: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target_logit(self, c: torch.Tensor, row_scale: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
        """z_iy from the target cosine; x_norm (‖x_i‖, with gradient) is there for norm-aware margins."""
        if getattr(self, "detach_margin", False):
            return row_scale * (c + (self.psi(c) - c).detach())
        return row_scale * self.psi(c)

    def extra_loss(self, x_norm: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-row term added to the loss (MagFace's regularizer); None for most margins."""
        return None

    def threshold(self, c: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(c)

    def phi(self, cos: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """Non-target value for a (B, N) block of cosines; threshold is (B,) (marginops/non_target.py)."""
        return non_target_phi(self.non_target_mode, cos, threshold, self.non_target_param)

    def validate(self) -> None:
        pass


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


# Ranges of the margins (checked at construction; every published recipe lies well inside them):
# an additive angular margin m in [0, pi) (cos(θ + m) past θ = π − m is handled by ArcFace's fallback,
# beyond π the margin wraps around), a norm-adaptive angular margin (MagFace, AdaFace) in [0, pi/2), an
# additive cosine margin in [-1, 1] (negative margins are a published variant; |m| > 1 moves every target
# logit past every non-target one).
_ANGULAR = (0.0, math.pi)


def _check_angular(name: str, value: float) -> None:
    check_number(name, value, *_ANGULAR, high_open=True, why="an additive angular margin in radians")


def _check_cosine(name: str, value: float) -> None:
    check_number(name, value, -1.0, 1.0, why="an additive cosine margin")


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
        _check_cosine("CosFace.m", self.m)

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
        check_finite_fields(self)
        if not 0.0 <= self.m < math.pi:
            raise ValueError(f"ArcFace.m must be in [0, pi), got {self.m!r}")

    def psi(self, c):
        if self.easy_margin:
            return torch.where(c > 0, cos_theta_plus(c, self.m), c)
        return arcface_psi(c, float(self.m))


@dataclass(frozen=True)
class CombinedMargin(Margin):
    """insightface's combined margin: z_iy = s·(cos(m1·θ + m2) − m3), no fallback.

    detach_margin: z_iy = s·(c + stopgrad(ψ(c) − c)), the gradient insightface's own code gives."""

    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    detach_margin: bool = False

    def __post_init__(self):
        _check_positive("CombinedMargin.s", self.s)
        _check_positive("CombinedMargin.m1", self.m1)
        _check_angular("CombinedMargin.m2", self.m2)
        _check_cosine("CombinedMargin.m3", self.m3)

    def psi(self, c):
        if self.m1 == 1.0:
            return cos_theta_plus(c, self.m2) - self.m3
        return torch.cos(self.m1 * theta(c) + self.m2) - self.m3


@dataclass(frozen=True)
class SphereFace(Margin):
    """A-Softmax: x is not normalized.  z_iy = ‖x‖·scale·(Ψ(θ) + λ·c)/(1 + λ), z_ij = ‖x‖·scale·c,
    Ψ(θ) = (−1)^k·cos(mθ) − 2k with k = ⌊mθ/π⌋ and integer m.  λ may be a 0-dim tensor (nn.SphereFaceLoss's
    annealed λ, computed on the device so that torch.compile does not specialize on the step)."""

    m: int = 4
    lambda_: Union[float, torch.Tensor] = 0.0
    scale: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.m, int) and self.m >= 1):
            raise ValueError(f"SphereFace.m must be an integer >= 1, got {self.m!r}")
        if isinstance(self.lambda_, torch.Tensor):  # the module's schedule, never negative: not read on the host
            pass
        elif not (math.isfinite(self.lambda_) and self.lambda_ >= 0):
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
        check_finite_fields(self)
        if not 0.0 <= self.m < math.pi:
            raise ValueError(f"CurricularFace.m must be in [0, pi), got {self.m!r}")

    @property
    def non_target_param(self):
        # a module's t buffer stays a tensor (torch.compile traces it), a number becomes a float
        return self.t if isinstance(self.t, torch.Tensor) else float(self.t)

    def psi(self, c):
        return arcface_psi(c, float(self.m))

    def threshold(self, c):
        with torch.no_grad():
            return cos_theta_plus(c, self.m)


@dataclass(frozen=True)
class SubCenterArcFace(Margin):
    """Sub-center ArcFace: k weight rows per class (class-major), the class cosine is the max over them,
    the gradient goes to the arg-max sub-center; target as ArcFace."""

    s: float = 64.0
    m: float = 0.5
    k: int = 3

    def __post_init__(self):
        _check_positive("SubCenterArcFace.s", self.s)
        _check_angular("SubCenterArcFace.m", self.m)
        if not (isinstance(self.k, int) and self.k >= 1):
            raise ValueError(f"SubCenterArcFace.k must be an integer >= 1, got {self.k!r}")

    @property
    def subcenters(self) -> int:
        return self.k

    def psi(self, c):
        return arcface_psi(c, float(self.m))


@dataclass(frozen=True)
class AdaFace(Margin):
    """AdaFace: a margin that adapts to the feature norm, an image-quality proxy.

    z = clamp(‖x‖, 0.001, 100) (detached), ẑ = clamp(h·(z − μ)/(σ + 0.001), −1, 1),
    z_iy = s·(cos(clamp(θ − m·ẑ, ε, π − ε)) − (m + m·ẑ)), ε = 0.001.  μ, σ (batch_mean, batch_std) are
    given here; the module nn.AdaFaceLoss keeps them as EMAs (t_alpha).  They may be tensors.
    """

    s: float = 64.0
    m: float = 0.4
    h: float = 0.333
    t_alpha: float = 0.01
    batch_mean: Union[float, torch.Tensor] = 20.0
    batch_std: Union[float, torch.Tensor] = 100.0

    def __post_init__(self):
        _check_positive("AdaFace.s", self.s)
        check_number("AdaFace.m", self.m, 0.0, math.pi / 2, high_open=True, why="the angular margin in radians")
        check_number("AdaFace.h", self.h, 0.0, 1.0)
        check_number("AdaFace.t_alpha", self.t_alpha, 0.0, 1.0)
        for name in ("batch_mean", "batch_std"):  # tensors (the module's EMA buffers) are not checked here
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                check_number(f"AdaFace.{name}", value, 0.0)

    def margin_scaler(self, x_norm: torch.Tensor) -> torch.Tensor:
        z = x_norm.detach().clamp(0.001, 100.0)
        return (self.h * (z - self.batch_mean) / (self.batch_std + 0.001)).clamp(-1.0, 1.0)

    def target_logit(self, c, row_scale, x_norm):
        scaler = self.margin_scaler(x_norm).to(c.dtype)
        eps = 0.001
        angle = (theta(c) - self.m * scaler).clamp(eps, math.pi - eps)
        return row_scale * (torch.cos(angle) - (self.m + self.m * scaler))


@dataclass(frozen=True)
class ElasticFace(Margin):
    """ElasticFace: a per-sample margin drawn from N(m, std) at every call with ``sample=True``.

    kind "arc": z_iy = s·cos(θ + m_i); kind "cos": z_iy = s·(c − m_i).  plus=True (ElasticFace+) hands the
    drawn margins out sorted, the smallest to the row with the highest target cosine.  sample=False (the
    modules' eval mode) uses m itself.  ``generator`` seeds the draws.

    plus_assignment: how ElasticFace+ pairs the sorted margins with the rows.  "rank" (default): the row
    with the k-th highest target cosine gets the k-th smallest margin.  "official": as the official
    ElasticFace code (fdbtrs/ElasticFace), which computes ``order = argsort(c, descending)`` and gives row i
    ``sorted_m[order[i]]`` — a gather where the pairing needs a scatter, i.e. the inverse permutation; it
    agrees with "rank" only when that permutation is its own inverse (e.g. for two rows).  Sorting the
    cosines one way and the margins the other only makes sense as a rank-to-rank pairing (the further a
    sample is from its class centre, the larger its margin), so "rank" is the default; "official"
    reproduces the published training runs.
    """

    s: float = 64.0
    m: float = 0.5
    std: float = 0.05
    kind: str = "arc"
    plus: bool = False
    generator: Optional[torch.Generator] = None
    sample: bool = True
    plus_assignment: str = "rank"

    def __post_init__(self):
        _check_positive("ElasticFace.s", self.s)
        if self.plus_assignment not in ("rank", "official"):
            raise ValueError(f"ElasticFace.plus_assignment must be 'rank' or 'official', got {self.plus_assignment!r}")
        if self.kind not in ("arc", "cos"):
            raise ValueError(f"ElasticFace.kind must be 'arc' or 'cos', got {self.kind!r}")
        if not (math.isfinite(self.std) and self.std >= 0):
            raise ValueError(f"ElasticFace.std must be >= 0, got {self.std!r}")
        (_check_angular if self.kind == "arc" else _check_cosine)("ElasticFace.m", self.m)

    def row_margins(self, c: torch.Tensor) -> torch.Tensor:
        if not self.sample:
            return torch.full_like(c, self.m)
        device = self.generator.device if self.generator is not None else c.device
        drawn = torch.randn(c.shape, generator=self.generator, device=device, dtype=c.dtype).to(c.device)
        margins = drawn * self.std + self.m
        if self.plus:
            with torch.no_grad():
                order = torch.argsort(c.detach(), descending=True)
                ascending = torch.sort(margins).values
                if self.plus_assignment == "official":
                    ordered = ascending[order]  # row i: sorted_m[order[i]], as the official code
                else:
                    ordered = torch.empty_like(margins)
                    ordered[order] = ascending  # row order[k] (k-th highest cosine): k-th smallest margin
            margins = ordered
        return margins

    def target_logit(self, c, row_scale, x_norm):
        m = self.row_margins(c)
        if self.kind == "cos":
            return row_scale * (c - m)
        return row_scale * (c * torch.cos(m) - sin_theta(c) * torch.sin(m))


@dataclass(frozen=True)
class MagFace(Margin):
    """MagFace: margin m(a) = (u_m − l_m)/(u_a − l_a)·(a − l_a) + l_m of a = clamp(‖x‖, l_a, u_a), with gradient
    into ‖x‖; target s·cos(θ + m(a)) where c > 0 else s·c (easy margin); plus λ_g·(a/u_a² + 1/a) per row."""

    s: float = 64.0
    l_a: float = 10.0
    u_a: float = 110.0
    l_m: float = 0.45
    u_m: float = 0.8
    lambda_g: float = 35.0

    def __post_init__(self):
        _check_positive("MagFace.s", self.s)
        check_finite_fields(self)
        if not 0 < self.l_a < self.u_a:
            raise ValueError(f"MagFace needs 0 < l_a < u_a, got l_a={self.l_a}, u_a={self.u_a}")
        check_number("MagFace.u_m", self.u_m, 0.0, math.pi / 2, high_open=True, why="the largest margin, radians")
        check_number("MagFace.l_m", self.l_m, 0.0, self.u_m, why="the smallest margin, radians, at most u_m")
        check_number("MagFace.lambda_g", self.lambda_g, 0.0)

    def _a(self, x_norm):
        return x_norm.clamp(self.l_a, self.u_a)

    def adaptive_margin(self, x_norm: torch.Tensor) -> torch.Tensor:
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (self._a(x_norm) - self.l_a) + self.l_m

    def target_logit(self, c, row_scale, x_norm):
        m = self.adaptive_margin(x_norm).to(c.dtype)
        shifted = c * torch.cos(m) - sin_theta(c) * torch.sin(m)
        return row_scale * torch.where(c > 0, shifted, c)

    def extra_loss(self, x_norm):
        a = self._a(x_norm)
        return self.lambda_g * (a / self.u_a**2 + 1.0 / a)


def step_spec(cls: type, **fields) -> Margin:
    """``cls(**fields)`` for a loss module that builds its spec again at every step from numbers it checked at
    construction.  Eager calls check them again (so does an attribute assigned since); a traced call (torch.compile)
    skips the checks: dynamo may trace those numbers as symbolic floats (automatic dynamic, e.g. once a second head
    with another m compiled the same code), which the checks' math.isfinite cannot take."""
    if not torch.compiler.is_compiling():
        return cls(**fields)
    spec = object.__new__(cls)  # the fields not given: the class's defaults
    for name, value in fields.items():
        if name not in cls.__dataclass_fields__:
            raise TypeError(f"{cls.__name__} has no field {name!r}")
        object.__setattr__(spec, name, value)
    return spec


@dataclass
class PrePass:
    """What the pre-pass hands to the fused op (all (B,) in the accumulation dtype, autograd-connected)."""

    x_hat: torch.Tensor  # (B, D) normalized embeddings
    cos_target: torch.Tensor  # c_iy (clamped to [-1, 1]; 0 for ignored rows)
    target_logit: torch.Tensor  # z_iy
    row_scale: torch.Tensor  # factor of every logit of the row
    threshold: torch.Tensor  # CurricularFace threshold (unused otherwise)
    extra_loss: Optional[torch.Tensor]  # per-row term added to the loss, or None


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gather_rows(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """weight[rows] with a sparse gradient.  The fused op already returns a dense (C, D) weight
    gradient; index_select's backward would allocate a second, zero-filled (C, D) tensor for these
    few rows, doubling the memory the head needs beyond W and dW.  (torch.compile's AOT autograd
    cannot add sparse to dense gradients, so compiled graphs take the dense gather.)"""
    sparse = weight.requires_grad and not torch.compiler.is_compiling()
    return torch.nn.functional.embedding(rows, weight, sparse=sparse)


def subcenter_cosines(
    x_hat: torch.Tensor,
    weight: torch.Tensor,
    classes: torch.Tensor,
    k: int,
    *,
    sparse_grad: bool = False,
    cast: bool = True,
) -> torch.Tensor:
    """(n, k) cosines between the normalized rows ``x_hat`` (n, D) and the k sub-center rows of class
    ``classes[i]`` (rows c·k … c·k+k−1 of ``weight``, class-major; k = 1: row c), each weight row divided by
    max(‖w‖, NORM_EPS) as the kernels do.  The one sub-center gather of the package: the pre-pass,
    ``dominant_subcenters`` and the distributed head's target cosines and prediction use it.

    sparse_grad: gather through ``gather_rows`` (sparse weight gradient); cast: convert the gathered rows to
    ``x_hat``'s dtype before the products (otherwise they keep the weight's).
    """
    rows = (classes[:, None] * k + torch.arange(k, device=classes.device)).reshape(-1)
    w = gather_rows(weight, rows) if sparse_grad else weight.index_select(0, rows)
    if cast:
        w = w.to(x_hat.dtype)
    w = w.reshape(classes.shape[0], k, -1)
    return (x_hat[:, None, :] * w).sum(2) / torch.linalg.vector_norm(w, dim=2).clamp_min(NORM_EPS)


def pre_pass(margin: Margin, embeddings: torch.Tensor, weight: torch.Tensor, safe_labels: torch.Tensor) -> PrePass:
    """Target cosines, target logits and per-row factors, in O(B·D), differentiable.

    ``safe_labels`` holds a valid class for every row (ignored rows carry any valid class; their
    loss is masked later).  With ``margin.subcenters`` = k, class c owns rows c·k … c·k+k−1 of
    ``weight`` and its cosine is the max over them.
    """
    subcenters = margin.subcenters
    acc = accumulation_dtype(embeddings.dtype)
    x = embeddings.to(acc)
    x_norm = torch.linalg.vector_norm(x, dim=1)
    x_hat = x / x_norm.clamp_min(NORM_EPS)[:, None]
    cos_all = subcenter_cosines(x_hat, weight, safe_labels, subcenters, sparse_grad=True)
    cos_y = cos_all[:, 0] if subcenters == 1 else cos_all.max(dim=1).values
    cos_y = cos_y.clamp(-1.0, 1.0)
    row_scale = margin.row_scale(x_norm)
    return PrePass(
        x_hat=x_hat,
        cos_target=cos_y,
        target_logit=margin.target_logit(cos_y, row_scale, x_norm),
        row_scale=row_scale,
        threshold=margin.threshold(cos_y),
        extra_loss=margin.extra_loss(x_norm),
    )


@torch.no_grad()
def dominant_subcenters(embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, k: int):
    """For Sub-center ArcFace: which of its k sub-centers each class's samples are closest to.

    Returns (dominant, counts): counts (C, k) of samples per (class, sub-center); dominant (C,) the
    most chosen sub-center, −1 for classes without samples.  Accumulate counts over a dataset to
    find the dominant sub-center before dropping the others, as Sub-center ArcFace does.
    """
    num_classes = weight.shape[0] // k
    labels = labels.long()
    x_hat = embeddings / torch.linalg.vector_norm(embeddings, dim=1, keepdim=True).clamp_min(NORM_EPS)
    cos = subcenter_cosines(x_hat, weight, labels, k, cast=False)
    chosen = labels * k + cos.argmax(dim=1)
    counts = torch.bincount(chosen, minlength=num_classes * k).reshape(num_classes, k)
    dominant = torch.where(counts.sum(1) > 0, counts.argmax(1), torch.full_like(counts[:, 0], -1))
    return dominant, counts
