"""Op-level tests of the CUDA kernels (csrc/cuda) behind torch.ops.marginops.fused_lse / fused_lse_backward.

Everything is compared with ``marginops.reference.fused_lse`` (logits materialized, autograd for the backward,
run on the CPU): float64 to tight tolerances (the fp64 SIMT path), float32 (exact SIMT path) and bf16 / fp16
(tensor cores) by the docs/DESIGN.md §4 rule: error vs the float64 truth <= 2 x the error of the reference run in the
same dtype, plus a small slack.  Shapes cross partial row tiles (B=37, 150), odd feature counts (D=61: the
scalar-load path; D=64: 16-byte cp.async), several D chunks (D=300 in fp64, D=600 otherwise), many class splits
(N=20000) and subcenters k=1/3/64.  One test plants columns beyond row*D = 2^31 in a 4.3 GB bf16 weight.

The whole module needs a GPU (it runs whenever one is present); the extension is loaded through
``marginops._build.load_cuda()`` (first use compiles it).
"""

import os

import pytest
import torch
from helpers import assert_close
from op_cases import (
    F32_SLACK,
    FILTER_OFF,
    PRECISION_CONFIGS,
    TINY_SHAPES,
    Case,
    assert_same_bits,
    check_class_index_leaves_other_rows_zero,
    check_cuda_bad_inputs,
    check_deterministic_bitwise,
    check_empty_batch,
    check_fast_backward_single_rounding,
    check_float64_matches_reference,
    check_nan_input_propagates_to_lse,
    check_out_of_range_labels_are_only_compared,
    check_tf32_opt_in,
    check_tiny_problems,
    check_within_rule,
    check_zero_norm_weight_rows,
    float64_grid,
    run_op,
)

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

DEV = torch.device("cuda")


@pytest.fixture(scope="module")
def ops():
    from marginops import _build

    _build.load_cuda()
    return torch.ops.marginops


# ------------------------------------------------------------------------------------------------------------
# float64 (SIMT fp64 path): tight agreement with the reference
# ------------------------------------------------------------------------------------------------------------
@float64_grid([(37, 61, 1001), (9, 16, 20000), (150, 64, 700)], ids=["ragged", "many_splits", "row_tiles_vec"])
def test_float64_matches_reference(ops, shape, k, non_target, filter_threshold, class_index):
    B, D, C = shape
    case = Case(B, D, C, k=k, class_index=class_index, non_target=non_target, filter_threshold=filter_threshold)
    check_float64_matches_reference(ops, case, DEV)


@pytest.mark.parametrize("shape,k", [((20, 300, 500), 1), ((20, 300, 97), 5), ((11, 16, 20), 64)],
                         ids=["d_chunks", "k5", "k64"])
def test_float64_d_chunks_and_subcenters(ops, shape, k):
    B, D, C = shape
    case = Case(B, D, C, k=k, non_target=1, filter_threshold=0.3, class_index=(k == 5))
    check_float64_matches_reference(ops, case, DEV)


def test_tiny_problems(ops):
    check_tiny_problems(ops, DEV, TINY_SHAPES + ((65, 8, 3, 1),))  # + more rows than one row tile


# ------------------------------------------------------------------------------------------------------------
# float32: exact SIMT path by default, TF32 tensor cores when opted in
# ------------------------------------------------------------------------------------------------------------
F32_CONFIGS = [*PRECISION_CONFIGS, dict(B=70, D=600, C=700)]
F32_IDS = ["plain", "k3_class_index", "curricular_filter", "many_splits", "d_chunks"]


@pytest.mark.parametrize("config", F32_CONFIGS, ids=F32_IDS)
def test_float32_within_reference_error(ops, config):
    check_within_rule(ops, Case(**config).on(torch.float32, DEV), slack_rel=F32_SLACK, argmax_tol=1e-5)


@pytest.mark.parametrize("config", [dict(), dict(k=3, class_index=True, non_target=1, filter_threshold=0.2)],
                         ids=["plain", "k3_curricular_filter"])
def test_tf32_opt_in(ops, monkeypatch, config):
    check_tf32_opt_in(ops, monkeypatch, Case(B=70, D=64, C=900, **config).on(torch.float32, DEV))


# ------------------------------------------------------------------------------------------------------------
# bf16 / fp16 (tensor cores): the docs/DESIGN.md §4 rule
# ------------------------------------------------------------------------------------------------------------
LOW_CONFIGS = [*PRECISION_CONFIGS, dict(B=150, D=64, C=700), dict(B=70, D=600, C=700, non_target=1)]
LOW_IDS = ["ragged", "k3_class_index", "curricular_filter", "many_splits", "row_tiles_vec", "d_chunks"]


@pytest.mark.parametrize("config", LOW_CONFIGS, ids=LOW_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_within_reference_error(ops, dtype, config):
    check_within_rule(ops, Case(**config).on(dtype, DEV), slack_rel=1e-5, argmax_tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16], ids=["fp16"])  # bf16 always rounds once (to fp16)
def test_fast_backward_single_rounding(ops, monkeypatch, dtype):
    case = Case(B=70, D=64, C=900, non_target=1, filter_threshold=0.2).on(dtype, DEV)
    check_fast_backward_single_rounding(ops, monkeypatch, case)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["f64", "f32", "bf16", "fp16"])
@pytest.mark.parametrize("class_index", [False, True], ids=["all_classes", "class_index"])
def test_zero_norm_weight_rows(ops, dtype, class_index):
    check_zero_norm_weight_rows(ops, dtype, class_index, DEV)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
def test_class_index_leaves_other_rows_exactly_zero(ops, dtype):
    check_class_index_leaves_other_rows_zero(ops, Case(C=500, k=3, class_index=True).on(dtype, DEV))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_nan_input_propagates_to_lse(ops, dtype):
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    check_nan_input_propagates_to_lse(ops, Case(C=1001).on(dtype, DEV), tol=tol)


def test_out_of_range_labels_are_only_compared(ops):
    check_out_of_range_labels_are_only_compared(ops, DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
def test_deterministic_bitwise(ops, dtype):
    check_deterministic_bitwise(ops, Case(B=150, D=64, C=30000, k=1, non_target=1, filter_threshold=0.2).on(dtype, DEV))


def test_empty_batch(ops):
    check_empty_batch(ops, DEV)


def test_runs_on_current_stream_and_device(ops):
    case = Case(B=37, D=64, C=500).on(torch.float32, DEV)
    expected = run_op(ops, case)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = run_op(ops, case)
    assert_same_bits(got, expected, "on a side stream")


def test_bad_inputs_raise_clear_errors(ops):
    check_cuda_bad_inputs(ops, DEV, other_device="cpu")
    torch.cuda.synchronize()  # nothing above may have left a sticky CUDA error


# ------------------------------------------------------------------------------------------------------------
# 64-bit offsets: weight rows beyond row * D = 2^31 elements
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_offsets_beyond_2_31(ops):
    R, D, B = 4_200_000, 512, 8  # R * D = 2.15e9 > 2^31; 4.3 GB of bf16 (+ 4.3 GB for grad_weight)
    free, _ = torch.cuda.mem_get_info()
    if free < 14 * 2**30:
        pytest.skip("needs about 14 GB of free GPU memory")
    planted = torch.tensor([4_194_305, 4_199_999, 4_100_000, 1_000, 2_500_000, 4_194_304, 3, 4_199_998], device=DEV)
    assert int(planted[0]) * D > 2**31 and int(planted[1]) * D > 2**31
    g = torch.Generator(device=DEV).manual_seed(0)
    weight = torch.randn(R, D, generator=g, device=DEV, dtype=torch.bfloat16)
    x = torch.nn.functional.normalize(weight[planted].float(), dim=1)
    x[1] = torch.nn.functional.normalize(x[1] + 0.3 * torch.randn(D, generator=g, device=DEV), dim=0)
    x = x.to(torch.bfloat16)
    labels = torch.full((B,), -1, dtype=torch.long, device=DEV)
    labels[2] = int(planted[2])  # one row has its planted column as target
    tl = torch.full((B,), 12.0, device=DEV)
    rs = torch.full((B,), 16.0, device=DEV)
    thr = torch.zeros(B, device=DEV)
    grad = torch.linspace(0.5, 1.5, B, device=DEV)
    params = (0.0, 0, FILTER_OFF, 1)

    lse, argmax = ops.fused_lse(x, weight, labels, tl, rs, thr, None, *params, True)
    gx, gw, gtl, grs = ops.fused_lse_backward(grad, lse, x, weight, labels, tl, rs, thr, None, *params, True)
    torch.cuda.synchronize()
    assert torch.equal(argmax, planted), f"argmax {argmax.tolist()} != planted {planted.tolist()}"

    # Reference in float32, chunked over the rows of W (no B x R matrix kept): lse, then the gradients.
    xf = x.float()
    chunk = 1 << 19
    m = torch.full((B,), float("-inf"), device=DEV)
    s = torch.zeros(B, device=DEV)
    for r0 in range(0, R, chunk):
        w = weight[r0:r0 + chunk].float()
        inv = 1.0 / w.norm(dim=1).clamp_min(1e-12)
        z = rs[:, None] * ((xf @ w.t()) * inv)
        cols = torch.arange(r0, r0 + w.shape[0], device=DEV)
        z = torch.where(cols[None, :] == labels[:, None], tl[:, None], z)
        m_new = torch.maximum(m, z.amax(1))
        s = s * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(1)
        m = m_new
    ref_lse = m + torch.log(s)
    assert_close("lse (2^31 offsets)", lse, ref_lse, rtol=1e-5, atol=1e-4)

    ref_gx = torch.zeros(B, D, device=DEV)
    check_rows = torch.cat([planted, torch.tensor([4_194_400, 4_150_000, 17], device=DEV)])
    ref_rows = {}
    for r0 in range(0, R, chunk):
        w = weight[r0:r0 + chunk].float()
        inv = 1.0 / w.norm(dim=1).clamp_min(1e-12)
        cos = (xf @ w.t()) * inv
        cols = torch.arange(r0, r0 + w.shape[0], device=DEV)
        target = cols[None, :] == labels[:, None]
        p = torch.exp(rs[:, None] * cos - ref_lse[:, None])
        dcos = torch.where(target, torch.zeros_like(p), grad[:, None] * p * rs[:, None])
        ref_gx += (dcos * inv) @ w
        for r in check_rows.tolist():
            if r0 <= r < r0 + w.shape[0]:
                j = r - r0
                dc = dcos[:, j]
                ref_rows[r] = (dc @ xf) * inv[j] - (dc * cos[:, j]).sum() * w[j] * inv[j] ** 2
    assert_close("grad_x (2^31 offsets)", gx.float(), ref_gx, rtol=2e-2, atol=2e-2 * float(ref_gx.abs().max()))
    for r, ref in ref_rows.items():
        assert_close(f"grad_weight[{r}] (2^31 offsets)", gw[r].float(), ref, rtol=2e-2,
                     atol=2e-2 * float(ref.abs().max()) + 1e-30)
    ref_gtl = grad * torch.exp(tl - ref_lse) * (labels >= 0)
    assert_close("grad_target_logit (2^31 offsets)", gtl, ref_gtl, rtol=1e-4, atol=1e-6)
    assert bool(torch.isfinite(grs).all())
    del weight, gw
    torch.cuda.empty_cache()


@pytest.mark.skipif(not os.environ.get("MARGINOPS_TEST_COMPUTE_SANITIZER"), reason="bench/gpu_check.sh runs this")
def test_small_case_for_compute_sanitizer(ops):
    """A small fwd+bwd per dtype for ``compute-sanitizer --tool memcheck pytest -k compute_sanitizer``."""
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for config in (dict(B=37, D=61, C=301, k=3, class_index=True), dict(B=70, D=64, C=200)):
            run_op(ops, Case(**config).on(dtype, DEV))
