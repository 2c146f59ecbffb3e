"""Everything the suite can time, behind one interface.

A provider turns raw inputs (embeddings x (B, D), class weights W (C, D), labels (B,)) into a
``Case``: the leaves it keeps (and whose gradients are outputs, not overhead), a ``forward`` that
returns what ``backward`` needs, and a ``backward``.

* ``reference``, ``cpu``, ``cuda`` (class-chunked), ``cuda_fused``, ``triton``, ``hybrid`` (Triton gradient blocks,
  cuBLAS products):
  ``marginops.margin_cross_entropy(..., backend=...)`` with the requested margin, from raw x and W
  (normalization included).  Variants: ``*_frozen`` (weight without gradient), ``*_mixed`` (fp32 weight, 16-bit
  products), ``triton_onepass`` (the atomic one-pass backward), ``cuda_chunk{4,8,32}k`` (classes per chunk).
* ``insightface``: the head as insightface users train it (fp32 weights, logits under autocast, materialized
  B×C): the baseline of "× faster".
* ``matmul``: the three plain GEMMs of a linear head's forward and backward (x·Wᵀ, G·W, Gᵀ·x), the
  floor any fused kernel is held to; it keeps a (B, C) buffer, as a plain head must.
* no-margin anchors (plain softmax cross-entropy of s·x̂·ŵᵀ; x̂ and ŵ are normalized once, outside
  the timed region, so only the chunked/fused cross-entropy is timed):
  ``torch_lce`` PyTorch's ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``,
  ``liger`` Liger-Kernel's fused linear cross-entropy (GPU), ``cce`` Cut Cross-Entropy (GPU).
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

MARGINS = {
    "arcface": lambda: __import__("marginops").ArcFace(),
    "cosface": lambda: __import__("marginops").CosFace(),
    "normface": lambda: __import__("marginops").NormFace(),
    "combined": lambda: __import__("marginops").CombinedMargin(),
    "sphereface": lambda: __import__("marginops").SphereFace(lambda_=5.0),
    "curricularface": lambda: __import__("marginops").CurricularFace(t=0.1),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
ANCHOR_SCALE = 64.0
# classes per chunk that the cuda_chunk* providers force, around the planner's 16384 at B = 1024: the smaller
# ones keep a chunk's cosine and gradient blocks within an H100's 50 MB L2 at the price of more launches
CHUNK_SWEEP = (4096, 8192, 32768)  # s of the no-margin anchors, as NormFace's default


@dataclass
class Case:
    leaves: list  # tensors the case keeps alive; those with requires_grad get gradients
    forward: Callable[[], object]
    backward: Callable[[object], None]
    extra: list = field(default_factory=list)  # buffers a provider owns (part of its memory)


@dataclass(frozen=True)
class Provider:
    name: str
    margin_aware: bool  # False: a no-margin anchor (plain softmax CE or bare GEMMs)
    devices: tuple
    note: str
    check: Callable[[str], Optional[str]]  # device -> None if usable, else why not
    build: Callable[[dict, torch.Tensor, torch.Tensor, torch.Tensor, bool], Case]
    compare_to: Optional[str] = None  # the provider its time is also printed as a ratio of (same run, same size)

    def unavailable(self, device: str) -> Optional[str]:
        if device not in self.devices:
            return f"{self.name} does not run on {device}"
        try:
            return self.check(device)
        except Exception as exc:  # an availability probe must never take the sweep down
            return f"{type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------- marginops backends


def _marginops_case(
    backend: str,
    frozen_weight: bool = False,
    mixed: bool = False,
    deterministic: bool = True,
    switches: Optional[dict] = None,
):
    """marginops on ``backend``.  frozen_weight: the weight does not require grad (a fine-tuned backbone on a
    fixed head).  mixed: a float32 weight with the products in the case's dtype (compute_dtype), as autocast
    training runs it; the embeddings keep the case's dtype.  deterministic=False: the op's atomic variant
    (Triton: one recomputation of the cosines in the backward).  switches: environment switches set in the
    case's own process (each case runs in a fresh one), e.g. the chunked path's classes per chunk."""

    def build(spec, emb, weight, labels, grad):
        import marginops

        os.environ.update(switches or {})

        margin = MARGINS[spec["margin"]]()
        compute = emb.dtype if mixed and emb.dtype in (torch.bfloat16, torch.float16) else None
        if mixed:
            weight = weight.float()
        emb.requires_grad_(grad)
        weight.requires_grad_(grad and not frozen_weight)

        def loss():
            return marginops.margin_cross_entropy(
                emb, weight, labels, margin, backend=backend, compute_dtype=compute, deterministic=deterministic
            )

        def forward():
            if not grad:
                with torch.no_grad():
                    return loss()
            return loss()

        return Case([emb, weight, labels], forward, lambda loss: loss.backward())

    return build


def _check_reference(device):
    return None


def _check_compiled(kind):
    def check(device):
        if kind == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        from marginops import _build

        return _build.build_failure(kind)

    return check


def _check_triton(device):
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    from marginops import ops

    reason = ops.triton_usable(torch.device(device))
    if reason is None:
        ops.triton_op()  # import the kernels now: a missing module is "unavailable", not a failed case
    return reason


# ----------------------------------------------------------------------------- what users run today


def _insightface_case(spec, emb, weight, labels, grad):
    """The head as insightface trains it (``PartialFC_V2(..., fp16=True)`` at sample rate 1): fp32 master weights,
    the cosine logits x̂·ŵᵀ under autocast (fp16 on CUDA, bf16 on CPU) and materialized (B, C), the margin
    applied in fp32 (target column s·ψ(c), the others s·φ(c)), cross-entropy.  The baseline of "× faster"
    (issue 13); the embeddings keep the requested dtype, the weight is fp32 whatever it."""
    import torch.nn.functional as F

    margin = MARGINS[spec["margin"]]()
    x = emb.detach().requires_grad_(grad)
    w = weight.detach().float().requires_grad_(grad)
    amp = torch.float16 if x.device.type == "cuda" else torch.bfloat16

    def loss_fn():
        with torch.autocast(x.device.type, dtype=amp):
            cos = F.linear(F.normalize(x), F.normalize(w))
        cos = cos.float().clamp(-1.0, 1.0)
        rows = torch.arange(cos.shape[0], device=cos.device)
        c_t = cos[rows, labels]
        x_norm = x.float().norm(dim=1)
        scale = margin.row_scale(x_norm)
        logits = scale[:, None] * margin.phi(cos, margin.threshold(c_t))
        target = torch.nn.functional.one_hot(labels, cos.shape[1]).bool()
        logits = torch.where(target, margin.target_logit(c_t, scale, x_norm)[:, None], logits)
        return F.cross_entropy(logits, labels)

    def forward():
        if not grad:
            with torch.no_grad():
                return loss_fn()
        return loss_fn()

    return Case([x, w, labels], forward, lambda loss: loss.backward())


# ----------------------------------------------------------------------------- three GEMMs


def _matmul_case(spec, emb, weight, labels, grad):
    logits = torch.empty(emb.shape[0], weight.shape[0], device=emb.device, dtype=emb.dtype)

    def forward():
        with torch.no_grad():
            torch.matmul(emb, weight.t(), out=logits)
        return logits

    def backward(grad_logits):
        with torch.no_grad():
            grad_logits.matmul(weight)
            grad_logits.t().matmul(emb)

    return Case([emb, weight, labels], forward, backward, extra=[logits])


# ----------------------------------------------------------------------------- no-margin anchors


def _normalized_leaves(emb, weight, grad):
    """s·x̂ and ŵ as fresh leaves (the raw tensors are dropped by the caller)."""
    with torch.no_grad():
        x = (ANCHOR_SCALE * torch.nn.functional.normalize(emb.float(), dim=1)).to(emb.dtype)
        w = torch.nn.functional.normalize(weight.float(), dim=1).to(weight.dtype)
    return x.requires_grad_(grad), w.requires_grad_(grad)


def _anchor_case(loss_fn_factory):
    def build(spec, emb, weight, labels, grad):
        x, w = _normalized_leaves(emb, weight, grad)
        loss_fn = loss_fn_factory()

        def forward():
            if not grad:
                with torch.no_grad():
                    return loss_fn(x, w, labels)
            return loss_fn(x, w, labels)

        return Case([x, w, labels], forward, lambda loss: loss.backward())

    return build


def _torch_lce():
    import torch.nn.functional as F

    options = torch.nn.LinearCrossEntropyOptions()
    return lambda x, w, y: F.linear_cross_entropy(x, w, y, options=options)


def _check_torch_lce(device):
    import torch.nn.functional as F

    if not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy"
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no torch.nn.LinearCrossEntropyOptions (chunked path)"
    return None


def _liger():
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    module = LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, y: module(w, x, y)  # Liger's order: (lin_weight, input, target)


def _cce():
    from cut_cross_entropy import linear_cross_entropy

    return lambda x, w, y: linear_cross_entropy(x, w, y)  # (embeddings, classifier (C, D), labels)


def _check_import(module: str):
    def check(device):
        if device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return f"{module} is not importable ({exc})"
        return None

    return check


def package_version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version({"liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy"}.get(module, module))
    except Exception:
        return None


PROVIDERS = {
    p.name: p
    for p in [
        Provider(
            "reference",
            True,
            ("cpu", "cuda"),
            "PyTorch reference, materializes the B×C logits",
            _check_reference,
            _marginops_case("reference"),
        ),
        Provider("cpu", True, ("cpu",), "marginops C++ CPU kernels", _check_compiled("cpu"), _marginops_case("cpu")),
        Provider(
            "cpu_frozen",
            True,
            ("cpu",),
            "marginops C++ CPU kernels, weight frozen (no dW product, no C×D gradient)",
            _check_compiled("cpu"),
            _marginops_case("cpu", frozen_weight=True),
            compare_to="cpu",
        ),
        Provider(
            "cpu_mixed",
            True,
            ("cpu",),
            "marginops C++ CPU kernels, fp32 weight with products in the case's dtype (mixed precision)",
            _check_compiled("cpu"),
            _marginops_case("cpu", mixed=True),
            compare_to="insightface",
        ),
        Provider(
            "cuda",
            True,
            ("cuda",),
            "marginops CUDA: class-chunked path (cuBLAS + one epilogue per chunk)",
            _check_compiled("cuda"),
            _marginops_case("cuda"),
        ),
        Provider(
            "cuda_mixed",
            True,
            ("cuda",),
            "marginops CUDA chunked path, fp32 weight with products in the case's dtype (mixed precision)",
            _check_compiled("cuda"),
            _marginops_case("cuda", mixed=True),
            compare_to="insightface",
        ),
        *[
            Provider(
                f"cuda_chunk{cols // 1024}k",
                True,
                ("cuda",),
                f"marginops CUDA chunked path with {cols} classes per chunk (MARGINOPS_CHUNK_COLS; the planner's "
                "choice is `cuda`)",
                _check_compiled("cuda"),
                _marginops_case("cuda", switches={"MARGINOPS_CHUNK_COLS": str(cols)}),
                compare_to="cuda",
            )
            for cols in CHUNK_SWEEP
        ],
        Provider(
            "cuda_fused",
            True,
            ("cuda",),
            "marginops fused CUDA kernels",
            _check_compiled("cuda"),
            _marginops_case("cuda_fused"),
        ),
        Provider(
            "insightface",
            True,
            ("cpu", "cuda"),
            "insightface-style head: fp32 weights, cosine logits under autocast (fp16 CUDA / bf16 CPU), "
            "materialized B×C, margin in fp32",
            _check_reference,
            _insightface_case,
        ),
        Provider("triton", True, ("cpu", "cuda"), "marginops Triton kernels", _check_triton, _marginops_case("triton")),
        Provider(
            "triton_onepass",
            True,
            ("cpu", "cuda"),
            "marginops Triton kernels, deterministic=False: the backward recomputes the cosines once and "
            "accumulates dX with fp32 atomics",
            _check_triton,
            _marginops_case("triton", deterministic=False),
            compare_to="triton",
        ),
        Provider(
            "hybrid",
            True,
            ("cpu", "cuda"),
            "marginops hybrid path: the Triton forward; backward per class chunk a Triton gradient block and cuBLAS "
            "products (docs/CHUNKED.md)",
            _check_triton,
            _marginops_case("hybrid"),
            compare_to="triton",
        ),
        Provider(
            "hybrid_mixed",
            True,
            ("cuda",),
            "marginops hybrid path, fp32 weight with products in the case's dtype (mixed precision)",
            _check_triton,
            _marginops_case("hybrid", mixed=True),
            compare_to="cuda_mixed",
        ),
        Provider(
            "matmul",
            False,
            ("cpu", "cuda"),
            "anchor: the 3 GEMMs x·Wᵀ, G·W, Gᵀ·x only (no softmax, no margin)",
            _check_reference,
            _matmul_case,
        ),
        Provider(
            "torch_lce",
            False,
            ("cpu", "cuda"),
            "anchor: F.linear_cross_entropy(options=LinearCrossEntropyOptions()) on pre-normalized x, W; no margin",
            _check_torch_lce,
            _anchor_case(_torch_lce),
        ),
        Provider(
            "liger",
            False,
            ("cuda",),
            "anchor: Liger-Kernel fused linear CE on pre-normalized x, W; no margin",
            _check_import("liger_kernel"),
            _anchor_case(_liger),
        ),
        Provider(
            "cce",
            False,
            ("cuda",),
            "anchor: Cut Cross-Entropy on pre-normalized x, W; no margin",
            _check_import("cut_cross_entropy"),
            _anchor_case(_cce),
        ),
    ]
}

# what --quick runs when --backends is not given: torch_lce is left out on the CPU, where its
# chunking (one batch row per chunk once C >> D) takes tens of seconds per iteration at these sizes
QUICK_DEFAULTS = {
    "cpu": ["reference", "cpu", "matmul"],
    "cuda": ["reference", "cuda", "cuda_fused", "triton", "insightface", "matmul", "torch_lce", "liger", "cce"],
}
# what a sweep runs when --backends is not given (unavailable ones are recorded as such)
SWEEP_DEFAULTS = {
    "cpu": ["reference", "cpu", "matmul", "torch_lce"],
    "cuda": ["reference", "cuda", "cuda_fused", "triton", "insightface", "matmul", "torch_lce", "liger", "cce"],
}
# the no-argument run (the first benchmark)
PLAIN_DEFAULTS = {
    "cpu": ["reference", "cpu", "matmul"],
    "cuda": ["reference", "cuda", "cuda_fused", "triton", "insightface", "matmul"],
}


@functools.lru_cache(maxsize=None)
def availability(name: str, device: str) -> Optional[str]:
    """None if provider ``name`` can run on ``device`` here, else why not (cached per process)."""
    if name not in PROVIDERS:
        return f"unknown provider {name!r} (known: {', '.join(PROVIDERS)})"
    return PROVIDERS[name].unavailable(device)


def triton_interpreted(device: str) -> bool:
    return device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
