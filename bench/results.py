"""The one CSV schema of bench results: appended (never overwritten), read back for plots and the README.

One row per (case, metric).  ``p50``/``p20``/``p80`` hold numbers, or for a case that produced none a
status word in ``p50`` (``out of memory``, ``unavailable``, ``failed``, ``timeout``, or ``skipped``:
not run because the same provider ran out of memory or time at a smaller size of the sweep) with p20/p80 empty.
``kernel`` is ``<margin>/<dtype>/<the two fixed sizes>``, e.g. ``arcface/float32/B=512/D=256`` for a
sweep over the number of classes (``x_name = num_classes``); no-margin anchors use the margin name
``nomargin``.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import sys
import warnings
from pathlib import Path
from typing import Iterable, Optional

FIELDS = [
    "kernel",
    "provider",
    "mode",
    "metric",
    "unit",
    "x_name",
    "x_value",
    "p50",
    "p20",
    "p80",
    "device",
    "versions",
    "timestamp",
]
# the committed record (README's tables and plots come from it); write here only on purpose (--record)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# where the tools write by default: ignored by git, so that running a benchmark leaves the clone clean
LOCAL_DIR = RESULTS_DIR / "local"
STATUSES = ("out of memory", "unavailable", "failed", "timeout", "skipped")

# x_name of each sweep axis and the letter it has in a kernel string
AXES = {"num_classes": "C", "batch": "B", "dim": "D"}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_name(device: str) -> str:
    """What the numbers were measured on: GPU name (and its memory), or CPU model and usable cores."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"{cpu_model()} ({usable_cores()} cores, {torch.get_num_threads()} threads)"


def versions(extra: Iterable[str] = ()) -> str:
    """marginops, torch (with its CUDA), triton and Python versions, '; '-joined, and the 1-minute load average."""
    import torch

    import marginops

    cuda = f"+cuda {torch.version.cuda}" if torch.version.cuda else ""
    parts = [f"marginops {marginops.__version__}", f"torch {torch.__version__}{cuda}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("triton absent")
    parts.append(f"python {sys.version.split()[0]}")
    parts.extend(extra)
    try:  # the machine's load when the row was measured: context for noisy timings on a shared host
        parts.append(f"load {os.getloadavg()[0]:.1f}")
    except OSError:
        pass
    return "; ".join(parts)


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(median, 20th percentile, 80th percentile) of the per-iteration times."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0], ordered[0], ordered[0]
    q = statistics.quantiles(ordered, n=10, method="inclusive")
    return statistics.median(ordered), q[1], q[7]


def kernel_name(margin: str, dtype: str, batch: int, classes: int, dim: int, x_name: str = "num_classes") -> str:
    fixed = {"B": batch, "C": classes, "D": dim}
    fixed.pop(AXES[x_name])
    return f"{margin}/{dtype}/" + "/".join(f"{k}={v}" for k, v in fixed.items())


def parse_kernel(kernel: str) -> dict:
    """'arcface/float32/B=512/D=256' -> {'margin': 'arcface', 'dtype': 'float32', 'B': 512, 'D': 256}."""
    margin, dtype, *sizes = kernel.split("/")
    out: dict = {"margin": margin, "dtype": dtype}
    for item in sizes:
        key, _, value = item.partition("=")
        out[key] = int(value)
    return out


def rows_for_case(spec: dict, result: dict, device: str, stamp: str, extra_versions: Iterable[str] = ()) -> list[dict]:
    x_name = spec.get("x_name", "num_classes")
    x_value = {"num_classes": spec["classes"], "batch": spec["batch"], "dim": spec["dim"]}[x_name]
    common = {
        "kernel": kernel_name(
            spec.get("kernel_margin", spec["margin"]),
            spec["dtype"],
            spec["batch"],
            spec["classes"],
            spec["dim"],
            x_name,
        ),
        "provider": spec["provider"],
        "mode": spec["mode"],
        "x_name": x_name,
        "x_value": x_value,
        "device": device,
        "versions": versions(extra_versions),
        "timestamp": stamp,
    }
    if "error" in result:
        status = result["error"] if result["error"] in STATUSES else "failed"
        return [dict(common, metric="time", unit="s", p50=status, p20="", p80="")]
    p50, p20, p80 = quantiles(result["times"])
    extra = result["peak_extra_bytes"] / 2**20
    rows = [
        dict(common, metric="time", unit="s", p50=f"{p50:.6g}", p20=f"{p20:.6g}", p80=f"{p80:.6g}"),
        dict(
            common, metric="peak_extra_memory", unit="MiB", p50=f"{extra:.6g}", p20=f"{extra:.6g}", p80=f"{extra:.6g}"
        ),
    ]
    if "peak_bytes" in result:
        peak = result["peak_bytes"] / 2**20
        rows.append(
            dict(common, metric="peak_memory", unit="MiB", p50=f"{peak:.6g}", p20=f"{peak:.6g}", p80=f"{peak:.6g}")
        )
    return rows


def append_csv(rows: list[dict], out_dir: Path, name: str) -> Path:
    """Append rows to out_dir/name; a file with another header is left alone and a new name is used."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    stem, suffix = path.stem, path.suffix
    n = 1
    while path.exists():
        with path.open(newline="") as fh:
            header = next(csv.reader(fh), None)
        if header == FIELDS:
            break
        n += 1
        new_path = out_dir / f"{stem}.{n}{suffix}"
        warnings.warn(f"{path} has another header; appending to {new_path} instead", RuntimeWarning)
        path = new_path
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(paths: Iterable[Path]) -> list[dict]:
    rows = []
    for path in paths:
        with Path(path).open(newline="") as fh:
            for row in csv.DictReader(fh):
                if set(FIELDS) <= set(row):
                    rows.append(row)
    return rows


def csv_files(where: Path) -> list[Path]:
    where = Path(where)
    return sorted(where.glob("*.csv")) if where.is_dir() else [where]


def latest(rows: list[dict]) -> list[dict]:
    """The rows of the most recent run of each case (device, kernel, provider, mode, x_name, x_value)."""

    def case(row):
        return (row["device"], row["kernel"], row["provider"], row["mode"], row["x_name"], row["x_value"])

    newest: dict = {}
    for row in rows:
        key = case(row)
        if key not in newest or row["timestamp"] > newest[key]:
            newest[key] = row["timestamp"]
    picked: dict = {}
    for row in rows:  # the last row written wins within one run
        if row["timestamp"] == newest[case(row)]:
            picked[case(row) + (row["metric"],)] = row
    return list(picked.values())


def number(value: str) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
