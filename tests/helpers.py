"""Shared test helpers: backends present here, random problems, comparisons that explain failures."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

import marginops

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None

# Kernel backends and the device their tests run on (Triton: the interpreter on CPU without a GPU).
KERNEL_BACKENDS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")]),
]


def device_for(backend: str) -> torch.device:
    if backend == "cuda" or (backend == "triton" and HAS_CUDA):
        return torch.device("cuda")
    return torch.device("cpu")


def margins_under_test():
    """Every margin spec, with non-default variants, at a moderate scale so float32 errors stay visible."""
    return [
        marginops.NormFace(s=30.0),
        marginops.CosFace(s=30.0, m=0.35),
        marginops.ArcFace(s=30.0, m=0.5),
        marginops.ArcFace(s=30.0, m=0.5, easy_margin=True),
        marginops.ArcFace(s=30.0, m=0.5, detach_margin=True),
        marginops.CombinedMargin(s=30.0, m1=1.0, m2=0.3, m3=0.2),
        marginops.CombinedMargin(s=30.0, m1=0.9, m2=0.4, m3=0.15),
        marginops.SphereFace(m=4, lambda_=5.0, scale=1.0),
        marginops.SphereFace(m=3, lambda_=0.0, scale=0.5),
        marginops.CurricularFace(s=30.0, m=0.5, t=0.3),
        marginops.SubCenterArcFace(s=30.0, m=0.5, k=3),
        marginops.AdaFace(s=30.0, m=0.4, h=0.333, batch_mean=25.0, batch_std=8.0),
        marginops.ElasticFace(s=30.0, m=0.5, std=0.05, kind="arc", sample=False),
        marginops.ElasticFace(s=30.0, m=0.35, std=0.05, kind="cos", sample=False),
        marginops.MagFace(s=30.0),
    ]


def margin_id(margin) -> str:
    fields = ",".join(f"{v}" for v in vars(margin).values())
    return f"{type(margin).__name__}({fields})"


def make_problem(
    batch, dim, classes, dtype=torch.float64, device="cpu", ignore_rows=(), ignore_index=-100, seed=None, subcenters=1
):
    """Random embeddings/weights with a planted signal so target cosines spread over (-1, 1).

    With subcenters=k the weight has classes·k rows and ``classes`` counts classes."""
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    labels = torch.randint(0, classes, (batch,), generator=gen)
    weight = torch.randn(classes * subcenters, dim, generator=gen, dtype=torch.float64)
    emb = torch.randn(batch, dim, generator=gen, dtype=torch.float64) * 3.0
    # pull a random share of rows towards their class so that margins and curricular thresholds bite
    pull = torch.rand(batch, 1, generator=gen, dtype=torch.float64) * 2.0
    emb = emb + pull * weight[labels * subcenters] * 2.0
    for r in ignore_rows:
        labels[r] = ignore_index
    return emb.to(device, dtype), weight.to(device, dtype), labels.to(device)


def report_mismatch(name: str, actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor) -> str:
    diff = (actual.double() - expected.double()).abs()
    flat = diff.flatten()
    worst = torch.topk(flat.nan_to_num(float("inf")), min(5, flat.numel())).indices
    rows = [
        f"  at {tuple(int(i) for i in torch.unravel_index(w, diff.shape))}: got {actual.flatten()[w].item():.8g}, "
        f"expected {expected.flatten()[w].item():.8g}"
        for w in worst
    ]
    return f"{name}: {int(bad.sum())} of {bad.numel()} elements differ; worst:\n" + "\n".join(rows)


def assert_close(name, actual, expected, rtol, atol):
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~torch.isclose(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True)
    if bool(bad.any()):
        raise AssertionError(report_mismatch(name, actual, expected, bad))


def assert_within_reference_error(name, actual, truth, same_dtype_reference, slack):
    """docs/DESIGN.md §4: error vs the float64 truth ≤ 2 × the same-dtype reference's error + slack.  Where the
    truth is NaN or ±inf the result must be the same; a NaN where the truth is finite always fails."""
    actual, truth, ref = (t.detach().cpu().double() for t in (actual, truth, same_dtype_reference))
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    finite = torch.isfinite(truth)
    ref_err = (ref - truth).abs()[finite]
    assert bool(torch.isfinite(ref_err).all()), (
        f"{name}: the same-dtype reference is not finite where the float64 truth is: the rule cannot be applied"
    )
    allowed = 2.0 * (float(ref_err.max()) if ref_err.numel() else 0.0) + slack
    same_nonfinite = (actual.isnan() & truth.isnan()) | (actual == truth)
    bad = torch.where(finite, ~((actual - truth).abs() <= allowed), ~same_nonfinite)
    if bool(bad.any()):
        raise AssertionError(f"(allowed error {allowed:.3g}) " + report_mismatch(name, actual, truth, bad))


def loss_and_grads(emb, weight, labels, margin, **kwargs):
    emb = emb.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    loss = marginops.margin_cross_entropy(emb, weight, labels, margin, **kwargs)
    # a non-uniform upstream gradient catches per-row scaling mistakes that a plain sum would hide
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    (loss * upstream).sum().backward()
    return loss.detach(), emb.grad, weight.grad


def child_env(**overrides) -> dict:
    """Environment for a child Python that imports the same marginops as this process (installed or
    a source checkout), whatever its working directory."""
    here = str(Path(marginops.__file__).resolve().parent.parent)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]), **overrides)


# Every loss module of marginops.nn, small and on the CPU kernels, for the tests that must cover all of them
# (torch.compile fullgraph in tests/test_compile.py, autocast in tests/test_mixed_precision.py).
EVERY_MODULE = {
    "NormFace": lambda: marginops.nn.NormFaceLoss(16, 30, s=16.0, backend="cpu"),
    "CosFace": lambda: marginops.nn.CosFaceLoss(16, 30, s=16.0, backend="cpu"),
    "ArcFace": lambda: marginops.nn.ArcFaceLoss(16, 30, s=16.0, backend="cpu"),
    "CombinedMargin": lambda: marginops.nn.CombinedMarginLoss(16, 30, s=16.0, m1=0.9, m2=0.3, m3=0.1, backend="cpu"),
    "SphereFace": lambda: marginops.nn.SphereFaceLoss(16, 30, backend="cpu"),
    "SubCenterArcFace": lambda: marginops.nn.SubCenterArcFaceLoss(16, 30, s=16.0, k=2, backend="cpu"),
    "AdaFace": lambda: marginops.nn.AdaFaceLoss(16, 30, s=16.0, backend="cpu"),
    "ElasticFace+": lambda: marginops.nn.ElasticFaceLoss(16, 30, s=16.0, plus=True, backend="cpu"),
    "MagFace": lambda: marginops.nn.MagFaceLoss(16, 30, s=16.0, backend="cpu"),
    # its EMA t reaches the op as a tensor (non_target_param): no host read in the graph
    "CurricularFace": lambda: marginops.nn.CurricularFaceLoss(16, 30, s=16.0, backend="cpu"),
}


# set by tests/conftest.py: the running pytest's config, for progress lines that bypass output capture
PYTEST_CONFIG = None


def progress(message: str) -> None:
    """One line on the terminal now, even while pytest captures the test's output: for tests that run for
    minutes (the sanitizer builds and runs)."""
    config = PYTEST_CONFIG
    reporter = config.pluginmanager.getplugin("terminalreporter") if config is not None else None
    if reporter is None:
        print(message, file=sys.stderr, flush=True)
        return
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        reporter.write_line(f"    {message}")


def matmul_flops(fn):
    """Matrix-product FLOPs of fn(): 2·M·K·N of every aten::mm / addmm / addmm_ torch.profiler records (every
    thread), from the recorded operand shapes (the profiler's own FLOP estimate leaves addmm_ out).  One thread:
    the profiler sees the OpenMP workers' ops only in its first session of a process, the caller's always."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
    finally:
        torch.set_num_threads(threads)
    total = 0
    for e in prof.events():
        if e.name == "aten::mm":
            a, b = e.input_shapes[:2]
        elif e.name in ("aten::addmm", "aten::addmm_"):
            a, b = e.input_shapes[1:3]
        else:
            continue
        total += 2 * a[0] * a[1] * b[1]
    return total
