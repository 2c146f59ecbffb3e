"""``python -m bench.openset --data glyphs``: open-set recognition on rendered CJK ideographs (bench/glyphs.py).

Every head — the plain softmax baseline and the nine marginops margin heads, on the fused backend — trains
the same small CNN from the same initial weights on the same batches of training identities (code points),
then the network embeds photos of identities it never saw:

* verification over all pairs of test photos: ROC AUC, TAR at FAR = 1e-3 and 1e-4, the ROC curve;
* closed-set identification: one photo per test identity enrolled, every other photo a probe, top-1.

Mean ± std over --seeds seeds (network initialization, batch order, ElasticFace's margin draws); the data set
is the same for every seed.  Beside it, the margin papers' picture: the CNN trained with 2-D embeddings on a
few identities, softmax beside ArcFace, their normalized embeddings on the unit circle.

Sizes (``--size``): ``default`` (3,000 training identities; every head in ≤ 15 minutes on 2 idle cores),
``tiny`` (CI: seconds), ``scale`` (20,000 training identities, ArcFace, with the head's peak memory per step
on the fused backend beside the reference backend's, which materializes the B × C logits).

Results are appended to ``<out>/glyphs.csv`` (+ ``glyphs_roc.csv``, ``glyphs_circle.csv``), out being
bench/results/local by default and the committed record bench/results with ``--record``; ``python -m
bench.report`` turns the record into bench/README.md's glyph tables and the PNGs (``--check``: fail if stale).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import glyphs, openset, plot, results

HEADS = openset.ALL_HEADS
FARS = (1e-3, 1e-4)
ROC_FARS = tuple(10 ** (k / 4) for k in range(-24, 1))  # 1e-6 … 1, four points per decade
SIZES = {
    "default": dict(
        train_ids=3000,
        test_ids=300,
        augs=1,
        styles=tuple(glyphs.FONT_FILES),
        regions=glyphs.REGIONS,
        epochs=3.0,
        batch=256,
        embedding_size=64,
        width=16,
        seeds=3,
        heads=tuple(HEADS),
        circle_ids=8,
        circle_augs=8,
        circle_steps=800,
    ),
    "tiny": dict(
        train_ids=24,
        test_ids=6,
        augs=1,
        styles=("sans", "serif-bold"),
        regions=("JP", "SC"),
        epochs=2.0,
        batch=32,
        embedding_size=16,
        width=4,
        seeds=1,
        heads=tuple(HEADS),
        circle_ids=3,
        circle_augs=2,
        circle_steps=4,
    ),
    "scale": dict(
        train_ids=20000,
        test_ids=300,
        augs=1,
        styles=tuple(glyphs.FONT_FILES),
        regions=glyphs.REGIONS,
        epochs=2.0,
        batch=256,
        embedding_size=64,
        width=16,
        seeds=1,
        heads=("arcface",),
        circle_ids=0,
        circle_augs=0,
        circle_steps=0,
    ),
}
RECORD_FIELDS = ["run", "head", "seed", "metric", "value", "setup", "device", "versions", "timestamp"]
ROC_FIELDS = ["run", "head", "seed", "far", "tar", "timestamp"]
CIRCLE_FIELDS = ["run", "head", "code", "kind", "angle", "timestamp"]
RECORD, ROC, CIRCLE = "glyphs.csv", "glyphs_roc.csv", "glyphs_circle.csv"
ROC_PNG, CIRCLE_PNG = "glyphs_roc.png", "glyphs_circle.png"
METRICS = {  # metric -> (column title, format)
    "auc": ("ROC AUC", ".4f"),
    "tar@1e-3": ("TAR @ FAR=1e-3", ".3f"),
    "tar@1e-4": ("TAR @ FAR=1e-4", ".3f"),
    "top1": ("identification top-1", ".3f"),
    "loss": ("final train loss", ".2f"),
}
CIRCLE_HEADS = ("softmax", "arcface")
CIRCLE_POINTS = 64  # photos per identity kept in the record (of circle_augs × faces)


def glyph_net(embedding_size: int, width: int = 16, embedding_norm: bool = True) -> nn.Module:
    """A small strided CNN for 32 × 32 grayscale (three stride-2 convolutions, BatchNorm on the embedding unless
    ``embedding_norm`` is False)."""
    layers = [
        nn.Conv2d(1, width, 5, stride=2, padding=2, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(inplace=True),
        nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(4 * width),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(4 * width * 16, embedding_size),
    ]
    if embedding_norm:
        layers.append(nn.BatchNorm1d(embedding_size))
    return nn.Sequential(*layers)


def data_spec(cfg: dict, circle: bool = False) -> glyphs.GlyphSpec:
    if circle:  # few identities, many augmented photos each: the 2-D picture needs points per identity
        return glyphs.GlyphSpec(
            train_ids=cfg["circle_ids"],
            test_ids=0,
            augs=cfg["circle_augs"],
            styles=tuple(cfg["styles"]),
            regions=tuple(cfg["regions"]),
            seed=cfg["data_seed"] + 1,
        )
    return glyphs.GlyphSpec(
        train_ids=cfg["train_ids"],
        test_ids=cfg["test_ids"],
        augs=cfg["augs"],
        styles=tuple(cfg["styles"]),
        regions=tuple(cfg["regions"]),
        seed=cfg["data_seed"],
    )


_LOADED: dict = {}


def _data(spec: glyphs.GlyphSpec) -> glyphs.GlyphSet:
    """The set from the cache (the parent rendered it), once per process."""
    if spec not in _LOADED:
        _LOADED[spec] = glyphs.load(spec, log=lambda *_: None)
    return _LOADED[spec]


@torch.no_grad()
def embed(net: nn.Module, images: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    net.eval()
    return torch.cat([net(glyphs.GlyphSet.to_input(images[i : i + chunk])) for i in range(0, len(images), chunk)])


def train(
    head_name: str,
    seed: int,
    cfg: dict,
    data: glyphs.GlyphSet,
    embedding_size: int,
    steps: int,
    embedding_norm: bool = True,
):
    """Train net + head; the same seed gives every head the same initial network and the same batches."""
    torch.manual_seed(seed)
    net = glyph_net(embedding_size, cfg["width"], embedding_norm)
    torch.manual_seed(seed + 1)
    head = openset.make_head(
        head_name, embedding_size, len(data.train_codes), cfg["backend"], cfg["scale"], seed=seed + 2
    )
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9, weight_decay=5e-4)
    # linear warm-up, then cosine: without the warm-up the normalized heads stall at chance on this data (the
    # first full-rate steps scatter the tiny initial class weights); the softmax baseline gets the same schedule
    warm = max(1, round(cfg["warmup"] * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1.0 + math.cos(math.pi * min(i, steps) / steps))
    )
    g = torch.Generator().manual_seed(30_000 + seed)
    n, batch = len(data.train_labels), min(cfg["batch"], len(data.train_labels))
    order, pos = torch.randperm(n, generator=g), 0
    loss = torch.tensor(float("nan"))
    net.train()
    head.train()
    for _ in range(steps):
        if pos + batch > n:  # a new epoch: a new permutation, no short batch (BatchNorm)
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos : pos + batch]
        pos += batch
        loss = head(net(glyphs.GlyphSet.to_input(data.train_images[idx])), data.train_labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net, head, float(loss.detach())


def steps_for(cfg: dict, images: int) -> int:
    return max(1, round(cfg["epochs"] * images / cfg["batch"]))


def run_one(task: tuple) -> dict:
    """One (head, seed): train, then evaluate on the test identities; runs in a worker process or in-process."""
    head_name, seed, cfg = task
    torch.set_num_threads(cfg["threads"])
    data = _data(data_spec(cfg))
    steps = steps_for(cfg, len(data.train_labels))
    start, cpu = time.perf_counter(), time.process_time()
    net, _, loss = train(head_name, seed, cfg, data, cfg["embedding_size"], steps)
    train_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    m = openset.evaluate(embed(net, data.test_images), data.test_labels, data.per_identity, FARS, ROC_FARS)
    return {
        "head": head_name,
        "seed": seed,
        "metrics": {
            "auc": m["auc"],
            "tar@1e-3": m["tar_at"][1e-3],
            "tar@1e-4": m["tar_at"][1e-4],
            "top1": m["top1"],
            "loss": loss,
            "train_s": train_s,
            "cpu_s": cpu_s,
            "steps": steps,
        },
        "pairs": m["pairs"],
        "roc": m["roc"],
    }


def run_circle(task: tuple) -> dict:
    """The 2-D picture: ``head`` trained with 2-D embeddings on cfg['circle_ids'] identities; the angles of its
    normalized training embeddings (and of the class weights, where the head has normalized ones)."""
    head_name, cfg = task
    torch.set_num_threads(cfg["threads"])
    data = _data(data_spec(cfg, circle=True))
    local = dict(cfg, batch=min(cfg["batch"], 128), scale=16.0)  # s = 16 suits a handful of classes in 2-D
    # no BatchNorm on a 2-D embedding: centring and whitening two coordinates fights the angular margin (ArcFace's
    # class weights then bunch on one side of the circle and the classes collapse)
    net, head, loss = train(head_name, 0, local, data, 2, cfg["circle_steps"], embedding_norm=False)
    e = embed(net, data.train_images).double()
    angles = torch.atan2(e[:, 1], e[:, 0])
    weights = head.fc.weight if head_name == "softmax" else head.weight
    w_angles = torch.atan2(weights[:, 1].detach().double(), weights[:, 0].detach().double())
    return {
        "head": head_name,
        "codes": data.train_codes,
        "labels": data.train_labels.tolist(),
        "angles": angles.tolist(),
        "weight_angles": w_angles.tolist(),
        "loss": loss,
    }


def _pool_map(fn, tasks: list, jobs: int):
    """Results in completion order; jobs > 1: one process per job, each on its own core (1 torch thread)."""
    if jobs <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield fn(task)
        return
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork of a process that already runs torch threads
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=ctx) as pool:
        futures = [pool.submit(fn, task) for task in tasks]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()


def memory_probe(head: str, cfg: dict, classes: int) -> dict:
    """The head's forward+backward at the training's B × C × D, each backend in its own process (bench.cases:
    peak memory beyond the inputs and their gradients, median step time)."""
    from . import __main__ as runner
    from .providers import MARGINS

    if head not in MARGINS:
        return {}
    out = {}
    for provider in ("cpu", "reference"):
        spec = dict(
            provider=provider,
            margin=head,
            mode="forward+backward",
            batch=cfg["batch"],
            classes=classes,
            dim=cfg["embedding_size"],
            dtype="float32",
            device="cpu",
            repeats=5,
            warmup=1,
            max_seconds=60.0,
            threads=cfg["threads"],
        )
        res = runner.run_case(spec, timeout=300)
        if "error" in res:
            out[provider] = {"peak_extra_mib": res["error"], "step_s": res["error"]}
        else:
            out[provider] = {
                "peak_extra_mib": res["peak_extra_bytes"] / 2**20,
                "step_s": statistics.median(res["times"]),
            }
    return out


# ----------------------------------------------------------------------------- the record (CSV) and its report


def _append(path: Path, fields: list, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with path.open(newline="") as fh:
            header = next(csv.reader(fh), None)
        if header != fields:
            raise SystemExit(f"{path} has another header ({header}); move it away to record here")
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _newest(rows: list[dict]) -> dict[str, list[dict]]:
    """run -> the rows of its most recent recording (runs in the order default, scale, tiny, others)."""
    stamp: dict = {}
    for row in rows:
        stamp[row["run"]] = max(stamp.get(row["run"], ""), row["timestamp"])
    order = list(SIZES)
    runs = sorted(stamp, key=lambda r: (order.index(r) if r in order else len(order), r))
    return {run: [r for r in rows if r["run"] == run and r["timestamp"] == stamp[run]] for run in runs}


def _cell(values: list[float], fmt: str) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def _label(head: str, setup: str) -> str:
    scale = 32.0
    for part in setup.split("; "):
        if part.startswith("s = "):
            scale = float(part[4:])
    return openset.LABELS.get(head, head).format(s=scale)


def _minutes(seconds: float) -> str:
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def run_table(rows: list[dict]) -> list[str]:
    """The markdown of one recorded run: its setup, the table (mean ± std over seeds), scale columns if any."""
    per_head: dict = defaultdict(lambda: defaultdict(list))
    extra: dict = {}
    for row in rows:
        if row["head"] == "":
            extra[row["metric"]] = row["value"]
            continue
        value = results.number(row["value"])
        per_head[row["head"]][row["metric"]].append(value if value is not None else row["value"])
    first = rows[0]
    seeds = max((len(m["auc"]) for m in per_head.values() if "auc" in m), default=0)
    memory = any("peak_extra_mib/cpu" in m for m in per_head.values())
    cols = ["head", *(title for title, _ in METRICS.values()), "train time per seed: wall (CPU)"]
    if memory:
        cols += ["head peak extra memory per step: fused `cpu` / `reference`", "head step time: fused / reference"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for head in sorted(per_head, key=lambda h: HEADS.index(h) if h in HEADS else 99):
        m = per_head[head]
        cells = [_label(head, first["setup"])]
        cells += [_cell([v for v in m.get(k, []) if isinstance(v, float)], fmt) for k, (_, fmt) in METRICS.items()]
        cpu = [v for v in m.get("cpu_s", []) if isinstance(v, float)]
        wall = [v for v in m.get("train_s", []) if isinstance(v, float)]
        cells.append(f"{_minutes(statistics.mean(wall))} ({_minutes(statistics.mean(cpu))})" if cpu and wall else "")
        if memory:

            def one(metric, fmt):
                v = m.get(metric, [""])[0]
                return f"**{v}**" if isinstance(v, str) else fmt(v)

            def mib(v):
                return f"{v:.1f} MiB"

            def sec(v):
                return f"{v * 1e3:.1f} ms"

            cells.append(f"{one('peak_extra_mib/cpu', mib)} / {one('peak_extra_mib/reference', mib)}")
            cells.append(f"{one('step_s/cpu', sec)} / {one('step_s/reference', sec)}")
        lines.append("| " + " | ".join(cells) + " |")
    vers = "; ".join(p for p in first["versions"].split("; ") if not p.startswith("load "))
    load = [p for p in first["versions"].split("; ") if p.startswith("load ")]
    total = results.number(extra.get("wall_s"))
    cpu_total = sum(v for m in per_head.values() for v in m.get("cpu_s", []) if isinstance(v, float))
    jobs = re.search(r"(\d+) training\(s\) at once", first["setup"])
    timing = ""
    if total:
        timing = f" All heads × seeds trained and evaluated in {_minutes(total)} wall clock"
        timing += f" ({_minutes(cpu_total)} of CPU time in the trainings"
        if jobs and int(jobs.group(1)) > 1:
            timing += f"; ≈ {_minutes(cpu_total / int(jobs.group(1)))} on {jobs.group(1)} idle cores, an estimate"
        timing += ")."
    head = [
        f"**{first['run']}** — `{extra.get('command', '')}` on **{first['device']}**, {first['timestamp']}; {vers}"
        + (f"; 1-minute load when recorded {load[0][5:]}" if load else ""),
        "",
        first["setup"] + f"; mean ± std over {seeds} seed(s)." + timing,
        "",
    ]
    return head + lines + [""]


def roc_figure(rows: list[dict], run: str, setup: str) -> Optional[dict]:
    """The ROC curves of one run's heads (TAR averaged over seeds at each FAR), as plain data."""
    points: dict = defaultdict(lambda: defaultdict(list))
    for row in rows:
        points[row["head"]][float(row["far"])].append(float(row["tar"]))
    if not points:
        return None
    series = []
    for i, head in enumerate(sorted(points, key=lambda h: HEADS.index(h) if h in HEADS else 99)):
        series.append(
            {
                "label": _label(head, setup),
                "color": plot.COLORS[i % len(plot.COLORS)],
                "line": "--" if head == "softmax" else "-",
                "points": [[far, round(statistics.mean(t), 6)] for far, t in sorted(points[head].items())],
            }
        )
    return {
        "style": 1,
        "kind": "roc",
        "size": [7.5, 5.5],
        "dpi": 110,
        "title": f"verification on unseen glyph identities ({run} run)",
        "x_label": "false accept rate (impostor pairs above the threshold)",
        "y_label": "true accept rate (genuine pairs above it), mean over seeds",
        "series": series,
    }


def circle_figure(rows: list[dict]) -> Optional[dict]:
    """Softmax beside ArcFace: each identity's normalized 2-D embeddings (points) and class weights (rays)."""
    heads: dict = defaultdict(lambda: {"points": defaultdict(list), "weights": {}})
    for row in rows:
        entry = heads[row["head"]]
        if row["kind"] == "weight":
            entry["weights"][int(row["code"])] = float(row["angle"])
        else:
            entry["points"][int(row["code"])].append(float(row["angle"]))
    if not heads:
        return None
    panels = []
    for head in sorted(heads, key=lambda h: HEADS.index(h) if h in HEADS else 99):
        codes = sorted(heads[head]["points"])
        panels.append(
            {
                "title": _label(head, "s = 16").replace("(linear + CE; baseline)", "(linear + CE)"),
                "identities": [
                    {
                        "label": f"U+{code:04X}",
                        "color": plot.COLORS[i % len(plot.COLORS)],
                        "angles": heads[head]["points"][code],
                        "weight": heads[head]["weights"].get(code),
                    }
                    for i, code in enumerate(codes)
                ],
            }
        )
    return {
        "style": 1,
        "kind": "circle",
        "size": [5.0 * len(panels), 5.2],
        "dpi": 110,
        "title": "2-D embeddings of training glyphs, normalized (points) and class weights (dashed rays)",
        "panels": panels,
    }


def draw(figure: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if figure["kind"] == "roc":
        fig, ax = plt.subplots(figsize=tuple(figure["size"]))
        for s in figure["series"]:
            ax.plot(
                [p[0] for p in s["points"]], [p[1] for p in s["points"]], s["line"], color=s["color"], label=s["label"]
            )
        ax.set_xscale("log")
        ax.set_xlabel(figure["x_label"])
        ax.set_ylabel(figure["y_label"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title(figure["title"], fontsize=10)
    else:
        fig, axes = plt.subplots(1, len(figure["panels"]), figsize=tuple(figure["size"]), squeeze=False)
        circle = (
            [math.cos(2 * math.pi * k / 200) for k in range(201)],
            [math.sin(2 * math.pi * k / 200) for k in range(201)],
        )
        for ax, panel in zip(axes[0], figure["panels"]):
            ax.plot(*circle, color="#cccccc", lw=0.8)
            for ident in panel["identities"]:
                xs = [math.cos(a) for a in ident["angles"]]
                ys = [math.sin(a) for a in ident["angles"]]
                ax.scatter(xs, ys, s=14, alpha=0.35, color=ident["color"], label=ident["label"], edgecolors="none")
                if ident["weight"] is not None:
                    w = ident["weight"]
                    ax.plot([0, 1.12 * math.cos(w)], [0, 1.12 * math.sin(w)], "--", color=ident["color"], lw=1)
            ax.set_aspect("equal")
            ax.set_xlim(-1.25, 1.25)
            ax.set_ylim(-1.25, 1.25)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(panel["title"], fontsize=9)
        axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=1.5)
        fig.suptitle(figure["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=figure["dpi"], metadata={plot.PNG_KEY: plot.fingerprint(figure)})
    plt.close(fig)
    return Path(path)


def figures(folder: Path, prefer: str = "default") -> dict[str, dict]:
    """PNG name -> figure data, from the record in ``folder`` (the newest run of size ``prefer``, else of any)."""
    folder = Path(folder)
    record = _newest(_read(folder / RECORD))
    out = {}
    roc = _newest(_read(folder / ROC))
    pick = next((r for r in (prefer, *roc) if r in roc), None)
    if pick is not None:
        setup = record[pick][0]["setup"] if pick in record else ""
        fig = roc_figure(roc[pick], pick, setup)
        if fig:
            out[ROC_PNG] = fig
    circle = _newest(_read(folder / CIRCLE))
    pick = next((r for r in (prefer, *circle) if r in circle), None)
    if pick is not None:
        fig = circle_figure(circle[pick])
        if fig:
            out[CIRCLE_PNG] = fig
    return out


def tables(folder: Path) -> list[tuple[str, int]]:
    """(run, number of head rows) of each table render_block writes from ``folder``'s record."""
    return [
        (run, len({r["head"] for r in rows if r["head"]}))
        for run, rows in _newest(_read(Path(folder) / RECORD)).items()
    ]


def render_block(folder: Path, readme_dir: Path, plots: Optional[Path] = None) -> str:
    """The markdown between bench/README.md's glyph markers, from the record in ``folder`` (PNGs in ``plots``,
    default the same folder)."""
    folder = Path(folder)
    plots = Path(plots) if plots is not None else folder
    record = _newest(_read(folder / RECORD))
    if not record:
        command = "python -m bench.openset --data glyphs --record"
        return f"(no glyph results yet: run `{command}`, then `python -m bench.report`)\n"
    out = [
        f"_Generated by `python -m bench.report` from `{RECORD}`, `{ROC}` and `{CIRCLE}` (the most recent run of each "
        "size); edit the CSV, not this text._",
        "",
    ]
    for rows in record.values():
        out += run_table(rows)
    for name, fig in figures(folder).items():
        alt = "ROC curves" if fig["kind"] == "roc" else "2-D embeddings on the circle"
        out.append(f"![{alt}]({os.path.relpath(plots.resolve() / name, readme_dir)})")
    return "\n".join(out).rstrip() + "\n"


def write_plots(folder: Path, prefer: str = "default", out: Optional[Path] = None) -> list[tuple[Path, str]]:
    """Draw each figure of ``folder``'s record into ``out`` (default: the same folder) whose PNG does not carry its
    data's hash; leave the others untouched (their bytes vary with the matplotlib version and fonts)."""
    out = Path(out) if out is not None else Path(folder)
    done = []
    for name, fig in figures(folder, prefer).items():
        path = out / name
        fresh = path.exists() and plot.png_fingerprint(path) == plot.fingerprint(fig)
        if not fresh:
            out.mkdir(parents=True, exist_ok=True)
            draw(fig, path)
        done.append((path, "unchanged" if fresh else "drew"))
    return done


def check_plots(folder: Path, out: Optional[Path] = None) -> list[tuple[Path, Optional[str], str]]:
    """(PNG, None if it was drawn from the record's data else why not, that data's sha256) per figure."""
    out = Path(out) if out is not None else Path(folder)
    checked = []
    for name, fig in figures(folder).items():
        path, digest = out / name, plot.fingerprint(fig)
        if not path.exists():
            problem = "missing: python -m bench.report draws it from the glyph record"
        elif plot.png_fingerprint(path) != digest:
            problem = "stale: not drawn from the glyph record's data (the sha256 in the PNG differs)"
        else:
            problem = None
        checked.append((path, problem, digest))
    return checked


# ----------------------------------------------------------------------------- the command


def _config(args) -> dict:
    cfg = dict(SIZES[args.size])
    for key in ("train_ids", "test_ids", "epochs", "batch", "seeds", "embedding_size", "width"):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    if args.heads:
        cfg["heads"] = tuple(h.strip() for h in args.heads.split(",") if h.strip())
    cfg.update(
        backend=args.backend,
        scale=args.scale,
        lr=args.lr,
        warmup=args.warmup,
        threads=args.threads,
        data_seed=args.data_seed,
    )
    return cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.openset --data glyphs", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="default", help="default, tiny (CI) or scale (20k ids)")
    parser.add_argument("--heads", default=None, help="comma list (default: the size's): " + ",".join(HEADS))
    parser.add_argument("--backend", default="auto", help="marginops backend of the margin heads (auto: fused cpu)")
    parser.add_argument("--train-ids", type=int, default=None)
    parser.add_argument("--test-ids", type=int, default=None)
    parser.add_argument("--epochs", type=float, default=None, help="passes over the training photos")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--embedding-size", type=int, default=None)
    parser.add_argument("--width", type=int, default=None, help="channels of the CNN's first convolution")
    parser.add_argument("--scale", type=float, default=32.0, help="s of the normalized heads")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--warmup", type=float, default=0.2, help="share of the steps with a linear lr warm-up")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training")
    parser.add_argument(
        "--jobs", type=int, default=results.usable_cores(), help="trainings at once, one process each (default: cores)"
    )
    parser.add_argument("--no-circle", action="store_true", help="skip the 2-D picture")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default=None, help="folder of the CSVs and PNGs (default bench/results/local)")
    where.add_argument("--record", action="store_true", help="append to the committed record bench/results")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    cfg = _config(args)
    unknown = [h for h in cfg["heads"] if h not in HEADS]
    if unknown:
        parser.error(f"unknown heads {unknown}; known: {HEADS}")
    out = results.RESULTS_DIR if args.record else Path(args.out) if args.out else results.LOCAL_DIR
    start = time.perf_counter()
    try:
        data = glyphs.load(data_spec(cfg))
        circle_data = glyphs.load(data_spec(cfg, circle=True)) if cfg["circle_ids"] and not args.no_circle else None
    except glyphs.MissingFontError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    render_s = time.perf_counter() - start
    _LOADED[data_spec(cfg)] = data
    from marginops import ops

    backend = ops.resolve_backend(cfg["backend"], torch.device("cpu"))
    steps = steps_for(cfg, len(data.train_labels))
    device = results.device_name("cpu")
    tasks = [(h, seed, cfg) for h in cfg["heads"] for seed in range(cfg["seeds"])]
    setup = (
        f"{len(data.train_codes):,} training identities × {data.per_identity} photos ({len(data.faces)} font faces × "
        f"{cfg['augs']} augmentation), {len(data.test_codes):,} unseen test identities × {data.per_identity} photos; "
        f"CNN width {cfg['width']}, D = {cfg['embedding_size']}, {steps:,} SGD steps of B = {cfg['batch']} "
        f"({cfg['epochs']:g} epochs, lr {cfg['lr']:g} with {cfg['warmup']:.0%} warm-up, cosine); "
        f"s = {cfg['scale']:g}; margin heads on backend {backend!r}; "
        f"{min(args.jobs, len(tasks))} training(s) at once × {cfg['threads']} thread(s)"
    )
    print(setup, flush=True)
    done: dict = defaultdict(list)
    pairs = None
    for res in _pool_map(run_one, tasks, args.jobs):
        done[res["head"]].append(res)
        pairs = res["pairs"]
        m = res["metrics"]
        print(
            f"  {res['head']:15s} seed {res['seed']}: AUC {m['auc']:.4f}, TAR@1e-3 {m['tar@1e-3']:.3f}, "
            f"TAR@1e-4 {m['tar@1e-4']:.3f}, top-1 {m['top1']:.3f}, loss {m['loss']:.2f} "
            f"({m['train_s']:.0f} s, CPU {m['cpu_s']:.0f} s)",
            flush=True,
        )
    circles = []
    if circle_data is not None:
        _LOADED[data_spec(cfg, circle=True)] = circle_data
        circles = list(_pool_map(run_circle, [(h, cfg) for h in CIRCLE_HEADS], args.jobs))
    probes = {}
    if args.size == "scale":
        for h in cfg["heads"]:
            probes[h] = memory_probe(h, cfg, len(data.train_codes))
    wall_s = time.perf_counter() - start - render_s
    setup += f"; {pairs[0]:,} genuine and {pairs[1]:,} impostor pairs"

    stamp, vers = results.now(), results.versions()
    command = " ".join(["python -m bench.openset --data glyphs", *(a for a in argv if a != "--record")])
    common = dict(run=args.size, setup=setup, device=device, versions=vers, timestamp=stamp)
    rows = [dict(common, head="", seed="", metric="command", value=command)]
    rows.append(dict(common, head="", seed="", metric="wall_s", value=f"{wall_s:.1f}"))
    rows.append(dict(common, head="", seed="", metric="render_s", value=f"{render_s:.1f}"))
    roc_rows = []
    for head in cfg["heads"]:
        for res in sorted(done[head], key=lambda r: r["seed"]):
            for metric, value in res["metrics"].items():
                rows.append(dict(common, head=head, seed=res["seed"], metric=metric, value=f"{value:.6g}"))
            roc_rows += [
                dict(run=args.size, head=head, seed=res["seed"], far=f"{far:.6g}", tar=f"{tar:.6g}", timestamp=stamp)
                for far, tar in res["roc"]
            ]
        for provider, probe in probes.get(head, {}).items():
            for metric, value in probe.items():
                text = value if isinstance(value, str) else f"{value:.6g}"
                rows.append(dict(common, head=head, seed="", metric=f"{metric}/{provider}", value=text))
    circle_rows = []
    for c in circles:
        shown: dict = defaultdict(int)
        for label, angle in zip(c["labels"], c["angles"]):
            shown[label] += 1
            if shown[label] > CIRCLE_POINTS:
                continue
            circle_rows.append(
                dict(
                    run=args.size,
                    head=c["head"],
                    code=c["codes"][label],
                    kind="embedding",
                    angle=f"{angle:.4f}",
                    timestamp=stamp,
                )
            )
        if len(c["weight_angles"]) == len(c["codes"]):
            for code, angle in zip(c["codes"], c["weight_angles"]):
                circle_rows.append(
                    dict(run=args.size, head=c["head"], code=code, kind="weight", angle=f"{angle:.4f}", timestamp=stamp)
                )
    _append(out / RECORD, RECORD_FIELDS, rows)
    if roc_rows:
        _append(out / ROC, ROC_FIELDS, roc_rows)
    if circle_rows:
        _append(out / CIRCLE, CIRCLE_FIELDS, circle_rows)
    print()
    print("\n".join(run_table(rows)))
    for path, what in write_plots(out, prefer=args.size):
        print(f"{what}: {path}")
    print(f"appended to {out / RECORD}" + (" (then: python -m bench.report)" if args.record else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
