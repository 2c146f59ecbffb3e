"""The functional loss: validate, pre-pass (PyTorch), fused op (kernels), loss = lse − z_iy."""

from __future__ import annotations

import torch

from . import ops, reference
from ._validation import check_loss_inputs
from .margins import FILTER_OFF, Margin, pre_pass


def margin_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: Margin,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    backend: str = "auto",
    interclass_filtering_threshold: float = 0.0,
    subcenters: int = 1,
    deterministic: bool = True,
) -> torch.Tensor:
    """Angular-margin softmax cross-entropy without materializing the (batch, num_classes) logits.

    embeddings (B, D) raw (normalized here), weight (num_classes·subcenters, D) raw class weights,
    labels (B,) int64/int32 class ids or ``ignore_index``; margin one of the specs in marginops
    (NormFace, CosFace, ArcFace, CombinedMargin, SphereFace, CurricularFace).
    interclass_filtering_threshold > 0 gives non-target cosines above it logit 0 and no gradient
    (insightface semantics).  backend: "auto", "reference", "cpu", "cuda" or "triton".
    """
    check_loss_inputs(
        embeddings, weight, labels, margin,
        reduction=reduction, ignore_index=ignore_index, backend=backend, subcenters=subcenters,
    )
    backend = ops.resolve_backend(backend, embeddings.device)
    if backend == "reference":
        return reference.margin_cross_entropy(
            embeddings, weight, labels, margin, reduction=reduction, ignore_index=ignore_index,
            interclass_filtering_threshold=interclass_filtering_threshold, subcenters=subcenters,
        )
    labels = labels.long()
    valid = labels != ignore_index
    pre = pre_pass(margin, embeddings, weight, torch.where(valid, labels, torch.zeros_like(labels)), subcenters)
    lse, _ = ops.fused_lse(
        backend,
        pre.x_hat.to(embeddings.dtype),
        weight,
        torch.where(valid, labels, torch.full_like(labels, -1)),
        pre.target_logit,
        pre.row_scale,
        pre.threshold,
        None,
        margin.curricular_t,
        margin.non_target_mode,
        interclass_filtering_threshold if interclass_filtering_threshold > 0 else FILTER_OFF,
        subcenters,
        deterministic,
    )
    loss = torch.where(valid, lse - pre.target_logit, torch.zeros_like(lse))
    return reference.reduce_loss(loss, valid, reduction).to(embeddings.dtype)
