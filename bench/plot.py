"""``python -m bench.plot``: time and peak memory against the swept size, per provider, from the CSV.

One PNG per (device, dtype, fixed sizes, mode, swept axis): left the median time per iteration with
its p20–p80 band, right the peak memory beyond the inputs and their gradients, both on log–log axes.
No-margin anchors are dashed; cases that ran out of memory (or time) are listed in the legend.

Each figure is first reduced to plain data (figures(): series, points, bands, labels, axes) and drawn from
it.  plots.json beside the PNGs holds the sha256 of each figure's data, and each PNG carries the same hash in
its text chunk; a plot whose data did not change is not redrawn, so redrawing the committed plots leaves
them byte-identical whatever the matplotlib version.  ``python -m bench.report --check`` compares the hashes
with the record.

    python -m bench.plot                       # bench/results/local's CSVs (else the record's) -> bench/results/local
    python -m bench.plot --record              # the committed plots from the record (python -m bench.report does too)
    python -m bench.plot --csv bench/results/cpu.csv --out /tmp/plots
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import struct
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


# the hash covers a figure's data, not how draw() renders it: bump STYLE when draw() changes the look
STYLE = 1
FIGSIZE, DPI = (12.0, 4.8), 110
# matplotlib's tab10, written out so that a figure's colours are part of its data, not of rcParams
COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
Y_LABELS = ("median time per iteration (s), p20–p80 band", "peak extra memory (MiB)")
MANIFEST = "plots.json"  # beside the PNGs: file name -> sha256 of the data each one draws
PNG_KEY = "marginops drawn data sha256"  # the same hash, in the PNG's own text chunk


def figures(rows: list[dict], kernels: Optional[Iterable[str]] = None) -> dict[str, dict]:
    """file name -> everything its figure draws (series, points, bands, labels, axes), as plain data.

    ``rows`` are already reduced with results.latest; only groups with at least two x values are drawn."""
    wanted = {k.partition("/")[2] for k in kernels} if kernels is not None else None
    groups: dict = defaultdict(list)
    for row in rows:
        key = _group_key(row)
        if wanted is None or key[1] in wanted:
            groups[key].append(row)
    out = {}
    for (device, rest, mode, x_name), group in sorted(groups.items()):
        n_sizes = len({r["x_value"] for r in group})
        if n_sizes < 2:
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
        drawn = []
        for label, data in sorted(series.items()):
            status = sorted(data["status"])
            time = [
                [x, y, lo if lo is not None else y, hi if hi is not None else y]
                for x, y, lo, hi in sorted(data["time"])
            ]
            memory = [[x, max(y, 1e-3)] for x, y, _, _ in sorted(data["peak_extra_memory"])]  # log axis: no zeros
            if not (time or memory or status):
                continue
            drawn.append(
                {
                    "label": label + (" — " + describe_status(status, n_sizes) if status else ""),
                    "line": "--" if "(no margin)" in label else "-",
                    "color": COLORS[len(drawn) % len(COLORS)],
                    "time": time,
                    "memory": memory,
                    "status": [list(s) for s in status],
                }
            )
        out[file_name(device, rest, mode, x_name)] = {
            "style": STYLE,
            "size": list(FIGSIZE),
            "dpi": DPI,
            "group": {"device": device, "rest": rest, "mode": mode, "x_name": x_name},
            "title": f"{rest} · {mode} · {device}",
            "x_label": X_LABEL.get(x_name, x_name),
            "y_labels": list(Y_LABELS),
            "scale": "log",
            "series": drawn,
        }
    return out


def fingerprint(figure: dict) -> str:
    """sha256 of what a figure draws: stable across matplotlib versions and fonts, unlike the PNG's bytes."""
    text = json.dumps(figure, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def draw(figure: dict, path: Path) -> Path:
    """Render one entry of figures(): time (left) and peak extra memory (right) against the swept size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=tuple(figure["size"]))
    for s in figure["series"]:
        style = {"color": s["color"], "label": s["label"]}
        if s["time"]:
            xs = [p[0] for p in s["time"]]
            ax_t.plot(xs, [p[1] for p in s["time"]], s["line"], marker="o", **style)
            ax_t.fill_between(xs, [p[2] for p in s["time"]], [p[3] for p in s["time"]], alpha=0.2, color=s["color"])
        elif s["status"]:  # nothing measured: still say so in the legend
            ax_t.plot([], [], s["line"], marker="x", **style)
        if s["memory"]:
            ax_m.plot([p[0] for p in s["memory"]], [p[1] for p in s["memory"]], s["line"], marker="o", **style)
    for ax, ylabel in zip((ax_t, ax_m), figure["y_labels"]):
        ax.set_xscale(figure["scale"])
        ax.set_yscale(figure["scale"])
        ax.set_xlabel(figure["x_label"])
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(figure["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=figure["dpi"], metadata={PNG_KEY: fingerprint(figure)})
    plt.close(fig)
    return Path(path)


def png_fingerprint(path: Path) -> Optional[str]:
    """The hash draw() stored in a PNG's text chunk (None: absent, or not a PNG drawn by draw())."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"tEXt":
            key, _, value = data[pos + 8 : pos + 8 + length].partition(b"\0")
            if key.decode("latin-1") == PNG_KEY:
                return value.decode("latin-1")
        if kind == b"IEND":
            break
        pos += 12 + length
    return None


def plot_rows(rows: list[dict], out_dir: Path, kernels: Optional[Iterable[str]] = None) -> list[Path]:
    """Draw every figure of ``rows`` (already reduced with results.latest) into out_dir, no manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [draw(figure, out_dir / name) for name, figure in figures(rows, kernels).items()]


def read_manifest(out_dir: Path) -> dict:
    path = Path(out_dir) / MANIFEST
    return json.loads(path.read_text()).get("plots", {}) if path.exists() else {}


def _dropped(listed: dict, wanted: dict, rows: list[dict]) -> list[str]:
    """Plots the manifest lists that ``rows`` no longer draw, of the devices ``rows`` has: reading one device's
    CSV never drops another device's plots."""
    devices = {r["device"] for r in rows}
    return sorted(name for name, entry in listed.items() if name not in wanted and entry.get("device") in devices)


def check_plots(rows: list[dict], out_dir: Path) -> list[tuple[Path, Optional[str], str]]:
    """(PNG, None if it is what ``rows`` draw else why not, sha256 of the record's data) for each plot of
    ``rows`` and each plot the manifest lists that ``rows`` no longer draw.  Reads files, draws nothing."""
    out_dir = Path(out_dir)
    listed = read_manifest(out_dir)
    checked = []
    wanted = figures(rows)
    for name, figure in wanted.items():
        path, digest = out_dir / name, fingerprint(figure)
        entry = listed.get(name)
        if entry is None:
            problem = f"not in {MANIFEST}: not drawn by bench.report from the record"
        elif entry["sha256"] != digest:
            problem = f"stale: the record's data for it changed since it was drawn ({MANIFEST} has sha256 "
            problem += f"{entry['sha256'][:12]}, the record gives {digest[:12]})"
        elif not path.exists():
            problem = f"missing, though {MANIFEST} lists it"
        elif png_fingerprint(path) != digest:
            problem = f"the PNG was not drawn from the data {MANIFEST} lists (redrawn by another tool, or by hand?)"
        else:
            problem = None
        checked.append((path, problem, digest))
    for name in _dropped(listed, wanted, rows):
        checked.append((out_dir / name, f"{MANIFEST} lists it, but the record draws no such plot", ""))
    return checked


def write_plots(rows: list[dict], out_dir: Path) -> list[tuple[Path, str]]:
    """Bring out_dir's plots and manifest in line with ``rows``: draw each figure whose data changed (or whose
    PNG is missing or not drawn from it), leave the others' files untouched (their bytes would vary with the
    matplotlib version and fonts), delete the PNGs of plots the manifest lists and ``rows`` no longer draw.
    Returns (PNG, 'drew' / 'unchanged' / 'removed') per plot."""
    out_dir = Path(out_dir)
    wanted = figures(rows)
    listed = read_manifest(out_dir)
    if not wanted and not listed:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    done, manifest = [], {}
    for name, figure in wanted.items():
        path, digest = out_dir / name, fingerprint(figure)
        fresh = listed.get(name, {}).get("sha256") == digest and path.exists() and png_fingerprint(path) == digest
        if not fresh:
            draw(figure, path)
        done.append((path, "unchanged" if fresh else "drew"))
        manifest[name] = {
            "sha256": digest,
            "device": figure["group"]["device"],
            "title": figure["title"],
            "series": [s["label"] for s in figure["series"]],
            "x": sorted({p[0] for s in figure["series"] for p in s["time"] + s["memory"]}),
        }
    dropped = _dropped(listed, wanted, rows)
    for name in dropped:
        (out_dir / name).unlink(missing_ok=True)
        done.append((out_dir / name, "removed"))
    manifest.update({n: e for n, e in listed.items() if n not in wanted and n not in dropped})  # other devices'
    manifest = dict(sorted(manifest.items()))
    text = {
        "about": "written by python -m bench.report (and python -m bench.plot --record) with the PNGs it lists: "
        "sha256 of the data each plot draws (series, points, bands, labels, axes), which python -m bench.report "
        "--check compares with the record; never edited by hand",
        "plots": manifest,
    }
    (out_dir / MANIFEST).write_text(json.dumps(text, indent=2, ensure_ascii=False) + "\n")
    return done


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
    done = write_plots(results.latest(results.read_csv(files)), out)
    if not any(what != "removed" for _, what in done):
        print(
            "nothing to plot: no group with two or more sizes (run a sweep: python -m bench --quick)", file=sys.stderr
        )
        return 1
    for path, what in done:
        print(f"{what}: {path}")
    if args.record:
        print("(the README's tables come from the same record: python -m bench.report writes both)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
