"""pytorch-metric-learning compatible losses: ``ArcFaceLoss``, ``CosFaceLoss``, ``SphereFaceLoss``,
``SubCenterArcFaceLoss``.

Same constructor signatures, units and parameter as ``pytorch_metric_learning.losses``:

* ``ArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64)`` — margin in **degrees**
  (stored in radians in ``.margin``, as pml does); target cos(θ + m), and c − m·sin m past θ = π − m;
* ``CosFaceLoss(num_classes, embedding_size, margin=0.35, scale=64)`` — target c − m;
* ``SphereFaceLoss(num_classes, embedding_size, margin=4, scale=1)`` — A-Softmax without λ annealing:
  target ‖x‖·scale·((−1)^k cos(mθ) − 2k), non-target ‖x‖·scale·c, ``margin`` truncated to an int;
* ``SubCenterArcFaceLoss(num_classes=..., embedding_size=..., margin=28.6, scale=64, sub_centers=3)`` —
  ArcFace on each class's closest of ``sub_centers`` columns of ``W`` (embedding_size, num_classes·sub_centers),
  class c owning columns c·k … c·k+k−1 as in pml; ``get_outliers`` as pml's (see there);

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
from typing import NamedTuple, Optional

import torch
from torch import nn

from .. import margins
from .._validation import check_indices_tuple, check_label_values, check_tensor, label_dtype_problem
from ..functional import margin_cross_entropy

__all__ = ["ArcFaceLoss", "CosFaceLoss", "SphereFaceLoss", "SubCenterArcFaceLoss", "SubCenterOutliers"]


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def miner_weights(indices_tuple, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """pml's per-row weights from a miner's output: count of appearances / max count, 0 if absent, 1 without a miner."""
    weights = torch.ones(labels.shape[0], dtype=dtype, device=labels.device)
    if indices_tuple is None:
        return weights
    # pml fails on a malformed tuple (torch.cat of a 2-D and a 1-D tensor); flattening would hide it
    check_indices_tuple(indices_tuple, labels.shape[0])
    if all(len(t) == 0 for t in indices_tuple):
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

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if labels is None:  # pml: c_f.labels_required, a ValueError (its test_losses_without_labels checks it)
            raise ValueError(
                f"labels are required for this loss function ({type(self).__name__} is a classification loss)"
            )
        if ref_emb is not None or ref_labels is not None:
            raise ValueError(f"{type(self).__name__} does not support ref_emb/ref_labels (neither does pml)")
        # pml takes tensors only (its check_shapes reads .shape); say so instead of an AttributeError below
        check_tensor("embeddings", embeddings, "(batch, embedding_size)")
        check_tensor("labels", labels, "(batch,) class indices; e.g. torch.as_tensor(labels)")
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
        self.margin_spec()  # validates

    def margin_spec(self):
        return margins.ArcFace(s=float(self.scale), m=float(self.margin))


class CosFaceLoss(_WeightedMarginLoss):
    """pml's CosFaceLoss: target logit scale·(c − margin)."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.35, scale: float = 64, **kwargs):
        super().__init__(num_classes, embedding_size, scale, **kwargs)
        self.margin = margin
        self.margin_spec()  # validates

    def margin_spec(self):
        return margins.CosFace(s=float(self.scale), m=float(self.margin))


class SphereFaceLoss(_WeightedMarginLoss):
    """pml's SphereFaceLoss: integer angular margin, logits scaled by ‖x‖·scale, no λ annealing."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 4, scale: float = 1, **kwargs):
        super().__init__(num_classes, embedding_size, scale, **kwargs)
        self.margin = int(margin)  # pml: int(self.margin)

    def margin_spec(self):
        return margins.SphereFace(m=self.margin, lambda_=0.0, scale=float(self.scale))


class SubCenterOutliers(NamedTuple):
    """What ``SubCenterArcFaceLoss.get_outliers`` returns (unpacks as pml's ``(outliers, dominant_centers)``)."""

    outliers: torch.Tensor  # (n,) int64 batch indices, class by class, ascending within a class
    dominant_centers: torch.Tensor  # (embedding_size, num_classes) the dominant sub-center column of each class


class SubCenterArcFaceLoss(ArcFaceLoss):
    """pml's SubCenterArcFaceLoss: ``sub_centers`` weight columns per class; each class's logit uses its closest
    one, then ArcFace's margin (degrees) and scale.  ``W`` is (embedding_size, num_classes·sub_centers), class c
    owning columns c·k … c·k+k−1 (pml's layout; pml checkpoints load); ``num_classes`` is the number of classes.

    pml takes ``num_classes`` and ``embedding_size`` as keywords only (and drops other options); here they may
    also be positional, and the options of the other pml losses (weight_init_func, weight_regularizer, ...)
    apply.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 28.6,
        scale: float = 64,
        sub_centers: int = 3,
        **kwargs,
    ):
        if isinstance(sub_centers, bool) or not isinstance(sub_centers, int) or sub_centers < 1:
            raise ValueError(f"sub_centers must be an integer >= 1, got {sub_centers!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes and embedding_size must be >= 1, got {num_classes}, {embedding_size}")
        super().__init__(num_classes * sub_centers, embedding_size, margin=margin, scale=scale, **kwargs)
        self.sub_centers = sub_centers
        self.num_classes = num_classes  # as pml: the classes, not the columns of W

    def margin_spec(self):
        # (ArcFaceLoss.__init__ validates through this before sub_centers is set)
        return margins.SubCenterArcFace(s=float(self.scale), m=float(self.margin), k=getattr(self, "sub_centers", 1))

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """scale · (cosine to each class's closest sub-center), (batch, num_classes), no margin (materialized)."""
        weight = self.class_weights()
        x = torch.nn.functional.normalize(embeddings.to(weight.dtype), dim=1)
        cos = x @ torch.nn.functional.normalize(weight, dim=1).t()
        return float(self.scale) * cos.view(-1, self.num_classes, self.sub_centers).amax(dim=2)

    @torch.no_grad()
    def get_outliers(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        threshold: float = 75,
        return_dominant_centers: bool = True,
    ) -> SubCenterOutliers:
        """Sub-center ArcFace's cleaning step, as pml: for each class in the batch, its dominant sub-center (the one
        most of its samples are closest to; ties to the lower index) and its outliers, the samples whose cosine
        to the dominant sub-center is below cos(``threshold`` degrees).

        Returns ``SubCenterOutliers(outliers, dominant_centers)`` (a pair, also with
        ``return_dominant_centers=False``, as pml's code returns it): ``outliers`` the batch indices (int64), class by
        class; ``dominant_centers`` (embedding_size, num_classes) the raw dominant columns of ``W`` in the embeddings'
        dtype, zero for classes without samples in this batch (pml leaves those columns uninitialized).
        """
        del return_dominant_centers  # pml's code returns the pair either way
        if labels is None:
            raise ValueError("labels are required for get_outliers")
        labels = labels.to(embeddings.device).reshape(-1)
        if embeddings.dim() != 2 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"get_outliers needs embeddings (batch, {self.embedding_size}) and one label per row, got "
                f"{tuple(embeddings.shape)} and {tuple(labels.shape)}"
            )
        problem = label_dtype_problem(labels)
        if problem is not None:
            raise TypeError(problem)
        labels = labels.long()
        check_label_values(labels, self.num_classes, ignore_index=-(1 << 62))
        k = self.sub_centers
        weight = self.class_weights().detach().to(embeddings.dtype)  # (C·k, D) rows, class-major
        dominant, _ = margins.dominant_subcenters(embeddings, weight, labels, k)
        dominant_centers = torch.zeros(self.num_classes, weight.shape[1], dtype=weight.dtype, device=weight.device)
        seen = dominant >= 0
        rows = torch.arange(self.num_classes, device=weight.device)[seen] * k + dominant[seen]
        dominant_centers[seen] = weight[rows]
        outliers = torch.empty(0, dtype=torch.long, device=embeddings.device)
        if labels.numel():
            x_hat = torch.nn.functional.normalize(embeddings, dim=1)
            centers = torch.nn.functional.normalize(dominant_centers[labels], dim=1)
            cos = (x_hat * centers).sum(1)
            below = torch.nonzero(cos < math.cos(math.radians(threshold))).flatten()
            outliers = below[torch.sort(labels[below], stable=True).indices]
        return SubCenterOutliers(outliers, dominant_centers.t())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sub_centers={self.sub_centers}"
