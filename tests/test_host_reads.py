"""Host reads of tensor data in one training step (forward and backward).

Each read of a tensor's values into Python (``item``, ``bool``, ``tolist``, ...) and each operation whose output
size depends on the data (``nonzero``, ``unique``, boolean-mask indexing) is a device→host synchronization on CUDA:
the CPU waits for the GPU to drain.  A step needs exactly one, the label range check (one fused read: the kernels
must never see a label out of range); Partial FC's sampling two more (its sample size depends on the batch's
classes).  The distributed head's equivalent over 2 and 3 ranks, where the one read is the rank handshake that also
carries the label check and CurricularFace's t, is in tests/test_distributed.py (case_one_host_read_per_step).
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch

import marginops
from marginops import nn as mnn
from marginops.compat import insightface
from marginops.distributed import DistributedMarginLoss

READS_PER_STEP = 1  # the label range check
PARTIAL_FC_READS_PER_STEP = 3  # + the shard's positive classes: a boolean mask and torch.unique

_VALUE_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "numpy")


@contextlib.contextmanager
def count_host_reads():
    """A Counter of host reads (by kind) while the block runs, on every tensor."""
    counts = collections.Counter()
    patched = []

    def patch(owner, name, kind=None, when=None):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            if when is None or when(*args):
                counts[kind or name] += 1
            return original(*args, **kwargs)

        patched.append((owner, name, original))
        setattr(owner, name, counted)

    def bool_mask(_, index, *rest):
        items = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)

    for name in _VALUE_READS:
        patch(torch.Tensor, name)
    for owner in (torch, torch.Tensor):
        patch(owner, "nonzero", "nonzero")
        patch(owner, "unique", "unique")
    patch(torch.Tensor, "__getitem__", "boolean mask", bool_mask)
    patch(torch.Tensor, "__setitem__", "boolean mask", bool_mask)
    try:
        yield counts
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


def _step(module, emb, labels):
    """One training step's forward and backward under the counter (a step before it, so that first-use work such
    as a kernel build or a lazily created buffer is not counted)."""
    module.train()
    module(emb.clone().requires_grad_(True), labels).backward()
    with count_host_reads() as counts:
        module(emb.clone().requires_grad_(True), labels).backward()
    return counts


MODULES = {
    "NormFaceLoss": lambda **kw: mnn.NormFaceLoss(8, 20, s=16.0, **kw),
    "CosFaceLoss": lambda **kw: mnn.CosFaceLoss(8, 20, s=16.0, **kw),
    "ArcFaceLoss": lambda **kw: mnn.ArcFaceLoss(8, 20, s=16.0, **kw),
    "CombinedMarginLoss": lambda **kw: mnn.CombinedMarginLoss(8, 20, s=16.0, m1=0.9, m2=0.3, m3=0.1, **kw),
    "SphereFaceLoss": lambda **kw: mnn.SphereFaceLoss(8, 20, **kw),
    "CurricularFaceLoss": lambda **kw: mnn.CurricularFaceLoss(8, 20, s=16.0, **kw),
    "SubCenterArcFaceLoss": lambda **kw: mnn.SubCenterArcFaceLoss(8, 20, s=16.0, k=2, **kw),
    "AdaFaceLoss": lambda **kw: mnn.AdaFaceLoss(8, 20, s=16.0, **kw),
    "ElasticFaceLoss": lambda **kw: mnn.ElasticFaceLoss(8, 20, s=16.0, plus=True, **kw),
    "MagFaceLoss": lambda **kw: mnn.MagFaceLoss(8, 20, s=16.0, **kw),
}


def _batch():
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 20, (12,), generator=gen)
    labels[4] = -100
    return torch.randn(12, 8, generator=gen) * 5.0, labels


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_one_host_read_per_training_step_of_a_module(name, backend):
    emb, labels = _batch()
    counts = _step(MODULES[name](backend=backend), emb, labels)
    assert sum(counts.values()) == READS_PER_STEP, dict(counts)


def test_one_host_read_per_call_of_the_functional_and_the_single_process_heads():
    emb, labels = _batch()
    weight = torch.randn(20, 8, requires_grad=True)
    with count_host_reads() as counts:
        marginops.margin_cross_entropy(emb, weight, labels, marginops.ArcFace(s=16.0), backend="cpu").backward()
    assert sum(counts.values()) == READS_PER_STEP, dict(counts)
    for margin in (marginops.ArcFace(s=16.0), marginops.CurricularFace(s=16.0)):
        counts = _step(DistributedMarginLoss(margin, 8, 20, backend="cpu"), emb, labels)
        assert sum(counts.values()) == READS_PER_STEP, (margin, dict(counts))
    head = insightface.PartialFC_V2(insightface.CombinedMarginLoss(16.0, 1.0, 0.5, 0.0), 8, 20, sample_rate=0.5)
    counts = _step(head, emb, labels)
    assert sum(counts.values()) == PARTIAL_FC_READS_PER_STEP, dict(counts)


def test_the_counter_sees_reads():
    with count_host_reads() as counts:
        t = torch.tensor([1, 0, 2])
        bool(t.any()), t.tolist(), t[t > 0], torch.unique(t)
    assert counts == {"__bool__": 1, "tolist": 1, "boolean mask": 1, "unique": 1}, dict(counts)
