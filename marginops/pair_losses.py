"""Pair losses of the same lineage, for comparison with the margin heads (no class weights).

Both work on L2-normalized embeddings and the (B, B) similarity matrix of the batch; Euclidean
distances between unit vectors are d² = 2 − 2·cos.
"""

from __future__ import annotations

import torch
from torch import nn

from .margins import NORM_EPS

_DIST_EPS = 1e-12  # sqrt(max(d², eps)): finite gradient for coincident embeddings


def _check(embeddings: torch.Tensor, labels: torch.Tensor) -> None:
    if embeddings.dim() != 2 or embeddings.shape[0] == 0:
        raise ValueError(
            f"embeddings must be a non-empty 2-D (batch, embedding_size) tensor, got shape {tuple(embeddings.shape)}"
        )
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must be 1-D with {embeddings.shape[0]} entries, got shape {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")


def _squared_distances(embeddings: torch.Tensor) -> torch.Tensor:
    x = embeddings / torch.linalg.vector_norm(embeddings, dim=1, keepdim=True).clamp_min(NORM_EPS)
    return (2.0 - 2.0 * (x @ x.t())).clamp_min(0.0)


def contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Mean over pairs i < j of d² for same-label pairs and max(0, margin − d)² for the others."""
    _check(embeddings, labels)
    sq = _squared_distances(embeddings)
    same = labels[:, None] == labels[None, :]
    dist = torch.sqrt(sq.clamp_min(_DIST_EPS))
    pair_loss = torch.where(same, sq, torch.relu(margin - dist) ** 2)
    batch = labels.shape[0]
    if batch < 2:  # a shape, not a value: no data-dependent branch under torch.compile
        return pair_loss.sum() * 0.0  # one row: no pairs
    # the pairs i < j by index, in row-major order as a boolean mask would pick them: a size that depends on the
    # batch size only, so torch.compile(fullgraph=True) traces it (a mask's result size is data-dependent)
    i, j = torch.triu_indices(batch, batch, offset=1, device=labels.device)
    return pair_loss[i, j].mean()


def batch_hard_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Mean over anchors of relu(d(a, hardest positive) − d(a, hardest negative) + margin).

    Anchors without another sample of their label, or without any other label, are left out.
    """
    _check(embeddings, labels)
    dist = torch.sqrt(_squared_distances(embeddings).clamp_min(_DIST_EPS))
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    positive = same & ~eye
    hardest_pos = torch.where(positive, dist, torch.full_like(dist, -float("inf"))).max(dim=1).values
    hardest_neg = torch.where(~same, dist, torch.full_like(dist, float("inf"))).min(dim=1).values
    usable = positive.any(1) & (~same).any(1)
    losses = torch.relu(hardest_pos - hardest_neg + margin)
    # the mean over usable anchors, masked rather than indexed or branched on (data-dependent under torch.compile);
    # without any, 0 with dist (and so the embeddings) still in the graph
    count = usable.sum()
    mean = torch.where(usable, losses, torch.zeros_like(losses)).sum() / count.clamp_min(1)
    return torch.where(count > 0, mean, dist.sum() * 0.0)


class ContrastiveLoss(nn.Module):
    def __init__(self, margin: float = 0.5):
        super().__init__()
        self.margin = margin

    def forward(self, embeddings, labels):
        return contrastive_loss(embeddings, labels, self.margin)


class TripletLoss(nn.Module):
    """Triplet loss with batch-hard mining."""

    def __init__(self, margin: float = 0.2):
        super().__init__()
        self.margin = margin

    def forward(self, embeddings, labels):
        return batch_hard_triplet_loss(embeddings, labels, self.margin)
