"""Static GPU report: what the compiled kernels would do on a Hopper/Ampere GPU, read without one.

    python -m bench.gpu_static --out DIR [--triton-only | --cuda-only] [--all-configs]

Triton: the launchers (triton_kernels/launch.py; rows of backend "hybrid": the hybrid path's backward,
hybrid_launch.py) are run on fake CUDA tensors with the kernel launch intercepted, so the report sees exactly the
kernels, constexprs and grids a real call would use; each (kernel, dtype, autotune candidate) is then compiled
ahead of time for sm_90a (``triton.compile`` with ``GPUTarget("cuda", 90, 32)``, no device needed).  CUDA: the
built extension (``python -m marginops.build --cuda``; ``MARGINOPS_CUDA_ARCHS="8.0;9.0"`` for both archs) is read
with ``cuobjdump``.  For every kernel the SASS is counted: tensor-core instructions (HGMMA = wgmma, HMMA =
mma.sync/WMMA), LDSM (ldmatrix), generic loads (LD.E, which neither LDG nor LDS is), spill traffic (STL/LDL), and
the resource usage; for the class-chunked path's epilogue kernels also the instructions per logit of their 16-byte
loop (``sass_per_logit``).

DIR/gpu_static.csv has one row per kernel × arch × dtype × config (columns in ``FIELDS``); the wave
efficiency of a Triton kernel's planned grid is given at B = 1024 on 132 SMs (H100/H200 SXM) and, in further
columns, at B = 256 / 4096 and on 114 (H100 PCIe) and 108 (A100) SMs.  ``--resources FILE`` also writes the
markdown summary that csrc/cuda/RESOURCES.md is generated from.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent

FIELDS = [
    "kernel",
    "backend",
    "arch",
    "dtype",
    "config",
    "default",
    "registers",
    "spill_bytes",
    "spill_instructions",
    "loop_spill_instructions",
    "stack_bytes",
    "smem_bytes",
    "threads",
    "ctas_per_sm",
    "mma_kind",
    "mma_count",
    "ldmatrix_count",
    "generic_load_count",
    "grid_B1024_sm132",
    "wave_efficiency",
    "wave_efficiency_B256_sm132",
    "wave_efficiency_B4096_sm132",
    "wave_efficiency_B1024_sm114",
    "wave_efficiency_B1024_sm108",
    # SASS instructions issued per logit in a chunked epilogue kernel's 16-byte loop (sass_per_logit), else empty
    "sass_per_logit",
    # why a part of the report is missing (a row with no kernel), empty on every kernel's row
    "error",
]
# What the time model (bench/gpu_model.py) reads besides the columns above, all from the SASS except the tiles:
# every tensor-core instruction by kind (a kernel may mix wgmma and mma.sync), the whole kernel's instruction
# count, its hot loop (the innermost loop holding tensor-core instructions, else the largest innermost loop): its
# instructions, the FLOPs its tensor-core instructions do per warp and the bytes it loads from global memory per
# warp in one iteration (of those, the bytes loaded through L1: cp.async.ca, plain LDG), the instructions of the
# loop around it (one class or row tile of a streaming kernel: the hot loop's body once plus the epilogue), the
# tile constexprs the kernel was compiled with, and the planned grid's waves at B = 1024 on 132 SMs.
MODEL_FIELDS = [
    "hgmma_count",
    "hmma_count",
    "sass_instructions",
    "loop_sass",
    "loop_mma",
    "loop_mma_flops",
    "loop_load_bytes",
    "loop_cached_bytes",
    "outer_loop_sass",
    "tiles",
    "waves_B1024_sm132",
]
FIELDS += MODEL_FIELDS
SHAPES = {  # column suffix -> (B, SMs)
    "": (1024, 132),
    "_B256_sm132": (256, 132),
    "_B4096_sm132": (4096, 132),
    "_B1024_sm114": (1024, 114),
    "_B1024_sm108": (1024, 108),
}
# The report's problem: D = 512 (face recognition's usual embedding), C = 1M classes.
REPORT_D = 512
REPORT_C = 1_000_000
SMEM_PER_SM = {"sm_80": 167936, "sm_90": 233472}  # bytes usable by CTAs per SM (A100 164 KB, H100 228 KB)
SMEM_PER_CTA = {"sm_80": 166912, "sm_90": 232448}  # opt-in maximum per block (163 KB, 227 KB)
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
MAX_CTAS_PER_SM = 32


def tool(name: str) -> str:
    """cuobjdump / nvdisasm: the CUDA toolkit's, else the copy inside the triton package."""
    found = shutil.which(name)
    if found:
        return found
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and Path(base, "bin", name).exists():
            return str(Path(base, "bin", name))
    import triton

    candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if candidate.exists():
        return str(candidate)
    raise FileNotFoundError(f"{name} not found (CUDA toolkit or triton/backends/nvidia/bin)")


# -------------------------------------------------------------------------------------------------
# SASS counting


@dataclass
class SassCounts:
    mma_kind: str = "none"
    mma_count: int = 0
    ldmatrix_count: int = 0
    generic_load_count: int = 0
    spill_instructions: int = 0
    loop_spill_instructions: int = 0  # those inside a loop (a spill outside every loop runs once per program)
    hgmma_count: int = 0
    hmma_count: int = 0
    sass_instructions: int = 0
    loop_sass: int = 0
    loop_mma: int = 0
    loop_mma_flops: int = 0
    loop_load_bytes: int = 0
    loop_cached_bytes: int = 0
    outer_loop_sass: int = 0


_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
# address, opcode with its modifiers, operands
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")


def count_sass(sass: str) -> SassCounts:
    counts = SassCounts()
    for match in _INSTR.finditer(sass):
        op = match.group(1)
        counts.sass_instructions += 1
        if op == "HGMMA":
            counts.hgmma_count += 1
        elif op == "HMMA" or op == "DMMA":
            counts.hmma_count += 1
        elif op == "LDSM":
            counts.ldmatrix_count += 1
        elif op == "LD":  # generic-address load (LDG = global, LDS = shared, LDL = local are separate opcodes)
            counts.generic_load_count += 1
        elif op in ("STL", "LDL"):
            counts.spill_instructions += 1
    if counts.hgmma_count:
        counts.mma_kind, counts.mma_count = "HGMMA", counts.hgmma_count
    elif counts.hmma_count:
        counts.mma_kind, counts.mma_count = "HMMA", counts.hmma_count
    loops = sass_loops(sass)
    counts.loop_spill_instructions = sum(
        1
        for a, op, _ in sass_instructions(sass)
        if op.split(".")[0] in ("STL", "LDL") and any(loop.head <= a <= loop.branch for loop in loops)
    )
    loop = hot_loop(sass)
    if loop is not None:
        counts.loop_sass, counts.loop_mma, counts.loop_mma_flops = loop.instructions, loop.mma, loop.mma_flops
        counts.loop_load_bytes, counts.outer_loop_sass = loop.load_bytes, loop.outer_instructions
        counts.loop_cached_bytes = loop.cached_load_bytes
    return counts


def mma_flops_per_warp(opcode: str) -> int:
    """FLOPs one warp's tensor-core instruction does: HGMMA.MxNxK is a warpgroup's (4 warps') 2·M·N·K, HMMA.MNK
    (mma.sync) a warp's own, DMMA.884 one fp64 m8n8k4; 0 for anything else."""
    m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", opcode)
    if m:
        a, b, c = map(int, m.groups())
        return 2 * a * b * c // 4
    m = re.match(r"HMMA\.(\d+)(8)(\d+)", opcode)  # HMMA.16816 = m16n8k16, HMMA.1688 = m16n8k8
    if m:
        return 2 * int(m.group(1)) * 8 * int(m.group(3))
    if opcode.startswith("DMMA"):
        return 2 * 8 * 8 * 4
    return 0


def _load_bytes_per_warp(opcode: str) -> int:
    """Bytes one warp's global load (LDG, or cp.async's LDGSTS) reads with every lane active: the width suffix
    (.128 / .64 / .U16 / .U8, default 32 bits) times 32 lanes; 0 for other instructions."""
    if not opcode.startswith(("LDG.", "LDGSTS.")) and opcode not in ("LDG", "LDGSTS"):
        return 0
    parts = opcode.split(".")
    width = 4
    for part in parts[1:]:
        if part in ("128", "64"):
            width = int(part) // 8
        elif part in ("U16", "S16"):
            width = 2
        elif part in ("U8", "S8"):
            width = 1
    return 32 * width


@dataclass
class HotLoop:
    instructions: int  # in one iteration
    mma: int
    mma_flops: int  # per warp, one iteration
    load_bytes: int  # global loads per warp, one iteration (all lanes active)
    cached_load_bytes: int  # of those, the loads that allocate in L1 (cp.async.ca = LDGSTS without .BYPASS, LDG)
    outer_instructions: int  # the enclosing loop's body (the hot loop counted once); 0 without one


def hot_loop(sass: str) -> Optional[HotLoop]:
    """The kernel's hot loop, found from its backward branches (a BRA to a lower address closes a loop): the
    innermost loop holding tensor-core instructions (of those, the one with the most; else the smallest loop that
    holds any), else the largest loop that holds no other loop; None for straight-line code."""
    code = [(int(a, 16), op, rest) for a, op, rest in _LINE.findall(sass)]
    loops = []
    for addr, op, rest in code:
        target = re.match(r"\s*(?:\S+,\s*)?`?\(?(0x[0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    if not loops:
        return None

    def body(lo: int, hi: int) -> list:
        return [(op, rest) for a, op, rest in code if lo <= a <= hi]

    def innermost(loop) -> bool:
        return not any(other != loop and loop[0] <= other[0] and other[1] <= loop[1] for other in loops)

    def mma_of(loop) -> int:
        return sum(1 for op, _ in body(*loop) if op.startswith(("HGMMA", "HMMA", "DMMA")))

    inner = [loop for loop in loops if innermost(loop)]
    with_mma = [loop for loop in inner if mma_of(loop)]
    if not with_mma:  # tensor-core instructions in a loop around a small inner one (operand staging, say)
        holding = [lp for lp in loops if mma_of(lp)]
        with_mma = [min(holding, key=lambda lp: lp[1] - lp[0])] if holding else []
    if with_mma:
        hot = max(with_mma, key=lambda lp: (mma_of(lp), lp[1] - lp[0]))
    else:
        hot = max(inner, key=lambda lp: lp[1] - lp[0])
    ops = [op for op, _ in body(*hot)]
    enclosing = [lp for lp in loops if lp != hot and lp[0] <= hot[0] and hot[1] <= lp[1]]
    outer = min(enclosing, key=lambda lp: lp[1] - lp[0]) if enclosing else None
    return HotLoop(
        instructions=len(ops),
        mma=sum(1 for op in ops if op.startswith(("HGMMA", "HMMA", "DMMA"))),
        mma_flops=sum(mma_flops_per_warp(op) for op in ops),
        load_bytes=sum(_load_bytes_per_warp(op) for op in ops),
        cached_load_bytes=sum(_load_bytes_per_warp(op) for op in ops if ".BYPASS" not in op and ".EF" not in op),
        outer_instructions=len(body(*outer)) if outer else 0,
    )


# A SASS line of cuobjdump: /*address*/ [@predicate] OPCODE.MODIFIERS operands ;
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)([^;]*);")
# the 16-byte global loads that mark the chunked epilogues' vector loop (LDG.E.128, LDG.E.128.CONSTANT, ...)
VECTOR_LOAD = r"^LDG(\.\w+)*\.128\b"
# epilogue kernels whose loop bench.gpu_static counts per logit: their last two template arguments are the rows
# per block and the columns per loop step (csrc/cuda/chunk_epilogue.cuh)
EPILOGUE_KERNELS = ("chunk_forward_kernel", "chunk_backward_kernel")


@dataclass
class SassLoop:
    head: int  # address of the loop's first instruction (the target of its backward branch)
    branch: int  # address of the backward branch
    opcodes: list[str]  # every instruction from head to branch, in order

    @property
    def instructions(self) -> int:
        """Instructions issued per iteration: all of them from the head to the backward branch (exact for a
        straight-line body, an upper bound when the body branches)."""
        return len(self.opcodes)


def sass_instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode with modifiers, operands) of every instruction in cuobjdump -sass text."""
    return [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _SASS_LINE.finditer(sass)]


def sass_loops(sass: str) -> list[SassLoop]:
    """Every loop of a function: a branch to an address at or before its own closes the loop that starts there.
    NOPs (alignment padding) are left out of the bodies."""
    instrs = sass_instructions(sass)
    loops = []
    for addr, op, operands in instrs:
        targets = re.findall(r"0x([0-9a-f]+)", operands) if op.startswith("BRA") else []
        if targets and int(targets[-1], 16) <= addr:
            head = int(targets[-1], 16)
            loops.append(SassLoop(head, addr, [o for a, o, _ in instrs if head <= a <= addr and o != "NOP"]))
    return loops


def vector_loop(sass: str, marker: str = VECTOR_LOAD) -> Optional[SassLoop]:
    """The innermost loop (shortest from head to backward branch) with an instruction whose opcode matches
    ``marker``; None if no loop has one."""
    found = [loop for loop in sass_loops(sass) if any(re.match(marker, op) for op in loop.opcodes)]
    return min(found, key=lambda loop: loop.branch - loop.head) if found else None


def sass_per_logit(sass: str, logits_per_iteration: int, marker: str = VECTOR_LOAD) -> Optional[float]:
    """SASS instructions issued per logit in a kernel's hot loop (``vector_loop``): per iteration, divided by the
    logits one iteration handles."""
    loop = vector_loop(sass, marker)
    if loop is None or logits_per_iteration <= 0:
        return None
    return loop.instructions / logits_per_iteration


def epilogue_logits_per_iteration(demangled: str) -> Optional[int]:
    """Logits per hot-loop iteration of a chunked epilogue kernel, from its name: the product of its last two
    template arguments (rows per block x columns per step); None for other kernels."""
    name = demangled.split("(")[0]
    if re.sub(r"<.*", "", name).split("::")[-1] not in EPILOGUE_KERNELS:
        return None
    template = re.search(r"<(.*)>", name)
    args = [a.strip() for a in template.group(1).split(",")] if template else []
    if len(args) < 2 or not all(a.isdigit() for a in args[-2:]):
        return None
    return int(args[-2]) * int(args[-1])


def split_sass_functions(sass: str) -> dict[str, str]:
    """cuobjdump -sass output -> {mangled function name: its SASS}."""
    parts: dict[str, str] = {}
    current, lines = None, []
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            if current:
                parts[current] = "\n".join(lines)
            current, lines = m.group(1), []
        elif current:
            lines.append(line)
    if current:
        parts[current] = "\n".join(lines)
    return parts


def ctas_per_sm(arch: str, registers: int, threads: int, smem: int) -> int:
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * warps) if registers else MAX_CTAS_PER_SM
    by_threads = MAX_THREADS_PER_SM // max(threads, 1)
    by_smem = SMEM_PER_SM[arch] // (smem + 1024) if smem else MAX_CTAS_PER_SM  # 1 KB per CTA is reserved
    return max(0, min(by_regs, by_threads, by_smem, MAX_CTAS_PER_SM))


def wave_efficiency(ctas: int, slots: int) -> float:
    """Share of the launched waves' CTA slots that do work: 1.0 for whole waves."""
    if ctas <= 0 or slots <= 0:
        return 0.0
    waves = math.ceil(ctas / slots)
    return ctas / (waves * slots)


# -------------------------------------------------------------------------------------------------
# Triton: capture the launches, compile ahead of time for sm_90a


@dataclass
class Launch:
    name: str  # e.g. "fwd", "dw", "dx"
    kernel: object  # Autotuner or JITFunction
    grid: object
    args: tuple
    kwargs: dict
    grids: dict = field(default_factory=dict)  # shape suffix -> grid callable/tuple at that (B, SMs)


_TRITON_DTYPES = {
    "torch.bfloat16": "bf16",
    "torch.float16": "fp16",
    "torch.float32": "fp32",
    "torch.float64": "fp64",
    "torch.int64": "i64",
    "torch.int32": "i32",
    "torch.int8": "i8",
    "torch.uint8": "u8",
    "torch.bool": "i1",
}

# (label, input dtype, env overrides) of the Triton report rows
TRITON_DTYPES = [
    ("bfloat16", "bfloat16", {}),
    ("float16", "float16", {}),
    # mixed precision: 16-bit x with float32 W (staged in float32, rounded per tile: other shared memory needs)
    ("bfloat16-w32", "bfloat16", {"weight": "float32"}),
    ("float16-w32", "float16", {"weight": "float32"}),
    ("float32", "float32", {}),
    ("float32-tf32", "float32", {"tf32": True}),
    ("float64", "float64", {}),
]


def _capture_triton(
    dtype_name: str,
    tf32: bool,
    B: int,
    sms: int,
    deterministic: bool = True,
    weight_name: Optional[str] = None,
    hybrid: bool = False,
) -> list[Launch]:
    """Run both launchers on fake CUDA tensors (W in ``weight_name``, default x's dtype); return every kernel
    launch they would make.  ``hybrid``: the hybrid path's backward instead (its forward is the Triton one), the
    first launch of each kernel only (it launches the same kernels once per class chunk)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from marginops import ops
    from marginops.non_target import non_target_max_abs_dphi

    kernels = ops.triton_kernels()
    launch = sys.modules["marginops.triton_kernels.launch"]
    dtype = getattr(torch, dtype_name)
    weight_dtype = getattr(torch, weight_name or dtype_name)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    captured: list[Launch] = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def record(*args, **kwargs):
                fn = _jit_function(self.kernel)
                captured.append(Launch(fn.__name__, self.kernel, grid, args, kwargs))

            return record

    hybrid_launch = sys.modules["marginops.triton_kernels.hybrid_launch"]
    saved = (launch.wrap_triton, hybrid_launch.wrap_triton, launch._num_sms, getattr(kernels, "ALLOW_TF32", None))
    launch.wrap_triton = hybrid_launch.wrap_triton = Recorder
    launch._num_sms = lambda index: sms
    kernels.ALLOW_TF32 = tf32
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            dev = torch.device("cuda:0")
            D, C = REPORT_D, REPORT_C
            x = torch.empty((B, D), dtype=dtype, device=dev)
            w = torch.empty((C, D), dtype=weight_dtype, device=dev)
            labels = torch.empty((B,), dtype=torch.int64, device=dev)
            rows = [torch.empty((B,), dtype=acc, device=dev) for _ in range(3)]
            t = torch.zeros((), dtype=torch.float64)  # non_target_param (a CPU scalar tensor)
            args = (x, w, labels, *rows, None, t, 0, 2.0, 1)
            lse = torch.empty((B,), dtype=acc, device=dev)
            # what marginops.ops passes the launchers: the switches (ALLOW_TF32 as set above), the mode's max |dphi|
            switches, bound = ops.read_switches("triton"), non_target_max_abs_dphi(0, t.reshape(1))
            if hybrid:
                kernels.hybrid_backward(lse, lse, *args, deterministic, switches=switches, max_abs_dphi=bound)
            else:
                kernels.fused_lse_forward(*args, deterministic, switches=switches)
                kernels.fused_lse_backward(lse, lse, *args, deterministic, switches=switches, max_abs_dphi=bound)
    finally:
        launch.wrap_triton, hybrid_launch.wrap_triton, launch._num_sms, kernels.ALLOW_TF32 = saved
    if hybrid:
        firsts = {}
        for item in captured:
            firsts.setdefault(item.name, item)
        captured = list(firsts.values())
    return captured


def _jit_function(kernel):
    """The JITFunction behind an Autotuner (whose .fn is one), or the JITFunction itself (whose .fn is the
    Python function)."""
    from triton.runtime.autotuner import Autotuner

    return kernel.fn if isinstance(kernel, Autotuner) else kernel


def _signature(fn, args: tuple, constexprs: dict) -> dict:
    sig = {}
    names = list(fn.arg_names)
    for name, value in zip(names, args):
        if name in constexprs:
            sig[name] = "constexpr"
        elif hasattr(value, "dtype") and hasattr(value, "data_ptr"):
            sig[name] = "*" + _TRITON_DTYPES[str(value.dtype)]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    for name in names[len(args) :]:
        sig[name] = "constexpr"
    return sig


def _grid_size(grid, meta: dict) -> int:
    dims = grid(meta) if callable(grid) else grid
    return int(math.prod(int(d) for d in dims))


def _compile_triton(fn, args, constexprs, num_warps, num_stages, workdir: Path):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = _signature(fn, args, constexprs)
    # what the launcher's specialization would assume: 16-byte aligned pointers, sizes divisible by 16
    attrs = {}
    for i, (name, value) in enumerate(zip(fn.arg_names, args)):
        aligned = signature[name].startswith("*") or (
            signature[name] in ("i32", "i64") and not isinstance(value, bool) and value % 16 == 0
        )
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages)
    )
    cubin = workdir / f"{fn.__name__}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    return compiled, cubin


def _spill_bytes(usage: dict, counts: SassCounts) -> int:
    """Bytes of the per-thread stack frame / local memory that spill traffic uses: 0 when the code has no
    STL/LDL (a stack frame without them is an ABI frame, not spilling)."""
    if not counts.spill_instructions:
        return 0
    return max(usage["STACK"], usage["LOCAL"])


def _resource_usage(binary: Path) -> dict[tuple[str, str], dict]:
    """cuobjdump -res-usage -> {(arch, function): {REG, STACK, SHARED, LOCAL}}."""
    out = subprocess.run(
        [tool("cuobjdump"), "-res-usage", str(binary)], capture_output=True, text=True, check=True
    ).stdout
    usage, arch, fn = {}, "sm_90", None
    for line in out.splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and fn:
            usage[(arch.rstrip("a"), fn)] = dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups())))
    return usage


def _sass(binary: Path) -> dict[tuple[str, str], str]:
    out = subprocess.run([tool("cuobjdump"), "-sass", str(binary)], capture_output=True, text=True, check=True).stdout
    result = {}
    # cuobjdump prints one "arch = sm_XX" header per embedded cubin, followed by its functions
    for chunk in re.split(r"(?=arch = sm_\d+)", out):
        m = re.match(r"arch = (sm_\d+)", chunk)
        arch = m.group(1).rstrip("a") if m else "sm_90"
        for fn, text in split_sass_functions(chunk).items():
            result[(arch, fn)] = text
    return result


def triton_rows(all_configs: bool = True) -> list[dict]:
    return list(iter_triton_rows(all_configs))


def iter_triton_rows(all_configs: bool = True):
    """One row per Triton kernel × dtype × config, yielded as each is compiled (minutes in all)."""
    os.environ.pop("TRITON_INTERPRET", None)  # the GPU tables, not the interpreter's one small config
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for (label, dtype_name, opts), backend in ((d, b) for d in TRITON_DTYPES for b in ("triton", "hybrid")):
            tf32 = opts.get("tf32", False)
            weight = opts.get("weight")
            plans = {
                suffix: _capture_triton(dtype_name, tf32, B, sms, weight_name=weight, hybrid=backend == "hybrid")
                for suffix, (B, sms) in SHAPES.items()
            }
            base = plans[""]
            for index, launch in enumerate(base):
                configs = list(getattr(launch.kernel, "configs", None) or [None])
                if not all_configs:
                    configs = configs[:1]
                fn = _jit_function(launch.kernel)
                for position, cfg in enumerate(configs):
                    meta = dict(launch.kwargs)
                    # a plain kernel's launch options (Triton's defaults: 4 warps, 3 stages), an autotuner's config
                    num_warps, num_stages = meta.pop("num_warps", 4), meta.pop("num_stages", 3)
                    if cfg is not None:
                        meta.update(cfg.kwargs)
                        num_warps, num_stages = cfg.num_warps, cfg.num_stages
                    constexprs = {k: v for k, v in meta.items() if k in fn.arg_names}
                    compiled, cubin = _compile_triton(fn, launch.args, constexprs, num_warps, num_stages, workdir)
                    usage = next(iter(_resource_usage(cubin).values()))
                    counts = count_sass(next(iter(_sass(cubin).values())))
                    threads = 32 * num_warps
                    smem = int(compiled.metadata.shared)  # dynamic shared memory (cuobjdump sees static only)
                    occupancy = ctas_per_sm("sm_90", usage["REG"], threads, smem)
                    row = dict(
                        kernel=fn.__name__,
                        backend=backend,
                        arch="sm_90a",
                        dtype=label,
                        config=_config_name(cfg, num_warps, num_stages),
                        default=position == 0,
                        registers=usage["REG"],
                        spill_bytes=_spill_bytes(usage, counts),
                        stack_bytes=usage["STACK"],
                        spill_instructions=counts.spill_instructions,
                        loop_spill_instructions=counts.loop_spill_instructions,
                        smem_bytes=smem,
                        threads=threads,
                        ctas_per_sm=occupancy,
                        mma_kind=counts.mma_kind,
                        mma_count=counts.mma_count,
                        ldmatrix_count=counts.ldmatrix_count,
                        generic_load_count=counts.generic_load_count,
                        tiles=";".join(f"{k}={v}" for k, v in sorted(constexprs.items()) if k.startswith("BLOCK_")),
                        **_model_counts(counts),
                    )
                    for suffix, (B, sms) in SHAPES.items():
                        planned = plans[suffix][index]
                        ctas = _grid_size(planned.grid, meta)
                        if suffix == "":
                            row["grid_B1024_sm132"] = ctas
                            row["waves_B1024_sm132"] = round(ctas / max(1, sms * occupancy), 3)
                        row["wave_efficiency" + suffix] = round(wave_efficiency(ctas, sms * occupancy), 3)
                    yield row


def _model_counts(counts: SassCounts) -> dict:
    """The SASS counts of MODEL_FIELDS."""
    names = [f for f in MODEL_FIELDS if f not in ("tiles", "waves_B1024_sm132")]
    return {name: getattr(counts, name) for name in names}


def _config_name(cfg, num_warps: int, num_stages: int) -> str:
    tiles = "x".join(str(v) for k, v in sorted(cfg.kwargs.items())) if cfg is not None else "-"
    return f"{tiles}/w{num_warps}/s{num_stages}"


# -------------------------------------------------------------------------------------------------
# CUDA: the built extension


def cuda_library() -> Path:
    from marginops import _build

    where = Path(_build.load_cuda())
    found = sorted(where.glob("*.so")) if where.is_dir() else [where]
    if not found:
        raise FileNotFoundError(f"no CUDA extension library in {where}")
    return found[0]


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


_TRAITS_DTYPES = {
    "TrBf16": "bfloat16",
    "TrFp16": "float16",
    "TrTf32": "float32-tf32",
    "TrFp64": "float64",
    "TrFp32": "float32",
}
_CXX_DTYPES = {"__nv_bfloat16": "bfloat16", "__half": "float16", "double": "float64", "float": "float32"}


def _cuda_kernel_label(demangled: str) -> tuple[str, str, str]:
    """(kernel, dtype, config) from a demangled template instance name: the dtype from the traits type of
    the fused kernels, else from the first template argument (the input's element type)."""
    name = demangled.split("(")[0]
    base = re.sub(r"<.*", "", name).split("::")[-1]
    template = re.search(r"<(.*)>", name)
    config = re.sub(r"\s+", "", template.group(1)) if template else "-"
    dtype = next((d for tag, d in _TRAITS_DTYPES.items() if tag in config), None)
    if dtype is None:
        first = config.split(",")[0].split("::")[-1]
        dtype = _CXX_DTYPES.get(first, first)
    config = re.sub(r"marginops::cuda::detail::", "", config)[:80]
    return base, dtype, config


def cuda_rows(library: Optional[Path] = None, arch: Optional[str] = None) -> list[dict]:
    """One row per kernel of the built extension, or of ``library`` (a cubin, say, with its ``arch``, e.g. "sm_80":
    cuobjdump names the arch only inside fat binaries)."""
    lib = Path(library) if library is not None else cuda_library()
    usage = _resource_usage(lib)
    sass = _sass(lib)
    if arch is not None:
        usage = {(arch, fn): v for (_, fn), v in usage.items()}
        sass = {(arch, fn): v for (_, fn), v in sass.items()}
    names = sorted({fn for _, fn in usage})
    demangled = _demangle(names)
    rows = []
    for (arch, fn), res in sorted(usage.items()):
        kernel, dtype, config = _cuda_kernel_label(demangled[fn])
        counts = count_sass(sass.get((arch, fn), ""))
        logits = epilogue_logits_per_iteration(demangled[fn])
        per_logit = sass_per_logit(sass.get((arch, fn), ""), logits) if logits else None
        rows.append(
            dict(
                kernel=kernel,
                backend="cuda",
                arch=arch,
                dtype=dtype,
                config=config,
                default=True,
                registers=res["REG"],
                spill_bytes=_spill_bytes(res, counts),
                stack_bytes=res["STACK"],
                # static shared memory only: the kernels' dynamic shared memory is sized at launch
                spill_instructions=counts.spill_instructions,
                loop_spill_instructions=counts.loop_spill_instructions,
                smem_bytes=res["SHARED"],
                threads="",
                ctas_per_sm="",
                mma_kind=counts.mma_kind,
                mma_count=counts.mma_count,
                ldmatrix_count=counts.ldmatrix_count,
                generic_load_count=counts.generic_load_count,
                **_model_counts(counts),
                sass_per_logit=round(per_logit, 2) if per_logit is not None else "",
            )
        )
    return rows


# -------------------------------------------------------------------------------------------------


def write_csv(rows: list[dict], path: Path) -> None:
    with CsvSink(path) as sink:
        for row in rows:
            sink.write(row)


class CsvSink:
    """gpu_static.csv written a row at a time and flushed, so a report cut short keeps what it had."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self) -> "CsvSink":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("w", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=FIELDS)
        self._writer.writeheader()
        self._fh.flush()
        return self

    def write(self, row: dict) -> None:
        self._writer.writerow({k: row.get(k, "") for k in FIELDS})
        self._fh.flush()

    def __exit__(self, *exc) -> None:
        self._fh.close()


def failure_row(backend: str, reason: str) -> dict:
    """The row that stands for a part of the report that could not be made."""
    return dict(backend=backend, kernel="", default=False, error=" ".join(str(reason).split())[:2000])


def kernel_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r.get("error")]


_INT_FIELDS = {
    *(f for f in MODEL_FIELDS if f not in ("tiles", "waves_B1024_sm132")),  # the model's counts
    "registers",
    "spill_bytes",
    "spill_instructions",
    "loop_spill_instructions",
    "stack_bytes",
    "smem_bytes",
    "threads",
    "ctas_per_sm",
    "mma_count",
    "ldmatrix_count",
    "generic_load_count",
    "grid_B1024_sm132",
}


def read_csv(path: Path) -> list[dict]:
    """gpu_static.csv back into rows with the types write_csv was given (empty cells stay "")."""
    rows = []
    with Path(path).open(newline="") as fh:
        for row in csv.DictReader(fh):
            for key, value in row.items():
                if value == "":
                    continue
                if key in _INT_FIELDS:
                    row[key] = int(value)
                elif key.startswith(("wave_efficiency", "waves_")) or key == "sass_per_logit":
                    row[key] = float(value)
                elif key == "default":
                    row[key] = value == "True"
            rows.append(row)
    return rows


def resources_markdown(rows: list[dict], versions: str, default_only: bool = False) -> str:
    command = "python -m bench.gpu_static --out DIR" + (" --default-configs" if default_only else "")
    lines = [
        "# Compiled resources of the GPU kernels",
        "",
        f"Generated by `{command} --resources csrc/cuda/RESOURCES.md`; do not edit by hand. Read from the compiled "
        "code (no GPU involved): "
        + versions
        + "."
        + (" Triton: the default (first) autotune candidate of each kernel only." if default_only else ""),
        "",
        f"Triton kernels compiled for sm_90a at D = {REPORT_D}, C = {REPORT_C:,}; wave efficiency of the planned "
        "grid at B = 1024 on 132 SMs (1.0 = whole waves). CUDA kernels read from the built extension; their "
        "smem column is static shared memory only (the dynamic part is sized at launch and checked against the "
        "device's limit by the op).",
        "",
        "The CUDA WMMA kernels' deeper rewrite (ldmatrix fragments, vectorized operand staging, a wgmma path "
        "for Hopper) waits for a GPU measurement of the chunked path against the fused one; the generic-load "
        "and LDSM columns below show where those kernels stand.",
        "",
        "| backend | kernel | arch | dtype | config | default | regs | spill B | smem B | CTAs/SM | MMA | LDSM "
        "| generic LD | grid | wave eff. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("error"):
            lines.insert(lines.index("") + 1, f"**The {r['backend']} part of this report is missing**: {r['error']}\n")
            continue
        mma = f"{r['mma_kind']} ×{r['mma_count']}" if r["mma_kind"] != "none" else "none"
        lines.append(
            f"| {r['backend']} | {r['kernel']} | {r['arch']} | {r['dtype']} | `{r['config']}` | "
            f"{'yes' if r['default'] else ''} | {r['registers']} | {r['spill_bytes']} | {r['smem_bytes']} | "
            f"{r.get('ctas_per_sm', '')} | {mma} | {r['ldmatrix_count']} | {r['generic_load_count']} | "
            f"{r.get('grid_B1024_sm132', '')} | {r.get('wave_efficiency', '')} |"
        )
    loops = [r for r in rows if not r.get("error") and r.get("sass_per_logit") not in (None, "")]
    if loops:
        lines += [
            "",
            "## Chunked epilogue loops",
            "",
            "SASS instructions per logit in the 16-byte loop of the class-chunked path's epilogue kernels "
            "(`sass_per_logit`: the instructions from the loop's head to its backward branch, divided by the rows "
            "per block × columns per step of the kernel's last two template arguments).",
            "",
            "| kernel | arch | dtype | config | regs | spill B | SASS / logit |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in loops:
            lines.append(
                f"| {r['kernel']} | {r['arch']} | {r['dtype']} | `{r['config']}` | {r['registers']} | "
                f"{r['spill_bytes']} | {r['sass_per_logit']} |"
            )
    return "\n".join(lines) + "\n"


def _versions() -> str:
    import torch
    import triton

    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    try:
        release = re.search(
            r"release ([\d.]+)", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        ).group(1)
    except Exception:  # noqa: BLE001 - only for the header line
        release = "?"
    return f"torch {torch.__version__}, triton {triton.__version__}, nvcc {release}"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_static", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_static.csv")
    p.add_argument("--resources", help="also write the markdown summary here (csrc/cuda/RESOURCES.md)")
    p.add_argument("--triton-only", action="store_true")
    p.add_argument("--cuda-only", action="store_true")
    p.add_argument("--default-configs", action="store_true", help="only the first autotune candidate")
    p.add_argument(
        "--cuda-if-built", action="store_true", help="a CUDA part that does not build is reported, not a failed exit"
    )
    args = p.parse_args(argv)
    out = Path(args.out) / "gpu_static.csv"
    rows, status = [], 0
    print(f"writing {out} as each kernel is read", file=sys.stderr, flush=True)
    with CsvSink(out) as sink:

        def keep(row: dict) -> None:
            sink.write(row)
            rows.append(row)
            if row.get("error"):
                print(f"{row['backend']} part left out: {row['error']}", file=sys.stderr, flush=True)
            else:
                print(
                    f"[{len(rows)}] {row['backend']} {row['kernel']} {row['dtype']} {row['config']}: "
                    f"{row['registers']} regs, {row['spill_bytes']} B spilled, {row['mma_kind']}",
                    file=sys.stderr,
                    flush=True,
                )

        if not args.cuda_only:
            try:
                for row in iter_triton_rows(all_configs=not args.default_configs):
                    keep(row)
            except Exception as exc:  # noqa: BLE001 - reported in the CSV; the CUDA part still runs
                keep(failure_row("triton", f"{type(exc).__name__}: {exc}"))
                status = 1
        if not args.triton_only:
            # a CUDA build that fails (a toolkit that does not match torch's headers, say) costs the CUDA rows
            # only: the Triton rows are already written
            try:
                for row in cuda_rows():
                    keep(row)
            except Exception as exc:  # noqa: BLE001 - BuildError, a missing cuobjdump, ...
                keep(failure_row("cuda", f"{type(exc).__name__}: {exc}"))
                status = 0 if args.cuda_if_built else 1
    print(f"{len(kernel_rows(rows))} kernels -> {out}")
    if args.resources:
        target = Path(args.resources)
        text = resources_markdown(rows, _versions(), default_only=args.default_configs)
        # the time model's section (python -m bench.gpu_model --write) is kept: it is regenerated from the CSV
        old = target.read_text() if target.exists() else ""
        begin, end = "<!-- gpu_model:begin -->", "<!-- gpu_model:end -->"
        if begin in old and end in old:
            text += "\n" + begin + old.split(begin, 1)[1].split(end, 1)[0] + end + "\n"
        target.write_text(text)
        print(f"summary -> {args.resources} (then python -m bench.gpu_model --write for its time-model section)")
    return status


if __name__ == "__main__":
    sys.exit(main())
