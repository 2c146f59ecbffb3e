"""Mixed precision as users train: a float32 weight (and float32 dW) with bf16 / fp16 products, asked for by
``compute_dtype`` or by torch.autocast, through the functional, the modules, the distributed head and both compat
layers.  The op-level checks of each backend's mixed path are in tests/test_op_suite.py (test_mixed_precision)."""

import warnings

import pytest
import torch
from helpers import EVERY_MODULE, HAS_TRITON, assert_close

import marginops
from marginops import functional, ops, reference
from marginops import nn as mnn

LOW = (torch.bfloat16, torch.float16)


def _problem(B=13, C=50, D=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g) * (0.5 + torch.rand(C, 1, generator=g))
    y = torch.randint(0, C, (B,), generator=g)
    x = torch.randn(B, D, generator=g) + 2.0 * w[y]
    y[::5] = -100
    return x, w, y


def _loss_and_grads(x, w, y, margin, **kwargs):
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = marginops.margin_cross_entropy(x, w, y, margin, **kwargs)
    loss.backward()
    return loss.detach(), x.grad, w.grad


# the backends whose mixed precision these tests run on CPU tensors; written out rather than read from
# marginops.capabilities, so that a capability dropped from the record fails here instead of being skipped
MIXED_ON_CPU = [
    "reference",
    "cpu",
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton")),
]


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", MIXED_ON_CPU)
@pytest.mark.parametrize("margin", [marginops.ArcFace(s=30.0), marginops.CurricularFace(s=30.0)], ids=["arc", "cur"])
def test_functional_products_in_compute_dtype(backend, dtype, margin):
    """The loss and gradients equal the float64 computation on x̂ and W rounded to compute_dtype for the products
    (and only there); the weight's gradient stays float32; not the float32 result (the rounding happened)."""
    x, w, y = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a backend that fell back to float32 would warn
        loss, gx, gw = _loss_and_grads(x, w, y, margin, backend=backend, compute_dtype=dtype)
    assert loss.dtype == gx.dtype == gw.dtype == torch.float32
    # the oracle directly (validation allows bf16 products only on a float32 weight): float64 but for the rounding
    xd, wd = x.double().requires_grad_(True), w.double().requires_grad_(True)
    loss64 = reference.margin_cross_entropy(xd, wd, y, margin, compute_dtype=dtype)
    loss64.backward()
    truth = (loss64.detach(), xd.grad, wd.grad)
    plain = _loss_and_grads(x, w, y, margin, backend=backend)
    # Triton's backward products take the gradient block as a 16-bit operand (docs/DESIGN.md §5.2; the op suite
    # holds it to the §4 rule): its gradients are as close as one 16-bit rounding of that block allows
    grad_tol = 2.0**-6 if backend == "triton" else 1e-4
    for name, a, t in zip(("loss", "grad_x", "grad_weight"), (loss, gx, gw), truth):
        tol = 1e-4 if name == "loss" else grad_tol
        assert_close(name, a, t.float(), rtol=tol, atol=tol * float(t.abs().max()))
    assert not torch.equal(loss, plain[0]), "compute_dtype changed nothing"
    assert abs(float(loss) - float(plain[0])) < 0.05 * abs(float(plain[0]))


@pytest.mark.parametrize("backend", [*MIXED_ON_CPU, "auto"])
def test_module_under_autocast_computes_in_autocast_dtype(backend):
    """torch.autocast("cpu", bf16) around a backbone and the head: the head's products in bf16 (the same result as
    compute_dtype=torch.bfloat16), the loss and the weight's gradient in float32, the backbone gets a gradient."""
    torch.manual_seed(0)
    backbone = torch.nn.Linear(12, 8)
    head = mnn.ArcFaceLoss(8, 10, s=16.0, backend=backend)
    inputs, labels = torch.randn(6, 12), torch.randint(0, 10, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every backend here has mixed precision: no fallback warning
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb = backbone(inputs)
            assert emb.dtype == torch.bfloat16
            loss = head(emb, labels)
        assert loss.dtype == torch.float32
        head.compute_dtype = torch.bfloat16
        expected = head(emb.detach().float(), labels)
        head.compute_dtype = None
        plain = head(emb.detach().float(), labels)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert not torch.equal(loss, plain), "autocast changed nothing"
    loss.backward()
    assert head.weight.grad.dtype == torch.float32 and torch.isfinite(head.weight.grad).all()
    assert backbone.weight.grad is not None and torch.isfinite(backbone.weight.grad).all()


def test_module_compute_dtype_overrides_autocast():
    x, w, y = _problem()
    head = mnn.CosFaceLoss(24, 50, s=16.0, backend="reference", compute_dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(w)
    y = y.clamp_min(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = head(x, y)
    torch.testing.assert_close(under, head(x, y), rtol=0, atol=0)


@pytest.mark.parametrize("backend", MIXED_ON_CPU)
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_distributed_head_and_insightface_fp16(dtype, backend):
    """DistributedMarginLoss(compute_dtype=...) on one rank = the functional with the same compute_dtype; insightface's
    PartialFC_V2(fp16=True) = compute_dtype float16; torch.autocast around the head = compute_dtype autocast's."""
    from marginops import distributed as mdist
    from marginops.compat import insightface

    x, w, y = _problem()
    y = y.clamp_min(0)
    margin = marginops.ArcFace(s=30.0)
    expected = marginops.margin_cross_entropy(x, w, y, margin, backend=backend, compute_dtype=dtype)
    if backend != "reference":  # the backend's mixed result is the oracle's, within the kernels' summation order
        truth = marginops.margin_cross_entropy(x, w, y, margin, backend="reference", compute_dtype=dtype)
        torch.testing.assert_close(expected, truth, rtol=1e-4, atol=1e-4)
    head = mdist.DistributedMarginLoss(margin, 24, 50, backend=backend, compute_dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(w)
    torch.testing.assert_close(head(x, y), expected, rtol=1e-6, atol=1e-6)
    head.compute_dtype = None
    with torch.autocast("cpu", dtype=dtype):
        under = head(x, y)
    torch.testing.assert_close(under, expected, rtol=1e-6, atol=1e-6)
    plain = head(x, y)
    assert not torch.equal(plain, under)
    if dtype == torch.float16:
        pfc = insightface.PartialFC_V2(insightface.CombinedMarginLoss(30.0, 1.0, 0.5, 0.0), 24, 50, fp16=True)
        pfc.backend = backend
        with torch.no_grad():
            pfc.weight.copy_(w)
        torch.testing.assert_close(pfc(x, y), expected, rtol=1e-6, atol=1e-6)
        pfc.fp16 = False
        torch.testing.assert_close(pfc(x, y), plain, rtol=1e-6, atol=1e-6)


def test_pml_loss_under_autocast():
    """compat.pml under torch.autocast runs the products in autocast's dtype; W and its gradient stay float32."""
    from marginops.compat import pml

    x, _, y = _problem()
    y = y.clamp_min(0)
    loss_fn = pml.ArcFaceLoss(50, 24, backend="reference")
    plain = loss_fn(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = loss_fn(x.bfloat16(), y)
    assert under.dtype == torch.float32 and not torch.equal(under, plain)
    assert abs(float(under.detach()) - float(plain.detach())) < 0.05 * abs(float(plain.detach()))
    under.backward()
    assert loss_fn.W.grad.dtype == torch.float32 and torch.isfinite(loss_fn.W.grad).all()


def test_16bit_embeddings_with_a_float32_weight():
    """bf16 embeddings and a float32 weight: an error naming compute_dtype without it; with it, the products in bf16
    and the embeddings' gradient in bf16."""
    x, w, y = _problem()
    margin = marginops.CosFace(s=16.0)
    with pytest.raises(TypeError, match="compute_dtype"):
        marginops.margin_cross_entropy(x.bfloat16(), w, y, margin, backend="reference")
    xb = x.bfloat16().requires_grad_(True)
    loss = marginops.margin_cross_entropy(xb, w, y, margin, backend="reference", compute_dtype=torch.bfloat16)
    loss.backward()
    assert loss.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
    same = marginops.margin_cross_entropy(
        xb.detach().float(), w, y, margin, backend="reference", compute_dtype=torch.bfloat16
    )
    torch.testing.assert_close(loss.detach(), same, rtol=0, atol=0)


def test_bad_compute_dtype():
    x, w, y = _problem()
    margin = marginops.ArcFace()
    with pytest.raises(TypeError, match="compute_dtype must be"):
        marginops.margin_cross_entropy(x, w, y, margin, compute_dtype=torch.int32)
    with pytest.raises(ValueError, match="does not fit a torch.float64 weight"):
        marginops.margin_cross_entropy(x.double(), w.double(), y, margin, compute_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="does not fit a torch.bfloat16 weight"):
        marginops.margin_cross_entropy(x.bfloat16(), w.bfloat16(), y, margin, compute_dtype=torch.float16)
    with pytest.raises(TypeError, match="compute_dtype must be"):
        mnn.ArcFaceLoss(8, 10, compute_dtype="bf16")
    from marginops import distributed as mdist

    with pytest.raises(TypeError, match="compute_dtype must be"):
        mdist.DistributedMarginLoss(margin, 8, 10, compute_dtype=torch.int8)
    head = mdist.DistributedMarginLoss(margin, 24, 50, backend="reference", compute_dtype=torch.bfloat16).double()
    with pytest.raises(ValueError, match="does not fit a torch.float64 weight"):
        head(x.double(), y.clamp_min(0))


def test_backend_without_mixed_precision_warns_once_and_runs_the_weight_dtype():
    ops._warn_once.cache_clear()
    w = torch.zeros(3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [functional.compute_dtype_on("cuda_fused", torch.bfloat16, w) for _ in range(2)]
    assert got == [torch.float32, torch.float32]
    assert len([c for c in caught if "runs the head in the weight's dtype" in str(c.message)]) == 1
    assert functional.compute_dtype_on("cuda", torch.bfloat16, w) == torch.bfloat16
    assert functional.compute_dtype_on("cuda_fused", None, w) == torch.float32


@pytest.mark.emulator
def test_chunked_path_never_holds_a_16bit_copy_of_the_weight(monkeypatch):
    """The chunked CUDA path (chunk loop on CPU tensors, epilogue under the emulator) casts each chunk's rows as it
    uses them: no allocation as large as a 16-bit copy of all of W in its forward or backward."""
    import cuda_emulator
    from op_cases import Case

    monkeypatch.setenv("MARGINOPS_CHUNK_COLS", "64")
    C, D = 1000, 64
    case = Case(B=9, D=D, C=C).on(torch.bfloat16, weight_dtype=torch.float32)
    op = cuda_emulator.EmulatedChunkedOps(cuda_emulator.load())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        lse, _ = op.fused_lse(*case.args(), True)
        grads = op.fused_lse_backward(case.grad, lse, *case.args(), True)
    assert grads[1].dtype == torch.float32 and grads[0].dtype == torch.bfloat16
    sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert sizes, "the profiler saw no allocation"
    assert max(s for s in sizes if s != C * D * 4) < C * D * 2, sorted(sizes)[-5:]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("make", list(EVERY_MODULE.values()), ids=list(EVERY_MODULE))
def test_every_module_under_cpu_autocast(make, mode):
    """Every loss module under torch.autocast("cpu", bf16), two steps: the same loss, state and gradients as the
    module run with compute_dtype=torch.bfloat16 on the float32 embeddings; loss and weight gradient float32."""
    import copy

    torch.manual_seed(0)
    under, explicit = make(), None
    under.train(mode == "train")
    explicit = copy.deepcopy(under)
    explicit.compute_dtype = torch.bfloat16
    x = torch.randn(8, 16)
    y = torch.randint(0, 30, (8,))
    for step in range(2):
        emb = (x * (1.0 + step)).bfloat16()  # what an autocast backbone hands over
        torch.manual_seed(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = under(emb, y)
        torch.manual_seed(step)
        expected = explicit(emb.float(), y)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, expected, rtol=0, atol=0)
        loss.backward()
        expected.backward()
        assert under.weight.grad.dtype == torch.float32
        torch.testing.assert_close(under.weight.grad, explicit.weight.grad, rtol=0, atol=0)
    for (name, a), (_, b) in zip(sorted(under.state_dict().items()), sorted(explicit.state_dict().items())):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
