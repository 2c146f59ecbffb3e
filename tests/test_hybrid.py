"""The hybrid path (backend "hybrid": the Triton forward; backward per class chunk a Triton gradient block and
torch.mm products, triton_kernels/hybrid_bwd.py and hybrid_launch.py) beyond the op-level cases every backend runs
(tests/test_op_suite.py, adapter "hybrid"): frozen parts and the products it issues, the workspace bound, NaN and
loss-scaled or tiny upstream gradients across chunks, registration (opcheck, the loss through autograd).  Without
a GPU everything runs under the Triton interpreter, whose products are torch's CPU GEMMs (what the FLOP counts
below read).  MARGINOPS_CHUNK_COLS / MARGINOPS_CHUNK_ROWS force many chunks and row tiles at these shapes."""

import sys
import weakref

import pytest
import torch
from helpers import HAS_TRITON, matmul_flops
from op_cases import (
    LOW_SLACK_CUDA,
    LOW_SLACK_TRITON_GPU,
    Case,
    assert_matches_float64,
    assert_within_rule,
    run_op,
    run_reference,
)
from torch.utils._python_dispatch import TorchDispatchMode

import marginops
from marginops import ops
from marginops.non_target import non_target_max_abs_dphi

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
LOW_SLACK = LOW_SLACK_TRITON_GPU if HAS_CUDA else LOW_SLACK_CUDA
F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16


@pytest.fixture(scope="module")
def hybrid():
    ops.hybrid_op()  # registers the forward and the backward
    return torch.ops.marginops


class _Ops:
    def __init__(self, lib):
        self.fused_lse, self.fused_lse_backward = lib.hybrid_fused_lse, lib.hybrid_fused_lse_backward


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 37 classes and row tiles of 20 rows: ragged last chunk and last tile in every case."""
    monkeypatch.setenv("MARGINOPS_CHUNK_COLS", "37")
    monkeypatch.setenv("MARGINOPS_CHUNK_ROWS", "20")


def _launcher():
    ops.triton_kernels()
    return sys.modules["marginops.triton_kernels.hybrid_launch"]


# ------------------------------------------------------------------------------------------------------------
# products: 2 per backward (dX, dW; fp16 with hi + lo: 4), each skipped with its gradient
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, BF16, F16], ids=["f64", "bf16", "fp16"])
def test_frozen_parts_skip_their_product(hybrid, small_chunks, dtype):
    """An unwanted gradient comes back empty and its torch.mm products are not issued; the wanted ones and the
    per-row gradients are bitwise those of the full backward.  Frozen x, frozen W and both, against one full
    backward."""
    case = Case(B=37, D=61, C=100, k=3, class_index=True, non_target=1, filter_threshold=0.2).on(dtype, DEVICE)
    lse, _ = hybrid.hybrid_fused_lse(*case.args(), True)

    def backward(*flags):
        return hybrid.hybrid_fused_lse_backward(case.grad, lse, *case.args(), True, *flags)

    full = backward()
    blocks = 2 if dtype == F16 else 1  # fp16: the hi and lo gradient blocks each meet both operands
    unit = 2 * 37 * case.class_index.numel() * 3 * 61
    if DEVICE == "cpu":
        assert matmul_flops(backward) == 2 * blocks * unit, "the profiler must see the backward's products"
    for need in ((False, True), (True, False), (False, False)):
        part = backward(*need)
        for name, wanted, a, b in zip(("grad_x", "grad_weight"), need, part[:2], full[:2]):
            if wanted:
                assert torch.equal(a, b), (name, need)
            else:
                assert a.numel() == 0 and a.dtype == b.dtype, (name, need)
        assert torch.equal(part[2], full[2]) and torch.equal(part[3], full[3]), need
        if DEVICE == "cpu":
            assert matmul_flops(lambda: backward(*need)) == blocks * unit * (int(need[0]) + int(need[1])), need


def test_fast_backward_drops_the_lo_block(hybrid, small_chunks, monkeypatch):
    """fp16 with FAST_GRAD_DOTS: one gradient block, two products instead of four, close to the default."""
    if DEVICE != "cpu":
        pytest.skip("counts the products torch's CPU profiler sees")
    case = Case(B=37, D=64, C=90).on(F16)
    lse, _ = hybrid.hybrid_fused_lse(*case.args(), True)
    unit = 2 * 37 * 90 * 64
    assert matmul_flops(lambda: hybrid.hybrid_fused_lse_backward(case.grad, lse, *case.args(), True)) == 4 * unit
    monkeypatch.setattr(ops.triton_kernels(), "FAST_GRAD_DOTS", True)
    assert matmul_flops(lambda: hybrid.hybrid_fused_lse_backward(case.grad, lse, *case.args(), True)) == 2 * unit


@pytest.mark.parametrize("frozen", ["weight", "embeddings"])
def test_autograd_asks_only_for_wanted_gradients(frozen):
    """Through the loss: a frozen weight (or embeddings without requires_grad) leaves the other gradient bitwise
    unchanged and costs one product less."""
    g = torch.Generator().manual_seed(0)
    emb, weight = torch.randn(16, 32, generator=g), torch.randn(90, 32, generator=g)
    labels = torch.randint(0, 90, (16,), generator=g)

    def run(emb_grad, weight_grad):
        e = emb.to(DEVICE, copy=True).requires_grad_(emb_grad)
        w = weight.to(DEVICE, copy=True).requires_grad_(weight_grad)
        loss = marginops.margin_cross_entropy(e, w, labels.to(DEVICE), marginops.ArcFace(), backend="hybrid")
        flops = matmul_flops(loss.backward)
        return e.grad, w.grad, flops

    full = run(True, True)
    part = run(frozen != "embeddings", frozen != "weight")
    if frozen == "weight":
        assert part[1] is None and torch.equal(part[0], full[0])
    else:
        assert part[0] is None and torch.equal(part[1], full[1])
    if DEVICE == "cpu":
        assert full[2] - part[2] == 2 * 16 * 90 * 32


# ------------------------------------------------------------------------------------------------------------
# workspace: bounded independently of C (the launcher's allocations on fake CUDA tensors, no kernel launched)
# ------------------------------------------------------------------------------------------------------------
class _PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensors allocated under it that are alive at once (freed when their last reference goes)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._schema.is_mutable:  # views and in-place / out= ops allocate nothing
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                size = t.untyped_storage().nbytes()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, size)
        return out

    def _free(self, size):
        self.live -= size


class _NoLaunch:
    def __init__(self, kernel):
        pass

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _extra_peak(B, D, C, k, dtype, need_x=True, need_weight=True, class_index=False):
    """Peak memory of one hybrid backward beyond its outputs, on fake CUDA tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        dev = torch.device("cuda:0")
        acc = F64 if dtype == F64 else F32
        x = torch.empty(B, D, dtype=dtype, device=dev)
        w = torch.empty(C * k, D, dtype=dtype, device=dev)
        labels = torch.empty(B, dtype=torch.int64, device=dev)
        rows = [torch.empty(B, dtype=acc, device=dev) for _ in range(4)]
        ci = torch.empty(C // 2, dtype=torch.int64, device=dev) if class_index else None
        t = torch.zeros((), dtype=torch.float64)
        with _PeakMemory() as peak:
            out = _launcher().hybrid_backward(
                rows[3],
                rows[3],
                x,
                w,
                labels,
                *rows[:3],
                ci,
                t,
                0,
                2.0,
                k,
                True,
                need_x,
                need_weight,
                max_abs_dphi=non_target_max_abs_dphi(0, t.reshape(1)),
            )
            outputs = sum(o.untyped_storage().nbytes() for o in out)
        return peak.peak - outputs


@pytest.mark.parametrize(
    "B,dtype,k,need,class_index",
    [
        (1024, BF16, 1, (True, True), False),
        (1024, F16, 1, (True, True), False),
        (1024, F32, 1, (True, True), True),
        (300, BF16, 3, (True, False), True),
        (300, F16, 1, (False, True), False),
        (20000, BF16, 1, (True, True), False),  # three row tiles
    ],
    ids=["bf16", "fp16_hi_lo", "f32_class_index", "bf16_k3_frozen_w", "fp16_frozen_x", "bf16_row_tiles"],
)
def test_workspace_is_bounded_independently_of_classes(monkeypatch, B, dtype, k, need, class_index):
    """The launcher's peak memory beyond inputs and outputs is the same at 200k and 2M classes and within the
    plan's bound (HybridPlan.workspace_bytes, the figure docs/CHUNKED.md states)."""
    launcher = _launcher()  # imported first: triton.jit picks the interpreter at import time
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the GPU plan and tiles (read per call)
    monkeypatch.setattr(launcher, "wrap_triton", _NoLaunch)
    # the grid planners' SM count (an H100's): fake CUDA tensors have no device to ask
    monkeypatch.setattr(sys.modules["marginops.triton_kernels.launch"], "_num_sms", lambda index: 132)
    D = 512
    peaks = [_extra_peak(B, D, C, k, dtype, *need, class_index) for C in (200_000, 2_000_000)]
    assert peaks[0] == peaks[1]
    fused = launcher.fused_add(torch.device("cuda"))  # what the fake CUDA tensors above ran with
    plan = launcher.plan(B, D, 2_000_000, k, dtype, dtype == F16, *need, class_index, fused_add=fused)
    assert 0 < peaks[1] <= plan.workspace_bytes()
    assert (
        plan.workspace_bytes()
        == launcher.plan(B, D, 10**8, k, dtype, dtype == F16, *need, class_index, fused_add=fused).workspace_bytes()
    )


def test_a_threshold_of_two_or_more_filters_nothing(hybrid):
    """filter_threshold >= 2 compiles the filter test out of the kernels (launch.filters): no cosine exceeds it, so
    the loss and every gradient are those of a threshold that is compiled in and filters nothing (1.5)."""
    outs = []
    for threshold in (2.0, 1.5, float("inf")):
        case = Case(B=23, D=40, C=70, filter_threshold=threshold).on(BF16, DEVICE)
        lse, _ = hybrid.hybrid_fused_lse(*case.args(), True)
        outs.append((lse, *hybrid.hybrid_fused_lse_backward(case.grad, lse, *case.args(), True)))
    launch = sys.modules[_launcher().__name__.replace("hybrid_launch", "launch")]
    assert [launch.filters(t) for t in (2.0, 1.5, float("inf"), float("nan"))] == [False, True, False, True]
    for off, on, inf in zip(*outs):
        assert torch.equal(off, on) and torch.equal(off, inf)


def test_one_inverse_norm_per_weight_row():
    """1/n_r is computed once per chunk row, by the gradient-block kernel (whose f_r the fp16 G carries), and
    read by the weight-rows and dW kernels (whose 2^e_r W_hat and alpha_r carry): computed twice, in two
    summation orders, the two could fall on either side of a power of two and scale that row's gradients by 2."""
    import inspect

    bwd = sys.modules[_launcher().__name__.replace("hybrid_launch", "hybrid_bwd")]
    for kernel in (bwd._hybrid_weight_rows_kernel, bwd._hybrid_dw_kernel):
        rows = inspect.getsource(kernel.fn)
        assert "inv_ptr" in rows and "_row_inv_norm" not in rows and "sqrt" not in rows
    assert "inv_ptr, jl, col_mask, inv_writer, True" in inspect.getsource(bwd._hybrid_grad_block_kernel.fn)


def test_plan_bounds(monkeypatch):
    """The planned tiles: one row tile up to 8192 rows, 8192 to 32768 weight rows per chunk, ~64 MiB of gradient
    block, never more than the problem has; grad_weight through the dW product (no U) for a batch of one row tile;
    the bounds docs/CHUNKED.md quotes (D = 512)."""
    launcher = _launcher()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    plan = launcher.plan(1024, 512, 10**6, 1, BF16, False)
    assert (plan.rows_per_tile, plan.chunk_rows, plan.fused_dw) == (1024, 32768, True)
    assert (100 << 20) <= plan.workspace_bytes() < (101 << 20)
    assert (101 << 20) <= launcher.plan(1024, 512, 10**6, 1, F16, True).workspace_bytes() < (102 << 20)
    big = launcher.plan(65536, 512, 10**6, 1, BF16, False)
    assert not big.fused_dw and (353 << 20) <= big.workspace_bytes() < (354 << 20)
    assert launcher.plan(1024, 512, 10**6, 1, F16, True).chunk_rows == 16384
    assert launcher.plan(65536, 512, 10**6, 1, BF16, False).rows_per_tile == 8192
    assert launcher.plan(8, 512, 10**6, 1, BF16, False).chunk_rows == 32768
    assert launcher.plan(8, 512, 10**6, 3, BF16, False).cols_per_chunk == 32768 // 3
    small = launcher.plan(5, 16, 7, 2, BF16, False)
    assert (small.rows_per_tile, small.cols_per_chunk) == (5, 7)
    # the dW kernel's 32-bit in-chunk offsets: a chunk of 2 Rc D elements past 2^31 keeps U and the row pass
    wide = launcher.plan(1024, 2**16, 10**6, 1, BF16, False)
    assert 2 * wide.chunk_rows * 2**16 >= 2**31 and not wide.fused_dw
    assert launcher.plan(1024, 2**14, 10**6, 1, BF16, False).fused_dw


# ------------------------------------------------------------------------------------------------------------
# upstream gradients across chunks: loss-scaled, tiny, NaN
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,factor",
    [(BF16, 2.0**20), (F16, 2.0**8), (F16, 1e-6), (BF16, 1e-6)],
    ids=["bf16_large", "fp16_large", "fp16_tiny", "bf16_tiny"],
)
def test_upstream_gradient_scale(hybrid, small_chunks, dtype, factor):
    """The fp16 gradient block is scaled per row by a power of two: it neither overflows nor loses its precision
    in fp16's subnormals, over several chunks and row tiles."""
    case = Case(B=37, D=64, C=100, non_target=1, filter_threshold=0.2)
    case.grad = case.grad * factor
    low = case.on(dtype, DEVICE)
    assert_within_rule(run_op(_Ops(hybrid), low), low, slack_rel=LOW_SLACK)


@pytest.mark.parametrize("dtype", [F64, BF16], ids=["f64", "bf16"])
def test_nan_upstream_gradient_propagates(hybrid, small_chunks, dtype):
    """A NaN upstream gradient makes its row's grad_x NaN and reaches grad_weight exactly where the reference's is
    NaN (its scale falls back to 1; the other rows' scales and the dW operand stay finite)."""
    case = Case(B=30, D=16, C=90)
    case.grad = case.grad.clone()
    case.grad[4] = float("nan")
    ours, ref = run_op(_Ops(hybrid), case.on(dtype, DEVICE)), run_reference(case.on(dtype))
    for name, a, b in zip(("grad_x", "grad_weight"), ours[2:4], ref[2:4]):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
    others = torch.ones(30, dtype=torch.bool)
    others[4] = False
    assert bool(torch.isnan(ours[2][4]).all()) and bool(torch.isfinite(ours[2][others]).all())


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered")
@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
def test_dw_product_nan_and_bitwise(hybrid, monkeypatch, dtype):
    """The dW product (16-bit inputs, one row tile, chunks of 37 classes): a NaN embedding row, a NaN weight row and
    a NaN upstream gradient reach grad_weight exactly where the reference's is NaN (through the radial shares as
    through U); the other outputs as the rule says; a second run is bitwise the same."""
    monkeypatch.setenv("MARGINOPS_CHUNK_COLS", "37")
    case = Case(B=30, D=16, C=90, non_target=1, filter_threshold=0.3)
    assert _launcher().plan(30, 16, 90, 1, dtype, dtype == F16, cols_per_chunk=37).fused_dw
    clean = case.on(dtype, DEVICE)
    first = run_op(_Ops(hybrid), clean)
    assert_within_rule(first, clean, slack_rel=LOW_SLACK)
    assert all(torch.equal(a, b) for a, b in zip(first, run_op(_Ops(hybrid), clean)))
    for poison in ("x", "weight", "grad"):
        bad = Case(B=30, D=16, C=90, non_target=1, filter_threshold=0.3)
        target = getattr(bad, poison).clone()
        target[5] = float("nan")
        setattr(bad, poison, target)
        ours, ref = run_op(_Ops(hybrid), bad.on(dtype, DEVICE)), run_reference(bad.on(dtype))
        assert torch.equal(torch.isnan(ours[3]), torch.isnan(ref[3])), poison


# ------------------------------------------------------------------------------------------------------------
# registration: the loss and its gradients through autograd
# ------------------------------------------------------------------------------------------------------------
# (opcheck of the hybrid ops: tests/test_op_registration.py, from the one sample list)


@pytest.mark.parametrize(
    "margin",
    [marginops.ArcFace(s=8.0), marginops.CurricularFace(s=8.0, t=0.4), marginops.SphereFace(m=3, lambda_=2.0)],
    ids=["arcface", "curricular", "sphereface"],
)
def test_loss_and_gradients_match_the_reference(small_chunks, margin):
    """margin_cross_entropy(backend="hybrid") in float64 against the reference backend: loss, both gradients."""
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(30, 24, generator=g, dtype=F64)
    weight = torch.randn(80, 24, generator=g, dtype=F64)
    labels = torch.randint(0, 80, (30,), generator=g)
    labels[3] = -100
    results = []
    for backend in ("hybrid", "reference"):
        e = emb.to(DEVICE).requires_grad_(True)
        w = weight.to(DEVICE).requires_grad_(True)
        loss = marginops.margin_cross_entropy(e, w, labels.to(DEVICE), margin, reduction="sum", backend=backend)
        loss.backward()
        results.append((loss.detach().cpu(), e.grad.cpu(), w.grad.cpu()))
    for name, a, b in zip(("loss", "grad_embeddings", "grad_weight"), *results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * float(b.abs().max()), msg=name)


def test_gradcheck_float64(small_chunks):
    emb = torch.nn.functional.normalize(torch.randn(5, 7, dtype=F64), dim=1).to(DEVICE).requires_grad_(True)
    weight = torch.randn(11, 7, dtype=F64, device=DEVICE).requires_grad_(True)
    labels = torch.tensor([0, 3, -100, 10, 7], device=DEVICE)
    margin = marginops.CurricularFace(s=8.0, t=0.4)

    def fn(e, w):
        return marginops.margin_cross_entropy(e, w, labels, margin, reduction="none", backend="hybrid")

    assert torch.autograd.gradcheck(fn, (emb, weight), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_float64_matches_reference_with_default_plan(hybrid):
    """No chunk override: the planner's one chunk and one row tile."""
    case = Case(B=70, D=64, C=150, k=2, class_index=True, non_target=1, filter_threshold=0.3).on(F64, DEVICE)
    assert_matches_float64(run_op(_Ops(hybrid), case), run_reference(case.on(F64)))
