"""Time model of the GPU paths, from their compiled code: ``python -m bench.gpu_model``.

    python -m bench.gpu_model [--csv bench/results/gpu_static.csv] [--size BxCxD] [--dtype bfloat16]
                              [--write]   # also rewrite the generated files listed in GENERATED

An estimate, not a measurement: per path (the chunked CUDA path, the fused Triton kernels, the hybrid path, the
fused CUDA kernels, the insightface-style autocast head, the three plain products of a linear head, and the
three-product mode of issue 21 item 5, which exists only here) and per kernel, the time of one forward +
backward on an H100 SXM and an H200, with each term of the model:

* tensor: the kernel's FLOPs at the tensor-core rate it compiles to: wgmma (HGMMA) and cuBLAS at
  ``TENSOR_EFFICIENCY`` of the dense peak, mma.sync (HMMA) at ``HMMA_SHARE`` of that;
* L2 / HBM: the bytes the kernel moves through L2 (operand tiles re-read by several programs) and to or from HBM,
  at the bandwidths of the table.  A tile a program reuses across its tiles and loads through L1 (the SASS's
  cached loads in the hot loop) costs L2 traffic once per program if it fits in the L1 its shared memory leaves;
* issue: warp instructions over the SMs' issue rate (4 per SM per clock).  A kernel's main loop (from its SASS:
  ``loop_sass`` instructions per ``loop_mma_flops`` FLOPs of one warp) overlaps its tensor-core work; a Triton
  kernel's epilogue (``outer_loop_sass`` - ``loop_sass`` instructions per tile and warp) runs after its tile's
  products and adds to them when one CTA fills an SM (two or more CTAs per SM overlap it);
* wave tails: the time divided by the planned grid's wave efficiency;
* launches: ``LAUNCH_GAP_S`` per kernel launch on the device, and the host's ``HOST_LAUNCH_S`` per launch: a
  step whose host time exceeds its device time is launch-bound and costs the host time.

A kernel costs max(tensor, L2, HBM, main-loop issue) + serial epilogue issue, over its wave efficiency, plus its
launches' gaps; kernels run one after another.  The per-kernel counts come from gpu_static.csv (the committed copy,
bench/results/gpu_static.csv, is written by ``python -m bench.gpu_static --out bench/results --default-configs
--resources csrc/cuda/RESOURCES.md``), the bytes and FLOPs from the problem size and the tiles the kernels were
compiled with.  Where the report lacks a figure the model says
which and uses the stated fallback.  ``bench/gpu_check.sh``'s profile stage (bench/profile.py) writes measured
kernel times beside these, so that the first GPU run calibrates the constants.

``--write`` regenerates: the model section of csrc/cuda/RESOURCES.md, the estimate in docs/CHUNKED.md, and
marginops/path_ranking.json (the ranking ``backend="auto"`` reads on CUDA, marginops/path_ranking.py), in which a
GPU's measured order replaces the model's once bench/results/measured_paths.json has it ({device name as
torch.cuda.get_device_name gives it: {path: ms per forward + backward at the headline size}});
tests/test_gpu_model.py checks that each file is what the model produces from the committed report.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CSV = ROOT / "bench" / "results" / "gpu_static.csv"
MEASURED_PATHS = ROOT / "bench" / "results" / "measured_paths.json"
RANKING = ROOT / "marginops" / "path_ranking.json"
RESOURCES = ROOT / "csrc" / "cuda" / "RESOURCES.md"
CHUNKED_DOC = ROOT / "docs" / "CHUNKED.md"
BEGIN, END = "<!-- gpu_model:begin -->", "<!-- gpu_model:end -->"
GENERATED = (RESOURCES, CHUNKED_DOC, RANKING)

HEADLINE = (1024, 1_000_000, 512)  # B, C, D: ArcFace, bf16, forward + backward


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    clock_hz: float  # the clock the dense tensor peak is quoted at
    tensor_flops: float  # dense bf16 / fp16 peak
    hbm_bytes_s: float
    l2_bytes_s: float
    issue_per_sm_clock: int = 4  # warp instructions: 4 schedulers per SM


GPUS = {
    "H100 SXM": Gpu("H100 SXM", 132, 1.83e9, 989.4e12, 3.35e12, 7.0e12),
    "H200": Gpu("H200", 132, 1.83e9, 989.4e12, 4.8e12, 7.0e12),
}
TENSOR_EFFICIENCY = 0.8  # sustained share of the dense peak of a long stream of large wgmma / cuBLAS products
HMMA_SHARE = 0.65  # mma.sync's share of wgmma's rate on Hopper
LAUNCH_GAP_S = 2e-6  # device idle between two kernels launched back to back on one stream
HOST_LAUNCH_S = 6e-6  # host time of one launch from eager PyTorch (Python, dispatcher, driver)
THREE_PRODUCT_GAIN = 0.15  # issue 21 item 5: the stored-E mode is built only if it is this much faster than hybrid
E_STORE_SASS_PER_LOGIT = 3  # the three-product forward's extra epilogue work per logit (estimate: FMUL, F2F, 1/8 STG)

# where each constant comes from, in words (printed with the table, and in RESOURCES.md)
SOURCES = [
    ("SMs", "132 on both", "NVIDIA's H100 and H200 SXM datasheets / Hopper whitepaper"),
    ("dense bf16 peak", "989.4 TFLOP/s on both", "NVIDIA's datasheets (1979 TFLOP/s with 2:4 sparsity, halved)"),
    (
        "clock",
        "1.83 GHz",
        "the peak / (132 SMs x 4096 dense bf16 FLOP per SM and clock, the Hopper whitepaper's tensor-core rate)",
    ),
    ("HBM bandwidth", "3.35 TB/s (H100 SXM), 4.8 TB/s (H200)", "NVIDIA's datasheets"),
    (
        "L2 bandwidth",
        "7 TB/s on both (estimate)",
        "public microbenchmarks of an H100 PCIe (about 5.5 TB/s, 114 SMs at <= 1.755 GHz) scaled to 132 SMs",
    ),
    ("issue rate", "4 warp instructions per SM and clock", "four warp schedulers per SM (Hopper whitepaper)"),
    (
        "L1",
        "256 KiB per SM less the shared-memory carveout",
        "CUDA C++ Programming Guide, compute capability 9.0 (carveouts 0-228 KiB)",
    ),
    (
        "tensor efficiency",
        f"{TENSOR_EFFICIENCY:.0%} of the peak (estimate)",
        "what large bf16 cuBLAS GEMMs sustain on an H100 SXM in public benchmarks (70-85 %)",
    ),
    (
        "mma.sync rate",
        f"{HMMA_SHARE:.0%} of wgmma's (estimate)",
        "Hopper tuning reports: warp-level mma.sync reaches about 2/3 of wgmma's throughput",
    ),
    ("launch gap", "2 us per kernel (estimate)", "device idle between back-to-back launches on one stream"),
    ("host launch", "6 us per launch (estimate)", "eager PyTorch's per-op host overhead (Python + dispatcher)"),
]


# -------------------------------------------------------------------------------------------------
# kernels and their terms


@dataclass
class Kernel:
    """One kernel of a path (``launches`` launches of it per forward + backward, all terms summed over them)."""

    name: str
    phase: str  # "fwd" or "bwd"
    launches: int
    flops: float = 0.0  # on wgmma / cuBLAS
    hmma_flops: float = 0.0  # on mma.sync
    l2_bytes: float = 0.0
    hbm_bytes: float = 0.0
    issue_main: float = 0.0  # warp instructions that overlap the products
    issue_serial: float = 0.0  # warp instructions after them (an epilogue that does not overlap)
    wave_efficiency: float = 1.0
    notes: list = field(default_factory=list)
    vendor: bool = False  # a cuBLAS product (bench/profile.py sums the vendor GEMMs it measures into one row)

    def terms(self, gpu: Gpu) -> dict:
        rate = gpu.tensor_flops * TENSOR_EFFICIENCY
        issue_rate = gpu.sms * gpu.issue_per_sm_clock * gpu.clock_hz
        return dict(
            tensor=self.flops / rate + self.hmma_flops / (rate * HMMA_SHARE),
            l2=self.l2_bytes / gpu.l2_bytes_s,
            hbm=self.hbm_bytes / gpu.hbm_bytes_s,
            issue=self.issue_main / issue_rate,
            serial=self.issue_serial / issue_rate,
            launch=self.launches * LAUNCH_GAP_S,
        )

    def seconds(self, gpu: Gpu) -> float:
        t = self.terms(gpu)
        body = max(t["tensor"], t["l2"], t["hbm"], t["issue"]) + t["serial"]
        return body / max(self.wave_efficiency, 1e-3) + t["launch"]

    def bound(self, gpu: Gpu) -> str:
        t = self.terms(gpu)
        kind = max(("tensor", "l2", "hbm", "issue"), key=lambda k: t[k])
        return kind + ("+epilogue" if t["serial"] > 0.2 * t[kind] else "")


@dataclass
class PathModel:
    name: str
    description: str
    kernels: list
    notes: list = field(default_factory=list)

    def phase_seconds(self, gpu: Gpu, phase: str) -> float:
        return sum(k.seconds(gpu) for k in self.kernels if k.phase == phase)

    def launches(self) -> int:
        return sum(k.launches for k in self.kernels)

    def seconds(self, gpu: Gpu) -> float:
        device = sum(k.seconds(gpu) for k in self.kernels)
        return max(device, self.launches() * HOST_LAUNCH_S)

    def launch_bound(self, gpu: Gpu) -> bool:
        return self.launches() * HOST_LAUNCH_S > sum(k.seconds(gpu) for k in self.kernels)


# -------------------------------------------------------------------------------------------------
# the report's rows


def load_rows(path: Path) -> list[dict]:
    """The kernel rows of a gpu_static.csv (its failure rows left out)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench import gpu_static

    return gpu_static.kernel_rows(gpu_static.read_csv(path))


def find_row(rows: list[dict], backend: str, kernel: str, dtype: str, arch: str = "sm_90") -> Optional[dict]:
    """The default row of ``kernel`` (a name or a name prefix for CUDA kernels) in the report."""
    for r in rows:
        if r["backend"] == backend and r["kernel"] == kernel and r["dtype"] == dtype and r.get("default"):
            if r["arch"].rstrip("a") == arch:
                return r
    return None


def tiles(row: dict) -> dict:
    return {k: int(v) for k, v in (p.split("=") for p in str(row.get("tiles") or "").split(";") if "=" in p)}


def _num(row: Optional[dict], key: str, default=0.0) -> float:
    if row is None:
        return default
    value = row.get(key, "")
    try:
        return float(value) if value not in ("", None) else default
    except ValueError:
        return default


def _warps(row: dict) -> int:
    return max(1, int(_num(row, "threads", 128)) // 32)


def streaming_kernel(
    row: Optional[dict],
    name: str,
    phase: str,
    launches: int,
    cos_flops: float,
    product_flops: float,
    tiles_run: float,
    l2_extra_per_tile: float,
    hbm_bytes: float,
    missing: list,
) -> Kernel:
    """A Triton kernel that streams cosine tiles (the forward, the backward's dX / dW kernels, the hybrid
    gradient block): its hot loop (the cosine K-loop) from the SASS, ``tiles_run`` tiles each running the loop
    D / BLOCK_K times and its epilogue once, ``product_flops`` of a second product per tile (wgmma unless the
    kernel holds mma.sync instructions), L2 traffic: the hot loop's loads plus ``l2_extra_per_tile``."""
    k = Kernel(name, phase, launches, hbm_bytes=hbm_bytes)
    if row is None:
        missing.append(f"{name}: not in the report; modelled as tensor-bound")
        k.flops = cos_flops + product_flops
        return k
    t = tiles(row)
    warps = _warps(row)
    iters = math.ceil(HEADLINE_D[0] / max(1, t.get("BLOCK_K", HEADLINE_D[0])))
    k.flops = cos_flops
    if product_flops:
        if _num(row, "hmma_count") > 0:
            k.hmma_flops = product_flops
            k.notes.append("second product on mma.sync")
        else:
            k.flops += product_flops
    loop_flops = _num(row, "loop_mma_flops")
    loop_sass = _num(row, "loop_sass")
    if loop_flops > 0:
        k.issue_main = cos_flops / loop_flops * loop_sass
    # a program's code around its hot loop, once per tile: the enclosing loop's body, or for a kernel that computes
    # one tile per program (no enclosing loop) the rest of the kernel
    around = _num(row, "outer_loop_sass") or _num(row, "sass_instructions")
    epilogue = max(0.0, around - loop_sass) * warps * tiles_run
    if _num(row, "ctas_per_sm", 1) >= 2:
        k.issue_main += epilogue
    else:
        k.issue_serial = epilogue
    # L2 traffic: the hot loop's loads every tile, except the tile a program reuses through L1 (its cached loads,
    # over the whole K-loop), read once per program while it fits in the L1 left beside the shared memory
    loaded = _num(row, "loop_load_bytes") * warps * iters
    kept = _num(row, "loop_cached_bytes") * warps * iters
    ctas = max(1, int(_num(row, "ctas_per_sm", 1)))
    # programs over all launches (the report's grid is one launch's at B = 1024; another B: one tile each, no reuse)
    programs = _num(row, "grid_B1024_sm132", tiles_run) * launches if B_IS_REPORTS[0] else tiles_run
    if kept and kept * ctas <= l1_bytes(ctas * (_num(row, "smem_bytes") + 1024)):
        k.l2_bytes = tiles_run * (loaded - kept + l2_extra_per_tile) + min(programs, tiles_run) * kept
        k.notes.append(f"{kept / 1024:.0f} KiB tile kept in L1")
    else:
        k.l2_bytes = tiles_run * (loaded + l2_extra_per_tile)
        if kept:
            k.notes.append(f"its {kept / 1024:.0f} KiB reused tile does not fit L1")
    k.wave_efficiency = _num(row, "wave_efficiency", 1.0) or 1.0
    return k


def product_kernel(
    row: Optional[dict],
    name: str,
    phase: str,
    launches: int,
    flops: float,
    tiles_run: float,
    k_iters: int,
    hbm_bytes: float,
    missing: list,
) -> Kernel:
    """A Triton kernel that computes one output tile of a matrix product per program (no enclosing loop): its hot
    loop (``k_iters`` steps of the K-loop) from the SASS, overlapping the products; the rest of the kernel (the
    epilogue) once per tile after them (one CTA per SM: nothing to overlap it with); L2 traffic: the hot loop's
    loads every step."""
    k = Kernel(name, phase, launches, hbm_bytes=hbm_bytes)
    if row is None:
        missing.append(f"{name}: not in the report; modelled as tensor-bound")
        k.flops = flops
        return k
    warps = _warps(row)
    if _num(row, "hmma_count") > 0 and not _num(row, "hgmma_count"):
        k.hmma_flops = flops
    else:
        k.flops = flops
    loop_sass = _num(row, "loop_sass")
    k.issue_main = loop_sass * warps * k_iters * tiles_run
    rest = max(0.0, _num(row, "sass_instructions") - loop_sass) * warps * tiles_run
    if _num(row, "ctas_per_sm", 1) >= 2:
        k.issue_main += rest
    else:
        k.issue_serial = rest
    k.l2_bytes = _num(row, "loop_load_bytes") * warps * k_iters * tiles_run
    k.wave_efficiency = _num(row, "wave_efficiency", 1.0) or 1.0
    return k


# shared-memory carveouts an sm_90 SM can be configured with (KiB; the rest of its 256 KiB is L1)
CARVEOUTS_KIB = (0, 8, 16, 32, 64, 100, 132, 164, 196, 228)


def l1_bytes(smem_per_sm: float) -> float:
    """L1 bytes left on an SM whose CTAs use ``smem_per_sm`` of shared memory (the smallest carveout that holds it)."""
    carve = next((c for c in CARVEOUTS_KIB if c * 1024 >= smem_per_sm), CARVEOUTS_KIB[-1])
    return (256 - carve) * 1024


HEADLINE_D = [HEADLINE[2]]  # the D of the problem being modelled (set by model_paths)
B_IS_REPORTS = [True]  # whether the modelled B is the report's (its grids are B = 1024's)


def _cublas(name: str, phase: str, launches: int, flops: float, hbm: float) -> Kernel:
    return Kernel(name, phase, launches, flops=flops, hbm_bytes=hbm, vendor=True)


def _bandwidth(name: str, phase: str, launches: int, hbm: float) -> Kernel:
    return Kernel(name, phase, launches, hbm_bytes=hbm)


def _epilogue_per_logit(row: Optional[dict], name: str, missing: list) -> float:
    """SASS instructions per logit of a chunked CUDA epilogue: the report's ``sass_per_logit`` when present, else
    its hot loop's body (one logit per thread and iteration)."""
    value = _num(row, "sass_per_logit")
    if value > 0:
        return value
    loop = _num(row, "loop_sass")
    if loop > 0:
        missing.append(f"{name}: no sass_per_logit column; its hot loop's {loop:.0f} instructions taken per logit")
        return loop
    missing.append(f"{name}: not in the report; 25 instructions per logit assumed")
    return 25.0


# -------------------------------------------------------------------------------------------------
# the paths


def model_paths(rows: list[dict], B: int, C: int, D: int, dtype: str = "bfloat16") -> dict:
    """Every path's kernels at (B, C, D) for 16-bit inputs of ``dtype`` (k = 1, no class_index)."""
    HEADLINE_D[0] = D
    B_IS_REPORTS[0] = B == HEADLINE[0]
    e = 2  # bytes per 16-bit element
    gemm = 2.0 * B * C * D
    logits = float(B) * C
    # float16 inputs: the chunked and hybrid paths' gradient block as hi + lo (two fp16 blocks side by side, the dX
    # operand stacked twice, x' rows repeated): their dX and dW products are twice as deep
    depth = 2 if dtype == "float16" else 1
    paths = {}

    # ---- the three plain products of a linear head (bench provider "matmul"): the ratio's denominator
    paths["matmul"] = PathModel(
        "matmul",
        "three plain products of a linear head (x W^T, G W, G^T x) on cuBLAS",
        [
            _cublas("x W^T", "fwd", 1, gemm, (B * D + C * D + B * C) * e),
            _cublas("G W", "bwd", 1, gemm, (B * C + C * D + B * D) * e),
            _cublas("G^T x", "bwd", 1, gemm, (B * C + B * D + C * D) * e),
        ],
    )

    # ---- the fused Triton kernels (backend "triton")
    missing: list = []
    fwd = find_row(rows, "triton", "_lse_fwd_kernel", dtype)
    ft = tiles(fwd) if fwd else {"BLOCK_M": 128, "BLOCK_N": 128}
    f_tiles = math.ceil(B / ft["BLOCK_M"]) * math.ceil(C / ft["BLOCK_N"])
    fwd_k = streaming_kernel(fwd, "_lse_fwd_kernel", "fwd", 1, gemm, 0, f_tiles, 0, C * D * e + B * D * e, missing)
    merge = _bandwidth("_lse_merge_kernel", "fwd", 1, 4 * B * 8 * 132)
    dw = find_row(rows, "triton", "_bwd_dw_kernel", dtype)
    dwt = tiles(dw) if dw else {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_DV": 512}
    dw_tiles = math.ceil(C / dwt["BLOCK_N"]) * math.ceil(D / dwt.get("BLOCK_DV", D)) * math.ceil(B / dwt["BLOCK_M"])
    # the products of a split gradient operand (hi + lo) are twice as deep: dW for fp16, dX for both 16-bit dtypes
    dw_k = streaming_kernel(
        dw, "_bwd_dw_kernel", "bwd", 1, gemm, depth * gemm, dw_tiles, dwt["BLOCK_M"] * dwt.get("BLOCK_DV", D) * e,
        2 * C * D * e, missing,
    )  # fmt: skip
    dx = find_row(rows, "triton", "_bwd_dx_kernel", dtype)
    dxt = tiles(dx) if dx else {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_DV": 512}
    dx_tiles = math.ceil(B / dxt["BLOCK_M"]) * math.ceil(D / dxt.get("BLOCK_DV", D)) * math.ceil(C / dxt["BLOCK_N"])
    splits = max(1, int(_num(dx, "grid_B1024_sm132", 256)) // max(1, math.ceil(B / dxt["BLOCK_M"])))
    dx_k = streaming_kernel(
        dx, "_bwd_dx_kernel", "bwd", 1, gemm, 2 * gemm, dx_tiles, dxt["BLOCK_N"] * dxt.get("BLOCK_DV", D) * e,
        C * D * e + splits * B * D * 4, missing,
    )  # fmt: skip
    reduce = _bandwidth("_bwd_reduce_kernel", "bwd", 1, splits * B * D * 4 + B * D * e)
    paths["triton"] = PathModel(
        "triton",
        "fused Triton kernels: online log-sum-exp forward; dW and dX kernels that each recompute the cosines",
        [fwd_k, merge, dw_k, dx_k, reduce],
        notes=missing,
    )

    # ---- the hybrid path (backend "hybrid"): the Triton forward; per class chunk a Triton gradient block and cuBLAS
    missing = []
    rc = min(max((64 << 20) // (B * e * depth), 8192), 32768)  # hybrid_launch.plan, bt = B
    chunks = math.ceil(C / rc)
    blk = find_row(rows, "hybrid", "_hybrid_grad_block_kernel", dtype)
    bt_ = tiles(blk) if blk else {"BLOCK_M": 128, "BLOCK_N": 64}
    b_tiles = math.ceil(B / bt_["BLOCK_M"]) * math.ceil(C / bt_["BLOCK_N"])
    dwr = find_row(rows, "hybrid", "_hybrid_dw_kernel", dtype)
    dw_t = tiles(dwr) if dwr else {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}
    hybrid_bwd = [
        streaming_kernel(
            blk,
            "_hybrid_grad_block_kernel",
            "bwd",
            chunks,
            gemm,
            0,
            b_tiles,
            0,
            C * D * e + depth * logits * e,
            missing,
        ),
        # grad_weight = G^T x' with the projection in the epilogue (one row tile), W_hat from the same W tiles
        product_kernel(
            dwr,
            "_hybrid_dw_kernel",
            "bwd",
            chunks,
            depth * gemm,
            math.ceil(C / dw_t["BLOCK_M"]) * math.ceil(D / (2 * dw_t["BLOCK_N"])),
            math.ceil(depth * B / dw_t["BLOCK_K"]),
            depth * logits * e + C * D * (e + e + depth * e),
            missing,
        ),
        _cublas(
            "dX += G W_hat (cuBLAS, fp32 in place)",
            "bwd",
            chunks,
            depth * gemm,
            depth * (logits * e + C * D * e) + chunks * B * D * 8,
        ),
        _bandwidth("per-row sums, x', dX cast (torch)", "bwd", 7, B * D * 16 + 4 * B * 4 * 64),
    ]
    paths["hybrid"] = PathModel(
        "hybrid",
        "the Triton forward; backward per class chunk: Triton gradient block (cosines recomputed, 1/n once, the "
        "radial shares), Triton dW product with the projection in its epilogue, dX on cuBLAS",
        [
            streaming_kernel(fwd, "_lse_fwd_kernel", "fwd", 1, gemm, 0, f_tiles, 0, C * D * e + B * D * e, []),
            merge,
        ]
        + hybrid_bwd,
        notes=missing,
    )

    # ---- the chunked CUDA path (backend "cuda"): cuBLAS products into an fp32 cosine block, epilogue kernels
    missing = []
    rcc = min(max((64 << 20) // (4 * B), 8192), 32768)  # chunk_loop.h: Rc = clamp(64 MiB / (4 bt), 8192, 32768)
    cchunks = math.ceil(C / rcc)
    ef = find_row(rows, "cuda", "chunk_forward_kernel", "float32")  # the epilogue's element type is fp32 S
    eb = find_row(rows, "cuda", "chunk_backward_kernel", "float32")
    per_logit_f = _epilogue_per_logit(ef, "chunk_forward_kernel", missing)
    per_logit_b = _epilogue_per_logit(eb, "chunk_backward_kernel", missing)
    waves_f = _num(ef, "wave_efficiency", 0) or 1.0
    waves_b = _num(eb, "wave_efficiency", 0) or 1.0
    if not _num(ef, "wave_efficiency", 0):
        missing.append("chunked epilogues: no wave efficiency in the report (one block per row); whole waves assumed")
    fwd_epi = Kernel("chunk_forward_kernel", "fwd", cchunks, hbm_bytes=logits * 4, wave_efficiency=waves_f)
    fwd_epi.issue_main = logits * per_logit_f / 32
    bwd_epi = Kernel(
        "chunk_backward_kernel", "bwd", cchunks, hbm_bytes=logits * (4 + 2 * depth), wave_efficiency=waves_b
    )
    bwd_epi.issue_main = logits * per_logit_b / 32
    paths["cuda"] = PathModel(
        "cuda",
        "chunked CUDA path: per class chunk cuBLAS products into an fp32 cosine block and one epilogue kernel",
        [
            # the forward's norms: 64 chunks per launch (fused_lse_chunked.cu, kNormsAhead)
            _bandwidth("chunk_row_norms_kernel", "fwd", math.ceil(cchunks / 64), C * D * e),
            _cublas("S = x W_c^T (cuBLAS, fp32 out)", "fwd", cchunks, gemm, C * D * e + logits * 4),
            fwd_epi,
            _bandwidth("chunk_row_norms_kernel (+ W_hat)", "bwd", cchunks, (1 + depth) * C * D * e),
            _cublas("S again (cuBLAS, fp32 out)", "bwd", cchunks, gemm, C * D * e + logits * 4),
            bwd_epi,
            _cublas(
                "dX += G W_hat (cuBLAS)",
                "bwd",
                cchunks,
                depth * gemm,
                depth * (logits * e + C * D * e) + cchunks * B * D * 8,
            ),
            _cublas("U = G^T x' (cuBLAS)", "bwd", cchunks, depth * gemm, depth * logits * e + C * D * 4),
            _bandwidth("chunk_weight_rows_kernel", "bwd", cchunks, C * D * (4 + e + e)),
        ],
        notes=missing,
    )

    # ---- the fused CUDA kernels (backend "cuda_fused"): WMMA (mma.sync) products, issue-bound main loops
    missing = []
    cf = []
    for name, phase, flops in (
        ("fused_lse_fwd_kernel", "fwd", gemm),
        ("fused_lse_bwd_w_kernel", "bwd", 2 * gemm),
        ("fused_lse_bwd_x_kernel", "bwd", 2 * gemm),
    ):
        r = find_row(rows, "cuda", name, dtype)
        k = Kernel(name, phase, 1, hmma_flops=flops, hbm_bytes=C * D * e)
        if r is not None and _num(r, "loop_mma_flops") > 0:
            k.issue_main = flops / _num(r, "loop_mma_flops") * _num(r, "loop_sass")
        else:
            missing.append(f"{name}: no hot loop in the report; issue not modelled")
        cf.append(k)
    missing.append("cuda_fused: operand staging outside the hot loop and L2 traffic not modelled (a lower bound)")
    paths["cuda_fused"] = PathModel("cuda_fused", "fused CUDA kernels on WMMA (mma.sync)", cf, notes=missing)

    # ---- the insightface-style head (bench provider "insightface"): fp16 cuBLAS cosines, float32 passes over B x C
    # (bytes read + written per logit of each element-wise op, forward then backward: cast to float32, clamp, scale,
    # one_hot (int64) and its bool, where, log_softmax (2 reads), nll; their backward in reverse, the cast back)
    passes_fwd = [6, 8, 8, 8, 9, 9, 12, 4]
    passes_bwd = [4, 12, 9, 8, 8, 6]
    passes = passes_fwd + passes_bwd
    paths["insightface"] = PathModel(
        "insightface",
        "insightface-style head: autocast fp16 cosines materialized (B, C), margin and cross-entropy in float32",
        [
            _bandwidth("normalize x, W (fp32 W)", "fwd", 4, C * D * (4 + 2) + B * D * 8),
            _cublas("cos = x W^T (cuBLAS fp16)", "fwd", 1, gemm, C * D * e + logits * e),
            _bandwidth("element-wise ops over B x C", "fwd", len(passes_fwd), logits * sum(passes_fwd)),
            _bandwidth("their backward over B x C", "bwd", len(passes_bwd), logits * sum(passes_bwd)),
            _cublas("dX, dW (cuBLAS fp16)", "bwd", 2, 2 * gemm, 2 * logits * e + C * D * (e + 4)),
            _bandwidth("normalize backward, fp32 dW", "bwd", 6, C * D * 16),
        ],
        notes=[f"{sum(passes)} bytes per logit of element-wise traffic (~{sum(passes) / 8:.0f} float32 passes)"],
    )

    # ---- issue 21 item 5, the three-product mode (modelled only): the forward also stores E = 16-bit
    # exp(z - offset) dphi per logit; the backward forms G from E (a bandwidth pass per chunk) instead of
    # recomputing the cosines, then the hybrid path's products and row kernels
    fwd_e = streaming_kernel(fwd, "_lse_fwd_kernel + E store", "fwd", 1, gemm, 0, f_tiles, 0, 0, [])
    fwd_e.hbm_bytes = C * D * e + B * D * e + logits * e
    fwd_e.issue_serial += logits * E_STORE_SASS_PER_LOGIT / 32  # scale, convert, store each logit's E
    paths["three_product"] = PathModel(
        "three_product",
        "issue 21 item 5 (not built): the forward stores 16-bit E per logit, the backward reads it instead of "
        "recomputing the cosines",
        [fwd_e, merge] + [_bandwidth("G from E (per chunk)", "bwd", chunks, logits * 2 * e)] + hybrid_bwd[1:],
        notes=[f"workspace: E, {logits * e / 2**30:.1f} GiB at this size (B x C x 2 bytes)"],
    )
    return paths


# -------------------------------------------------------------------------------------------------
# ranking and output

# the bench providers (bench/providers.py) whose kernels bench/profile.py puts beside the model's
PROFILED = ("cuda", "cuda_fused", "triton", "hybrid", "insightface", "matmul")

# the paths ``backend="auto"`` chooses among on CUDA: those with every capability of the chunked path (mixed
# precision: not cuda_fused); the others are references, or not built
AUTO_CANDIDATES = ("hybrid", "cuda", "triton")


def ranking(paths: dict) -> dict:
    """The committed ranking (marginops/path_ranking.json): per modelled GPU the auto candidates fastest first, the
    measured table's order where bench/results/measured_paths.json has one for that GPU."""
    measured = json.loads(MEASURED_PATHS.read_text()) if MEASURED_PATHS.exists() else {}
    gpus = {}
    for key, gpu in GPUS.items():
        order = sorted(AUTO_CANDIDATES, key=lambda p: paths[p].seconds(gpu))
        gpus[key] = {"source": "model", "order": order}
    for key, ms in measured.items():  # {gpu name: {path: ms per step}}
        order = sorted((p for p in AUTO_CANDIDATES if p in ms), key=lambda p: ms[p])
        gpus[key] = {"source": "measured", "order": order + [p for p in AUTO_CANDIDATES if p not in order]}
    return {
        "generated_by": "python -m bench.gpu_model --write",
        "size": "B=1024 C=1000000 D=512 bfloat16 forward+backward",
        "gpus": gpus,
        "default": gpus["H100 SXM"]["order"],
    }


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def kernel_table(path: PathModel, gpu: Gpu) -> list[str]:
    lines = [
        "| phase | kernel | launches | tensor ms | L2 GB | HBM GB | issue ms (+ serial) | wave eff. | ms | bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in path.kernels:
        t = k.terms(gpu)
        serial = f" + {ms(t['serial'])}" if t["serial"] else ""
        lines.append(
            f"| {k.phase} | {k.name} | {k.launches} | {ms(t['tensor'])} | {k.l2_bytes / 1e9:.1f} | "
            f"{k.hbm_bytes / 1e9:.1f} | {ms(t['issue'])}{serial} | {k.wave_efficiency:.3g} | {ms(k.seconds(gpu))} | "
            f"{k.bound(gpu)} |"
        )
    return lines


def summary_table(paths: dict) -> list[str]:
    base = {g: paths["matmul"].seconds(gpu) for g, gpu in GPUS.items()}
    head = "| path | " + " | ".join(f"{g} fwd / bwd / total ms | x products" for g in GPUS) + " | launches |"
    lines = [head, "|---|" + "---|---|" * len(GPUS) + "---|"]
    for name, p in paths.items():
        cells = []
        for g, gpu in GPUS.items():
            total = p.seconds(gpu)
            flag = " (launch-bound)" if p.launch_bound(gpu) else ""
            cells.append(
                f"{ms(p.phase_seconds(gpu, 'fwd'))} / {ms(p.phase_seconds(gpu, 'bwd'))} / {ms(total)}{flag} | "
                f"{total / base[g]:.2f}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {p.launches()} |")
    return lines


def report(paths: dict, size: tuple, dtype: str, kernels: bool = True) -> str:
    B, C, D = size
    out = [
        f"Modelled time of one forward + backward, ArcFace, B = {B}, C = {C:,}, D = {D}, {dtype} "
        "(an estimate: `python -m bench.gpu_model`, its model in bench/gpu_model.py; x products: the path's time "
        "over the three plain products' by the same model).",
        "",
        *summary_table(paths),
        "",
    ]
    ref = paths["insightface"]
    for g, gpu in GPUS.items():
        best = min(AUTO_CANDIDATES, key=lambda p: paths[p].seconds(gpu))
        top = sorted(paths[best].kernels, key=lambda k: -k.seconds(gpu))[:3]
        out.append(
            f"{g}: fastest auto candidate `{best}`, {paths[best].seconds(gpu) / paths['matmul'].seconds(gpu):.2f} x "
            f"the three products, {ref.seconds(gpu) / paths[best].seconds(gpu):.1f} x faster than the "
            "insightface-style head; its largest kernels: "
            + ", ".join(f"{k.name} {ms(k.seconds(gpu))} ms ({k.bound(gpu)})" for k in top)
            + "."
        )
    h = paths["hybrid"].seconds(GPUS["H100 SXM"])
    t3 = paths["three_product"].seconds(GPUS["H100 SXM"])
    out += [
        "",
        f"Three-product mode (issue 21 item 5, stored 16-bit E): {ms(t3)} ms against the hybrid path's {ms(h)} ms on "
        f"the H100 SXM, {(h - t3) / h:+.0%}: "
        + ("at or above" if (h - t3) / h >= THREE_PRODUCT_GAIN else "below")
        + f" the {THREE_PRODUCT_GAIN:.0%} it must gain over the hybrid path to be built.",
    ]
    if kernels:
        for name, p in paths.items():
            out += ["", f"### {name}: {p.description}", ""]
            for g, gpu in GPUS.items():
                out += [f"{g}:", "", *kernel_table(p, gpu), ""]
            notes = p.notes + [f"{k.name}: {n}" for k in p.kernels for n in dict.fromkeys(k.notes)]
            if notes:
                out += ["Notes: " + "; ".join(dict.fromkeys(notes)) + "."]
    out += ["", "Constants:", "", "| constant | value | source |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in SOURCES]
    return "\n".join(out) + "\n"


def replace_block(text: str, block: str) -> str:
    """``text`` with the part between the gpu_model markers replaced (appended with its markers if absent)."""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + BEGIN + "\n" + block + END + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n" + BEGIN + "\n" + block + END + "\n"


def chunked_doc_block(paths: dict) -> str:
    """The estimate docs/CHUNKED.md shows: the summary (no per-kernel tables; those are in RESOURCES.md)."""
    return report(paths, HEADLINE, "bfloat16", kernels=False)


def resources_block(paths: dict) -> str:
    return "## Time model (generated by `python -m bench.gpu_model --write`)\n\n" + report(paths, HEADLINE, "bfloat16")


def write_generated(paths: dict) -> None:
    RESOURCES.write_text(replace_block(RESOURCES.read_text(), resources_block(paths)))
    CHUNKED_DOC.write_text(replace_block(CHUNKED_DOC.read_text(), chunked_doc_block(paths)))
    RANKING.write_text(json.dumps(ranking(paths), indent=2) + "\n")


def headline_paths(csv: Path = DEFAULT_CSV) -> dict:
    return model_paths(load_rows(csv), *HEADLINE)


def parse_size(text: str) -> tuple:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 3 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"size is BxCxD with positive integers, got {text!r}")
    return parts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="gpu_static.csv (python -m bench.gpu_static)")
    p.add_argument("--size", type=parse_size, default=HEADLINE, help="BxCxD (default: the headline size)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--summary", action="store_true", help="the per-path summary only")
    p.add_argument("--write", action="store_true", help="rewrite RESOURCES.md's section, CHUNKED.md's, the ranking")
    args = p.parse_args(argv)
    if not args.csv.exists():
        p.error(f"{args.csv} does not exist: python -m bench.gpu_static --out DIR --default-configs writes it")
    paths = model_paths(load_rows(args.csv), *args.size, dtype=args.dtype)
    print(report(paths, args.size, args.dtype, kernels=not args.summary), end="")
    if args.write:
        if args.size != HEADLINE or args.dtype != "bfloat16":
            p.error("--write is for the headline size (the generated files state it)")
        write_generated(paths)
        print("wrote " + ", ".join(str(g.relative_to(ROOT)) for g in GENERATED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
