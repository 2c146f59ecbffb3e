"""Cases, comparisons and the tolerance constants of the op-level suite (tests/test_op_suite.py).

Every backend adapter (tests/op_backends.py) builds its inputs with ``Case``, runs the op with ``run_op`` and is
compared with ``marginops.reference.fused_lse`` run on the CPU (``run_reference``): in float64 to tight
tolerances (``assert_matches_float64``), in lower precision by docs/DESIGN.md §4 (tolerance rule)
(``assert_within_rule``: error vs the float64 truth ≤ 2 × the error of the reference run in the same dtype, plus
a slack).  Every tolerance the op-level tests use is a named constant below, with the error it covers.
"""

import copy

import torch
from helpers import assert_close, assert_within_reference_error

from marginops import reference
from marginops.margins import FILTER_OFF  # a filter threshold above every cosine: the filter is off

CPU = torch.device("cpu")

# The op's outputs (forward, then backward), in the order run_op and run_reference return them.
NAMES = ("lse", "argmax", "grad_x", "grad_weight", "grad_target_logit", "grad_row_scale")
# The op's arguments, in the order Case.args() gives them (the ``deterministic`` flag follows).
ARG_NAMES = (
    "x",
    "weight",
    "labels",
    "target_logit",
    "row_scale",
    "threshold",
    "class_index",
    "non_target_param",
    "non_target",
    "filter_threshold",
    "subcenters",
)
PER_ROW = ("target_logit", "row_scale", "threshold", "grad")

# ------------------------------------------------------------------------------------------------------------
# Tolerances.  Each says what error it covers; "× max" means relative to the output's largest magnitude.
# ------------------------------------------------------------------------------------------------------------
# float64 kernels vs the float64 reference (rtol, and atol = rtol × max): both round every operation to 2^-53
# ≈ 1.1e-16 but sum up to D = 600 products and N = 20000 exponentials in other orders (blocked, split, merged),
# which leaves ≲ 1e-13 relative; 1e-9 is far above that and far below any formula mistake (a wrong branch or a
# dropped term moves an output by ≥ 1e-6 relative).
F64_RTOL = 1e-9
# docs/DESIGN.md §4 slack of the float32 kernels (× max).  The row gradient g·exp(target_logit − lse) takes lse
# from the kernel's forward: one float32 ulp of an lse near 30 (2e-6) becomes that relative error in the
# gradient, which the reference (softmax of materialized logits) does not have; 4e-6 is two such ulps.  Measured
# (emulated CUDA kernels, 2 SMs, C = 3000): 1.0e-6 on grad_target_logit.
F32_SLACK = 4e-6
# The CPU kernels' float32 results measured within 2 × the reference's error with no slack at all (worst
# −1.3e-8 × max), so the CPU keeps the stricter 1e-6 (half an lse ulp) its tests have had.
F32_SLACK_CPU = 1e-6
# docs/DESIGN.md §4 slack (× max) of the CPU kernels' bf16 / fp16 paths (both 16-bit, or 16-bit x with a float32
# weight).  They widen the inputs to float32 and run the float32 kernels, so their error is the float32 path's:
# lse, grad_target_logit and grad_row_scale are float32 sums in other orders than the reference's (also float32
# for 16-bit inputs); grad_x / grad_weight are dominated by the final 16-bit rounding, which the reference shares.
# Measured over the CPU precision cases, large_gradient, every_mode, D = 600, small-norm rows (k = 1, 3), two seeds:
# at most 1.6e-7 (bf16, grad_row_scale, small-norm rows), ≤ 0 on the 16-bit outputs; 1e-6 keeps 6× room.
LOW_SLACK_CPU = 1e-6
# float32 elementwise check (rtol, atol × max) against the float64 truth on the rounded inputs: a float32 dot
# product of unit vectors over D ≤ 600 is off by ≲ 1e-6 relative, times s ≈ 30 in a logit, one lse ulp (above)
# in each exp(z − lse); 2e-5 relative leaves room for that, and catches an element-wise slip the max-based
# docs/DESIGN.md §4 rule would let through on small elements.
F32_RTOL, F32_ATOL = 2e-5, 2e-6
# docs/DESIGN.md §4 slack (× max) of the bf16 / fp16 paths of the CUDA kernels and of Triton under the
# interpreter.  The rule's 2 × reference error covers rounding the inputs and the logits; the kernels also run
# their products on fp16 operands (the logit gradient scaled by a power of two, 2^-11 relative) and sum in fp32
# partials, which the reference (autograd in the input dtype) rounds differently.  Measured on the emulator: up
# to 7.2e-6 (bf16, D = 600 in feature chunks, grad_row_scale), 2.9e-6 in fp16; Triton under the interpreter
# needs none (≤ 0).
LOW_SLACK_CUDA = 1e-5
# docs/DESIGN.md §4 slack (× max) of Triton's bf16 / fp16 paths on a GPU: the interpreter runs bf16 dots on fp32
# copies in its own order, so it does not show the tensor cores' rounding; until a GPU run measures it, Triton
# keeps the 10× margin its tests have had.
LOW_SLACK_TRITON_GPU = 1e-4
# argmax may flip between near-equal cosines: the picked column's float64 cosine must be within this of the
# row's maximum.  A dot product of unit vectors in float32 over D ≤ 600 is off by ≲ 1e-6 (typical √D·2^-24);
# bf16 / fp16 inputs are rounded by 2^-9 / 2^-11 but the reference cosines are taken on the rounded inputs, so
# only the kernels' fp32 accumulation (≲ 1e-5 at D = 600) remains; float64 must pick the exact maximum.
ARGMAX_TOL = {torch.float64: 0.0, torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
# NaN test: lse of the rows without a NaN against the reference in the same dtype (rtol = atol): float64 as
# F64_RTOL; float32: a few ulps of an lse ≈ 30 (2e-6 each); bf16: the reference's bf16 logits (2^-9) differ
# from the kernels' float32 ones by up to 1e-4 relative after the sum.
NAN_OTHER_ROWS_TOL = {torch.float64: F64_RTOL, torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
# Zero-norm weight rows: their gradient is (Σ_i dcos_i x_i) / 1e-12 ≈ 1e10; in float32 / bf16 it is a sum of B
# terms of 1e10 with float32 accumulation — relative error ≲ 1e-5, 1e-2 catches a wrong formula (it is 1 then).
ZERO_ROW_RTOL = 1e-2
# D = 1: every cosine is ±1 and the true grad_weight is 0, the dW product and its projection term cancelling
# exactly.  What is left of grad_weight[r], over the size of either term (U_r = Σ_i |dcos_ir| / n_r), is their
# fp32 rounding: measured ≤ 2^-22.7 on every backend and dtype (4 seeds).  Rounding dcos to 16 bits on one side
# only (issue 24: the bf16 dW of Triton and of the fused CUDA kernels) left 2^-12.8.  2^-18 lies between.
SINGLE_FEATURE_WEIGHT_REL = 2.0**-18
# TF32 (10-bit mantissas, 2^-11 relative per operand): cosines off by ~1e-3, times s ≈ 30 in a logit, so
# exp(z − lse) and every gradient are off by up to ~3 % of the largest; lse by ~1e-3 relative (× max, rtol 0).
TF32_ATOL = 5e-2
TF32_ARGMAX_TOL = 5e-3  # a 1e-3 cosine error, 5 × over
# The fast 16-bit backward rounds each logit gradient once to fp16 (2^-11) without the hi + lo split: 2e-2 × max
# from the default is far above that on a single element and far below a wrong result; still within the
# docs/DESIGN.md §4 rule at a slack of 3e-2 × max.
FAST_BWD_ATOL = 2e-2
FAST_BWD_SLACK = 3e-2
# The CPU kernels' narrower vector widths against the default (float32): other summation orders of D products
# and N exponentials, ≲ 1e-6 relative; 1e-4 relative + 1e-5 × max.
VECTOR_WIDTH_RTOL, VECTOR_WIDTH_ATOL = 1e-4, 1e-5
# The GPU's full 4.3 GB bf16 weight (tests/test_op_backend_specific.py) against a float32 reference chunked over
# its 4.2M rows: lse sums 4.2M exponentials in float32 (≲ 1e-6 relative, rtol 1e-5, atol 1e-4 on lse ≈ 16);
# grad_target_logit = g·exp(tl − lse) inherits that (rtol 1e-4, atol 1e-6); grad_x / grad_weight come from bf16
# products of 4.2M terms against a float32 one (2^-9 per operand: 2e-2 relative + 2e-2 × max).
BIG_LSE_RTOL, BIG_LSE_ATOL = 1e-5, 1e-4
BIG_TARGET_RTOL, BIG_TARGET_ATOL = 1e-4, 1e-6
BIG_GRAD_TOL = 2e-2


class Case:
    """Inputs of the op on the CPU in float64 (normalized x, raw W with a planted signal, labels with -1 rows,
    per-row tensors); ``on(dtype, device)`` gives the same case in another dtype and/or on another device."""

    def __init__(
        self,
        B=37,
        D=61,
        C=1001,
        k=1,
        class_index=False,
        zero_rows=(),
        seed=0,
        non_target=0,
        filter_threshold=FILTER_OFF,
        non_target_param=0.3,
        none_every=5,
    ):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(C * k, D, generator=g, dtype=torch.float64) * (
            0.5 + torch.rand(C * k, 1, generator=g, dtype=torch.float64)
        )
        for r in zero_rows:
            w[r] = 0.0
        if class_index:
            self.class_index = torch.randperm(C, generator=g)[: (2 * C) // 3]
            N = self.class_index.numel()
        else:
            self.class_index, N = None, C
        labels = torch.randint(0, N, (B,), generator=g)
        if none_every:
            labels[::none_every] = -1
        cls = labels.clamp_min(0)
        if self.class_index is not None:
            cls = self.class_index[cls]
        x = torch.randn(B, D, generator=g, dtype=torch.float64)
        x = x + 2.0 * torch.rand(B, 1, generator=g, dtype=torch.float64) * w[cls * k]  # spread target cosines
        self.x = torch.nn.functional.normalize(x, dim=1)
        self.weight, self.labels = w, labels
        self.target_logit = torch.randn(B, generator=g, dtype=torch.float64) * 5 + 10
        self.row_scale = 30 + torch.rand(B, generator=g, dtype=torch.float64) * 4
        self.threshold = torch.rand(B, generator=g, dtype=torch.float64) * 0.4 - 0.2
        # non_target_param: the op takes the mode's scalar (here CurricularFace's t) as a 0-dim tensor
        self.params = (
            torch.tensor(float(non_target_param), dtype=torch.float64),
            int(non_target),
            float(filter_threshold),
            int(k),
        )
        grad = torch.randn(B, generator=g, dtype=torch.float64)
        grad[1::7] = 0.0
        self.grad = grad
        self.dtype, self.device = torch.float64, CPU

    def on(self, dtype, device=CPU, weight_dtype=None):
        """x / weight in ``dtype``; per-row tensors in its accumulation dtype (float64 for float64, else float32).
        weight_dtype: the weight in another dtype (mixed precision: float32 weight, 16-bit x)."""
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        other = copy.copy(self)
        other.x, other.weight = self.x.to(device, dtype), self.weight.to(device, weight_dtype or dtype)
        for name in PER_ROW:
            setattr(other, name, getattr(self, name).to(device, acc))
        other.labels = self.labels.to(device)
        other.class_index = None if self.class_index is None else self.class_index.to(device)
        other.dtype, other.device = dtype, torch.device(device)
        return other

    def on_exact(self):
        """The same inputs in float64 on the CPU, after the rounding of ``self.dtype`` (the exact problem)."""
        return self.on(torch.float64, CPU)

    def args(self, **changes):
        """The op's arguments (without ``deterministic``); ``changes`` replaces some by name (see ARG_NAMES)."""
        args = [
            self.x,
            self.weight,
            self.labels,
            self.target_logit,
            self.row_scale,
            self.threshold,
            self.class_index,
            *self.params,
        ]
        for key, value in changes.items():
            args[ARG_NAMES.index(key)] = value
        return tuple(args)


def run_op(ops, case, deterministic=True):
    """Forward and backward of the op on the case's device; the six outputs (NAMES) on the CPU."""
    lse, argmax = ops.fused_lse(*case.args(), deterministic)
    grads = ops.fused_lse_backward(case.grad, lse, *case.args(), deterministic)
    if lse.is_cuda:
        torch.cuda.synchronize()
    return tuple(t.cpu() for t in (lse, argmax, *grads))


def run_reference(case):
    """reference.fused_lse + autograd on the CPU, in the case's dtype."""
    c = case.on(case.dtype, CPU) if case.device.type != "cpu" else case
    x, w, tl, rs = (t.detach().clone().requires_grad_(True) for t in (c.x, c.weight, c.target_logit, c.row_scale))
    lse, argmax = reference.fused_lse(x, w, c.labels, tl, rs, c.threshold, c.class_index, *c.params)
    lse.backward(c.grad)
    return lse.detach(), argmax, x.grad, w.grad, tl.grad, rs.grad


def assert_matches_float64(ours, ref, rtol=None):
    rtol = F64_RTOL if rtol is None else rtol
    for name, a, b in zip(NAMES, ours, ref):
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype}, reference {b.dtype}"
        if name == "argmax":
            assert torch.equal(a, b), f"argmax differs in {int((a != b).sum())} rows"
        else:
            assert_close(name, a, b, rtol=rtol, atol=rtol * float(b.abs().max()) + 1e-300)


def assert_same_bits(first, second, what):
    """Two runs' outputs (NAMES order) are bitwise equal; ``what`` says how the runs differ."""
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs {what}"


def true_cosines(case):
    """float64 class cosines (B, N) of the exact (rounded) inputs, for argmax checks."""
    c = case.on_exact()
    w = c.weight / c.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (c.x @ w.t()).reshape(c.x.shape[0], -1, c.params[3]).amax(2)
    return cos if c.class_index is None else cos[:, c.class_index]


def assert_argmax_near_max(argmax, case, tol):
    """argmax may flip between near-equal cosines: the chosen column must be within tol of a float64 maximum."""
    cos = true_cosines(case)
    picked = cos.gather(1, argmax[:, None].cpu()).squeeze(1)
    assert bool((picked >= cos.amax(1) - tol).all()), "argmax picked a column far from the maximum"


def assert_within_rule(ours, case, slack_rel, weight_rows=None, truth=None, slack_abs=1e-30):
    """docs/DESIGN.md §4 (tolerance rule): error vs ``truth`` ≤ 2 × the error of the reference run in the case's
    dtype + slack (slack_rel × the output's largest magnitude + slack_abs).  truth: float64 outputs, by default the
    reference on the same (rounded) inputs.  weight_rows: restrict the grad_weight comparison to these rows."""
    if truth is None:
        truth = run_reference(case.on_exact())
    same = run_reference(case)
    for name, a, t, r in zip(NAMES, ours, truth, same):
        if name == "argmax":
            continue
        assert a.dtype == r.dtype, f"{name}: dtype {a.dtype}, expected {r.dtype}"
        if name == "grad_weight" and weight_rows is not None:
            a, t, r = a[weight_rows], t[weight_rows], r[weight_rows]
        assert_within_reference_error(name, a, t, r, slack=slack_rel * float(t.abs().max()) + slack_abs)
