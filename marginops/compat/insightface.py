"""insightface (recognition/arcface_torch) compatible ``CombinedMarginLoss`` and ``PartialFC_V2``.

arcface_torch's training script builds the head as::

    margin_loss = CombinedMarginLoss(64, m1, m2, m3, interclass_filtering_threshold)
    module_partial_fc = PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate, fp16)
    loss = module_partial_fc(local_embeddings, local_labels)

and the same two lines with ``from marginops.compat.insightface import CombinedMarginLoss, PartialFC_V2``
compute that loss with the fused op: no (batch, num_classes / world) logits, class shards and Partial FC
as in insightface (``marginops.distributed.DistributedMarginLoss`` underneath: same shard layout, the
parameter is ``weight`` (num_local, embedding_size) with the same state_dict key, the embeddings'
gradient is multiplied by the world size as insightface's AllGather does, for DDP's averaging).

Margins, as insightface's ``CombinedMarginLoss.forward`` branches:

* m1 = 1, m3 = 0, m2 > 0 (ArcFace): target s·cos(θ + m2) with **no** fallback past θ = π − m2.
  insightface computes it with in-place arccos/cos under ``torch.no_grad()``, so the margin carries no
  gradient: the target logit's gradient is that of s·c.  That is the default here
  (``detach_margin=True``, bit-for-bit the historical training dynamics); ``detach_margin=False`` gives
  the exact gradient of s·cos(θ + m2) (finite at c = ±1) with the same loss values;
* m3 > 0 (CosFace): target s·(c − m3), exact gradients.  As in insightface, m1 and m2 are then ignored
  (a warning says so if they are not 1 and 0);
* m1 = 1, m2 = 0, m3 = 0: plain normalized softmax s·c;
* m1 ≠ 1, m3 = 0 — insightface raises; here the general combined margin s·cos(m1·θ + m2).

``interclass_filtering_threshold`` > 0: non-target cosines above it get logit 0 and no gradient, as in
insightface.  Other differences: the loss is −log p_target without insightface's clamp of p at 1e-30
(which caps a row's loss at 69); Partial FC samples with a seeded generator (reproducible, see
DistributedMarginLoss) and only in training mode (eval computes the full softmax); batch sizes may differ
between ranks; labels may be (B,) or (B, 1); without an initialized process group it runs as one rank;
``fp16=True`` runs the head's products in float16 on the float32 weight (mixed precision, fp32 accumulation and
float32 dW), as insightface's autocast does; ``state_dict`` records the checkpoint's layout (head, world size,
class range) but not the sampling step (set ``sample_step`` yourself to resume the exact sample sequence);
insightface's checkpoints ({"weight"}) load as whole heads, and per-rank ones through
``marginops.distributed.legacy_shard`` (their row count alone cannot tell which classes they hold).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import margins
from ..distributed import DistributedMarginLoss

__all__ = ["CombinedMarginLoss", "PartialFC_V2"]


class CombinedMarginLoss(nn.Module):
    """insightface's margin module.  Pass it to ``PartialFC_V2`` (the fused path); calling it on a (B, C)
    cosine matrix, as insightface's own PartialFC does, returns the margined, scaled logits (materialized)."""

    def __init__(
        self,
        s: float,
        m1: float,
        m2: float,
        m3: float,
        interclass_filtering_threshold: float = 0,
        detach_margin: bool = True,
    ):
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.detach_margin = bool(detach_margin)
        if self.m3 > 0 and (self.m1 != 1.0 or self.m2 != 0.0):
            warnings.warn(
                f"CombinedMarginLoss(m1={m1}, m2={m2}, m3={m3}): with m3 > 0 insightface applies only the cosine "
                "margin m3 (CosFace) and ignores m1, m2; so does marginops.compat. For the full combined margin use "
                "marginops.CombinedMargin",
                UserWarning,
                stacklevel=2,
            )
        self.margin_spec()  # validate

    def margin_spec(self) -> margins.Margin:
        """The marginops margin spec with insightface's semantics (see the module docstring)."""
        if self.m3 > 0:
            return margins.CosFace(s=self.s, m=self.m3)
        if self.m1 == 1.0 and self.m2 == 0.0:
            return margins.NormFace(s=self.s)
        return margins.CombinedMargin(s=self.s, m1=self.m1, m2=self.m2, m3=0.0, detach_margin=self.detach_margin)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cosines (B, C) and labels (B,) or (B, 1) with −1 for "target not in these columns" → logits."""
        labels = labels.reshape(-1).long()
        rows = torch.nonzero(labels != -1).flatten()
        cols = labels[rows]
        if self.interclass_filtering_threshold > 0:
            with torch.no_grad():
                dirty = logits > self.interclass_filtering_threshold
                dirty[rows, cols] = False
            logits = logits.masked_fill(dirty, 0.0)
        spec = self.margin_spec()
        target = logits[rows, cols]
        out = logits * self.s
        z = spec.target_logit(target, torch.full_like(target, self.s), torch.ones_like(target))  # x_norm unused here
        return out.index_put((rows, cols), z)

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
            f"interclass_filtering_threshold={self.interclass_filtering_threshold}, detach_margin={self.detach_margin}"
        )


def _margin_from(margin_loss) -> tuple[margins.Margin, float]:
    """(margin spec, filtering threshold) from our CombinedMarginLoss, a marginops spec, or insightface's modules."""
    if isinstance(margin_loss, CombinedMarginLoss):
        return margin_loss.margin_spec(), margin_loss.interclass_filtering_threshold
    if isinstance(margin_loss, margins.Margin):
        return margin_loss, 0.0
    names = type(margin_loss).__name__
    attrs = vars(margin_loss) if hasattr(margin_loss, "__dict__") else {}
    if all(k in attrs for k in ("s", "m1", "m2", "m3")):  # insightface's own CombinedMarginLoss instance
        ours = CombinedMarginLoss(
            attrs["s"], attrs["m1"], attrs["m2"], attrs["m3"], attrs.get("interclass_filtering_threshold", 0)
        )
        return ours.margin_spec(), ours.interclass_filtering_threshold
    if names == "CosFace" and "s" in attrs and "m" in attrs:  # insightface's losses.CosFace
        return margins.CosFace(s=float(attrs["s"]), m=float(attrs["m"])), 0.0
    if names == "ArcFace" and "margin" in attrs and ("scale" in attrs or "s" in attrs):  # insightface's losses.ArcFace
        return margins.ArcFace(s=float(attrs.get("scale", attrs.get("s"))), m=float(attrs["margin"])), 0.0
    raise TypeError(
        "PartialFC_V2: margin_loss must be marginops.compat.insightface.CombinedMarginLoss, a marginops margin spec, "
        f"or one of insightface's CombinedMarginLoss/ArcFace/CosFace modules; got {names}"
    )


class PartialFC_V2(DistributedMarginLoss):  # noqa: N801  (insightface's name)
    """insightface's PartialFC_V2 on the fused op: class shards over the ranks, Partial FC sampling."""

    _version = 2

    # the layout record only (no sampling step); insightface's checkpoints ({"weight"}) load as whole heads, and
    # as per-rank shards through marginops.distributed.legacy_shard
    def get_extra_state(self):
        return {"layout": self._layout()}

    def set_extra_state(self, state):
        pass

    def __init__(
        self,
        margin_loss,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        fp16: bool = False,
        *,
        process_group=None,
        backend: str = "auto",
        seed: int = 0,
        deterministic: bool = True,
    ):
        margin, filter_threshold = _margin_from(margin_loss)
        super().__init__(
            margin,
            embedding_size,
            num_classes,
            sample_rate,
            process_group,
            backend,
            seed=seed,
            interclass_filtering_threshold=filter_threshold,
            deterministic=deterministic,
        )
        self.margin_softmax = margin_loss if isinstance(margin_loss, nn.Module) else None
        self.fp16 = bool(fp16)
        self.num_sample = int(self.sample_rate * self.num_local)

    def _products_dtype(self):
        # insightface computes the logits under fp16 autocast; a non-float32 weight keeps its own dtype
        if self.fp16 and self.weight.dtype == torch.float32:
            return torch.float16
        return self.compute_dtype

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        return super().forward(local_embeddings, local_labels.reshape(-1))
