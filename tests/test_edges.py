"""Edges of the public API (issue 14): no silent wrong answers, no state changed by a call that raises,
construction-time checks of margins and options, label dtypes, float64 statistics, pml drop-in gaps."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import KERNEL_BACKENDS, device_for

import marginops
from marginops import nn as mnn
from marginops.compat import pml


def _problem(B=4, C=10, D=8, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype).to(device)
    w = torch.randn(C, D, generator=g, dtype=dtype).to(device)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    return x, w, y


# ----------------------------------------------------------------------------------------------------------
# double backward: the kernels' backward is not differentiable; say so instead of a silently wrong number


def _gradient_penalty(backend, x, w, y, margin):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    loss = marginops.margin_cross_entropy(x, w, y, margin, backend=backend)
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    gx.pow(2).sum().backward()
    return x.grad, w.grad


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_double_backward_on_a_kernel_backend_raises_with_advice(backend):
    device = device_for(backend)
    x, w, y = _problem(B=3, C=5, D=4, device=device)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        _gradient_penalty(backend, x, w, y, marginops.ArcFace(s=30.0, m=0.5))


def test_first_order_with_create_graph_false_unchanged_on_cpu():
    x, w, y = _problem()
    margin = marginops.ArcFace(s=30.0, m=0.5)
    grads = []
    for backend in ("cpu", "reference"):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = marginops.margin_cross_entropy(xx, ww, y, margin, backend=backend)
        grads.append(torch.autograd.grad(loss, (xx, ww)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_double_backward_on_the_reference_backend_is_correct():
    x, w, y = _problem(B=3, C=5, D=4)
    margin = marginops.ArcFace(s=8.0, m=0.5)

    def f(xx, ww):
        return marginops.margin_cross_entropy(xx, ww, y, margin, backend="reference")

    inputs = (x.clone().requires_grad_(True), w.clone().requires_grad_(True))
    assert torch.autograd.gradgradcheck(f, inputs)

    # the gradient penalty of the issue against central finite differences of the penalty itself
    def penalty(ww):
        xx = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(f(xx, ww), xx, create_graph=True)
        return gx.pow(2).sum()

    _, grad_w = _gradient_penalty("reference", x, w, y, margin)
    eps = 1e-6
    fd = torch.zeros_like(w)
    for idx in range(w.numel()):
        e = torch.zeros_like(w).view(-1)
        e[idx] = eps
        e = e.view_as(w)
        fd.view(-1)[idx] = (penalty(w + e) - penalty(w - e)) / (2 * eps)
    torch.testing.assert_close(grad_w, fd, rtol=1e-6, atol=1e-8)
