"""Loss modules that own the class weights (num_classes, embedding_size) and the margin state."""

from __future__ import annotations

import types
from typing import Optional

import torch
from torch import nn

from . import margins
from ._validation import check_compute_dtype, check_loss_inputs, check_module_options, check_number
from .functional import resolve_precision, validated_margin_cross_entropy
from .pair_losses import ContrastiveLoss, TripletLoss


def _own_copy(function, owner: type):
    """``function`` with a code object of its own (same bytecode), named after ``owner`` in tracebacks."""
    code = function.__code__
    if hasattr(code, "co_qualname"):  # Python 3.11+
        code = code.replace(co_qualname=f"{owner.__qualname__}.{function.__name__}")
    else:
        code = code.replace()  # still a new code object
    copy = types.FunctionType(
        code, function.__globals__, function.__name__, function.__defaults__, function.__closure__
    )
    copy.__kwdefaults__, copy.__annotations__ = function.__kwdefaults__, dict(function.__annotations__)
    copy.__doc__, copy.__module__ = function.__doc__, function.__module__
    copy.__dict__.update(function.__dict__)
    copy.__qualname__ = f"{owner.__qualname__}.{function.__name__}"
    return copy


class MarginLoss(nn.Module):
    """Base of the loss modules: holds ``weight`` and calls the functional loss with ``self.margin()``."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # torch.compile keeps its graphs, and counts recompiles against torch._dynamo.config.recompile_limit (8), per
        # code object.  Modules are not specialized (guards check the head's class and numbers, not its identity), so
        # with one shared MarginLoss.forward every head class compiled in a process would be one more recompile of it,
        # and the ninth would fail under fullgraph=True: each head class gets a forward of its own.
        if "forward" not in cls.__dict__:
            cls.forward = _own_copy(cls.forward, cls)

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        *,
        backend: str = "auto",
        reduction: str = "mean",
        ignore_index: int = -100,
        interclass_filtering_threshold: float = 0.0,
        rows_per_class: int = 1,
        compute_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if embedding_size < 1 or num_classes < 1:
            raise ValueError(f"embedding_size and num_classes must be >= 1, got {embedding_size}, {num_classes}")
        check_module_options(
            backend=backend,
            reduction=reduction,
            ignore_index=ignore_index,
            interclass_filtering_threshold=interclass_filtering_threshold,
        )
        check_compute_dtype(compute_dtype)
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.backend = backend
        # the dtype of the head's matrix products (None: the weight's, or autocast's on a float32 weight)
        self.compute_dtype = compute_dtype
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.interclass_filtering_threshold = interclass_filtering_threshold
        # insightface initializes the head with N(0, 0.01); the scale is irrelevant after normalization.
        self.rows_per_class = rows_per_class
        self.weight = nn.Parameter(torch.empty(num_classes * rows_per_class, embedding_size).normal_(0.0, 0.01))

    def margin(self) -> margins.Margin:
        """The margin spec of this step; stateless losses keep theirs in ``self._margin``."""
        return self._margin

    def update_state(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Advance the margin's state (training mode only); stateless margins do nothing."""

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, return_stats: bool = False):
        """The loss (and with return_stats, MarginStats: per-row lse, target cosine, prediction, accuracy).
        Under torch.autocast on a float32 weight: the products in autocast's bf16 / fp16 (unless compute_dtype says
        otherwise), the rest in float32 with autocast off."""
        embeddings, compute, autocast_device = resolve_precision(embeddings, self.weight, self.compute_dtype)
        if autocast_device is None:
            return self._forward(embeddings, labels, return_stats, compute)
        with torch.autocast(autocast_device, enabled=False):
            return self._forward(embeddings, labels, return_stats, compute)

    def _forward(self, embeddings, labels, return_stats, compute_dtype):
        # the one validation of this call, before the state is read from the inputs (a call that raises must not
        # advance SphereFace's λ or an EMA); the functional below does not validate again
        self._check(embeddings, labels, compute_dtype)
        if self.training:
            self.update_state(embeddings.to(self.weight.dtype), labels)
        return validated_margin_cross_entropy(
            embeddings,
            self.weight,
            labels,
            self.margin(),
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            backend=self.backend,
            interclass_filtering_threshold=self.interclass_filtering_threshold,
            deterministic=True,
            return_stats=return_stats,
            compute_dtype=compute_dtype,
        )

    def _check(self, embeddings, labels, compute_dtype=None):
        check_loss_inputs(
            embeddings,
            self.weight,
            labels,
            self.margin(),
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            backend=self.backend,
            compute_dtype=compute_dtype,
        )

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, margin={self.margin()}, "
            f"backend={self.backend!r}"
        )


class NormFaceLoss(MarginLoss):
    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, **kwargs):
        super().__init__(embedding_size, num_classes, **kwargs)
        self._margin = margins.NormFace(s)


class CosFaceLoss(MarginLoss):
    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.35, **kwargs):
        super().__init__(embedding_size, num_classes, **kwargs)
        self._margin = margins.CosFace(s, m)


class ArcFaceLoss(MarginLoss):
    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        easy_margin: bool = False,
        detach_margin: bool = False,
        **kwargs,
    ):
        super().__init__(embedding_size, num_classes, **kwargs)
        self._margin = margins.ArcFace(s, m, easy_margin, detach_margin)


class CombinedMarginLoss(MarginLoss):
    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        **kwargs,
    ):
        super().__init__(embedding_size, num_classes, **kwargs)
        self._margin = margins.CombinedMargin(s, m1, m2, m3)


class SphereFaceLoss(MarginLoss):
    """A-Softmax with the original λ annealing: λ = max(λ_min, base·(1 + γ·it)^(−power)).

    ``it`` (``iteration``) counts training forwards (incremented before λ is computed, as in the original code) and
    is saved in the state_dict.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        m: int = 4,
        scale: float = 1.0,
        base: float = 1000.0,
        gamma: float = 0.12,
        power: float = 1.0,
        lambda_min: float = 5.0,
        **kwargs,
    ):
        super().__init__(embedding_size, num_classes, **kwargs)
        margins.SphereFace(m, 0.0, scale)  # validates m and scale
        for name, value in (("base", base), ("gamma", gamma), ("power", power), ("lambda_min", lambda_min)):
            check_number(f"SphereFaceLoss.{name}", value, 0.0)
        self.m, self.scale = m, scale
        self.base, self.gamma, self.power, self.lambda_min = base, gamma, power, lambda_min
        # the step as a tensor: a Python int would be a constant of the compiled graph, recompiled at every step.
        # Not persistent: the state_dict keeps its {"iteration": int} extra state (get_extra_state).
        self.register_buffer("_iteration", torch.zeros((), dtype=torch.int64), persistent=False)

    @property
    def iteration(self) -> int:
        return int(self._iteration)

    @iteration.setter
    def iteration(self, value: int) -> None:
        self._iteration = torch.tensor(int(value), dtype=torch.int64, device=self._iteration.device)

    def _lambda(self) -> torch.Tensor:
        step = self._iteration.to(torch.float64)
        return torch.clamp_min(self.base * (1.0 + self.gamma * step) ** (-self.power), self.lambda_min)

    @property
    def lambda_(self) -> float:
        return float(self._lambda())

    def update_state(self, embeddings, labels):
        # a new tensor rather than add_: torch.compile replays an in-place update of a buffer at the end of the forward
        # graph, and AOT autograd's partitioner may have the backward recompute λ from that buffer, by then one step
        # on (silently wrong gradients in torch 2.15; pytorch/pytorch#197039)
        self._iteration = self._iteration + 1

    def margin(self):
        return margins.step_spec(margins.SphereFace, m=self.m, lambda_=self._lambda(), scale=self.scale)

    def get_extra_state(self):
        return {"iteration": self.iteration}

    def set_extra_state(self, state):
        self.iteration = int(state["iteration"])


class CurricularFaceLoss(MarginLoss):
    """CurricularFace with its EMA ``t`` (buffer): t ← α·mean(c_iy) + (1 − α)·t before use, training mode only."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        alpha: float = 0.01,
        **kwargs,
    ):
        super().__init__(embedding_size, num_classes, **kwargs)
        margins.CurricularFace(s, m)  # validates
        check_number("CurricularFaceLoss.alpha", alpha, 0.0, 1.0, why="the EMA rate of t")
        self.s, self.m, self.alpha = s, m, alpha
        self.register_buffer("t", torch.zeros(()))

    @torch.no_grad()
    def update_state(self, embeddings, labels):  # inputs validated by forward
        labels = labels.long()
        valid = labels != self.ignore_index
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        cos = margins.pre_pass(margins.NormFace(1.0), embeddings, self.weight, safe).cos_target
        # masked, without a data-dependent branch: no counted row leaves t as it is
        count = valid.sum()
        mean_cos = torch.where(valid, cos, torch.zeros_like(cos)).sum() / count.clamp_min(1)
        updated = self.t * (1.0 - self.alpha) + self.alpha * mean_cos.to(self.t.dtype)
        self.t.copy_(torch.where(count > 0, updated, self.t))

    def margin(self):
        # t as the buffer itself: no host read, so torch.compile(fullgraph=True) traces it
        return margins.step_spec(margins.CurricularFace, s=self.s, m=self.m, t=self.t.detach())


class SubCenterArcFaceLoss(MarginLoss):
    """Sub-center ArcFace: ``weight`` has num_classes·k rows, class-major (rows c·k … c·k+k−1 are class c)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5, k: int = 3, **kwargs):
        super().__init__(embedding_size, num_classes, rows_per_class=k, **kwargs)
        self._margin = margins.SubCenterArcFace(s, m, k)

    @torch.no_grad()
    def dominant_subcenters(self, embeddings: torch.Tensor, labels: torch.Tensor):
        """See marginops.margins.dominant_subcenters; counts over this batch."""
        return margins.dominant_subcenters(embeddings, self.weight, labels, self._margin.k)


class AdaFaceLoss(MarginLoss):
    """AdaFace with its feature-norm statistics as EMA buffers (initial mean 20, std 100, unbiased std),
    updated before use in training mode over the non-ignored rows."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
        **kwargs,
    ):
        super().__init__(embedding_size, num_classes, **kwargs)
        self.s, self.m, self.h, self.t_alpha = s, m, h, t_alpha
        margins.AdaFace(s, m, h, t_alpha)  # validates
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    @torch.no_grad()
    def update_state(self, embeddings, labels):  # inputs validated by forward
        # in the accumulation dtype (float64 for float64 inputs), as the pre-pass computes the norms
        acc = margins.accumulation_dtype(embeddings.dtype)
        norms = torch.linalg.vector_norm(embeddings.to(acc), dim=1).clamp(0.001, 100.0)
        # masked, without data-dependent branches or shapes (torch.compile(fullgraph=True) traces it):
        # no counted row leaves both EMAs as they are, one row only the std (an unbiased std needs two)
        valid = (labels.long() != self.ignore_index).to(acc)
        count = valid.sum()
        mean = (norms * valid).sum() / count.clamp_min(1.0)
        std = (((norms - mean) ** 2 * valid).sum() / (count - 1.0).clamp_min(1.0)).sqrt()
        for buffer, value, needed in ((self.batch_mean, mean, 1.0), (self.batch_std, std, 2.0)):
            updated = buffer * (1.0 - self.t_alpha) + (self.t_alpha * value).to(buffer.dtype)
            buffer.copy_(torch.where(count >= needed, updated, buffer))

    def margin(self):
        return margins.step_spec(
            margins.AdaFace,
            s=self.s,
            m=self.m,
            h=self.h,
            t_alpha=self.t_alpha,
            batch_mean=self.batch_mean,
            batch_std=self.batch_std,
        )


class ElasticFaceLoss(MarginLoss):
    """ElasticFace(+): per-sample margins drawn each training forward; eval mode uses the mean margin m.
    plus_assignment: "rank" or "official" (the official code's pairing), see marginops.ElasticFace."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        std: float = 0.05,
        kind: str = "arc",
        plus: bool = False,
        generator: Optional[torch.Generator] = None,
        plus_assignment: str = "rank",
        **kwargs,
    ):
        super().__init__(embedding_size, num_classes, **kwargs)
        margins.ElasticFace(s, m, std, kind, plus, plus_assignment=plus_assignment)  # validates
        self.s, self.m, self.std, self.kind, self.plus = s, m, std, kind, plus
        self.plus_assignment = plus_assignment
        self.generator = generator

    def margin(self):
        return margins.step_spec(
            margins.ElasticFace,
            s=self.s,
            m=self.m,
            std=self.std,
            kind=self.kind,
            plus=self.plus,
            generator=self.generator,
            sample=self.training,
            plus_assignment=self.plus_assignment,
        )


class MagFaceLoss(MarginLoss):
    """MagFace: norm-dependent margin plus its regularizer λ_g·mean(a/u_a² + 1/a), included in the loss."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
        **kwargs,
    ):
        super().__init__(embedding_size, num_classes, **kwargs)
        self._margin = margins.MagFace(s, l_a, u_a, l_m, u_m, lambda_g)


__all__ = [
    "ContrastiveLoss",
    "TripletLoss",
    "MarginLoss",
    "SubCenterArcFaceLoss",
    "AdaFaceLoss",
    "ElasticFaceLoss",
    "MagFaceLoss",
    "NormFaceLoss",
    "CosFaceLoss",
    "ArcFaceLoss",
    "CombinedMarginLoss",
    "SphereFaceLoss",
    "CurricularFaceLoss",
]
