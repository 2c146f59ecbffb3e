"""torch.compile(module, fullgraph=True) of every loss module (issue 20 item 4): training steps without recompiles,
and the same losses, gradients and state as eager mode.

Counting compiles: dynamo counts every graph it captures in ``counters["stats"]["unique_graphs"]``.  With
fullgraph=True a compile of a frame is exactly one graph (a graph break fails instead of splitting it), so the
increase of that count over some steps is the number of compiles and recompiles in them, whatever the backend and
whichever code object they belong to.  ``get_compilation_metrics()`` gives their reasons for the failure message.

Backends: the tests of one module use the default (inductor), what users run.  The tests about several heads in one
process use aot_eager: guards, recompiles and the recompile limit are dynamo's, the same for every backend, and
aot_eager still runs AOT autograd (functionalization, where the state buffers' updates are traced) at a fraction of
inductor's compile time on 2 cores.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch._inductor.config as inductor_config
from helpers import EVERY_MODULE
from torch._dynamo.utils import counters, get_compilation_metrics

import marginops
from marginops import nn as mnn
from marginops.distributed import DistributedMarginLoss

STEPS = 20
DIM, CLASSES, BATCH = 16, 30, 8
# Tolerances after up to 20 steps, about 10 times what the runs differ by.  Inductor fuses and reorders float32
# arithmetic: losses within a few ulps, weights within 2-3 ulps (of values about 1).  aot_eager runs eager mode's
# kernels; only the head's weight gradient is summed in another order (a dense gather under torch.compile, a sparse
# one eagerly): the same losses, weights within an ulp.
LOSS_TOL = dict(rtol=2e-6, atol=1e-6)
STATE_TOL = dict(rtol=1e-5, atol=1e-6)
NEAR = dict(rtol=1e-6, atol=1e-7)

# every loss module of marginops.nn (EVERY_MODULE has ElasticFace+; plain ElasticFace is another graph)
MODULES = {**EVERY_MODULE, "ElasticFace": lambda: mnn.ElasticFaceLoss(DIM, CLASSES, s=16.0, backend="cpu")}


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _reasons(since: int) -> str:
    """The recompile reasons of the compiles after the first ``since`` of this process (for messages)."""
    metrics = get_compilation_metrics()
    # (entries without a code name are AOT autograd's backward compiles)
    lines = [f"{m.co_name}: {m.recompile_reason or 'first compile'}" for m in metrics[since:] if m.co_name]
    return "\n".join(line.splitlines()[0] for line in lines) or "(none)"


@contextlib.contextmanager
def _fresh_dynamo():
    """A clean dynamo cache for the test; ElasticFace's draws as in eager mode under inductor."""
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


def _batches(steps=STEPS, seed=0):
    """Fresh inputs every step (same shapes): growing norms move AdaFace's and MagFace's statistics, an ignored row
    in another place each step."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        x = torch.randn(BATCH, DIM, generator=g) * (1.0 + 0.25 * step)
        y = torch.randint(0, CLASSES, (BATCH,), generator=g)
        y[step % BATCH] = -100
        out.append((x, y))
    return out


class Twin:
    """A loss module trained eagerly and a copy of it trained under torch.compile(fullgraph=True), side by side:
    a linear backbone (its own copy each) makes the embeddings, SGD steps the backbone and the head's weight."""

    def __init__(self, make, backend="inductor"):
        self.eager = make()
        if isinstance(getattr(self.eager, "weight", None), torch.nn.Parameter):
            # unit-scale class weights rather than insightface's N(0, 0.01): the first steps would otherwise scale
            # them up many times (the loss sees them normalized), and the two runs' rounding apart with them
            torch.nn.init.normal_(self.eager.weight)
        self.module = make()
        self.module.load_state_dict(self.eager.state_dict())
        self.compiled = torch.compile(self.module, fullgraph=True, backend=backend)
        backbone = torch.nn.Linear(DIM, DIM)
        self.backbones = [backbone, torch.nn.Linear(DIM, DIM)]
        self.backbones[1].load_state_dict(backbone.state_dict())
        self.optimizers = [
            torch.optim.SGD([*b.parameters(), *m.parameters()], lr=0.05)
            for b, m in zip(self.backbones, (self.eager, self.module))
        ]
        self.steps = 0

    def _run(self, which, x, y, train):
        call, backbone, optimizer = (self.eager, self.compiled)[which], self.backbones[which], self.optimizers[which]
        torch.manual_seed(self.steps)  # ElasticFace's draws: the same in both runs
        with contextlib.nullcontext() if train else torch.no_grad():
            loss = call(backbone(x), y)
        if train:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return loss.detach()

    def step(self, x, y, train=True, rtol=LOSS_TOL["rtol"], atol=LOSS_TOL["atol"]):
        """One step of both; their losses must agree."""
        expected = self._run(0, x, y, train)
        got = self._run(1, x, y, train)
        self.steps += 1
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=lambda m: f"step {self.steps}: {m}")

    def assert_same_state(self, rtol=STATE_TOL["rtol"], atol=STATE_TOL["atol"]):
        """Weights, buffers and extra state (SphereFace's step, ...) of both, and their backbones."""
        pairs = [(self.eager.state_dict(), self.module.state_dict())]
        pairs += [(self.backbones[0].state_dict(), self.backbones[1].state_dict())]
        for expected, got in pairs:
            assert expected.keys() == got.keys()
            for name, value in expected.items():
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(got[name], value, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
                else:
                    assert got[name] == value, name


def _train_and_count(twin, batches, **tolerances):
    """Train both for every batch; the number of graphs captured at the first step and after it."""
    start, metrics = _graphs(), len(get_compilation_metrics())
    twin.step(*batches[0], **tolerances)
    first = _graphs() - start
    for x, y in batches[1:]:
        twin.step(x, y, **tolerances)
    later = _graphs() - start - first
    return first, later, _reasons(metrics)


# ----------------------------------------------------------------------------------------------------------
# every module on its own: 20 training steps with at most one recompile, eval mode, back to training


# a compile is 15-30 s on 2 cores: the default run compiles two heads, `-m heavy` (CI) the rest
DEFAULT_RUN_MODULES = ("ArcFace", "SphereFace")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [n if n in DEFAULT_RUN_MODULES else pytest.param(n, marks=pytest.mark.heavy) for n in MODULES]
)
def test_module_trains_compiled_without_recompiles(name):
    """20 steps: one graph at the first, at most one recompile after it (none today); eval mode; training again."""
    batches = _batches()
    with _fresh_dynamo():
        twin = Twin(MODULES[name])
        first, later, reasons = _train_and_count(twin, batches)
        assert first == 1 and later <= 1, f"{first} graph(s) at the first step, {later} recompile(s) after:\n{reasons}"
        twin.assert_same_state()

        # eval mode (no_grad, as in validation): one more graph at most, no state update
        before, metrics = _graphs(), len(get_compilation_metrics())
        for module in (twin.module, twin.eager):
            module.eval()
        for x, y in batches[:3]:
            twin.step(x, y, train=False)
        assert _graphs() - before <= 1, _reasons(metrics)
        twin.assert_same_state()

        # back to training: the first graph still serves
        before, metrics = _graphs(), len(get_compilation_metrics())
        for module in (twin.module, twin.eager):
            module.train()
        twin.step(*batches[3])
        assert _graphs() == before, _reasons(metrics)
        twin.assert_same_state()


@pytest.mark.slow
@pytest.mark.parametrize("make", [mnn.ContrastiveLoss, mnn.TripletLoss], ids=["Contrastive", "Triplet"])
def test_pair_loss_trains_compiled_without_recompiles(make):
    # few labels: every batch has positive and negative pairs (with one anchor or another left out of the triplets)
    batches = [(x, y.clamp_min(0) % 3) for x, y in _batches()]
    with _fresh_dynamo():
        twin = Twin(make)
        first, later, reasons = _train_and_count(twin, batches)
        assert first == 1 and later <= 1, f"{first} graph(s) at the first step, {later} recompile(s) after:\n{reasons}"
        twin.assert_same_state()


DISTRIBUTED_MARGINS = {
    "ArcFace": lambda: marginops.ArcFace(s=16.0),
    "CurricularFace": lambda: marginops.CurricularFace(s=16.0),  # its EMA t, a buffer updated in the graph
}


@pytest.mark.slow
@pytest.mark.parametrize("margin", list(DISTRIBUTED_MARGINS))
def test_distributed_head_single_process_trains_compiled_without_recompiles(margin):
    """Without a process group (world size 1) there is nothing to agree on: no handshake in the graph."""
    batches = _batches()
    with _fresh_dynamo():
        twin = Twin(lambda: DistributedMarginLoss(DISTRIBUTED_MARGINS[margin](), DIM, CLASSES, backend="cpu"))
        first, later, reasons = _train_and_count(twin, batches)
        assert first == 1 and later <= 1, f"{first} graph(s) at the first step, {later} recompile(s) after:\n{reasons}"
        twin.assert_same_state()


# ----------------------------------------------------------------------------------------------------------
# state that changes every step, and several heads in one process


@pytest.mark.slow
def test_sphereface_lambda_anneals_in_one_graph_and_keeps_its_state_dict():
    """λ changes every step (to its floor lambda_min at step 9 here): one graph for all of them, the same λ and
    losses as eagerly, and the state_dict format of before ({"iteration": int} extra state), loaded mid-run."""

    def make():
        return mnn.SphereFaceLoss(DIM, CLASSES, base=50.0, gamma=1.0, lambda_min=5.0, backend="cpu")

    batches = _batches()
    with _fresh_dynamo():
        twin = Twin(make, backend="aot_eager")
        start = _graphs()
        for step, (x, y) in enumerate(batches, 1):
            twin.step(x, y, **NEAR)
            assert twin.module.iteration == twin.eager.iteration == step
            assert twin.module.lambda_ == twin.eager.lambda_ == pytest.approx(max(5.0, 50.0 / (1.0 + step)), rel=1e-15)
        assert _graphs() - start == 1
        state = twin.module.state_dict()
        assert set(state) == {"weight", "_extra_state"} and state["_extra_state"] == {"iteration": STEPS}

        # a state_dict as saved before the step was a tensor, loaded into both: no recompile, the same steps on
        old = {"weight": twin.eager.weight.detach().clone(), "_extra_state": {"iteration": 3}}
        for module in (twin.eager, twin.module):
            module.load_state_dict(old)
        assert twin.module.iteration == 3 and twin.module.lambda_ == 50.0 / 4.0
        for x, y in batches[:2]:
            twin.step(x, y, **NEAR)
        assert twin.module.iteration == 5 and _graphs() - start == 1
        twin.assert_same_state(**NEAR)


@pytest.mark.slow
def test_elasticface_instances_with_different_margins_in_one_process():
    """A second ElasticFace with another m recompiles the shared forward once, with m traced as a number rather
    than a constant; building the spec must not run its checks (math.isfinite) on that traced number."""
    heads = {
        "m=0.5": lambda: mnn.ElasticFaceLoss(DIM, CLASSES, s=16.0, m=0.5, backend="cpu"),
        "m=0.4": lambda: mnn.ElasticFaceLoss(DIM, CLASSES, s=16.0, m=0.4, std=0.1, backend="cpu"),
        "m=0.3, s=32": lambda: mnn.ElasticFaceLoss(DIM, CLASSES, s=32.0, m=0.3, backend="cpu"),
    }
    batches = _batches(steps=5)
    with _fresh_dynamo():
        _train_side_by_side({name: Twin(make, backend="aot_eager") for name, make in heads.items()}, batches)


def _train_side_by_side(twins, batches):
    """Step every twin on every batch, in turns: a head compiles at its first step (one graph at most) and never
    again, whatever the other heads compiled in between."""
    metrics = len(get_compilation_metrics())
    for step, (x, y) in enumerate(batches):
        for name, twin in twins.items():
            before = _graphs()
            twin.step(x, y, **NEAR)
            assert _graphs() - before <= (1 if step == 0 else 0), f"{name}, step {step}:\n{_reasons(metrics)}"
    for twin in twins.values():
        twin.assert_same_state(**NEAR)


@pytest.mark.slow
def test_ten_heads_in_one_process_stay_under_the_recompile_limit():
    """Every head class compiled in one process (more than torch._dynamo.config.recompile_limit = 8): each compiles
    once at its first step, none again, none fails on the limit (fullgraph=True raises FailOnRecompileLimitHit)."""
    heads = dict(MODULES)
    heads["ArcFace, another s and m"] = lambda: mnn.ArcFaceLoss(DIM, CLASSES, s=32.0, m=0.3, backend="cpu")
    assert len(heads) > torch._dynamo.config.recompile_limit
    batches = _batches(steps=3)
    with _fresh_dynamo():
        start = _graphs()
        # FailOnRecompileLimitHit would come out of the first step of the ninth head
        _train_side_by_side({name: Twin(make, backend="aot_eager") for name, make in heads.items()}, batches)
        # one graph per head (the second ArcFace recompiles ArcFaceLoss.forward, with s and m traced)
        assert _graphs() - start == len(heads)
