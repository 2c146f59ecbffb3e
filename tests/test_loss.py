"""Every kernel backend against the float64 reference: margins × reductions × ignore rows × dtypes × shapes."""

import math

import pytest
import torch
from helpers import (
    KERNEL_BACKENDS,
    assert_close,
    assert_within_reference_error,
    device_for,
    loss_and_grads,
    make_problem,
    margin_id,
    margins_under_test,
)

import marginops

MARGINS = margins_under_test()
REDUCTIONS = ["mean", "sum", "none"]


def _compare_to_reference(backend, margin, reduction, dtype, shape, ignore_rows, **kwargs):
    batch, dim, classes = shape
    device = device_for(backend)
    emb, weight, labels = make_problem(batch, dim, classes, ignore_rows=ignore_rows, subcenters=margin.subcenters)
    truth = loss_and_grads(emb, weight, labels, margin, reduction=reduction, backend="reference", **kwargs)
    got = loss_and_grads(
        emb.to(device, dtype),
        weight.to(device, dtype),
        labels.to(device),
        margin,
        reduction=reduction,
        backend=backend,
        **kwargs,
    )
    names = ("loss", "grad embeddings", "grad weight")
    if dtype == torch.float64:
        for name, g, t in zip(names, got, truth):
            assert g.dtype == torch.float64
            assert_close(name, g, t, rtol=1e-9, atol=1e-10)
    else:
        same_dtype = loss_and_grads(
            emb.to(dtype), weight.to(dtype), labels, margin, reduction=reduction, backend="reference", **kwargs
        )
        for name, g, t, r in zip(names, got, truth, same_dtype):
            assert g.dtype == dtype
            scale = t.abs().max().item()
            assert_within_reference_error(name, g, t, r, slack=1e-5 * max(scale, 1e-3))


@pytest.mark.parametrize("margin", MARGINS, ids=margin_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cpu_matches_reference(margin, reduction, dtype):
    _compare_to_reference("cpu", margin, reduction, dtype, (37, 61, 1001), ignore_rows=(3, 20))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("margin", MARGINS, ids=margin_id)
def test_backend_matches_reference_every_margin(backend, margin):
    # Triton on the CPU interpreter is slow: a smaller class count, still ragged
    classes = 1001 if backend != "triton" or device_for(backend).type == "cuda" else 203
    _compare_to_reference(backend, margin, "mean", torch.float32, (19, 37, classes), ignore_rows=(2,))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backend_matches_reference_every_reduction_f64(backend, reduction):
    if backend == "triton" and device_for(backend).type == "cpu":
        shape = (13, 29, 157)
    else:
        shape = (37, 61, 1001)
    _compare_to_reference(backend, marginops.ArcFace(s=30.0), reduction, torch.float64, shape, ignore_rows=(1, 5))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_interclass_filtering(backend):
    margin = marginops.CosFace(s=30.0, m=0.35)
    _compare_to_reference(
        backend, margin, "mean", torch.float64, (17, 23, 211), ignore_rows=(4,), interclass_filtering_threshold=0.2
    )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_subcenters(backend):
    margin = marginops.SubCenterArcFace(s=30.0, m=0.5, k=3)
    _compare_to_reference(backend, margin, "mean", torch.float64, (17, 23, 97), ignore_rows=(0,))


def test_many_chunks_f64():
    """Enough classes that the CPU kernel streams over many class chunks and merges them."""
    margin = marginops.CurricularFace(s=64.0, m=0.5, t=0.2)
    _compare_to_reference("cpu", margin, "mean", torch.float64, (24, 16, 40_000), ignore_rows=(7,))


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
@pytest.mark.parametrize("margin", MARGINS, ids=margin_id)
def test_finite_gradients_at_cosine_plus_minus_one(backend, margin):
    """c = ±1 exactly: an embedding equal to its class weight, one opposite to it, and a class weight
    that equals another row's embedding (c = 1 in a non-target column)."""
    device = device_for(backend) if backend != "reference" else torch.device("cpu")
    weight = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    emb = torch.tensor([[3.0, 0.0, 0.0], [0.0, -2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])
    weight = weight.repeat_interleave(margin.subcenters, dim=0)  # k identical sub-centers: ties at c = ±1 too
    for dtype in (torch.float64, torch.float32):
        loss, g_emb, g_w = loss_and_grads(
            emb.to(device, dtype), weight.to(device, dtype), labels.to(device), margin, backend=backend
        )
        for name, t in (("loss", loss), ("grad embeddings", g_emb), ("grad weight", g_w)):
            assert torch.isfinite(t).all(), f"{name} not finite at c = ±1 ({dtype}): {t}"


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_ignored_rows_contribute_nothing(backend):
    device = device_for(backend) if backend != "reference" else torch.device("cpu")
    emb, weight, labels = make_problem(9, 11, 57, dtype=torch.float64, device=device, ignore_rows=(0, 4, 8))
    per_row, g_emb, _ = loss_and_grads(emb, weight, labels, marginops.ArcFace(), reduction="none", backend=backend)
    assert (per_row[[0, 4, 8]] == 0).all()
    assert (g_emb[[0, 4, 8]] == 0).all()
    kept = labels != -100
    mean = marginops.margin_cross_entropy(emb, weight, labels, marginops.ArcFace(), backend=backend)
    assert_close("mean over counted rows", mean, per_row[kept].mean(), rtol=1e-12, atol=0)


def test_all_rows_ignored_gives_nan_mean_like_cross_entropy():
    emb, weight, labels = make_problem(4, 5, 7, ignore_rows=(0, 1, 2, 3))
    loss = marginops.margin_cross_entropy(emb, weight, labels, marginops.CosFace(), backend="cpu")
    assert torch.isnan(loss)
    assert marginops.margin_cross_entropy(emb, weight, labels, marginops.CosFace(), reduction="sum", backend="cpu") == 0


def test_nan_embeddings_propagate_without_hanging():
    emb, weight, labels = make_problem(6, 8, 500, dtype=torch.float32)
    emb[2, 3] = float("nan")
    per_row = marginops.margin_cross_entropy(emb, weight, labels, marginops.ArcFace(), reduction="none", backend="cpu")
    assert torch.isnan(per_row[2])
    assert torch.isfinite(per_row[[0, 1, 3, 4, 5]]).all()


def test_non_contiguous_inputs_and_int32_labels():
    emb, weight, labels = make_problem(10, 12, 300)
    truth = marginops.margin_cross_entropy(emb, weight, labels, marginops.ArcFace(), backend="reference")
    emb_strided = torch.stack([emb, emb], dim=2).reshape(10, 24)[:, ::2]  # same values, stride 2
    weight_t = weight.t().contiguous().t()  # column-major view
    assert not emb_strided.is_contiguous() and not weight_t.is_contiguous()
    got = marginops.margin_cross_entropy(emb_strided, weight_t, labels.int(), marginops.ArcFace(), backend="cpu")
    assert_close("loss", got, truth, rtol=1e-12, atol=1e-12)


def test_auto_backend_on_cpu_uses_the_fused_kernels():
    assert marginops.ops.resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_psi_formulas_against_acos_definitions():
    """The stable target formulas agree with the textbook ones away from the boundary."""
    c = torch.linspace(-0.999, 0.999, 2001, dtype=torch.float64)
    th = torch.acos(c)
    m = 0.5
    arc = marginops.ArcFace(s=1.0, m=m).psi(c)
    expected = torch.where(th <= math.pi - m, torch.cos(th + m), c - m * math.sin(m))
    assert_close("ArcFace psi", arc, expected, rtol=0, atol=1e-9)
    easy = marginops.ArcFace(s=1.0, m=m, easy_margin=True).psi(c)
    assert_close("ArcFace easy psi", easy, torch.where(c > 0, torch.cos(th + m), c), rtol=0, atol=1e-9)
    comb = marginops.CombinedMargin(s=1.0, m1=0.9, m2=0.4, m3=0.15).psi(c)
    assert_close("CombinedMargin psi", comb, torch.cos(0.9 * th + 0.4) - 0.15, rtol=0, atol=1e-9)
    for mm in (1, 2, 3, 4):
        k = torch.floor(mm * th / math.pi)
        big_psi = (-1.0) ** k * torch.cos(mm * th) - 2 * k
        lam = 2.0
        sphere = marginops.SphereFace(m=mm, lambda_=lam).psi(c)
        assert_close(f"SphereFace m={mm} psi", sphere, (big_psi + lam * c) / (1 + lam), rtol=0, atol=1e-9)
    curr = marginops.CurricularFace(s=1.0, m=m)
    assert_close("CurricularFace threshold", curr.threshold(c), torch.cos(th + m), rtol=0, atol=1e-9)
    assert_close("CosFace psi", marginops.CosFace(s=1.0, m=0.35).psi(c), c - 0.35, rtol=0, atol=0)


def test_reference_matches_hand_computed_logits():
    """The oracle itself against a loop over rows written straight from docs/DESIGN.md §1 (CurricularFace)."""
    emb, weight, labels = make_problem(5, 7, 13)
    s, m, t = 10.0, 0.5, 0.25
    loss = marginops.reference.margin_cross_entropy(
        emb, weight, labels, marginops.CurricularFace(s, m, t), reduction="none"
    )
    xn = emb / emb.norm(dim=1, keepdim=True)
    wn = weight / weight.norm(dim=1, keepdim=True)
    for i in range(5):
        cos = wn @ xn[i]
        th_y = torch.acos(cos[labels[i]])
        target = math.cos(th_y + m) if th_y <= math.pi - m else cos[labels[i]] - m * math.sin(m)
        logits = [s * (c * (t + c) if c > math.cos(th_y + m) else c) for c in cos.tolist()]
        logits[labels[i]] = s * target
        expected = torch.logsumexp(torch.tensor(logits, dtype=torch.float64), 0) - s * target
        assert abs(loss[i].item() - expected.item()) < 1e-10
