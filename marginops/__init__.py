"""marginops: fused angular-margin softmax losses (ArcFace, CosFace, ...) for million-class heads.

    import marginops
    loss = marginops.margin_cross_entropy(embeddings, weight, labels, marginops.ArcFace(s=64, m=0.5))

or a module that owns its weight: ``marginops.nn.ArcFaceLoss(embedding_size, num_classes)``.
"""

from . import compat, distributed, nn, reference
from .functional import MarginStats, margin_cross_entropy
from .margins import (
    AdaFace,
    ArcFace,
    CombinedMargin,
    CosFace,
    CurricularFace,
    ElasticFace,
    MagFace,
    Margin,
    NormFace,
    SphereFace,
    SubCenterArcFace,
)
from .pair_losses import batch_hard_triplet_loss, contrastive_loss

__version__ = "0.1.0"

__all__ = [
    "compat",
    "distributed",
    "batch_hard_triplet_loss",
    "contrastive_loss",
    "AdaFace",
    "ElasticFace",
    "MagFace",
    "MarginStats",
    "SubCenterArcFace",
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "Margin",
    "NormFace",
    "SphereFace",
    "margin_cross_entropy",
    "nn",
    "reference",
    "__version__",
]
