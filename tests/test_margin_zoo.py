"""AdaFace, ElasticFace, MagFace, Sub-center ArcFace, training stats and the pair losses, each against
its formula written out independently here (acos-based, float64), not against the implementation."""

import math

import pytest
import torch
from helpers import KERNEL_BACKENDS, assert_close, device_for, make_problem

import marginops


def _target_cos_and_norm(emb, weight, labels):
    xn = emb.norm(dim=1)
    cos = torch.nn.functional.cosine_similarity(emb, weight[labels], dim=1)
    return cos, xn


def _loss_from_target(emb, weight, labels, target_logit, s, extra=None):
    cos = torch.nn.functional.normalize(emb) @ torch.nn.functional.normalize(weight).t()
    logits = s * cos
    logits[torch.arange(len(labels)), labels] = target_logit
    loss = torch.logsumexp(logits, 1) - target_logit
    return loss if extra is None else loss + extra


def test_adaface_against_formula():
    emb, weight, labels = make_problem(9, 12, 40)
    s, m, h, mu, sigma = 30.0, 0.4, 0.333, 20.0, 6.0
    cos, xn = _target_cos_and_norm(emb, weight, labels)
    z = xn.clamp(0.001, 100)
    scaler = (h * (z - mu) / (sigma + 0.001)).clamp(-1, 1)
    angle = (torch.acos(cos) - m * scaler).clamp(0.001, math.pi - 0.001)
    target = s * (torch.cos(angle) - (m + m * scaler))
    expected = _loss_from_target(emb, weight, labels, target, s)
    got = marginops.margin_cross_entropy(
        emb, weight, labels, marginops.AdaFace(s, m, h, batch_mean=mu, batch_std=sigma), reduction="none", backend="cpu"
    )
    assert_close("AdaFace loss", got, expected, rtol=1e-10, atol=1e-10)


def test_adaface_module_ema():
    loss_fn = marginops.nn.AdaFaceLoss(12, 40, s=30.0, backend="cpu").double()
    emb, _, labels = make_problem(9, 12, 40)
    labels[0] = -100
    z = emb[1:].norm(dim=1).clamp(0.001, 100)
    loss_fn(emb, labels)
    assert float(loss_fn.batch_mean) == pytest.approx(0.01 * z.mean().item() + 0.99 * 20.0)
    assert float(loss_fn.batch_std) == pytest.approx(0.01 * z.std().item() + 0.99 * 100.0)
    loss_fn.eval()
    before = loss_fn.state_dict()["batch_mean"].clone()
    loss_fn(emb, labels)
    assert loss_fn.batch_mean == before


def test_elasticface_draws_are_seeded_and_match_formula():
    emb, weight, labels = make_problem(10, 12, 30)
    cos, _ = _target_cos_and_norm(emb, weight, labels)
    for kind, plus in (("arc", False), ("cos", False), ("arc", True)):
        margin = marginops.ElasticFace(30.0, 0.5, 0.05, kind, plus, torch.Generator().manual_seed(7))
        got = marginops.margin_cross_entropy(emb, weight, labels, margin, reduction="none", backend="cpu")
        m = torch.randn(10, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 0.05 + 0.5
        if plus:  # smallest margin to the highest target cosine
            ordered = torch.empty_like(m)
            ordered[torch.argsort(cos, descending=True)] = torch.sort(m).values
            m = ordered
        target = 30.0 * (torch.cos(torch.acos(cos) + m) if kind == "arc" else cos - m)
        assert_close(
            f"ElasticFace {kind} plus={plus}",
            got,
            _loss_from_target(emb, weight, labels, target, 30.0),
            rtol=1e-10,
            atol=1e-10,
        )
    a = marginops.margin_cross_entropy(
        emb, weight, labels, marginops.ElasticFace(generator=torch.Generator().manual_seed(1)), backend="cpu"
    )
    b = marginops.margin_cross_entropy(
        emb, weight, labels, marginops.ElasticFace(generator=torch.Generator().manual_seed(1)), backend="cpu"
    )
    assert a == b


def test_elasticface_module_eval_uses_mean_margin():
    loss_fn = marginops.nn.ElasticFaceLoss(12, 30, s=30.0, m=0.5, backend="cpu").double().eval()
    emb, _, labels = make_problem(10, 12, 30)
    cos, _ = _target_cos_and_norm(emb, loss_fn.weight.detach(), labels)
    target = 30.0 * torch.cos(torch.acos(cos) + 0.5)
    expected = _loss_from_target(emb, loss_fn.weight.detach(), labels, target, 30.0).mean()
    assert_close("eval loss", loss_fn(emb, labels), expected, rtol=1e-10, atol=1e-10)


def test_magface_against_formula_and_norm_gradient():
    emb, weight, labels = make_problem(9, 12, 40)
    emb = emb * torch.linspace(0.2, 6.0, 9, dtype=torch.float64)[:, None]  # norms across [l_a, u_a] and beyond
    mf = marginops.MagFace(s=30.0)
    cos, xn = _target_cos_and_norm(emb, weight, labels)
    a = xn.clamp(10, 110)
    m = (0.8 - 0.45) / 100 * (a - 10) + 0.45
    target = 30.0 * torch.where(cos > 0, torch.cos(torch.acos(cos) + m), cos)
    reg = 35.0 * (a / 110**2 + 1 / a)
    expected = _loss_from_target(emb, weight, labels, target, 30.0, extra=reg)
    got = marginops.margin_cross_entropy(emb, weight, labels, mf, reduction="none", backend="cpu")
    assert_close("MagFace loss", got, expected, rtol=1e-10, atol=1e-10)
    e = emb[:3].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: marginops.margin_cross_entropy(t, weight, labels[:3], mf, reduction="none", backend="cpu"), (e,)
    )


@pytest.mark.parametrize(
    "margin",
    [
        marginops.AdaFace(s=8.0, batch_mean=10.0, batch_std=3.0),
        marginops.MagFace(s=8.0),
        marginops.SubCenterArcFace(s=8.0, k=2),
        marginops.ElasticFace(s=8.0, sample=False),
    ],
    ids=["adaface", "magface", "subcenter", "elastic"],
)
def test_gradcheck_new_margins(margin):
    emb, weight, labels = make_problem(5, 6, 7, subcenters=margin.subcenters, ignore_rows=(1,))
    emb = emb * 4
    weight.requires_grad_(True)
    # AdaFace's margin reads a detached norm (by design), so its loss is differentiated exactly only in W
    emb.requires_grad_(not isinstance(margin, marginops.AdaFace))
    assert torch.autograd.gradcheck(
        lambda e, w: marginops.margin_cross_entropy(e, w, labels, margin, reduction="sum", backend="cpu"), (emb, weight)
    )


def test_subcenter_cosine_is_max_and_dominant_helper():
    emb, weight, labels = make_problem(30, 8, 5, subcenters=3)
    w3 = torch.nn.functional.normalize(weight).reshape(5, 3, 8)
    x = torch.nn.functional.normalize(emb)
    cos = torch.einsum("bd,ckd->bck", x, w3)
    s, m = 20.0, 0.5
    class_cos = cos.max(2).values
    logits = s * class_cos
    c_y = class_cos[torch.arange(30), labels]
    target = s * torch.where(torch.acos(c_y) <= math.pi - m, torch.cos(torch.acos(c_y) + m), c_y - m * math.sin(m))
    logits[torch.arange(30), labels] = target
    expected = torch.logsumexp(logits, 1) - target
    got = marginops.margin_cross_entropy(
        emb, weight, labels, marginops.SubCenterArcFace(s, m, 3), reduction="none", backend="cpu"
    )
    assert_close("sub-center loss", got, expected, rtol=1e-10, atol=1e-10)
    dominant, counts = marginops.margins.dominant_subcenters(emb, weight, labels, 3)
    chosen = cos[torch.arange(30), labels].argmax(1)
    for c in range(5):
        picks = chosen[labels == c]
        if picks.numel():
            assert counts[c].tolist() == torch.bincount(picks, minlength=3).tolist()
            assert dominant[c] == counts[c].argmax()
        else:
            assert dominant[c] == -1


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_return_stats(backend):
    device = device_for(backend) if backend != "reference" else torch.device("cpu")
    emb, weight, labels = make_problem(12, 10, 50, device=device, ignore_rows=(3,))
    loss, stats = marginops.margin_cross_entropy(
        emb, weight, labels, marginops.ArcFace(s=20.0), backend=backend, return_stats=True
    )
    truth_loss, truth = marginops.margin_cross_entropy(
        emb, weight, labels, marginops.ArcFace(s=20.0), backend="reference", return_stats=True
    )
    cos = torch.nn.functional.normalize(emb) @ torch.nn.functional.normalize(weight).t()
    assert_close("loss", loss, truth_loss, rtol=1e-10, atol=1e-10)
    assert_close("lse", stats.lse, truth.lse, rtol=1e-10, atol=1e-10)
    assert torch.equal(stats.predicted.cpu(), cos.argmax(1).cpu())
    keep = labels != -100
    assert_close("cos_target", stats.cos_target[keep], cos[keep, labels[keep]], rtol=1e-10, atol=1e-12)
    assert stats.cos_target[3] == 0
    expected_acc = (cos.argmax(1) == labels)[keep].double().mean()
    assert_close("accuracy", stats.accuracy, expected_acc, rtol=1e-6, atol=0)


def test_pair_losses_against_loops():
    emb, _, labels = make_problem(12, 6, 4)
    x = torch.nn.functional.normalize(emb)
    total, count = 0.0, 0
    for i in range(12):
        for j in range(i + 1, 12):
            d = (x[i] - x[j]).norm()
            total += d**2 if labels[i] == labels[j] else max(0.0, 0.5 - d.item()) ** 2
            count += 1
    assert marginops.contrastive_loss(emb, labels, margin=0.5).item() == pytest.approx(float(total) / count)
    losses = []
    for a in range(12):
        pos = [(x[a] - x[p]).norm().item() for p in range(12) if p != a and labels[p] == labels[a]]
        neg = [(x[a] - x[n]).norm().item() for n in range(12) if labels[n] != labels[a]]
        if pos and neg:
            losses.append(max(0.0, max(pos) - min(neg) + 0.2))
    assert marginops.batch_hard_triplet_loss(emb, labels, margin=0.2).item() == pytest.approx(sum(losses) / len(losses))
    e = emb.clone().requires_grad_(True)
    marginops.nn.TripletLoss()(e, labels).backward()
    marginops.nn.ContrastiveLoss()(torch.cat([e, e[:1]]), torch.cat([labels, labels[:1]])).backward()
    assert torch.isfinite(e.grad).all()
