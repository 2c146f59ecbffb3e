"""Loss modules: weight ownership, CurricularFace's t, SphereFace's λ schedule, state_dict."""

import math

import pytest
import torch
from helpers import assert_close, make_problem

import marginops

MODULES = [
    (marginops.nn.NormFaceLoss, marginops.NormFace, {"s": 20.0}),
    (marginops.nn.CosFaceLoss, marginops.CosFace, {"s": 20.0, "m": 0.3}),
    (marginops.nn.ArcFaceLoss, marginops.ArcFace, {"s": 20.0, "m": 0.4}),
    (marginops.nn.CombinedMarginLoss, marginops.CombinedMargin, {"s": 20.0, "m1": 1.0, "m2": 0.3, "m3": 0.1}),
]


@pytest.mark.parametrize("module_cls, margin_cls, params", MODULES, ids=lambda v: getattr(v, "__name__", ""))
def test_stateless_module_equals_functional(module_cls, margin_cls, params):
    emb, _, labels = make_problem(12, 16, 40, dtype=torch.float32)
    loss_fn = module_cls(16, 40, backend="cpu", **params)
    assert loss_fn.weight.shape == (40, 16)
    expected = marginops.margin_cross_entropy(emb, loss_fn.weight, labels, margin_cls(**params), backend="reference")
    assert_close("module loss", loss_fn(emb, labels), expected, rtol=1e-5, atol=1e-5)


def test_curricular_t_is_an_ema_updated_before_use_in_training_only():
    torch.manual_seed(1)
    loss_fn = marginops.nn.CurricularFaceLoss(16, 30, s=20.0, m=0.5, backend="cpu").double()
    emb, _, labels = make_problem(10, 16, 30)
    labels[4] = -100
    keep = labels != -100
    with torch.no_grad():
        cos_y = torch.nn.functional.cosine_similarity(emb[keep], loss_fn.weight[labels[keep]], dim=1)
    t0 = float(loss_fn.t)
    assert t0 == 0.0
    loss = loss_fn(emb, labels)
    t1 = 0.01 * cos_y.mean().item() + 0.99 * t0
    assert math.isclose(float(loss_fn.t), t1, rel_tol=1e-9, abs_tol=1e-12)
    # the updated t is the one used by this very forward
    expected = marginops.margin_cross_entropy(
        emb, loss_fn.weight, labels, marginops.CurricularFace(20.0, 0.5, t1), backend="reference"
    )
    assert_close("loss uses updated t", loss, expected, rtol=1e-10, atol=1e-12)
    loss_fn.eval()
    loss_fn(emb, labels)
    assert float(loss_fn.t) == pytest.approx(t1)
    state = loss_fn.state_dict()
    assert "t" in state
    fresh = marginops.nn.CurricularFaceLoss(16, 30, s=20.0, m=0.5).double()
    fresh.load_state_dict(state)
    assert float(fresh.t) == pytest.approx(t1)


def test_sphereface_lambda_schedule_counts_training_forwards():
    loss_fn = marginops.nn.SphereFaceLoss(8, 20, m=4, backend="cpu")
    emb, _, labels = make_problem(6, 8, 20, dtype=torch.float32)
    assert loss_fn.iteration == 0
    lambdas = []
    for _ in range(3):
        loss_fn(emb, labels)
        lambdas.append(loss_fn.lambda_)
    assert loss_fn.iteration == 3
    assert lambdas == [pytest.approx(1000.0 / (1 + 0.12 * it)) for it in (1, 2, 3)]
    loss_fn.eval()
    loss_fn(emb, labels)
    assert loss_fn.iteration == 3
    loss_fn.iteration = 10_000
    assert loss_fn.lambda_ == 5.0  # floor lambda_min
    fresh = marginops.nn.SphereFaceLoss(8, 20, m=4)
    fresh.load_state_dict(loss_fn.state_dict())
    assert fresh.iteration == 10_000
    expected = marginops.margin_cross_entropy(
        emb, loss_fn.weight, labels, marginops.SphereFace(4, 5.0, 1.0), backend="reference"
    )
    assert_close("eval loss with lambda_min", loss_fn(emb, labels), expected, rtol=1e-5, atol=1e-5)


def test_module_trains():
    """A few SGD steps on a separable problem lower the loss (the whole module is differentiable)."""
    torch.manual_seed(3)
    centers = torch.nn.functional.normalize(torch.randn(10, 16), dim=1)
    labels = torch.randint(0, 10, (64,))
    emb = centers[labels] + 0.3 * torch.randn(64, 16)
    loss_fn = marginops.nn.ArcFaceLoss(16, 10, s=16.0, m=0.3, backend="cpu")
    opt = torch.optim.SGD(loss_fn.parameters(), lr=1.0)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(emb, labels)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_pair_losses_without_pairs_or_usable_anchors_are_zero_with_zero_gradient():
    """The masked forms (no data-dependent branch, for torch.compile) keep the edge values: no pair (one row), no
    anchor with both a positive and a negative (all labels equal, or all different)."""
    emb, _, _ = make_problem(5, 6, 3, dtype=torch.float32)
    for loss_fn, rows, labels in (
        (marginops.contrastive_loss, 1, torch.tensor([2])),
        (marginops.batch_hard_triplet_loss, 1, torch.tensor([2])),
        (marginops.batch_hard_triplet_loss, 5, torch.zeros(5, dtype=torch.long)),
        (marginops.batch_hard_triplet_loss, 5, torch.arange(5)),
    ):
        e = emb[:rows].clone().requires_grad_(True)
        loss = loss_fn(e, labels)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(e.grad, torch.zeros_like(e)), (loss_fn.__name__, labels)
