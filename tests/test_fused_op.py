"""Op-level tests of the C++ CPU kernels (csrc/cpu) behind torch.ops.marginops.fused_lse / fused_lse_backward.

Everything is compared with ``marginops.reference.fused_lse`` (logits materialized, autograd for the backward):
in float64 to tight tolerances, in float32 by the DESIGN.md §4 rule (error vs the float64 truth ≤ 2 × the error
of the reference run in float32, plus slack). Shapes are ragged (B=37, D=61, N=1001: partial chunks and partial
vectors) or wide (N=20000: many chunks), small enough for 2 cores. The extension is loaded through
``marginops._build.load_cpu()`` (first use compiles it).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_close, assert_within_reference_error

from marginops import reference

FILTER_OFF = 2.0


@pytest.fixture(scope="module")
def ops():
    from marginops import _build

    _build.load_cpu()
    return torch.ops.marginops


class Case:
    """Inputs of the op (normalized x, raw W with a planted signal, labels with -1 rows, per-row tensors)."""

    def __init__(self, B=37, D=61, C=1001, k=1, dtype=torch.float64, class_index=False, zero_rows=(), seed=0,
                 non_target=0, filter_threshold=FILTER_OFF, curricular_t=0.3, none_every=5):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(C * k, D, generator=g, dtype=torch.float64) * (0.5 + torch.rand(C * k, 1, generator=g,
                                                                                           dtype=torch.float64))
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
        x = torch.nn.functional.normalize(x, dim=1)
        self.x, self.weight, self.labels = x.to(dtype), w.to(dtype), labels
        self.target_logit = (torch.randn(B, generator=g, dtype=torch.float64) * 5 + 10).to(dtype)
        self.row_scale = (30 + torch.rand(B, generator=g, dtype=torch.float64) * 4).to(dtype)
        self.threshold = (torch.rand(B, generator=g, dtype=torch.float64) * 0.4 - 0.2).to(dtype)
        self.params = (float(curricular_t), int(non_target), float(filter_threshold), int(k))
        grad = torch.randn(B, generator=g, dtype=torch.float64)
        grad[1::7] = 0.0
        self.grad = grad.to(dtype)

    def args(self):
        return (self.x, self.weight, self.labels, self.target_logit, self.row_scale, self.threshold,
                self.class_index, *self.params)

    def to(self, dtype):
        other = Case.__new__(Case)
        other.__dict__.update(self.__dict__)
        for name in ("x", "weight", "target_logit", "row_scale", "threshold", "grad"):
            setattr(other, name, getattr(self, name).to(dtype))
        return other


def run_op(ops, case, deterministic=True):
    lse, argmax = ops.fused_lse(*case.args(), deterministic)
    grads = ops.fused_lse_backward(case.grad, lse, *case.args(), deterministic)
    return (lse, argmax, *grads)


def run_reference(case):
    x, w, tl, rs = (t.detach().clone().requires_grad_(True) for t in
                    (case.x, case.weight, case.target_logit, case.row_scale))
    lse, argmax = reference.fused_lse(x, w, case.labels, tl, rs, case.threshold, case.class_index, *case.params)
    lse.backward(case.grad)
    return lse.detach(), argmax, x.grad, w.grad, tl.grad, rs.grad


NAMES = ("lse", "argmax", "grad_x", "grad_weight", "grad_target_logit", "grad_row_scale")


def assert_matches_float64(ours, ref, rtol=1e-9):
    for name, a, b in zip(NAMES, ours, ref):
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype}, reference {b.dtype}"
        if name == "argmax":
            assert torch.equal(a, b), f"argmax differs in {(a != b).sum()} rows"
        else:
            assert_close(name, a, b, rtol=rtol, atol=rtol * float(b.abs().max()) + 1e-300)


@pytest.mark.parametrize("class_index", [False, True], ids=["all_classes", "class_index"])
@pytest.mark.parametrize("filter_threshold", [FILTER_OFF, 0.2], ids=["nofilter", "filter"])
@pytest.mark.parametrize("non_target", [0, 1], ids=["plain", "curricular"])
@pytest.mark.parametrize("k", [1, 3], ids=["k1", "k3"])
@pytest.mark.parametrize("shape", [(37, 61, 1001), (9, 16, 20000)], ids=["ragged", "many_chunks"])
def test_float64_matches_reference(ops, shape, k, non_target, filter_threshold, class_index):
    B, D, C = shape
    case = Case(B, D, C, k=k, class_index=class_index, non_target=non_target, filter_threshold=filter_threshold)
    assert_matches_float64(run_op(ops, case), run_reference(case))


@pytest.mark.parametrize(
    "config",
    [dict(), dict(k=3, class_index=True), dict(non_target=1, filter_threshold=0.2), dict(C=20000, B=9, D=16)],
    ids=["plain", "k3_class_index", "curricular_filter", "many_chunks"],
)
def test_float32_within_reference_error(ops, config):
    case64 = Case(**config)
    case32 = case64.to(torch.float32)
    truth = run_reference(case64)
    ref32 = run_reference(case32)
    ours = run_op(ops, case32)
    for name, a, t, r in zip(NAMES, ours, truth, ref32):
        if name == "argmax":
            continue
        assert a.dtype == torch.float32, f"{name}: dtype {a.dtype}"
        assert_within_reference_error(name, a, t, r, slack=1e-6 * float(t.abs().max()))
    # argmax in float32 may flip between near-equal cosines: the chosen column must be a float64 maximum
    w = case64.weight / case64.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (case64.x @ w.t()).reshape(case64.x.shape[0], -1, case64.params[3]).amax(2)
    if case64.class_index is not None:
        cos = cos[:, case64.class_index]
    picked = cos.gather(1, ours[1][:, None]).squeeze(1)
    assert bool((picked >= cos.amax(1) - 1e-5).all()), "float32 argmax picked a column far from the maximum"


@pytest.mark.parametrize("class_index", [False, True], ids=["all_classes", "class_index"])
def test_zero_norm_weight_rows(ops, class_index):
    case = Case(C=300, k=1, class_index=class_index, zero_rows=(0, 7, 123, 299))
    ours, ref = run_op(ops, case), run_reference(case)
    assert all(bool(torch.isfinite(t).all()) for t in ours), "zero-norm rows must give finite results"
    assert_matches_float64(ours, ref)


def test_class_index_leaves_other_rows_exactly_zero(ops):
    case = Case(C=500, k=3, class_index=True)
    grad_weight = run_op(ops, case)[3]
    used = torch.zeros(500, dtype=torch.bool)
    used[case.class_index] = True
    unused_rows = grad_weight.reshape(500, 3, -1)[~used]
    assert unused_rows.numel() > 0 and int(torch.count_nonzero(unused_rows)) == 0
    assert int(torch.count_nonzero(grad_weight.reshape(500, 3, -1)[used])) > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nan_input_propagates_to_lse(ops, dtype):
    case = Case(C=1001, dtype=dtype)
    case.x = case.x.clone()
    case.x[3, 5] = float("nan")
    ours = run_op(ops, case)
    lse = ours[0]
    assert bool(torch.isnan(lse[3])), "a NaN embedding must give a NaN lse"
    others = torch.arange(lse.numel()) != 3
    ref_lse = run_reference(case)[0]
    assert_close("lse (other rows)", lse[others], ref_lse[others], rtol=1e-5, atol=1e-5)

    case.x[3, 5] = 0.0
    case.weight = case.weight.clone()
    case.weight[17, 0] = float("nan")
    lse = ops.fused_lse(*case.args(), True)[0]
    # it reaches every row's lse, except rows whose target is that column (their logit is target_logit)
    expected = torch.isnan(run_reference(case)[0])
    assert int(expected.sum()) >= lse.numel() - 1
    assert torch.equal(torch.isnan(lse), expected)


def test_tiny_problems_use_scalar_tails(ops):
    for B, D, C, k in ((1, 3, 1, 1), (3, 5, 5, 1), (4, 7, 6, 2), (2, 33, 17, 1)):
        case = Case(B, D, C, k=k, none_every=2)
        assert_matches_float64(run_op(ops, case), run_reference(case))


def test_out_of_range_labels_are_only_compared(ops):
    # The Python layer rejects such labels; called directly, the kernel must treat them as "no target".
    case = Case(C=200)
    case.labels = case.labels.clone()
    case.labels[2] = 10**12
    case.labels[4] = -7
    ours = run_op(ops, case)
    case.labels[2] = -1
    case.labels[4] = -1
    assert_matches_float64(ours, run_reference(case))


def test_deterministic_bitwise(ops):
    case = Case(B=64, D=64, C=30000, k=1, dtype=torch.float32, non_target=1, filter_threshold=0.2)
    first = run_op(ops, case)
    second = run_op(ops, case)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"
    # The forward does not depend on the thread count either (per-chunk partials, merged in order).
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        lse1, argmax1 = ops.fused_lse(*case.args(), True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(lse1, first[0]) and torch.equal(argmax1, first[1])


_WIDTH_CHILD = textwrap.dedent(
    """
    import sys, torch
    torch.ops.load_library(sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    import test_fused_op as t
    out = {}
    for name, case in t.width_cases():
        out[name] = t.run_op(torch.ops.marginops, case)
    torch.save(out, sys.argv[3])
    """
)


def width_cases():
    return [
        ("f64", Case(C=1001, k=1, non_target=1, filter_threshold=0.2)),
        ("f64_k3", Case(C=301, k=3, class_index=True)),
        ("f32", Case(C=1001, k=1, non_target=1, filter_threshold=0.2).to(torch.float32)),
    ]


@pytest.mark.parametrize("width", ["128", "256"])
def test_narrower_vector_kernels(ops, width, tmp_path):
    """The kernels are compiled per vector width and the widest is picked at load; check the others too."""
    library = next((p for p in torch.ops.loaded_libraries if "marginops_C" in os.path.basename(p)), None)
    if library is None:
        pytest.skip("the extension was not loaded from a file torch.ops knows")
    out = tmp_path / "out.pt"
    env = dict(os.environ, MARGINOPS_CPU_VECTOR=width)
    subprocess.run([sys.executable, "-c", _WIDTH_CHILD, library, os.path.dirname(__file__), str(out)], env=env,
                   check=True, timeout=300)
    results = torch.load(out)
    for name, case in width_cases():
        ours = results[name]
        if case.x.dtype == torch.float64:
            assert_matches_float64(ours, run_reference(case))
        else:
            default = run_op(ops, case)
            for field, a, b in zip(NAMES, ours, default):
                if field != "argmax":
                    assert_close(f"{field} ({width}-bit vs default)", a, b, rtol=1e-4,
                                 atol=1e-5 * float(b.abs().max()))


def test_bad_inputs_raise_clear_errors(ops):
    case = Case(C=50)
    args = list(case.args())

    def call(**changes):
        a = list(args)
        names = ["x", "weight", "labels", "target_logit", "row_scale", "threshold", "class_index", "curricular_t",
                 "non_target", "filter_threshold", "subcenters"]
        for key, value in changes.items():
            a[names.index(key)] = value
        return ops.fused_lse(*a, True)

    with pytest.raises(RuntimeError, match="float32 or float64"):
        call(x=case.x.half(), weight=case.weight.half())
    with pytest.raises(RuntimeError, match="weight dtype"):
        call(weight=case.weight.float())
    with pytest.raises(RuntimeError, match="labels must have dtype"):
        call(labels=case.labels.int())
    with pytest.raises(RuntimeError, match="target_logit must have shape"):
        call(target_logit=case.target_logit[:-1])
    with pytest.raises(RuntimeError, match="features"):
        call(weight=case.weight[:, :-1])
    with pytest.raises(RuntimeError, match="multiple of subcenters"):
        call(subcenters=3)
    with pytest.raises(RuntimeError, match="non_target"):
        call(non_target=2)
    with pytest.raises(RuntimeError, match="class_index values"):
        call(class_index=torch.tensor([0, 50]))
    with pytest.raises(RuntimeError, match="class_index values"):
        call(class_index=torch.tensor([-1, 3]))
    with pytest.raises(RuntimeError, match="class_index must be a 1-D int64"):
        call(class_index=torch.tensor([0, 1], dtype=torch.int32))
    # Repeated classes are fine for the forward but would race in the backward.
    dup = torch.tensor([3, 4, 3])
    labels = torch.full_like(case.labels, -1)
    lse, _ = call(class_index=dup, labels=labels)
    with pytest.raises(RuntimeError, match="must not repeat"):
        ops.fused_lse_backward(case.grad, lse, case.x, case.weight, labels, case.target_logit, case.row_scale,
                               case.threshold, dup, *case.params, True)
    with pytest.raises(RuntimeError, match="grad_lse must have shape"):
        ops.fused_lse_backward(case.grad[:-1], lse, *case.args(), True)
