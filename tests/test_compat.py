"""Drop-in classes against the behaviour they promise: pytorch-metric-learning's and insightface's losses.

The oracles here are materialized re-statements of each library's documented computation (logits from
normalized weights, the library's target formula, cross-entropy), written for these tests.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, make_problem

import marginops
from marginops.compat import insightface, pml


@functools.lru_cache(maxsize=None)
def _cpu_unavailable():
    from marginops import _build

    return _build.build_failure("cpu")


BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.skipif("_cpu_unavailable() is not None", reason="C++ extension unavailable")),
]


def _pml_style_loss(emb, W, labels, target_fn, logit_scale):
    """pml's LargeMarginSoftmax recipe: cosines to W's columns, the target replaced, scaled, mean CE."""
    cos = F.normalize(emb, dim=1) @ F.normalize(W, dim=0)
    mask = F.one_hot(labels, W.shape[1]).bool()
    logits = torch.where(mask, target_fn(cos[mask])[:, None], cos)
    return F.cross_entropy(logits * logit_scale(emb), labels)


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return (loss.detach(), *[t.grad for t in leaves])


# ------------------------------------------------------------------------------------------------ pml


@pytest.mark.parametrize("backend", BACKENDS)
def test_pml_arcface_degrees_and_formula(backend):
    emb, weight, labels = make_problem(13, 10, 37, seed=1)
    loss_fn = pml.ArcFaceLoss(37, 10, backend=backend).double()
    assert loss_fn.W.shape == (10, 37) and loss_fn.W.t().is_contiguous()
    assert loss_fn.margin == pytest.approx(math.radians(28.6)) and loss_fn.scale == 64
    with torch.no_grad():
        loss_fn.W.copy_(weight.t())
    m = math.radians(28.6)

    def target(c):
        angle = torch.acos(c.clamp(-1, 1))
        return torch.where(angle <= math.pi - m, torch.cos(angle + m), c - m * math.sin(m))

    expected, exp_emb_grad, exp_w_grad = _grads(
        lambda e, w: _pml_style_loss(e, w, labels, target, lambda _: 64.0), emb, weight.t()
    )
    e = emb.clone().requires_grad_(True)
    loss = loss_fn(e, labels)
    loss.backward()
    assert_close("pml ArcFace loss", loss, expected, rtol=1e-10, atol=1e-10)
    assert_close("embedding grad", e.grad, exp_emb_grad, rtol=1e-8, atol=1e-10)
    assert loss_fn.W.grad.shape == (10, 37) and loss_fn.W.grad.t().is_contiguous(), "grad keeps W's layout"
    assert_close("W grad", loss_fn.W.grad, exp_w_grad, rtol=1e-8, atol=1e-10)
    # the promise in the issue: our ArcFace with m = radians(28.6), s = 64 on W.t()
    ours = marginops.margin_cross_entropy(emb, weight, labels, marginops.ArcFace(s=64.0, m=m), backend="reference")
    assert_close("equals marginops.ArcFace", loss, ours, rtol=1e-10, atol=1e-10)


def test_pml_cosface_and_sphereface_formulas():
    emb, weight, labels = make_problem(11, 8, 23, seed=2)
    cos_fn = pml.CosFaceLoss(23, 8, margin=0.3, scale=30, backend="reference").double()
    with torch.no_grad():
        cos_fn.W.copy_(weight.t())
    expected = _pml_style_loss(emb, weight.t(), labels, lambda c: c - 0.3, lambda _: 30.0)
    assert_close("pml CosFace", cos_fn(emb, labels), expected, rtol=1e-10, atol=1e-10)

    sphere = pml.SphereFaceLoss(23, 8, margin=4.7, scale=0.5, backend="reference").double()  # pml: int(4.7) = 4
    assert sphere.margin == 4
    with torch.no_grad():
        sphere.W.copy_(weight.t())

    def psi(c):  # pml: (−1)^k·cos(mθ) − 2k, k = ⌊θ/(π/m)⌋
        angle = torch.acos(c.clamp(-1, 1))
        k = torch.floor(angle / (math.pi / 4))
        return (-1.0) ** k * torch.cos(4 * angle) - 2 * k

    expected = _pml_style_loss(emb, weight.t(), labels, psi, lambda e: e.norm(dim=1, keepdim=True) * 0.5)
    assert_close("pml SphereFace", sphere(emb, labels), expected, rtol=1e-9, atol=1e-9)
    logits = sphere.get_logits(emb)
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).t()
    assert_close("get_logits", logits, cos * emb.norm(dim=1, keepdim=True) * 0.5, rtol=1e-10, atol=1e-10)


def test_pml_miner_weights_and_weight_regularizer():
    emb, weight, labels = make_problem(8, 6, 15, seed=3)
    reg = lambda w: w.pow(2).sum(1).mean()  # noqa: E731  (a pml regularizer is a callable on (C, D) weights)
    loss_fn = pml.CosFaceLoss(15, 6, backend="reference", weight_regularizer=reg, weight_reg_weight=0.1).double()
    with torch.no_grad():
        loss_fn.W.copy_(weight.t())
    per_row = marginops.margin_cross_entropy(
        emb, weight, labels, marginops.CosFace(s=64, m=0.35), reduction="none", backend="reference"
    )
    anchors, positives, negatives = torch.tensor([0, 0, 2]), torch.tensor([1, 3, 3]), torch.tensor([5, 5, 5])
    counts = torch.zeros(8, dtype=torch.float64)
    for i in torch.cat([anchors, positives, negatives]).tolist():
        counts[i] += 1
    expected = (per_row * counts / counts.max()).mean() + 0.1 * reg(weight)
    got = loss_fn(emb, labels, indices_tuple=(anchors, positives, negatives))
    assert_close("miner-weighted loss + regularizer", got, expected, rtol=1e-10, atol=1e-10)
    assert_close("no miner", loss_fn(emb, labels), per_row.mean() + 0.1 * reg(weight), rtol=1e-10, atol=1e-10)


def test_pml_weight_layout_state_dict_and_optimizer():
    torch.manual_seed(4)
    loss_fn = pml.ArcFaceLoss(30, 7, backend="reference")
    state = loss_fn.state_dict()
    assert list(state) == ["W"] and state["W"].shape == (7, 30)
    # a pml checkpoint: a plain row-major (embedding_size, num_classes) tensor
    checkpoint = torch.randn(7, 30)
    loss_fn.load_state_dict({"W": checkpoint})
    assert torch.equal(loss_fn.W, checkpoint) and loss_fn.W.t().is_contiguous()
    double = loss_fn.double()
    assert double.W.dtype == torch.float64 and double.W.t().is_contiguous(), ".to() keeps the layout"

    emb, _, labels = make_problem(9, 7, 30, seed=5)
    optimizer = torch.optim.SGD(loss_fn.parameters(), lr=0.5, momentum=0.9)
    plain = torch.nn.Parameter(loss_fn.W.detach().clone().contiguous())
    plain_opt = torch.optim.SGD([plain], lr=0.5, momentum=0.9)
    for _ in range(2):
        optimizer.zero_grad()
        loss_fn(emb, labels).backward()
        optimizer.step()
        plain_opt.zero_grad()
        marginops.margin_cross_entropy(emb, plain.t(), labels, loss_fn.margin_spec(), backend="reference").backward()
        plain_opt.step()
    assert loss_fn.W.t().is_contiguous()
    assert_close("SGD on the column-major W", loss_fn.W, plain, rtol=1e-12, atol=1e-12)

    # somebody assigns a row-major tensor to W.data: converted back once, with a warning, same loss
    before = loss_fn(emb, labels)
    loss_fn.W.data = loss_fn.W.data.contiguous()
    with pytest.warns(RuntimeWarning, match="column-major"):
        after = loss_fn(emb, labels)
    assert loss_fn.W.t().is_contiguous()
    assert_close("loss after relayout", after, before, rtol=0, atol=0)


def test_pml_rejects_what_it_does_not_support():
    with pytest.raises(TypeError, match="reducer"):
        pml.ArcFaceLoss(10, 4, reducer=object())

    class LpDistance:
        pass

    with pytest.raises(ValueError, match="CosineSimilarity"):
        pml.CosFaceLoss(10, 4, distance=LpDistance())

    class CosineSimilarity:
        normalize_embeddings = True

    pml.CosFaceLoss(10, 4, distance=CosineSimilarity())  # pml's default distance is accepted
    loss_fn = pml.CosFaceLoss(10, 4, backend="reference")
    with pytest.raises(ValueError, match="ref_emb"):
        loss_fn(torch.randn(3, 4), torch.tensor([1, 2, 3]), ref_emb=torch.randn(3, 4))


def test_pml_labels_must_be_a_tensor():
    """pml's losses take tensors only; a list is a TypeError that says so (was an AttributeError on .to)."""
    loss_fn = pml.CosFaceLoss(10, 4, backend="reference")
    with pytest.raises(TypeError, match=r"labels must be a torch\.Tensor.*got list"):
        loss_fn(torch.randn(3, 4), [1, 2, 3])
    with pytest.raises(TypeError, match=r"embeddings must be a torch\.Tensor.*got list"):
        loss_fn([[0.0] * 4] * 3, torch.tensor([1, 2, 3]))


def test_pml_malformed_indices_tuple_raises():
    """Where pml raises on a miner's output (e.g. torch.cat of a 2-D and a 1-D tensor), so does the compat layer,
    instead of flattening it into weights; what pml's miners return still works."""
    emb, _, labels = make_problem(6, 4, 10, seed=7)
    loss_fn = pml.CosFaceLoss(10, 4, backend="reference").double()
    idx = torch.tensor
    bad = {
        "2-D member": (
            (idx([[0, 1], [2, 3]]), idx([1, 2]), idx([3, 4])),
            ValueError,
            r"indices_tuple\[0\] must be 1-D",
        ),
        "two members": ((idx([0, 1]), idx([2, 3])), ValueError, "3 or 4 index tensors, .* got 2"),
        "triplet lengths": ((idx([0, 1]), idx([2, 3]), idx([4])), ValueError, "equal lengths"),
        "pair lengths": ((idx([0]), idx([1, 2]), idx([3]), idx([4])), ValueError, "equal lengths"),
        "out of batch": ((idx([0]), idx([6]), idx([1])), ValueError, r"outside \[0, 6\)"),
        "negative": ((idx([-1]), idx([2]), idx([1])), ValueError, r"outside \[0, 6\)"),
        "float indices": ((idx([0.0]), idx([1.0]), idx([2.0])), TypeError, "integer batch indices"),
        "not tensors": (([0], [1], [2]), TypeError, r"indices_tuple\[0\] must be a torch\.Tensor"),
        "not a tuple": (idx([0, 1, 2]), TypeError, "tuple of index tensors"),
    }
    for name, (indices_tuple, error, message) in bad.items():
        with pytest.raises(error, match=message):
            loss_fn(emb, labels, indices_tuple=indices_tuple)

    # what pml's miners return: triplets, pairs whose positive and negative halves differ in length, nothing found
    plain = loss_fn(emb, labels)
    pairs = (idx([0, 0]), idx([1, 2]), idx([3]), idx([4]))
    weights = pml.miner_weights(pairs, labels, torch.float64)
    assert weights.tolist() == [1.0, 0.5, 0.5, 0.5, 0.5, 0.0]
    assert torch.isfinite(loss_fn(emb, labels, indices_tuple=pairs))
    empty = (torch.tensor([]),) * 3  # pml's convert_to_triplets returns float empties when nothing is found
    assert_close("empty miner output", loss_fn(emb, labels, indices_tuple=empty), plain, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- insightface


def _insightface_margin(logits, labels, s, m1, m2, m3, threshold=0.0):
    """insightface's CombinedMarginLoss.forward, re-stated: filtering, then the ArcFace branch's no-grad
    arccos/cos (value cos(θ + m2), gradient of the identity) or the CosFace branch, times s."""
    rows = torch.nonzero(labels != -1).flatten()
    cols = labels[rows]
    if threshold > 0:
        with torch.no_grad():
            keep = (logits <= threshold).to(logits.dtype)
            keep[rows, cols] = 1.0
        logits = logits * keep
    out = logits.clone()
    target = logits[rows, cols]
    if m1 == 1.0 and m3 == 0.0:
        with torch.no_grad():
            shifted = torch.cos(torch.acos(target) + m2)
        out[rows, cols] = target + (shifted - target).detach()
    else:
        out[rows, cols] = target - m3
    return out * s


def _materialized_partial_fc(margin_module, emb, weight, labels):
    cos = F.linear(F.normalize(emb), F.normalize(weight)).clamp(-1, 1)
    return F.cross_entropy(margin_module(cos, labels), labels)


@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (1.0, 0.0, 0.0)], ids=["arc", "cos", "norm"])
@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_combined_margin_module_on_logits_matches_insightface(margins, threshold):
    emb, weight, labels = make_problem(10, 8, 21, seed=6)
    labels[3] = -1  # insightface: target not in these columns
    cos = (F.normalize(emb) @ F.normalize(weight).t()).clamp(-1, 1)
    module = insightface.CombinedMarginLoss(32.0, *margins, interclass_filtering_threshold=threshold)
    upstream = torch.linspace(0, 1, 21, dtype=cos.dtype)  # a non-uniform weight per column
    got, got_grad = _grads(lambda c: (module(c, labels) * upstream).sum(), cos)
    restated = functools.partial(_insightface_margin, labels=labels, s=32.0, threshold=threshold)
    want, want_grad = _grads(lambda c: (restated(c, m1=margins[0], m2=margins[1], m3=margins[2]) * upstream).sum(), cos)
    assert_close("margined logits", got, want, rtol=1e-12, atol=1e-10)
    assert_close("gradient through the logits", got_grad, want_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("detach_margin", [True, False])
def test_partial_fc_v2_single_rank_matches_materialized_insightface(backend, detach_margin):
    emb, weight, labels = make_problem(12, 9, 31, seed=7)
    margin_loss = insightface.CombinedMarginLoss(
        64.0, 1.0, 0.5, 0.0, interclass_filtering_threshold=0.4, detach_margin=detach_margin
    )
    module = insightface.PartialFC_V2(margin_loss, 9, 31, sample_rate=1.0, backend=backend).double()
    assert (module.world_size, module.class_start, module.num_local) == (1, 0, 31)
    with torch.no_grad():
        module.weight.copy_(weight)
    e = emb.clone().requires_grad_(True)
    got = module(e, labels.view(-1, 1))  # insightface passes (B, 1) labels
    got.backward()
    got_emb_grad, got_w_grad = e.grad, module.weight.grad
    if detach_margin:  # insightface's historical computation
        want, want_emb_grad, want_w_grad = _grads(
            lambda e, w: _materialized_partial_fc(margin_loss, e, w, labels), emb, weight
        )
    else:  # exact gradients of s·cos(θ + m2), no fallback: marginops.CombinedMargin
        want, want_emb_grad, want_w_grad = _grads(
            lambda e, w: marginops.margin_cross_entropy(
                e,
                w,
                labels,
                marginops.CombinedMargin(64.0, 1.0, 0.5, 0.0),
                backend="reference",
                interclass_filtering_threshold=0.4,
            ),
            emb,
            weight,
        )
    assert_close("loss", got, want, rtol=1e-9, atol=1e-9)
    assert_close("embedding grad", got_emb_grad, want_emb_grad, rtol=1e-7, atol=1e-9)
    assert_close("weight grad", got_w_grad, want_w_grad, rtol=1e-7, atol=1e-9)


def test_detached_margin_differs_from_exact_only_in_gradient():
    emb, weight, labels = make_problem(9, 6, 17, seed=8)
    detached = insightface.CombinedMarginLoss(64.0, 1.0, 0.5, 0.0).margin_spec()
    exact = insightface.CombinedMarginLoss(64.0, 1.0, 0.5, 0.0, detach_margin=False).margin_spec()
    a = _grads(lambda e: marginops.margin_cross_entropy(e, weight, labels, detached, backend="reference"), emb)
    b = _grads(lambda e: marginops.margin_cross_entropy(e, weight, labels, exact, backend="reference"), emb)
    assert_close("same loss value", a[0], b[0], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a[1], b[1]), "the detached margin must change the gradient"


def test_partial_fc_v2_sampling_state_dict_and_foreign_margin_modules():
    emb, weight, labels = make_problem(16, 8, 40, seed=9)
    module = (
        insightface.PartialFC_V2(
            insightface.CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 40, sample_rate=0.25, backend="reference"
        )
        .double()
        .train()
    )
    assert module.num_sample == 10
    state = module.state_dict()
    assert list(state) == ["weight", "_extra_state"] and state["_extra_state"]["layout"]["num_classes"] == 40
    module.load_state_dict({"weight": weight}, strict=True)  # insightface's checkpoint of a one-rank run
    e = emb.clone().requires_grad_(True)
    module(e, labels).backward()
    index = module.weight_index
    assert bool(torch.isin(torch.unique(labels), index).all()), "every positive class is sampled"
    assert index.numel() == max(10, torch.unique(labels).numel())
    unsampled = torch.ones(40, dtype=torch.bool)
    unsampled[index] = False
    assert bool((module.weight.grad[unsampled] == 0).all())

    class CombinedMarginLoss(torch.nn.Module):  # stand-in for insightface's own module (same attributes)
        def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
            super().__init__()
            self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
            self.interclass_filtering_threshold = interclass_filtering_threshold

    theirs = insightface.PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.0, 0.4, 0.3), 8, 40, backend="reference").double()
    ours = insightface.PartialFC_V2(
        insightface.CombinedMarginLoss(64, 1.0, 0.0, 0.4, 0.3), 8, 40, backend="reference"
    ).double()
    assert theirs.margin == marginops.CosFace(s=64.0, m=0.4) and theirs.interclass_filtering_threshold == 0.3
    ours.load_state_dict(theirs.state_dict())
    assert_close("foreign margin module", theirs(emb, labels), ours(emb, labels), rtol=0, atol=0)
    with pytest.raises(TypeError, match="margin_loss"):
        insightface.PartialFC_V2(object(), 8, 40)
    with pytest.warns(UserWarning, match="ignores m1, m2"):
        insightface.CombinedMarginLoss(64, 1.0, 0.5, 0.35)
