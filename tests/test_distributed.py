"""Class-parallel loss over torch.distributed (gloo, CPU): equal to single-process training on the global batch.

One spawn per world size (2 and 3 ranks) runs every case below on every backend present, in float64; each
rank compares its loss, its embedding gradient and its shard's weight gradient with the reference on the
concatenated batch and writes its verdicts to a file; the parametrized tests read them.  All collectives
of a case run before its assertions, so a failing check cannot leave another rank waiting.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist

import marginops
from marginops import distributed as mdist
from marginops.compat import insightface

# one spawned job per world size serves every test of the module: keep them in one test process
pytestmark = pytest.mark.xdist_group("distributed")

SCALE_UPSTREAM = 1.3  # backward of loss * 1.3: a wrong factor anywhere shows up


# ----------------------------------------------------------------------------------------------------------
# helpers used inside the workers


def problem(seed, batch, dim, classes, label_high=None, ignore=()):
    """float64 embeddings pulled towards their class (so margins bite), weights, labels < label_high."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, label_high or classes, (batch,), generator=gen)
    weight = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    emb = torch.randn(batch, dim, generator=gen, dtype=torch.float64) * 3.0
    emb = emb + torch.rand(batch, 1, generator=gen, dtype=torch.float64) * 4.0 * weight[labels]
    for r in ignore:
        labels[r] = -100
    return emb, weight, labels


def offsets(sizes, rank):
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def reference_loss_grads(emb, weight, labels, margin, **kwargs):
    e = emb.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = marginops.margin_cross_entropy(e, w, labels, margin, backend="reference", **kwargs)
    (loss * SCALE_UPSTREAM).backward()
    return loss.detach(), e.grad, w.grad


def make_module(margin, weight, backend, **kwargs):
    module = mdist.DistributedMarginLoss(margin, weight.shape[1], weight.shape[0], backend=backend, **kwargs).double()
    with torch.no_grad():
        module.weight.copy_(weight[module.class_start : module.class_start + module.num_local])
    return module


def distributed_loss_grads(module, emb, labels, sizes, rank):
    lo, hi = offsets(sizes, rank)
    e = emb[lo:hi].clone().requires_grad_(True)
    loss = module(e, labels[lo:hi])
    (loss * SCALE_UPSTREAM).backward()
    return loss.detach(), e.grad


def close(name, actual, expected, rtol=1e-9, atol=1e-11):
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~torch.isclose(actual, expected, rtol=rtol, atol=atol)
    if bool(bad.any()):
        diff = (actual - expected).abs()
        worst = int(diff.flatten().argmax())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} differ; worst at flat index {worst}: "
            f"{actual.flatten()[worst].item():.12g} vs {expected.flatten()[worst].item():.12g}"
        )


def check_against_reference(rank, world, backend, margin, emb, weight, labels, sizes, **loss_kwargs):
    module = make_module(margin, weight, backend, **loss_kwargs)
    loss, emb_grad = distributed_loss_grads(module, emb, labels, sizes, rank)
    ref_loss, ref_emb_grad, ref_w_grad = reference_loss_grads(emb, weight, labels, margin, **loss_kwargs)
    lo, hi = offsets(sizes, rank)
    close("loss", loss, ref_loss)
    # DDP averages backbone gradients over ranks: each rank holds world × its rows of the global gradient
    close("embedding grad", emb_grad, world * ref_emb_grad[lo:hi])
    start, n = module.class_start, module.num_local
    assert module.weight.grad is not None, "shard weight got no gradient"
    close("shard weight grad", module.weight.grad, ref_w_grad[start : start + n])
    return module


# ----------------------------------------------------------------------------------------------------------
# the cases (each runs on every rank; (rank, world, backend) -> None or raise)


def case_arcface_no_positive_on_last_rank(rank, world, backend):
    classes = 23  # not divisible by 2 or 3
    last_start, _ = mdist.shard_range(classes, world, world - 1)
    sizes = [5] * world
    emb, weight, labels = problem(11, sum(sizes), 11, classes, label_high=last_start, ignore=(1, 7))
    check_against_reference(rank, world, backend, marginops.ArcFace(s=16.0, m=0.5), emb, weight, labels, sizes)


def case_cosface_uneven_batches(rank, world, backend):
    sizes = [6, 3, 4][:world]
    emb, weight, labels = problem(12, sum(sizes), 9, 31)
    check_against_reference(rank, world, backend, marginops.CosFace(s=20.0, m=0.35), emb, weight, labels, sizes)


def case_sphereface_row_scale(rank, world, backend):
    sizes = [4] * world
    emb, weight, labels = problem(13, sum(sizes), 8, 19, ignore=(0,))
    check_against_reference(rank, world, backend, marginops.SphereFace(m=4, lambda_=2.0), emb, weight, labels, sizes)


def case_combined_filter(rank, world, backend):
    sizes = [5] * world
    emb, weight, labels = problem(14, sum(sizes), 6, 17)
    check_against_reference(
        rank,
        world,
        backend,
        marginops.CombinedMargin(s=12.0, m1=0.9, m2=0.3, m3=0.1),
        emb,
        weight,
        labels,
        sizes,
        interclass_filtering_threshold=0.2,
    )


def case_arcface_detached_margin(rank, world, backend):
    sizes = [4] * world
    emb, weight, labels = problem(15, sum(sizes), 7, 13)
    check_against_reference(
        rank, world, backend, marginops.ArcFace(s=16.0, m=0.5, detach_margin=True), emb, weight, labels, sizes
    )


def case_margin_zoo_magface_adaface_subcenter(rank, world, backend):
    sizes = [4] * world
    emb, weight, labels = problem(24, sum(sizes), 6, 14, ignore=(5,))
    emb = emb * 4.0  # norms inside MagFace's [l_a, u_a] band so that its margin and regularizer move
    for margin in (marginops.MagFace(s=16.0), marginops.AdaFace(s=16.0, batch_mean=15.0, batch_std=5.0)):
        check_against_reference(rank, world, backend, margin, emb, weight, labels, sizes)
    k = 2
    sub_weight = torch.randn(14 * k, 6, generator=torch.Generator().manual_seed(25), dtype=torch.float64)
    margin = marginops.SubCenterArcFace(s=16.0, m=0.5, k=k)
    module = mdist.DistributedMarginLoss(margin, 6, 14, backend=backend).double()
    rows = slice(module.class_start * k, (module.class_start + module.num_local) * k)
    with torch.no_grad():
        module.weight.copy_(sub_weight[rows])
    loss, emb_grad = distributed_loss_grads(module, emb, labels, sizes, rank)
    ref_loss, ref_emb_grad, ref_w_grad = reference_loss_grads(emb, sub_weight, labels, margin)
    lo, hi = offsets(sizes, rank)
    close("sub-center loss", loss, ref_loss)
    close("sub-center embedding grad", emb_grad, world * ref_emb_grad[lo:hi])
    close("sub-center shard weight grad", module.weight.grad, ref_w_grad[rows])


def case_elasticface_plus_same_generator_everywhere(rank, world, backend):
    sizes = [5] * world
    emb, weight, labels = problem(26, sum(sizes), 7, 19, ignore=(3,))
    spec = marginops.ElasticFace(s=16.0, m=0.5, std=0.1, plus=True, generator=torch.Generator().manual_seed(9))
    module = make_module(spec, weight, backend)
    loss, emb_grad = distributed_loss_grads(module, emb, labels, sizes, rank)
    ref_spec = marginops.ElasticFace(s=16.0, m=0.5, std=0.1, plus=True, generator=torch.Generator().manual_seed(9))
    ref_loss, ref_emb_grad, ref_w_grad = reference_loss_grads(emb, weight, labels, ref_spec)
    lo, hi = offsets(sizes, rank)
    close("loss", loss, ref_loss)
    close("embedding grad", emb_grad, world * ref_emb_grad[lo:hi])
    shard = slice(module.class_start, module.class_start + module.num_local)
    close("shard weight grad", module.weight.grad, ref_w_grad[shard])


def case_more_ranks_than_classes(rank, world, backend):
    classes = world - 1  # the last rank owns no class at all
    sizes = [3] * world
    emb, weight, labels = problem(16, sum(sizes), 5, classes)
    module = check_against_reference(rank, world, backend, marginops.CosFace(s=8.0), emb, weight, labels, sizes)
    assert module.num_local == (0 if rank == world - 1 else 1)


def case_curricular_t_identical_everywhere(rank, world, backend):
    sizes = [5] * world
    emb, weight, labels = problem(17, sum(sizes), 8, 21, ignore=(2,))
    module = make_module(marginops.CurricularFace(s=16.0, m=0.5), weight, backend).train()
    single = marginops.nn.CurricularFaceLoss(8, 21, s=16.0, m=0.5, backend="reference").double().train()
    with torch.no_grad():
        single.weight.copy_(weight)
    results = []
    for step in range(2):  # t moves: the second step uses a t built from two all-reduced means
        module.weight.grad = None
        single.weight.grad = None
        loss, emb_grad = distributed_loss_grads(module, emb + 0.1 * step, labels, sizes, rank)
        e = (emb + 0.1 * step).clone().requires_grad_(True)
        ref_loss = single(e, labels)
        (ref_loss * SCALE_UPSTREAM).backward()
        results.append(
            (loss, emb_grad, module.weight.grad.clone(), ref_loss.detach(), e.grad, single.weight.grad.clone())
        )
    ts = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
    dist.all_gather(ts, module.t.detach().clone())
    lo, hi = offsets(sizes, rank)
    start, n = module.class_start, module.num_local
    for loss, emb_grad, w_grad, ref_loss, ref_emb_grad, ref_w_grad in results:
        close("loss", loss, ref_loss)
        close("embedding grad", emb_grad, world * ref_emb_grad[lo:hi])
        close("shard weight grad", w_grad, ref_w_grad[start : start + n])
    close("t vs single process", module.t, single.t)
    assert all(bool(t == ts[0]) for t in ts), f"t differs between ranks: {[float(t) for t in ts]}"


def case_ddp_backbone_equals_single_process(rank, world, backend):
    if world != 2:  # DDP's constructor imports torch._dynamo (seconds per process); one world size is enough
        return
    from torch.nn.parallel import DistributedDataParallel

    sizes = [4] * world
    gen = torch.Generator().manual_seed(18)
    inputs = torch.randn(sum(sizes), 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 15, (sum(sizes),), generator=gen)
    weight = torch.randn(15, 5, generator=gen, dtype=torch.float64)
    torch.manual_seed(0)  # same backbone initialization on every rank (DDP also broadcasts rank 0's)
    backbone = torch.nn.Linear(6, 5).double()
    reference_backbone = torch.nn.Linear(6, 5).double()
    reference_backbone.load_state_dict(backbone.state_dict())
    ddp = DistributedDataParallel(backbone)
    margin = marginops.ArcFace(s=16.0, m=0.5)
    head = make_module(margin, weight, backend)
    lo, hi = offsets(sizes, rank)
    loss = head(ddp(inputs[lo:hi]), labels[lo:hi])
    loss.backward()

    w = weight.clone().requires_grad_(True)
    ref_loss = marginops.margin_cross_entropy(reference_backbone(inputs), w, labels, margin, backend="reference")
    ref_loss.backward()
    close("loss", loss, ref_loss)
    close("backbone weight grad (DDP-averaged)", backbone.weight.grad, reference_backbone.weight.grad)
    close("backbone bias grad (DDP-averaged)", backbone.bias.grad, reference_backbone.bias.grad)
    close("shard weight grad", head.weight.grad, w.grad[head.class_start : head.class_start + head.num_local])


def case_partial_fc_equals_unsharded_on_sampled_classes(rank, world, backend):
    classes, rate = 41, 0.4
    sizes = [5] * world
    emb, weight, labels = problem(19, sum(sizes), 7, classes, ignore=(3,))
    module = make_module(marginops.ArcFace(s=16.0, m=0.5), weight, backend, sample_rate=rate, seed=5).train()
    loss, emb_grad = distributed_loss_grads(module, emb, labels, sizes, rank)
    index = module.weight_index
    gathered = [None] * world
    dist.all_gather_object(gathered, (module.class_start + index).tolist())

    start, n = module.class_start, module.num_local
    valid = labels != -100
    positives = torch.unique(labels[valid & (labels >= start) & (labels < start + n)]) - start
    assert bool(torch.isin(positives, index).all()), "a positive class was not sampled"
    assert index.numel() == max(int(rate * n), positives.numel()), (index.numel(), n, positives.numel())
    assert bool((index[1:] > index[:-1]).all()), "weight_index must be sorted and unique"
    unsampled = torch.ones(n, dtype=torch.bool)
    unsampled[index] = False
    assert bool((module.weight.grad[unsampled] == 0).all()), "unsampled rows must get exactly zero gradient"
    assert bool((module.weight.grad[index].abs().sum(1) > 0).any())

    # the same loss as the single-process reference on the sampled classes only
    sampled = torch.tensor(sum(gathered, []))
    sub_labels = torch.where(valid, torch.searchsorted(sampled, labels), labels)
    ref_loss, ref_emb_grad, ref_w_grad = reference_loss_grads(emb, weight[sampled], sub_labels, module.margin)
    lo, hi = offsets(sizes, rank)
    close("loss", loss, ref_loss)
    close("embedding grad", emb_grad, world * ref_emb_grad[lo:hi])
    mine = (sampled >= start) & (sampled < start + n)
    close("sampled rows' weight grad", module.weight.grad[index], ref_w_grad[mine])


def case_partial_fc_reproducible_and_resumable(rank, world, backend):
    classes = 60
    sizes = [4] * world
    emb, weight, labels = problem(20, sum(sizes), 6, classes)
    margin = marginops.CosFace(s=10.0)
    runs = []
    for _ in range(2):
        module = make_module(margin, weight, backend, sample_rate=0.3, seed=7).train()
        steps = []
        for _ in range(3):
            loss, _ = distributed_loss_grads(module, emb, labels, sizes, rank)
            steps.append((loss, module.weight_index.clone(), module.weight.grad.clone()))
            module.weight.grad = None
        runs.append((module, steps))
    (first, a), (_, b) = runs
    for (la, ia, ga), (lb, ib, gb) in zip(a, b):
        assert torch.equal(ia, ib), "same seed, same step: the sample must be the same"
        assert torch.equal(la, lb) and torch.equal(ga, gb), "same sample: bitwise identical loss and gradients"
    assert any(not torch.equal(a[0][1], s[1]) for s in a[1:]), "the sample should change from step to step"

    resumed = make_module(margin, weight, backend, sample_rate=0.3, seed=7).train()
    resumed.load_state_dict(first.state_dict())
    other_seed = make_module(margin, weight, backend, sample_rate=0.3, seed=8).train()
    next_first, _ = distributed_loss_grads(first, emb, labels, sizes, rank)
    next_resumed, _ = distributed_loss_grads(resumed, emb, labels, sizes, rank)
    distributed_loss_grads(other_seed, emb, labels, sizes, rank)
    assert first.sample_step == resumed.sample_step == 4
    assert torch.equal(first.weight_index, resumed.weight_index), "state_dict must carry the sampling step"
    assert torch.equal(next_first, next_resumed)
    if first.num_local > 10:
        assert not torch.equal(first.weight_index, other_seed.weight_index)

    first.eval()  # eval mode: every class, no sampling
    distributed_loss_grads(first, emb, labels, sizes, rank)
    assert first.weight_index is None


def case_insightface_partial_fc_v2(rank, world, backend):
    classes = 29
    sizes = [4] * world
    emb, weight, labels = problem(21, sum(sizes), 8, classes)
    margin_loss = insightface.CombinedMarginLoss(16.0, 1.0, 0.5, 0.0)
    module = insightface.PartialFC_V2(margin_loss, 8, classes, sample_rate=1.0, backend=backend).double()
    assert (module.class_start, module.num_local) == mdist.shard_range(classes, world, rank)
    with torch.no_grad():
        module.weight.copy_(weight[module.class_start : module.class_start + module.num_local])
    loss, emb_grad = distributed_loss_grads(module, emb, labels.view(-1, 1), sizes, rank)
    # insightface's computation, materialized: cosines, its margin module on the logits, mean cross-entropy
    e = emb.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    cos = torch.nn.functional.linear(torch.nn.functional.normalize(e), torch.nn.functional.normalize(w)).clamp(-1, 1)
    ref_loss = torch.nn.functional.cross_entropy(margin_loss(cos, labels), labels)
    (ref_loss * SCALE_UPSTREAM).backward()
    lo, hi = offsets(sizes, rank)
    close("loss", loss, ref_loss, rtol=1e-9, atol=1e-9)
    close("embedding grad", emb_grad, world * e.grad[lo:hi], atol=1e-9)
    close(
        "shard weight grad",
        module.weight.grad,
        w.grad[module.class_start : module.class_start + module.num_local],
        atol=1e-9,
    )


def case_return_stats_equal_single_process(rank, world, backend):
    """return_stats: global-batch lse, target cosine, prediction (incl. a row whose best class sits on another
    rank than its label, and ties) and accuracy equal the single-process head's."""
    sizes = [5, 3, 4][:world]
    classes = 17
    emb, weight, labels = problem(31, sum(sizes), 8, classes, ignore=(2,))
    weight[9] = weight[4]  # an exact tie between classes on (with 2-3 ranks) different shards: lower class wins
    emb[6] = weight[4] / weight[4].norm()
    margin = marginops.CosFace(s=16.0, m=0.2)
    module = make_module(margin, weight, backend)
    lo, hi = offsets(sizes, rank)
    loss, stats = module(emb[lo:hi], labels[lo:hi], return_stats=True)
    ref_loss, ref = marginops.margin_cross_entropy(emb, weight, labels, margin, backend="reference", return_stats=True)
    close("loss", loss, ref_loss)
    close("lse", stats.lse, ref.lse)
    close("cos_target", stats.cos_target, ref.cos_target)
    assert torch.equal(stats.predicted, ref.predicted), f"{stats.predicted.tolist()} vs {ref.predicted.tolist()}"
    assert int(stats.predicted[6]) == 4
    close("accuracy", stats.accuracy, ref.accuracy)


def case_bad_input_raises_on_every_rank(rank, world, backend):
    sizes = [3] * world
    emb, weight, labels = problem(22, sum(sizes), 5, 10)
    module = make_module(marginops.CosFace(s=8.0), weight, backend)
    lo, hi = offsets(sizes, rank)
    bad_labels = labels[lo:hi].clone()
    if rank == 0:
        bad_labels[0] = 10  # out of range on one rank only
    with pytest_raises(ValueError, "labels out of range"):
        module(emb[lo:hi], bad_labels)
    bad_emb = emb[lo:hi, :4] if rank == world - 1 else emb[lo:hi]  # wrong embedding size on one rank
    with pytest_raises(ValueError, "invalid inputs" if rank != world - 1 else "local_embeddings must be"):
        module(bad_emb, labels[lo:hi])
    # still in step afterwards
    loss = module(emb[lo:hi], labels[lo:hi])
    assert torch.isfinite(loss)


def case_handshake_mismatch_raises_on_every_rank(rank, world, backend):
    """Ranks built differently: the same ValueError everywhere (before: gloo SIGABRT for embedding_size, a
    finite loss for num_classes or the margin)."""
    sizes = [3] * world
    last = rank == world - 1
    variants = [  # (what the last rank changes, kwargs for DistributedMarginLoss, the name in the message)
        (
            "embedding_size",
            dict(margin=marginops.ArcFace(s=8.0), embedding_size=6 if last else 5, num_classes=10),
            "embedding_size",
        ),
        (
            "num_classes",
            dict(margin=marginops.ArcFace(s=8.0), embedding_size=5, num_classes=11 if last else 10),
            "num_classes",
        ),
        (
            "margin class",
            dict(
                margin=marginops.SubCenterArcFace(s=8.0, k=2) if last else marginops.ArcFace(s=8.0),
                embedding_size=5,
                num_classes=10,
            ),
            "SubCenterArcFace",
        ),
        (
            "margin parameter",
            dict(margin=marginops.ArcFace(s=8.0, m=0.3 if last else 0.5), embedding_size=5, num_classes=10),
            "margin.m",
        ),
        (
            "sample_rate",
            dict(margin=marginops.ArcFace(s=8.0), embedding_size=5, num_classes=10, sample_rate=0.5 if last else 1.0),
            "sample_rate",
        ),
    ]
    messages = []
    for what, kwargs, name in variants:
        module = mdist.DistributedMarginLoss(backend=backend, **kwargs).double()
        emb, _, labels = problem(30, sum(sizes), module.embedding_size, 10)
        lo, hi = offsets(sizes, rank)
        with pytest_raises(ValueError, name) as raised:
            module(emb[lo:hi], labels[lo:hi])
        assert "built the head differently" in str(raised.value), (what, str(raised.value))
        messages.append(str(raised.value))
    # dtype: float32 on the last rank
    module = mdist.DistributedMarginLoss(marginops.CosFace(s=8.0), 5, 10, backend=backend)
    module = module.float() if last else module.double()
    emb, _, labels = problem(31, sum(sizes), 5, 10)
    lo, hi = offsets(sizes, rank)
    with pytest_raises(ValueError, "weight dtype") as raised:
        module(emb[lo:hi], labels[lo:hi])
    messages.append(str(raised.value))
    # every rank got the same text: gather their hashes
    digest = torch.tensor([zlib.crc32("\n".join(messages).encode())], dtype=torch.int64)
    digests = [torch.zeros_like(digest) for _ in range(world)]
    dist.all_gather(digests, digest)
    assert all(int(d) == int(digest) for d in digests), "ranks raised different messages"
    # after load_state_dict: the last rank resumes from a checkpoint with another CurricularFace t
    emb, weight, labels = problem(33, sum(sizes), 5, 10)
    module = make_module(marginops.CurricularFace(s=8.0), weight, backend)
    assert torch.isfinite(module(emb[lo:hi], labels[lo:hi]))
    if last:
        state = module.state_dict()
        state["t"] = state["t"] + 0.25
        module.load_state_dict(state)
    with pytest_raises(ValueError, "margin.t"):
        module(emb[lo:hi], labels[lo:hi])
    # still in step afterwards, and the compat PartialFC_V2 shakes hands too
    emb, weight, labels = problem(32, sum(sizes), 5, 10)
    good = make_module(marginops.ArcFace(s=8.0), weight, backend)
    assert torch.isfinite(good(emb[lo:hi], labels[lo:hi]))
    head = insightface.PartialFC_V2(
        insightface.CombinedMarginLoss(8.0, 1.0, 0.5 if last else 0.4, 0.0), 5, 10, backend=backend
    ).double()
    with pytest_raises(ValueError, "margin.m2"):
        head(emb[lo:hi], labels[lo:hi])


def case_handshake_compares_precision_backend_mode(rank, world, backend):
    """The handshake also compares what trains differently without failing: the products' dtype (compute_dtype,
    PartialFC_V2's fp16), the resolved backend, deterministic, train / eval (Partial FC samples on one rank
    only), and CurricularFace's curricular_alpha — the same error on every rank, naming the field."""
    sizes = [3] * world
    last = rank == world - 1
    other_backend = "reference" if backend != "reference" else "cpu"
    lo, hi = offsets(sizes, rank)

    def head(margin=None, **kwargs):
        return mdist.DistributedMarginLoss(margin or marginops.ArcFace(s=8.0), 5, 10, backend=backend, **kwargs)

    variants = [  # (module on this rank, the field's name in the message)
        (head(compute_dtype=torch.bfloat16 if last else None), "compute dtype"),
        (
            insightface.PartialFC_V2(
                insightface.CombinedMarginLoss(8.0, 1.0, 0.5, 0.0), 5, 10, fp16=last, backend=backend
            ),
            "compute dtype",
        ),
        (
            mdist.DistributedMarginLoss(marginops.ArcFace(s=8.0), 5, 10, backend=other_backend if last else backend),
            "backend",
        ),
        (head(deterministic=not last), "deterministic"),
        (head(sample_rate=0.5).train() if not last else head(sample_rate=0.5).eval(), "training mode"),
        (head(marginops.CurricularFace(s=8.0), curricular_alpha=0.02 if last else 0.01), "curricular_alpha"),
    ]
    messages = []
    emb, _, labels = problem(34, sum(sizes), 5, 10)
    emb = emb.float()
    for module, name in variants:
        with pytest_raises(ValueError, name) as raised:
            module(emb[lo:hi], labels[lo:hi])
        assert "built the head differently" in str(raised.value), (name, str(raised.value))
        messages.append(str(raised.value))
    digest = torch.tensor([zlib.crc32("\n".join(messages).encode())], dtype=torch.int64)
    digests = [torch.zeros_like(digest) for _ in range(world)]
    dist.all_gather(digests, digest)
    assert all(int(d) == int(digest) for d in digests), "ranks raised different messages"
    # not compared where it changes nothing: curricular_alpha without CurricularFace, None vs the weight's dtype
    for module in (head(curricular_alpha=0.02 if last else 0.01), head(compute_dtype=torch.float32 if last else None)):
        assert torch.isfinite(module(emb[lo:hi], labels[lo:hi]))


def case_one_host_read_per_step(rank, world, backend):
    """A training step (forward and backward) of the distributed head reads tensor data on the host once: the
    handshake's all-gather, which also carries the label range check and CurricularFace's t (whose update is
    sync-free); Partial FC's sampling adds its two (see tests/test_host_reads.py)."""
    from test_host_reads import PARTIAL_FC_READS_PER_STEP, READS_PER_STEP, count_host_reads

    sizes = [4] * world
    emb, weight, labels = problem(60, sum(sizes), 6, 23, ignore=(1,))
    found = []
    for margin, rate, expected in (
        (marginops.ArcFace(s=16.0), 1.0, READS_PER_STEP),
        (marginops.CurricularFace(s=16.0), 1.0, READS_PER_STEP),
        (marginops.ArcFace(s=16.0), 0.5, PARTIAL_FC_READS_PER_STEP),
    ):
        module = make_module(margin, weight, backend, sample_rate=rate).train()
        distributed_loss_grads(module, emb, labels, sizes, rank)  # not counted: first-use work
        with count_host_reads() as counts:
            distributed_loss_grads(module, emb, labels, sizes, rank)
        found.append((type(margin).__name__, rate, expected, dict(counts)))
    for name, rate, expected, counts in found:
        assert sum(counts.values()) == expected, (name, rate, counts)


def case_reshard_full_state_dict_to_fewer_ranks(rank, world, backend):
    """Train a step on `world` ranks, gather the whole head, resume on world − 1 ranks (3 → 2, 2 → 1): the
    second step equals single-process training of both steps; the same for the compat PartialFC_V2."""
    lr, classes, dim = 0.5, 13, 6
    fewer = world - 1
    sub = dist.new_group(list(range(fewer)))  # every rank takes part in creating it
    sizes_all, sizes_sub = [3] * world, [3 * world // fewer + (r < (3 * world) % fewer) for r in range(fewer)]
    emb, weight, labels = problem(40, sum(sizes_all), dim, classes, ignore=(2,))
    emb2, _, labels2 = problem(41, sum(sizes_all), dim, classes)
    for kind in ("head", "partial_fc"):
        margin = marginops.ArcFace(s=8.0, m=0.4)
        if kind == "head":

            def build(group):
                return mdist.DistributedMarginLoss(margin, dim, classes, process_group=group, backend=backend).double()
        else:

            def build(group):
                return insightface.PartialFC_V2(
                    insightface.CombinedMarginLoss(8.0, 1.0, 0.4, 0.0, detach_margin=False),
                    dim,
                    classes,
                    process_group=group,
                    backend=backend,
                ).double()

        # single process: two SGD steps on the whole head
        w = weight.clone().requires_grad_(True)
        marginops.margin_cross_entropy(emb, w, labels, margin, backend="reference").backward()
        w1 = (w - lr * w.grad).detach().requires_grad_(True)
        ref_loss2 = marginops.margin_cross_entropy(emb2, w1, labels2, margin, backend="reference")
        ref_loss2.backward()
        # step 1 on every rank
        head = build(None)
        with torch.no_grad():
            head.weight.copy_(weight[head.class_start : head.class_start + head.num_local])
        lo, hi = offsets(sizes_all, rank)
        head(emb[lo:hi], labels[lo:hi]).backward()
        with torch.no_grad():
            head.weight -= lr * head.weight.grad
        full = head.full_state_dict()
        close(f"{kind}: gathered head after step 1", full["weight"], w1)
        # step 2 on the first world − 1 ranks, from the whole head
        if rank < fewer:
            resumed = build(sub)
            resumed.load_state_dict(full)
            assert resumed.world_size == fewer
            lo, hi = offsets(sizes_sub, rank)
            loss2 = resumed(emb2[lo:hi], labels2[lo:hi])
            loss2.backward()
            close(f"{kind}: loss after resharding", loss2, ref_loss2)
            start, n = resumed.class_start, resumed.num_local
            close(f"{kind}: shard weight grad after resharding", resumed.weight.grad, w1.grad[start : start + n])


def _expect_refusal(module, state, *needles, **kwargs):
    """load_state_dict must raise naming every needle, and leave the head's weight as it was."""
    before = module.weight.detach().clone()
    with pytest_raises(RuntimeError, needles[0]) as raised:
        module.load_state_dict(state, **kwargs)
    for needle in needles[1:]:
        assert needle in str(raised.value), (needle, str(raised.value))
    assert torch.equal(module.weight, before), "a refused checkpoint must not change the head"
    return str(raised.value)


def case_checkpoint_layout_per_rank_shards(rank, world, backend):
    """Per-rank shards record their head, world and class range: saved on every world size 1..world, each loads
    only on the rank and world size that saved it, and a shard of another world size is refused naming the
    difference, also where its row count matches (C = 7: rank 1 of 2 and rank 0 of 3 both hold 3 rows)."""
    classes, dim = 7, 4
    groups = {n: dist.new_group(list(range(n))) for n in range(1, world)}  # every rank creates every group
    groups[world] = None
    kinds = {
        "head": lambda g: mdist.DistributedMarginLoss(marginops.ArcFace(s=8.0), dim, classes, process_group=g),
        "partial_fc": lambda g: insightface.PartialFC_V2(
            insightface.CombinedMarginLoss(8.0, 1.0, 0.5, 0.0), dim, classes, process_group=g
        ),
    }
    for kind, build in kinds.items():
        heads = {n: build(groups[n]).double() if rank < n else None for n in groups}
        for n, head in heads.items():
            if head is not None:
                with torch.no_grad():
                    head.weight.copy_(torch.arange(head.weight.numel(), dtype=torch.float64).view_as(head.weight))
                    head.weight += 100.0 * n + 1000.0 * head.class_start  # each shard's rows differ
                head.sample_step = 3 + n
        mine = {n: head.state_dict() if head is not None else None for n, head in heads.items()}
        saved = [None] * world
        dist.all_gather_object(saved, mine)  # the last collective of this kind: only local loads below
        for n, head in heads.items():
            if head is None:
                continue
            layout = mine[n]["_extra_state"]["layout"]
            assert (layout["num_classes"], layout["world_size"], layout["rank"]) == (classes, n, rank), layout
            assert (layout["class_start"], layout["num_local"]) == (head.class_start, head.num_local), layout
            fresh = build(groups[n]).double()
            fresh.load_state_dict(saved[rank][n])  # its own shard: loads
            assert torch.equal(fresh.weight, head.weight), f"{kind}: own shard on {n} ranks"
            if kind == "head":
                assert fresh.sample_step == 3 + n
            for m in groups:  # every other world size's shards, the same-row-count ones included
                for r in range(m):
                    if (m, r) == (n, rank):
                        continue
                    if m == 1:  # a one-rank run's shard is the whole head: it reshards like full_state_dict()
                        fresh.load_state_dict(saved[0][1])
                        rows = saved[0][1]["weight"][fresh.class_start : fresh.class_start + fresh.num_local]
                        assert torch.equal(fresh.weight, rows), f"{kind}: a one-rank shard on {n} ranks"
                        continue
                    needles = ["per-rank shard loads on the rank and world size that saved it"]
                    needles += [f"world_size {m} in the checkpoint, {n} here"] if m != n else []
                    needles += [f"rank {r} in the checkpoint, {rank} here"] if r != rank else []
                    _expect_refusal(fresh, saved[r][m], *needles)
            # without its layout record (a checkpoint from before, or insightface's): only a whole head loads
            old = {"weight": saved[rank][n]["weight"]}
            if kind == "head":
                old["_extra_state"] = {"sample_step": 1}
            if head.num_local != classes:
                _expect_refusal(fresh, old, "no layout record", f"legacy_shard(state_dict, num_classes={classes}")
                declared = mdist.legacy_shard(old, num_classes=classes, world_size=n, rank=rank)
                fresh.load_state_dict(declared)
                assert torch.equal(fresh.weight, head.weight), f"{kind}: a declared legacy shard"
                if n > 1:  # declared as another rank's: refused like a new checkpoint
                    other = mdist.legacy_shard(
                        {"weight": saved[(rank + 1) % n][n]["weight"]},
                        num_classes=classes,
                        world_size=n,
                        rank=(rank + 1) % n,
                    )
                    _expect_refusal(fresh, other, "per-rank shard", f"rank {(rank + 1) % n} in the checkpoint")
            else:
                fresh.load_state_dict(old)
                assert torch.equal(fresh.weight, head.weight)
        # the C = 7 collision of the issue, by name: rank 0 of 3 refuses rank 1 of 2's 3 rows
        if world == 3 and rank == 0:
            assert heads[3].num_local == 3 and saved[1][2]["weight"].shape[0] == 3
            _expect_refusal(build(None).double(), saved[1][2], "world_size 2 in the checkpoint, 3 here")


def case_checkpoint_layout_whole_heads_subcenters_assign(rank, world, backend):
    """Whole heads (full_state_dict) record num_classes and sub-centres: another head is refused naming the
    difference (C = 10 into C = 20; k = 1 into k = 2, also where the row counts agree); assign=True keeps a
    copy of this rank's rows, not a view of the whole head."""
    dim = 4
    gen = torch.Generator().manual_seed(50)
    heads = {
        "c10": mdist.DistributedMarginLoss(marginops.ArcFace(s=8.0), dim, 10),
        "k1_c10": mdist.DistributedMarginLoss(marginops.ArcFace(s=8.0), dim, 10),
        "k2_c5": mdist.DistributedMarginLoss(marginops.SubCenterArcFace(s=8.0, k=2), dim, 5),
        "pfc_c10": insightface.PartialFC_V2(insightface.CombinedMarginLoss(8.0, 1.0, 0.5, 0.0), dim, 10),
    }
    for head in heads.values():
        head.double()
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen, dtype=torch.float64))
    full = {name: head.full_state_dict() for name, head in heads.items()}  # the collectives, all before the checks
    assert full["c10"]["_extra_state"]["layout"]["whole"] and full["c10"]["weight"].shape == (10, dim)

    _expect_refusal(
        mdist.DistributedMarginLoss(marginops.ArcFace(s=8.0), dim, 20).double(),
        full["c10"],
        "num_classes 10 in the checkpoint, 20 here",
    )
    _expect_refusal(
        insightface.PartialFC_V2(insightface.CombinedMarginLoss(8.0, 1.0, 0.5, 0.0), dim, 20).double(),
        full["pfc_c10"],
        "num_classes 10 in the checkpoint, 20 here",
    )
    # k = 1 (10 rows) into k = 2 heads: of 10 classes (20 rows), and of 5 classes (the same 10 rows)
    for classes in (10, 5):
        sub = mdist.DistributedMarginLoss(marginops.SubCenterArcFace(s=8.0, k=2), dim, classes).double()
        _expect_refusal(sub, full["k1_c10"], "subcenters 1 in the checkpoint, 2 here")
    _expect_refusal(heads["c10"], full["k2_c5"], "subcenters 2 in the checkpoint, 1 here")
    _expect_refusal(
        mdist.DistributedMarginLoss(marginops.ArcFace(s=8.0), dim + 1, 10).double(),
        full["c10"],
        f"embedding_size {dim} in the checkpoint, {dim + 1} here",
    )
    # sub-centres: a whole k = 2 head reshards by class (k rows each)
    sub = mdist.DistributedMarginLoss(marginops.SubCenterArcFace(s=8.0, k=2), dim, 5).double()
    sub.load_state_dict(full["k2_c5"])
    rows = slice(sub.class_start * 2, (sub.class_start + sub.num_local) * 2)
    assert torch.equal(sub.weight, full["k2_c5"]["weight"][rows])
    # assign=True: this rank's rows as a tensor of their own
    fresh = {
        "c10": mdist.DistributedMarginLoss(marginops.ArcFace(s=8.0), dim, 10),
        "pfc_c10": insightface.PartialFC_V2(insightface.CombinedMarginLoss(8.0, 1.0, 0.5, 0.0), dim, 10),
    }
    for name, head in fresh.items():
        whole = full[name]["weight"]
        head.load_state_dict(full[name], assign=True)
        expected = whole[head.class_start : head.class_start + head.num_local].clone()
        assert isinstance(head.weight, torch.nn.Parameter) and head.weight.dtype == torch.float64
        assert torch.equal(head.weight, expected)
        storage = head.weight.untyped_storage()
        assert storage.nbytes() == head.weight.numel() * 8, f"{name}: the shard keeps the whole head's storage"
        assert storage.data_ptr() != whole.untyped_storage().data_ptr()
        assert head.state_dict()["weight"].shape == (head.num_local, dim)
        with torch.no_grad():
            whole.add_(1.0)
        assert torch.equal(head.weight, expected), "assign=True must copy the rows"


class pytest_raises:  # noqa: N801  (pytest.raises without needing pytest's assertion machinery in workers)
    def __init__(self, exc, match):
        self.exc, self.match = exc, match

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            raise AssertionError(f"expected {self.exc.__name__} matching {self.match!r}, nothing raised")
        if not issubclass(exc_type, self.exc) or self.match not in str(exc):
            return False
        self.value = exc
        return True


CASES = {name[len("case_") :]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


# ----------------------------------------------------------------------------------------------------------
# the spawned worker and the pytest side


def _worker(rank, world, init_file, out_dir, backends, cases):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=int(os.environ.get("MARGINOPS_TEST_DIST_TIMEOUT", "60"))),
    )
    results = {}
    try:
        for backend in backends:
            for name in cases:
                fn = CASES[name]
                torch.manual_seed(0)
                start = time.perf_counter()
                try:
                    fn(rank, world, backend)
                    verdict = "ok"
                except Exception:  # report, keep going: the other ranks run the same collectives
                    verdict = traceback.format_exc()
                results[f"{backend}:{name}"] = {"verdict": verdict, "seconds": time.perf_counter() - start}
                dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


BACKENDS = ["reference", "cpu"]


def _selected(session, param):
    """The values of ``param`` among the test_distributed items this session runs."""
    return {
        item.callspec.params[param]
        for item in session.items
        if getattr(item, "originalname", None) == "test_distributed" and hasattr(item, "callspec")
    }


def _selected_backends(session):
    """The backends of the test_distributed items this session runs (so `-k reference` never builds C++)."""
    wanted = _selected(session, "backend")
    found = [b for b in BACKENDS if b in wanted and b != "cpu"]
    if "cpu" in wanted:
        from marginops import _build

        if _build.build_failure("cpu") is None:  # build (or load) once here, not in every worker
            found.append("cpu")
    return found


@pytest.fixture(scope="module")
def run_world(request, tmp_path_factory):
    cache = {}
    backends = _selected_backends(request.session)
    cases = sorted(_selected(request.session, "case"))  # `-k case_name` spawns the workers for that case only

    def run(world):
        if world not in cache:
            import torch.multiprocessing as mp

            out = tmp_path_factory.mktemp(f"world{world}")
            context = mp.start_processes(
                _worker,
                args=(world, str(out / "init"), str(out), backends, cases),
                nprocs=world,
                join=False,
                start_method="spawn",
            )
            deadline = time.monotonic() + 300
            while not context.join(timeout=5):
                if time.monotonic() > deadline:
                    for process in context.processes:
                        if process.is_alive():
                            process.terminate()
                    pytest.fail(f"world {world}: workers did not finish in 300 s")
            cache[world] = ([json.loads((out / f"rank{r}.json").read_text()) for r in range(world)], backends)
        return cache[world]

    return run


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("world", [2, 3])
def test_distributed(run_world, world, case, backend):
    results, backends = run_world(world)
    if backend not in backends:
        pytest.skip(f"backend {backend!r} unavailable (the C++ extension did not build)")
    key = f"{backend}:{case}"
    failures = [f"rank {r}:\n{res[key]['verdict']}" for r, res in enumerate(results) if res[key]["verdict"] != "ok"]
    assert not failures, "\n".join(failures)


def test_shard_ranges_cover_classes_in_order():
    for classes in (1, 2, 7, 23, 1000):
        for world in (1, 2, 3, 8):
            ranges = [mdist.shard_range(classes, world, r) for r in range(world)]
            assert sum(n for _, n in ranges) == classes
            assert all(ranges[r][0] + ranges[r][1] == ranges[r + 1][0] for r in range(world - 1))
            assert max(n for _, n in ranges) - min(n for _, n in ranges) <= 1


def test_single_process_without_init_equals_functional():
    emb, weight, labels = problem(23, 9, 7, 23, ignore=(4,))
    margin = marginops.ArcFace(s=16.0, m=0.5)
    module = make_module(margin, weight, "reference")
    assert (module.world_size, module.rank, module.num_local) == (1, 0, 23)
    loss, emb_grad = distributed_loss_grads(module, emb, labels, [9], 0)
    ref_loss, ref_emb_grad, ref_w_grad = reference_loss_grads(emb, weight, labels, margin)
    close("loss", loss, ref_loss)
    close("embedding grad", emb_grad, ref_emb_grad)
    close("weight grad", module.weight.grad, ref_w_grad)


def test_single_process_labels_of_any_integer_dtype_and_options_checked():
    emb, weight, labels = problem(24, 6, 5, 10)
    module = make_module(marginops.CosFace(s=8.0), weight, "reference")
    expected = module(emb, labels)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.uint16):
        torch.testing.assert_close(module(emb, labels.to(dtype)), expected, rtol=0, atol=0)
    bad = labels.to(torch.uint8)
    bad[2] = 200  # read as ignore_index -100 before (uint8 wraps -100 to 156)
    with pytest.raises(ValueError, match="labels out of range"):
        module(emb, bad)
    with pytest.raises(ValueError, match=r"local_labels must be an integer tensor \(int64.*uint8"):
        module(emb, labels.float())
    with pytest.raises(ValueError, match="curricular_alpha"):
        mdist.DistributedMarginLoss(marginops.CurricularFace(), 5, 10, curricular_alpha=2.0)


def test_single_process_loads_a_whole_head_and_names_a_foreign_shard():
    emb, weight, labels = problem(25, 6, 5, 11)
    module = make_module(marginops.CosFace(s=8.0), weight, "reference")
    full = module.full_state_dict()
    assert torch.equal(full["weight"], weight) and full["weight"].data_ptr() != module.weight.data_ptr()
    other = mdist.DistributedMarginLoss(marginops.CosFace(s=8.0), 5, 11).double()
    other.load_state_dict(full)
    assert torch.equal(other.weight, weight)
    shard = dict(full, weight=weight[:6])  # rank 0's shard of a 2-rank run, under a whole head's record
    with pytest.raises(RuntimeError, match=r"weight has shape \(6, 5\) but its layout record says 11 classes"):
        other.load_state_dict(shard)
    with pytest.raises(RuntimeError, match="weight has 6 rows and no layout record; this rank's shard has 11 rows"):
        other.load_state_dict({"weight": weight[:6]})
    # a checkpoint from before layout records: a whole head loads (its only reading), with assign=True too
    other.load_state_dict({"weight": weight + 1.0, "_extra_state": {"sample_step": 2}})
    assert torch.equal(other.weight, weight + 1.0) and other.sample_step == 2
    other.load_state_dict({"weight": weight + 2.0}, assign=True)
    assert torch.equal(other.weight, weight + 2.0)
