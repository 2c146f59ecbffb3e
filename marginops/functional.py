"""The functional loss: validate, pre-pass (PyTorch), fused op (kernels), loss = lse − z_iy."""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import ops
from ._validation import check_loss_inputs
from .capabilities import capabilities, mixed_precision_backends
from .loss_assembly import MarginStats, make_stats, reduce_loss, row_losses
from .margins import FILTER_OFF, Margin, pre_pass

__all__ = ["MarginStats", "make_stats", "margin_cross_entropy"]


def autocast_active(tensor: torch.Tensor) -> bool:
    """Whether autocast is on for ``tensor``'s device type (False for non-tensors)."""
    return isinstance(tensor, torch.Tensor) and torch.is_autocast_enabled(tensor.device.type)


def to_weight_dtype(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The autocast rule: floating embeddings in the weight's dtype (the loss then runs with autocast off,
    as PyTorch's own cross_entropy runs in float32 under autocast)."""
    if isinstance(weight, torch.Tensor) and embeddings.is_floating_point() and weight.is_floating_point():
        return embeddings.to(weight.dtype)
    return embeddings


def autocast_compute_dtype(weight: torch.Tensor, device_type: str):
    """The products' dtype autocast asks for on a float32 weight (its bf16 / fp16), else None."""
    if not torch.is_autocast_enabled(device_type) or weight.dtype != torch.float32:
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def resolve_precision(embeddings, weight, compute_dtype: Optional[torch.dtype]):
    """``(embeddings, compute_dtype, autocast_device)``: torch.autocast and ``compute_dtype`` resolved, in this one
    place for every entry point (the functional, the modules, the distributed head).

    Under autocast on the embeddings' device, ``compute_dtype`` None becomes autocast's bf16 / fp16 on a float32
    weight, floating embeddings come back in the weight's dtype, and ``autocast_device`` names the device type
    whose autocast the caller turns off while the loss runs (PyTorch's cross_entropy runs in float32 under
    autocast too).  Otherwise everything as given and None.  Whether compute_dtype fits the weight is validation's
    (compute_dtype_problem); which dtype a concrete backend runs, compute_dtype_on's."""
    if not autocast_active(embeddings):
        return embeddings, compute_dtype, None
    device_type = embeddings.device.type
    if compute_dtype is None and isinstance(weight, torch.Tensor):
        compute_dtype = autocast_compute_dtype(weight, device_type)
    return to_weight_dtype(embeddings, weight), compute_dtype, device_type


def compute_dtype_on(backend: str, compute_dtype, weight: torch.Tensor) -> torch.dtype:
    """The dtype the products run in on a concrete ``backend``: ``compute_dtype`` (validated), or the weight's when
    it is None or the backend has no mixed precision (one warning)."""
    if compute_dtype is None or compute_dtype == weight.dtype:
        return weight.dtype
    if not capabilities(backend).mixed_precision:
        ops._warn_once(
            f"marginops: backend {backend!r} runs the head in the weight's dtype ({weight.dtype}), not "
            f"{compute_dtype}; mixed precision (16-bit products on a float32 weight) runs on "
            f"{', '.join(repr(b) for b in mixed_precision_backends())}"
        )
        return weight.dtype
    return compute_dtype


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
    deterministic: bool = True,
    return_stats: bool = False,
    compute_dtype: Optional[torch.dtype] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, MarginStats]]:
    """Angular-margin softmax cross-entropy without materializing the (batch, num_classes) logits.

    embeddings (B, D) raw (normalized here); weight (num_classes·k, D) raw class weights, k =
    margin.subcenters (1 except for SubCenterArcFace); labels (B,) int64/int32 class ids or
    ``ignore_index``; margin one of the specs in marginops (NormFace, CosFace, ArcFace, ...).
    interclass_filtering_threshold > 0: non-target cosines above it get logit 0 and no gradient
    (insightface semantics).  backend: "auto", "reference", "cpu", "cuda", "cuda_fused", "triton" or "hybrid".
    return_stats: also return MarginStats (per-row lse, target cosine, prediction, batch accuracy).
    compute_dtype: the dtype of the head's matrix products.  None: the weight's, or under torch.autocast on a float32
    weight autocast's bf16 / fp16 (mixed precision: the weight and its gradient stay float32, each class chunk is
    rounded as it is used, the loss comes back in float32).  The embeddings may be in the weight's dtype or in
    compute_dtype.  Under torch.autocast the loss itself runs with autocast off, as PyTorch's cross_entropy does.
    """
    embeddings, compute_dtype, autocast_device = resolve_precision(embeddings, weight, compute_dtype)
    options = dict(reduction=reduction, ignore_index=ignore_index, backend=backend, compute_dtype=compute_dtype)

    def validated():
        check_loss_inputs(embeddings, weight, labels, margin, **options)
        return validated_margin_cross_entropy(
            embeddings,
            weight,
            labels,
            margin,
            interclass_filtering_threshold=interclass_filtering_threshold,
            deterministic=deterministic,
            return_stats=return_stats,
            **options,
        )

    if autocast_device is None:
        return validated()
    with torch.autocast(autocast_device, enabled=False):
        return validated()


def validated_margin_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: Margin,
    *,
    reduction: str,
    ignore_index: int,
    backend: str,
    interclass_filtering_threshold: float,
    deterministic: bool,
    return_stats: bool,
    compute_dtype: Optional[torch.dtype],
):
    """margin_cross_entropy for inputs that check_loss_inputs passed and a precision resolve_precision resolved
    (autocast already off): the loss modules validate once per call, then come here, so that a step reads the
    labels on the host once (the range check), not once per layer."""
    backend = ops.resolve_backend(backend, weight.device)
    compute_dtype = compute_dtype_on(backend, compute_dtype, weight)
    # the pre-pass (norms, target cosine, margin) and the loss in the weight's dtype; only the products are narrower
    embeddings = embeddings.to(weight.dtype)
    if backend == "reference":
        from . import reference  # the oracle, only for the reference backend

        return reference.margin_cross_entropy(
            embeddings,
            weight,
            labels,
            margin,
            reduction=reduction,
            ignore_index=ignore_index,
            interclass_filtering_threshold=interclass_filtering_threshold,
            return_stats=return_stats,
            compute_dtype=compute_dtype,
        )
    labels = labels.long()
    valid = labels != ignore_index
    weight_for_op = _DenseGradLast.apply(weight)
    pre = pre_pass(margin, embeddings, weight, torch.where(valid, labels, torch.zeros_like(labels)))
    lse, predicted = ops.fused_lse(
        backend,
        pre.x_hat.to(compute_dtype),
        weight_for_op,
        torch.where(valid, labels, torch.full_like(labels, -1)),
        pre.target_logit,
        pre.row_scale,
        pre.threshold,
        None,
        margin.non_target_param,
        margin.non_target_mode,
        interclass_filtering_threshold if interclass_filtering_threshold > 0 else FILTER_OFF,
        margin.subcenters,
        deterministic,
    )
    loss = row_losses(lse, pre.target_logit, pre.extra_loss, valid)
    reduced = reduce_loss(loss, valid, reduction).to(embeddings.dtype)
    if not return_stats:
        return reduced
    return reduced, make_stats(lse, pre.cos_target, predicted, labels, valid)


class _DenseGradLast(torch.autograd.Function):
    """Identity whose backward node is created before the pre-pass, so autograd runs it after the
    pre-pass's sparse target-row gradient has reached W.  Autograd adds a dense gradient to an earlier
    sparse one in place, but the reverse order allocates a second (C, D) tensor: this keeps the head's
    memory at W + dW (+ O(B·D)) instead of W + 2·dW."""

    @staticmethod
    def forward(ctx, weight):
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return grad
