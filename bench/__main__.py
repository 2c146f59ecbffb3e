"""``python -m bench``: fused backends against the reference and the anchors, each case in its own process.

Default (the issue's first benchmark): ArcFace, forward+backward, B=512, C=200,000, D=256, float32 on
the CPU, providers reference, cpu and matmul (the three plain GEMMs).  ``--quick`` is a small sweep
over C (a smoke run, about a minute or two on 2 cores) that also draws the plots; ``--sweep`` runs the
full sweep over C (CPU 10k, 50k, 200k, 1M; GPU 100k, 1M, 4M, 10M), or over B or D with
``--sweep B`` / ``--sweep D``.  Rows are appended to ``<out>/<device>.csv`` and printed with the ratios the
targets are stated in.  ``<out>`` is bench/results/local by default (ignored by git: a run leaves the clone
clean); ``--record`` appends to the committed record bench/results instead, from which ``python -m bench.report``
regenerates the README table and the committed plots (``--check``: fail if either is stale).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from . import results
from .providers import MARGINS, PLAIN_DEFAULTS, PROVIDERS, QUICK_DEFAULTS, SWEEP_DEFAULTS, availability, package_version

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is a nicety: plain iteration without it
    tqdm = None

MODES = ("forward", "backward", "forward+backward")
ROOT = Path(__file__).resolve().parent.parent

# sweep values per device and axis, and the fixed sizes beside them
SWEEP_VALUES = {
    "cpu": {"C": [10_000, 50_000, 200_000, 1_000_000], "B": [128, 256, 512, 1024], "D": [64, 128, 256, 512]},
    "cuda": {"C": [100_000, 1_000_000, 4_000_000, 10_000_000], "B": [256, 512, 1024, 2048], "D": [128, 256, 512, 1024]},
}
BASE_SIZE = {"cpu": (512, 200_000, 256), "cuda": (1024, 1_000_000, 512)}
QUICK = {
    "sizes": {
        "cpu": [(128, c, 128) for c in (10_000, 50_000, 200_000)],
        "cuda": [(1024, c, 512) for c in (100_000, 1_000_000)],
    },
    "repeats": 3,
}
AXIS_NAME = {"C": "num_classes", "B": "batch", "D": "dim"}


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    """'512x200000x256,1024x1000000x512' -> [(B, C, D), ...]"""
    sizes = []
    for item in text.split(","):
        parts = item.lower().replace("×", "x").split("x")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"size {item!r} is not BxCxD (e.g. 512x200000x256)")
        b, c, d = (int(float(v)) for v in parts)
        sizes.append((b, c, d))
    return sizes


def parse_values(text: str) -> list[int]:
    """'10k,50k,1M' -> [10000, 50000, 1000000]"""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        scale = {"k": 1_000, "m": 1_000_000}.get(item[-1:], 1)
        out.append(int(float(item.rstrip("km")) * scale))
    return out


def _comma_list(text: str, known, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if items == ["all"]:
        return list(known)
    bad = [t for t in items if t not in known]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (known: {', '.join(known)})")
    return items


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="providers: " + "; ".join(f"{n}: {pr.note}" for n, pr in PROVIDERS.items()),
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--quick",
        action="store_true",
        help="a small sweep over C with plots (CPU: B=128, D=128, C=10k,50k,200k; GPU: B=1024, D=512, C=100k,1M)",
    )
    p.add_argument(
        "--sweep",
        nargs="?",
        const="C",
        choices=["C", "B", "D"],
        help="sweep one axis (default C) over --values or the device's defaults",
    )
    p.add_argument("--values", type=parse_values, help="values of the swept axis, e.g. 10k,50k,200k,1M")
    p.add_argument("--sizes", type=parse_sizes, help="explicit BxCxD list, e.g. 512x200000x256,256x50000x128")
    p.add_argument("--batch", type=int, help="B beside a sweep (CPU 512, GPU 1024)")
    p.add_argument("--classes", type=int, help="C beside a B or D sweep (CPU 200000, GPU 1000000)")
    p.add_argument("--dim", type=int, help="D beside a sweep (CPU 256, GPU 512)")
    p.add_argument("--margins", default="arcface", help="comma list or 'all': " + ",".join(MARGINS))
    p.add_argument(
        "--backends",
        help="comma list of providers or 'all' (default: cpu: reference,cpu,matmul, "
        "--sweep adds torch_lce; cuda: reference,cuda,triton,matmul, --quick and "
        "--sweep add torch_lce,liger,cce)",
    )
    p.add_argument("--modes", default="forward+backward", help="comma list or 'all': " + ",".join(MODES))
    p.add_argument("--dtype", default=None, help="float32 (CPU default) / bfloat16 (GPU default) / float16")
    p.add_argument("--repeats", type=int, default=None, help="timed iterations per case (7; --quick 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--min-seconds",
        type=float,
        default=1.0,
        help="short cases repeat until this much timed work (at most --max-repeats iterations)",
    )
    p.add_argument("--max-repeats", type=int, default=50)
    p.add_argument("--max-seconds", type=float, default=90.0, help="stop repeating after this (at least 3 iterations)")
    p.add_argument("--timeout", type=float, default=1200.0, help="wall-clock limit of one case's process (s)")
    p.add_argument(
        "--mem-limit",
        type=float,
        default=None,
        help="CPU: memory budget of one case in GiB (default 80%% of MemAvailable); beyond it: out of memory",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads per case (default torch's)")
    p.add_argument(
        "--out", default=None, help="folder for the CSV and plots (default bench/results/local, ignored by git)"
    )
    p.add_argument(
        "--record",
        action="store_true",
        help="append to the committed record bench/results (then commit it) instead of bench/results/local",
    )
    p.add_argument("--no-plot", action="store_true", help="do not draw plots after a sweep")
    return p


def plan(args) -> tuple[list[tuple[int, int, int]], str, list[str], int]:
    """(sizes, x_name, providers, repeats) from the options."""
    device = args.device
    base_b, base_c, base_d = BASE_SIZE[device]
    b, c, d = args.batch or base_b, args.classes or base_c, args.dim or base_d
    x_name = "num_classes"
    if args.sizes:
        sizes = args.sizes
    elif args.sweep:
        axis = args.sweep
        values = args.values or SWEEP_VALUES[device][axis]
        x_name = AXIS_NAME[axis]
        sizes = [(v if axis == "B" else b, v if axis == "C" else c, v if axis == "D" else d) for v in values]
    elif args.quick:
        quick = QUICK["sizes"][device]
        sizes = (
            quick if not args.values else [(args.batch or quick[0][0], v, args.dim or quick[0][2]) for v in args.values]
        )
    else:
        sizes = [(b, c, d)]
    default = (SWEEP_DEFAULTS if args.sweep else QUICK_DEFAULTS if args.quick else PLAIN_DEFAULTS)[device]
    providers = _comma_list(args.backends, PROVIDERS, "provider") if args.backends else default
    repeats = args.repeats or (QUICK["repeats"] if args.quick else 7)
    return sizes, x_name, providers, repeats


def make_specs(args, sizes, x_name, providers, repeats, dtype, mem_limit) -> list[dict]:
    margins = _comma_list(args.margins, MARGINS, "margin")
    modes = _comma_list(args.modes, MODES, "mode")
    specs = []
    for b, c, d in sizes:
        for mode in modes:
            for provider in providers:
                anchor = not PROVIDERS[provider].margin_aware
                for margin in margins[:1] if anchor else margins:  # anchors have no margin: run once
                    specs.append(
                        dict(
                            provider=provider,
                            margin=margin,
                            kernel_margin="nomargin" if anchor else margin,
                            mode=mode,
                            batch=b,
                            classes=c,
                            dim=d,
                            dtype=dtype,
                            device=args.device,
                            repeats=repeats,
                            warmup=args.warmup,
                            max_seconds=args.max_seconds,
                            min_seconds=args.min_seconds,
                            max_repeats=args.max_repeats,
                            threads=args.threads,
                            mem_limit_bytes=mem_limit,
                            x_name=x_name,
                        )
                    )
    return specs


def case_env(spec: dict) -> dict:
    """The case's environment.  On the CPU, glibc serves every allocation of 1 MiB or more with its own
    mmap and returns it on free (instead of recycling freed heap pages, which hides temporaries from
    the resident set), so the resident-set peak follows the live tensors to about 1 MiB."""
    env = dict(os.environ)
    if spec["device"] == "cpu":
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    return env


def run_case(spec: dict, timeout: float) -> dict:
    """Run one case in a fresh process; out-of-memory and crashes come back as data."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.cases", json.dumps(spec)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=timeout,
            env=case_env(spec),
        )
    except subprocess.TimeoutExpired:
        return {"error": "timeout", "detail": f"over {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    if proc.returncode in (-9, 137) or "MemoryError" in proc.stderr or "can't allocate memory" in proc.stderr:
        return {"error": "out of memory", "detail": f"killed (rc {proc.returncode}): {tail}"}
    return {"error": "failed", "detail": f"rc {proc.returncode}: {tail}"}


def _busy_warning(device: str, threads: int):
    """A note when other work competes for the cores: CPU timings then mostly measure the scheduler."""
    if device != "cpu":
        return None
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = results.usable_cores()
    if load > 0.75 * cores:
        hint = " (with fewer threads than busy cores, --threads 1 gives steadier numbers)" if threads > 1 else ""
        return f"warning: the machine is busy (load {load:.1f} on {cores} cores); timings will be noisy{hint}"
    return None


def _case_key(spec):
    return (spec["provider"], spec["kernel_margin"], spec["mode"], spec["dtype"])


def _size_label(spec) -> str:
    return f"{spec['batch']}×{spec['classes']}×{spec['dim']}"


def output_dir(args) -> Path:
    """Where a run writes: --out, else the committed record with --record, else the ignored local folder."""
    if args.out is not None and args.record:
        raise SystemExit("--out and --record: pick one (--record means --out bench/results)")
    if args.out is not None:
        return Path(args.out)
    return results.RESULTS_DIR if args.record else results.LOCAL_DIR


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.out = str(output_dir(args))
    import torch  # after argument parsing, so that --help is instant

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible to torch", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)  # the cases use the same count; the device column shows it
    sizes, x_name, providers, repeats = plan(args)
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    mem_limit = None
    if args.device == "cpu":
        mem_limit = int(args.mem_limit * 2**30) if args.mem_limit else int(0.8 * mem_available()) or None
    specs = make_specs(args, sizes, x_name, providers, repeats, dtype, mem_limit)

    # availability once per provider, in this process (this also builds the C++ extension on first use)
    reasons = {}
    for name in providers:
        reason = availability(name, args.device)
        if reason:
            reasons[name] = reason
            print(f"[bench] {name}: unavailable: {reason.splitlines()[0]}", file=sys.stderr)
    extra_versions = [
        f"{m} {v}"
        for m in ("liger_kernel", "cut_cross_entropy")
        if {"liger_kernel": "liger", "cut_cross_entropy": "cce"}[m] in providers and (v := package_version(m))
    ]
    device = results.device_name(args.device)
    stamp = results.now()
    print(f"[bench] {len(specs)} cases on {device}; {results.versions(extra_versions)}", file=sys.stderr)
    busy = _busy_warning(args.device, torch.get_num_threads())
    if busy:
        print(f"[bench] {busy}", file=sys.stderr)

    rows, table, failed_at = [], [], {}
    bar = tqdm(total=len(specs), desc="bench", unit="case", dynamic_ncols=True) if tqdm else None
    for spec in specs:
        label = f"{spec['provider']} {spec['kernel_margin']} {spec['mode']} {_size_label(spec)}"
        if bar is not None:
            bar.set_postfix_str(label, refresh=True)
        if spec["provider"] in reasons:
            result = {"error": "unavailable", "detail": reasons[spec["provider"]]}
        elif _case_key(spec) in failed_at:
            result = {"error": "skipped", "detail": f"{failed_at[_case_key(spec)]} at a smaller size"}
        else:
            result = run_case(spec, args.timeout)
            if result.get("error") in ("out of memory", "timeout"):
                failed_at[_case_key(spec)] = result["error"]
        rows += results.rows_for_case(spec, result, device, stamp, extra_versions)
        table.append((spec, result))
        if bar is not None:
            bar.update(1)
        elif "error" not in result:
            print(f"  {label}: {results.quantiles(result['times'])[0]:.4f} s", file=sys.stderr)
    if bar is not None:
        bar.close()

    path = results.append_csv(rows, Path(args.out), f"{args.device}.csv")
    print_table(table, device, results.versions(extra_versions))
    # rows are per case and metric (time, peak_extra_memory, peak_memory; a case that did not run has its
    # time row only), so the row count alone reads like three times the cases
    metrics = ", ".join(dict.fromkeys(r["metric"] for r in rows))
    n_cases = f"{len(specs)} case" + ("s" if len(specs) != 1 else "")
    print(f"\nappended {n_cases} to {path}: {len(rows)} rows, one per case and metric ({metrics})")
    if Path(args.out).resolve() == results.LOCAL_DIR.resolve():
        print("(ignored by git; rerun with --record to add them to the committed bench/results)")
    elif Path(args.out).resolve() == results.RESULTS_DIR.resolve():
        print("(the committed record: python -m bench.report regenerates its tables and plots)")
    distinct_x = {r["x_value"] for r in rows}
    if len(distinct_x) > 1 and not args.no_plot:
        from . import plot

        try:
            kernels = {r["kernel"] for r in rows}
            for png in plot.plot_rows(results.latest(results.read_csv([path])), Path(args.out), kernels=kernels):
                print(f"plot: {png}")
        except ImportError as exc:
            print(f"no plots ({exc}); pip install matplotlib", file=sys.stderr)
    return 0


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def print_table(table, device: str, versions: str) -> None:
    print(f"\ndevice: {device}\nversions: {versions}")
    header = (
        f"{'margin':<15}{'mode':<18}{'B×C×D':<20}{'provider':<16}{'median':>11}{'p20':>11}{'p80':>11}"
        f"{'peak extra MiB':>16}"
    )
    print(header)
    print("-" * len(header))
    measured = {}
    for spec, res in table:
        size = _size_label(spec)
        margin = spec["kernel_margin"]
        if "error" in res:
            detail = res.get("detail", "").splitlines()[0][:70] if res.get("detail") else ""
            print(f"{margin:<15}{spec['mode']:<18}{size:<20}{spec['provider']:<16}  {res['error']}: {detail}")
            continue
        p50, p20, p80 = results.quantiles(res["times"])
        mem = res["peak_extra_bytes"] / 2**20
        key = (spec["mode"], spec["batch"], spec["classes"], spec["dim"])
        measured.setdefault(key, {})[(spec["provider"], margin)] = (p50, mem)
        print(
            f"{margin:<15}{spec['mode']:<18}{size:<20}{spec['provider']:<16}{_fmt_time(p50):>11}"
            f"{_fmt_time(p20):>11}{_fmt_time(p80):>11}{mem:>16.1f}"
        )
    anchors = [n for n, p in PROVIDERS.items() if not p.margin_aware]
    lines = []
    for (mode, b, c, d), by in measured.items():
        refs = {m: v for (p, m), v in by.items() if p == "reference"}
        mm = by.get(("matmul", "nomargin"))
        for (provider, margin), (p50, mem) in by.items():
            if provider == "reference" or provider == "matmul":
                continue
            ref = refs.get(margin) or (next(iter(refs.values())) if refs and provider in anchors else None)
            parts = []
            if ref is not None:
                parts.append(
                    f"time {p50 / ref[0]:.3f}× reference, peak extra memory {mem / max(ref[1], 1e-9):.3f}× reference"
                )
            if mm is not None:
                gemms = {"forward": "the 1 GEMM", "backward": "the 2 GEMMs"}.get(mode, "the 3 GEMMs")
                parts.append(f"time {p50 / mm[0]:.2f}× {gemms} of the matmul anchor")
            other = PROVIDERS[provider].compare_to
            if other is not None and (other, margin) in by:
                parts.append(f"time {p50 / by[(other, margin)][0]:.3f}× {other} (same run)")
            if parts:
                tag = f"{provider} ({margin})" if provider not in anchors else f"{provider} (no-margin anchor)"
                lines.append(f"{tag} at {b}×{c}×{d} {mode}: " + ", ".join(parts))
    if lines:
        print()
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
