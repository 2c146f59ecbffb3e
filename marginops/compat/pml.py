"""pytorch-metric-learning compatible losses: ``ArcFaceLoss``, ``CosFaceLoss``, ``SphereFaceLoss``.

Same constructor signatures, units and parameter as ``pytorch_metric_learning.losses``:

* ``ArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64)`` — margin in **degrees**
  (stored in radians in ``.margin``, as pml does); target cos(θ + m), and c − m·sin m past θ = π − m;
* ``CosFaceLoss(num_classes, embedding_size, margin=0.35, scale=64)`` — target c − m;
* ``SphereFaceLoss(num_classes, embedding_size, margin=4, scale=1)`` — A-Softmax without λ annealing:
  target ‖x‖·scale·((−1)^k cos(mθ) − 2k), non-target ‖x‖·scale·c, ``margin`` truncated to an int;

all with the class weights in ``W`` shaped (embedding_size, num_classes), the softmax cross-entropy
averaged over the batch (pml's default MeanReducer), ``forward(embeddings, labels, indices_tuple=None)``
(a miner's ``indices_tuple`` weights each row by how often it appears, as pml does) and the optional
``weight_regularizer`` / ``weight_reg_weight`` applied to the (num_classes, embedding_size) weights.

Layout of ``W``.  The fused op reads one contiguous row per class, i.e. W.t().  Copying
``W.t().contiguous()`` every step would cost a full pass over the head and a temporary as large as W
(measured: 0.57 s and 410 MB per step at 200k × 512 float32 on 2 CPU cores) plus a transposed copy
of the gradient.  So ``W`` is a Parameter of shape (embedding_size, num_classes) whose storage is
column-major (strides (1, embedding_size)): ``W.t()`` is a contiguous (num_classes, embedding_size)
view, free; autograd lays the gradient out the same way, and optimizers, ``.to()``, ``state_dict`` /
``load_state_dict`` (key ``W``, shape (embedding_size, num_classes), loads pml checkpoints) all keep the
layout.  If ``W.data`` is replaced by a row-major tensor the module converts it back once, with a warning.

Differences from pytorch-metric-learning: gradients are finite at c = ±1 (pml differentiates acos
there); the embeddings are cast to ``W``'s dtype (pml instead casts ``W`` to the embeddings' dtype on
every call); no ``ref_emb``/``ref_labels`` (pml rejects them too), no ``reducer`` or embedding
regularizer, and no recorded statistics (``avg_angle``).  ``distance`` may only be a default
``CosineSimilarity`` (what these losses require in pml).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Optional

import torch
from torch import nn

from .. import margins
from ..functional import margin_cross_entropy

__all__ = ["ArcFaceLoss", "CosFaceLoss", "SphereFaceLoss"]


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def miner_weights(indices_tuple, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """pml's per-row weights from a miner's output: count of appearances / max count, 0 if absent, 1 without a miner."""
    weights = torch.ones(labels.shape[0], dtype=dtype, device=labels.device)
    if indices_tuple is None or all(len(t) == 0 for t in indices_tuple):
        return weights
    flat = torch.cat([t.reshape(-1) for t in indices_tuple]).to(labels.device)
    indices, counts = torch.unique(flat, return_counts=True)
    weights.zero_()
    weights[indices] = counts.to(dtype) / counts.max().to(dtype)
    return weights


class _WeightedMarginLoss(nn.Module):
    """Shared part: the column-major ``W``, the pml options, the forward on the fused op."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float,
        *,
        backend: str = "auto",
        weight_init_func=None,
        weight_regularizer=None,
        weight_reg_weight: float = 1.0,
        distance=None,
        collect_stats: Optional[bool] = None,
        **unsupported,
    ):
        super().__init__()
        if unsupported:
            raise TypeError(
                f"{type(self).__name__}: pytorch-metric-learning option(s) {sorted(unsupported)} are not supported by "
                "marginops.compat.pml (supported: weight_init_func, weight_regularizer, weight_reg_weight, distance, "
                "collect_stats, backend)"
            )
        if distance is not None and (
            type(distance).__name__ != "CosineSimilarity" or not getattr(distance, "normalize_embeddings", True)
        ):
            raise ValueError(f"{type(self).__name__} needs a default CosineSimilarity distance, got {distance!r}")
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(f"num_classes and embedding_size must be >= 1, got {num_classes}, {embedding_size}")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.scale = scale
        self.backend = backend
        self.weight_regularizer = weight_regularizer
        self.weight_reg_weight = weight_reg_weight
        self.collect_stats = collect_stats
        # (embedding_size, num_classes) as pml, stored column-major so that W.t() is contiguous rows
        self.W = nn.Parameter(torch.empty(num_classes, embedding_size).t())
        (weight_init_func or nn.init.normal_)(self.W)  # pml's default init: N(0, 1)

    def margin_spec(self) -> margins.Margin:
        raise NotImplementedError

    def class_weights(self) -> torch.Tensor:
        """W.t(): the (num_classes, embedding_size) rows the op reads, a view of W (no copy)."""
        rows = self.W.t()
        if not rows.is_contiguous():
            _warn_once(
                f"{type(self).__name__}: W was replaced by a row-major tensor; converting it back to the column-major "
                "layout (one copy) so that W.t() is contiguous"
            )
            with torch.no_grad():
                self.W.data = self.W.data.t().contiguous().t()
            rows = self.W.t()
        return rows

    def forward(self, embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None):
        if ref_emb is not None or ref_labels is not None:
            raise ValueError(f"{type(self).__name__} does not support ref_emb/ref_labels (neither does pml)")
        weight = self.class_weights()
        labels = labels.to(embeddings.device)
        losses = margin_cross_entropy(
            embeddings.to(weight.dtype), weight, labels, self.margin_spec(), reduction="none", backend=self.backend
        )
        if indices_tuple is not None:
            losses = losses * miner_weights(indices_tuple, labels, losses.dtype)
        loss = losses.mean()
        if self.weight_regularizer is not None:
            loss = loss + self.weight_reg_weight * self.weight_regularizer(weight)
        return loss

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The (batch, num_classes) logits without the margin, as pml's get_logits (materialized: for evaluation)."""
        weight = self.class_weights()
        x = embeddings.to(weight.dtype)
        x_norm = torch.linalg.vector_norm(x, dim=1)
        cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(weight, dim=1).t()
        return self.margin_spec().row_scale(x_norm)[:, None] * cos

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}, "
            f"scale={self.scale}"
        )


class ArcFaceLoss(_WeightedMarginLoss):
    """pml's ArcFaceLoss: ``margin`` in degrees (28.6° ≈ 0.5 rad), ``scale`` s."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6, scale: float = 64, **kwargs):
        super().__init__(num_classes, embedding_size, scale, **kwargs)
        self.margin = math.radians(margin)  # pml keeps the radians after init_margin

    def margin_spec(self):
        return margins.ArcFace(s=float(self.scale), m=float(self.margin))


class CosFaceLoss(_WeightedMarginLoss):
    """pml's CosFaceLoss: target logit scale·(c − margin)."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.35, scale: float = 64, **kwargs):
        super().__init__(num_classes, embedding_size, scale, **kwargs)
        self.margin = margin

    def margin_spec(self):
        return margins.CosFace(s=float(self.scale), m=float(self.margin))


class SphereFaceLoss(_WeightedMarginLoss):
    """pml's SphereFaceLoss: integer angular margin, logits scaled by ‖x‖·scale, no λ annealing."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 4, scale: float = 1, **kwargs):
        super().__init__(num_classes, embedding_size, scale, **kwargs)
        self.margin = int(margin)  # pml: int(self.margin)

    def margin_spec(self):
        return margins.SphereFace(m=self.margin, lambda_=0.0, scale=float(self.scale))
