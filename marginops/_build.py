"""First-use build of the C++ (CPU) and CUDA extensions with ninja, cached per torch build.

The extensions register their kernels with the dispatcher (TORCH_LIBRARY in csrc/marginops.cpp,
TORCH_LIBRARY_IMPL for CPU and CUDA); loading them is all that is needed, there is no Python module
to call into.  torch.utils.cpp_extension.load rebuilds when a source changes and reuses the cached
build otherwise.  An ahead-of-time build (MARGINOPS_BUILD_EXT=1 pip install) ships the same code as
marginops._C / marginops._C_cuda, which are tried first.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import re
import shutil
import subprocess
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
    return os.environ.get("MAX_JOBS") or str(max(1, min(os.cpu_count() or 1, 8)))


@contextlib.contextmanager
def _scoped_environ(**values: str):
    """torch's builder reads MAX_JOBS and TORCH_CUDA_ARCH_LIST from the environment only: set them for the
    build and put back what was there, so a build leaves the process's environment as it found it."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _quiet_cuda_home_guess():
    """Importing torch.utils.cpp_extension on a machine with nvcc but no GPU logs "No CUDA runtime is found,
    using CUDA_HOME=..." once per process; marginops finds the toolkit itself (_cuda_home), so that line is
    noise for every user of the CPU kernels.  Other messages of that logger pass."""

    class _DropGuess(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "No CUDA runtime is found" not in record.getMessage()

    log = logging.getLogger("torch.utils.cpp_extension")
    drop = _DropGuess()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def _cpp_extension():
    with _quiet_cuda_home_guess():
        from torch.utils import cpp_extension
    return cpp_extension


def _cuda_home() -> Optional[str]:
    """The CUDA toolkit to compile with: $CUDA_HOME / $CUDA_PATH if set, else torch's guess, corrected when it
    points at a folder without the CUDA headers (an nvcc wrapper in /usr/local/bin makes torch guess
    /usr/local)."""
    home = _cpp_extension().CUDA_HOME
    if home and Path(home, "include", "cuda_runtime.h").exists():
        return home
    for candidate in (os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and Path(candidate, "bin", "nvcc").exists():
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


# --------------------------------------------------------------------------------------------------------
# CUDA headers.  torch's CUDA wheels bring the runtime and library headers of their CUDA release (pip's
# nvidia/cu13/include); a machine's toolkit may be an older minor release and may lack the library headers
# (cuBLAS, cuSPARSE, cuSOLVER) that torch's own headers include.  CCCL refuses to compile runtime headers
# of another release than the nvcc's, so the runtime headers must come from the toolkit whenever their
# versions differ, and only the headers the toolkit lacks may come from pip.


def _version_text(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def nvcc_version(cuda_home: str) -> tuple[int, int]:
    """(major, minor) that nvcc --version reports, e.g. (13, 0)."""
    nvcc = Path(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"cannot run {nvcc} --version: {exc}") from exc
    match = re.search(r"release (\d+)\.(\d+)", out)
    if not match:
        raise BuildError(f"cannot read the CUDA release from {nvcc} --version: {out.strip()[-200:]!r}")
    return int(match.group(1)), int(match.group(2))


def runtime_header_version(include: Path) -> Optional[tuple[int, int]]:
    """(major, minor) of CUDART_VERSION in include/cuda_runtime_api.h, None if the folder has no runtime."""
    header = include / "cuda_runtime_api.h"
    if not header.is_file():
        return None
    match = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", header.read_text(errors="replace"))
    if not match:
        return None
    number = int(match.group(1))
    return number // 1000, (number % 1000) // 10


def pip_cuda_include() -> Optional[Path]:
    """The include folder of torch's pip-installed CUDA runtime (nvidia/cu13/include, or the per-library
    nvidia/cuda_runtime/include of older wheels), if any."""
    major = (torch.version.cuda or "").split(".")[0]
    for entry in sys.path:
        for candidate in (
            Path(entry) / "nvidia" / f"cu{major}" / "include",
            Path(entry) / "nvidia" / "cuda_runtime" / "include",
        ):
            if major and (candidate / "cuda_runtime_api.h").is_file():
                return candidate
    return None


def _header_mismatch(nvcc: tuple[int, int], headers: tuple[int, int], where: Path, cuda_home: str) -> BuildError:
    return BuildError(
        f"nvcc {_version_text(nvcc)} (in {cuda_home}) and the CUDA {_version_text(headers)} runtime headers of "
        f"torch {torch.__version__} ({where}) cannot be compiled together, and the toolkit has no runtime headers "
        f"of its own.  Fix: install the CUDA {_version_text(headers)} toolkit and point CUDA_HOME at it, or install "
        f"the torch build for CUDA {_version_text(nvcc)}."
    )


def cuda_include_paths(cuda_home: str, shim_dir: Path) -> list[str]:
    """Include folders, besides torch's and the toolkit's, that a CUDA build needs.

    pip's headers in full when their runtime matches nvcc (or the toolkit has no runtime headers and they
    match); otherwise a folder of links to only the pip headers that the toolkit lacks, so the runtime comes
    from the toolkit.  A runtime of another release with no toolkit runtime to use instead, or another major
    release at all, is a BuildError naming both versions."""
    pip = pip_cuda_include()
    if pip is None:
        return []
    nvcc = nvcc_version(cuda_home)
    pip_version = runtime_header_version(pip)
    if pip_version == nvcc:
        return [str(pip)]
    toolkit = Path(cuda_home, "include")
    if runtime_header_version(toolkit) is None:
        raise _header_mismatch(nvcc, pip_version, pip, cuda_home)
    if pip_version is not None and pip_version[0] != nvcc[0]:
        raise BuildError(
            f"nvcc {_version_text(nvcc)} (in {cuda_home}) is another major CUDA release than torch "
            f"{torch.__version__} (CUDA {_version_text(pip_version)}): its extension would not load.  Fix: install "
            f"a CUDA {pip_version[0]}.x toolkit and point CUDA_HOME at it, or the torch build for CUDA "
            f"{_version_text(nvcc)}."
        )
    lacking = sorted(entry.name for entry in pip.iterdir() if not (toolkit / entry.name).exists())
    if shim_dir.exists():
        shutil.rmtree(shim_dir)
    shim_dir.mkdir(parents=True)
    for name in lacking:
        (shim_dir / name).symlink_to(pip / name)
    return [str(shim_dir)] if lacking else []


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
    cpp_extension = _cpp_extension()
    src = source_dir()
    build_dir = cache_dir(name)
    jobs = _max_jobs()
    built = [p.stat().st_mtime for p in build_dir.glob("*.so")]
    # the sources and every header they may include (csrc/*.h, device-agnostic, beside each device's own)
    watched = list(sources) + [p for p in src.rglob("*") if p.suffix in (".h", ".cuh")]
    if not built or max(Path(f).stat().st_mtime for f in watched) > max(built):
        print(
            f"marginops: compiling {name} (first use, MAX_JOBS={jobs}) in {build_dir} ...", file=sys.stderr, flush=True
        )
    include = [str(src)]
    environ = {"MAX_JOBS": jobs}
    torch_cuda_home = cpp_extension.CUDA_HOME
    if cuda:
        cuda_home = _cuda_home()
        include += cuda_include_paths(cuda_home, build_dir / "pip_cuda_headers")
        environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
        cpp_extension.CUDA_HOME = cuda_home  # where torch's builder finds nvcc and the toolkit's headers
    kwargs = dict(
        name=name,
        sources=sources,
        extra_include_paths=include,
        # torch's own headers pick the C++ standard (C++20 for torch 2.14); OpenMP for at::parallel_for
        extra_cflags=["-O3"] + _openmp_flags(),
        extra_ldflags=_openmp_flags(),
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    if cuda:
        kwargs["extra_cuda_cflags"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    try:
        with _scoped_environ(**environ):
            cpp_extension.load(**kwargs)
    except Exception as exc:  # the compiler output is already on stderr
        hint = ""
        if cuda:
            pip = pip_cuda_include()
            hint = (
                f" (nvcc {_version_text(nvcc_version(cuda_home))} in {cuda_home}; torch {torch.__version__} built "
                f"for CUDA {torch.version.cuda}" + (f", its headers in {pip}" if pip else "") + ")"
            )
        raise BuildError(f"building {name} failed{hint}: {exc}") from exc
    finally:
        cpp_extension.CUDA_HOME = torch_cuda_home
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


_failures: dict[str, tuple[tuple, str]] = {}


def _toolchain_fingerprint() -> tuple:
    """What a fixed toolchain changes: a failed build is retried when any of it differs."""
    keys = ("PATH", "CXX", "CC", "CUDA_HOME", "CUDA_PATH", "MARGINOPS_CACHE_DIR", "MARGINOPS_CUDA_ARCHS")
    return tuple(os.environ.get(key) for key in keys)


def build_failure(kind: str) -> Optional[str]:
    """Load the "cpu" or "cuda" extension; None on success, else why it failed.  A failure is remembered while
    the toolchain's environment stays the same, so a broken toolchain costs one attempt, not one per call,
    and a fixed one (another PATH, CXX or CUDA_HOME) is tried again."""
    fingerprint = _toolchain_fingerprint()
    remembered = _failures.get(kind)
    if remembered is not None and remembered[0] == fingerprint:
        return remembered[1] or None
    try:
        (load_cuda if kind == "cuda" else load_cpu)()
    except BuildError as exc:
        _failures[kind] = (fingerprint, str(exc))
        return str(exc)
    _failures[kind] = (fingerprint, "")
    return None
