"""The static GPU report (bench/gpu_static.py) and the invariants it enforces, without a GPU: the Triton kernels
compiled ahead of time for sm_90a as the launchers would launch them (default autotune candidate of each
kernel), the CUDA kernels read from the built extension."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from bench import gpu_static  # noqa: E402

# one test process: the report (a minute or more of ahead-of-time compiles) is a module fixture, made per process
pytestmark = pytest.mark.xdist_group("gpu_static")

# kernels whose work grows with the number of classes: the ones whose waves and spills matter
STREAMING_TRITON = {"_lse_fwd_kernel", "_bwd_dw_kernel", "_bwd_dx_kernel"}
MIN_WAVE_EFFICIENCY = 0.9


def test_count_sass_tells_the_instruction_kinds_apart():
    sass = """
        /*0a10*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0a20*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0a30*/              @!P0 LDSM.16.M88.4 R4, [R2] ;
        /*0a40*/                   LD.E R7, desc[UR4][R8.64] ;
        /*0a50*/                   LDG.E.128 R12, desc[UR4][R10.64] ;
        /*0a60*/                   LDS.128 R16, [R3] ;
        /*0a70*/                   STL [R1+0x8], R5 ;
        /*0a80*/                   LDL R5, [R1+0x8] ;
    """
    counts = gpu_static.count_sass(sass)
    assert (counts.mma_kind, counts.mma_count) == ("HGMMA", 2)
    assert counts.ldmatrix_count == 1
    assert counts.generic_load_count == 1  # LD.E only: LDG and LDS are not generic
    assert counts.spill_instructions == 2 and counts.loop_spill_instructions == 0  # no loop in this function
    assert gpu_static.count_sass("/*0010*/ HMMA.16816.F32.BF16 R4, R8, R12, R4 ;").mma_kind == "HMMA"
    assert gpu_static.count_sass("/*0010*/ FFMA R4, R8, R12, R4 ;").mma_kind == "none"


def test_spills_inside_a_loop_are_counted_apart():
    """A spill store before a loop and its reload after it run once per program; the reload inside the loop runs
    every iteration."""
    sass = """
        /*0000*/                   STL [R1], R18 ;
        /*0010*/                   FFMA R4, R8, R12, R4 ;
        /*0020*/                   LDL R5, [R1+0x4] ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   LDL.LU R18, [R1] ;
    """
    counts = gpu_static.count_sass(sass)
    assert (counts.spill_instructions, counts.loop_spill_instructions) == (3, 1)


def test_vector_loop_is_the_innermost_vector_loop_counted_per_logit():
    """The loop finder on a function with an outer loop, the 16-byte loop inside it and a scalar loop after:
    the 16-byte loop is the hot one, its instructions from head to backward branch (NOPs, which are padding, left
    out) are what one iteration issues, and they are divided by the logits one iteration handles."""
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   IMAD R2, R0, 0x4, RZ ;
        /*0030*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0040*/                   FMUL R8, R4, R5 ;
        /*0050*/                   MUFU.EX2 R9, R8 ;
        /*0060*/                   NOP ;
        /*0070*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*0080*/               @P1 BRA 0x30 ;
        /*0090*/                   IADD3 R0, R0, 0x100, RZ ;
        /*00a0*/              @!P2 BRA 0x20 ;
        /*00b0*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*00c0*/                   FADD R5, R4, R5 ;
        /*00d0*/               @P3 BRA 0xb0 ;
        /*00e0*/                   BRA 0xe0 ;
        /*00f0*/                   EXIT ;
    """
    loops = gpu_static.sass_loops(sass)
    assert [(hex(loop.head), hex(loop.branch)) for loop in loops] == [
        ("0x30", "0x80"),
        ("0x20", "0xa0"),
        ("0xb0", "0xd0"),
        ("0xe0", "0xe0"),  # the trap loop after EXIT: no vector load, never the hot one
    ]
    hot = gpu_static.vector_loop(sass)
    assert (hot.head, hot.branch) == (0x30, 0x80)
    assert hot.opcodes == ["LDG.E.128", "FMUL", "MUFU.EX2", "STG.E.128", "BRA"]
    assert gpu_static.sass_per_logit(sass, 4) == 5 / 4
    # the scalar loop when asked for by its own load; no loop with the marker: no count
    assert gpu_static.vector_loop(sass, r"^LDG\.E$").head == 0xB0
    assert gpu_static.sass_per_logit(sass.replace("LDG.E.128", "LDG.E.64"), 4) is None
    assert gpu_static.sass_per_logit("/*0000*/ EXIT ;", 4) is None


def test_epilogue_logits_per_iteration_from_the_kernel_name():
    def per_iteration(name: str):
        return gpu_static.epilogue_logits_per_iteration(f"void marginops::cuda::detail::{name}(Args)")

    assert per_iteration("chunk_forward_kernel<float, 4, 4>") == 16
    assert per_iteration("chunk_backward_kernel<float, __half, true, 4, 8>") == 32
    assert per_iteration("chunk_row_norms_kernel<float, float>") is None
    assert per_iteration("fused_lse_fwd_kernel<TrBf16, 64>") is None


def test_occupancy_and_wave_efficiency():
    # 255 registers x 256 threads fill the register file once: one CTA per SM
    assert gpu_static.ctas_per_sm("sm_90", 255, 256, 1024) == 1
    assert gpu_static.ctas_per_sm("sm_90", 32, 128, 0) == 16  # 2048 threads per SM
    assert gpu_static.ctas_per_sm("sm_90", 64, 128, 100_000) == 2  # shared memory bound
    assert gpu_static.wave_efficiency(264, 132) == 1.0
    assert gpu_static.wave_efficiency(144, 132) == pytest.approx(144 / 264)  # the almost empty second wave
    assert gpu_static.wave_efficiency(272, 264) == pytest.approx(272 / 528)


def _launch_module():
    from marginops import ops

    ops.triton_kernels()
    return sys.modules["marginops.triton_kernels.launch"]


def _waves_module():
    """triton_kernels/_waves.py on its own: importing the package would build the kernels, as interpreted
    functions under TRITON_INTERPRET=1, which the report's ahead-of-time compile cannot take."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_marginops_waves", ROOT / "triton_kernels" / "_waves.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_whole_wave_split_planner():
    waves_module = _waves_module()
    plan = waves_module.whole_wave_splits
    assert plan(8, 132, 4, 10**6) in (33, 66)  # 264 or 528 programs: whole waves of 132
    assert plan(16, 132, 2, 32) == 16  # 256 of 264 slots (the 256-wide-chunk plan gave 9 splits: 144)
    assert plan(16, 108, 2, 32) == 13  # 208 of 216
    assert plan(64, 132, 2, 8) == 8  # 512 of 528 slots; the memory limit caps the splits
    assert plan(1, 132, 4, 1) == 1 and plan(5, 132, 4, 0) == 1  # never fewer than one split
    efficiency = gpu_static.wave_efficiency
    for units in (1, 2, 3, 7, 8, 16, 32, 59, 64, 79, 128, 137, 197, 512, 1999):
        for slots in (108, 114, 132, 216, 228, 264, 432, 528):
            for waves in (2, 4):
                s = plan(units, slots, waves, 10**6)
                assert efficiency(units * s, slots) >= 0.92, (units, slots, waves, s)
                # no split count within the planner's range does better
                cap = max(-(-waves * slots // units), waves_module.MIN_SPLIT_CHOICES)
                assert s <= cap
                assert all(efficiency(units * t, slots) <= efficiency(units * s, slots) for t in range(1, cap + 1))


def test_cuda_split_planner_is_the_same_rule(tmp_path):
    """csrc/cuda/wave_plan.h (the fused CUDA kernels' grid planner) compiled with the host compiler: the same
    split counts as triton_kernels/_waves.py, so the checks above cover both; and the grids the CUDA op
    layer used to launch (16 x 17 = 272 CTAs forward, 144 dX, for 132 SMs) are now whole waves."""
    import shutil
    import subprocess

    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    cases = [
        (u, sl, w, lim)
        for u in (1, 2, 3, 7, 8, 16, 32, 59, 64, 128, 137, 512, 1999)
        for sl in (108, 114, 132, 216, 264, 528)
        for w in (1, 2, 4)
        for lim in (1, 5, 32, 65535)
    ]
    driver = tmp_path / "plan.cpp"
    driver.write_text(
        '#include <cstdio>\n#include "wave_plan.h"\nint main() {\n  long long u, s, w, l;\n'
        '  while (std::scanf("%lld %lld %lld %lld", &u, &s, &w, &l) == 4)\n'
        '    std::printf("%lld\\n", (long long)marginops::cuda::whole_wave_splits(u, s, w, l));\n}\n'
    )
    exe = tmp_path / "plan"
    subprocess.run(
        [compiler, "-std=c++17", "-O1", "-I", str(ROOT / "csrc" / "cuda"), str(driver), "-o", str(exe)], check=True
    )
    stdin = "".join(f"{u} {sl} {w} {lim}\n" for u, sl, w, lim in cases)
    got = [
        int(v)
        for v in subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout.split()
    ]
    plan = _waves_module().whole_wave_splits
    assert got == [plan(*case) for case in cases]
    # the CUDA forward at B = 1024 (64-row tiles) on 132 SMs x 2 CTAs, and dX (16 row tiles, 1 d-chunk) on 132 x 1
    efficiency = gpu_static.wave_efficiency
    assert efficiency(16 * plan(16, 264, 1, 65535), 264) >= MIN_WAVE_EFFICIENCY
    assert efficiency(16 * plan(16, 132, 1, 32), 132) >= MIN_WAVE_EFFICIENCY


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report of the default candidates, made once, in a fresh process: triton.jit decides at import time
    whether a kernel is interpreted, and this session may already have imported the kernels under
    TRITON_INTERPRET=1 (no GPU), which the ahead-of-time compiler cannot take."""
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("gpu_static")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "bench.gpu_static", "--out", str(out), "--default-configs", "--cuda-if-built"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return gpu_static.read_csv(out / "gpu_static.csv")


@pytest.fixture(scope="module")
def triton_rows(report):
    return [r for r in report if r["backend"] == "triton"]


@pytest.fixture(scope="module")
def hybrid_rows(report):
    return [r for r in report if r["backend"] == "hybrid"]


@pytest.fixture(scope="module")
def cuda_rows(report):
    rows = [r for r in report if r["backend"] == "cuda"]
    failed = [r["error"] for r in rows if r.get("error")]
    if not rows or failed:
        pytest.skip(f"the CUDA extension is not built here (python -m marginops.build --cuda): {failed}")
    return rows


def test_a_failed_part_is_a_row_and_keeps_what_was_read(tmp_path, monkeypatch, capsys):
    """A CUDA build that fails after minutes of Triton compiles costs the CUDA rows only: every Triton row is
    already in the CSV, the failure is a row naming its reason, and the markdown summary says it."""
    triton_row = dict(kernel="k", backend="triton", arch="sm_90a", dtype="bf16", config="c", default=True)
    triton_row.update({f: 1 for f in gpu_static._INT_FIELDS}, mma_kind="HGMMA")
    written = []

    def triton_then_check(all_configs=True):
        yield triton_row
        written.append(gpu_static.read_csv(tmp_path / "gpu_static.csv"))  # on disk before the next kernel

    def broken_build():
        raise RuntimeError("building marginops_C_cuda failed (nvcc 13.0; torch built for CUDA 13.2)")

    monkeypatch.setattr(gpu_static, "iter_triton_rows", triton_then_check)
    monkeypatch.setattr(gpu_static, "cuda_rows", broken_build)
    summary = tmp_path / "RESOURCES.md"
    monkeypatch.setattr(gpu_static, "_versions", lambda: "test")
    assert gpu_static.main(["--out", str(tmp_path), "--resources", str(summary)]) == 1
    assert [r["kernel"] for r in written[0]] == ["k"]
    rows = gpu_static.read_csv(tmp_path / "gpu_static.csv")
    assert [r["backend"] for r in rows] == ["triton", "cuda"]
    assert rows[1]["error"].startswith("RuntimeError: building marginops_C_cuda failed (nvcc 13.0")
    assert gpu_static.kernel_rows(rows) == rows[:1]
    assert "cuda part of this report is missing" in summary.read_text()
    assert "[1] triton k bf16 c" in capsys.readouterr().err
    # reported, not a failed exit, when the caller asked for the CUDA part only if it builds
    assert gpu_static.main(["--out", str(tmp_path), "--cuda-if-built"]) == 0


@pytest.mark.heavy  # the report compiles every Triton kernel ahead of time: minutes
def test_report_covers_every_kernel_and_dtype(triton_rows, cuda_rows, tmp_path):
    kinds = {(r["kernel"], r["dtype"]) for r in triton_rows}
    for label, _, _ in gpu_static.TRITON_DTYPES:
        for kernel in STREAMING_TRITON:
            assert (kernel, label) in kinds
    assert {r["kernel"] for r in cuda_rows} >= {
        "fused_lse_fwd_kernel",
        "fused_lse_bwd_w_kernel",
        "fused_lse_bwd_x_kernel",
    }
    path = tmp_path / "gpu_static.csv"
    gpu_static.write_csv(triton_rows + cuda_rows, path)
    header = path.read_text().splitlines()[0].split(",")
    assert header == gpu_static.FIELDS
    markdown = gpu_static.resources_markdown(triton_rows + cuda_rows, "test")
    loops = [r for r in cuda_rows if r.get("sass_per_logit") not in (None, "")]
    assert loops  # the chunked epilogues' section
    assert markdown.count("\n| ") == len(triton_rows) + len(cuda_rows) + 1 + len(loops) + 1


@pytest.mark.heavy  # the report compiles every Triton kernel ahead of time: minutes
def test_16bit_triton_kernels_use_wgmma_on_hopper(triton_rows):
    for r in triton_rows:
        if r["kernel"] in STREAMING_TRITON and r["dtype"] in ("bfloat16", "float16", "float32-tf32"):
            assert r["mma_kind"] == "HGMMA", r


def spills_nothing(row) -> bool:
    """No spill, in a loop or outside the loops."""
    return row["loop_spill_instructions"] == 0 and row["spill_bytes"] == 0


@pytest.mark.heavy  # the report compiles every Triton kernel ahead of time: minutes
def test_every_16bit_product_of_a_default_config_is_wgmma(triton_rows, hybrid_rows):
    """Issue 21 item 6: in every Triton kernel the launchers run by default (Triton and hybrid backends) with 16-bit
    or TF32 products, each tensor-core instruction is an HGMMA (wgmma): none falls back to HMMA (mma.sync, e.g. a
    product with fewer than 64 rows), and none spills (a spill in the K-loop costs more than wgmma gains)."""
    products = [r for r in triton_rows + hybrid_rows if r["dtype"] not in ("float32", "float64")]
    assert {r["kernel"] for r in products} >= STREAMING_TRITON | {"_hybrid_grad_block_kernel"}
    fallbacks = [(r["kernel"], r["dtype"], r["config"], r["hmma_count"]) for r in products if r["hmma_count"]]
    assert not fallbacks
    for r in products:
        if r["kernel"] in STREAMING_TRITON or r["kernel"] == "_hybrid_grad_block_kernel":
            assert r["hgmma_count"] > 0 and spills_nothing(r), r


@pytest.mark.heavy  # the report compiles every Triton kernel ahead of time: minutes
def test_shared_memory_within_the_arch_limit(triton_rows, cuda_rows):
    for r in triton_rows:
        assert r["smem_bytes"] <= gpu_static.SMEM_PER_CTA["sm_90"], r
        assert r["ctas_per_sm"] >= 1, r
    for r in cuda_rows:
        assert r["smem_bytes"] <= gpu_static.SMEM_PER_CTA[r["arch"]], r


@pytest.mark.heavy  # the report compiles every Triton kernel ahead of time: minutes
def test_cuda_kernels_do_not_spill(cuda_rows):
    spilling = [(r["kernel"], r["arch"], r["dtype"], r["spill_bytes"]) for r in cuda_rows if r["spill_bytes"]]
    assert not spilling


@pytest.mark.heavy  # the report compiles every Triton kernel ahead of time: minutes
def test_planned_occupancy_matches_the_compiled_kernels(triton_rows, monkeypatch):
    """The split planners size whole waves with configs._DEFAULT_CTAS_PER_SM: it must be what the compiled
    default candidates get (else update the table, not the test)."""
    import torch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the GPU tables, as in the report (read per call)

    from marginops import ops

    launch = _launch_module()
    configs = sys.modules["marginops.triton_kernels.configs"]
    names = {"_lse_fwd_kernel": "fwd", "_bwd_dx_kernel": "dx"}
    for r in triton_rows:
        if r["kernel"] not in names:
            continue
        dtype = getattr(torch, r["dtype"].split("-")[0])
        split = names[r["kernel"]] == "dx" and launch._split_grad_dots(dtype, ops.read_switches("triton"))
        planned = configs.default_plan(
            names[r["kernel"]],
            gpu_static.REPORT_D,
            dtype,
            split,
            r["dtype"].endswith("tf32"),
            mixed=r["dtype"].endswith("-w32"),  # x in the dtype, a float32 weight
        )
        assert planned[1] == r["ctas_per_sm"], (r["kernel"], r["dtype"], r["config"], planned, r["ctas_per_sm"])


@pytest.mark.heavy  # the report compiles every Triton kernel ahead of time: minutes
def test_triton_default_configs_do_not_spill(triton_rows):
    """Every Triton kernel the launchers run by default, the small merge / reduce kernels included: no spill."""
    spilling = [(r["kernel"], r["dtype"], r["config"], r["spill_bytes"]) for r in triton_rows if not spills_nothing(r)]
    assert not spilling


@pytest.mark.heavy  # the report compiles every Triton kernel ahead of time: minutes
def test_triton_grids_are_whole_waves(triton_rows):
    columns = ["wave_efficiency" + suffix for suffix in gpu_static.SHAPES]
    short = [
        (r["kernel"], r["dtype"], c, r[c])
        for r in triton_rows
        if r["kernel"] in STREAMING_TRITON
        for c in columns
        if r[c] < MIN_WAVE_EFFICIENCY
    ]
    assert not short


@pytest.mark.heavy  # the report compiles every Triton kernel ahead of time: minutes
def test_hybrid_kernels_compile_without_spills_and_with_wgmma(hybrid_rows):
    """The hybrid backward's kernels (triton_kernels/hybrid_bwd.py) as its launcher runs them at B = 1024 (one row
    tile): present for every dtype (grad_weight through the dW product for 16-bit inputs, through U and the row
    pass otherwise), spill-free, within shared memory, and the cosine and dW products on wgmma for 16-bit inputs
    (mixed precision included) and TF32."""
    kinds = {(r["kernel"], r["dtype"]) for r in hybrid_rows}
    for label, _, _ in gpu_static.TRITON_DTYPES:
        wide = label.startswith(("float32", "float64"))
        weight_kernel = "_hybrid_weight_rows_kernel" if wide else "_hybrid_dw_kernel"
        assert {("_hybrid_grad_block_kernel", label), (weight_kernel, label)} <= kinds
    for r in hybrid_rows:
        assert not r["spill_bytes"], r
        assert r["smem_bytes"] <= gpu_static.SMEM_PER_CTA["sm_90"] and r["ctas_per_sm"] >= 1, r
        if r["kernel"] in ("_hybrid_grad_block_kernel", "_hybrid_dw_kernel") and not r["dtype"].startswith(
            ("float32", "float64")
        ):
            assert r["mma_kind"] == "HGMMA", r
        if r["kernel"] == "_hybrid_grad_block_kernel" and r["dtype"] == "float32-tf32":
            assert r["mma_kind"] == "HGMMA", r


# The chunked path's epilogue kernels (csrc/cuda/chunk_epilogue.cuh), counted in the sm_90 SASS of the built extension:
# SASS instructions per logit in their 16-byte loop, fp32 accumulation (every input dtype but float64).
MAX_SASS_PER_LOGIT = {"chunk_forward_kernel": 25, "chunk_backward_kernel": 45}


@pytest.fixture(scope="module")
def cuda_report(tmp_path_factory):
    """The CUDA part of the report alone (python -m bench.gpu_static --cuda-only): builds the extension if needed."""
    out = tmp_path_factory.mktemp("gpu_static_cuda")
    run = subprocess.run(
        [sys.executable, "-m", "bench.gpu_static", "--out", str(out), "--cuda-only", "--cuda-if-built"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    rows = gpu_static.read_csv(out / "gpu_static.csv")
    failed = [r["error"] for r in rows if r.get("error")]
    if failed:
        pytest.skip(f"the CUDA extension does not build here (python -m marginops.build --cuda): {failed}")
    return rows


@pytest.mark.heavy  # builds the CUDA extension when it is not built: minutes
def test_chunked_epilogues_are_not_instruction_bound(cuda_report):
    epilogues = [r for r in cuda_report if r["kernel"] in MAX_SASS_PER_LOGIT]
    assert {(r["kernel"], r["arch"]) for r in epilogues} >= {(k, "sm_90") for k in MAX_SASS_PER_LOGIT}
    for r in epilogues:
        assert r["sass_per_logit"] != "", r  # every instance has its 16-byte loop
        assert not r["spill_bytes"] and not r["spill_instructions"], r
        if r["arch"] == "sm_90" and r["dtype"] == "float32":
            assert r["sass_per_logit"] <= MAX_SASS_PER_LOGIT[r["kernel"]], r
    # the three fp32 backward variants: G in float32, fp16, fp16 hi + lo
    assert len([r for r in epilogues if r["arch"] == "sm_90" and r["dtype"] == "float32"]) == 4
