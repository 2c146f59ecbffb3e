"""Op-level tests of the C++ CPU kernels (csrc/cpu) behind torch.ops.marginops.fused_lse / fused_lse_backward.

Everything is compared with ``marginops.reference.fused_lse`` (logits materialized, autograd for the backward):
in float64 to tight tolerances, in float32 by the docs/DESIGN.md §4 rule (error vs the float64 truth ≤ 2 × the error
of the reference run in float32, plus slack). Shapes are ragged (B=37, D=61, N=1001: partial chunks and partial
vectors) or wide (N=20000: many chunks), small enough for 2 cores. The extension is loaded through
``marginops._build.load_cpu()`` (first use compiles it).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_close
from op_cases import (
    CPU,
    NAMES,
    PRECISION_CONFIGS,
    Case,
    assert_argmax_near_max,
    assert_matches_float64,
    assert_same_bits,
    assert_within_rule,
    call_op,
    check_class_index_leaves_other_rows_zero,
    check_common_bad_inputs,
    check_float64_matches_reference,
    check_nan_input_propagates_to_lse,
    check_out_of_range_labels_are_only_compared,
    check_tiny_problems,
    float64_grid,
    run_op,
    run_reference,
)


@pytest.fixture(scope="module")
def ops():
    from marginops import _build

    _build.load_cpu()
    return torch.ops.marginops


@float64_grid([(37, 61, 1001), (9, 16, 20000)], ids=["ragged", "many_chunks"])
def test_float64_matches_reference(ops, shape, k, non_target, filter_threshold, class_index):
    B, D, C = shape
    case = Case(B, D, C, k=k, class_index=class_index, non_target=non_target, filter_threshold=filter_threshold)
    check_float64_matches_reference(ops, case, CPU)


@pytest.mark.parametrize(
    "config",
    PRECISION_CONFIGS,
    ids=["plain", "k3_class_index", "curricular_filter", "many_chunks"],
)
def test_float32_within_reference_error(ops, config):
    case64 = Case(**config)
    case32 = case64.on(torch.float32)
    ours = run_op(ops, case32)
    # truth: the float64 reference on the unrounded inputs
    assert_within_rule(ours, case32, slack_rel=1e-6, truth=run_reference(case64), slack_abs=0.0)
    # argmax in float32 may flip between near-equal cosines: the chosen column must be a float64 maximum
    assert_argmax_near_max(ours[1], case64, tol=1e-5)


@pytest.mark.parametrize("class_index", [False, True], ids=["all_classes", "class_index"])
def test_zero_norm_weight_rows(ops, class_index):
    case = Case(C=300, k=1, class_index=class_index, zero_rows=(0, 7, 123, 299))
    ours, ref = run_op(ops, case), run_reference(case)
    assert all(bool(torch.isfinite(t).all()) for t in ours), "zero-norm rows must give finite results"
    assert_matches_float64(ours, ref)


def test_class_index_leaves_other_rows_exactly_zero(ops):
    check_class_index_leaves_other_rows_zero(ops, Case(C=500, k=3, class_index=True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nan_input_propagates_to_lse(ops, dtype):
    check_nan_input_propagates_to_lse(ops, Case(C=1001).on(dtype), tol=1e-5)


def test_tiny_problems_use_scalar_tails(ops):
    check_tiny_problems(ops, CPU)


def test_out_of_range_labels_are_only_compared(ops):
    check_out_of_range_labels_are_only_compared(ops, CPU)


def test_deterministic_bitwise(ops):
    case = Case(B=64, D=64, C=30000, k=1, non_target=1, filter_threshold=0.2).on(torch.float32)
    first = run_op(ops, case)
    second = run_op(ops, case)
    assert_same_bits(first, second, "between two identical runs")
    # The forward does not depend on the thread count either (per-chunk partials, merged in order).
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        lse1, argmax1 = ops.fused_lse(*case.args(), True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(lse1, first[0]) and torch.equal(argmax1, first[1])


_WIDTH_CHILD = textwrap.dedent(
    """
    import sys, torch
    torch.ops.load_library(sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    import test_fused_op as t
    out = {}
    for name, case in t.width_cases():
        out[name] = t.run_op(torch.ops.marginops, case)
    torch.save(out, sys.argv[3])
    """
)


def width_cases():
    return [
        ("f64", Case(C=1001, k=1, non_target=1, filter_threshold=0.2)),
        ("f64_k3", Case(C=301, k=3, class_index=True)),
        ("f32", Case(C=1001, k=1, non_target=1, filter_threshold=0.2).on(torch.float32)),
    ]


@pytest.mark.parametrize("width", ["128", "256"])
def test_narrower_vector_kernels(ops, width, tmp_path):
    """The kernels are compiled per vector width and the widest is picked at load; check the others too."""
    library = next((p for p in torch.ops.loaded_libraries if "marginops_C" in os.path.basename(p)), None)
    if library is None:
        pytest.skip("the extension was not loaded from a file torch.ops knows")
    out = tmp_path / "out.pt"
    env = dict(os.environ, MARGINOPS_CPU_VECTOR=width)
    subprocess.run([sys.executable, "-c", _WIDTH_CHILD, library, os.path.dirname(__file__), str(out)], env=env,
                   check=True, timeout=300)
    results = torch.load(out)
    for name, case in width_cases():
        ours = results[name]
        if case.x.dtype == torch.float64:
            assert_matches_float64(ours, run_reference(case))
        else:
            default = run_op(ops, case)
            for field, a, b in zip(NAMES, ours, default):
                if field != "argmax":
                    assert_close(f"{field} ({width}-bit vs default)", a, b, rtol=1e-4,
                                 atol=1e-5 * float(b.abs().max()))


def test_bad_inputs_raise_clear_errors(ops):
    case = Case(C=50)
    check_common_bad_inputs(ops, case, CPU, unsupported_dtype=torch.float16, other_float_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="features"):
        call_op(ops, case, weight=case.weight[:, :-1])
