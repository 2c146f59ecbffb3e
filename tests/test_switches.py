"""The switchboard (marginops/config.py): every environment variable the package reads is in its table, read
through it (Python) or through csrc/switches.h (C++), parsed the same way in both, and listed in the README; an
op call's backward runs with the switches its forward read."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import HAS_TRITON, assert_close, child_env

import marginops
from marginops import config, ops

ROOT = Path(__file__).resolve().parent.parent
PY_SOURCES = [p for d in ("marginops", "triton_kernels") for p in (ROOT / d).rglob("*.py")] + [ROOT / "setup.py"]
CPP_SOURCES = [p for ext in ("*.h", "*.cpp", "*.cuh", "*.cu") for p in (ROOT / "csrc").rglob(ext)]
NAME = re.compile(r"\b((?:MARGINOPS|TRITON)_[A-Z0-9_]+)\b")


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_python_reads_environment_only_through_the_switchboard():
    reads = re.compile(r"os\.environ\.get\(|os\.getenv\(|os\.environ\[[^\]]+\](?!\s*=)")
    offenders = []
    for path in PY_SOURCES:
        if path.name == "config.py" and path.parent.name == "marginops":
            continue
        for number, line in enumerate(_read(path).splitlines(), 1):
            if reads.search(line) and NAME.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "read these through marginops.config:\n" + "\n".join(offenders)


def test_cpp_reads_environment_only_through_switches_h():
    offenders = []
    for path in CPP_SOURCES:
        if path.name == "switches.h":
            continue
        for number, line in enumerate(_read(path).splitlines(), 1):
            if "getenv" in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "read these through csrc/switches.h:\n" + "\n".join(offenders)


def test_every_switch_named_in_the_sources_is_in_the_table():
    known = set(config.SWITCHES) | {a for s in config.SWITCHES.values() for a in s.aliases}
    seen = set()
    for path in PY_SOURCES + CPP_SOURCES:
        text = _read(path)
        if path.suffix == ".py":
            # only names used as environment keys (string literals), not Python identifiers
            seen |= {m.group(1) for m in re.finditer(r"[\"']((?:MARGINOPS|TRITON)_[A-Z0-9_]+)[\"']", text)}
        else:
            seen |= {m.group(1) for m in re.finditer(r"\"((?:MARGINOPS|TRITON)_[A-Z0-9_]+)\"", text)}
    assert seen - known == set()
    cpp_read = {s.name for s in config.SWITCHES.values() if s.reader == "cpp"}
    cpp_text = "".join(_read(p) for p in CPP_SOURCES)
    assert all(f'"{name}"' in cpp_text for name in cpp_read)


def test_readme_lists_every_switch():
    readme = _read(ROOT / "README.md")
    # MARGINOPS_{CUDA,TRITON}_TF32 names both switches
    readme = re.sub(
        r"MARGINOPS_\{([A-Z,]+)\}_([A-Z0-9_]+)",
        lambda m: " ".join(f"MARGINOPS_{part}_{m.group(2)}" for part in m.group(1).split(",")),
        readme,
    )
    missing = [name for name in config.SWITCHES if name not in readme]
    assert not missing


def test_table_says_how_and_when_each_switch_is_read():
    for switch in config.SWITCHES.values():
        assert switch.reader in ("python", "cpp") and switch.read, switch.name
        assert switch.kind in ("flag", "int", "choice", "text"), switch.name
        if switch.kind == "int":
            assert switch.low <= switch.high, switch.name
        if switch.kind == "choice":
            assert switch.default in switch.choices, switch.name
        if switch.reader == "cpp":
            assert not switch.aliases, f"{switch.name}: csrc/switches.h reads no aliases"


def test_aliases_and_values(monkeypatch):
    for name in ("MARGINOPS_TRITON_TF32", "MARGINOPS_TF32"):
        monkeypatch.delenv(name, raising=False)
    assert config.flag("MARGINOPS_TRITON_TF32") is False
    monkeypatch.setenv("MARGINOPS_TF32", "1")  # the old name still works
    assert config.flag("MARGINOPS_TRITON_TF32") is True
    monkeypatch.setenv("MARGINOPS_TRITON_TF32", "0")  # the canonical name wins
    assert config.flag("MARGINOPS_TRITON_TF32") is False
    monkeypatch.setenv("MARGINOPS_TRITON_TF32", "  ")  # blank: unset, so the alias applies
    assert config.flag("MARGINOPS_TRITON_TF32") is True
    monkeypatch.setenv("MARGINOPS_TRITON_TF32", "maybe")
    with pytest.raises(ValueError, match="MARGINOPS_TRITON_TF32='maybe'"):
        config.flag("MARGINOPS_TRITON_TF32")
    monkeypatch.delenv("MARGINOPS_CACHE_DIR", raising=False)
    assert config.maybe("MARGINOPS_CACHE_DIR") is None


# Values every C++ switch is read with, in both languages: each spelling of on and off in other cases and with
# whitespace, numbers in and out of range, and near misses that atoll / "not 0" used to accept.
SPELLINGS = [
    *config.ON,
    *config.OFF,
    *(v.upper() for v in config.ON + config.OFF),
    " True ",
    "\tno\n",
    "oN",
    "",
    "   ",
    "2",
    "-1",
    "01",
    "y",
    "n",
    "enable",
    "garbage",
    "1.0",
    "on\u00a0",  # a non-breaking space is not whitespace to either parser
    "\u0130",
    "37",
    "+37",
    " 12 ",
    "007",
    "-5",
    "1e3",
    "0x10",
    "1_000",
    "\uff11\uff12",  # full-width digits: not a decimal number here
    "127",
    "128",
    "256",
    "512",
    "513",
    str(2**31 - 1),
    str(2**31),
    "9" * 30,
    "chunked",
    "FUSED",
    " fused ",
    "fuse",
]


WHITESPACE = " \t\n\r\f\v"


def _outcome(read):
    try:
        return "value", read()
    except ValueError as err:  # both languages: ValueError, the same first line
        return "ValueError", str(err).splitlines()[0]


@pytest.fixture(scope="module")
def cpp_ops():
    from marginops import _build

    reason = _build.build_failure("cpu")
    if reason:
        pytest.skip(f"C++ extension unavailable: {reason}")
    ops.cpp_op("cpu")
    return torch.ops.marginops


@pytest.mark.parametrize("name", [s.name for s in config.SWITCHES.values() if s.reader == "cpp"])
def test_cpp_switches_parse_as_the_table_says(cpp_ops, name, monkeypatch):
    """csrc/switches.h against marginops/config.py, spelling by spelling: the same value, or a ValueError with the
    same message naming the switch and the value; and the switch's kind and range are the table's."""
    monkeypatch.delenv(name, raising=False)
    assert cpp_ops._read_switch(name) == config.parsed(name), "unset"
    disagree = []
    for value in SPELLINGS:
        monkeypatch.setenv(name, value)
        py, cpp = _outcome(lambda: config.parsed(name)), _outcome(lambda: cpp_ops._read_switch(name))
        if py != cpp:
            disagree.append(f"{name}={value!r}: Python {py}, C++ {cpp}")
        if py[0] == "ValueError":
            assert py[1].startswith(f"{name}='{value.strip(WHITESPACE)}': expected"), py
    assert not disagree, "\n".join(disagree)


def test_python_switch_kinds(monkeypatch):
    for value in ("1", "TRUE", " yes ", "On"):
        monkeypatch.setenv("MARGINOPS_FORCE_JIT", value)
        assert config.flag("MARGINOPS_FORCE_JIT") is True
    for value in ("0", "False", "NO", "off", ""):
        monkeypatch.setenv("MARGINOPS_FORCE_JIT", value)
        assert config.flag("MARGINOPS_FORCE_JIT") is False
    for value in ("2", "-1", "garbage", "y"):
        monkeypatch.setenv("MARGINOPS_FORCE_JIT", value)
        with pytest.raises(ValueError, match=f"MARGINOPS_FORCE_JIT='{value}'"):
            config.flag("MARGINOPS_FORCE_JIT")
    monkeypatch.setenv("MARGINOPS_CHUNK_COLS", " 37 ")
    assert config.integer("MARGINOPS_CHUNK_COLS") == 37
    for value in ("garbage", "yes", "-5", "1e3", "0"):
        monkeypatch.setenv("MARGINOPS_CHUNK_COLS", value)
        with pytest.raises(
            ValueError, match=rf"MARGINOPS_CHUNK_COLS='{value}': expected a whole decimal number in \[1,"
        ):
            config.integer("MARGINOPS_CHUNK_COLS")
    monkeypatch.setenv("MARGINOPS_CUDA_PATH", "Fused")
    assert config.choice("MARGINOPS_CUDA_PATH") == "fused"
    with pytest.raises(TypeError, match="not a flag"):
        config.flag("MARGINOPS_CUDA_PATH")


def test_read_cuda_switches(cpp_ops, monkeypatch):
    """What the CUDA op's forward runs with, read once and passed on to its backward: distinct for every
    combination, and a bad value is an error naming the switch (no GPU needed: the reader is in the CPU
    extension)."""
    names = ("MARGINOPS_CUDA_PATH", "MARGINOPS_CUDA_TF32", "MARGINOPS_CUDA_FAST_BWD")
    seen = set()
    for path in ("chunked", "fused"):
        for tf32 in ("0", "1"):
            for fast in ("off", "on"):
                for name, value in zip(names, (path, tf32, fast)):
                    monkeypatch.setenv(name, value)
                seen.add(cpp_ops.read_cuda_switches())
    assert len(seen) == 8 and min(seen) >= 0
    for name in names:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MARGINOPS_CUDA_TF32", "false")  # was on: anything but "0" was
    assert cpp_ops.read_cuda_switches() == 0
    monkeypatch.setenv("MARGINOPS_CUDA_FAST_BWD", "2")
    with pytest.raises(ValueError, match="MARGINOPS_CUDA_FAST_BWD='2'"):
        cpp_ops.read_cuda_switches()


_VECTOR_CHILD = """
import os, sys
import torch
from marginops import ops
x = torch.nn.functional.normalize(torch.randn(4, 8, dtype=torch.float64))
args = (x, torch.randn(5, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3]), torch.zeros(4, dtype=torch.float64),
        torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), None, torch.tensor(0.0), 0, 2.0, 1,
        True)
try:
    ops.cpp_op("cpu")(*args)
    sys.exit("no error for MARGINOPS_CPU_VECTOR=" + os.environ["MARGINOPS_CPU_VECTOR"])
except ValueError as err:
    print(str(err).splitlines()[0])
os.environ["MARGINOPS_CPU_VECTOR"] = " 128 "  # the width is read at the first call that succeeds
ops.cpp_op("cpu")(*args)
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="MARGINOPS_CPU_VECTOR is read on x86")
def test_cpu_op_reads_cpu_vector_through_the_parser(cpp_ops):
    """The CPU op's one C++ switch, through the op itself (read once per process: a child process)."""
    child = subprocess.run(
        [sys.executable, "-c", _VECTOR_CHILD],
        env=child_env(MARGINOPS_CPU_VECTOR="garbage"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert "MARGINOPS_CPU_VECTOR='garbage': expected a whole decimal number in [128, 512]" in child.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_backward_runs_with_the_forwards_switches(monkeypatch):
    """A switch changed between an op call's forward and its backward does not reach that backward: Triton,
    fp16, MARGINOPS_TRITON_FAST_BWD turned on in between (it changes the backward's numbers)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if ops.triton_usable(device) is not None:
        pytest.skip(ops.triton_usable(device))
    for name in ("MARGINOPS_TRITON_FAST_BWD", "MARGINOPS_TRITON_FAST_GRAD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ops.triton_kernels(), "FAST_GRAD_DOTS", None)
    emb = torch.randn(19, 24, dtype=torch.float16, device=device)
    weight = torch.randn(45, 24, dtype=torch.float16, device=device)
    labels = torch.randint(0, 45, (19,), device=device)

    def grads(switch_between):
        e, w = emb.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = marginops.margin_cross_entropy(e, w, labels, marginops.CosFace(s=30.0), backend="triton")
        monkeypatch.setenv("MARGINOPS_TRITON_FAST_BWD", switch_between)
        loss.backward()
        monkeypatch.delenv("MARGINOPS_TRITON_FAST_BWD")
        return e.grad, w.grad

    kept, changed = grads("0"), grads("1")
    for name, a, b in zip(("grad embeddings", "grad weight"), changed, kept):
        assert_close(name, a, b, rtol=0, atol=0)
    # the switch itself does change this backward when the forward reads it
    monkeypatch.setenv("MARGINOPS_TRITON_FAST_BWD", "1")
    fast = grads("1")
    assert not torch.equal(fast[1], kept[1])


@pytest.mark.emulator
def test_cuda_backward_runs_with_the_forwards_path(monkeypatch):
    """The CUDA op (its C++ path choice, under the emulator): a mixed-precision forward on the class-chunked path,
    then MARGINOPS_CUDA_PATH=fused before the backward.  Given the forward's switches, the backward stays on the
    chunked path; reading the environment again would send it to the fused kernels, which reject the float32
    weight."""
    import cuda_emulator
    from op_cases import Case

    emu = cuda_emulator.load()
    case = Case(B=9, D=16, C=40).on(torch.bfloat16, weight_dtype=torch.float32)
    for name in ("MARGINOPS_CUDA_PATH", "MARGINOPS_CUDA_TF32", "MARGINOPS_CUDA_FAST_BWD"):
        monkeypatch.delenv(name, raising=False)
    switches = emu.read_cuda_switches()
    lse, _ = emu.fused_lse_default(*case.args(), True, switches)
    expected = emu.fused_lse_backward_default(case.grad, lse, *case.args(), True, True, True, switches)
    monkeypatch.setenv("MARGINOPS_CUDA_PATH", "fused")
    got = emu.fused_lse_backward_default(case.grad, lse, *case.args(), True, True, True, switches)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    with pytest.raises((ValueError, RuntimeError), match="mixed precision"):
        emu.fused_lse_backward_default(case.grad, lse, *case.args(), True, True, True, -1)
