"""``python -m bench.cosine_block``: could the chunked CUDA path's cosine block be 16-bit?

The chunked path (docs/CHUNKED.md) writes each chunk's products x̂·W_cᵀ to memory in float32 and reads them back
in the epilogue; that round trip is the largest term of its time model.  A GEMM writing fp16 or bf16 instead
would halve it.  This measures what that rounding costs under the tolerance rule (docs/DESIGN.md §4) before
anything is built: for bf16 and fp16 inputs, the op's outputs with the products rounded to fp16 / bf16
(``reference.fused_lse(..., product_output_dtype=...)``), compared with the float64 truth on the same rounded
inputs, as a multiple of the rule's bound 2 × |same-dtype reference − truth| (≤ 1 passes; slack left out).

ArcFace (Sub-center ArcFace for k > 1) s = 64, m = 0.5 logits (margins.pre_pass) on a head with a planted
signal, ragged shapes, several seeds.
Prints one line per (input dtype, block dtype, shape) with the worst ratio over seeds for each output, and the
worst absolute error of lse.
"""

from __future__ import annotations

import argparse

import torch

from marginops import reference
from marginops.margins import FILTER_OFF, SubCenterArcFace, pre_pass

OUTPUTS = ("lse", "grad_x", "grad_weight", "grad_target_logit", "grad_row_scale")
SHAPES = ((37, 61, 1001, 1), (64, 512, 4000, 1), (40, 128, 700, 3))  # B, D, C, sub-centres


def make_inputs(B, D, C, k, seed):
    """float64 op inputs: normalized x near its class's weight row, per-row tensors from ArcFace's pre-pass."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C * k, D, generator=g, dtype=torch.float64) * (0.5 + torch.rand(C * k, 1, generator=g))
    labels = torch.randint(0, C, (B,), generator=g)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) + 3.0 * torch.rand(B, 1, generator=g) * w[labels * k]
    x = torch.nn.functional.normalize(x, dim=1)
    margin = SubCenterArcFace(s=64.0, m=0.5, k=k)  # k = 1 is ArcFace
    with torch.no_grad():
        pre = pre_pass(margin, x, w, labels)
    grad = torch.randn(B, generator=g, dtype=torch.float64) / B
    rows = (pre.target_logit, pre.row_scale, pre.threshold)
    params = (torch.tensor(margin.non_target_param, dtype=torch.float64), margin.non_target_mode, FILTER_OFF, k)
    return x, w, labels, rows, params, grad


def run(x, w, labels, rows, params, grad, dtype, product_output_dtype=None):
    """lse and the four gradients of reference.fused_lse with x, W in ``dtype`` (per-row tensors in float32, or
    float64 for float64), as float64."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [x.to(dtype), w.to(dtype), *(r.to(acc) for r in rows[:2])]
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    xs, ws, tl, rs = leaves
    lse, _ = reference.fused_lse(
        xs, ws, labels, tl, rs, rows[2].to(acc), None, *params, product_output_dtype=product_output_dtype
    )
    lse.backward(grad.to(lse.dtype))
    return [t.double() for t in (lse.detach(), xs.grad, ws.grad, tl.grad, rs.grad)]


def ratios(inputs, dtype, block_dtype):
    """Per output: max |A − T| / (2 · max |R − T|), A with the block rounded, R the plain same-dtype reference;
    then lse's absolute error max |A − T| in nats."""
    x, w, labels, rows, params, grad = inputs
    x16, w16 = x.to(dtype).double(), w.to(dtype).double()  # the rounding of the inputs is charged to nobody
    truth = run(x16, w16, labels, rows, params, grad, torch.float64)
    same = run(x, w, labels, rows, params, grad, dtype)
    ours = run(x, w, labels, rows, params, grad, dtype, product_output_dtype=block_dtype)
    lse_abs = float((ours[0] - truth[0]).abs().max())
    return [float((a - t).abs().max() / (2 * (r - t).abs().max())) for t, r, a in zip(truth, same, ours)] + [lse_abs]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    print("input  block  B×D×C (k)        " + "  ".join(f"{n:>17}" for n in OUTPUTS) + "  lse abs (nats)")
    worst = {}
    for dtype in (torch.bfloat16, torch.float16):
        for block in (torch.float16, torch.bfloat16):
            for B, D, C, k in SHAPES:
                per_seed = [ratios(make_inputs(B, D, C, k, seed), dtype, block) for seed in range(args.seeds)]
                line = [max(col) for col in zip(*per_seed)]
                worst[(dtype, block)] = max(worst.get((dtype, block), 0.0), *line[:-1])
                label = f"{str(dtype)[6:]:<6} {str(block)[6:]:<6} {B}×{D}×{C} ({k})"
                print(f"{label:<24} " + "  ".join(f"{v:17.3g}" for v in line))
    print(
        "worst ratio (≤ 1 passes the rule): "
        + ", ".join(f"{str(d)[6:]} in / {str(b)[6:]} block {v:.3g}" for (d, b), v in worst.items())
    )
    return worst


if __name__ == "__main__":
    main()
