"""``python -m bench.report``: the benchmark table of bench/README.md, generated from the CSV (never typed by hand).

Replaces the text between ``<!-- bench-table:begin -->`` and ``<!-- bench-table:end -->`` in bench/README.md
with one table per device (the most recent measurement of each case), the plots drawn from the same
CSV and where the numbers came from, and redraws those plots beside the CSV (bench.plot.write_plots: only
those whose drawn data changed, with their hashes in plots.json).  Where the README also has
``<!-- glyph-table:begin -->`` … ``<!-- glyph-table:end -->``, the open-set tables on rendered glyphs go there, from
glyphs*.csv in the same folder, with their ROC and 2-D plots (bench/openset_glyphs.py; each PNG carries the
sha256 of the data it draws, which --check compares with the record).

    python -m bench.report                 # rewrite bench/README.md's block and the plots from bench/results/*.csv
    python -m bench.report --print         # only print the block
    python -m bench.report --check         # exit 1 if the block or a plot is not what the CSV gives
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections import defaultdict
from pathlib import Path

from . import openset_glyphs, plot, results

BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"
# the open-set tables on rendered glyphs (bench/openset_glyphs.py), from glyphs*.csv beside the other CSVs
GLYPH_BEGIN, GLYPH_END = "<!-- glyph-table:begin -->", "<!-- glyph-table:end -->"
ROOT = Path(__file__).resolve().parent.parent
MODE_ORDER = {"forward+backward": 0, "forward": 1, "backward": 2}
ANCHOR_NOTE = {
    "matmul": "plain GEMMs only",
    "torch_lce": "`F.linear_cross_entropy` + `LinearCrossEntropyOptions()`, no margin",
    "liger": "Liger-Kernel fused linear CE, no margin",
    "cce": "Cut Cross-Entropy, no margin",
}


def _fmt_time(v: float) -> str:
    if v < 1e-3:
        return f"{v * 1e6:.0f} µs"
    if v < 1:
        return f"{v * 1e3:.1f} ms"
    return f"{v:.3g} s" if v < 100 else f"{v:.0f} s"


def _fmt_mem(v: float) -> str:
    return f"{v / 1024:.2f} GiB" if v >= 1024 else f"{v:.1f} MiB"


def _ratio(a, b) -> str:
    if a is None or b is None or b <= 0:
        return ""
    return f"{a / b:.2f}×"


def collect(rows: list[dict]) -> dict:
    """device -> {case key: {metric: row}}, case key = (mode, dtype, B, C, D, margin, provider)."""
    out: dict = defaultdict(dict)
    for row in rows:
        info = results.parse_kernel(row["kernel"])
        axis = results.AXES[row["x_name"]]
        info[axis] = int(row["x_value"])
        key = (row["mode"], info["dtype"], info["B"], info["C"], info["D"], info["margin"], row["provider"])
        out[row["device"]].setdefault(key, {})[row["metric"]] = row
    return out


def _provider_label(provider: str, margin: str) -> str:
    if provider in ANCHOR_NOTE:
        return f"{provider} ({ANCHOR_NOTE[provider]})"
    return provider


def device_table(cases: dict, mode_filter: str) -> list[str]:
    lines = [
        "| dtype | B × C × D | margin | provider | median time (p20–p80) | peak extra memory | time vs reference "
        "| memory vs reference | time vs matmul anchor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def sort_key(key):
        mode, dtype, b, c, d, margin, provider = key
        order = ["reference", "cpu", "cuda", "triton", "torch_lce", "liger", "cce", "matmul"]
        return (
            MODE_ORDER.get(mode, 9),
            dtype,
            b,
            d,
            c,
            margin == "nomargin",
            margin,
            order.index(provider) if provider in order else 99,
        )

    def value(key, metric):
        row = cases.get(key, {}).get(metric)
        return results.number(row["p50"]) if row else None

    for key in sorted(cases, key=sort_key):
        mode, dtype, b, c, d, margin, provider = key
        if mode != mode_filter:
            continue
        metrics = cases[key]
        t_row = metrics.get("time")
        if t_row is None:
            continue
        t = results.number(t_row["p50"])
        mem = value(key, "peak_extra_memory")
        # the reference of the same margin (anchors: any margin's reference at that size)
        ref_keys = [
            k for k in cases if k[:5] == key[:5] and k[6] == "reference" and (k[5] == margin or margin == "nomargin")
        ]
        ref_t = value(ref_keys[0], "time") if ref_keys else None
        ref_m = value(ref_keys[0], "peak_extra_memory") if ref_keys else None
        mm_t = value(key[:5] + ("nomargin", "matmul"), "time")
        if t is None:
            timing, memory = f"**{t_row['p50']}**", ""
        else:
            p20, p80 = results.number(t_row["p20"]), results.number(t_row["p80"])
            timing = f"{_fmt_time(t)} ({_fmt_time(p20)}–{_fmt_time(p80)})"
            memory = _fmt_mem(mem) if mem is not None else ""
        is_ref = provider == "reference"
        lines.append(
            f"| {dtype} | {b:,} × {c:,} × {d} | {'—' if margin == 'nomargin' else margin} | "
            f"{_provider_label(provider, margin)} | {timing} | {memory} | "
            f"{'1×' if is_ref and t is not None else _ratio(t, ref_t)} | "
            f"{'1×' if is_ref and mem is not None else _ratio(mem, ref_m)} | "
            f"{'' if provider == 'matmul' else _ratio(t, mm_t)} |"
        )
    return lines


def _modes(cases: dict) -> list[str]:
    return sorted({k[0] for k in cases}, key=lambda m: MODE_ORDER.get(m, 9))


def tables(rows: list[dict]) -> list[tuple[str, str, int]]:
    """(device, mode, number of table rows) of each table render() writes for ``rows``."""
    out = []
    for device, cases in sorted(collect(results.latest(rows)).items()):
        out += [(device, mode, len(device_table(cases, mode)) - 2) for mode in _modes(cases)]
    return out


def render(rows: list[dict], plots_dir: Path, readme_dir: Path) -> str:
    """The markdown that goes between the markers."""
    newest = results.latest(rows)
    if not newest:
        return "(no results yet: run `python -m bench --quick`, then `python -m bench.report`)"
    out = [
        "_Generated by `python -m bench.report` from `bench/results/*.csv` (most recent run of each case); "
        "edit the CSV, not this table._",
        "",
    ]
    figures = plot.figures(newest)
    for device, cases in sorted(collect(newest).items()):
        dev_rows = [r for r in newest if r["device"] == device]
        stamps = sorted({r["timestamp"] for r in dev_rows})
        vers, loads = set(), []
        for r in dev_rows:
            parts = r["versions"].split("; ")
            loads += [float(p[5:]) for p in parts if p.startswith("load ") and results.number(p[5:]) is not None]
            vers.add("; ".join(p for p in parts if not p.startswith("load ")))
        load = ""
        if loads:
            load = f"; 1-minute load {min(loads):.1f}" + (f"–{max(loads):.1f}" if max(loads) > min(loads) else "")
        out.append(
            f"**{device}** — measured {stamps[0]}"
            + (f" … {stamps[-1]}" if len(stamps) > 1 else "")
            + f"; {' / '.join(sorted(vers))}{load}"
        )
        out.append("")
        pngs = [  # the plots bench.report draws beside the CSV, whether or not they exist yet
            f"![{f['group']['rest']} {f['group']['mode']} on {device}]({os.path.relpath(plots_dir / name, readme_dir)})"
            for name, f in figures.items()
            if f["group"]["device"] == device
        ]
        modes = _modes(cases)
        for i, mode in enumerate(modes):
            if i == 1:
                out += ["<details><summary>forward only / backward only (" + ", ".join(modes[1:]) + ")</summary>", ""]
            out += [f"*{mode}*" + (" (backward: the forward runs untimed before it)" if mode == "backward" else ""), ""]
            out += device_table(cases, mode)
            out.append("")
            if i == 0 and pngs:
                out += pngs + [""]
        if len(modes) > 1:
            out += ["</details>", ""]
    out.append(
        "Time: median per iteration with its 20th–80th percentiles; each case runs in its own process. "
        "Peak extra memory: the case's high-water mark beyond its inputs and their gradients (CPU: resident set "
        "of the case's own process, large allocations returned to the OS on free; CUDA: allocator peak). "
        "The matmul anchor is the plain GEMMs of a linear head: x·Wᵀ (forward), G·W and Gᵀ·x (backward), all "
        "three for forward+backward. Anchors without a margin (torch_lce, liger, cce) compute plain softmax "
        "cross-entropy of s·x̂·ŵᵀ on x, W normalized beforehand: context, not a like-for-like comparison "
        "(torch_lce computes its gradients during the forward, so its *backward* row is near zero). "
        "**out of memory** / **timeout** / **skipped** (not run after an out of memory or timeout at a smaller "
        "size) / **unavailable** are recorded as such. The `load` in each row's versions column is the "
        "machine's 1-minute load average when it was measured."
    )
    return "\n".join(out).rstrip() + "\n"


def replace_block(text: str, block: str, begin: str = BEGIN, end: str = END) -> str:
    if begin not in text or end not in text:
        raise SystemExit(f"README has no {begin} … {end} block")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{block}{end}{tail}"


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (shorter messages)."""
    rel = os.path.relpath(path)
    return path.as_posix() if rel.startswith("..") else rel


def check(rows: list[dict], readme: Path, block: str, plots_dir: Path, again: str, glyph=None) -> int:
    """--check: one line per table and plot checked, a last OK line; exit 1 naming each stale one.
    ``glyph``: (folder of glyphs*.csv, its block) when the README has the glyph markers."""
    stale = []
    text = readme.read_text()
    if replace_block(text, block) != text:
        stale.append(f"{_shown(readme)}: the benchmark block is stale (its tables are not what the CSV gives)")
    else:
        for device, mode, n in tables(rows):
            print(f"ok    table {_shown(readme)} · {device} · {mode}: {n} rows, as the CSV gives")
    n_tables = len(tables(rows))
    checked = plot.check_plots(results.latest(rows), plots_dir)
    if glyph is not None:
        folder, glyph_block = glyph
        if replace_block(text, glyph_block, GLYPH_BEGIN, GLYPH_END) != text:
            stale.append(f"{_shown(readme)}: the glyph block is stale (its tables are not what glyphs*.csv gives)")
        else:
            for run, n in openset_glyphs.tables(folder):
                print(f"ok    table {_shown(readme)} · glyphs · {run}: {n} rows, as glyphs.csv gives")
        n_tables += len(openset_glyphs.tables(folder))
        checked += openset_glyphs.check_plots(folder, plots_dir)
    for path, problem, digest in checked:
        if problem is None:
            print(f"ok    plot  {_shown(path)}: drawn data sha256 {digest[:12]}, as the CSV gives")
        else:
            stale.append(f"{_shown(path)}: {problem}")
    if stale:
        for line in stale:
            print(f"stale {line}", file=sys.stderr)
        print(f"{len(stale)} stale; regenerate with: {again}", file=sys.stderr)
        return 1
    print(f"OK: {n_tables} tables in {_shown(readme)} and {len(checked)} plots in {_shown(plots_dir)} match the CSV")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=str(results.RESULTS_DIR), help="a CSV file or a folder of them")
    parser.add_argument("--readme", default=str(ROOT / "bench" / "README.md"))
    parser.add_argument("--plots", default=None, help="folder of the PNGs (default: the CSV's folder)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--print", action="store_true", help="print the block, change nothing")
    group.add_argument("--check", action="store_true", help="exit 1 if the README's block or a plot is stale")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    files = results.csv_files(Path(args.csv))
    rows = results.read_csv(files) if files else []
    plots_dir = (
        Path(args.plots) if args.plots else (Path(args.csv) if Path(args.csv).is_dir() else Path(args.csv).parent)
    )
    readme = Path(args.readme)
    block = render(rows, plots_dir.resolve(), readme.resolve().parent)
    text = readme.read_text() if readme.exists() or not args.print else ""
    glyph = None
    if GLYPH_BEGIN in text and GLYPH_END in text:
        folder = Path(args.csv) if Path(args.csv).is_dir() else Path(args.csv).parent
        glyph = (folder, openset_glyphs.render_block(folder, readme.resolve().parent, plots_dir))
    if args.print:
        print(block)
        if glyph is not None:
            print(glyph[1])
        return 0
    new = replace_block(text, block)
    if glyph is not None:
        new = replace_block(new, glyph[1], GLYPH_BEGIN, GLYPH_END)
    if args.check:
        again = shlex.join(["python", "-m", "bench.report", *(a for a in argv if a != "--check")])
        return check(rows, readme, block, plots_dir, again, glyph)
    if new != text:
        readme.write_text(new)
        print(
            f"updated the generated blocks of {readme} ({len(block.splitlines())} + "
            f"{len(glyph[1].splitlines()) if glyph else 0} lines)"
        )
    else:
        print(f"{readme}: generated blocks already up to date")
    for path, what in plot.write_plots(results.latest(rows), plots_dir):
        print(f"{what}: {path}")
    if glyph is not None:
        for path, what in openset_glyphs.write_plots(glyph[0], out=plots_dir):
            print(f"{what}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
