"""``python -m bench.scale``: the class-parallel head (DistributedMarginLoss) on 1 to 16 gloo ranks of one machine.

* weak scaling: a fixed number of classes per rank (``--classes-per-rank``), world sizes ``--worlds``;
* strong scaling: a fixed number of classes (``--classes``) over the same world sizes.

Each run spawns ``world`` CPU processes (one torch thread each, gloo), builds the head with an SGD-momentum (or
``--optimizer``) optimizer and trains: per rank, the step time (forward + backward + optimizer step, between
barriers; the slowest rank's, median over ``--steps`` steps after one warm-up step), the peak memory (below) and the
bytes its collectives carry per step (the payload of every all-gather's output and every all-reduce's tensor, counted
by wrapping torch.distributed's functions during one step).  Beside the measured peak stands
``marginops.distributed.memory_plan``'s estimate for the same run (device "cpu").

Peak memory: the high-water mark of the CPU tensors live in the rank's process from before the head is built to the
end of its second training step (optimizer state present), from the profiler's raw allocation records (every
allocation and free of c10's CPU allocator, timestamped, whatever thread made it).  Unlike the resident set it
counts neither torch's libraries (~300 MB per process), nor glibc's cached free memory, nor pages that an empty
tensor never touched; it is the quantity memory_plan models.

``--ten-million``: C = 10,000,000 over 16 ranks (D = 16, float32, B = 8 per rank), a few steps without and with
Partial FC; every rank writes its shard (and sample) before each step, and this process recomputes each step's loss
shard by shard in float64 and compares.

Writes ``scale.csv`` (appended) and ``scale.png`` under ``--out`` (default bench/results/local/scale; ``--record``:
bench/results/scale, the committed record).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from . import results

RECORD_DIR = results.RESULTS_DIR / "scale"
FIELDS = [
    "scaling",
    "world",
    "classes",
    "classes_per_rank",
    "dim",
    "batch_per_rank",
    "dtype",
    "optimizer",
    "sample_rate",
    "step_s_p50",
    "step_s_p20",
    "step_s_p80",
    "peak_mib",
    "plan_mib",
    "comm_bytes",
    "device",
    "versions",
    "timestamp",
]
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01),
    "none": lambda params: None,
}


# ----------------------------------------------------------------------------------------------------------
# measurements inside a rank


def peak_tensor_bytes(fn):
    """(fn's result, the peak of CPU tensor bytes live while fn runs, above those live before it)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    changes = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.nbytes()
    )
    now = peak = 0
    for _, change in changes:
        now += change
        peak = max(peak, now)
    return result, peak


class CountCollectives:
    """Within the block, the payload bytes of every all-gather (its output) and all-reduce (its tensor)."""

    NAMES = ("all_gather_into_tensor", "all_gather_single", "all_reduce", "reduce_scatter_tensor")

    def __enter__(self):
        self.bytes, self.saved = 0, {}
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self.saved[name] = fn

            def counted(tensor, *args, _fn=fn, _name=name, **kwargs):
                # the output (all-gathers), the reduced tensor, or reduce-scatter's input
                big = args[0] if _name == "reduce_scatter_tensor" and args else tensor
                self.bytes += big.numel() * big.element_size()
                return _fn(tensor, *args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _batch(config, rank, step):
    gen = torch.Generator().manual_seed(config["seed"] * 100_003 + step * 1_009 + rank)
    dtype = getattr(torch, config["dtype"])
    x = torch.randn(config["batch"], config["dim"], generator=gen, dtype=dtype)
    y = torch.randint(0, config["classes"], (config["batch"],), generator=gen)
    return x, y


def _train_step(head, opt, config, rank, step):
    x, y = _batch(config, rank, step)
    x.requires_grad_(True)
    loss = head(x, y)
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad()
    else:
        head.weight.grad = None
    return loss.detach()


def _measure_in_rank(config: dict, rank: int) -> dict:
    """This rank's peak tensor bytes over building the head and two steps, its collectives' payload in the third
    step, and the times of ``config["steps"]`` more steps (between barriers)."""
    import marginops
    from marginops import distributed as mdist

    dtype = getattr(torch, config["dtype"])
    torch.manual_seed(config["seed"] + rank)

    def build_and_train_two_steps():
        head = mdist.DistributedMarginLoss(
            marginops.ArcFace(), config["dim"], config["classes"], sample_rate=config["sample_rate"]
        ).to(dtype)
        opt = OPTIMIZERS[config["optimizer"]](head.parameters())
        losses = [_train_step(head, opt, config, rank, step) for step in range(2)]
        return head, opt, losses

    (head, opt, losses), peak = peak_tensor_bytes(build_and_train_two_steps)
    with CountCollectives() as counter:
        _train_step(head, opt, config, rank, 2)
    times = []
    for step in range(3, 3 + config["steps"]):
        dist.barrier()
        start = time.perf_counter()
        _train_step(head, opt, config, rank, step)
        dist.barrier()
        times.append(time.perf_counter() - start)
    return {"peak_bytes": peak, "comm_bytes": counter.bytes, "times": times, "losses": [float(v) for v in losses]}


def _join_gloo(rank, world, init_file, timeout_s):
    """One thread per rank (the ranks share the machine's cores) and the gloo group through a shared file."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _worker(rank, world, init_file, out_dir, configs):
    _join_gloo(rank, world, init_file, 600)
    report: dict = {"rank": rank, "runs": []}
    try:
        for config in configs:  # one after the other: the previous head and optimizer are freed first
            report["runs"].append(_measure_in_rank(config, rank))
    except Exception:
        report["error"] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(report, fh)
        dist.destroy_process_group()


def spawn(worker, world: int, config, timeout: float = 1800, then=None) -> list:
    """Run ``worker(rank, world, init_file, out_dir, config)`` on ``world`` spawned processes; their reports
    (``then(out_dir, reports)`` runs before out_dir is removed)."""
    import torch.multiprocessing as mp

    out = Path(tempfile.mkdtemp(prefix="marginops-scale-"))
    try:
        context = mp.start_processes(
            worker, args=(world, str(out / "init"), str(out), config), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.terminate()
                raise RuntimeError(f"bench.scale: {world} ranks did not finish in {timeout:.0f} s")
        reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
        errors = [r["error"] for r in reports if "error" in r]
        if errors:
            raise RuntimeError(f"bench.scale: a rank failed:\n{errors[0]}")
        if then is not None:
            then(out, reports)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return reports


def plan_bytes(config: dict, world: int) -> int:
    from marginops.distributed import memory_plan

    return memory_plan(
        config["classes"],
        config["dim"],
        world,
        config["batch"],
        getattr(torch, config["dtype"]),
        config["optimizer"],
        config["sample_rate"],
        device="cpu",
        threads=1,
    ).total


def measure_many(configs: list, world: int) -> list:
    """Runs on ``world`` ranks (one spawn): for each, the slowest rank's step times, the largest peak and payload over
    the ranks, every rank's peak, and the plan's peak."""
    reports = spawn(_worker, world, configs)
    out = []
    for i, config in enumerate(configs):
        runs = [report["runs"][i] for report in reports]
        times = [max(run["times"][j] for run in runs) for j in range(config["steps"])]
        p50, p20, p80 = results.quantiles(times)
        out.append(
            {
                "p50": p50,
                "p20": p20,
                "p80": p80,
                "peak_bytes": max(run["peak_bytes"] for run in runs),
                "peaks": [run["peak_bytes"] for run in runs],
                "comm_bytes": max(run["comm_bytes"] for run in runs),
                "plan_bytes": plan_bytes(config, world),
                "losses": [run["losses"] for run in runs],
            }
        )
    return out


def measure(config: dict, world: int) -> dict:
    return measure_many([config], world)[0]


# ----------------------------------------------------------------------------------------------------------
# the 10M-class run: every step's loss against a single-process float64 recomputation, shard by shard


def _ten_million_worker(rank, world, init_file, out_dir, config):
    import marginops
    from marginops import distributed as mdist

    _join_gloo(rank, world, init_file, config.get("timeout", 1800))
    report: dict = {"rank": rank, "runs": {}}
    try:
        for rate in config["sample_rates"]:
            cfg = dict(config, sample_rate=rate)
            torch.manual_seed(config["seed"] + rank)
            losses, times = [], []

            def run(cfg=cfg, rate=rate, losses=losses, times=times):
                head = mdist.DistributedMarginLoss(
                    marginops.ArcFace(), config["dim"], config["classes"], sample_rate=rate
                )
                opt = OPTIMIZERS[config["optimizer"]](head.parameters())
                for step in range(config["steps"]):
                    stem = Path(out_dir) / f"rate{rate}_step{step}_rank{rank}"
                    # W before the step, for the recomputation: written from the parameter's storage, no copy
                    torch.save({"weight": head.weight.detach(), "class_start": head.class_start}, f"{stem}_w.pt")
                    dist.barrier()
                    start = time.perf_counter()
                    losses.append(float(_train_step(head, opt, cfg, rank, step)))
                    dist.barrier()
                    times.append(time.perf_counter() - start)
                    torch.save(head.weight_index, f"{stem}_index.pt")  # the step's sample (None without)

            _, peak = peak_tensor_bytes(run)
            report["runs"][str(rate)] = {"losses": losses, "times": times, "peak_bytes": peak}
    except Exception:
        report["error"] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(report, fh)
        dist.destroy_process_group()


def recompute_loss(config: dict, world: int, shard_files: list, step: int) -> float:
    """The step's mean loss in float64 from the ranks' shards (W before the step, the step's Partial FC sample) and
    the ranks' batches (regenerated from their seeds): one shard, and within it one block of classes, at a time."""
    import marginops
    from marginops.margins import NORM_EPS

    margin = marginops.ArcFace()
    xs, ys = zip(*(_batch(config, rank, step) for rank in range(world)))
    x = torch.cat(xs).double()
    labels = torch.cat(ys)
    x_norm = torch.linalg.vector_norm(x, dim=1)
    x_hat = x / x_norm.clamp_min(NORM_EPS)[:, None]
    row_scale = margin.row_scale(x_norm)
    # the target cosines first (from the shard that owns each label), then the target logits
    cos_target = torch.zeros_like(x_norm)
    shards = []
    for stem in shard_files:
        saved = torch.load(f"{stem}_w.pt")
        start, weight = saved["class_start"], saved["weight"]
        owned = (labels >= start) & (labels < start + weight.shape[0])
        rows = weight[labels[owned] - start].double()
        cos = (x_hat[owned] * rows).sum(1) / torch.linalg.vector_norm(rows, dim=1).clamp_min(NORM_EPS)
        cos_target[owned] = cos.clamp(-1.0, 1.0)
        shards.append(stem)
    target_logit = margin.target_logit(cos_target, row_scale, x_norm)
    threshold = margin.threshold(cos_target)
    # the non-target columns' log-sum-exp, block by block (each target column masked out), then the target logit
    lse = torch.full_like(x_norm, -math.inf)
    block = 200_000
    for stem in shards:
        saved, index = torch.load(f"{stem}_w.pt"), torch.load(f"{stem}_index.pt")
        start, weight = saved["class_start"], saved["weight"]
        columns = torch.arange(weight.shape[0]) if index is None else index
        for first in range(0, columns.numel(), block):
            cols = columns[first : first + block]
            w = weight[cols].double()
            cos = x_hat @ (w / torch.linalg.vector_norm(w, dim=1).clamp_min(NORM_EPS)[:, None]).t()
            logits = margin.phi(cos, threshold[:, None]).mul_(row_scale[:, None])
            at = torch.searchsorted(cols, labels - start).clamp_max(cols.numel() - 1)
            rows = torch.nonzero(cols[at] == labels - start).flatten()
            logits[rows, at[rows]] = -math.inf
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
    lse = torch.logaddexp(lse, target_logit)
    return float((lse - target_logit).mean())


def ten_million(args) -> int:
    """C = 10M over 16 ranks, without and with Partial FC; every step's loss against the float64 recomputation."""
    from marginops.distributed import memory_plan

    config = {
        "classes": args.classes or 10_000_000,
        "dim": args.dim or 16,
        "batch": args.batch or 8,
        "dtype": "float32",
        "optimizer": args.optimizer,
        "sample_rates": [1.0, 0.1],
        "steps": args.steps or 3,
        "seed": 0,
    }
    world = 16 if args.worlds is None else int(args.worlds.split(",")[-1])
    classes, dim, batch = config["classes"], config["dim"], config["batch"]
    lines = [
        f"python -m bench.scale --ten-million: C = {classes:,} over {world} gloo ranks, D = {dim}, float32, "
        f"B = {batch} per rank (N = {world * batch}), ArcFace, {config['optimizer']}, {config['steps']} steps each",
        f"machine: {results.cpu_model()} ({results.usable_cores()} cores), {_memory_gib():.0f} GiB; "
        f"{results.versions()}",
        f"whole head {classes * dim * 4 / 2**30:.2f} GiB; rows x D = {classes * dim:,} elements in all, "
        f"{-(-classes // world) * dim:,} per rank",
    ]
    for line in lines:
        print(line, flush=True)
    ok = True

    def check(out: Path, reports: list) -> None:
        nonlocal ok
        for rate in config["sample_rates"]:
            runs = [report["runs"][str(rate)] for report in reports]
            plan = memory_plan(
                classes, dim, world, batch, torch.float32, config["optimizer"], rate, device="cpu", threads=1
            )
            peak = max(run["peak_bytes"] for run in runs)
            lines.append(
                f"sample_rate {rate}: peak tensor memory per rank {peak / 2**20:.1f} MiB (largest over the ranks), "
                f"memory_plan {plan.total / 2**20:.1f} MiB"
            )
            print(lines[-1], flush=True)
            for step, loss in enumerate(runs[0]["losses"]):
                files = [out / f"rate{rate}_step{step}_rank{r}" for r in range(world)]
                expected = recompute_loss(dict(config, sample_rate=rate), world, files, step)
                same = all(run["losses"][step] == loss for run in runs)
                rel = abs(loss - expected) / abs(expected)
                good = same and rel <= args.tolerance
                ok &= good
                lines.append(
                    f"  step {step}: loss {loss:.6f} (every rank: {'same' if same else 'DIFFERS'}), float64 "
                    f"recomputation {expected:.6f}, relative difference {rel:.1e} {'PASS' if good else 'FAIL'}; "
                    f"step {max(run['times'][step] for run in runs):.1f} s"
                )
                print(lines[-1], flush=True)

    spawn(_ten_million_worker, world, config, timeout=3600, then=check)
    lines.append(f"tolerance {args.tolerance:g} relative (float32 kernels against float64): {'PASS' if ok else 'FAIL'}")
    print(lines[-1])
    out = Path(args.out) if args.out else (RECORD_DIR if args.record else results.LOCAL_DIR / "scale")
    out.mkdir(parents=True, exist_ok=True)
    (out / "ten_million.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'ten_million.txt'}")
    return 0 if ok else 1


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


# ----------------------------------------------------------------------------------------------------------
# the sweep, its CSV and its plot


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for scaling, marker in (("weak", "o"), ("strong", "s")):
        part = sorted((r for r in rows if r["scaling"] == scaling), key=lambda r: int(r["world"]))
        if not part:
            continue
        worlds = [int(r["world"]) for r in part]
        label = (
            f"weak ({int(part[0]['classes_per_rank']):,} classes per rank)"
            if scaling == "weak"
            else f"strong (C = {int(part[0]['classes']):,})"
        )
        axes[0].plot(worlds, [float(r["step_s_p50"]) for r in part], marker=marker, label=label)
        axes[1].plot(worlds, [float(r["peak_mib"]) for r in part], marker=marker, label=f"{scaling}: measured")
        axes[1].plot(worlds, [float(r["plan_mib"]) for r in part], ls="--", marker=marker, label=f"{scaling}: plan")
        axes[2].plot(worlds, [float(r["comm_bytes"]) / 2**10 for r in part], marker=marker, label=label)
    for ax, title in zip(
        axes, ("step time (s, slowest rank)", "peak memory per rank (MiB)", "collective payload per step (KiB)")
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("gloo ranks")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    first = rows[0]
    fig.suptitle(
        f"DistributedMarginLoss, ArcFace, D = {first['dim']}, {first['batch_per_rank']} per rank, {first['dtype']}, "
        f"{first['optimizer']}; {first['device']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def append_rows(rows: list[dict], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scale.csv"
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def latest_rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    stamp = max(r["timestamp"] for r in rows)
    return [r for r in rows if r["timestamp"] == stamp]


def sweep(args) -> int:
    worlds = [int(w) for w in args.worlds.split(",")] if args.worlds else [1, 2, 4, 8, 16]
    base = {
        "dim": args.dim or 64,
        "batch": args.batch or 32,
        "dtype": args.dtype,
        "optimizer": args.optimizer,
        "sample_rate": args.sample_rate,
        "steps": args.steps or 5,
        "seed": 0,
    }
    runs = []
    if args.scaling in ("weak", "both"):
        runs += [("weak", world, args.classes_per_rank * world) for world in worlds]
    if args.scaling in ("strong", "both"):
        runs += [("strong", world, args.classes or 1_000_000) for world in worlds]
    device = f"{results.cpu_model()} ({results.usable_cores()} cores; gloo ranks of 1 torch thread each)"
    stamp = results.now()
    rows = []
    print(device, flush=True)
    measured = {}
    for world in sorted({world for _, world, _ in runs}):  # one spawn per world size
        mine = [(scaling, classes) for scaling, w, classes in runs if w == world]
        got = measure_many([dict(base, classes=classes) for _, classes in mine], world)
        measured.update({(scaling, world, classes): g for (scaling, classes), g in zip(mine, got)})
    for scaling, world, classes in runs:
        config = dict(base, classes=classes)
        got = measured[(scaling, world, classes)]
        row = {
            "scaling": scaling,
            "world": world,
            "classes": classes,
            "classes_per_rank": math.ceil(classes / world),
            "dim": config["dim"],
            "batch_per_rank": config["batch"],
            "dtype": config["dtype"],
            "optimizer": config["optimizer"],
            "sample_rate": config["sample_rate"],
            "step_s_p50": f"{got['p50']:.4g}",
            "step_s_p20": f"{got['p20']:.4g}",
            "step_s_p80": f"{got['p80']:.4g}",
            "peak_mib": f"{got['peak_bytes'] / 2**20:.4g}",
            "plan_mib": f"{got['plan_bytes'] / 2**20:.4g}",
            "comm_bytes": got["comm_bytes"],
            "device": device,
            "versions": results.versions(),
            "timestamp": stamp,
        }
        rows.append(row)
        print(
            f"{scaling:6s} {world:2d} ranks  C = {classes:>10,}  step {got['p50']:.3f} s  peak {row['peak_mib']} MiB "
            f"(plan {row['plan_mib']})  collectives {got['comm_bytes']:,} B/step",
            flush=True,
        )
    out = Path(args.out) if args.out else (RECORD_DIR if args.record else results.LOCAL_DIR / "scale")
    path = append_rows(rows, out)
    if not args.no_plot:
        plot(latest_rows(path), out / "scale.png")
    print(f"wrote {path}" + ("" if args.no_plot else f" and {out / 'scale.png'}"))
    return 0


def plan_table(args) -> int:
    """memory_plan's peak per rank for 1M, 10M and 100M classes on 8 and 64 GPUs (``--plan``)."""
    from marginops.distributed import memory_plan

    classes = [int(c) for c in (args.plan_classes or "1000000,10000000,100000000").split(",")]
    worlds = [int(w) for w in (args.worlds or "8,64").split(",")]
    dim, batch = args.dim or 512, args.batch or 128
    dtype = getattr(torch, args.dtype)
    memory = args.device_memory_gb * 1e9
    print(
        f"memory_plan, head only: D = {dim}, {args.dtype}, {batch} embeddings per rank, device cuda, "
        f"sample_rate {args.sample_rate}; GiB per rank; largest C within {args.device_memory_gb:g} GB"
    )
    print("| classes | GPUs | weight | peak, SGD momentum | peak, AdamW |")
    print("|---|---|---|---|---|")
    largest = []
    for world in worlds:
        for c in classes:
            sgd, adamw = (memory_plan(c, dim, world, batch, dtype, opt, args.sample_rate) for opt in ("sgd", "adamw"))
            cells = [f"{c / 1e6:g}M", str(world), f"{sgd.items['weight'] / 2**30:.1f}"]
            cells += [
                f"{plan.total / 2**30:.1f}" + ("" if plan.total <= memory else " (over)") for plan in (sgd, adamw)
            ]
            print("| " + " | ".join(cells) + " |")
        largest.append(
            f"{sgd.largest_num_classes(memory) / 1e6:.0f}M / {adamw.largest_num_classes(memory) / 1e6:.0f}M on {world}"
        )
    print("Largest C (SGD / AdamW): " + "; ".join(largest) + " GPUs.")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--scaling", choices=("weak", "strong", "both"), default="both")
    parser.add_argument("--worlds", default=None, help="comma list of world sizes (default 1,2,4,8,16)")
    parser.add_argument("--classes-per-rank", type=int, default=100_000, help="weak scaling")
    parser.add_argument("--classes", type=int, default=None, help="strong scaling's C (default 1,000,000)")
    parser.add_argument("--dim", type=int, default=None, help="embedding size (default 64; 16 with --ten-million)")
    parser.add_argument("--batch", type=int, default=None, help="per rank (default 32; 8 with --ten-million)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--optimizer", default="sgd", choices=tuple(OPTIMIZERS))
    parser.add_argument("--sample-rate", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5; 3 with --ten-million)")
    parser.add_argument("--out", default=None, help="default bench/results/local/scale")
    parser.add_argument("--record", action="store_true", help="write to bench/results/scale (the committed record)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--ten-million", action="store_true", help="the 10M-class run checked against float64")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="--ten-million: relative, per step")
    parser.add_argument("--plan", action="store_true", help="print memory_plan's table for GPUs (nothing runs)")
    parser.add_argument("--plan-classes", default=None, help="--plan: comma list (default 1M, 10M, 100M)")
    parser.add_argument("--device-memory-gb", type=float, default=80.0, help="--plan: per GPU, in 10^9 bytes")
    args = parser.parse_args(argv)
    if args.plan:
        return plan_table(args)
    if args.ten_million:
        return ten_million(args)
    return sweep(args)


if __name__ == "__main__":
    sys.exit(main())
