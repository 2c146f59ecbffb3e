"""First-use build: clear errors that name what is missing, and the "auto" fallback when a build fails."""

import subprocess
import sys

import pytest
import torch
from helpers import child_env

import marginops
from marginops import _build, ops


def test_missing_compiler_is_named(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-marginops")
    with pytest.raises(_build.BuildError, match=r"C\+\+ compiler \('no-such-compiler-marginops' not on PATH"):
        _build._check_toolchain(needs_nvcc=False)


def test_missing_nvcc_is_named(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.setattr(_build, "_cuda_home", lambda: None)
    with pytest.raises(_build.BuildError, match="nvcc"):
        _build._check_toolchain(needs_nvcc=True)


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(_build, "build_failure", lambda kind: "simulated: no compiler for the test")
    with pytest.warns(RuntimeWarning, match="simulated: no compiler for the test.*reference"):
        assert ops.resolve_backend("auto", torch.device("cpu")) == "reference"
    emb = torch.randn(4, 8)
    weight = torch.randn(10, 8)
    labels = torch.tensor([1, 2, 3, 4])
    loss = marginops.margin_cross_entropy(emb, weight, labels, marginops.ArcFace())
    expected = marginops.reference.margin_cross_entropy(emb, weight, labels, marginops.ArcFace())
    torch.testing.assert_close(loss, expected)


def test_build_command_reports_cache_location(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "marginops.build"],
        capture_output=True,
        text=True,
        timeout=900,
        env=child_env(),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "C++ extension ready:" in out.stdout


def test_build_command_fails_clearly(tmp_path):
    env = child_env(CXX="no-such-compiler-marginops", MARGINOPS_FORCE_JIT="1", MARGINOPS_CACHE_DIR=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-m", "marginops.build"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert out.returncode != 0
    assert "build failed" in out.stderr and "compiler" in out.stderr
