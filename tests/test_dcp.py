"""Sharded checkpoints of the distributed head through torch.distributed.checkpoint (DCP), resharded.

Four gloo ranks train a small model (a Linear backbone, DDP-averaged by hand, and a DistributedMarginLoss head) for
two steps and save model and optimizer with ``dcp.save`` from ``marginops.distributed.get_state_dict``; three
ranks, five ranks and one process (this pytest process, without a process group) load it with ``dcp.load`` and
``set_state_dict`` and train two more steps.  Every loss and the final weights (the whole head, gathered, and the
backbone) equal four steps of uninterrupted single-process training in float64: SGD's momentum and AdamW's
moments moved with their rows.  Two runs: ArcFace with SGD (momentum), Sub-center ArcFace (k = 2) with AdamW.

Memory: while a rank loads, the tensors it allocates beyond the state it already holds (its shard of the weight
and of each optimizer state) stay within two copies of one saved chunk of one tensor (DCP's file reader reads a
saved chunk, unpickles it, copies the rows that overlap this rank's and frees both) plus a small slack: no rank
materializes the whole head (the Sub-center run's bound, 2.3 MB, is under its 4 MB head).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import set_state_dict
from torch.profiler import ProfilerActivity, profile

import marginops
from marginops import distributed as mdist

# one spawned job per world size serves every test of the module: keep them in one test process
pytestmark = pytest.mark.xdist_group("dcp")

IN, BATCH = 7, 12
SAVE_WORLD, LOAD_WORLDS, SPAWN = 4, (3, 5), 5
STEPS_BEFORE, STEPS_AFTER = 2, 2
# the peak bound beyond the state a rank holds: two copies of one saved chunk of one tensor (the largest, ceil(C / 4)
# classes x k rows: DCP's file reader holds the bytes it read and the tensor unpickled from them; 2 048 048 bytes
# measured for 1 024 000-byte chunks on every rank, whatever the world), plus DCP's own small allocations (its
# metadata, read on the coordinating rank: up to 70 KB seen)
CHUNK_COPIES, SLACK_BYTES = 2, 256 * 1024

RUNS = {  # (margin, optimizer, num_classes, embedding_size)
    "sgd_momentum_arcface": (
        lambda: marginops.ArcFace(s=16.0, m=0.4),
        lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9),
        23,
        6,
    ),
    # large enough for the memory bound to mean something: a saved chunk is 1 MB, the bound 2.3 MB, the whole head
    # 4 MB (x 3 with AdamW's two moments)
    "adamw_subcenter_k2": (
        lambda: marginops.SubCenterArcFace(s=16.0, m=0.4, k=2),
        lambda params: torch.optim.AdamW(params, lr=0.05, weight_decay=0.1),
        4000,
        64,
    ),
}


def initial(margin, classes, dim, seed):
    """The model's initial (backbone weight, backbone bias, whole head)."""
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(dim, IN, generator=gen, dtype=torch.float64),
        torch.randn(dim, generator=gen, dtype=torch.float64),
        torch.randn(classes * margin.subcenters, dim, generator=gen, dtype=torch.float64),
    )


class Net(torch.nn.Module):
    def __init__(self, margin, classes, dim, group, seed):
        super().__init__()
        self.backbone = torch.nn.Linear(IN, dim).double()
        self.head = mdist.DistributedMarginLoss(margin, dim, classes, process_group=group, backend="reference").double()
        bw, bb, whole = initial(margin, classes, dim, seed)
        k, start, n = margin.subcenters, self.head.class_start, self.head.num_local
        with torch.no_grad():
            self.backbone.weight.copy_(bw)
            self.backbone.bias.copy_(bb)
            self.head.weight.copy_(whole[start * k : (start + n) * k])


def batch(step, classes):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, IN, generator=gen, dtype=torch.float64), torch.randint(
        0, classes, (BATCH,), generator=gen
    )


def train_step(net, opt, step, group):
    """One step of this rank's share of the global batch; the backbone's gradient averaged as DDP would."""
    world, rank = (dist.get_world_size(group), dist.get_rank(group)) if group is not False else (1, 0)
    x, y = batch(step, net.head.num_classes)
    sizes = [BATCH // world + (r < BATCH % world) for r in range(world)]
    lo = sum(sizes[:rank])
    loss = net.head(net.backbone(x[lo : lo + sizes[rank]]), y[lo : lo + sizes[rank]])
    opt.zero_grad()
    loss.backward()
    if world > 1:
        for p in net.backbone.parameters():
            dist.all_reduce(p.grad, group=group)
            p.grad /= world
    opt.step()
    return loss.detach()


def reference(run):
    """Uninterrupted single-process training: the losses of every step and the final weights."""
    make_margin, make_opt, classes, dim = RUNS[run]
    margin = make_margin()
    bw, bb, whole = initial(margin, classes, dim, seed=1)
    backbone = torch.nn.Linear(IN, dim).double()
    with torch.no_grad():
        backbone.weight.copy_(bw)
        backbone.bias.copy_(bb)
    weight = torch.nn.Parameter(whole)
    opt = make_opt([*backbone.parameters(), weight])
    losses = []
    for step in range(STEPS_BEFORE + STEPS_AFTER):
        x, y = batch(step, classes)
        loss = marginops.margin_cross_entropy(backbone(x), weight, y, margin, backend="reference")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses, weight.detach(), backbone.weight.detach(), backbone.bias.detach()


def peak_new_bytes(fn):
    """(fn's result, the peak of the CPU tensor memory allocated while fn runs, above what existed before)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    changes = []
    for event in prof.events():
        change = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if change:
            changes.append((event.time_range.start, change))
    now = peak = 0
    for _, change in sorted(changes):
        now += change
        peak = max(peak, now)
    return result, peak


def load_and_train(run, group, path):
    """Build the model on this world, dcp.load the checkpoint into it, train STEPS_AFTER steps.  Returns the
    losses, the whole head (gathered), the backbone's weights, and (peak bytes during the load, the bound)."""
    make_margin, make_opt, classes, dim = RUNS[run]
    margin = make_margin()
    net = Net(
        margin, classes, dim, None if group is False else group, seed=7
    )  # another initialization: the load must set all
    opt = make_opt(net.parameters())
    model_sd, optim_sd = mdist.get_state_dict(net, opt)
    state = {"model": model_sd, "optim": optim_sd}

    def load():
        if group is False:
            dcp.load(state, checkpoint_id=path, no_dist=True)
        else:
            dcp.load(state, checkpoint_id=path, process_group=group)
        set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    _, peak = peak_new_bytes(load)
    k = margin.subcenters
    bound = CHUNK_COPIES * math.ceil(classes / SAVE_WORLD) * k * dim * 8 + SLACK_BYTES
    losses = [train_step(net, opt, step, group) for step in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER)]
    whole = net.head.full_state_dict()["weight"]
    return losses, whole, net.backbone.weight.detach(), net.backbone.bias.detach(), (peak, bound)


def compare(name, got, expected):
    losses, whole, bw, bb, (peak, bound) = got
    ref_losses, ref_whole, ref_bw, ref_bb = expected
    problems = []
    for what, a, b in [
        *[
            (f"loss of step {STEPS_BEFORE + i}", x, y)
            for i, (x, y) in enumerate(zip(losses, ref_losses[STEPS_BEFORE:]))
        ],
        ("whole head", whole, ref_whole),
        ("backbone weight", bw, ref_bw),
        ("backbone bias", bb, ref_bb),
    ]:
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-9, atol=1e-11):
            worst = (a - b).abs().max().item() if a.shape == b.shape else f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
            problems.append(f"{name}: {what} differs from uninterrupted training (worst {worst})")
    if peak > bound:
        problems.append(f"{name}: the load allocated {peak} bytes at its peak, over the bound {bound}")
    return problems


# ----------------------------------------------------------------------------------------------------------
# the spawned workers


def _worker(rank, spawn, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=spawn,
        timeout=datetime.timedelta(seconds=int(os.environ.get("MARGINOPS_TEST_DIST_TIMEOUT", "120"))),
    )
    groups = {n: dist.new_group(list(range(n))) for n in (SAVE_WORLD, *LOAD_WORLDS) if n != spawn}
    groups[spawn] = None
    report = {"problems": [], "peaks": {}}
    try:
        for run, (make_margin, make_opt, classes, dim) in RUNS.items():
            path = os.path.join(out_dir, run)
            if rank < SAVE_WORLD:  # train on 4 ranks and save
                net = Net(make_margin(), classes, dim, groups[SAVE_WORLD], seed=1)
                opt = make_opt(net.parameters())
                for step in range(STEPS_BEFORE):
                    train_step(net, opt, step, groups[SAVE_WORLD])
                model_sd, optim_sd = mdist.get_state_dict(net, opt)
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path, process_group=groups[SAVE_WORLD])
            dist.barrier()
            expected = reference(run)
            for world in LOAD_WORLDS:
                if rank < world:
                    try:
                        got = load_and_train(run, groups[world], path)
                        report["problems"] += compare(f"{run} on {world} ranks, rank {rank}", got, expected)
                        report["peaks"][f"{run}:{world}"] = list(got[-1])
                    except Exception:
                        report["problems"].append(f"{run} on {world} ranks, rank {rank}:\n{traceback.format_exc()}")
                dist.barrier()
    except Exception:
        report["problems"].append(traceback.format_exc())
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dcp")
    context = mp.start_processes(
        _worker, args=(SPAWN, str(out / "init"), str(out)), nprocs=SPAWN, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            pytest.fail("workers did not finish in 300 s")
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(SPAWN)]


@pytest.mark.slow
@pytest.mark.heavy  # 4, 3 and 5 gloo processes: a minute and a half on 2 cores
def test_save_on_4_ranks_resume_on_3_and_5_ranks(checkpoints):
    _, reports = checkpoints
    problems = [p for report in reports for p in report["problems"]]
    assert not problems, "\n".join(problems)
    assert all(f"{run}:3" in reports[0]["peaks"] for run in RUNS)


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("run", sorted(RUNS))
def test_save_on_4_ranks_resume_in_one_process(checkpoints, run):
    out, _ = checkpoints
    assert not (dist.is_available() and dist.is_initialized())
    problems = compare(f"{run} in one process", load_and_train(run, False, str(out / run)), reference(run))
    assert not problems, "\n".join(problems)


def test_a_sharded_record_loads_only_into_the_rows_it_was_marked_for():
    """get_state_dict's record names no rows (it is the same on every rank); the marked tensor does.  Without that
    tensor (a copy, say, loaded with plain load_state_dict) the load is refused, naming the way in."""
    net = Net(marginops.SubCenterArcFace(s=16.0, k=2), 11, 5, None, seed=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    model_sd, optim_sd = mdist.get_state_dict(net, opt)
    weight = model_sd["head.weight"]
    assert weight.global_shape == (22, 5) and weight.global_offsets == ((0, 0),)
    assert weight.untyped_storage().data_ptr() == net.head.weight.untyped_storage().data_ptr()
    assert not hasattr(net.head.weight, "global_offsets"), "the marks belong to the state dict's alias only"
    assert optim_sd["state"]["head.weight"]["momentum_buffer"].global_offsets == ((0, 0),)
    layout = model_sd["head._extra_state"]["layout"]
    assert layout["sharded"] and layout["rank"] is None and layout["class_start"] is None
    net.load_state_dict(model_sd)  # the marked tensor itself: its rows
    with pytest.raises(RuntimeError, match="shard of a DCP checkpoint .* no global offsets"):
        net.load_state_dict(dict(model_sd, **{"head.weight": weight.clone()}))
