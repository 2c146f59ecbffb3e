"""Triton backend of marginops' fused op (installed as ``marginops.triton_kernels``).

Exports the two launchers, one per op schema (csrc/marginops.cpp):

* ``fused_lse_forward(x, weight, labels, target_logit, row_scale, threshold, class_index, non_target_param,
  non_target, filter_threshold, subcenters, deterministic, switches=-1) -> (lse, argmax)``
* ``fused_lse_backward(grad_lse, lse, x, weight, labels, target_logit, row_scale, threshold, class_index,
  non_target_param, non_target, filter_threshold, subcenters, deterministic, need_grad_x=True,
  need_grad_weight=True, switches=-1) -> (grad_x, grad_weight, grad_target_logit, grad_row_scale)``

and ``pack_switches(tf32=..., fast_grad_dots=..., autotune=...)``, the value of ``switches`` (-1: the defaults).
The package imports nothing from marginops and reads no environment variable: marginops/ops.py, the launchers'
caller, reads the switches (the two attributes below, else their environment variables) once per op call and passes
them, and the backward launchers' keyword arguments (``max_abs_dphi``; the hybrid plan's ``rows_per_tile`` /
``cols_per_chunk``).

and the hybrid path's backward (backend ``"hybrid"``: the forward is ``fused_lse_forward``), same signature as
``fused_lse_backward``:

* ``hybrid_backward(...)``: per class chunk a Triton kernel writes the 16-bit logit-gradient block, ``torch.mm``
  (cuBLAS) forms dX and dW from it, a Triton row kernel finishes dW (hybrid_bwd.py, hybrid_launch.py).

All are meant for ``torch.library.triton_op`` (they launch through ``torch.library.wrap_triton``).  On CPU
tensors they run under Triton's interpreter, which must be enabled (``TRITON_INTERPRET=1``) before Triton is
first imported.

``ALLOW_TF32`` (None: follow ``MARGINOPS_TRITON_TF32``, default off): let float32 inputs use TF32
tensor-core dot products.  Off by default so that float32 results match the float32 reference to fp32
rounding; read once per op call by its forward, whose backward uses the same (baked in when a graph is compiled).

``FAST_GRAD_DOTS`` (None: follow ``MARGINOPS_TRITON_FAST_BWD``, default off): for fp16 inputs, form the
backward's dX and dW products from one fp16 copy of the gradient operand instead of a hi + lo pair.  That
halves the products' tensor-core work and lets D = 512 run in one d-chunk, at errors near the docs/DESIGN.md §4
bound (which is why it is off by default).  bf16 inputs ignore it: their dW product always takes one fp16
operand (its 11-bit mantissa keeps the gradient within the bound; one bf16 rounding gave ~0.3% errors), their
dX product always a bf16 hi + lo pair.

Only relative imports inside this package: ``triton_kernels`` on PyPI is a different project.
"""

from typing import Optional

from .hybrid_launch import hybrid_backward
from .launch import fused_lse_backward, fused_lse_forward, pack_switches

# True/False override the environment switches (marginops/config.py); read by marginops/ops.py, not here
ALLOW_TF32: Optional[bool] = None
FAST_GRAD_DOTS: Optional[bool] = None

__all__ = [
    "ALLOW_TF32",
    "FAST_GRAD_DOTS",
    "fused_lse_backward",
    "fused_lse_forward",
    "hybrid_backward",
    "pack_switches",
]
