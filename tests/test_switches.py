"""The switchboard (marginops/config.py): every environment variable the package reads is in its table, read
through it (Python) or through csrc/switches.h (C++), at call time, and listed in the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from marginops import config

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


def test_aliases_and_values(monkeypatch):
    for name in ("MARGINOPS_TRITON_TF32", "MARGINOPS_TF32"):
        monkeypatch.delenv(name, raising=False)
    assert config.flag("MARGINOPS_TRITON_TF32") is False
    monkeypatch.setenv("MARGINOPS_TF32", "1")  # the old name still works
    assert config.flag("MARGINOPS_TRITON_TF32") is True
    monkeypatch.setenv("MARGINOPS_TRITON_TF32", "0")  # the canonical name wins
    assert config.flag("MARGINOPS_TRITON_TF32") is False
    monkeypatch.setenv("MARGINOPS_TRITON_TF32", "maybe")
    with pytest.raises(ValueError, match="MARGINOPS_TRITON_TF32"):
        config.flag("MARGINOPS_TRITON_TF32")
    monkeypatch.delenv("MARGINOPS_CACHE_DIR", raising=False)
    assert config.maybe("MARGINOPS_CACHE_DIR") is None
