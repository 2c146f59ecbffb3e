"""Loss assembly: from the fused op's per-row log-sum-exp to the reduced loss and the training stats.

The last step of the decomposition in docs/DESIGN.md §3 (loss_i = lse_i − z_iy, plus a margin's per-row
extra term), shared by the functional loss, the distributed head and the reference oracle.  It depends
on nothing else in marginops, so every one of them can import it without importing another.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

__all__ = ["MarginStats", "make_stats", "reduce_loss", "row_losses"]


class MarginStats(NamedTuple):
    """Training signals computed by the fused op, without a (B, C) tensor (all detached)."""

    lse: torch.Tensor  # (B,) log-sum-exp of the row's logits
    cos_target: torch.Tensor  # (B,) cosine to the labelled class (0 for ignored rows)
    predicted: torch.Tensor  # (B,) class of the highest raw cosine
    accuracy: torch.Tensor  # () share of counted rows whose predicted class is the label


def row_losses(
    lse: torch.Tensor, target_logit: torch.Tensor, extra_loss: Optional[torch.Tensor], valid: torch.Tensor
) -> torch.Tensor:
    """lse − z_iy (+ the margin's per-row extra term, None for none), 0 for ignored rows.

    From the pre-pass (marginops.margins.PrePass: its target_logit and extra_loss) or, in the distributed head, from
    the all-reduced owners' values.
    """
    loss = lse - target_logit
    if extra_loss is not None:
        loss = loss + extra_loss
    return torch.where(valid, loss, torch.zeros_like(loss))


def reduce_loss(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """ "none": the rows as they are; "sum"; "mean": over counted rows (all ignored gives nan, as
    F.cross_entropy does)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()


def make_stats(lse, cos_target, predicted, labels, valid) -> MarginStats:
    """MarginStats from the op's outputs: detached lse, target cosine (0 on ignored rows), prediction and
    the share of counted rows predicted right."""
    correct = (predicted == labels) & valid
    return MarginStats(
        lse=lse.detach(),
        cos_target=torch.where(valid, cos_target.detach(), torch.zeros_like(cos_target)),
        predicted=predicted,
        accuracy=correct.sum() / valid.sum(),
    )
