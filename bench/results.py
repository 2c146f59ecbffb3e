"""The one CSV schema of bench results, appended (never overwritten), and the printed table."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
from pathlib import Path

import torch

FIELDS = ["kernel", "provider", "mode", "metric", "unit", "x_name", "x_value", "p50", "p20", "p80", "device", "versions", "timestamp"]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def versions() -> str:
    import marginops

    parts = [f"marginops {marginops.__version__}", f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    return "; ".join(parts)


def quantiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0], ordered[0], ordered[0]
    q = statistics.quantiles(ordered, n=10, method="inclusive")
    return statistics.median(ordered), q[1], q[7]


def rows_for_case(spec: dict, result: dict, device: str, stamp: str) -> list[dict]:
    common = {
        "kernel": f"{spec['margin']}/{spec['dtype']}/B={spec['batch']}/D={spec['dim']}",
        "provider": spec["provider"],
        "mode": spec["mode"],
        "x_name": "num_classes",
        "x_value": spec["classes"],
        "device": device,
        "versions": versions(),
        "timestamp": stamp,
    }
    if "error" in result:
        return [dict(common, metric="time", unit="s", p50=result["error"], p20="", p80="")]
    p50, p20, p80 = quantiles(result["times"])
    mem = result["peak_extra_bytes"] / 2**20
    return [
        dict(common, metric="time", unit="s", p50=f"{p50:.6g}", p20=f"{p20:.6g}", p80=f"{p80:.6g}"),
        dict(common, metric="peak_extra_memory", unit="MiB", p50=f"{mem:.6g}", p20=f"{mem:.6g}", p80=f"{mem:.6g}"),
    ]


def append_csv(rows: list[dict], out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
