"""The switchboard: every environment variable marginops reads, in one table, with how its value is parsed and
when it is read.

Python code reads a switch through :func:`flag` / :func:`integer` / :func:`choice` / :func:`get` (never
``os.environ`` directly); the C++ sources read theirs (reader ``cpp``) through csrc/switches.h, which parses
them the same way: the spellings of on and off (:data:`ON`, :data:`OFF`) are defined once here and once there,
and tests/test_switches.py checks every ``cpp`` row of this table against the C++ parser.

Values: surrounding whitespace is ignored and a blank value counts as unset (the default applies).  A 0/1
switch takes 1, true, yes, on / 0, false, no, off in any case; an integer switch a whole decimal number in its
range; a choice one of its choices (any case).  Anything else raises ValueError naming the switch and its
value (C++: the same message, raised as ValueError through the op).

When a switch is read is each row's ``read``.  The per-call kernel switches (``MARGINOPS_CUDA_PATH``,
``MARGINOPS_{CUDA,TRITON}_{TF32,FAST_BWD}``) are read once per op call, by its forward (marginops/ops.py), and
the forward's decision is handed to its backward: a switch changed in between must not send the backward down
another path or precision (under torch.compile they are read when the graph is traced).

Names pair up by backend: ``MARGINOPS_{CUDA,TRITON}_{TF32,FAST_BWD}``.  Older names are still accepted
(``aliases``); the canonical name wins when both are set.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

# The spellings of a 0/1 switch, compared after stripping whitespace and lowering ASCII case (C++: csrc/switches.h
# kSwitchOn / kSwitchOff).
ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")
_WHITESPACE = " \t\n\r\f\v"  # ASCII whitespace only, as csrc/switches.h
_INTEGER = re.compile(r"[+-]?[0-9]+")
_PER_CALL = "once per op call, by its forward; the backward uses the forward's decision"


@dataclass(frozen=True)
class Switch:
    name: str
    default: str
    reader: str  # "python" or "cpp"
    meaning: str
    aliases: tuple = ()
    kind: str = "text"  # "flag" (0/1), "int", "choice" or "text"
    low: int = 0  # kind "int": the accepted range, both ends included
    high: int = 0
    choices: tuple = ()  # kind "choice"
    read: str = ""  # when it is read


_INT32_MAX = 2**31 - 1

SWITCHES = {
    s.name: s
    for s in (
        # kernel behaviour
        Switch(
            "MARGINOPS_CUDA_PATH",
            "chunked",
            "cpp",
            "backend='cuda' runs the class-chunked path (`chunked`) or the fused kernels (`fused`)",
            kind="choice",
            choices=("chunked", "fused"),
            read=_PER_CALL,
        ),
        Switch(
            "MARGINOPS_CUDA_TF32",
            "0",
            "cpp",
            "float32 inputs on TF32 tensor cores in the CUDA kernels",
            kind="flag",
            read=_PER_CALL,
        ),
        Switch(
            "MARGINOPS_TRITON_TF32",
            "0",
            "python",
            "float32 inputs on TF32 tensor cores in the Triton kernels",
            aliases=("MARGINOPS_TF32",),
            kind="flag",
            read=_PER_CALL,
        ),
        Switch(
            "MARGINOPS_CUDA_FAST_BWD",
            "0",
            "cpp",
            "fp16 inputs: one fp16 gradient operand instead of a hi + lo pair in the CUDA backward",
            kind="flag",
            read=_PER_CALL,
        ),
        Switch(
            "MARGINOPS_TRITON_FAST_BWD",
            "0",
            "python",
            "fp16 inputs: one fp16 gradient operand instead of a hi + lo pair in the Triton backward",
            aliases=("MARGINOPS_TRITON_FAST_GRAD",),
            kind="flag",
            read=_PER_CALL,
        ),
        Switch(
            "MARGINOPS_TRITON_AUTOTUNE",
            "1",
            "python",
            "0: the first Triton configuration of each kernel, no autotuning (reproducible across processes)",
            kind="flag",
            read=_PER_CALL,
        ),
        Switch(
            "MARGINOPS_CHUNK_COLS",
            "",
            "cpp",
            "classes per chunk of the chunk loop (CPU backend, class-chunked CUDA path) and the hybrid backward "
            "(default: planned)",
            kind="int",
            low=1,
            high=_INT32_MAX,
            read="by each forward and each backward of the chunk loop (CPU, chunked CUDA), each hybrid backward "
            "(planning)",
        ),
        Switch(
            "MARGINOPS_CHUNK_ROWS",
            "",
            "cpp",
            "rows per tile of the chunk loop (CPU backend: all rows by default; class-chunked CUDA path) and the "
            "hybrid backward (default: planned)",
            kind="int",
            low=1,
            high=_INT32_MAX,
            read="by each forward and each backward of the chunk loop (CPU, chunked CUDA), each hybrid backward "
            "(planning)",
        ),
        Switch(
            "MARGINOPS_CPU_VECTOR",
            "",
            "cpp",
            "cap the CPU epilogue's SIMD width in bits, 128-512 (x86; tests and comparisons)",
            kind="int",
            low=128,
            high=512,
            read="once per process, at the first CPU op call (x86 only)",
        ),
        Switch(
            "TRITON_INTERPRET",
            "0",
            "python",
            "1: the Triton backend runs CPU tensors through the interpreter",
            kind="flag",
            read="by triton when it is first imported (set it before); by marginops at each call",
        ),
        # build
        Switch(
            "MARGINOPS_CACHE_DIR",
            "",
            "python",
            "folder of the first-use build (default ~/.cache/marginops)",
            read="when an extension is first loaded",
        ),
        Switch(
            "MARGINOPS_CUDA_ARCHS",
            "",
            "python",
            "CUDA architectures to build, e.g. `8.0;9.0` (default: the visible GPU, else 9.0)",
            read="when the CUDA extension is first loaded",
        ),
        Switch(
            "MARGINOPS_FORCE_JIT",
            "0",
            "python",
            "1: ignore an ahead-of-time build and compile on first use",
            kind="flag",
            read="when an extension is first loaded",
        ),
        Switch(
            "MARGINOPS_BUILD_EXT",
            "0",
            "python",
            "1: `pip install` compiles the C++ extension",
            kind="flag",
            read="by setup.py (pip install)",
        ),
        Switch(
            "MARGINOPS_BUILD_CUDA",
            "0",
            "python",
            "1: with MARGINOPS_BUILD_EXT, also the CUDA extension",
            kind="flag",
            read="by setup.py (pip install)",
        ),
    )
}


def raw(name: str) -> Optional[str]:
    """The switch's value now, whitespace stripped: the canonical name, else the first alias that is set; None
    when neither is set to anything but blanks."""
    switch = SWITCHES[name]
    for key in (switch.name, *switch.aliases):
        value = os.environ.get(key)
        if value is not None and value.strip(_WHITESPACE):
            return value.strip(_WHITESPACE)
    return None


def get(name: str) -> str:
    """The switch's text now (raw value, else the default)."""
    value = raw(name)
    return SWITCHES[name].default if value is None else value


def _kind(name: str, kind: str) -> Switch:
    switch = SWITCHES[name]
    if switch.kind != kind:
        raise TypeError(f"{name} is a {switch.kind} switch, not a {kind} one")
    return switch


def _lower(value: str) -> str:
    # ASCII only, like the C++ parser: a non-ASCII value matches no spelling
    return value.lower() if value.isascii() else value


def flag(name: str) -> bool:
    """A 0/1 switch: :data:`ON` or :data:`OFF` in any case; anything else raises ValueError."""
    _kind(name, "flag")
    value = get(name)
    if _lower(value) in ON:
        return True
    if _lower(value) in OFF:
        return False
    raise ValueError(f"{name}='{value}': expected {', '.join(ON)} (on) or {', '.join(OFF)} (off), any case, or unset")


def integer(name: str) -> Optional[int]:
    """An integer switch: a whole decimal number in the switch's range, or None when unset (no default)."""
    switch = _kind(name, "int")
    value = get(name)
    if value == "":
        return None
    number = int(value) if _INTEGER.fullmatch(value) else None
    if number is None or not switch.low <= number <= switch.high:
        raise ValueError(f"{name}='{value}': expected a whole decimal number in [{switch.low}, {switch.high}]")
    return number


def choice(name: str) -> str:
    """A switch with a fixed set of values (any case), lower-cased."""
    switch = _kind(name, "choice")
    value = get(name)
    if _lower(value) not in switch.choices:
        raise ValueError(f"{name}='{value}': expected one of {', '.join(switch.choices)}, any case, or unset")
    return _lower(value)


def parsed(name: str) -> str:
    """The switch's parsed value as text: "1" / "0", the number ("" when unset), the choice, or the text; the
    C++ parser's test hook (marginops::_read_switch) answers the same for the ``cpp`` switches."""
    kind = SWITCHES[name].kind
    if kind == "flag":
        return "1" if flag(name) else "0"
    if kind == "int":
        number = integer(name)
        return "" if number is None else str(number)
    if kind == "choice":
        return choice(name)
    return get(name)


def maybe(name: str) -> Optional[str]:
    """The switch's value, or None when it is unset and has no default."""
    value = get(name)
    return value or None
