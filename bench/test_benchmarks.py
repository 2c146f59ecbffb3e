"""pytest-benchmark suite: ``pytest bench --benchmark-only`` (tiny sizes; the runner does the real sweeps).

Every provider available on this machine (bench/providers.py) × every margin (margin-aware providers)
× forward / forward+backward, on CUDA when a GPU is present, else on the CPU.  Compare runs with
pytest-benchmark's own tools (``--benchmark-autosave``, ``--benchmark-compare``).  Set
BENCH_SIZE=BxCxD for another size.
"""

from __future__ import annotations

import os

import pytest
import torch

from .providers import MARGINS, PROVIDERS, availability

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZE = tuple(int(v) for v in os.environ.get("BENCH_SIZE", "64x4096x64").lower().split("x"))
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16


def _params():
    out = []
    for name, provider in PROVIDERS.items():
        if DEVICE not in provider.devices:
            continue
        margins = list(MARGINS) if provider.margin_aware else ["nomargin"]
        for margin in margins:
            for mode in ("forward", "forward+backward"):
                out.append(pytest.param(name, margin, mode, id=f"{name}-{margin}-{mode}"))
    return out


@pytest.mark.parametrize("provider,margin,mode", _params())
def test_provider(benchmark, provider, margin, mode):
    reason = availability(provider, DEVICE)
    if reason:
        pytest.skip(f"{provider} unavailable: {reason.splitlines()[0]}")
    if provider == "triton" and DEVICE == "cpu":
        pytest.skip("Triton under the CPU interpreter is a correctness tool, not a benchmark")
    b, c, d = SIZE
    torch.manual_seed(0)
    grad = mode != "forward"
    spec = {"margin": "arcface" if margin == "nomargin" else margin}
    emb = torch.randn(b, d, device=DEVICE, dtype=DTYPE)
    weight = torch.randn(c, d, device=DEVICE, dtype=DTYPE)
    labels = torch.randint(0, c, (b,), device=DEVICE)
    case = PROVIDERS[provider].build(spec, emb, weight, labels, grad)

    def step():
        for leaf in case.leaves:
            if leaf.is_floating_point():
                leaf.grad = None
        out = case.forward()
        if grad:
            case.backward(out)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{mode} B={b} C={c} D={d} {DEVICE}"
    benchmark.extra_info.update(
        provider=provider, margin=margin, mode=mode, size=f"{b}x{c}x{d}", anchor=not PROVIDERS[provider].margin_aware
    )
    benchmark(step)
