"""``python -m bench.plot``: time and peak memory against the swept size, per provider, from the CSV.

One PNG per (device, dtype, fixed sizes, mode, swept axis): left the median time per iteration with
its p20–p80 band, right the peak memory beyond the inputs and their gradients, both on log–log axes.
No-margin anchors are dashed; cases that ran out of memory (or time) are listed in the legend.

    python -m bench.plot                       # every CSV in bench/results, PNGs beside them
    python -m bench.plot --csv bench/results/cpu.csv --out /tmp/plots
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional

from . import results

X_LABEL = {"num_classes": "number of classes C", "batch": "batch size B", "dim": "embedding size D"}
ANCHORS = ("matmul", "torch_lce", "liger", "cce")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9+]+", "-", text.lower()).strip("-")


def _group_key(row: dict) -> tuple:
    margin, _, rest = row["kernel"].partition("/")
    return (row["device"], rest, row["mode"], row["x_name"])


def _shorten(slug: str, limit: int) -> str:
    """``slug`` cut to at most ``limit`` characters at a '-' (whole words: no "…-2-threa")."""
    if len(slug) <= limit:
        return slug
    cut = slug[: limit + 1].rfind("-")
    return slug[:cut] if cut > 0 else slug[:limit]


def file_name(device: str, rest: str, mode: str, x_name: str) -> str:
    device_slug = _shorten(_slug(device), 40)
    return f"{device_slug}_{_slug(rest)}_{_slug(mode)}_{x_name}.png"


def describe_status(status: list[tuple[int, str]], n_sizes: int) -> str:
    """[(x, 'out of memory'), (x2, 'skipped')] -> 'out of memory at ≥ 1,000,000' (skips follow from it)."""
    by_word: dict = defaultdict(list)
    for x, word in status:
        by_word[word].append(x)
    skipped = by_word.pop("skipped", [])
    parts = []
    for word, xs in by_word.items():
        xs = sorted(xs)
        if len(xs) == n_sizes:
            parts.append(word)
        elif skipped and word in ("out of memory", "timeout"):
            parts.append(f"{word} at ≥ {xs[0]:,} (larger sizes not run)")
        else:
            parts.append(f"{word} at " + ", ".join(f"{x:,}" for x in xs))
    if skipped and not parts:
        parts.append("not run at " + ", ".join(f"{x:,}" for x in sorted(skipped)))
    return "; ".join(parts)


def plot_rows(rows: list[dict], out_dir: Path, kernels: Optional[Iterable[str]] = None) -> list[Path]:
    """Draw the groups of ``rows`` (already reduced with results.latest) that have at least two x values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wanted = {k.partition("/")[2] for k in kernels} if kernels is not None else None
    groups: dict = defaultdict(list)
    for row in rows:
        key = _group_key(row)
        if wanted is None or key[1] in wanted:
            groups[key].append(row)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (device, rest, mode, x_name), group in sorted(groups.items()):
        if len({r["x_value"] for r in group}) < 2:
            continue
        margins = {r["kernel"].split("/")[0] for r in group if r["provider"] not in ANCHORS}
        series: dict = defaultdict(lambda: {"time": [], "peak_extra_memory": [], "status": []})
        for r in group:
            margin = r["kernel"].split("/")[0]
            if r["provider"] in ANCHORS:
                label = f"{r['provider']} (no margin)"
            else:
                label = r["provider"] if len(margins) <= 1 else f"{r['provider']} {margin}"
            x = int(r["x_value"])
            value = results.number(r["p50"])
            if value is None:
                if r["metric"] == "time":
                    series[label]["status"].append((x, r["p50"].split(" (")[0]))
                continue
            if r["metric"] in ("time", "peak_extra_memory"):
                series[label][r["metric"]].append((x, value, results.number(r["p20"]), results.number(r["p80"])))
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
        for label, data in sorted(series.items()):
            style = "--" if "(no margin)" in label else "-"
            status = data["status"]
            shown = label
            if status:
                shown += " — " + describe_status(status, len({r["x_value"] for r in group}))
            line = None
            if data["time"]:
                pts = sorted(data["time"])
                xs = [p[0] for p in pts]
                (line,) = ax_t.plot(xs, [p[1] for p in pts], style, marker="o", label=shown)
                lo = [p[2] if p[2] is not None else p[1] for p in pts]
                hi = [p[3] if p[3] is not None else p[1] for p in pts]
                ax_t.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())
            if data["peak_extra_memory"]:
                pts = sorted(data["peak_extra_memory"])
                kwargs = {"color": line.get_color()} if line is not None else {}
                ax_m.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], style, marker="o", label=shown, **kwargs)
            if line is None and status:  # nothing measured: still say so in the legend
                ax_t.plot([], [], style, marker="x", label=shown)
        for ax, ylabel in ((ax_t, "median time per iteration (s), p20–p80 band"), (ax_m, "peak extra memory (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(X_LABEL.get(x_name, x_name))
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=7, loc="upper left")
        ax_m.legend(fontsize=7, loc="upper left")
        fig.suptitle(f"{rest} · {mode} · {device}", fontsize=10)
        fig.tight_layout()
        path = out_dir / file_name(device, rest, mode, x_name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--csv",
        default=None,
        help="a CSV file or a folder of them (default: bench/results/local if it has CSVs, else the "
        "committed bench/results; with --record bench/results)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder for the PNGs (default: beside --csv if given; else bench/results/local, ignored "
        "by git, or with --record bench/results)",
    )
    parser.add_argument(
        "--record",
        action="store_true",
        help="redraw the committed plots: read bench/results and write the PNGs there (then commit)",
    )
    args = parser.parse_args(argv)
    if args.csv is None:  # the defaults never touch the committed record unless --record says so
        local = results.csv_files(results.LOCAL_DIR) if results.LOCAL_DIR.is_dir() else []
        args.csv = str(results.LOCAL_DIR if local and not args.record else results.RESULTS_DIR)
        if args.out is None and not args.record:
            args.out = str(results.LOCAL_DIR)
    files = results.csv_files(Path(args.csv))
    if not files:
        print(f"no CSV under {args.csv}; run python -m bench --quick first", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else (Path(args.csv) if Path(args.csv).is_dir() else Path(args.csv).parent)
    written = plot_rows(results.latest(results.read_csv(files)), out)
    if not written:
        print(
            "nothing to plot: no group with two or more sizes (run a sweep: python -m bench --quick)", file=sys.stderr
        )
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
