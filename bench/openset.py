"""``python -m bench.openset``: what margins buy — verification and identification on identities never seen.

The same small embedding network (bench/synthetic.py) is trained with each head — a plain softmax
classifier (a linear layer, no normalization, no margin: the baseline), NormFace, CosFace, ArcFace,
CurricularFace and SphereFace (marginops.nn modules, default margins; s = 32 for these 10^3 classes) — on
synthetic training identities, then evaluated on a disjoint set of identities drawn from the same world:

* verification: cosine similarity of every pair of test embeddings; ROC AUC and TAR at FAR = 1e-3
  (the threshold is the similarity that 0.1 % of the impostor pairs exceed);
* closed-set identification: one enrolled sample per test identity forms the gallery, every other
  sample is a probe; top-1 = the nearest gallery entry is the right identity.

Every head sees the same batches and starts from the same network weights; with --seeds N the table
shows mean ± std over N seeds (world, identities and initialization all change with the seed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from . import results
from .synthetic import IdentityWorld, embedding_net

HEADS = ["softmax", "normface", "cosface", "arcface", "curricularface", "sphereface"]
# every head make_head builds (the glyph benchmark trains them all; the synthetic default keeps the six above)
ALL_HEADS = HEADS + ["adaface", "magface", "elasticface", "subcenter"]
LABELS = {
    "softmax": "Softmax (linear + CE; baseline)",
    "normface": "NormFace (s={s:g})",
    "cosface": "CosFace (s={s:g}, m=0.35)",
    "arcface": "ArcFace (s={s:g}, m=0.5)",
    "curricularface": "CurricularFace (s={s:g}, m=0.5, EMA t)",
    "sphereface": "SphereFace (m=4, annealed λ)",
    "adaface": "AdaFace (s={s:g}, m=0.4, h=0.333)",
    "magface": "MagFace (s={s:g}, m ∈ [0.45, 0.8], λ_g=35)",
    "elasticface": "ElasticFace-Arc (s={s:g}, m ~ N(0.5, 0.05))",
    "subcenter": "Sub-center ArcFace (s={s:g}, m=0.5, k=3)",
}


class SoftmaxHead(nn.Module):
    def __init__(self, embedding_size: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(embedding_size, num_classes)

    def forward(self, embeddings, labels):
        return nn.functional.cross_entropy(self.fc(embeddings), labels)


def make_head(
    name: str, embedding_size: int, num_classes: int, backend: str, scale: float = 32.0, seed: int = 0
) -> nn.Module:
    """The head ``name`` with its paper's default margins; ``seed`` seeds ElasticFace's margin draws."""
    import marginops

    if name == "softmax":
        return SoftmaxHead(embedding_size, num_classes)
    if name == "sphereface":  # logits scale with ‖x‖, no s
        return marginops.nn.SphereFaceLoss(embedding_size, num_classes, backend=backend)
    if name == "elasticface":  # its own generator: the same margins whatever else draws random numbers
        generator = torch.Generator().manual_seed(seed)
        return marginops.nn.ElasticFaceLoss(embedding_size, num_classes, s=scale, backend=backend, generator=generator)
    cls = {
        "normface": marginops.nn.NormFaceLoss,
        "cosface": marginops.nn.CosFaceLoss,
        "arcface": marginops.nn.ArcFaceLoss,
        "curricularface": marginops.nn.CurricularFaceLoss,
        "adaface": marginops.nn.AdaFaceLoss,
        "magface": marginops.nn.MagFaceLoss,
        "subcenter": marginops.nn.SubCenterArcFaceLoss,
    }[name]
    return cls(embedding_size, num_classes, s=scale, backend=backend)


def roc_auc(genuine: torch.Tensor, impostor: torch.Tensor) -> float:
    """Mann–Whitney estimate: the probability that a genuine pair scores above an impostor pair."""
    scores = torch.cat([genuine, impostor]).double()
    order = torch.argsort(scores)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=scores.dtype)
    n_pos, n_neg = genuine.numel(), impostor.numel()
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tar_at_far(genuine: torch.Tensor, impostor: torch.Tensor, far: float) -> float:
    k = max(1, int(far * impostor.numel()))
    threshold = torch.topk(impostor, k).values[-1]
    return float((genuine > threshold).double().mean())


def roc_curve(genuine: torch.Tensor, impostor: torch.Tensor, fars) -> list[tuple[float, float]]:
    """(FAR, TAR) at each FAR of ``fars`` that the impostor pairs resolve (at least one pair above the threshold);
    the same threshold rule as tar_at_far, with one sort for all points."""
    ranked = torch.sort(impostor, descending=True).values
    out = []
    for far in fars:
        if far * impostor.numel() < 1:
            continue
        k = int(far * impostor.numel())
        out.append((float(far), float((genuine > ranked[k - 1]).double().mean())))
    return out


def evaluate(embeddings: torch.Tensor, labels: torch.Tensor, per_identity: int, fars=(), curve=()) -> dict:
    """Verification (AUC, TAR at FAR 1e-3, and at each of ``fars`` under "tar_at"; the ROC at ``curve``'s FARs
    under "roc") and closed-set identification top-1 over all pairs of the embeddings."""
    e = nn.functional.normalize(embeddings.double(), dim=1)
    sims = e @ e.t()
    n = labels.numel()
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    same = labels[:, None] == labels[None, :]
    genuine, impostor = sims[upper & same], sims[upper & ~same]
    del sims, upper, same  # n² each: the pairs are all that is needed from here on
    # closed-set identification: the first sample of each identity is enrolled, the rest are probes
    first = torch.arange(0, n, per_identity)
    probe = torch.ones(n, dtype=torch.bool)
    probe[first] = False
    nearest = (e[probe] @ e[first].t()).argmax(dim=1)
    top1 = float((labels[first][nearest] == labels[probe]).double().mean())
    out = {
        "auc": roc_auc(genuine, impostor),
        "tar": tar_at_far(genuine, impostor, 1e-3),
        "top1": top1,
        "pairs": (genuine.numel(), impostor.numel()),
    }
    if fars:
        out["tar_at"] = {far: tar_at_far(genuine, impostor, far) for far in fars}
    if curve:
        out["roc"] = roc_curve(genuine, impostor, curve)
    return out


def run_one(head_name: str, seed: int, args) -> dict:
    world = IdentityWorld(seed=1234 + seed)
    renderer = world.renderer()
    train_codes = renderer.identities(args.train_ids, seed=10_000 + seed)
    test_codes = renderer.identities(args.test_ids, seed=20_000 + seed)
    torch.manual_seed(seed)
    net = embedding_net(world.input_dim, args.embedding_size)
    torch.manual_seed(seed + 1)
    head = make_head(head_name, args.embedding_size, args.train_ids, args.backend, args.scale, seed)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    start = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for x, labels in renderer.batches(train_codes, args.batch, args.steps, seed=30_000 + seed):
        loss = head(net(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    train_s = time.perf_counter() - start
    net.eval()
    with torch.no_grad():
        x, labels = renderer.gallery(test_codes, args.per_identity, seed=40_000 + seed)
        metrics = evaluate(net(x), labels, args.per_identity)
    metrics.update(loss=float(loss.detach()), seconds=train_s)
    if head_name == "sphereface":
        metrics["lambda"] = head.lambda_
    return metrics


def _cell(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--data", choices=["synthetic", "glyphs"], default="synthetic")
    known, rest = pre.parse_known_args(argv)
    if known.data == "glyphs":  # real images: its own options (python -m bench.openset --data glyphs --help)
        from . import openset_glyphs

        return openset_glyphs.main(rest)
    parser = argparse.ArgumentParser(prog="python -m bench.openset", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        choices=["synthetic", "glyphs"],
        default="synthetic",
        help="synthetic identities (this) or rendered CJK glyphs (bench/openset_glyphs.py; --data glyphs --help)",
    )
    parser.add_argument("--heads", default=",".join(HEADS), help="comma list: " + ",".join(ALL_HEADS))
    parser.add_argument("--backend", default="auto", help="marginops backend of the margin heads")
    parser.add_argument("--train-ids", type=int, default=1000)
    parser.add_argument("--test-ids", type=int, default=300, help="unseen identities in the evaluation")
    parser.add_argument("--per-identity", type=int, default=8, help="test samples per unseen identity")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument(
        "--scale",
        type=float,
        default=32.0,
        help="s of the normalized heads (32 suits 10^3 classes; 64, the library default, is meant for "
        "10^5+ classes and under-trains in this budget)",
    )
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--embedding-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the model is small)")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument(
        "--out",
        default=str(results.LOCAL_DIR / "openset.md"),
        help="also write the setup and the markdown table here ('' for no file; default under "
        "bench/results/local, ignored by git; bench/results/openset.md is the committed record)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    unknown = [h for h in heads if h not in ALL_HEADS]
    if unknown:
        parser.error(f"unknown heads {unknown}; known: {ALL_HEADS}")

    from marginops import ops

    backend = ops.resolve_backend(args.backend, torch.device("cpu"))
    setup = (
        f"open-set evaluation: {args.train_ids} training identities, {args.test_ids} unseen test identities × "
        f"{args.per_identity} samples, {args.steps} SGD steps of B={args.batch}, D={args.embedding_size}, "
        f"{args.seeds} seed(s); margin heads on backend {backend!r}; {results.device_name('cpu')}"
    )
    print(setup, flush=True)
    table = {}
    for head in heads:
        runs = [run_one(head, seed, args) for seed in range(args.seeds)]
        table[head] = runs
        extra = f", λ={runs[-1]['lambda']:.1f} at the end" if "lambda" in runs[-1] else ""
        print(
            f"  {head:15s} trained in {sum(r['seconds'] for r in runs):5.1f} s, final loss "
            f"{_cell([r['loss'] for r in runs], '.3f')}{extra}",
            flush=True,
        )
    pairs = next(iter(table.values()))[0]["pairs"]
    print(f"\n{pairs[0]:,} genuine and {pairs[1]:,} impostor pairs per seed; mean ± std over {args.seeds} seed(s)\n")
    cols = ["head", "ROC AUC", "TAR @ FAR=1e-3", "identification top-1", "final train loss"]
    body = [
        [
            LABELS[h].format(s=args.scale),
            _cell([r["auc"] for r in runs], ".5f"),
            _cell([r["tar"] for r in runs], ".3f"),
            _cell([r["top1"] for r in runs], ".3f"),
            _cell([r["loss"] for r in runs], ".3f"),
        ]
        for h, runs in table.items()
    ]
    markdown = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + [
        "| " + " | ".join(row) + " |" for row in body
    ]
    if args.out:
        from pathlib import Path

        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python -m bench.openset", *argv])
        path.write_text(
            f"`{command}`\n\n{setup}\n\n{pairs[0]:,} genuine and {pairs[1]:,} impostor pairs per seed; "
            f"mean ± std over {args.seeds} seed(s); {results.versions()}\n\n" + "\n".join(markdown) + "\n"
        )
        print(f"(also written to {path})\n")
    if args.markdown:
        print("\n".join(markdown))
    else:
        widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(cols)]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
        print("  ".join("-" * w for w in widths))
        for row in body:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
