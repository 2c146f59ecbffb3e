"""The CUDA kernels (csrc/cuda) run on the CPU by the emulator in tests/cuda_emu, against the same reference and
with the same test bodies (tests/op_cases.py) as tests/test_cuda_op.py uses on a GPU.

Everything of csrc/cuda runs except the device itself: the op layer's checks and grid planning, the launchers,
and every kernel (forward, merge, dW, dX, reductions) for all five paths (fp64 / fp32 SIMT, tf32 / bf16 / fp16
WMMA).  The emulator is strict about barriers, cp.async completion, unwritten shared memory and WMMA alignment
(tests/cuda_emu/include/cuda_runtime.h), and one test reruns a set of cases under AddressSanitizer as a
memcheck.  What it cannot show: speed, the real tensor cores' rounding, and races the hardware would expose
but one emulated schedule does not.  Shapes are small (one OS thread per CUDA thread); MARGINOPS_EMU_SMS
shrinks the emulated device so that few class splits each loop over many class tiles.
"""

import subprocess
import sys
from pathlib import Path

import cuda_emulator
import pytest
import torch
from helpers import assert_within_reference_error, child_env
from op_cases import (
    F32_SLACK,
    TINY_SHAPES,
    Case,
    assert_within_rule,
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
    run_reference,
)

pytestmark = pytest.mark.emulator
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ops():
    return cuda_emulator.EmulatedOps(cuda_emulator.load())


@pytest.fixture
def few_sms(monkeypatch):
    monkeypatch.setenv("MARGINOPS_EMU_SMS", "2")


# ------------------------------------------------------------------------------------------------------------
# float64 (SIMT fp64 path): tight agreement with the reference
# ------------------------------------------------------------------------------------------------------------
@float64_grid([(37, 61, 200)], ids=["ragged"])
def test_float64_matches_reference(ops, shape, k, non_target, filter_threshold, class_index):
    B, D, C = shape
    case = Case(B, D, C, k=k, class_index=class_index, non_target=non_target, filter_threshold=filter_threshold)
    check_float64_matches_reference(ops, case, CPU)


@pytest.mark.parametrize("shape,k,sms", [((70, 64, 150), 1, 132), ((9, 16, 3000), 1, 2), ((5, 300, 40), 1, 132),
                                         ((6, 300, 30), 5, 132), ((4, 16, 8), 64, 132)],
                         ids=["row_tiles_vec", "tiles_per_split", "d_chunks", "k5", "k64"])
def test_float64_shapes(ops, monkeypatch, shape, k, sms):
    monkeypatch.setenv("MARGINOPS_EMU_SMS", str(sms))
    B, D, C = shape
    case = Case(B, D, C, k=k, non_target=1, filter_threshold=0.3, class_index=(k == 5))
    check_float64_matches_reference(ops, case, CPU)


def test_tiny_problems(ops):
    check_tiny_problems(ops, CPU, TINY_SHAPES + ((65, 8, 3, 1),))


# ------------------------------------------------------------------------------------------------------------
# float32 (SIMT), bf16 / fp16 (WMMA) by the docs/DESIGN.md §4 rule; tf32 and the fast backward
# ------------------------------------------------------------------------------------------------------------
CONFIGS = [
    dict(B=37, D=61, C=300),
    dict(B=37, D=61, C=300, k=3, class_index=True),
    dict(B=37, D=61, C=300, non_target=1, filter_threshold=0.2),
    dict(B=9, D=16, C=3000),  # with 2 emulated SMs: many class tiles per split
    dict(B=70, D=64, C=150),
    dict(B=5, D=600, C=40, non_target=1),
]
CONFIG_IDS = ["ragged", "k3_class_index", "curricular_filter", "tiles_per_split", "row_tiles_vec", "d_chunks"]


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "fp16"])
def test_within_reference_error(ops, few_sms, dtype, config):
    slack, argmax_tol = (F32_SLACK, 1e-5) if dtype == torch.float32 else (1e-5, 1e-4)
    check_within_rule(ops, Case(**config).on(dtype), slack_rel=slack, argmax_tol=argmax_tol)


@pytest.mark.parametrize("config", [dict(), dict(k=3, class_index=True, non_target=1, filter_threshold=0.2)],
                         ids=["plain", "k3_curricular_filter"])
def test_tf32_opt_in(ops, monkeypatch, config):
    check_tf32_opt_in(ops, monkeypatch, Case(B=37, D=64, C=200, **config).on(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16], ids=["fp16"])  # bf16 always rounds once (to fp16)
def test_fast_backward_single_rounding(ops, monkeypatch, dtype):
    case = Case(B=37, D=64, C=200, non_target=1, filter_threshold=0.2).on(dtype)
    check_fast_backward_single_rounding(ops, monkeypatch, case)


@pytest.mark.parametrize("dtype,factor", [(torch.bfloat16, 2.0**20), (torch.float16, 2.0**8)], ids=["bf16", "fp16"])
def test_large_upstream_gradient(ops, dtype, factor):
    """Loss-scaled gradients: dcos = g·p·s·φ' reaches 1e7 (bf16 case), far past fp16's range; the fp16 product
    operands stay finite because the kernels rescale dcos by a power of two first."""
    case = Case(B=37, D=64, C=200, non_target=1, filter_threshold=0.2)
    case.grad = case.grad * factor
    check_within_rule(ops, case.on(dtype), slack_rel=1e-5, argmax_tol=1e-4)


@pytest.mark.parametrize("k", [1, 3], ids=["k1", "k3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_small_norm_rows_and_tiny_row_gradients(ops, dtype, k):
    """W rows of norm ~0.1 (the dX operand must not leave fp16's range) and half the rows with an upstream
    gradient 1e-9 of the others (their grad_x keeps its own precision): the docs/DESIGN.md §4 rule on every output,
    and on the tiny rows' grad_x alone."""
    case = Case(B=37, D=64, C=120 if k == 1 else 40, k=k, non_target=1, filter_threshold=0.2)
    case.weight = case.weight * 0.01
    case.grad = case.grad.clone()
    case.grad[1::2] *= 1e-9
    low = case.on(dtype)
    ours = run_op(ops, low)
    assert_within_rule(ours, low, slack_rel=1e-5)
    tiny = torch.zeros(case.x.shape[0], dtype=torch.bool)
    tiny[1::2] = True
    truth, same = run_reference(low.on_exact()), run_reference(low)
    assert_within_reference_error("grad_x (tiny-gradient rows)", ours[2][tiny], truth[2][tiny], same[2][tiny],
                                  slack=1e-5 * float(truth[2][tiny].abs().max()))


# ------------------------------------------------------------------------------------------------------------
# edge cases
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["f64", "f32", "bf16", "fp16"])
@pytest.mark.parametrize("class_index", [False, True], ids=["all_classes", "class_index"])
def test_zero_norm_weight_rows(ops, dtype, class_index):
    check_zero_norm_weight_rows(ops, dtype, class_index, CPU)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
def test_class_index_leaves_other_rows_exactly_zero(ops, dtype):
    check_class_index_leaves_other_rows_zero(ops, Case(C=200, k=3, class_index=True).on(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_nan_input_propagates_to_lse(ops, dtype):
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    check_nan_input_propagates_to_lse(ops, Case(C=300).on(dtype), tol=tol)


def test_out_of_range_labels_are_only_compared(ops):
    check_out_of_range_labels_are_only_compared(ops, CPU)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
def test_deterministic_bitwise(ops, few_sms, dtype):
    check_deterministic_bitwise(ops, Case(B=70, D=64, C=200, non_target=1, filter_threshold=0.2).on(dtype))


def test_empty_batch(ops):
    check_empty_batch(ops, CPU)


def test_bad_inputs_raise_clear_errors(ops):
    check_cuda_bad_inputs(ops, CPU)


# ------------------------------------------------------------------------------------------------------------
# memcheck: the same kernels under AddressSanitizer
# ------------------------------------------------------------------------------------------------------------
def _runtime_library(name):
    try:
        out = subprocess.run(["c++", f"-print-file-name={name}"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(out.stdout.strip())
    return str(path) if path.is_absolute() and path.exists() else None


SANITIZERS = {
    # sanitizer: (runtime library, environment, what a finding means)
    "address": ("libasan.so", {"ASAN_OPTIONS": "detect_leaks=0:exitcode=86"}, "out-of-bounds access"),
    "thread": ("libtsan.so", {"TSAN_OPTIONS": "exitcode=66"}, "data race (a missing barrier)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("sanitizer", list(SANITIZERS))
def test_kernels_clean_under_sanitizer(sanitizer):
    """AddressSanitizer as the memcheck (every global and shared-memory access within its buffer), ThreadSanitizer
    as the racecheck (every shared-memory write and read of different threads separated by a barrier)."""
    library, options, finding = SANITIZERS[sanitizer]
    # libstdc++ is preloaded too: python does not link it, and the sanitizer must find it at start-up
    preload = [_runtime_library(library), _runtime_library("libstdc++.so")]
    if None in preload:
        pytest.fail(f"sanitizer runtime not found by c++ -print-file-name: {library} / libstdc++.so")
    script = Path(cuda_emulator.__file__).parent / "cuda_emu" / "memcheck.py"
    env = child_env(LD_PRELOAD=" ".join(preload), **options)
    proc = subprocess.run([sys.executable, str(script), sanitizer], env=env, capture_output=True, text=True,
                          timeout=1800)
    report = proc.stderr[-6000:] + proc.stdout[-1000:]
    assert "Sanitizer" not in proc.stderr, f"{finding}:\n{report}"
    assert proc.returncode == 0 and "memcheck: clean" in proc.stdout, report


# ------------------------------------------------------------------------------------------------------------
# 64-bit offsets: weight rows beyond row * D = 2^31 elements, reached through class_index
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_offsets_beyond_2_31(ops):
    """An 8-class problem whose weight rows sit at row * D > 2^31 of a 4.3 GB bf16 weight (only those rows are
    written: the rest stays untouched virtual memory); it must equal the same problem with the rows packed."""
    D = 64
    R = 2**31 // D + 2**16
    small = Case(B=8, D=D, C=8, none_every=4).on(torch.bfloat16)
    rows = torch.tensor([R - 1, 2**31 // D + 5, 2**31 // D, 2**31 // D - 1, R - 2, 12345, 2**31 // D + 2**15, 0])
    assert int(rows[0]) * D >= 2**31 and int(rows[1]) * D >= 2**31
    big = Case(B=8, D=D, C=8, none_every=4).on(torch.bfloat16)
    big.weight = torch.empty(R, D, dtype=torch.bfloat16)
    big.weight[rows] = small.weight
    big.class_index = rows
    ours = list(run_op(ops, big))
    grad_weight = ours[3]
    packed = grad_weight[rows].clone()
    grad_weight[rows] = 0
    assert int(torch.count_nonzero(grad_weight)) == 0, "rows outside class_index must get exactly zero"
    ours[3] = packed
    assert_within_rule(tuple(ours), small, slack_rel=1e-5)
