"""Op-level checks that only make sense for one backend; everything else is in tests/test_op_suite.py.

cpu:      the narrower vector widths the kernels are also compiled for; a forward independent of the thread count.
cuda:     the current stream; a small case for compute-sanitizer (bench/gpu_check.sh); 2^31 offsets without
          class_index in a fully written 4.3 GB bf16 weight (argmax over all 4.2M rows, chunked reference).
cuda_emu: the CUDA kernels under AddressSanitizer (memcheck) and ThreadSanitizer (racecheck).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from cuda_emulator import SANITIZERS, run_under_sanitizer
from helpers import assert_close
from op_backends import BY_NAME
from op_cases import (
    BIG_GRAD_TOL,
    BIG_LSE_ATOL,
    BIG_LSE_RTOL,
    BIG_TARGET_ATOL,
    BIG_TARGET_RTOL,
    FILTER_OFF,
    NAMES,
    VECTOR_WIDTH_ATOL,
    VECTOR_WIDTH_RTOL,
    Case,
    assert_matches_float64,
    assert_same_bits,
    run_op,
    run_reference,
)

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def cpu_ops():
    return BY_NAME["cpu"].load()


@pytest.fixture(scope="module")
def cuda_ops():
    return BY_NAME["cuda"].load()


# ------------------------------------------------------------------------------------------------------------
# cpu
# ------------------------------------------------------------------------------------------------------------
def test_cpu_forward_independent_of_thread_count(cpu_ops):
    """Per-chunk partials merged in order: the forward does not depend on the thread count."""
    case = Case(B=64, D=64, C=30000, k=1, non_target=1, filter_threshold=0.2).on(torch.float32)
    lse, argmax = cpu_ops.fused_lse(*case.args(), True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        lse1, argmax1 = cpu_ops.fused_lse(*case.args(), True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(lse1, lse) and torch.equal(argmax1, argmax)


_WIDTH_CHILD = textwrap.dedent(
    """
    import sys, torch
    torch.ops.load_library(sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    import test_op_backend_specific as t
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
def test_cpu_narrower_vector_kernels(cpu_ops, width, tmp_path):
    """The kernels are compiled per vector width and the widest is picked at load; check the others too."""
    library = next((p for p in torch.ops.loaded_libraries if "marginops_C" in os.path.basename(p)), None)
    if library is None:
        pytest.skip("the extension was not loaded from a file torch.ops knows")
    out = tmp_path / "out.pt"
    env = dict(os.environ, MARGINOPS_CPU_VECTOR=width)
    subprocess.run(
        [sys.executable, "-c", _WIDTH_CHILD, library, os.path.dirname(__file__), str(out)],
        env=env,
        check=True,
        timeout=300,
    )
    results = torch.load(out)
    for name, case in width_cases():
        ours = results[name]
        if case.x.dtype == torch.float64:
            assert_matches_float64(ours, run_reference(case))
        else:
            default = run_op(cpu_ops, case)
            for field, a, b in zip(NAMES, ours, default):
                if field != "argmax":
                    assert_close(
                        f"{field} ({width}-bit vs default)",
                        a,
                        b,
                        rtol=VECTOR_WIDTH_RTOL,
                        atol=VECTOR_WIDTH_ATOL * float(b.abs().max()),
                    )


# ------------------------------------------------------------------------------------------------------------
# cuda (a GPU)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_cuda_runs_on_current_stream(cuda_ops):
    case = Case(B=37, D=64, C=500).on(torch.float32, "cuda")
    expected = run_op(cuda_ops, case)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = run_op(cuda_ops, case)
    assert_same_bits(got, expected, "on a side stream")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.skipif(not os.environ.get("MARGINOPS_TEST_COMPUTE_SANITIZER"), reason="bench/gpu_check.sh runs this")
def test_cuda_small_case_for_compute_sanitizer(cuda_ops):
    """A small fwd+bwd per dtype for ``compute-sanitizer --tool memcheck pytest -k compute_sanitizer``."""
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for config in (dict(B=37, D=61, C=301, k=3, class_index=True), dict(B=70, D=64, C=200)):
            run_op(cuda_ops, Case(**config).on(dtype, "cuda"))


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_cuda_offsets_beyond_2_31_full_weight(cuda_ops):
    """No class_index: argmax and gradients over every row of a fully written 4.3 GB bf16 weight."""
    ops, DEV = cuda_ops, torch.device("cuda")
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
    params = (torch.tensor(0.0, dtype=torch.float64), 0, FILTER_OFF, 1)

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
        w = weight[r0 : r0 + chunk].float()
        inv = 1.0 / w.norm(dim=1).clamp_min(1e-12)
        z = rs[:, None] * ((xf @ w.t()) * inv)
        cols = torch.arange(r0, r0 + w.shape[0], device=DEV)
        z = torch.where(cols[None, :] == labels[:, None], tl[:, None], z)
        m_new = torch.maximum(m, z.amax(1))
        s = s * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(1)
        m = m_new
    ref_lse = m + torch.log(s)
    assert_close("lse (2^31 offsets)", lse, ref_lse, rtol=BIG_LSE_RTOL, atol=BIG_LSE_ATOL)

    ref_gx = torch.zeros(B, D, device=DEV)
    check_rows = torch.cat([planted, torch.tensor([4_194_400, 4_150_000, 17], device=DEV)])
    ref_rows = {}
    for r0 in range(0, R, chunk):
        w = weight[r0 : r0 + chunk].float()
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
    assert_close(
        "grad_x (2^31 offsets)", gx.float(), ref_gx, rtol=BIG_GRAD_TOL, atol=BIG_GRAD_TOL * float(ref_gx.abs().max())
    )
    for r, ref in ref_rows.items():
        assert_close(
            f"grad_weight[{r}] (2^31 offsets)",
            gw[r].float(),
            ref,
            rtol=BIG_GRAD_TOL,
            atol=BIG_GRAD_TOL * float(ref.abs().max()) + 1e-30,
        )
    ref_gtl = grad * torch.exp(tl - ref_lse) * (labels >= 0)
    assert_close("grad_target_logit (2^31 offsets)", gtl, ref_gtl, rtol=BIG_TARGET_RTOL, atol=BIG_TARGET_ATOL)
    assert bool(torch.isfinite(grs).all())
    del weight, gw
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------------
# cuda_emu: memcheck and racecheck, the same kernels under AddressSanitizer / ThreadSanitizer
# ------------------------------------------------------------------------------------------------------------
# one test process per sanitizer: its emulator build (minutes) is made once, and the other process runs the other
# sanitizer's tests meanwhile instead of waiting on the build's lock
BY_SANITIZER = [pytest.param(name, marks=pytest.mark.xdist_group(f"sanitizer_{name}")) for name in SANITIZERS]


@pytest.mark.heavy
@pytest.mark.emulator
@pytest.mark.parametrize("sanitizer", BY_SANITIZER)
def test_cuda_emu_kernels_cleanrun_under_sanitizer(sanitizer):
    """AddressSanitizer as the memcheck (every global and shared-memory access within its buffer), ThreadSanitizer
    as the racecheck (every shared-memory write and read of different threads separated by a barrier)."""
    proc = run_under_sanitizer(sanitizer, "memcheck.py", sanitizer)
    report = proc.stderr[-6000:] + proc.stdout[-1000:]
    assert "Sanitizer" not in proc.stderr, f"{SANITIZERS[sanitizer][2]}:\n{report}"
    assert proc.returncode == 0 and "memcheck: clean" in proc.stdout, report


# sanitizer: (broken kernel of tests/cuda_emu/selftest.cpp, what the sanitizer must print)
SELFTESTS = {
    "address": ("overread", "AddressSanitizer: heap-buffer-overflow"),
    "thread": ("race", "ThreadSanitizer: data race"),
}


@pytest.mark.heavy
@pytest.mark.emulator
@pytest.mark.parametrize("sanitizer", BY_SANITIZER)
def test_cuda_emu_sanitizer_reports_a_broken_kernel(sanitizer):
    """The other half of the check above: a kernel that reads past its buffer (address) or hands a shared-memory
    word to another thread without a barrier (thread) is reported, so a clean run is evidence."""
    kernel, report = SELFTESTS[sanitizer]
    proc = run_under_sanitizer(sanitizer, "selftest.py", sanitizer, kernel)
    assert report in proc.stderr, proc.stderr[-4000:] + proc.stdout[-1000:]
    assert proc.returncode != 0


@pytest.mark.emulator
def test_cuda_emu_reports_a_divergent_barrier():
    """A barrier that not every live thread reaches fails the launch with a message instead of hanging; a
    barrier-separated hand-off through shared memory works before and after (the thread pool survives)."""
    import cuda_emulator

    module = cuda_emulator.load()
    assert module.selftest("synced") == 1.0
    module.set_barrier_timeout_ms(300)
    try:
        with pytest.raises(RuntimeError, match="never completed"):
            module.selftest("divergent_barrier")
    finally:
        module.set_barrier_timeout_ms(120_000)
    assert module.selftest("synced") == 1.0
