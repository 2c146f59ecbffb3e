"""First-use build of the C++ (CPU) and CUDA extensions with ninja, cached per torch build.

The extensions register their kernels with the dispatcher (TORCH_LIBRARY in csrc/marginops.cpp,
TORCH_LIBRARY_IMPL for CPU and CUDA); loading them is all that is needed, there is no Python module
to call into.  torch.utils.cpp_extension.load rebuilds when a source changes and reuses the cached
build otherwise.  An ahead-of-time build (MARGINOPS_BUILD_EXT=1 pip install) ships the same code as
marginops._C / marginops._C_cuda, which are tried first.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Optional

import torch

from . import config

_lock = threading.Lock()
_loaded: dict[str, str] = {}


class BuildError(RuntimeError):
    """The extension could not be built; the message says what is missing."""


def source_dir() -> Path:
    """csrc/ of a source checkout, or the copy shipped as package data (marginops/_csrc)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / "marginops.cpp").is_file():
            return candidate
    raise BuildError(f"marginops C++ sources not found next to {here} (expected _csrc/ or ../csrc/)")


def cache_dir(kind: str) -> Path:
    root = config.maybe("MARGINOPS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "marginops"
    )
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}"
    # one folder per source location, so a source checkout and an installed copy don't rebuild each other
    where = hashlib.sha1(str(source_dir()).encode()).hexdigest()[:8]
    path = Path(root) / tag / f"{kind}_{where}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _openmp_flags() -> list[str]:
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def _max_jobs() -> str:
    jobs = os.environ.get("MAX_JOBS") or str(max(1, min(os.cpu_count() or 1, 8)))
    os.environ["MAX_JOBS"] = jobs
    return jobs


def _cuda_home() -> Optional[str]:
    """torch's CUDA_HOME guess, corrected when it points at a folder without the CUDA headers (an nvcc
    wrapper in /usr/local/bin makes torch guess /usr/local)."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and Path(home, "include", "cuda_runtime.h").exists():
        return home
    for candidate in (os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and Path(candidate, "bin", "nvcc").exists():
            cpp_extension.CUDA_HOME = candidate
            os.environ["CUDA_HOME"] = candidate
            return candidate
    return home


def _check_toolchain(needs_nvcc: bool) -> None:
    missing = []
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the PyPI wheel puts the binary on PATH of the venv)
        except ImportError:
            missing.append("ninja (pip install ninja)")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        missing.append(f"a C++ compiler ('{compiler}' not on PATH; install g++ or set CXX)")
    if needs_nvcc:
        cuda_home = _cuda_home()
        if torch.version.cuda is None:
            missing.append("a CUDA build of torch (this torch is CPU-only)")
        if cuda_home is None or not Path(cuda_home, "bin", "nvcc").exists():
            missing.append("nvcc (set CUDA_HOME to a CUDA toolkit)")
    if missing:
        raise BuildError("cannot build the marginops extension, missing: " + "; ".join(missing))


def _cuda_include_paths() -> list[str]:
    """Headers of the pip-installed CUDA runtime, for toolkits that lack some of them."""
    paths = []
    for entry in sys.path:
        candidate = Path(entry) / "nvidia" / "cu13" / "include"
        if candidate.is_dir():
            paths.append(str(candidate))
    return paths[:1]


def cuda_arch_list() -> str:
    """MARGINOPS_CUDA_ARCHS (e.g. "8.0;9.0"), else the visible GPU's arch, else 9.0 (compile check)."""
    archs = config.maybe("MARGINOPS_CUDA_ARCHS")
    if archs:
        return archs
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "9.0"


def _try_prebuilt(module: str) -> Optional[str]:
    """Load a library built by setup.py (MARGINOPS_BUILD_EXT=1); it has no Python module init, so go through
    torch.ops."""
    if config.flag("MARGINOPS_FORCE_JIT"):
        return None
    for path in sorted(Path(__file__).resolve().parent.glob(f"{module}.*.so")):
        torch.ops.load_library(str(path))
        return str(path)
    return None


def _jit(name: str, sources: list[str], cuda: bool, verbose: bool) -> str:
    from torch.utils import cpp_extension

    src = source_dir()
    build_dir = cache_dir(name)
    jobs = _max_jobs()
    built = [p.stat().st_mtime for p in build_dir.glob("*.so")]
    if not built or max(Path(f).stat().st_mtime for f in sources) > max(built):
        print(
            f"marginops: compiling {name} (first use, MAX_JOBS={jobs}) in {build_dir} ...", file=sys.stderr, flush=True
        )
    kwargs = dict(
        name=name,
        sources=sources,
        extra_include_paths=[str(src)] + (_cuda_include_paths() if cuda else []),
        # torch's own headers pick the C++ standard (C++20 for torch 2.14); OpenMP for at::parallel_for
        extra_cflags=["-O3"] + _openmp_flags(),
        extra_ldflags=_openmp_flags(),
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    if cuda:
        kwargs["extra_cuda_cflags"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
    try:
        cpp_extension.load(**kwargs)
    except Exception as exc:  # the compiler output is already on stderr
        raise BuildError(f"building {name} failed: {exc}") from exc
    finally:
        if cuda:
            if previous is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = previous
    return str(build_dir)


def load_cpu(verbose: bool = False) -> str:
    """Make torch.ops.marginops.fused_lse (schemas + CPU kernels) available; returns where it came from."""
    with _lock:
        if "cpu" not in _loaded:
            prebuilt = _try_prebuilt("_C")
            if prebuilt:
                _loaded["cpu"] = prebuilt
            else:
                _check_toolchain(needs_nvcc=False)
                src = source_dir()
                sources = [str(src / "marginops.cpp")] + sorted(glob.glob(str(src / "cpu" / "*.cpp")))
                _loaded["cpu"] = _jit("marginops_C", sources, cuda=False, verbose=verbose)
        return _loaded["cpu"]


def load_cuda(verbose: bool = False) -> str:
    """Add the CUDA kernels of fused_lse (needs the CPU extension's schemas first)."""
    load_cpu(verbose)
    with _lock:
        if "cuda" not in _loaded:
            prebuilt = _try_prebuilt("_C_cuda")
            if prebuilt:
                _loaded["cuda"] = prebuilt
            else:
                _check_toolchain(needs_nvcc=True)
                src = source_dir() / "cuda"
                sources = sorted(glob.glob(str(src / "*.cu")) + glob.glob(str(src / "*.cpp")))
                if not sources:
                    raise BuildError(f"no CUDA sources in {src}")
                _loaded["cuda"] = _jit("marginops_C_cuda", sources, cuda=True, verbose=verbose)
        return _loaded["cuda"]


_failures: dict[str, str] = {}


def build_failure(kind: str) -> Optional[str]:
    """Load the "cpu" or "cuda" extension; None on success, else why it failed (remembered for the
    process, so that a broken toolchain costs one attempt, not one per call)."""
    if kind not in _failures:
        try:
            (load_cuda if kind == "cuda" else load_cpu)()
        except BuildError as exc:
            _failures[kind] = str(exc)
            return _failures[kind]
        _failures[kind] = ""
    return _failures[kind] or None
