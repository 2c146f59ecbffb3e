"""Frozen parts cost nothing (issue 13) on the C++ CPU backend and through autograd: the backward op's
need_grad_x / need_grad_weight arguments (set by marginops/ops.py from ctx.needs_input_grad).  An unwanted
gradient comes back empty, without its matrix product or its C x D / B x D allocation; the wanted ones are
bitwise those of the full backward.  (The chunked CUDA path: tests/test_chunked.py.)"""

import pytest
import torch
from helpers import matmul_flops
from op_cases import Case

import marginops
from marginops import ops


@pytest.fixture(scope="module")
def cpu_ops():
    ops.cpp_op("cpu")
    return torch.ops.marginops


@pytest.mark.parametrize("need", [(False, True), (True, False), (False, False)], ids=["frozen_x", "frozen_w", "both"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cpu_backward_skips_unwanted_gradients(cpu_ops, dtype, need):
    need_x, need_w = need
    case = Case(B=37, D=61, C=1001, k=3, class_index=True, non_target=1, filter_threshold=0.2).on(dtype)
    B, D = case.x.shape
    unit = 2 * B * case.class_index.numel() * 3 * D
    lse, _ = cpu_ops.fused_lse(*case.args(), True)
    full = cpu_ops.fused_lse_backward(case.grad, lse, *case.args(), True)
    part = cpu_ops.fused_lse_backward(case.grad, lse, *case.args(), True, need_x, need_w)
    for name, wanted, a, b in zip(("grad_x", "grad_weight"), need, part[:2], full[:2]):
        if wanted:
            assert torch.equal(a, b), name
        else:
            assert a.numel() == 0 and a.dtype == b.dtype, name
    assert torch.equal(part[2], full[2]) and torch.equal(part[3], full[3])
    flops = matmul_flops(lambda: cpu_ops.fused_lse_backward(case.grad, lse, *case.args(), True, need_x, need_w))
    full_flops = matmul_flops(lambda: cpu_ops.fused_lse_backward(case.grad, lse, *case.args(), True))
    assert full_flops == 3 * unit, "the profiler must see the CPU kernels' matrix products"
    assert flops == unit * (1 + int(need_x) + int(need_w))


@pytest.mark.parametrize("frozen", ["weight", "embeddings"])
def test_autograd_asks_only_for_wanted_gradients(cpu_ops, frozen):
    """Through the loss: a frozen weight (or embeddings without requires_grad) gives the same other gradients as the
    trainable run, and the backward forms one matrix product less."""
    g = torch.Generator().manual_seed(0)
    emb, weight = torch.randn(16, 32, generator=g), torch.randn(500, 32, generator=g)
    labels = torch.randint(0, 500, (16,), generator=g)

    def run(emb_grad, weight_grad):
        e, w = emb.clone().requires_grad_(emb_grad), weight.clone().requires_grad_(weight_grad)
        loss = marginops.margin_cross_entropy(e, w, labels, marginops.ArcFace(), backend="cpu")
        flops = matmul_flops(loss.backward)
        return e.grad, w.grad, flops

    full = run(True, True)
    part = run(frozen != "embeddings", frozen != "weight")
    if frozen == "weight":
        assert part[1] is None and torch.equal(part[0], full[0])
    else:
        assert part[0] is None and torch.equal(part[1], full[1])
    unit = 2 * 16 * 500 * 32
    assert full[2] - part[2] == unit
