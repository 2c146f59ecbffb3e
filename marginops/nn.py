"""Loss modules that own the class weights (num_classes, embedding_size) and the margin state."""

from __future__ import annotations

import torch
from torch import nn

from . import margins
from ._validation import check_loss_inputs
from .functional import margin_cross_entropy


class MarginLoss(nn.Module):
    """Base of the loss modules: holds ``weight`` and calls the functional loss with ``self.margin()``."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        *,
        backend: str = "auto",
        reduction: str = "mean",
        ignore_index: int = -100,
        interclass_filtering_threshold: float = 0.0,
    ):
        super().__init__()
        if embedding_size < 1 or num_classes < 1:
            raise ValueError(f"embedding_size and num_classes must be >= 1, got {embedding_size}, {num_classes}")
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.backend = backend
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.interclass_filtering_threshold = interclass_filtering_threshold
        # insightface initializes the head with N(0, 0.01); the scale is irrelevant after normalization.
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size).normal_(0.0, 0.01))

    def margin(self) -> margins.Margin:
        raise NotImplementedError

    def update_state(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Advance the margin's state (training mode only); stateless margins do nothing."""

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.update_state(embeddings, labels)
        return margin_cross_entropy(
            embeddings,
            self.weight,
            labels,
            self.margin(),
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            backend=self.backend,
            interclass_filtering_threshold=self.interclass_filtering_threshold,
        )

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, margin={self.margin()}, backend={self.backend!r}"


class NormFaceLoss(MarginLoss):
    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, **kwargs):
        super().__init__(embedding_size, num_classes, **kwargs)
        self._margin = margins.NormFace(s)

    def margin(self):
        return self._margin


class CosFaceLoss(MarginLoss):
    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.35, **kwargs):
        super().__init__(embedding_size, num_classes, **kwargs)
        self._margin = margins.CosFace(s, m)

    def margin(self):
        return self._margin


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

    def margin(self):
        return self._margin


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

    def margin(self):
        return self._margin


class SphereFaceLoss(MarginLoss):
    """A-Softmax with the original λ annealing: λ = max(λ_min, base·(1 + γ·it)^(−power)).

    ``it`` counts training forwards (incremented before λ is computed, as in the original code) and
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
        self.m, self.scale = m, scale
        self.base, self.gamma, self.power, self.lambda_min = base, gamma, power, lambda_min
        self.iteration = 0

    @property
    def lambda_(self) -> float:
        return max(self.lambda_min, self.base * (1.0 + self.gamma * self.iteration) ** (-self.power))

    def update_state(self, embeddings, labels):
        self.iteration += 1

    def margin(self):
        return margins.SphereFace(self.m, self.lambda_, self.scale)

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
        self.s, self.m, self.alpha = s, m, alpha
        self.register_buffer("t", torch.zeros(()))

    @torch.no_grad()
    def update_state(self, embeddings, labels):
        # t is read from the inputs before the functional loss validates them, so validate first.
        check_loss_inputs(
            embeddings, self.weight, labels, self.margin(),
            reduction=self.reduction, ignore_index=self.ignore_index, backend=self.backend,
        )
        labels = labels.long()
        valid = labels != self.ignore_index
        if not bool(valid.any()):
            return
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        cos = margins.pre_pass(margins.NormFace(1.0), embeddings, self.weight, safe).cos_target
        mean_cos = cos[valid].mean()
        self.t.mul_(1.0 - self.alpha).add_(self.alpha * mean_cos.to(self.t.dtype))

    def margin(self):
        return margins.CurricularFace(self.s, self.m, float(self.t))


__all__ = [
    "MarginLoss",
    "NormFaceLoss",
    "CosFaceLoss",
    "ArcFaceLoss",
    "CombinedMarginLoss",
    "SphereFaceLoss",
    "CurricularFaceLoss",
]
