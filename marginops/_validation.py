"""The one place where user-facing inputs are checked, with messages that name the argument."""

from __future__ import annotations

import torch

from .margins import Margin

REDUCTIONS = ("mean", "sum", "none")
_CPU_KERNEL_DTYPES = (torch.float32, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_loss_inputs(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: Margin,
    *,
    reduction: str,
    ignore_index: int,
    backend: str,
) -> None:
    """Raise ValueError/TypeError for anything the kernels must never see."""
    from .ops import BACKENDS

    if not isinstance(margin, Margin):
        raise TypeError(f"margin must be a marginops margin spec (e.g. marginops.ArcFace()), got {type(margin).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, t in (("embeddings", embeddings), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be 2-D (batch, embedding_size), got {_describe(embeddings)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (num_classes, embedding_size), got {_describe(weight)}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D (batch,), got {_describe(labels)}")
    if embeddings.shape[0] == 0:
        raise ValueError("embeddings is an empty batch (0 rows); the loss needs at least one row")
    if not embeddings.is_floating_point():
        raise TypeError(f"embeddings must be a floating-point tensor, got {_describe(embeddings)}")
    if weight.dtype != embeddings.dtype:
        raise TypeError(
            f"weight dtype {weight.dtype} differs from embeddings dtype {embeddings.dtype}; cast one of them "
            "(e.g. embeddings.to(weight.dtype))"
        )
    if weight.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"embedding size mismatch: embeddings has {embeddings.shape[1]} features ({_describe(embeddings)}) but "
            f"weight rows have {weight.shape[1]} ({_describe(weight)}); weight must be (num_classes, embedding_size)"
        )
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but embeddings has {embeddings.shape[0]} rows")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"labels must be an integer tensor (int64 or int32), got {_describe(labels)}")
    if not (embeddings.device == weight.device == labels.device):
        raise ValueError(
            f"embeddings ({embeddings.device}), weight ({weight.device}) and labels ({labels.device}) must be on one device"
        )
    subcenters = margin.subcenters
    if subcenters < 1 or weight.shape[0] % subcenters:
        raise ValueError(f"weight has {weight.shape[0]} rows, not a multiple of subcenters={subcenters}")
    if weight.shape[0] == 0:
        raise ValueError("weight has no rows (num_classes = 0)")
    check_backend_fits(backend, embeddings)
    if not torch.compiler.is_compiling():
        check_label_values(labels, weight.shape[0] // subcenters, ignore_index)


def check_backend_fits(backend: str, embeddings: torch.Tensor) -> None:
    device = embeddings.device
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}; use backend='auto'")
        if embeddings.dtype not in _CPU_KERNEL_DTYPES:
            raise TypeError(
                f"backend='cpu' supports float32 and float64, got {embeddings.dtype}; use backend='reference' "
                "or cast to float32"
            )
    elif backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    elif backend == "triton":
        from .ops import triton_usable

        reason = triton_usable(device)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run here: {reason}")


def check_label_values(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        where = bad.nonzero().flatten()[:5].tolist()
        values = labels[bad][:5].tolist()
        raise ValueError(
            f"labels out of range: {int(bad.sum())} label(s) outside [0, {num_classes}) and not ignore_index="
            f"{ignore_index}, e.g. labels[{where[0]}] = {values[0]} (first offending positions {where}, values {values})"
        )
