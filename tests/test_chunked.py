"""The class-chunked CUDA path (issue 13: csrc/chunk_loop.h + csrc/cuda/chunk_epilogue.cuh) without a GPU:
the chunk loop on CPU tensors (ATen's CPU matrix products; 16-bit operands widened to fp32, which is what cuBLAS's
fp32-accumulating products compute up to summation order) with its CUDA epilogue kernels under the emulator
(tests/cuda_emu).  The op-level cases every backend runs are in tests/test_op_suite.py (adapter
"cuda_chunked_emu" of tests/op_backends.py); here: what is specific to the chunked path (small chunks and row
tiles under the 16-bit scaling tests, NaN gradients, the count of the loop's matrix-product FLOPs, the fp16
hi + lo gradient block).  MARGINOPS_CHUNK_COLS / MARGINOPS_CHUNK_ROWS force many class chunks and row tiles at
these small shapes.
"""

import cuda_emulator
import pytest
import torch
from helpers import assert_close, assert_within_reference_error
from op_cases import (
    F32_SLACK,
    F64_RTOL,
    LOW_SLACK_CUDA,
    NAMES,
    Case,
    assert_matches_float64,
    assert_within_rule,
    run_op,
    run_reference,
)

pytestmark = pytest.mark.emulator


@pytest.fixture(scope="module")
def ops():
    return cuda_emulator.EmulatedChunkedOps(cuda_emulator.load())


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 37 classes and tiles of 16 rows: ragged last chunk and last tile in every case."""
    monkeypatch.setenv("MARGINOPS_CHUNK_COLS", "37")
    monkeypatch.setenv("MARGINOPS_CHUNK_ROWS", "16")


@pytest.mark.parametrize(
    "dtype,factor",
    [(torch.bfloat16, 2.0**20), (torch.float16, 2.0**8), (torch.float16, 1e-6), (torch.bfloat16, 1e-6)],
    ids=["bf16_large", "fp16_large", "fp16_tiny", "bf16_tiny"],
)
def test_upstream_gradient_scale(ops, small_chunks, dtype, factor):
    """Loss-scaled (large) and tiny upstream gradients: the fp16 gradient block is scaled per row by a power of
    two, so it neither overflows nor loses its precision in fp16's subnormals."""
    case = Case(B=37, D=64, C=200, non_target=1, filter_threshold=0.2)
    case.grad = case.grad * factor
    low = case.on(dtype)
    assert_within_rule(run_op(ops, low), low, slack_rel=LOW_SLACK_CUDA)


@pytest.mark.parametrize("k", [1, 3], ids=["k1", "k3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_small_norm_rows_and_tiny_row_gradients(ops, small_chunks, dtype, k):
    """W rows of norm ~0.1 (their 1 / n goes to the dX operand as a power of two) and half the rows with an
    upstream gradient 1e-9 of the others: the docs/DESIGN.md §4 rule on every output, and on the tiny rows'
    grad_x alone."""
    case = Case(B=37, D=64, C=120 // k, k=k, non_target=1, filter_threshold=0.2)
    case.weight = case.weight * 0.01
    case.grad = case.grad.clone()
    case.grad[1::2] *= 1e-9
    low = case.on(dtype)
    ours = run_op(ops, low)
    assert_within_rule(ours, low, slack_rel=LOW_SLACK_CUDA)
    tiny = torch.zeros(case.x.shape[0], dtype=torch.bool)
    tiny[1::2] = True
    truth, same = run_reference(low.on_exact()), run_reference(low)
    assert_within_reference_error(
        "grad_x (tiny-gradient rows)",
        ours[2][tiny],
        truth[2][tiny],
        same[2][tiny],
        slack=LOW_SLACK_CUDA * float(truth[2][tiny].abs().max()),
    )


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=["f64", "f32", "bf16", "fp16"]
)
def test_zero_norm_rows_small_chunks(ops, small_chunks, dtype):
    """Zero weight rows (1 / n = 1e12: the largest power-of-two split) spread over several chunks: the other
    rows' results by the docs/DESIGN.md §4 rule (float64: tightly), the zero rows' own gradient finite where the
    reference's is."""
    zero = torch.tensor([0, 7, 40, 119])
    case = Case(B=21, D=32, C=120, zero_rows=tuple(zero.tolist())).on(dtype)
    ours, ref = run_op(ops, case), run_reference(case)
    other = torch.ones(120, dtype=torch.bool)
    other[zero] = False
    assert torch.equal(torch.isfinite(ours[3][zero]), torch.isfinite(ref[3][zero]))
    if dtype == torch.float64:
        for name, a, b in zip(
            ("lse", "grad_x", "grad_weight"), (ours[0], ours[2], ours[3][other]), (ref[0], ref[2], ref[3][other])
        ):
            assert_close(name, a, b, rtol=1e-9, atol=1e-9 * float(b.abs().max()))
    else:
        assert_within_rule(ours, case, slack_rel=LOW_SLACK_CUDA, weight_rows=other)


@pytest.mark.parametrize("k", [1, 2], ids=["k1", "k2"])
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=["f64", "f32", "bf16", "fp16"]
)
def test_16_byte_loop_and_column_splits(ops, monkeypatch, dtype, k):
    """The epilogues' 16-byte loop (k = 1, rows a multiple of 16 bytes: chunks of 1024 classes) and its scalar
    path (a last chunk of 1020: 16-byte for the fp32 block, one column at a time for an fp16 gradient block; k = 2:
    sub-centres), each chunk split over several column spans whose partials the last block merges (the emulator's
    64-thread blocks: 2 to 16 splits here), row blocks of 4 with a partial last one (tiles of 24 rows, 37 rows), targets
    in every lane: within the rule, float64 tightly, argmax exact in float64; float32 bitwise the same when run again
    (the split partials merge in a fixed order; one dtype is enough, the other dtypes share the merge code)."""
    monkeypatch.setenv("MARGINOPS_CHUNK_COLS", str(1024 // k))
    monkeypatch.setenv("MARGINOPS_CHUNK_ROWS", "24")
    case = Case(B=37, D=32, C=2044 // k, k=k, non_target=1, filter_threshold=0.2).on(dtype)
    ours = run_op(ops, case)
    if dtype == torch.float64:
        ref = run_reference(case)
        assert torch.equal(ours[1], ref[1])
        for name, a, b in zip(NAMES, ours, ref):
            if name != "argmax":
                assert_close(name, a, b, rtol=F64_RTOL, atol=F64_RTOL * float(b.abs().max()))
    else:
        assert_within_rule(ours, case, slack_rel=F32_SLACK if dtype == torch.float32 else LOW_SLACK_CUDA)
    if dtype == torch.float32:
        again = run_op(ops, case)
        for name, a, b in zip(NAMES, ours, again):
            assert torch.equal(a, b), name


def test_forward_norms_ahead_of_their_chunks(ops, monkeypatch):
    """The forward computes the norms of up to 64 chunks' weight rows in one launch (on a GPU each launch costs
    microseconds of idle device, the norms' bytes are the same): 150 one-class chunks make 150 epilogue launches and
    3 norm launches, and match the reference in float64 across the refills (chunks 64 and 128)."""
    monkeypatch.setenv("MARGINOPS_CHUNK_COLS", "1")
    case = Case(B=3, D=8, C=150, non_target=1, filter_threshold=0.3).on(torch.float64)
    before = ops.launches()
    lse, argmax = ops.fused_lse(*case.args(), True)
    assert ops.launches() - before == 150 + 3
    ref = run_reference(case)
    assert torch.equal(argmax, ref[1])
    assert_close("lse", lse, ref[0], rtol=1e-12, atol=1e-12)
    assert_matches_float64(run_op(ops, case), ref)


def test_nan_upstream_gradient_propagates(ops, small_chunks):
    """A NaN upstream gradient makes that row's grad_x NaN and reaches grad_weight where the reference's is NaN;
    the other rows' grad_x stay finite."""
    case = Case(B=20, D=16, C=90)
    case.grad = case.grad.clone()
    case.grad[4] = float("nan")
    ours, ref = run_op(ops, case), run_reference(case)
    for name, a, b in zip(("grad_x", "grad_weight"), ours[2:4], ref[2:4]):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
    assert bool(torch.isnan(ours[2][4]).all()) and bool(torch.isfinite(ours[2][:4]).all())


def test_fast_backward_drops_the_lo_block(ops, small_chunks, monkeypatch):
    """fp16 inputs: MARGINOPS_CUDA_FAST_BWD=1 rounds the gradient block once (no lo block): same forward, close
    backward, fewer FLOPs (4 units instead of 6)."""
    case = Case(B=37, D=64, C=200, non_target=1, filter_threshold=0.2).on(torch.float16)
    default = run_op(ops, case)
    monkeypatch.setenv("MARGINOPS_CUDA_FAST_BWD", "1")
    fast = run_op(ops, case)
    assert torch.equal(fast[0], default[0]) and torch.equal(fast[1], default[1])
    for a, b in zip(fast[2:], default[2:]):
        assert_close("fast backward", a, b, rtol=0.0, atol=2e-2 * float(b.abs().max()) + 1e-6)


# ------------------------------------------------------------------------------------------------------------
# matrix-product FLOPs of the chunk loop: unit = 2·B·R·D (R = weight rows it reads: C·k, or |class_index|·k);
# 1 unit forward, 3 backward (cosines again, dX, dW); fp16 inputs 5 backward (dX and dW also on the lo block)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config", [dict(B=37, D=61, C=300), dict(B=40, D=32, C=90, k=3, class_index=True)], ids=["plain", "k3_class_index"]
)
@pytest.mark.parametrize(
    "dtype,backward_units",
    [(torch.float64, 3), (torch.float32, 3), (torch.bfloat16, 3), (torch.float16, 5)],
    ids=["f64", "f32", "bf16", "fp16"],
)
def test_gemm_flops(ops, small_chunks, dtype, backward_units, config):
    case = Case(**config).on(dtype)
    B, D = case.x.shape
    rows = case.weight.shape[0] if case.class_index is None else case.class_index.numel() * case.params[3]
    unit = 2 * B * rows * D
    before = ops.gemm_flops()
    lse, _ = ops.fused_lse(*case.args(), True)
    forward = ops.gemm_flops() - before
    ops.fused_lse_backward(case.grad, lse, *case.args(), True)
    backward = ops.gemm_flops() - before - forward
    assert (forward, backward) == (unit, backward_units * unit)


# ------------------------------------------------------------------------------------------------------------
# frozen parts cost nothing: need_grad_x / need_grad_weight (the backward's last two arguments)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "fp16"])
def test_frozen_parts_skip_their_products(ops, small_chunks, dtype):
    """An unwanted gradient comes back empty, without its matrix product (3 units per forward + backward instead of
    4 for one frozen part; fp16: the lo block's product goes too); the wanted ones are bitwise those of the full
    backward.  Frozen x, frozen W and both, against one full backward."""
    case = Case(B=37, D=61, C=300, k=3, class_index=True, non_target=1, filter_threshold=0.2).on(dtype)
    B, D = case.x.shape
    unit = 2 * B * case.class_index.numel() * 3 * D
    per_product = 2 if dtype == torch.float16 else 1  # hi + lo blocks
    lse, _ = ops.fused_lse(*case.args(), True)
    full = ops.fused_lse_backward(case.grad, lse, *case.args(), True)
    for need_x, need_w in ((False, True), (True, False), (False, False)):
        before = ops.gemm_flops()
        part = ops.fused_lse_backward(case.grad, lse, *case.args(), True, need_x, need_w)
        flops = ops.gemm_flops() - before
        assert flops == unit * (1 + per_product * (int(need_x) + int(need_w))), (need_x, need_w)
        for name, wanted, a, b in zip(("grad_x", "grad_weight"), (need_x, need_w), part[:2], full[:2]):
            if wanted:
                assert torch.equal(a, b), (name, need_x, need_w)
            else:
                assert a.numel() == 0 and a.dtype == b.dtype, (name, need_x, need_w)
        assert torch.equal(part[2], full[2]) and torch.equal(part[3], full[3]), (need_x, need_w)


@pytest.mark.heavy
@pytest.mark.xdist_group("sanitizer_address")  # with the other AddressSanitizer tests: one build
def test_chunked_kernels_clean_under_address_sanitizer():
    """The chunked path's kernels and loop under AddressSanitizer (tests/cuda_emu/memcheck_chunked.py): every
    global access within its buffer, in every dtype, with ragged chunks and row tiles."""
    proc = cuda_emulator.run_under_sanitizer("address", "memcheck_chunked.py")
    report = proc.stderr[-6000:] + proc.stdout[-1000:]
    assert "Sanitizer" not in proc.stderr, f"out-of-bounds access:\n{report}"
    assert proc.returncode == 0 and "memcheck: clean" in proc.stdout, report
