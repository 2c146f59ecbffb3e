"""``python -m bench.profile``: where one forward+backward of a provider spends its time, by kind of kernel.

The chunked CUDA path's time model (docs/CHUNKED.md) has three terms: the vendor GEMMs, the epilogue kernels
that follow them, and the host's launch overhead.  A benchmark gives only their sum; this splits it.  Each
provider's step runs a few times under torch.profiler, and DIR/profile.csv gets, per provider, one row per
category of device work (``gemm``: vendor matrix products; ``marginops``: the package's own kernels and ops;
``elementwise``: casts, copies, fills and other ATen element-wise kernels; ``other``) with its time per step and
its share of the step's wall time, and an ``idle`` row: the wall time no kernel ran — the device waiting for
the host, which is what a CUDA graph or a second stream would recover.  On the CPU the same split is made of
the operators' own (self) time, and ``idle`` is the Python and dispatch time outside them.

On a GPU, DIR/profile_kernels.csv also gets one row per modelled kernel of each provider: its measured device
time per step beside the time model's figure (bench/gpu_model.py, from the committed static report
bench/results/gpu_static.csv; vendor GEMMs summed as one row, ``cuBLAS``), so that the first GPU run calibrates
the model.  The model knows the providers ``cuda``, ``cuda_fused``, ``triton``, ``hybrid``, ``insightface`` and
``matmul`` at 16-bit dtypes.

Example (the headline size on a GPU):
    python -m bench.profile --device cuda --size 1024x1000000x512 --dtype bfloat16 --backends cuda,triton
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Optional

import torch

from bench.cases import _inputs, _iteration
from bench.gpu_model import parse_size
from bench.providers import DTYPES, PROVIDERS

CATEGORIES = ("gemm", "marginops", "elementwise", "other")
# lower-case name fragments, checked in this order: cuBLAS / cuBLASLt / CUTLASS kernels on a GPU, ATen's
# matrix products on the CPU; the package's ops, CUDA kernels (chunk_*, fused_lse_*) and Triton kernels
_KINDS = (
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("marginops", ("marginops", "chunk_", "fused_lse", "_lse_fwd", "_lse_merge", "_bwd_", "_cast_rows")),
    ("elementwise", ("elementwise", "copy", "memcpy", "memset", "cast", "fill", "reduce", "aten::")),
)


def category(name: str) -> str:
    low = name.lower()
    for kind, fragments in _KINDS:
        if any(f in low for f in fragments):
            return kind
    return "other"


def profile(provider: str, device: str, size: tuple, dtype: str, margin: str, steps: int) -> dict:
    """Seconds per step of each category and of idle time, and the wall time per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    dev = torch.device(device)
    batch, classes, dim = size
    spec = {"margin": margin, "device": device, "dtype": dtype}
    torch.manual_seed(0)
    case = PROVIDERS[provider].build(spec, *_inputs(dev, DTYPES[dtype], batch, classes, dim), True)
    for _ in range(2):  # extension load, Triton autotune, cuBLAS heuristics: not profiled
        _iteration(case, "forward+backward", dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            _iteration(case, "forward+backward", dev)
        wall = (time.perf_counter() - start) / steps
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    kernels: dict = {}  # device kernel name -> seconds per step
    if dev.type == "cuda":
        # kernels, copies and fills: device-side events, timed by their own start and end
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                elapsed = event.time_range.elapsed_us() * 1e-6 / steps
                seconds[category(event.name)] += elapsed
                kernels[event.name] = kernels.get(event.name, 0.0) + elapsed
    else:
        # operators' self time: each microsecond counted once, in the innermost operator running it (operators
        # the CPU op runs on its pool threads are not seen: their time is the op's own)
        for event in prof.key_averages():
            if event.device_type == torch.autograd.DeviceType.CPU:
                seconds[category(event.key)] += event.self_cpu_time_total * 1e-6 / steps
    busy = sum(seconds.values())
    if busy == 0.0:
        raise RuntimeError("the profiler recorded no kernel or operator time")
    seconds["idle"] = max(0.0, wall - busy)
    return {"wall": wall, "busy": busy, "seconds": seconds, "kernels": kernels}


def modelled_kernels(provider: str, size: tuple, dtype: str) -> Optional[dict]:
    """{kernel: (modelled seconds on each GPU of the model)} of ``provider``'s path at ``size``, vendor GEMMs merged
    as "cuBLAS"; None where the model has no such path or dtype (or no committed report)."""
    from bench import gpu_model

    if provider not in gpu_model.PROFILED or dtype not in ("bfloat16", "float16") or not gpu_model.DEFAULT_CSV.exists():
        return None
    path = gpu_model.model_paths(gpu_model.load_rows(gpu_model.DEFAULT_CSV), *size, dtype=dtype)[provider]
    out: dict = {}
    for k in path.kernels:
        key = "cuBLAS" if k.vendor else k.name.split(" (")[0]
        times = [k.seconds(gpu) for gpu in gpu_model.GPUS.values()]
        out[key] = [a + b for a, b in zip(out.get(key, [0.0] * len(times)), times)]
    return out


def measured_kernel(name: str, measured: dict) -> float:
    """Seconds per step of the device kernels ``name`` stands for: vendor GEMMs for "cuBLAS", else the kernels
    whose name holds ``name``'s first word (a Triton kernel's function name, a CUDA kernel's name)."""
    if name == "cuBLAS":
        return sum(t for k, t in measured.items() if category(k) == "gemm")
    word = name.split()[0]
    if category(word) != "marginops":
        return float("nan")  # torch's element-wise ops: not told apart by name
    return sum(t for k, t in measured.items() if word in k)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=parse_size, default=(256, 20000, 128), help="BxCxD")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--margin", default="arcface")
    parser.add_argument("--backends", default="cuda", help="comma-separated providers of bench/providers.py")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True, help="directory for profile.csv")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "profile.csv"
    fields = ["provider", "device", "dtype", "batch", "classes", "dim", "category", "ms_per_step", "share_of_wall"]
    failed = 0
    kernel_rows: list = []
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for name in args.backends.split(","):
            why = PROVIDERS[name].unavailable(args.device) if name in PROVIDERS else f"unknown provider {name!r}"
            if why:
                print(f"[profile] {name}: unavailable: {why}")
                continue
            try:
                result = profile(name, args.device, args.size, args.dtype, args.margin, args.steps)
            except Exception as exc:  # one provider's failure must not hide the others' numbers
                print(f"[profile] {name}: {type(exc).__name__}: {exc}")
                failed += 1
                continue
            B, C, D = args.size
            for kind, sec in result["seconds"].items():
                writer.writerow(
                    dict(provider=name, device=args.device, dtype=args.dtype, batch=B, classes=C, dim=D,
                         category=kind, ms_per_step=f"{sec * 1e3:.4f}", share_of_wall=f"{sec / result['wall']:.4f}")
                )  # fmt: skip
            fh.flush()
            shares = "  ".join(f"{k} {v / result['wall']:.0%}" for k, v in result["seconds"].items())
            print(f"[profile] {name}: {result['wall'] * 1e3:.2f} ms per step; {shares}")
            modelled = modelled_kernels(name, args.size, args.dtype) if result["kernels"] else None
            if modelled:
                for kernel, times in modelled.items():
                    row = dict(provider=name, kernel=kernel)
                    row["measured_ms"] = f"{measured_kernel(kernel, result['kernels']) * 1e3:.4f}"
                    row.update({f"model_ms_{g.replace(' ', '_')}": f"{t * 1e3:.4f}" for g, t in zip(GPU_NAMES, times)})
                    kernel_rows.append(row)
                total = [sum(t) for t in zip(*modelled.values())]
                print(
                    f"[profile] {name}: model "
                    + ", ".join(f"{gpu} {t * 1e3:.2f} ms" for gpu, t in zip(GPU_NAMES, total))
                    + f" against {result['busy'] * 1e3:.2f} ms of kernels measured"
                )
    print(f"wrote {path}")
    if kernel_rows:
        beside = args.out / "profile_kernels.csv"
        with beside.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(kernel_rows[0]))
            writer.writeheader()
            writer.writerows(kernel_rows)
        print(f"wrote {beside} (measured kernel times beside the time model's, bench/gpu_model.py)")
    return 1 if failed else 0


def _gpu_names() -> list:
    from bench import gpu_model

    return list(gpu_model.GPUS)


GPU_NAMES = _gpu_names()


if __name__ == "__main__":
    raise SystemExit(main())
