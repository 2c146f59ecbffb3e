"""The op-level suite: torch.ops.marginops.fused_lse / fused_lse_backward on every backend adapter.

Each test runs on every backend of tests/op_backends.py ("cpu": the C++ kernels; "triton": the launchers, under
TRITON_INTERPRET=1 on CPU tensors without a GPU; "cuda": the CUDA kernels on a GPU; "cuda_emu": the same CUDA
sources on the CPU emulator of tests/cuda_emu) and compares with ``marginops.reference.fused_lse`` run on the CPU:
float64 to tight tolerances, float32 / bf16 / fp16 by docs/DESIGN.md §4 (tolerance rule).  A combination a
backend does not support is skipped with the reason its adapter gives.  Sizes come from the adapter (each keeps
the feature it is named for: partial tiles, many class splits, several feature chunks, subcenters up to 64).
The tolerances are the named constants of tests/op_cases.py.  Checks that only make sense for one backend (vector
widths, thread counts, streams, sanitizers, a 4.3 GB GPU weight) are in tests/test_op_backend_specific.py.
"""

import pytest
import torch
from helpers import assert_close, assert_within_reference_error, report_mismatch
from op_backends import BF16, DEFAULT_SIZES, F16, F32, F64, LOW, OpBackend, params
from op_cases import (
    ARGMAX_TOL,
    F32_ATOL,
    F32_RTOL,
    F64_RTOL,
    FAST_BWD_ATOL,
    FAST_BWD_SLACK,
    FILTER_OFF,
    NAMES,
    NAN_OTHER_ROWS_TOL,
    SINGLE_FEATURE_WEIGHT_REL,
    TF32_ARGMAX_TOL,
    TF32_ATOL,
    ZERO_ROW_RTOL,
    Case,
    assert_argmax_near_max,
    assert_matches_float64,
    assert_same_bits,
    assert_within_rule,
    run_op,
    run_reference,
    true_cosines,
)

from marginops.margins import NON_TARGET_CURRICULAR, NON_TARGET_MODES, NON_TARGET_PLAIN

MODE_NAMES = {NON_TARGET_PLAIN: "plain", NON_TARGET_CURRICULAR: "curricular"}
DTYPE_IDS = {F64: "f64", F32: "f32", BF16: "bf16", F16: "fp16"}
_loaded = {}


@pytest.fixture
def use(monkeypatch):
    """use(backend) -> the op, loaded once per backend; skips if the backend cannot run here."""

    def get(backend: OpBackend):
        backend.skip_unless()
        if backend.name not in _loaded:
            _loaded[backend.name] = backend.load()
        return _loaded[backend.name]

    return get


def make(backend, monkeypatch, dtype=F64, **spec):
    """(case on the backend's device in ``dtype``, deterministic flag) from an adapter size: its "env" is set for
    the rest of the test, its "deterministic" (default True) returned; the rest are Case arguments."""
    backend.skip_unless(dtype)
    spec = dict(spec)
    for key, value in spec.pop("env", {}).items():
        monkeypatch.setenv(key, value)
    deterministic = spec.pop("deterministic", True)
    return Case(**spec).on(dtype, backend.device), deterministic


def slack(backend, dtype):
    return backend.f32_slack if dtype == F32 else backend.low_slack


def check_rule(ops, backend, case, deterministic=True):
    """The docs/DESIGN.md §4 rule on every output and argmax near a float64 maximum; float32 also elementwise."""
    ours = run_op(ops, case, deterministic)
    truth = run_reference(case.on_exact())
    assert_within_rule(ours, case, slack_rel=slack(backend, case.dtype), truth=truth)
    assert_argmax_near_max(ours[1], case, tol=ARGMAX_TOL[case.dtype])
    if case.dtype == F32:
        for name, a, t in zip(NAMES, ours, truth):
            if name != "argmax":
                assert_close(
                    name + " (float32 elementwise)",
                    a,
                    t.to(a.dtype),
                    rtol=F32_RTOL,
                    atol=F32_ATOL * float(t.abs().max()) + 1e-30,
                )
    return ours


def check_float64(ops, backend, case, deterministic=True):
    ours = run_op(ops, case, deterministic)
    assert_matches_float64(ours, run_reference(case.on(F64)))
    return ours


# ------------------------------------------------------------------------------------------------------------
# every non-target mode the op defines (marginops.margins.NON_TARGET_MODES), on every backend, every dtype
# ------------------------------------------------------------------------------------------------------------
def test_reference_tells_every_mode_apart():
    """Each mode changes the reference's result (so that the per-backend test below compares something)."""
    lse = {m: run_reference(Case(**dict(DEFAULT_SIZES["every_mode"], non_target=m)))[0] for m in NON_TARGET_MODES}
    for mode in NON_TARGET_MODES:
        for other in NON_TARGET_MODES:
            if other != mode:
                assert not torch.allclose(lse[mode], lse[other]), f"modes {mode} and {other} agree"


@pytest.mark.parametrize("backend", params())
def test_every_non_target_mode(use, monkeypatch, backend):
    """Every mode, in every dtype the backend takes: float64 tightly, the others by the docs/DESIGN.md §4 rule.  A
    mode added to NON_TARGET_MODES (and the reference) that one backend lacks fails here."""
    ops = use(backend)
    for mode in NON_TARGET_MODES:
        for dtype in backend.dtypes:
            case, det = make(backend, monkeypatch, dtype, **dict(backend.size("every_mode"), non_target=mode))
            try:
                (check_float64 if dtype == F64 else check_rule)(ops, backend, case, det)
            except (AssertionError, RuntimeError) as e:
                raise AssertionError(f"non_target mode {mode} ({MODE_NAMES.get(mode, '?')}), {dtype}: {e}") from e


# ------------------------------------------------------------------------------------------------------------
# float64: tight agreement with the reference
# ------------------------------------------------------------------------------------------------------------
def _grid(b):
    return [(sid, (shape,)) for sid, shape in b.grid_shapes.items()]


@pytest.mark.parametrize("class_index", [False, True], ids=["all_classes", "class_index"])
@pytest.mark.parametrize("filter_threshold", [FILTER_OFF, 0.2], ids=["nofilter", "filter"])
@pytest.mark.parametrize("non_target", NON_TARGET_MODES, ids=[MODE_NAMES.get(m, str(m)) for m in NON_TARGET_MODES])
@pytest.mark.parametrize("k", [1, 3], ids=["k1", "k3"])
@pytest.mark.parametrize("backend,shape", params(_grid))
def test_float64_matches_reference(use, monkeypatch, backend, shape, k, non_target, filter_threshold, class_index):
    ops = use(backend)
    case, det = make(
        backend,
        monkeypatch,
        F64,
        **dict(shape, k=k, class_index=class_index, non_target=non_target, filter_threshold=filter_threshold),
    )
    check_float64(ops, backend, case, det)


def _float64_shapes(b):
    return [(sid, (spec,)) for sid, spec in b.float64_shapes.items()]


@pytest.mark.parametrize("backend,spec", params(_float64_shapes))
def test_float64_shapes(use, monkeypatch, backend, spec):
    """Feature chunks, subcenters 5 / 64, row tiles, many tiles per split: CurricularFace + filter 0.3."""
    ops = use(backend)
    spec = dict(dict(non_target=1, filter_threshold=0.3), **spec)
    spec.setdefault("class_index", spec.get("k") == 5)
    case, det = make(backend, monkeypatch, F64, **spec)
    check_float64(ops, backend, case, det)


TINY_SHAPES = ((1, 3, 1, 1), (3, 5, 5, 1), (4, 7, 6, 2), (2, 33, 17, 1))  # (B, D, C, k)


@pytest.mark.parametrize("backend", params())
def test_tiny_problems(use, monkeypatch, backend):
    """Shapes below one vector / tile: the scalar tails."""
    ops = use(backend)
    for B, D, C, k in TINY_SHAPES + backend.extra_tiny_shapes:
        case, _ = make(backend, monkeypatch, F64, B=B, D=D, C=C, k=k, none_every=2)
        check_float64(ops, backend, case)


@pytest.mark.parametrize("backend", params())
def test_atomic_path_matches_reference(use, monkeypatch, backend):
    """deterministic=False (float atomics where the backend has them) in float64, with class_index and filter."""
    ops = use(backend)
    case, _ = make(backend, monkeypatch, F64, **backend.size("atomic"))
    check_float64(ops, backend, case, deterministic=False)


@pytest.mark.parametrize("backend", params())
def test_rows_without_target(use, monkeypatch, backend):
    """Every label -1: no target logit anywhere, grad_target_logit exactly zero."""
    ops = use(backend)
    case, _ = make(backend, monkeypatch, F64, **backend.size("no_target"))
    ours = check_float64(ops, backend, case)
    assert bool((ours[4] == 0).all())


# ------------------------------------------------------------------------------------------------------------
# float32 / bf16 / fp16: the docs/DESIGN.md §4 rule
# ------------------------------------------------------------------------------------------------------------
def _precision(b):
    return [
        (f"{DTYPE_IDS[dt]}-{cid}", (dt, {k: v for k, v in spec.items() if k != "dtypes"}))
        for dt in (F32, BF16, F16)
        for cid, spec in b.precision_cases.items()
        if dt in spec.get("dtypes", (dt,))
    ]


def _dtypes(*dtypes):
    return lambda b: [(DTYPE_IDS[d], (d,)) for d in dtypes]


def _mixed(b):
    return [
        (f"{DTYPE_IDS[dt]}-{cid}", (dt, {k: v for k, v in b.precision_cases[cid].items() if k != "dtypes"}))
        for dt in LOW
        for cid in list(b.precision_cases)[:2]
    ]


@pytest.mark.parametrize("backend,dtype,spec", params(_precision))
def test_within_reference_error(use, monkeypatch, backend, dtype, spec):
    ops = use(backend)
    case, det = make(backend, monkeypatch, dtype, **spec)
    check_rule(ops, backend, case, det)


def _uncancelled_weight_gradient(case):
    """U_r = Σ_i |dcos_ir| / n_r in float64: the size of each of the two terms of grad_weight[r] that cancel along
    w_r (plain mode, no filter, k = 1, no class_index)."""
    c = case.on_exact()
    cos = true_cosines(case)
    target = torch.arange(cos.shape[1])[None, :] == c.labels[:, None]
    p = torch.softmax(torch.where(target, c.target_logit[:, None], c.row_scale[:, None] * cos), dim=1)
    dcos = torch.where(target, 0.0, (c.grad * c.row_scale)[:, None] * p)
    return dcos.abs().sum(0) / c.weight.norm(dim=1).clamp_min(1e-12)


@pytest.mark.parametrize("backend,dtype", params(_dtypes(F32, BF16, F16)))
def test_one_to_three_features(use, monkeypatch, backend, dtype):
    """D = 1, 2, 3, far below every tile width.  With D = 1 every cosine is ±1 and grad_weight is 0 but for
    rounding: the dW product and its projection term must round the gradient operand alike (issue 24: Triton's
    and the fused CUDA kernels' bf16 dW did not, 1e3 x the reference's error), and the §4 rule, relative to an
    output that is 0, does not apply to it (SINGLE_FEATURE_WEIGHT_REL does)."""
    ops = use(backend)
    for D in (2, 3):
        case, _ = make(backend, monkeypatch, dtype, B=33, D=D, C=230)
        check_rule(ops, backend, case)
    case, _ = make(backend, monkeypatch, dtype, B=33, D=1, C=230)
    ours, truth, same = run_op(ops, case), run_reference(case.on_exact()), run_reference(case)
    for name, a, t, r in zip(NAMES, ours, truth, same):
        if name not in ("argmax", "grad_weight"):
            assert_within_reference_error(name, a, t, r, slack=slack(backend, dtype) * float(t.abs().max()))
    assert_argmax_near_max(ours[1], case, tol=ARGMAX_TOL[dtype])
    error = (ours[3].double() - truth[3]).abs()[:, 0]
    bad = error > SINGLE_FEATURE_WEIGHT_REL * _uncancelled_weight_gradient(case)
    if bool(bad.any()):
        raise AssertionError(report_mismatch("grad_weight (D = 1)", ours[3][:, 0], truth[3][:, 0], bad))


@pytest.mark.parametrize("backend,dtype,spec", params(_mixed))
def test_mixed_precision(use, monkeypatch, backend, dtype, spec):
    """A float32 weight with 16-bit x: products in x's dtype, the docs/DESIGN.md §4 rule against the reference run
    the same way (weight rows rounded to x's dtype for the products), grad_x in x's dtype, grad_weight in float32."""
    backend.skip_unless_mixed(dtype)
    ops = use(backend)
    spec = dict(spec)
    for key, value in spec.pop("env", {}).items():
        monkeypatch.setenv(key, value)
    deterministic = spec.pop("deterministic", True)
    case = Case(**spec).on(dtype, backend.device, weight_dtype=F32)
    ours = check_rule(ops, backend, case, deterministic)
    assert ours[2].dtype == dtype and ours[3].dtype == F32


@pytest.mark.parametrize("backend,dtype", params(_dtypes(BF16, F16)))
def test_mixed_precision_rejected_clearly(use, monkeypatch, backend, dtype):
    """A backend without mixed precision rejects a float32 weight with 16-bit x by saying so (never runs it)."""
    backend.skip_unless(dtype)
    if dtype in backend.mixed_dtypes or not backend.checks_arguments:
        pytest.skip(f"{backend.name} runs {dtype} x with a float32 weight, or relies on marginops/_validation.py")
    ops = use(backend)
    case = Case(B=5, D=8, C=7).on(dtype, backend.device, weight_dtype=F32)
    with pytest.raises(RuntimeError, match="dtype"):
        run_op(ops, case)


@pytest.mark.parametrize("backend,dtype,factor", params(lambda b: [("bf16", (BF16, 2.0**20)), ("fp16", (F16, 2.0**8))]))
def test_large_upstream_gradient(use, monkeypatch, backend, dtype, factor):
    """Loss-scaled gradients: dcos = g·p·s·φ' reaches 1e7 (bf16 case), far past fp16's range; the fp16 product
    operands stay finite because the kernels rescale dcos by a power of two first."""
    ops = use(backend)
    backend.skip_unless(dtype)
    case = Case(**backend.size("large_gradient"))
    case.grad = case.grad * factor
    check_rule(ops, backend, case.on(dtype, backend.device))


def _small_norm(b):
    return [
        (f"{DTYPE_IDS[dt]}-k{k}-{'det' if det else 'atomic'}", (dt, k, det))
        for dt in LOW
        for k in (1, 3)
        for det in (True, False)
    ]


@pytest.mark.parametrize("backend,dtype,k,deterministic", params(_small_norm))
def test_small_norm_rows_and_tiny_row_gradients(use, monkeypatch, backend, dtype, k, deterministic):
    """W rows of norm ~0.1 (1/n ~ 10: the dX operand dc/n must not leave fp16's range) and half the rows with an
    upstream gradient 1e-9 of the others (their grad_x keeps its own precision): the docs/DESIGN.md §4 rule on every
    output, and on the tiny rows' grad_x alone."""
    ops = use(backend)
    backend.skip_unless(dtype)
    if not deterministic and not backend.atomic_path:
        pytest.skip(f"{backend.name}: deterministic=False runs the same code (test_deterministic_bitwise)")
    spec = backend.size("small_norm")
    case = Case(**dict(spec, k=k, C=spec["C"] // k))
    case.weight = case.weight * 0.01
    case.grad = case.grad.clone()
    case.grad[1::2] *= 1e-9
    low = case.on(dtype, backend.device)
    ours = run_op(ops, low, deterministic)
    assert_within_rule(ours, low, slack_rel=backend.low_slack)
    tiny = torch.zeros(case.x.shape[0], dtype=torch.bool)
    tiny[1::2] = True
    truth, same = run_reference(low.on_exact()), run_reference(low)
    assert_within_reference_error(
        "grad_x (tiny-gradient rows)",
        ours[2][tiny],
        truth[2][tiny],
        same[2][tiny],
        slack=backend.low_slack * float(truth[2][tiny].abs().max()),
    )


# ------------------------------------------------------------------------------------------------------------
# switches: TF32 and the fast 16-bit backward
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [dict(), dict(k=3, class_index=True, non_target=1, filter_threshold=0.2)],
    ids=["plain", "k3_curricular_filter"],
)
@pytest.mark.parametrize("backend", params())
def test_tf32_opt_in(use, monkeypatch, backend, config):
    ops = use(backend)
    if isinstance(backend.tf32, str):
        pytest.skip(f"{backend.name}: {backend.tf32}")
    case, _ = make(backend, monkeypatch, F32, **dict(backend.size("switches"), **config))
    backend.tf32(monkeypatch)
    ours = run_op(ops, case)
    truth = run_reference(case.on_exact())
    for name, a, t in zip(NAMES, ours, truth):
        if name != "argmax":
            assert_close(name + " (tf32)", a, t.to(a.dtype), rtol=0.0, atol=TF32_ATOL * float(t.abs().max()) + 1e-6)
    assert_argmax_near_max(ours[1], case, tol=TF32_ARGMAX_TOL)


@pytest.mark.parametrize("backend,dtype", params(lambda b: [(DTYPE_IDS[d], (d,)) for d in LOW]))
def test_fast_backward_single_rounding(use, monkeypatch, backend, dtype):
    """The fast 16-bit backward rounds the logit gradient once to fp16: close to the default, not bitwise."""
    ops = use(backend)
    if isinstance(backend.fast_backward, str):
        pytest.skip(f"{backend.name}: {backend.fast_backward}")
    if dtype not in backend.fast_backward_dtypes:
        pytest.skip(f"{backend.name}: no fast-backward switch for {dtype} (bf16 has one backward)")
    case, _ = make(backend, monkeypatch, dtype, **dict(backend.size("switches"), non_target=1, filter_threshold=0.2))
    default = run_op(ops, case)
    backend.fast_backward(monkeypatch)
    fast = run_op(ops, case)
    assert torch.equal(fast[0], default[0]) and torch.equal(fast[1], default[1]), "forward must not change"
    for name, a, b in zip(NAMES[2:], fast[2:], default[2:]):
        assert_close(name + " (fast bwd)", a, b, rtol=0.0, atol=FAST_BWD_ATOL * float(b.abs().max()) + 1e-6)
    assert_within_rule(fast, case, slack_rel=FAST_BWD_SLACK)


# ------------------------------------------------------------------------------------------------------------
# edge cases
# ------------------------------------------------------------------------------------------------------------


# a zero row's fp16 gradient (≈ 1e10) rounds to inf by design, and the Triton interpreter's numpy cast says so
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("class_index", [False, True], ids=["all_classes", "class_index"])
@pytest.mark.parametrize("backend,dtype", params(_dtypes(F64, F32, BF16, F16)))
def test_zero_norm_weight_rows(use, monkeypatch, backend, dtype, class_index):
    """A zero W row: cosine 0, gradient (Σ_i dcos_i x_i) / eps (no projection term), as F.normalize's clamp
    gives; the other rows as usual (their scale is not swamped by the zero rows' huge gradients)."""
    ops = use(backend)
    C = backend.size("zero_rows")["C"]
    zero = torch.tensor([0, 7, C // 2, C - 1])
    case, _ = make(backend, monkeypatch, dtype, C=C, k=1, class_index=class_index, zero_rows=tuple(zero.tolist()))
    ours = run_op(ops, case)
    other = torch.ones(C, dtype=torch.bool)
    other[zero] = False
    for name, t in zip(NAMES, ours):
        t = t[other] if name == "grad_weight" else t
        assert bool(torch.isfinite(t).all()), f"{name}: zero-norm rows must leave the other results finite"
    truth = run_reference(case.on_exact())
    if dtype == F64:
        assert_matches_float64(ours[:3] + ours[4:], truth[:3] + truth[4:])
        assert_close(
            "grad_weight (other rows)",
            ours[3][other],
            truth[3][other],
            rtol=F64_RTOL,
            atol=F64_RTOL * float(truth[3][other].abs().max()),
        )
    else:
        assert_within_rule(ours, case, slack_rel=slack(backend, dtype), weight_rows=other, truth=truth)
    # ≈ 1e10 here: fp16 cannot hold it (inf, as the reference run in fp16), the other dtypes agree with float64.
    truth = truth[3][zero]
    if dtype == F16:
        assert torch.equal(torch.isinf(ours[3][zero]), torch.isinf(run_reference(case)[3][zero]))
    else:
        assert bool(torch.isfinite(ours[3][zero]).all())
        tol = F64_RTOL if dtype == F64 else ZERO_ROW_RTOL
        assert_close(
            "grad_weight (zero rows)",
            ours[3][zero],
            truth.to(ours[3].dtype),
            rtol=tol,
            atol=tol * float(truth.abs().max()),
        )


@pytest.mark.parametrize("backend,dtype", params(_dtypes(F64, BF16)))
def test_class_index_leaves_other_rows_exactly_zero(use, monkeypatch, backend, dtype):
    ops = use(backend)
    if dtype not in backend.dtypes:
        dtype = F32  # the backend's lowest precision
    case, _ = make(backend, monkeypatch, dtype, **dict(backend.size("class_index_zero"), class_index=True))
    grad_weight = run_op(ops, case)[3]
    rows = grad_weight.reshape(-1, case.params[3], grad_weight.shape[1])  # (classes, subcenters, D)
    used = torch.zeros(rows.shape[0], dtype=torch.bool)
    used[case.class_index.cpu()] = True
    assert rows[~used].numel() > 0 and int(torch.count_nonzero(rows[~used])) == 0
    assert int(torch.count_nonzero(rows[used])) > 0


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered")
@pytest.mark.parametrize("backend,dtype", params(_dtypes(F64, F32, BF16)))
def test_nan_input_propagates(use, monkeypatch, backend, dtype):
    """A NaN in x (one element of row 3, all of row 6) reaches that row's lse only: the other rows' lse, argmax and
    (float64) grad_x as the reference's, grad_weight NaN exactly where the reference's is; a NaN in W reaches
    every row's lse (except rows whose target is that column)."""
    ops = use(backend)
    tol = NAN_OTHER_ROWS_TOL[dtype]
    case, _ = make(backend, monkeypatch, dtype, **backend.size("nan"))
    x = case.x
    case.x = x.clone()
    case.x[3, 5] = float("nan")
    case.x[6] = float("nan")
    others = torch.ones(x.shape[0], dtype=torch.bool)
    others[[3, 6]] = False
    ours, ref = run_op(ops, case), run_reference(case)
    assert bool(torch.isnan(ours[0][[3, 6]]).all()), "a NaN embedding must give a NaN lse"
    assert_close("lse (other rows)", ours[0][others], ref[0][others], rtol=tol, atol=tol)
    assert_argmax_near_max(ours[1][others], _rows(case, others), tol=ARGMAX_TOL[dtype])
    if dtype == F64:
        assert_close(
            "grad_x (other rows)",
            ours[2][others],
            ref[2][others],
            rtol=tol,
            atol=tol * float(ref[2][others].abs().max()),
        )
    assert torch.equal(torch.isnan(ours[3]), torch.isnan(ref[3])), "grad_weight: NaN where the reference's"

    case.x = x
    case.weight = case.weight.clone()
    case.weight[17, 0] = float("nan")
    lse = ops.fused_lse(*case.args(), True)[0].cpu()
    expected = torch.isnan(run_reference(case)[0])
    assert int(expected.sum()) >= lse.numel() - 1
    assert torch.equal(torch.isnan(lse), expected)


@pytest.mark.parametrize("backend,dtype", params(_dtypes(F64, BF16)))
def test_nan_upstream_gradient_stops_at_filtered_columns(use, monkeypatch, backend, dtype):
    """A NaN upstream gradient of one row with inter-class filtering: its filtered columns' logits are constants,
    so grad_weight is NaN exactly where the reference's is (the classes that row reaches unfiltered), not on every
    class (dz * dphi would be NaN * 0 there)."""
    ops = use(backend)
    case, _ = make(backend, monkeypatch, dtype, **dict(backend.size("nan"), non_target=1, filter_threshold=0.3))
    case.grad = case.grad.clone()
    case.grad[5] = float("nan")
    ours, ref = run_op(ops, case), run_reference(case)
    nan_rows = torch.isnan(ref[3]).any(dim=1)
    assert 0 < int(nan_rows.sum()) < nan_rows.numel()  # some classes filtered for that row, some not
    assert torch.equal(torch.isnan(ours[3]), torch.isnan(ref[3]))
    assert torch.equal(torch.isnan(ours[2]).any(dim=1), torch.isnan(ref[2]).any(dim=1))


def _rows(case, keep):
    """The case restricted to some rows (for argmax checks)."""
    other = case.on(case.dtype, "cpu")
    other.x = other.x[keep]
    return other


@pytest.mark.parametrize("backend", params())
def test_out_of_range_labels_are_only_compared(use, monkeypatch, backend):
    """The Python layer rejects such labels; called directly, the kernels must treat them as "no target"."""
    ops = use(backend)
    case = Case(**backend.size("labels"))
    case.labels = case.labels.clone()
    case.labels[2] = 10**12
    case.labels[4] = -7
    ours = run_op(ops, case.on(F64, backend.device))
    case.labels[2] = -1
    case.labels[4] = -1
    assert_matches_float64(ours, run_reference(case))


@pytest.mark.parametrize("backend,dtype", params(_dtypes(F32, BF16, F64)))
def test_deterministic_bitwise(use, monkeypatch, backend, dtype):
    """Two identical runs agree bitwise; where deterministic=False is the same code (no float atomics), that too."""
    ops = use(backend)
    case, _ = make(backend, monkeypatch, dtype, **backend.size("deterministic"))
    first = run_op(ops, case)
    assert_same_bits(first, run_op(ops, case), "between two identical runs")
    if not backend.atomic_path:
        assert_same_bits(first, run_op(ops, case, deterministic=False), "with deterministic=False")


@pytest.mark.parametrize("backend", params())
def test_empty_batch(use, monkeypatch, backend):
    ops = use(backend)
    dtype = F32 if F32 in backend.dtypes else backend.dtypes[0]
    case, _ = make(backend, monkeypatch, dtype, B=0, C=50, none_every=0)
    lse, argmax, gx, gw, gtl, grs = run_op(ops, case)
    assert lse.shape == (0,) and argmax.shape == (0,) and gx.shape == case.x.shape
    assert gw.shape == case.weight.shape and int(torch.count_nonzero(gw)) == 0
    assert gtl.shape == (0,) and grs.shape == (0,)


@pytest.mark.parametrize("backend", params())
def test_bad_inputs_raise_clear_errors(use, monkeypatch, backend):
    ops = use(backend)
    if not backend.checks_arguments:
        pytest.skip(f"{backend.name}: the entry point does not check arguments (marginops/_validation.py does)")
    dtype, unsupported, other_float = backend.bad_input_dtypes
    case, _ = make(backend, monkeypatch, dtype, C=50)
    device = backend.device

    def call(**changes):
        return ops.fused_lse(*case.args(**changes), True)

    with pytest.raises(RuntimeError, match="float32 or float64"):
        call(x=case.x.to(unsupported), weight=case.weight.to(unsupported))
    with pytest.raises(RuntimeError, match="weight dtype"):
        call(weight=case.weight.to(other_float))
    with pytest.raises(RuntimeError, match="labels must have dtype"):
        call(labels=case.labels.int())
    with pytest.raises(RuntimeError, match="target_logit must have shape"):
        call(target_logit=case.target_logit[:-1])
    with pytest.raises(RuntimeError, match="multiple of subcenters"):
        call(subcenters=3)
    with pytest.raises(RuntimeError, match="non_target"):
        call(non_target=max(NON_TARGET_MODES) + 1)
    with pytest.raises(RuntimeError, match="class_index values"):
        call(class_index=torch.tensor([0, 50], device=device))
    with pytest.raises(RuntimeError, match="class_index values"):
        call(class_index=torch.tensor([-1, 3], device=device))
    with pytest.raises(RuntimeError, match="class_index must be a 1-D int64"):
        call(class_index=torch.tensor([0, 1], dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match="features"):
        call(weight=case.weight[:, :-1].contiguous())
    # Repeated classes are fine for the forward but would race in the backward.
    dup = torch.tensor([3, 4, 3], device=device)
    labels = torch.full_like(case.labels, -1)
    lse, _ = call(class_index=dup, labels=labels)
    with pytest.raises(RuntimeError, match="must not repeat"):
        ops.fused_lse_backward(case.grad, lse, *case.args(class_index=dup, labels=labels), True)
    with pytest.raises(RuntimeError, match="grad_lse must have shape"):
        ops.fused_lse_backward(case.grad[:-1], lse, *case.args(), True)
    with pytest.raises(RuntimeError, match="row_scale must have dtype"):
        call(row_scale=case.row_scale.to(other_float))
    if not backend.checks_layout:
        return
    with pytest.raises(RuntimeError, match="contiguous"):
        call(weight=case.weight.t().contiguous().t())
    with pytest.raises(RuntimeError, match="subcenters must be in"):
        call(subcenters=65 * 50, weight=case.weight.repeat(65, 1))
    if device == "cuda":
        with pytest.raises(RuntimeError, match="threshold must be on"):
            call(threshold=case.threshold.cpu())
        torch.cuda.synchronize()  # nothing above may have left a sticky CUDA error


# ------------------------------------------------------------------------------------------------------------
# 64-bit offsets: weight rows beyond row * D = 2^31 elements, reached through class_index
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("backend", params())
def test_offsets_beyond_2_31(use, monkeypatch, backend):
    """An 8-class problem whose weight rows sit at row * D > 2^31 of a 4.3 GB bf16 weight (only those rows are
    written: the rest stays untouched virtual memory) equals, bitwise, the same problem with the rows packed;
    outside class_index grad_weight is exactly zero."""
    ops = use(backend)
    if backend.big_offsets_skip:
        pytest.skip(backend.big_offsets_skip)
    dtype = BF16 if BF16 in backend.dtypes else F32
    spec = backend.size("offsets")
    D = spec["D"]
    R = 2**31 // D + 2**16
    if backend.device == "cuda" and torch.cuda.mem_get_info()[0] < 3 * R * D * dtype.itemsize:
        pytest.skip("not enough free GPU memory for the weight, its gradient and scratch")
    small, _ = make(backend, monkeypatch, dtype, **spec)
    rows = torch.tensor([R - 1, 2**31 // D + 5, 2**31 // D, 2**31 // D - 1, R - 2, 12345, 2**31 // D + 2**15, 0])
    assert int(rows[0]) * D >= 2**31 and int(rows[1]) * D >= 2**31
    big, _ = make(backend, monkeypatch, dtype, **spec)
    big.weight = torch.empty(R, D, dtype=dtype, device=backend.device)
    big.weight[rows.to(backend.device)] = small.weight
    big.class_index = rows.to(backend.device)
    ours = list(run_op(ops, big))
    grad_weight = ours[3]
    packed = grad_weight[rows].clone()
    grad_weight[rows] = 0
    assert int(torch.count_nonzero(grad_weight)) == 0, "rows outside class_index must get exactly zero"
    ours[3] = packed
    del big, grad_weight
    assert_same_bits(tuple(ours), run_op(ops, small), "between the 2^31-offset rows and the packed copy")
    assert_within_rule(tuple(ours), small, slack_rel=slack(backend, dtype))
