"""``python -m bench``: fused backends against the reference, side by side in one run.

Default (the issue's first benchmark): ArcFace, forward+backward, B=512, C=200,000, D=256, float32,
providers reference, cpu and the three plain matmuls on the CPU.  Each case runs in its own process
(peak memory is per case); results are appended to bench/results/<device>.csv and printed with the
ratios that the targets are stated in.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from . import results

try:
    from tqdm import tqdm
except ImportError:  # progress bar is a nicety; plain iteration without it
    def tqdm(iterable, **_):
        return iterable


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    """'512x200000x256,1024x1000000x512' -> [(B, C, D), ...]"""
    sizes = []
    for item in text.split(","):
        b, c, d = (int(v) for v in item.lower().split("x"))
        sizes.append((b, c, d))
    return sizes


def run_case(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.cases", json.dumps(spec)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        if "MemoryError" in proc.stderr or proc.returncode in (-9, 137):
            return {"error": "out of memory", "detail": tail[0]}
        return {"error": "failed", "detail": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="smaller size and fewer repeats (a smoke run)")
    parser.add_argument("--sizes", help="BxCxD list, e.g. 512x200000x256,256x50000x128")
    parser.add_argument("--margins", default="arcface", help="comma list: " + ",".join(__import__("bench.cases").cases.MARGINS))
    parser.add_argument("--backends", help="comma list of providers (default: cpu: reference,cpu,matmul)")
    parser.add_argument("--modes", default="forward+backward", help="comma list of forward, forward+backward")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) / bfloat16 (GPU default) / float16")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=str(results.RESULTS_DIR), help="folder for the CSV")
    args = parser.parse_args(argv)

    default_sizes = "128x20000x128" if args.quick else "512x200000x256"
    sizes = parse_sizes(args.sizes or default_sizes)
    providers = (args.backends or ("reference,cpu,matmul" if args.device == "cpu" else "reference,cuda,triton,matmul")).split(",")
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    repeats = args.repeats or (3 if args.quick else 7)
    specs = [
        dict(provider=p, margin=m, mode=mode, batch=b, classes=c, dim=d, dtype=dtype, device=args.device,
             repeats=repeats, warmup=1, max_seconds=90.0)
        for (b, c, d) in sizes
        for m in args.margins.split(",")
        for mode in args.modes.split(",")
        for p in providers
    ]
    device = results.device_name(args.device)
    stamp = results.now()
    rows, table = [], []
    for spec in tqdm(specs, desc="bench", unit="case"):
        result = run_case(spec)
        rows += results.rows_for_case(spec, result, device, stamp)
        table.append((spec, result))
    path = results.append_csv(rows, Path(args.out), f"{args.device}.csv")
    print_table(table, device)
    print(f"\nappended {len(rows)} rows to {path}")
    return 0


def print_table(table, device: str) -> None:
    print(f"\ndevice: {device}; versions: {results.versions()}")
    header = f"{'margin':<14}{'mode':<18}{'B×C×D':<22}{'provider':<11}{'median s':>10}{'p20':>9}{'p80':>9}{'peak extra MiB':>16}"
    print(header)
    print("-" * len(header))
    baseline = {}
    for spec, res in table:
        key = (spec["margin"], spec["mode"], spec["batch"], spec["classes"], spec["dim"])
        size = f"{spec['batch']}×{spec['classes']}×{spec['dim']}"
        if "error" in res:
            print(f"{spec['margin']:<14}{spec['mode']:<18}{size:<22}{spec['provider']:<11}{res['error']:>10}")
            continue
        p50, p20, p80 = results.quantiles(res["times"])
        mem = res["peak_extra_bytes"] / 2**20
        baseline.setdefault(key, {})[spec["provider"]] = (p50, mem)
        print(f"{spec['margin']:<14}{spec['mode']:<18}{size:<22}{spec['provider']:<11}{p50:>10.4f}{p20:>9.4f}{p80:>9.4f}{mem:>16.1f}")
    print()
    for key, by_provider in baseline.items():
        ref = by_provider.get("reference")
        for provider, (p50, mem) in by_provider.items():
            if provider in ("reference", "matmul") or ref is None:
                continue
            line = f"{provider} vs reference at {key[2]}×{key[3]}×{key[4]}: time {p50 / ref[0]:.3f}×, peak extra memory {mem / max(ref[1], 1e-9):.3f}×"
            if "matmul" in by_provider:
                line += f", time vs three matmuls {p50 / by_provider['matmul'][0]:.2f}×"
            print(line)


if __name__ == "__main__":
    sys.exit(main())
