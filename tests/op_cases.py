"""Shared pieces of the op-level tests of torch.ops.marginops.fused_lse / fused_lse_backward.

test_fused_op.py (C++ CPU kernels) and test_cuda_op.py (CUDA kernels) build their inputs with ``Case``, run the
op with ``run_op`` and compare with ``marginops.reference.fused_lse`` run on the CPU (``run_reference``): in
float64 to tight tolerances (``assert_matches_float64``), in lower precision by the docs/DESIGN.md §4 rule
(``assert_within_rule``: error vs the float64 truth ≤ 2 × the error of the reference run in the same dtype,
plus slack).  The ``check_*`` functions are test bodies both kernel files run, on their own device.
test_triton_op.py shares the output names and the bitwise check.
"""

import copy

import pytest
import torch
from helpers import assert_close, assert_within_reference_error

from marginops import reference

FILTER_OFF = 2.0  # a filter threshold above every cosine: the filter is off
CPU = torch.device("cpu")

# The op's outputs (forward, then backward), in the order run_op and run_reference return them.
NAMES = ("lse", "argmax", "grad_x", "grad_weight", "grad_target_logit", "grad_row_scale")
# The op's arguments, in the order Case.args() gives them (the ``deterministic`` flag follows).
ARG_NAMES = ("x", "weight", "labels", "target_logit", "row_scale", "threshold", "class_index", "curricular_t",
             "non_target", "filter_threshold", "subcenters")
PER_ROW = ("target_logit", "row_scale", "threshold", "grad")


class Case:
    """Inputs of the op on the CPU in float64 (normalized x, raw W with a planted signal, labels with -1 rows,
    per-row tensors); ``on(dtype, device)`` gives the same case in another dtype and/or on another device."""

    def __init__(self, B=37, D=61, C=1001, k=1, class_index=False, zero_rows=(), seed=0, non_target=0,
                 filter_threshold=FILTER_OFF, curricular_t=0.3, none_every=5):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(C * k, D, generator=g, dtype=torch.float64) * (
            0.5 + torch.rand(C * k, 1, generator=g, dtype=torch.float64))
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
        self.params = (float(curricular_t), int(non_target), float(filter_threshold), int(k))
        grad = torch.randn(B, generator=g, dtype=torch.float64)
        grad[1::7] = 0.0
        self.grad = grad
        self.dtype, self.device = torch.float64, CPU

    def on(self, dtype, device=CPU):
        """x / weight in ``dtype``; per-row tensors in its accumulation dtype (float64 for float64, else float32)."""
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        other = copy.copy(self)
        other.x, other.weight = self.x.to(device, dtype), self.weight.to(device, dtype)
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
        args = [self.x, self.weight, self.labels, self.target_logit, self.row_scale, self.threshold,
                self.class_index, *self.params]
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


def assert_matches_float64(ours, ref, rtol=1e-9):
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
    """docs/DESIGN.md §4 rule: error vs ``truth`` ≤ 2 × the error of the reference run in the case's dtype + slack
    (slack_rel × the output's largest magnitude + slack_abs).  truth: float64 outputs, by default the reference
    on the same (rounded) inputs.  weight_rows: restrict the grad_weight comparison to these rows."""
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


# ------------------------------------------------------------------------------------------------------------
# test bodies shared by the CPU and CUDA kernel tests
# ------------------------------------------------------------------------------------------------------------
def float64_grid(shapes, ids):
    """Parametrize a test over shape (B, D, C) × k × non_target × filter_threshold × class_index."""
    marks = [  # innermost (the first part of a test id) first, as decorators stacked bottom-up
        pytest.mark.parametrize("shape", shapes, ids=ids),
        pytest.mark.parametrize("k", [1, 3], ids=["k1", "k3"]),
        pytest.mark.parametrize("non_target", [0, 1], ids=["plain", "curricular"]),
        pytest.mark.parametrize("filter_threshold", [FILTER_OFF, 0.2], ids=["nofilter", "filter"]),
        pytest.mark.parametrize("class_index", [False, True], ids=["all_classes", "class_index"]),
    ]

    def apply(test):
        for mark in marks:
            test = mark(test)
        return test

    return apply


# Case keyword arguments of the float32 / low-precision tests: the default ragged shape, subcenters with a
# class_index, curricular + filter, many class chunks (CPU) / splits (CUDA).
# Slack (relative to the output's largest magnitude) of the float32 kernels under the docs/DESIGN.md §4 rule.
# The row gradient g·exp(target_logit − lse) takes lse from the kernel's forward: one float32 ulp of an lse near
# 30 (2e-6) becomes that relative error in the gradient, which the reference (softmax of materialized logits)
# does not have.
F32_SLACK = 4e-6

PRECISION_CONFIGS = [
    dict(),
    dict(k=3, class_index=True),
    dict(non_target=1, filter_threshold=0.2),
    dict(C=20000, B=9, D=16),
]


def check_float64_matches_reference(ops, case, device):
    """The float64 op on ``device`` against the reference, to tight tolerances."""
    assert_matches_float64(run_op(ops, case.on(torch.float64, device)), run_reference(case))


TINY_SHAPES = ((1, 3, 1, 1), (3, 5, 5, 1), (4, 7, 6, 2), (2, 33, 17, 1))  # (B, D, C, k)


def check_tiny_problems(ops, device, shapes=TINY_SHAPES):
    for B, D, C, k in shapes:
        check_float64_matches_reference(ops, Case(B, D, C, k=k, none_every=2), device)


def check_class_index_leaves_other_rows_zero(ops, case):
    """case with a class_index: the weight rows of the classes outside it get exactly zero gradient."""
    grad_weight = run_op(ops, case)[3]
    rows = grad_weight.reshape(-1, case.params[3], grad_weight.shape[1])  # (classes, subcenters, D)
    used = torch.zeros(rows.shape[0], dtype=torch.bool)
    used[case.class_index.cpu()] = True
    assert rows[~used].numel() > 0 and int(torch.count_nonzero(rows[~used])) == 0
    assert int(torch.count_nonzero(rows[used])) > 0


def check_nan_input_propagates_to_lse(ops, case, tol):
    """A NaN in x reaches that row's lse only (other rows within tol of the reference); a NaN in W every row's."""
    case.x = case.x.clone()
    case.x[3, 5] = float("nan")
    lse = run_op(ops, case)[0]
    assert bool(torch.isnan(lse[3])), "a NaN embedding must give a NaN lse"
    others = torch.arange(lse.numel()) != 3
    ref_lse = run_reference(case)[0]
    assert_close("lse (other rows)", lse[others], ref_lse[others], rtol=tol, atol=tol)

    case.x[3, 5] = 0.0
    case.weight = case.weight.clone()
    case.weight[17, 0] = float("nan")
    lse = ops.fused_lse(*case.args(), True)[0].cpu()
    # it reaches every row's lse, except rows whose target is that column (their logit is target_logit)
    expected = torch.isnan(run_reference(case)[0])
    assert int(expected.sum()) >= lse.numel() - 1
    assert torch.equal(torch.isnan(lse), expected)


def check_out_of_range_labels_are_only_compared(ops, device):
    # The Python layer rejects such labels; called directly, the kernel must treat them as "no target".
    case = Case(C=200)
    case.labels = case.labels.clone()
    case.labels[2] = 10**12
    case.labels[4] = -7
    ours = run_op(ops, case.on(torch.float64, device))
    case.labels[2] = -1
    case.labels[4] = -1
    assert_matches_float64(ours, run_reference(case))


def call_op(ops, case, **changes):
    """The forward (deterministic) with some of the case's arguments replaced by name (see ARG_NAMES)."""
    return ops.fused_lse(*case.args(**changes), True)


def check_common_bad_inputs(ops, case, device, unsupported_dtype, other_float_dtype):
    """The argument checks both kernels share; case: C=50 classes, k=1, on ``device``.  unsupported_dtype: one
    the kernels reject for x / weight; other_float_dtype: a supported one that differs from the case's."""

    def call(**changes):
        return call_op(ops, case, **changes)

    with pytest.raises(RuntimeError, match="float32 or float64"):
        call(x=case.x.to(unsupported_dtype), weight=case.weight.to(unsupported_dtype))
    with pytest.raises(RuntimeError, match="weight dtype"):
        call(weight=case.weight.to(other_float_dtype))
    with pytest.raises(RuntimeError, match="labels must have dtype"):
        call(labels=case.labels.int())
    with pytest.raises(RuntimeError, match="target_logit must have shape"):
        call(target_logit=case.target_logit[:-1])
    with pytest.raises(RuntimeError, match="multiple of subcenters"):
        call(subcenters=3)
    with pytest.raises(RuntimeError, match="non_target"):
        call(non_target=2)
    with pytest.raises(RuntimeError, match="class_index values"):
        call(class_index=torch.tensor([0, 50], device=device))
    with pytest.raises(RuntimeError, match="class_index values"):
        call(class_index=torch.tensor([-1, 3], device=device))
    with pytest.raises(RuntimeError, match="class_index must be a 1-D int64"):
        call(class_index=torch.tensor([0, 1], dtype=torch.int32, device=device))
    # Repeated classes are fine for the forward but would race in the backward.
    dup = torch.tensor([3, 4, 3], device=device)
    labels = torch.full_like(case.labels, -1)
    lse, _ = call(class_index=dup, labels=labels)
    with pytest.raises(RuntimeError, match="must not repeat"):
        ops.fused_lse_backward(case.grad, lse, *case.args(class_index=dup, labels=labels), True)
    with pytest.raises(RuntimeError, match="grad_lse must have shape"):
        ops.fused_lse_backward(case.grad[:-1], lse, *case.args(), True)


# ------------------------------------------------------------------------------------------------------------
# test bodies of the CUDA kernels, shared by test_cuda_op.py (on a GPU) and test_cuda_emulated.py (CPU emulator)
# ------------------------------------------------------------------------------------------------------------
def check_within_rule(ops, case, slack_rel, argmax_tol):
    """The docs/DESIGN.md §4 rule for every output, argmax within argmax_tol of a float64 maximum."""
    ours = run_op(ops, case)
    assert_within_rule(ours, case, slack_rel=slack_rel)
    assert_argmax_near_max(ours[1], case, tol=argmax_tol)


def check_tf32_opt_in(ops, monkeypatch, case):
    """float32 case with MARGINOPS_CUDA_TF32=1 (read by the op at each call)."""
    monkeypatch.setenv("MARGINOPS_CUDA_TF32", "1")
    ours = run_op(ops, case)
    truth = run_reference(case.on_exact())
    # TF32 rounds the operands to 10-bit mantissas: about 1e-3 relative on cosines, times s ~ 30 on logits.
    for name, a, t in zip(NAMES, ours, truth):
        if name == "argmax":
            continue
        scale = float(t.abs().max())
        assert_close(name + " (tf32)", a, t.to(a.dtype), rtol=0.0, atol=5e-2 * scale + 1e-6)
    assert_argmax_near_max(ours[1], case, tol=5e-3)


def check_fast_backward_single_rounding(ops, monkeypatch, case):
    """MARGINOPS_CUDA_FAST_BWD=1 rounds dcos once to 16 bits: close to the default, not bitwise."""
    default = run_op(ops, case)
    monkeypatch.setenv("MARGINOPS_CUDA_FAST_BWD", "1")
    fast = run_op(ops, case)
    assert torch.equal(fast[0], default[0]) and torch.equal(fast[1], default[1]), "forward must not change"
    for name, a, b in zip(NAMES[2:], fast[2:], default[2:]):
        assert_close(name + " (fast bwd)", a, b, rtol=0.0, atol=2e-2 * float(b.abs().max()) + 1e-6)
    assert_within_rule(fast, case, slack_rel=3e-2)  # still near the truth, at a looser slack


def check_zero_norm_weight_rows(ops, dtype, class_index, device):
    zero = torch.tensor([0, 7, 123, 299])
    case = Case(C=300, k=1, class_index=class_index, zero_rows=tuple(zero.tolist())).on(dtype, device)
    ours = run_op(ops, case)
    other = torch.ones(300, dtype=torch.bool)
    other[zero] = False
    for name, t in zip(NAMES, ours):
        t = t[other] if name == "grad_weight" else t
        assert bool(torch.isfinite(t).all()), f"{name}: zero-norm rows must leave the other results finite"
    # Other rows: as usual (their scale is not swamped by the zero rows' huge gradients).
    if dtype == torch.float64:
        ref = run_reference(case)
        assert_matches_float64(ours[:3] + ours[4:], ref[:3] + ref[4:])
        assert_close("grad_weight (other rows)", ours[3][other], ref[3][other], rtol=1e-9,
                     atol=1e-9 * float(ref[3][other].abs().max()))
    else:
        assert_within_rule(ours, case, slack_rel=1e-5, weight_rows=other)
    # A zero row has cos = 0 and no projection term: its gradient is (sum_i dcos_i x_i) / eps, about 1e10
    # here; fp16 cannot hold it (inf, as the reference run in fp16), the other dtypes agree with float64.
    truth = run_reference(case.on_exact())[3][zero]
    if dtype == torch.float16:
        assert torch.equal(torch.isinf(ours[3][zero]), torch.isinf(run_reference(case)[3][zero]))
    else:
        tol = 1e-9 if dtype == torch.float64 else 1e-2
        assert_close("grad_weight (zero rows)", ours[3][zero], truth.to(ours[3].dtype), rtol=tol,
                     atol=tol * float(truth.abs().max()))


def check_deterministic_bitwise(ops, case):
    first = run_op(ops, case)
    second = run_op(ops, case)
    third = run_op(ops, case, deterministic=False)  # same code path: no float atomics anywhere
    assert_same_bits(first, second, "between two identical runs")
    assert_same_bits(first, third, "with deterministic=False")


def check_empty_batch(ops, device):
    case = Case(B=0, C=50, none_every=0).on(torch.float32, device)
    lse, argmax, gx, gw, gtl, grs = run_op(ops, case)
    assert lse.shape == (0,) and argmax.shape == (0,) and gx.shape == case.x.shape
    assert gw.shape == case.weight.shape and int(torch.count_nonzero(gw)) == 0
    assert gtl.shape == (0,) and grs.shape == (0,)


def check_cuda_bad_inputs(ops, device, other_device=None):
    """The CUDA op's argument checks (float32 case, C=50); other_device: a device the inputs must not be on."""
    case = Case(C=50).on(torch.float32, device)
    check_common_bad_inputs(ops, case, device, unsupported_dtype=torch.int32, other_float_dtype=torch.float64)

    def call(**changes):
        return call_op(ops, case, **changes)

    with pytest.raises(RuntimeError, match="row_scale must have dtype"):
        call(row_scale=case.row_scale.double())
    with pytest.raises(RuntimeError, match="features"):
        call(weight=case.weight[:, :-1].contiguous())
    with pytest.raises(RuntimeError, match="contiguous"):
        call(weight=case.weight.t().contiguous().t())
    with pytest.raises(RuntimeError, match="subcenters must be in"):
        call(subcenters=65 * 50, weight=case.weight.repeat(65, 1))
    if other_device is not None:
        with pytest.raises(RuntimeError, match="threshold must be on"):
            call(threshold=case.threshold.to(other_device))
