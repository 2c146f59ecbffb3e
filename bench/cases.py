"""One benchmark case, run in its own process so that its peak memory is its own.

``python -m bench.cases '<json spec>'`` prints one JSON line: ``times`` (seconds per timed region),
``peak_extra_bytes`` (the case's high-water mark beyond its inputs and their gradients) and
``peak_bytes`` (the whole process on CPU, the allocator on CUDA), or ``error``.

Spec keys: provider, margin, mode (forward | backward | forward+backward), batch, classes, dim,
dtype, device, repeats, warmup, max_seconds; optional min_seconds and max_repeats (short cases
repeat until min_seconds of timed work, at most max_repeats times), threads, mem_limit_bytes (CPU: the case's
address-space budget, so that an oversized case fails with "out of memory" instead of pushing the
machine into swap or the OOM killer).

Memory on CPU: the kernel's "peak resident set" (VmHWM) is reset through /proc/self/clear_refs
after the inputs exist, so the peak is that of the timed iterations; the gradients of the inputs
are outputs of forward+backward, so their size is subtracted.  Elsewhere ru_maxrss is used with a
probe allocation of the gradients' size standing in for the reset.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from .providers import DTYPES, PROVIDERS

MODES = ("forward", "backward", "forward+backward")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_bytes(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _can_reset_rss() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        _status_bytes("VmHWM")
        return True
    except (OSError, KeyError):
        return False


class PeakMeter:
    """Peak memory of a region: CUDA allocator stats, or the CPU process's resident-set high-water mark."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resettable = device.type == "cpu" and _can_reset_rss()

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        if self.resettable:
            return _status_bytes("VmRSS")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            _CLEAR_REFS.write_text("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.resettable:
            return _status_bytes("VmHWM")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(device, dtype, batch, classes, dim):
    emb = torch.randn(batch, dim, device=device, dtype=dtype)
    weight = torch.randn(classes, dim, device=device, dtype=dtype)
    labels = torch.randint(0, classes, (batch,), device=device)
    return emb, weight, labels


def _iteration(case, mode: str, device) -> float:
    """One iteration; returns the seconds of the timed region (forward, backward or both)."""
    for leaf in case.leaves:
        if leaf.is_floating_point():
            leaf.grad = None  # fresh gradients each time: no accumulation buffer
    if mode == "backward":
        out = case.forward()
        _sync(device)
        start = time.perf_counter()
        case.backward(out)
    else:
        start = time.perf_counter()
        out = case.forward()
        if mode == "forward+backward":
            case.backward(out)
    _sync(device)
    return time.perf_counter() - start


def run(spec: dict) -> dict:
    device = torch.device(spec["device"])
    dtype = DTYPES[spec["dtype"]]
    mode = spec["mode"]
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    provider = PROVIDERS[spec["provider"]]
    grad = mode != "forward"
    torch.manual_seed(0)
    # warm up on a tiny problem (extension load, Triton compile, allocator) so it is neither timed nor in the peak
    warm = provider.build(spec, *_inputs(device, dtype, 8, 256, spec["dim"]), grad)
    _iteration(warm, mode, device)
    del warm
    meter = PeakMeter(device)
    case = provider.build(spec, *_inputs(device, dtype, spec["batch"], spec["classes"], spec["dim"]), grad)
    grad_bytes = sum(t.nbytes for t in case.leaves if t.requires_grad)
    _sync(device)
    if meter.resettable or device.type == "cuda":
        base = meter.current() + grad_bytes
    else:  # touch buffers the size of the gradients so that the high-water mark already holds them
        probe = [torch.ones_like(t) for t in case.leaves if t.requires_grad]
        del probe
        base = meter.current()
    meter.reset()
    for _ in range(spec.get("warmup", 1)):
        _iteration(case, mode, device)
    # at least `repeats` iterations, more (up to max_repeats) until min_seconds of timed work, and
    # fewer (not under 3) once max_seconds have passed
    times = []
    start = time.perf_counter()
    min_seconds, max_seconds = spec.get("min_seconds", 0.0), spec.get("max_seconds", 60.0)
    max_repeats = max(spec["repeats"], spec.get("max_repeats", spec["repeats"]))
    while len(times) < max_repeats:
        times.append(_iteration(case, mode, device))
        elapsed = time.perf_counter() - start
        if len(times) >= spec["repeats"] and sum(times) >= min_seconds:
            break
        if elapsed > max_seconds and len(times) >= 3:
            break
    peak = meter.peak()
    return {"times": times, "peak_extra_bytes": max(0, peak - base), "peak_bytes": peak}


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def main() -> int:
    spec = json.loads(sys.argv[1])
    limit = spec.get("mem_limit_bytes")
    if limit and spec["device"] == "cpu":
        try:
            resource.setrlimit(resource.RLIMIT_DATA, (int(limit), int(limit)))
        except (ValueError, OSError):
            pass
    try:
        result = run(spec)
    except Exception as exc:  # one case failing must not stop the sweep: report it as data
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        kind = "out of memory" if _is_oom(exc) else "failed"
        result = {"error": kind, "detail": f"{type(exc).__name__}: {first}"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
