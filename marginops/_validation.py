"""The one place where user-facing inputs are checked, with messages that name the argument.

Scalar checks that the margin specs run when they are built live in the leaf module _scalar_checks (margins
imports them, and this module imports margins); they are re-exported here."""

from __future__ import annotations

import torch

from ._scalar_checks import check_number
from .capabilities import BACKENDS, triton_usable
from .margins import Margin

REDUCTIONS = ("mean", "sum", "none")
_CPU_KERNEL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# every integer dtype: labels are widened to int64 before any comparison (uint8 cannot hold -100)
LABEL_DTYPES = (
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
)


def label_dtype_problem(labels: torch.Tensor, name: str = "labels") -> "str | None":
    if labels.dtype in LABEL_DTYPES:
        return None
    accepted = ", ".join(str(d).replace("torch.", "") for d in LABEL_DTYPES)
    return f"{name} must be an integer tensor ({accepted}), got {_describe(labels)}"


def check_module_options(*, backend: str, reduction: str, ignore_index, interclass_filtering_threshold) -> None:
    """The options every loss module takes, checked in __init__ rather than at the first forward."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    check_number("interclass_filtering_threshold", interclass_filtering_threshold, why="<= 0 turns filtering off")


COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_compute_dtype(compute_dtype) -> None:
    """TypeError unless ``compute_dtype`` is None or a floating dtype the op can run its products in."""
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise TypeError(
            f"compute_dtype must be None, torch.bfloat16, torch.float16, torch.float32 or torch.float64, "
            f"got {compute_dtype!r}"
        )


def compute_dtype_problem(compute_dtype, weight_dtype: torch.dtype) -> "str | None":
    """Why the products cannot run in ``compute_dtype`` for a weight of ``weight_dtype`` (None: they can): the
    weight's own dtype, or bf16 / fp16 products on a float32 weight (mixed precision)."""
    if compute_dtype is None or compute_dtype == weight_dtype:
        return None
    if weight_dtype == torch.float32 and compute_dtype in (torch.bfloat16, torch.float16):
        return None
    return (
        f"compute_dtype {compute_dtype} does not fit a {weight_dtype} weight: use the weight's dtype, or "
        "torch.bfloat16 / torch.float16 with a float32 weight (mixed precision)"
    )


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, value, expected: str = "") -> None:
    """TypeError unless ``value`` is a torch.Tensor (``expected``: what it should hold, for the message)."""
    if not isinstance(value, torch.Tensor):
        what = f" ({expected})" if expected else ""
        raise TypeError(f"{name} must be a torch.Tensor{what}, got {type(value).__name__}")


def check_indices_tuple(indices_tuple, batch: int) -> None:
    """A miner's output as pytorch-metric-learning's losses take it: (anchor, positive, negative) triplets or
    (anchor, positive, anchor, negative) pairs, each a 1-D integer tensor of row indices into the batch; the
    members of a triplet, and of each pair, line up one to one.  Empty members (a miner that found nothing)
    may have any dtype, as pml's own conversions return float ones."""
    kinds = "(anchors, positives, negatives) triplets or (anchors, positives, anchors, negatives) pairs"
    if not isinstance(indices_tuple, (tuple, list)):
        raise TypeError(
            f"indices_tuple must be a tuple of index tensors, a miner's {kinds}, got {type(indices_tuple).__name__}"
        )
    if len(indices_tuple) not in (3, 4):
        raise ValueError(f"indices_tuple must hold 3 or 4 index tensors, a miner's {kinds}, got {len(indices_tuple)}")
    for i, t in enumerate(indices_tuple):
        check_tensor(f"indices_tuple[{i}]", t, "1-D batch indices")
        if t.dim() != 1:
            raise ValueError(f"indices_tuple[{i}] must be 1-D (one batch index per entry), got {_describe(t)}")
        if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            raise TypeError(f"indices_tuple[{i}] must hold integer batch indices, got {_describe(t)}")
    # triplets: a, p, n line up; pairs: (a1, p) and (a2, n) line up
    groups = ((0, 1, 2),) if len(indices_tuple) == 3 else ((0, 1), (2, 3))
    for group in groups:
        lengths = [indices_tuple[i].shape[0] for i in group]
        if len(set(lengths)) > 1:
            members = ", ".join(f"indices_tuple[{i}]: {n}" for i, n in zip(group, lengths))
            raise ValueError(f"indices_tuple members that pair up must have equal lengths, got {members}")
    for i, t in enumerate(indices_tuple):
        if t.numel():
            low, high = int(t.min()), int(t.max())
            if low < 0 or high >= batch:
                raise ValueError(
                    f"indices_tuple[{i}] holds batch indices in [{low}, {high}], outside [0, {batch}) for a batch "
                    f"of {batch} rows"
                )


def check_loss_inputs(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: Margin,
    *,
    reduction: str,
    ignore_index: int,
    backend: str,
    compute_dtype=None,
) -> None:
    """Raise ValueError/TypeError for anything the kernels must never see.  compute_dtype: the dtype of the
    products (None: the weight's); the embeddings may come in it instead of the weight's dtype."""
    if not isinstance(margin, Margin):
        raise TypeError(
            f"margin must be a marginops margin spec (e.g. marginops.ArcFace()), got {type(margin).__name__}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, t in (("embeddings", embeddings), ("weight", weight), ("labels", labels)):
        check_tensor(name, t)
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
    check_compute_dtype(compute_dtype)
    if weight.dtype != embeddings.dtype and embeddings.dtype != compute_dtype:
        raise TypeError(
            f"weight dtype {weight.dtype} differs from embeddings dtype {embeddings.dtype}; cast one of them "
            "(e.g. embeddings.to(weight.dtype)), or ask for mixed precision (compute_dtype=torch.bfloat16 / "
            "torch.float16 with a float32 weight, or torch.autocast)"
        )
    problem = compute_dtype_problem(compute_dtype, weight.dtype)
    if problem is not None:
        raise ValueError(problem)
    if weight.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"embedding size mismatch: embeddings has {embeddings.shape[1]} features ({_describe(embeddings)}) but "
            f"weight rows have {weight.shape[1]} ({_describe(weight)}); weight must be (num_classes, embedding_size)"
        )
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but embeddings has {embeddings.shape[0]} rows")
    problem = label_dtype_problem(labels)
    if problem is not None:
        raise TypeError(problem)
    if not (embeddings.device == weight.device == labels.device):
        raise ValueError(
            f"embeddings ({embeddings.device}), weight ({weight.device}) and labels ({labels.device}) "
            "must be on one device"
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
                f"backend='cpu' supports float64, float32, bfloat16 and float16, got {embeddings.dtype}; use "
                "backend='reference' or cast to float32"
            )
    elif backend in ("cuda", "cuda_fused") and device.type != "cuda":
        raise ValueError(f"backend={backend!r} needs CUDA tensors, got tensors on {device}")
    elif backend in ("triton", "hybrid"):
        reason = triton_usable(device)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run here: {reason}")


def check_label_values(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    labels = labels.long()  # compared as int64: in uint8, ignore_index -100 would read as 156
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        where = bad.nonzero().flatten()[:5].tolist()
        values = labels[bad][:5].tolist()
        raise ValueError(
            f"labels out of range: {int(bad.sum())} label(s) outside [0, {num_classes}) and not ignore_index="
            f"{ignore_index}, e.g. labels[{where[0]}] = {values[0]} "
            f"(first offending positions {where}, values {values})"
        )
