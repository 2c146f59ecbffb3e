"""``python -m bench.convergence``: train the same small model with a fused backend and with the reference.

A small embedding network and a margin head (ArcFace, s=32, m=0.5 by default) are trained for a few hundred SGD
steps on synthetic identities generated on the fly (bench/synthetic.py), four times from the same
seed, the same initial weights and the same batches:

    ref64    backend="reference", float64     the trajectory without rounding noise (the truth)
    ref32    backend="reference", float32     what users train with today
    fused32  the fused backend, float32       the candidate
    fused64  the fused backend, float64       (where the backend supports float64)

Tolerance, and why.  The fused kernels compute the same function as the reference with a different
summation order (tiles, online log-sum-exp), so in float32 their losses differ from the reference's
by rounding, about 1e-7 relative per step; SGD then amplifies any perturbation along the trajectory.
How much it amplifies is measured, not guessed: ref32 against ref64 is exactly "float32 rounding,
amplified by this training".  The fused float32 curve passes when its distance to ref32 stays within
3× that envelope (both curves smoothed over 10 steps; the factor covers two independent rounding
streams instead of one, √2, with margin), plus 1e-3 absolute for the very first steps, where the
envelope is still ~0.  In float64 rounding is ~1e-16, so fused64 must match ref64 to 1e-6 relative over
the whole run: any real difference in the maths (a wrong gradient term, a mis-scaled margin) shows up
there at 1e-3 or more within a few steps.

Writes bench/results/convergence.png (the curves and their differences) and
bench/results/convergence_curves.csv; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

from . import results
from .synthetic import IdentityWorld, embedding_net

HEADS = {
    "arcface": "ArcFaceLoss",
    "cosface": "CosFaceLoss",
    "normface": "NormFaceLoss",
    "curricularface": "CurricularFaceLoss",
    "sphereface": "SphereFaceLoss",
    "combined": "CombinedMarginLoss",
}


def train(backend: str, dtype: torch.dtype, args, codes, renderer) -> list[float]:
    import marginops

    torch.manual_seed(args.seed)  # same initial weights for every run
    net = embedding_net(renderer.world.input_dim, args.embedding_size)
    kwargs = {} if args.margin == "sphereface" else {"s": args.scale}
    head = getattr(marginops.nn, HEADS[args.margin])(args.embedding_size, codes.shape[0], backend=backend, **kwargs)
    net.to(dtype)
    head.to(dtype)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=5e-4)
    losses = []
    for x, labels in renderer.batches(codes, args.batch, args.steps, seed=args.seed + 1):
        loss = head(net(x.to(dtype)), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def smooth(values: list[float], window: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def max_abs_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def fused_default() -> str:
    from marginops import ops

    return ops.resolve_backend("auto", torch.device("cpu"))


def plot(curves: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_d) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {
        "ref64": ("k", "-"),
        "ref32": ("tab:blue", "-"),
        "fused32": ("tab:orange", "--"),
        "fused64": ("tab:green", ":"),
    }
    for name, losses in curves.items():
        color, style = styles.get(name, (None, "-"))
        ax_l.plot(range(1, len(losses) + 1), losses, style, color=color, label=name, lw=1.2)
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("training loss")
    ax_l.set_yscale("log")
    ax_l.legend()
    ax_l.grid(True, which="both", alpha=0.3)
    pairs = [("fused32", "ref32", "tab:orange"), ("ref32", "ref64", "tab:blue"), ("fused64", "ref64", "tab:green")]
    for a, b, color in pairs:
        if a in curves and b in curves:
            diff = [max(abs(x - y), 1e-17) for x, y in zip(curves[a], curves[b])]
            ax_d.plot(range(1, len(diff) + 1), diff, color=color, lw=1, label=f"|{a} − {b}|")
    ax_d.set_yscale("log")
    ax_d.set_xlabel("step")
    ax_d.set_ylabel("|loss difference|")
    ax_d.legend()
    ax_d.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.convergence", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="the fused backend (default: auto's choice on the CPU)")
    parser.add_argument("--margin", default="arcface", choices=list(HEADS))
    parser.add_argument("--classes", type=int, default=2000, help="training identities")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--embedding-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--scale", type=float, default=32.0, help="s of the head (32 suits 10^3 classes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: the model is small, and on a shared machine more threads mostly wait)",
    )
    parser.add_argument(
        "--out",
        default=str(results.LOCAL_DIR),
        help="folder for the curves and the plot (default bench/results/local, ignored by git; "
        "bench/results is the committed record)",
    )
    parser.add_argument(
        "--no-float64", action="store_true", help="skip the float64 runs (then no envelope: ref32 vs fused32 only)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    backend = args.backend or fused_default()
    if backend == "reference":
        print(
            "note: no fused backend available here (auto chose the reference); comparing the reference with itself",
            file=sys.stderr,
        )

    renderer = IdentityWorld().renderer()
    codes = renderer.identities(args.classes, seed=args.seed + 100)
    runs = [("ref32", "reference", torch.float32), ("fused32", backend, torch.float32)]
    if not args.no_float64:
        runs = [("ref64", "reference", torch.float64)] + runs + [("fused64", backend, torch.float64)]
    curves, seconds = {}, {}
    for name, be, dtype in runs:
        start = time.perf_counter()
        try:
            curves[name] = train(be, dtype, args, codes, renderer)
        except Exception as exc:  # e.g. a backend without float64
            if name == "fused64":
                print(f"{name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", file=sys.stderr)
                continue
            raise
        seconds[name] = time.perf_counter() - start
        print(
            f"{name:8s} backend={be:10s} {str(dtype):14s} loss {curves[name][0]:.4f} -> {curves[name][-1]:.4f}"
            f"  ({seconds[name]:.1f} s)"
        )

    checks = []
    tol32 = None
    if "ref64" in curves:
        envelope = max_abs_diff(smooth(curves["ref32"]), smooth(curves["ref64"]))
        tol32 = 3.0 * envelope + 1e-3
    else:
        tol32 = 1e-3 * max(curves["ref32"])  # no envelope measured: 0.1% of the initial loss
    d32 = max_abs_diff(smooth(curves["fused32"]), smooth(curves["ref32"]))
    checks.append(("fused32 vs ref32 (10-step mean)", d32, tol32))
    if "fused64" in curves:
        d64 = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(curves["fused64"], curves["ref64"]))
        checks.append(("fused64 vs ref64 (relative, every step)", d64, 1e-6))
    if "ref64" in curves:
        print(f"float32 rounding envelope |ref32 − ref64| (10-step mean, max over steps): {envelope:.3g}")
    ok = True
    for name, value, tol in checks:
        passed = value <= tol
        ok &= passed
        print(f"{name}: max |Δ| = {value:.3g}  tolerance {tol:.3g}  {'PASS' if passed else 'FAIL'}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "convergence_curves.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step"] + list(curves))
        for i in range(args.steps):
            writer.writerow([i + 1] + [f"{curves[k][i]:.10g}" for k in curves])
    title = (
        f"{args.margin} (s={args.scale:g}), {args.classes} synthetic identities, B={args.batch}, "
        f"D={args.embedding_size}, "
        f"{args.steps} SGD steps; fused backend: {backend} · {results.device_name('cpu')}"
    )
    try:
        plot(curves, out / "convergence.png", title)
        print(f"wrote {out / 'convergence.png'} and {out / 'convergence_curves.csv'}")
    except ImportError as exc:
        print(f"no plot ({exc})", file=sys.stderr)
    print("convergence check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
