"""``python -m bench.tile_skipping``: how much of the backward's products gradient tile skipping could save.

With s = 64 most non-target softmax probabilities become tiny as a head trains.  A kernel could skip a tile's
two backward products (grad_x += dcos·W, grad_W += dcosᵀ·x) when every entry of the tile's logit-gradient block
is negligible.  This measures, before anything is built, how many tiles that would be and what it costs:

* the block: G_ij = |g_i| · p_ij · s_i · |dφ(c_ij)| for the non-target columns (the op's ``dcos`` operand; the
  target column's gradient goes to target_logit, outside the products, and is never skipped), with p the
  softmax of the margined logits built as marginops.reference builds them and g_i the upstream gradient of
  row i's loss (1/B for the mean);
* a tile (rows × classes) is skippable when every entry is below τ·|g_i| of its row, for τ = 2^-12, 2^-16;
  tiles of 64×64 and 128×128, and the CPU backend's blocks (B rows × ``choose_chunk`` classes);
* where: the random head at initialisation and the head along a training run (bench/synthetic.py data, the
  loop of bench/openset.py), ArcFace s=64 m=0.5 and CosFace s=64 m=0.35;
* what it does: the relative error of grad_x and grad_weight with the skipped tiles zeroed (float64, so that
  only skipping shows), and, where the share exceeds --train-threshold, a training run with skipping emulated
  (``SkipTilesLSE``) evaluated with bench/openset.py's TAR / identification metrics against the same run
  without it.

Writes shares.csv (and training.csv when trained with skipping) under --out.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import sys
import time
from pathlib import Path

import torch

from marginops.head_memory import choose_chunk
from marginops.loss_assembly import reduce_loss, row_losses
from marginops.margins import NORM_EPS, ArcFace, CosFace, Margin, pre_pass

from . import openset, results
from .synthetic import IdentityWorld, embedding_net

TAUS = (2.0**-12, 2.0**-16)
MARGINS = {"arcface": lambda: ArcFace(s=64.0, m=0.5), "cosface": lambda: CosFace(s=64.0, m=0.35)}
FIELDS = [
    "margin",
    "classes",
    "step",
    "train_loss",
    "tile",
    "tile_rows",
    "tile_cols",
    "tau",
    "tiles",
    "skipped",
    "share_tiles",
    "share_entries",
    "share_below",
    "above_per_row",
    "grad_x_rel",
    "grad_x_rel_max",
    "grad_w_rel",
    "grad_w_rel_max",
]


def tile_shapes(batch: int, classes: int, elem_size: int = 4) -> list[tuple[str, int, int]]:
    chunk = choose_chunk(batch, 1, classes, elem_size)
    # 1x1: every entry below the threshold dropped, the most (and the largest error) any tiling could give
    return [("1x1", 1, 1), ("64x64", 64, 64), ("128x128", 128, 128), (f"cpu {batch}x{chunk}", batch, chunk)]


def margined_logits(embeddings, weight, labels, margin: Margin):
    """(logits, factor, target, pre): the (B, C) logits as marginops.reference.margin_cross_entropy forms them
    (same operations, so the results agree bitwise), factor = s_i·|dφ(c_ij)| (0 on the target column) and the
    target mask.  Plain (B, C) head, mean reduction, no ignored rows, no filtering."""
    labels = labels.long()
    pre = pre_pass(margin, embeddings, weight, labels)
    w = weight.to(pre.x_hat.dtype)
    inv_norm = 1.0 / torch.linalg.vector_norm(w, dim=1).clamp_min(NORM_EPS)
    cos = pre.x_hat @ (w * inv_norm[:, None]).t()
    logits = pre.row_scale[:, None] * margin.phi(cos, pre.threshold)
    target = torch.nn.functional.one_hot(labels, cos.shape[1]).bool()
    logits = torch.where(target, pre.target_logit[:, None], logits)
    with torch.enable_grad():
        # φ is elementwise, so the gradient of its sum is dφ/dc entry by entry (through the margin's own phi)
        c = cos.detach().requires_grad_()
        (dphi,) = torch.autograd.grad(margin.phi(c, pre.threshold.detach()).sum(), c)
    with torch.no_grad():
        factor = torch.where(target, torch.zeros_like(dphi), pre.row_scale[:, None].abs() * dphi.abs())
    return logits, factor, target, pre


def skippable_tiles(block: torch.Tensor, g: torch.Tensor, tau: float, rows: int, cols: int) -> torch.Tensor:
    """(row tiles, column tiles) bool: every entry of the tile is below tau·|g_i| of its row.  ``block`` is the
    non-negative gradient block with 0 on target columns; ragged edge tiles are judged on their real entries."""
    below = block < tau * g.abs()[:, None]
    n_rows, n_cols = below.shape
    pad_r, pad_c = -n_rows % rows, -n_cols % cols
    # padding with True: entries outside the matrix never keep a tile
    below = torch.nn.functional.pad(below, (0, pad_c, 0, pad_r), value=True)
    return below.reshape((n_rows + pad_r) // rows, rows, (n_cols + pad_c) // cols, cols).all(dim=3).all(dim=1)


def skipped_entries(block: torch.Tensor, g: torch.Tensor, tau: float, rows: int, cols: int) -> torch.Tensor:
    """(B, C) bool: the entries that lie in a skippable tile."""
    tiles = skippable_tiles(block, g, tau, rows, cols)
    full = tiles.repeat_interleave(rows, dim=0).repeat_interleave(cols, dim=1)
    return full[: block.shape[0], : block.shape[1]]


class SkipTilesLSE(torch.autograd.Function):
    """torch.logsumexp over dim 1 whose backward zeroes the skippable tiles of the non-target logit gradient.

    The backward is logsumexp's own (grad · exp(z − lse)), so tau = 0 gives autograd's gradient bit for bit;
    the test of a tile uses grad·factor, the entries the op's products would see."""

    @staticmethod
    def forward(ctx, logits, factor, target, tau, rows, cols):
        lse = torch.logsumexp(logits, dim=1)
        ctx.save_for_backward(logits, lse, factor, target)
        ctx.tile = (tau, rows, cols)
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        logits, lse, factor, target = ctx.saved_tensors
        tau, rows, cols = ctx.tile
        grad = grad_lse.unsqueeze(1) * (logits - lse.unsqueeze(1)).exp()
        skip = skipped_entries(grad.abs() * factor, grad_lse, tau, rows, cols) & ~target
        grad = torch.where(skip, torch.zeros_like(grad), grad)
        return grad, None, None, None, None, None


def emulated_loss(embeddings, weight, labels, margin: Margin, tau: float, rows: int, cols: int) -> torch.Tensor:
    """The mean margin loss of marginops.reference with tile skipping emulated in the backward."""
    logits, factor, target, pre = margined_logits(embeddings, weight, labels, margin)
    lse = SkipTilesLSE.apply(logits, factor, target, tau, rows, cols)
    valid = torch.ones_like(labels, dtype=torch.bool)
    return reduce_loss(row_losses(lse, pre.target_logit, pre.extra_loss, valid), valid, "mean")


def gradient_block(embeddings, weight, labels, margin: Margin):
    """(G, g): the non-target logit-gradient block of the mean loss and the rows' upstream gradients."""
    with torch.no_grad():
        logits, factor, _, _ = margined_logits(embeddings, weight, labels, margin)
        g = torch.full((logits.shape[0],), 1.0 / logits.shape[0], dtype=logits.dtype)
        p = torch.softmax(logits, dim=1)
        return g[:, None] * p * factor, g


def _rel(approx: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    diff = approx - exact
    return float(diff.norm() / exact.norm()), float(diff.abs().max() / exact.abs().max())


def measure(margin: Margin, embeddings, weight, labels, shapes, taus=TAUS) -> list[dict]:
    """Skippable shares and gradient errors of one batch, in float64."""
    x = embeddings.detach().double()
    w = weight.detach().double()
    block, g = gradient_block(x, w, labels, margin)
    out = []
    exact = None
    for name, rows, cols in shapes:
        for tau in taus:
            # single entries below the threshold: the share tiles of one entry (1x1) would skip
            below_mask = block < tau * g.abs()[:, None]
            below = float(below_mask.double().mean())
            # non-target entries at or above the threshold per row (the target column counts as below)
            above = float((~below_mask).sum(dim=1).double().mean())
            tiles = skippable_tiles(block, g, tau, rows, cols)
            entries = skipped_entries(block, g, tau, rows, cols)
            grads = []
            for t in (0.0, tau) if exact is None else (tau,):
                xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
                emulated_loss(xl, wl, labels, margin, t, rows, cols).backward()
                grads.append((xl.grad, wl.grad))
            if exact is None:
                exact = grads.pop(0)
            (gx, gw), (ex, ew) = grads[0], exact
            rx, mx = _rel(gx, ex)
            rw, mw = _rel(gw, ew)
            out.append(
                dict(
                    tile=name,
                    tile_rows=rows,
                    tile_cols=cols,
                    tau=tau,
                    tiles=tiles.numel(),
                    skipped=int(tiles.sum()),
                    share_entries=float(entries.double().mean()),
                    share_below=below,
                    above_per_row=above,
                    grad_x_rel=rx,
                    grad_x_rel_max=mx,
                    grad_w_rel=rw,
                    grad_w_rel_max=mw,
                )
            )
    return out


def average(per_batch: list[list[dict]]) -> list[dict]:
    """Counts summed, shares and errors averaged over the measured batches."""
    rows = []
    for cases in zip(*per_batch):
        row = dict(cases[0])
        row["tiles"] = sum(c["tiles"] for c in cases)
        row["skipped"] = sum(c["skipped"] for c in cases)
        row["share_tiles"] = row["skipped"] / row["tiles"]
        for key in (
            "share_entries",
            "share_below",
            "above_per_row",
            "grad_x_rel",
            "grad_x_rel_max",
            "grad_w_rel",
            "grad_w_rel_max",
        ):
            row[key] = sum(c[key] for c in cases) / len(cases)
        rows.append(row)
    return rows


class EmulatedHead(torch.nn.Module):
    """A margin head computed as marginops.reference does, with tile skipping emulated in its backward."""

    def __init__(self, embedding_size: int, num_classes: int, margin: Margin, tau: float, rows: int, cols: int):
        super().__init__()
        self.margin, self.tau, self.rows, self.cols = margin, tau, rows, cols
        # as marginops.nn's heads: N(0, 0.01)
        self.weight = torch.nn.Parameter(torch.empty(num_classes, embedding_size).normal_(0.0, 0.01))

    def forward(self, embeddings, labels):
        return emulated_loss(embeddings, self.weight, labels, self.margin, self.tau, self.rows, self.cols)


def train(margin_name: str, args, tau: float = 0.0, tile=(64, 64), checkpoints=(), on_checkpoint=None) -> dict:
    """bench/openset.py's run_one with an EmulatedHead (SGD, momentum, cosine schedule; seed 0's world);
    on_checkpoint(step, net, head, loss) at the given steps (0: before the first update)."""
    seed = args.seed
    world = IdentityWorld(seed=1234 + seed)
    renderer = world.renderer()
    train_codes = renderer.identities(args.classes, seed=10_000 + seed)
    test_codes = renderer.identities(args.test_ids, seed=20_000 + seed)
    torch.manual_seed(seed)
    net = embedding_net(world.input_dim, args.embedding_size)
    torch.manual_seed(seed + 1)
    head = EmulatedHead(args.embedding_size, args.classes, MARGINS[margin_name](), tau, *tile)
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    start = time.perf_counter()
    loss = float("nan")
    if on_checkpoint and 0 in checkpoints:
        on_checkpoint(0, net, head, loss)
    for step, (x, labels) in enumerate(renderer.batches(train_codes, args.batch, args.steps, seed=30_000 + seed), 1):
        out = head(net(x), labels)
        opt.zero_grad(set_to_none=True)
        out.backward()
        opt.step()
        sched.step()
        loss = float(out.detach())
        if on_checkpoint and step in checkpoints:
            on_checkpoint(step, net, head, loss)
    seconds = time.perf_counter() - start
    net.eval()
    with torch.no_grad():
        x, labels = renderer.gallery(test_codes, args.per_identity, seed=40_000 + seed)
        metrics = openset.evaluate(net(x), labels, args.per_identity)
    metrics.update(loss=loss, seconds=seconds)
    return metrics


def measure_batches(margin_name: str, net, head, args) -> list[dict]:
    """Shares and errors on --measure-batches fresh training batches, the network in training mode (as the
    loss sees it) on a copy, so that the run's BatchNorm statistics stay untouched."""
    world = IdentityWorld(seed=1234 + args.seed)
    renderer = world.renderer()
    codes = renderer.identities(args.classes, seed=10_000 + args.seed)
    probe = copy.deepcopy(net).train()
    shapes = tile_shapes(args.batch, args.classes)
    per_batch = []
    with torch.no_grad():
        batches = list(renderer.batches(codes, args.batch, args.measure_batches, seed=50_000 + args.seed))
    for x, labels in batches:
        with torch.no_grad():
            emb = probe(x)
        per_batch.append(measure(MARGINS[margin_name](), emb, head.weight, labels, shapes))
    return average(per_batch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tile_skipping", description=__doc__.splitlines()[0])
    parser.add_argument("--margins", default="arcface,cosface", help="comma list: " + ",".join(MARGINS))
    parser.add_argument("--classes", default="2000", help="comma list of training identities (the head's classes)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--checkpoints", default="0,250,500,1000,2000", help="steps at which the head is measured")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--embedding-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--test-ids", type=int, default=300)
    parser.add_argument("--per-identity", type=int, default=8)
    parser.add_argument("--measure-batches", type=int, default=4, help="batches averaged at each checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--train-threshold",
        type=float,
        default=0.3,
        help="train with skipping emulated when a trained head's skippable tile share exceeds this",
    )
    parser.add_argument("--train-tile", default="64x64", help="rows x classes of the emulated training's tiles")
    parser.add_argument("--out", default=str(results.LOCAL_DIR / "tile_skipping"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",") if c.strip()} | {args.steps})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{results.device_name('cpu')}; {results.versions()}", flush=True)

    rows, training = [], []
    runs = [(m.strip(), int(c)) for c in args.classes.split(",") for m in args.margins.split(",") if m.strip()]
    for margin_name, classes in runs:
        run_args = argparse.Namespace(**{**vars(args), "classes": classes})

        def record(step, net, head, loss, margin_name=margin_name, run_args=run_args):
            for row in measure_batches(margin_name, net, head, run_args):
                row.update(margin=margin_name, classes=run_args.classes, step=step, train_loss=loss)
                rows.append(row)
                print(
                    f"{margin_name:8s} C={run_args.classes:5d} step {step:4d} loss {loss:7.3f}  {row['tile']:12s}"
                    f" tau=2^{math.log2(row['tau']):.0f}"
                    f"  skipped {row['skipped']:5d}/{row['tiles']:5d} ({row['share_tiles']:6.1%}; above per row "
                    f"{row['above_per_row']:6.1f})"
                    f"  grad_x {row['grad_x_rel']:.2e}  grad_w {row['grad_w_rel']:.2e}",
                    flush=True,
                )

        base = train(margin_name, run_args, checkpoints=checkpoints, on_checkpoint=record)
        base.update(margin=margin_name, classes=classes, tau=0.0, tile="none")
        training.append(base)
        print(f"{margin_name}: trained in {base['seconds']:.1f} s, TAR {base['tar']:.3f}, top-1 {base['top1']:.3f}")
        final = max(
            r["share_tiles"]
            for r in rows
            if r["margin"] == margin_name and r["classes"] == classes and r["step"] == args.steps and r["tile_rows"] > 1
        )
        if final <= args.train_threshold:
            print(f"{margin_name}: largest skippable share {final:.1%} <= {args.train_threshold:.0%}: no skip training")
            continue
        tile = tuple(int(v) for v in args.train_tile.split("x"))
        for tau in TAUS:
            run = train(margin_name, run_args, tau=tau, tile=tile)
            run.update(margin=margin_name, classes=classes, tau=tau, tile=args.train_tile)
            training.append(run)
            print(f"{margin_name} skip tau={tau:.3g}: TAR {run['tar']:.3f}, top-1 {run['top1']:.3f}", flush=True)

    with (out / "shares.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    with (out / "training.csv").open("w", newline="") as fh:
        keys = ["margin", "classes", "tile", "tau", "loss", "auc", "tar", "top1", "seconds"]
        writer = csv.DictWriter(fh, keys, extrasaction="ignore")
        writer.writeheader()
        for run in training:
            writer.writerow({k: (f"{run[k]:.6g}" if isinstance(run[k], float) else run[k]) for k in keys})
    print(f"wrote {out / 'shares.csv'} and {out / 'training.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
