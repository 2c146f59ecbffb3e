"""Plain PyTorch implementation of the whole contract: the oracle for tests and the fallback backend.

It materializes the (B, C) logits, so it is simple and slow and memory-hungry by design; run it in
float64 to get the truth the kernels are compared against.  Two entry points:

* ``margin_cross_entropy`` — the loss of docs/DESIGN.md §1 straight from the formulas;
* ``fused_lse`` — the semantics of the fused op alone (docs/DESIGN.md §2), differentiable by autograd,
  used to check each backend's forward and backward at the op level.
"""

from __future__ import annotations

from typing import Optional

import torch

from .loss_assembly import make_stats, reduce_loss, row_losses
from .margins import NORM_EPS, Margin, accumulation_dtype, pre_pass
from .non_target import non_target_phi


def margin_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: Margin,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    interclass_filtering_threshold: float = 0.0,
    return_stats: bool = False,
    compute_dtype: Optional[torch.dtype] = None,
):
    """Loss per docs/DESIGN.md §1 with every logit materialized.  Inputs are assumed validated.

    With return_stats, also the functional's MarginStats (lse, target cosine, prediction, accuracy).
    compute_dtype bf16 / fp16 with a float32 weight: the cosine products see x̂ and the weight rows rounded to it
    (mixed precision, as the kernels run it); everything else stays in the weight's dtype.
    """
    acc = accumulation_dtype(embeddings.dtype)
    subcenters = margin.subcenters
    labels = labels.long()
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    pre = pre_pass(margin, embeddings, weight, safe_labels)

    w = weight.to(acc)
    inv_norm = 1.0 / torch.linalg.vector_norm(w, dim=1).clamp_min(NORM_EPS)
    x_hat = pre.x_hat
    if compute_dtype is not None and compute_dtype != weight.dtype:
        x_hat = x_hat.to(compute_dtype).to(acc)
        w = product_rows(w, weight, compute_dtype)
    cos = x_hat @ (w * inv_norm[:, None]).t()
    if subcenters > 1:
        cos = cos.reshape(cos.shape[0], -1, subcenters).max(dim=2).values
    logits = pre.row_scale[:, None] * margin.phi(cos, pre.threshold)
    target_col = torch.nn.functional.one_hot(safe_labels, cos.shape[1]).bool() & valid[:, None]
    if interclass_filtering_threshold > 0:
        filtered = (cos > interclass_filtering_threshold) & ~target_col
        logits = torch.where(filtered, torch.zeros_like(logits), logits)
    logits = torch.where(target_col, pre.target_logit[:, None], logits)
    lse = torch.logsumexp(logits, dim=1)
    reduced = reduce_loss(row_losses(lse, pre.target_logit, pre.extra_loss, valid), valid, reduction).to(
        embeddings.dtype
    )
    if not return_stats:
        return reduced
    return reduced, make_stats(lse, pre.cos_target, cos.detach().argmax(dim=1), labels, valid)


def product_rows(w: torch.Tensor, weight: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """The weight rows as the op's matrix products see them: ``w`` (``weight`` in the accumulation dtype), rounded
    to ``compute_dtype`` when that is narrower than ``weight`` (mixed precision: a float32 weight with 16-bit x).
    The gradient passes straight through to the float32 rows, as the kernels form dW in float32."""
    if compute_dtype in (torch.bfloat16, torch.float16) and weight.dtype != compute_dtype:
        return w + (weight.detach().to(compute_dtype).to(w.dtype) - w.detach())
    return w


def fused_lse(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target_logit: torch.Tensor,
    row_scale: torch.Tensor,
    threshold: torch.Tensor,
    class_index: Optional[torch.Tensor],
    non_target_param,
    non_target: int,
    filter_threshold: float,
    subcenters: int,
    product_output_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused op's semantics with the logits materialized (see marginops/ops.py for the contract).

    Returns (lse, argmax); differentiable in x, weight, target_logit and row_scale.
    product_output_dtype: round the products x·Wᵀ to this dtype before the row norms are applied, as a GEMM
    writing a 16-bit block would (gradients pass straight through); only bench/cosine_block.py's study uses it.
    """
    acc = target_logit.dtype
    w = weight.to(acc)
    inv_norm = 1.0 / torch.linalg.vector_norm(w, dim=1).clamp_min(NORM_EPS)
    products = x.to(acc) @ product_rows(w, weight, x.dtype).t()
    if product_output_dtype is not None:
        products = products + (products.detach().to(product_output_dtype).to(acc) - products.detach())
    cos_rows = products * inv_norm
    k = subcenters
    cos = cos_rows.reshape(cos_rows.shape[0], -1, k).max(dim=2).values
    if class_index is not None:
        cos = cos.index_select(1, class_index)
    logits = row_scale[:, None] * non_target_phi(non_target, cos, threshold, non_target_param)
    logits = torch.where(cos > filter_threshold, torch.zeros_like(logits), logits)
    columns = torch.arange(cos.shape[1], device=cos.device)
    target_col = columns[None, :] == labels[:, None]
    logits = torch.where(target_col, target_logit[:, None], logits)
    return torch.logsumexp(logits, dim=1), cos.detach().argmax(dim=1)
