"""Drop-in classes with the constructor signatures and semantics of other libraries, on the fused op.

* ``marginops.compat.pml`` — pytorch-metric-learning's ArcFaceLoss, CosFaceLoss, SphereFaceLoss
  (weight ``W`` shaped (embedding_size, num_classes), margins in pml's units);
* ``marginops.compat.insightface`` — arcface_torch's CombinedMarginLoss and PartialFC_V2.

Each module documents where its behaviour differs from the original.
"""

from . import insightface, pml

__all__ = ["insightface", "pml"]
