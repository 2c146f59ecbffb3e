"""The GPU time model (bench/gpu_model.py): its SASS readings, its arithmetic, the files it generates and the
ranking ``backend="auto"`` reads on CUDA (marginops/path_ranking.py), without a GPU."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from bench import gpu_model, gpu_static  # noqa: E402


def _sass(lines: list[tuple[int, str]]) -> str:
    return "\n".join(f"        /*{addr:04x}*/                   {text} ;" for addr, text in lines)


def test_hot_loop_is_the_innermost_loop_with_tensor_core_instructions():
    sass = _sass(
        [
            (0x00, "MOV R1, c[0x0][0x28]"),
            (0x10, "IMAD R2, R3, R4, RZ"),  # outer loop starts here
            (0x20, "LDGSTS.E.BYPASS.128 [R5], desc[UR4][R6.64]"),  # inner loop: 0x20 .. 0x60
            (0x30, "LDG.E.U16 R7, desc[UR4][R8.64]"),
            (0x40, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24"),
            (0x50, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12], R24, gsb0"),
            (0x60, "@P0 BRA 0x20"),
            (0x70, "MUFU.EX2 R9, R10"),  # epilogue
            (0x80, "FADD R11, R9, R11"),
            (0x90, "@!P1 BRA 0x10"),
            (0xA0, "EXIT"),
            (0xB0, "BRA 0xb0"),  # the trailing self-loop is not a loop body with work
        ]
    )
    loop = gpu_static.hot_loop(sass)
    assert loop.instructions == 5 and loop.mma == 2
    assert loop.mma_flops == 2 * (2 * 64 * 128 * 16 // 4)  # a warpgroup's instruction, per warp
    assert loop.load_bytes == 32 * 16 + 32 * 2
    assert loop.outer_instructions == 9  # 0x10 .. 0x90
    counts = gpu_static.count_sass(sass)
    assert (counts.hgmma_count, counts.hmma_count, counts.loop_sass) == (2, 0, 5)


def test_hot_loop_without_tensor_cores_is_the_largest_innermost_loop():
    sass = _sass(
        [
            (0x00, "LDG.E R1, desc[UR4][R2.64]"),
            (0x10, "@P0 BRA 0x0"),
            (0x20, "LDG.E.128 R4, desc[UR4][R2.64]"),
            (0x30, "FFMA R5, R4, R4, R5"),
            (0x40, "FFMA R6, R4, R4, R6"),
            (0x50, "@P1 BRA 0x20"),
        ]
    )
    loop = gpu_static.hot_loop(sass)
    assert (loop.instructions, loop.mma, loop.load_bytes, loop.outer_instructions) == (4, 0, 32 * 16, 0)
    assert gpu_static.hot_loop(_sass([(0x0, "EXIT")])) is None


def test_tensor_core_flops_per_warp_instruction():
    assert gpu_static.mma_flops_per_warp("HGMMA.64x256x16.F32.BF16") == 2 * 64 * 256 * 16 // 4
    assert gpu_static.mma_flops_per_warp("HMMA.16816.F32.BF16") == 2 * 16 * 8 * 16
    assert gpu_static.mma_flops_per_warp("HMMA.1688.F32.TF32") == 2 * 16 * 8 * 8
    assert gpu_static.mma_flops_per_warp("FFMA") == 0


def test_kernel_time_is_its_binding_term_over_its_wave_efficiency():
    gpu = gpu_model.GPUS["H100 SXM"]
    k = gpu_model.Kernel("k", "fwd", 2, flops=1e12, hbm_bytes=1e9, issue_serial=1e8, wave_efficiency=0.5)
    t = k.terms(gpu)
    assert t["tensor"] == pytest.approx(1e12 / (gpu.tensor_flops * gpu_model.TENSOR_EFFICIENCY))
    assert t["hbm"] == pytest.approx(1e9 / gpu.hbm_bytes_s)
    assert k.seconds(gpu) == pytest.approx((t["tensor"] + t["serial"]) / 0.5 + 2 * gpu_model.LAUNCH_GAP_S)
    assert k.bound(gpu) == "tensor"
    # an mma.sync product costs more than the same FLOPs on wgmma
    slow = gpu_model.Kernel("k", "fwd", 1, hmma_flops=1e12)
    assert slow.terms(gpu)["tensor"] == pytest.approx(t["tensor"] / gpu_model.HMMA_SHARE)


@pytest.fixture(scope="module")
def paths():
    return gpu_model.headline_paths()


def test_three_products_are_three_cublas_gemms(paths):
    matmul = paths["matmul"]
    B, C, D = gpu_model.HEADLINE
    assert sum(k.flops for k in matmul.kernels) == pytest.approx(3 * 2 * B * C * D)
    for gpu in gpu_model.GPUS.values():
        # tensor-bound: each product's bytes take less time than its FLOPs
        assert all(k.bound(gpu) == "tensor" for k in matmul.kernels)


def test_every_path_counts_its_products(paths):
    """FLOPs per forward + backward in GEMM-equivalents: what each path's design says it computes (triton: the
    forward, dW's cosines and product, dX's cosines and its bf16 hi + lo product)."""
    B, C, D = gpu_model.HEADLINE
    gemm = 2 * B * C * D
    flops = {name: sum(k.flops + k.hmma_flops for k in p.kernels) / gemm for name, p in paths.items()}
    assert flops == pytest.approx(
        {"matmul": 3, "triton": 6, "hybrid": 4, "cuda": 4, "cuda_fused": 5, "insightface": 3, "three_product": 3}
    )


def test_float16_gradient_blocks_double_their_products():
    """float16 inputs: the chunked and hybrid paths form dX and dW from hi + lo gradient blocks, 6 GEMM-equivalents
    (docs/CHUNKED.md); the fused Triton kernels' count comes from their compiled code."""
    B, C, D = gpu_model.HEADLINE
    rows = gpu_model.load_rows(gpu_model.DEFAULT_CSV)
    paths16 = gpu_model.model_paths(rows, B, C, D, "float16")
    flops = {name: sum(k.flops + k.hmma_flops for k in paths16[name].kernels) / (2 * B * C * D) for name in paths16}
    assert flops["hybrid"] == pytest.approx(6) and flops["cuda"] == pytest.approx(6)
    assert flops["matmul"] == pytest.approx(3)


def test_generated_files_are_what_the_model_produces(paths):
    """RESOURCES.md's model section, docs/CHUNKED.md's estimate and the committed ranking come from
    ``python -m bench.gpu_model --write`` on the committed report (rerun it after changing a kernel or the model)."""
    resources = gpu_model.RESOURCES.read_text()
    assert gpu_model.replace_block(resources, gpu_model.resources_block(paths)) == resources
    doc = gpu_model.CHUNKED_DOC.read_text()
    assert gpu_model.replace_block(doc, gpu_model.chunked_doc_block(paths)) == doc
    assert json.loads(gpu_model.RANKING.read_text()) == gpu_model.ranking(paths)


def test_replace_block_keeps_the_rest_of_the_file():
    text = "head\n" + gpu_model.BEGIN + "\nold\n" + gpu_model.END + "\ntail\n"
    assert gpu_model.replace_block(text, "new\n") == "head\n" + gpu_model.BEGIN + "\nnew\n" + gpu_model.END + "\ntail\n"
    assert gpu_model.replace_block("head\n", "new\n").endswith(gpu_model.BEGIN + "\nnew\n" + gpu_model.END + "\n")


def test_measured_table_overrides_the_model(paths, tmp_path, monkeypatch):
    measured = tmp_path / "measured_paths.json"
    measured.write_text(json.dumps({"NVIDIA H100 80GB HBM3": {"triton": 9.0, "cuda": 7.5}}))
    monkeypatch.setattr(gpu_model, "MEASURED_PATHS", measured)
    ranked = gpu_model.ranking(paths)
    assert ranked["gpus"]["NVIDIA H100 80GB HBM3"] == {"source": "measured", "order": ["cuda", "triton", "hybrid"]}
    assert ranked["gpus"]["H100 SXM"]["source"] == ranked["gpus"]["H200"]["source"] == "model"
    # the device named in the measured table gets its order, other H100s the model's
    from marginops import path_ranking

    assert path_ranking._model_key("NVIDIA H100 80GB HBM3", ranked["gpus"]) == "NVIDIA H100 80GB HBM3"
    assert path_ranking._model_key("NVIDIA H100 PCIe", ranked["gpus"]) == "H100 SXM"
    assert path_ranking._model_key("NVIDIA H200", ranked["gpus"]) == "H200"
    assert path_ranking._model_key("NVIDIA A100-SXM4-80GB", ranked["gpus"]) is None


def test_auto_on_cuda_takes_the_first_ranked_path_that_runs(monkeypatch):
    from marginops import ops, path_ranking

    order = path_ranking.cuda_order("NVIDIA H100 80GB HBM3")
    ranking = json.loads(path_ranking.RANKING_FILE.read_text())
    assert order == tuple(ranking["gpus"]["H100 SXM"]["order"])
    assert path_ranking.cuda_order("NVIDIA H200") == tuple(ranking["gpus"]["H200"]["order"])
    assert path_ranking.cuda_order("NVIDIA A100-SXM4-80GB") == tuple(ranking["default"])

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H100 80GB HBM3")
    unavailable = {}
    monkeypatch.setattr(ops, "_cuda_path_unavailable", lambda path, device: unavailable.get(path))
    ops._warn_once.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.resolve_backend("auto", torch.device("cuda", 0)) == order[0]
    unavailable[order[0]] = "not here"
    assert ops.resolve_backend("auto", torch.device("cuda", 0)) == order[1]
    unavailable.update({p: "not here" for p in order})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ops.resolve_backend("auto", torch.device("cuda", 0)) == "reference"
    said = [str(w.message) for w in caught]
    assert any("no CUDA path can run" in m for m in said), said
    assert any("CUDA kernels unavailable (not here)" in m for m in said), said  # a failed build is worth a word
    assert ops.resolve_backend("cuda_fused", torch.device("cuda", 0)) == "cuda_fused"  # an explicit choice stays


def test_command_prints_every_path_and_the_constants(capsys):
    assert gpu_model.main(["--summary"]) == 0
    out = capsys.readouterr().out
    for name in ("matmul", "triton", "hybrid", "cuda", "cuda_fused", "insightface", "three_product"):
        assert f"| {name} |" in out
    assert "Three-product mode" in out and "H200" in out
