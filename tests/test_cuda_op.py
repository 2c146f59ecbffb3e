"""Op-level tests of the CUDA kernels (csrc/cuda) behind torch.ops.marginops.fused_lse / fused_lse_backward.

Everything is compared with ``marginops.reference.fused_lse`` (logits materialized, autograd for the backward,
run on the CPU): float64 to tight tolerances (the fp64 SIMT path), float32 (exact SIMT path) and bf16 / fp16
(tensor cores) by the DESIGN.md §4 rule: error vs the float64 truth <= 2 x the error of the reference run in the
same dtype, plus a small slack.  Shapes cross partial row tiles (B=37, 150), odd feature counts (D=61: the
scalar-load path; D=64: 16-byte cp.async), several D chunks (D=300 in fp64, D=600 otherwise), many class splits
(N=20000) and subcenters k=1/3/64.  One test plants columns beyond row*D = 2^31 in a 4.3 GB bf16 weight.

The whole module needs a GPU (it runs whenever one is present); the extension is loaded through
``marginops._build.load_cuda()`` (first use compiles it).
"""

import os

import pytest
import torch
from helpers import assert_close, assert_within_reference_error

from marginops import reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

FILTER_OFF = 2.0
DEV = torch.device("cuda")
NAMES = ("lse", "argmax", "grad_x", "grad_weight", "grad_target_logit", "grad_row_scale")


@pytest.fixture(scope="module")
def ops():
    from marginops import _build

    _build.load_cuda()
    return torch.ops.marginops


class Case:
    """Inputs of the op on the CPU in float64 (normalized x, raw W with a planted signal, labels with -1 rows,
    per-row tensors); ``on(dtype)`` gives the same case in another dtype on the GPU."""

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
        self.dtype, self.device = torch.float64, torch.device("cpu")

    def on(self, dtype, device=DEV):
        """x / weight in ``dtype``; per-row tensors in its accumulation dtype (float64 for float64, else float32)."""
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        other = Case.__new__(Case)
        other.__dict__.update(self.__dict__)
        other.x, other.weight = self.x.to(device, dtype), self.weight.to(device, dtype)
        for name in ("target_logit", "row_scale", "threshold", "grad"):
            setattr(other, name, getattr(self, name).to(device, acc))
        other.labels = self.labels.to(device)
        other.class_index = None if self.class_index is None else self.class_index.to(device)
        other.dtype, other.device = dtype, device
        return other

    def on_exact(self):
        """The same inputs in float64 on the CPU, after the rounding of ``self.dtype`` (the exact problem)."""
        other = Case.__new__(Case)
        other.__dict__.update(self.__dict__)
        other.x, other.weight = self.x.cpu().double(), self.weight.cpu().double()
        for name in ("target_logit", "row_scale", "threshold", "grad"):
            setattr(other, name, getattr(self, name).cpu().double())
        other.labels = self.labels.cpu()
        other.class_index = None if self.class_index is None else self.class_index.cpu()
        other.dtype, other.device = torch.float64, torch.device("cpu")
        return other

    def args(self):
        return (self.x, self.weight, self.labels, self.target_logit, self.row_scale, self.threshold,
                self.class_index, *self.params)


def run_op(ops, case, deterministic=True):
    lse, argmax = ops.fused_lse(*case.args(), deterministic)
    grads = ops.fused_lse_backward(case.grad, lse, *case.args(), deterministic)
    torch.cuda.synchronize()
    return tuple(t.cpu() for t in (lse, argmax, *grads))


def run_reference(case):
    """reference.fused_lse + autograd on the CPU, in the case's dtype."""
    c = case.on(case.dtype, torch.device("cpu")) if case.device.type != "cpu" else case
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


def true_cosines(case):
    """float64 class cosines (B, N) of the exact (rounded) inputs, for argmax checks."""
    c = case.on_exact()
    w = c.weight / c.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (c.x @ w.t()).reshape(c.x.shape[0], -1, c.params[3]).amax(2)
    return cos if c.class_index is None else cos[:, c.class_index]


def assert_argmax_near_max(argmax, case, tol):
    cos = true_cosines(case)
    picked = cos.gather(1, argmax[:, None].cpu()).squeeze(1)
    assert bool((picked >= cos.amax(1) - tol).all()), "argmax picked a column far from the maximum"


def assert_within_rule(ours, case, slack_rel, weight_rows=None):
    """DESIGN.md §4 rule against the float64 truth of the same (rounded) inputs.  weight_rows: restrict the
    grad_weight comparison to these rows."""
    truth = run_reference(case.on_exact())
    same = run_reference(case)
    for name, a, t, r in zip(NAMES, ours, truth, same):
        if name == "argmax":
            continue
        assert a.dtype == r.dtype, f"{name}: dtype {a.dtype}, expected {r.dtype}"
        if name == "grad_weight" and weight_rows is not None:
            a, t, r = a[weight_rows], t[weight_rows], r[weight_rows]
        assert_within_reference_error(name, a, t, r, slack=slack_rel * float(t.abs().max()) + 1e-30)


# ------------------------------------------------------------------------------------------------------------
# float64 (SIMT fp64 path): tight agreement with the reference
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("class_index", [False, True], ids=["all_classes", "class_index"])
@pytest.mark.parametrize("filter_threshold", [FILTER_OFF, 0.2], ids=["nofilter", "filter"])
@pytest.mark.parametrize("non_target", [0, 1], ids=["plain", "curricular"])
@pytest.mark.parametrize("k", [1, 3], ids=["k1", "k3"])
@pytest.mark.parametrize("shape", [(37, 61, 1001), (9, 16, 20000), (150, 64, 700)],
                         ids=["ragged", "many_splits", "row_tiles_vec"])
def test_float64_matches_reference(ops, shape, k, non_target, filter_threshold, class_index):
    B, D, C = shape
    case = Case(B, D, C, k=k, class_index=class_index, non_target=non_target, filter_threshold=filter_threshold)
    assert_matches_float64(run_op(ops, case.on(torch.float64)), run_reference(case))


@pytest.mark.parametrize("shape,k", [((20, 300, 500), 1), ((20, 300, 97), 5), ((11, 16, 20), 64)],
                         ids=["d_chunks", "k5", "k64"])
def test_float64_d_chunks_and_subcenters(ops, shape, k):
    B, D, C = shape
    case = Case(B, D, C, k=k, non_target=1, filter_threshold=0.3, class_index=(k == 5))
    assert_matches_float64(run_op(ops, case.on(torch.float64)), run_reference(case))


def test_tiny_problems(ops):
    for B, D, C, k in ((1, 3, 1, 1), (3, 5, 5, 1), (4, 7, 6, 2), (2, 33, 17, 1), (65, 8, 3, 1)):
        case = Case(B, D, C, k=k, none_every=2)
        assert_matches_float64(run_op(ops, case.on(torch.float64)), run_reference(case))


# ------------------------------------------------------------------------------------------------------------
# float32: exact SIMT path by default, TF32 tensor cores when opted in
# ------------------------------------------------------------------------------------------------------------
F32_CONFIGS = [
    dict(),
    dict(k=3, class_index=True),
    dict(non_target=1, filter_threshold=0.2),
    dict(C=20000, B=9, D=16),
    dict(B=70, D=600, C=700),
]
F32_IDS = ["plain", "k3_class_index", "curricular_filter", "many_splits", "d_chunks"]


@pytest.mark.parametrize("config", F32_CONFIGS, ids=F32_IDS)
def test_float32_within_reference_error(ops, config):
    case = Case(**config).on(torch.float32)
    ours = run_op(ops, case)
    assert_within_rule(ours, case, slack_rel=1e-6)
    assert_argmax_near_max(ours[1], case, tol=1e-5)


@pytest.mark.parametrize("config", [dict(), dict(k=3, class_index=True, non_target=1, filter_threshold=0.2)],
                         ids=["plain", "k3_curricular_filter"])
def test_tf32_opt_in(ops, monkeypatch, config):
    monkeypatch.setenv("MARGINOPS_CUDA_TF32", "1")  # read by the op at each call
    case = Case(B=70, D=64, C=900, **config).on(torch.float32)
    ours = run_op(ops, case)
    truth = run_reference(case.on_exact())
    # TF32 rounds the operands to 10-bit mantissas: about 1e-3 relative on cosines, times s ~ 30 on logits.
    for name, a, t in zip(NAMES, ours, truth):
        if name == "argmax":
            continue
        scale = float(t.abs().max())
        assert_close(name + " (tf32)", a, t.to(a.dtype), rtol=0.0, atol=5e-2 * scale + 1e-6)
    assert_argmax_near_max(ours[1], case, tol=5e-3)


# ------------------------------------------------------------------------------------------------------------
# bf16 / fp16 (tensor cores): the DESIGN.md §4 rule
# ------------------------------------------------------------------------------------------------------------
LOW_CONFIGS = [
    dict(),
    dict(k=3, class_index=True),
    dict(non_target=1, filter_threshold=0.2),
    dict(C=20000, B=9, D=16),
    dict(B=150, D=64, C=700),
    dict(B=70, D=600, C=700, non_target=1),
]
LOW_IDS = ["ragged", "k3_class_index", "curricular_filter", "many_splits", "row_tiles_vec", "d_chunks"]


@pytest.mark.parametrize("config", LOW_CONFIGS, ids=LOW_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_within_reference_error(ops, dtype, config):
    case = Case(**config).on(dtype)
    ours = run_op(ops, case)
    assert_within_rule(ours, case, slack_rel=1e-5)
    assert_argmax_near_max(ours[1], case, tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fast_backward_single_rounding(ops, monkeypatch, dtype):
    """MARGINOPS_CUDA_FAST_BWD=1 rounds dcos once to 16 bits: close to the default, not bitwise."""
    case = Case(B=70, D=64, C=900, non_target=1, filter_threshold=0.2).on(dtype)
    default = run_op(ops, case)
    monkeypatch.setenv("MARGINOPS_CUDA_FAST_BWD", "1")
    fast = run_op(ops, case)
    assert torch.equal(fast[0], default[0]) and torch.equal(fast[1], default[1]), "forward must not change"
    for name, a, b in zip(NAMES[2:], fast[2:], default[2:]):
        assert_close(name + " (fast bwd)", a, b, rtol=0.0, atol=2e-2 * float(b.abs().max()) + 1e-6)


# ------------------------------------------------------------------------------------------------------------
# edge cases
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["f64", "f32", "bf16", "fp16"])
@pytest.mark.parametrize("class_index", [False, True], ids=["all_classes", "class_index"])
def test_zero_norm_weight_rows(ops, dtype, class_index):
    zero = torch.tensor([0, 7, 123, 299])
    case = Case(C=300, k=1, class_index=class_index, zero_rows=tuple(zero.tolist())).on(dtype)
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
def test_class_index_leaves_other_rows_exactly_zero(ops, dtype):
    case = Case(C=500, k=3, class_index=True).on(dtype)
    grad_weight = run_op(ops, case)[3]
    used = torch.zeros(500, dtype=torch.bool)
    used[case.class_index.cpu()] = True
    rows = grad_weight.reshape(500, 3, -1)
    assert rows[~used].numel() > 0 and int(torch.count_nonzero(rows[~used])) == 0
    assert int(torch.count_nonzero(rows[used])) > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_nan_input_propagates_to_lse(ops, dtype):
    case = Case(C=1001).on(dtype)
    case.x = case.x.clone()
    case.x[3, 5] = float("nan")
    lse = run_op(ops, case)[0]
    assert bool(torch.isnan(lse[3])), "a NaN embedding must give a NaN lse"
    others = torch.arange(lse.numel()) != 3
    ref_lse = run_reference(case)[0]
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert_close("lse (other rows)", lse[others], ref_lse[others], rtol=tol, atol=tol)

    case.x[3, 5] = 0.0
    case.weight = case.weight.clone()
    case.weight[17, 0] = float("nan")
    lse = ops.fused_lse(*case.args(), True)[0].cpu()
    # it reaches every row's lse, except rows whose target is that column (their logit is target_logit)
    expected = torch.isnan(run_reference(case)[0])
    assert int(expected.sum()) >= lse.numel() - 1
    assert torch.equal(torch.isnan(lse), expected)


def test_out_of_range_labels_are_only_compared(ops):
    # The Python layer rejects such labels; called directly, the kernel must treat them as "no target".
    case = Case(C=200)
    case.labels = case.labels.clone()
    case.labels[2] = 10**12
    case.labels[4] = -7
    ours = run_op(ops, case.on(torch.float64))
    case.labels[2] = -1
    case.labels[4] = -1
    assert_matches_float64(ours, run_reference(case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
def test_deterministic_bitwise(ops, dtype):
    case = Case(B=150, D=64, C=30000, k=1, non_target=1, filter_threshold=0.2).on(dtype)
    first = run_op(ops, case)
    second = run_op(ops, case)
    third = run_op(ops, case, deterministic=False)  # same code path: no float atomics anywhere
    for name, a, b, c in zip(NAMES, first, second, third):
        assert torch.equal(a, b), f"{name} differs between two identical runs"
        assert torch.equal(a, c), f"{name} differs with deterministic=False"


def test_empty_batch(ops):
    case = Case(B=0, C=50, none_every=0).on(torch.float32)
    lse, argmax, gx, gw, gtl, grs = run_op(ops, case)
    assert lse.shape == (0,) and argmax.shape == (0,) and gx.shape == case.x.shape
    assert gw.shape == case.weight.shape and int(torch.count_nonzero(gw)) == 0
    assert gtl.shape == (0,) and grs.shape == (0,)


def test_runs_on_current_stream_and_device(ops):
    case = Case(B=37, D=64, C=500).on(torch.float32)
    expected = run_op(ops, case)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = run_op(ops, case)
    for name, a, b in zip(NAMES, got, expected):
        assert torch.equal(a, b), f"{name} differs on a side stream"


def test_bad_inputs_raise_clear_errors(ops):
    case = Case(C=50).on(torch.float32)
    args = list(case.args())
    names = ["x", "weight", "labels", "target_logit", "row_scale", "threshold", "class_index", "curricular_t",
             "non_target", "filter_threshold", "subcenters"]

    def call(**changes):
        a = list(args)
        for key, value in changes.items():
            a[names.index(key)] = value
        return ops.fused_lse(*a, True)

    with pytest.raises(RuntimeError, match="float32 or float64"):
        call(x=case.x.int(), weight=case.weight.int())
    with pytest.raises(RuntimeError, match="weight dtype"):
        call(weight=case.weight.double())
    with pytest.raises(RuntimeError, match="labels must have dtype"):
        call(labels=case.labels.int())
    with pytest.raises(RuntimeError, match="target_logit must have shape"):
        call(target_logit=case.target_logit[:-1])
    with pytest.raises(RuntimeError, match="row_scale must have dtype"):
        call(row_scale=case.row_scale.double())
    with pytest.raises(RuntimeError, match="features"):
        call(weight=case.weight[:, :-1].contiguous())
    with pytest.raises(RuntimeError, match="contiguous"):
        call(weight=case.weight.t().contiguous().t())
    with pytest.raises(RuntimeError, match="multiple of subcenters"):
        call(subcenters=3)
    with pytest.raises(RuntimeError, match="subcenters must be in"):
        call(subcenters=65 * 50, weight=case.weight.repeat(65, 1))
    with pytest.raises(RuntimeError, match="non_target"):
        call(non_target=2)
    with pytest.raises(RuntimeError, match="threshold must be on"):
        call(threshold=case.threshold.cpu())
    with pytest.raises(RuntimeError, match="class_index values"):
        call(class_index=torch.tensor([0, 50], device=DEV))
    with pytest.raises(RuntimeError, match="class_index values"):
        call(class_index=torch.tensor([-1, 3], device=DEV))
    with pytest.raises(RuntimeError, match="class_index must be a 1-D int64"):
        call(class_index=torch.tensor([0, 1], dtype=torch.int32, device=DEV))
    # Repeated classes are fine for the forward but would race in the backward.
    dup = torch.tensor([3, 4, 3], device=DEV)
    labels = torch.full_like(case.labels, -1)
    lse, _ = call(class_index=dup, labels=labels)
    with pytest.raises(RuntimeError, match="must not repeat"):
        ops.fused_lse_backward(case.grad, lse, case.x, case.weight, labels, case.target_logit, case.row_scale,
                               case.threshold, dup, *case.params, True)
    with pytest.raises(RuntimeError, match="grad_lse must have shape"):
        ops.fused_lse_backward(case.grad[:-1], lse, *case.args(), True)
    torch.cuda.synchronize()  # nothing above may have left a sticky CUDA error


# ------------------------------------------------------------------------------------------------------------
# 64-bit offsets: weight rows beyond row * D = 2^31 elements
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_offsets_beyond_2_31(ops):
    R, D, B = 4_200_000, 512, 8  # R * D = 2.15e9 > 2^31; 4.3 GB of bf16 (+ 4.3 GB for grad_weight)
    free, _ = torch.cuda.mem_get_info()
    if free < 14 * 2**30:
        pytest.skip("needs about 14 GB of free GPU memory")
    planted = torch.tensor([4_194_305, 4_199_999, 4_100_000, 1_000, 2_500_000, 4_194_304, 3, 4_199_998], device=DEV)
    assert int(planted[0]) * D > 2**31 and int(planted[1]) * D > 2**31
    g = torch.Generator(device=DEV).manual_seed(0)
    weight = torch.randn(R, D, generator=g, device=DEV, dtype=torch.bfloat16)
    x = torch.nn.functional.normalize(weight[planted].float(), dim=1)
    x[1] = torch.nn.functional.normalize(x[1] + 0.3 * torch.randn(D, generator=g, device=DEV), dim=0)
    x = x.to(torch.bfloat16)
    labels = torch.full((B,), -1, dtype=torch.long, device=DEV)
    labels[2] = int(planted[2])  # one row has its planted column as target
    tl = torch.full((B,), 12.0, device=DEV)
    rs = torch.full((B,), 16.0, device=DEV)
    thr = torch.zeros(B, device=DEV)
    grad = torch.linspace(0.5, 1.5, B, device=DEV)
    params = (0.0, 0, FILTER_OFF, 1)

    lse, argmax = ops.fused_lse(x, weight, labels, tl, rs, thr, None, *params, True)
    gx, gw, gtl, grs = ops.fused_lse_backward(grad, lse, x, weight, labels, tl, rs, thr, None, *params, True)
    torch.cuda.synchronize()
    assert torch.equal(argmax, planted), f"argmax {argmax.tolist()} != planted {planted.tolist()}"

    # Reference in float32, chunked over the rows of W (no B x R matrix kept): lse, then the gradients.
    xf = x.float()
    chunk = 1 << 19
    m = torch.full((B,), float("-inf"), device=DEV)
    s = torch.zeros(B, device=DEV)
    for r0 in range(0, R, chunk):
        w = weight[r0:r0 + chunk].float()
        inv = 1.0 / w.norm(dim=1).clamp_min(1e-12)
        z = rs[:, None] * ((xf @ w.t()) * inv)
        cols = torch.arange(r0, r0 + w.shape[0], device=DEV)
        z = torch.where(cols[None, :] == labels[:, None], tl[:, None], z)
        m_new = torch.maximum(m, z.amax(1))
        s = s * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(1)
        m = m_new
    ref_lse = m + torch.log(s)
    assert_close("lse (2^31 offsets)", lse, ref_lse, rtol=1e-5, atol=1e-4)

    ref_gx = torch.zeros(B, D, device=DEV)
    check_rows = torch.cat([planted, torch.tensor([4_194_400, 4_150_000, 17], device=DEV)])
    ref_rows = {}
    for r0 in range(0, R, chunk):
        w = weight[r0:r0 + chunk].float()
        inv = 1.0 / w.norm(dim=1).clamp_min(1e-12)
        cos = (xf @ w.t()) * inv
        cols = torch.arange(r0, r0 + w.shape[0], device=DEV)
        target = cols[None, :] == labels[:, None]
        p = torch.exp(rs[:, None] * cos - ref_lse[:, None])
        dcos = torch.where(target, torch.zeros_like(p), grad[:, None] * p * rs[:, None])
        ref_gx += (dcos * inv) @ w
        for r in check_rows.tolist():
            if r0 <= r < r0 + w.shape[0]:
                j = r - r0
                dc = dcos[:, j]
                ref_rows[r] = (dc @ xf) * inv[j] - (dc * cos[:, j]).sum() * w[j] * inv[j] ** 2
    assert_close("grad_x (2^31 offsets)", gx.float(), ref_gx, rtol=2e-2, atol=2e-2 * float(ref_gx.abs().max()))
    for r, ref in ref_rows.items():
        assert_close(f"grad_weight[{r}] (2^31 offsets)", gw[r].float(), ref, rtol=2e-2,
                     atol=2e-2 * float(ref.abs().max()) + 1e-30)
    ref_gtl = grad * torch.exp(tl - ref_lse) * (labels >= 0)
    assert_close("grad_target_logit (2^31 offsets)", gtl, ref_gtl, rtol=1e-4, atol=1e-6)
    assert bool(torch.isfinite(grs).all())
    del weight, gw
    torch.cuda.empty_cache()


@pytest.mark.skipif(not os.environ.get("MARGINOPS_TEST_COMPUTE_SANITIZER"), reason="bench/gpu_check.sh runs this")
def test_small_case_for_compute_sanitizer(ops):
    """A small fwd+bwd per dtype for ``compute-sanitizer --tool memcheck pytest -k compute_sanitizer``."""
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for config in (dict(B=37, D=61, C=301, k=3, class_index=True), dict(B=70, D=64, C=200)):
            run_op(ops, Case(**config).on(dtype))
