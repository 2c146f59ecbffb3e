"""First-use build: clear errors that name what is missing, and the "auto" fallback when a build fails."""

import os
import subprocess
import sys
from pathlib import Path

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


# ----------------------------------------------------------------------------------------------------------
# CUDA headers: the include path follows the nvcc that compiles


def _fake_toolkit(root, release, runtime=True):
    """A CUDA_HOME whose nvcc reports `release` and whose include/ has (or lacks) the runtime headers."""
    nvcc = root / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.88'\n")
    nvcc.chmod(0o755)
    (root / "include").mkdir()
    if runtime:
        _runtime_headers(root / "include", release)
        (root / "include" / "cuda_runtime.h").write_text("")
    return str(root)


def _runtime_headers(include, release):
    major, minor = (int(v) for v in release.split("."))
    (include / "cuda_runtime_api.h").write_text(f"#define CUDART_VERSION  {major * 1000 + minor * 10}\n")


def _fake_pip_headers(root, release):
    root.mkdir()
    _runtime_headers(root, release)
    for name in ("cuda_runtime.h", "cublas_v2.h", "cusparse.h"):
        (root / name).write_text("")
    (root / "cccl").mkdir()
    return root


def test_pip_headers_in_full_when_they_match_nvcc(tmp_path, monkeypatch):
    pip = _fake_pip_headers(tmp_path / "pip", "13.2")
    monkeypatch.setattr(_build, "pip_cuda_include", lambda: pip)
    home = _fake_toolkit(tmp_path / "cuda", "13.2")
    assert _build.cuda_include_paths(home, tmp_path / "shim") == [str(pip)]


def test_older_nvcc_keeps_its_own_runtime_and_borrows_only_what_it_lacks(tmp_path, monkeypatch):
    """nvcc 13.0 with torch's CUDA 13.2 wheels: CCCL refuses 13.2 runtime headers under a 13.0 compiler, so
    only the library headers the toolkit lacks (cuBLAS, cuSPARSE) come from pip."""
    pip = _fake_pip_headers(tmp_path / "pip", "13.2")
    monkeypatch.setattr(_build, "pip_cuda_include", lambda: pip)
    home = _fake_toolkit(tmp_path / "cuda", "13.0")
    (tmp_path / "cuda" / "include" / "cccl").mkdir()
    shim = tmp_path / "shim"
    assert _build.cuda_include_paths(home, shim) == [str(shim)]
    assert sorted(p.name for p in shim.iterdir()) == ["cublas_v2.h", "cusparse.h"]
    assert (shim / "cublas_v2.h").resolve() == (pip / "cublas_v2.h").resolve()
    # a second build refreshes the folder rather than failing on the links it left
    assert _build.cuda_include_paths(home, shim) == [str(shim)]


def test_mismatched_headers_without_a_toolkit_runtime_is_a_named_error(tmp_path, monkeypatch):
    pip = _fake_pip_headers(tmp_path / "pip", "13.2")
    monkeypatch.setattr(_build, "pip_cuda_include", lambda: pip)
    home = _fake_toolkit(tmp_path / "cuda", "13.0", runtime=False)
    with pytest.raises(_build.BuildError, match=r"nvcc 13\.0 .*CUDA 13\.2 runtime headers.*Fix: install the CUDA 13"):
        _build.cuda_include_paths(home, tmp_path / "shim")


def test_another_major_release_is_a_named_error(tmp_path, monkeypatch):
    pip = _fake_pip_headers(tmp_path / "pip", "13.2")
    monkeypatch.setattr(_build, "pip_cuda_include", lambda: pip)
    home = _fake_toolkit(tmp_path / "cuda", "12.8")
    with pytest.raises(_build.BuildError, match=r"nvcc 12\.8 .*another major CUDA release.*CUDA 13\.2.*Fix"):
        _build.cuda_include_paths(home, tmp_path / "shim")


def test_no_pip_headers_means_the_toolkit_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(_build, "pip_cuda_include", lambda: None)
    assert _build.cuda_include_paths(_fake_toolkit(tmp_path / "cuda", "13.0"), tmp_path / "shim") == []


def test_unreadable_nvcc_version_is_a_build_error(tmp_path):
    home = _fake_toolkit(tmp_path / "cuda", "13.0")
    (tmp_path / "cuda" / "bin" / "nvcc").write_text("#!/bin/sh\necho 'something else'\n")
    with pytest.raises(_build.BuildError, match="cannot read the CUDA release"):
        _build.nvcc_version(home)


def test_the_machines_nvcc_and_this_torch_get_consistent_headers(tmp_path):
    """The real toolkit and the installed torch: either the include path is consistent with the nvcc that
    compiles (the runtime headers on it are nvcc's release) or the build stops with the named error."""
    home = _build._cuda_home()
    if torch.version.cuda is None or home is None or not (Path(home) / "bin" / "nvcc").exists():
        pytest.skip("needs nvcc and a CUDA build of torch")
    nvcc = _build.nvcc_version(home)
    try:
        paths = _build.cuda_include_paths(home, tmp_path / "shim")
    except _build.BuildError as exc:
        assert "Fix:" in str(exc)
        return
    runtimes = [_build.runtime_header_version(Path(p)) for p in paths + [str(Path(home) / "include")]]
    assert next(v for v in runtimes if v is not None) == nvcc


# ----------------------------------------------------------------------------------------------------------
# no process-global state left by a build


def test_a_build_leaves_the_environment_as_it_found_it():
    before = dict(os.environ)
    _build.load_cpu()
    with _build._scoped_environ(MAX_JOBS="1", TORCH_CUDA_ARCH_LIST="9.0"):
        assert os.environ["MAX_JOBS"] == "1"
    assert dict(os.environ) == before


def test_a_failed_build_is_retried_once_the_toolchain_changes(monkeypatch):
    calls = []

    def failing_load(verbose=False):
        calls.append(os.environ.get("CXX"))
        raise _build.BuildError("simulated failure")

    monkeypatch.setattr(_build, "load_cpu", failing_load)
    monkeypatch.setattr(_build, "_failures", {})
    monkeypatch.setenv("CXX", "broken-compiler")
    assert _build.build_failure("cpu") == "simulated failure"
    assert _build.build_failure("cpu") == "simulated failure"
    assert calls == ["broken-compiler"]  # remembered while nothing changed
    monkeypatch.setenv("CXX", "fixed-compiler")
    monkeypatch.setattr(_build, "load_cpu", lambda verbose=False: calls.append("ok"))
    assert _build.build_failure("cpu") is None
    assert calls[-1] == "ok"


def test_using_the_cpu_kernels_prints_no_cuda_home_guess(tmp_path):
    """torch.utils.cpp_extension logs "No CUDA runtime is found" on a machine with nvcc and no GPU; marginops
    finds the toolkit itself, so a user of the CPU kernels sees nothing."""
    code = (
        "import torch, marginops\n"
        "x, w = torch.randn(4, 8), torch.randn(10, 8)\n"
        "marginops.margin_cross_entropy(x, w, torch.tensor([1, 2, 3, 4]), marginops.ArcFace(), backend='cpu')\n"
        "marginops._build.cuda_arch_list()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=child_env(), cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "No CUDA runtime" not in out.stderr and "warn" not in out.stderr.lower(), out.stderr


# the sources ship: every C++ / CUDA file of csrc/ (the device-agnostic ones at its top, each device's in its folder)
# is in the sdist and in what a wheel packages (setup.py's package data)

REPO = Path(__file__).resolve().parent.parent
CPP_SUFFIXES = (".h", ".cpp", ".cu", ".cuh")


def _csrc_files() -> set:
    return {p.relative_to(REPO / "csrc").as_posix() for p in (REPO / "csrc").rglob("*") if p.suffix in CPP_SUFFIXES}


def _setup(tmp_path, *commands):
    egg = tmp_path / "egg"
    egg.mkdir(exist_ok=True)
    child = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(egg), *commands],
        cwd=REPO,
        env=child_env(MARGINOPS_BUILD_EXT="0"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]


@pytest.mark.skipif(not (REPO / "setup.py").is_file(), reason="needs the source checkout")
def test_sdist_and_wheel_ship_every_cpp_source(tmp_path):
    import tarfile

    expected = _csrc_files()
    assert {"chunk_loop.h", "margin_math.h", "cpu/fused_lse_cpu.cpp", "cuda/chunk_epilogue.cuh"} <= expected
    _setup(tmp_path, "sdist", "--dist-dir", str(tmp_path / "dist"))
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/csrc/", 1)[1] for n in tar.getnames() if "/csrc/" in n}
    assert expected <= names, f"missing from the sdist: {sorted(expected - names)}"
    _setup(tmp_path, "build_py", "--build-lib", str(tmp_path / "lib"))
    packaged = tmp_path / "lib" / "marginops" / "_csrc"
    shipped = {p.relative_to(packaged).as_posix() for p in packaged.rglob("*") if p.suffix in CPP_SUFFIXES}
    assert expected <= shipped, f"missing from the wheel's marginops/_csrc: {sorted(expected - shipped)}"
