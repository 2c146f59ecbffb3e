"""The switchboard: every environment variable marginops reads, in one table, read at call time.

Python code reads a switch through :func:`get` / :func:`flag` (never ``os.environ`` directly), so a switch
set or changed while a program runs takes effect at the next call.  The C++ sources read their switches
(marked ``cpp`` below) at each call through the one helper in csrc/switches.h; the Python side lists them
here so that the table is complete and the README's table can be checked against it.

Names pair up by backend: ``MARGINOPS_{CUDA,TRITON}_{TF32,FAST_BWD}``.  Older names are still accepted
(``aliases``); the canonical name wins when both are set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Switch:
    name: str
    default: str
    reader: str  # "python" or "cpp"
    meaning: str
    aliases: tuple = ()


SWITCHES = {
    s.name: s
    for s in (
        # kernel behaviour
        Switch(
            "MARGINOPS_CUDA_PATH",
            "chunked",
            "cpp",
            "backend='cuda' runs the class-chunked path (`chunked`) or the fused kernels (`fused`)",
        ),
        Switch("MARGINOPS_CUDA_TF32", "0", "cpp", "float32 inputs on TF32 tensor cores in the CUDA kernels"),
        Switch(
            "MARGINOPS_TRITON_TF32",
            "0",
            "python",
            "float32 inputs on TF32 tensor cores in the Triton kernels",
            aliases=("MARGINOPS_TF32",),
        ),
        Switch(
            "MARGINOPS_CUDA_FAST_BWD",
            "0",
            "cpp",
            "fp16 inputs: one fp16 gradient operand instead of a hi + lo pair in the CUDA backward",
        ),
        Switch(
            "MARGINOPS_TRITON_FAST_BWD",
            "0",
            "python",
            "fp16 inputs: one fp16 gradient operand instead of a hi + lo pair in the Triton backward",
            aliases=("MARGINOPS_TRITON_FAST_GRAD",),
        ),
        Switch(
            "MARGINOPS_TRITON_AUTOTUNE",
            "1",
            "python",
            "0: the first Triton configuration of each kernel, no autotuning (reproducible across processes)",
        ),
        # read by the C++ chunk loop and by the hybrid path's launcher (triton_kernels/hybrid_launch.py)
        Switch("MARGINOPS_CHUNK_COLS", "", "cpp", "classes per chunk of the chunked paths (default: planned)"),
        Switch("MARGINOPS_CHUNK_ROWS", "", "cpp", "rows per tile of the chunked paths (default: planned)"),
        Switch("MARGINOPS_CPU_VECTOR", "", "cpp", "cap the CPU epilogue's SIMD width in bits (tests; read once)"),
        Switch("TRITON_INTERPRET", "0", "python", "1: the Triton backend runs CPU tensors through the interpreter"),
        # build
        Switch("MARGINOPS_CACHE_DIR", "", "python", "folder of the first-use build (default ~/.cache/marginops)"),
        Switch(
            "MARGINOPS_CUDA_ARCHS",
            "",
            "python",
            "CUDA architectures to build, e.g. `8.0;9.0` (default: the visible GPU, else 9.0)",
        ),
        Switch("MARGINOPS_FORCE_JIT", "0", "python", "1: ignore an ahead-of-time build and compile on first use"),
        Switch("MARGINOPS_BUILD_EXT", "0", "python", "1: `pip install` compiles the C++ extension"),
        Switch("MARGINOPS_BUILD_CUDA", "0", "python", "1: with MARGINOPS_BUILD_EXT, also the CUDA extension"),
    )
}


def get(name: str) -> str:
    """The switch's value now: the canonical name, else the first alias that is set, else the default."""
    switch = SWITCHES[name]
    for key in (switch.name, *switch.aliases):
        value = os.environ.get(key)
        if value is not None and value != "":
            return value
    return switch.default


def flag(name: str) -> bool:
    """A 0/1 switch."""
    value = get(name).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r}: expected 0 or 1")


def maybe(name: str) -> Optional[str]:
    """The switch's value, or None when it is unset and has no default."""
    value = get(name)
    return value or None
