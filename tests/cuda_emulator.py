"""Build and load the CPU emulator of the CUDA kernels (tests/cuda_emu), for the op-level suite's "cuda_emu"
adapter (tests/op_backends.py).

The real csrc/cuda sources (kernels, launchers and the op layer in fused_lse_cuda.cpp) are compiled with the host
compiler against the small emulated CUDA runtime in tests/cuda_emu/include: every CUDA thread is a host thread,
barriers, shuffles, cp.async and WMMA are emulated (see tests/cuda_emu/include/cuda_runtime.h for what it checks).
It is slow and meant for small shapes; it runs the CUDA code paths where no GPU exists.
"""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent / "cuda_emu"
REPO = HERE.parent.parent
_module = None
SOURCES = ("runtime.cpp", "paths_16bit.cpp", "paths_32bit.cpp", "chunked.cpp", "selftest.cpp", "ops.cpp")


def build_dir(sanitize) -> Path:
    root = os.environ.get("MARGINOPS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "marginops"
    )
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}"
    path = Path(root) / tag / ("cuda_emulator" + (f"_{sanitize}" if sanitize else ""))
    path.mkdir(parents=True, exist_ok=True)
    return path


def load(sanitize=None, verbose: bool = False):
    """The emulator module (fused_lse / fused_lse_backward on CPU tensors); compiled on first use (~1 min).
    sanitize="address" / "thread" builds it with that sanitizer (the process must preload its runtime)."""
    global _module
    if _module is not None:
        return _module
    from torch.utils import cpp_extension

    flags = ["-O2", "-pthread", "-fno-strict-aliasing"]
    if sanitize:
        # -O1 as the sanitizers' documentation suggests: a third less compile time, and the runs are small; -g1 (line
        # tables) gives the reports their file:line at ~2/3 of -g's compile time (ops.cpp, with torch's headers)
        flags = ["-O1", "-pthread", "-fno-strict-aliasing", f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g1"]
    os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, 4))))
    _module = cpp_extension.load(
        name="marginops_cuda_emulator" + (f"_{sanitize}" if sanitize else ""),
        sources=[str(HERE / f) for f in SOURCES],
        extra_include_paths=[str(HERE / "include"), str(REPO / "csrc" / "cuda"), str(REPO / "csrc")],
        extra_cflags=flags,
        extra_ldflags=["-pthread"] + ([f"-fsanitize={sanitize}"] if sanitize else []),
        build_directory=str(build_dir(sanitize)),
        verbose=verbose,
    )
    return _module


class EmulatedOps:
    """Stands in for torch.ops.marginops in the op-level test bodies (tests/op_cases.py): same call signatures,
    CPU tensors in and out, executed by the CUDA kernels under the emulator."""

    def __init__(self, module):
        self._m = module

    def fused_lse(self, *args):
        return self._m.fused_lse(*args)

    def fused_lse_backward(self, *args):
        return self._m.fused_lse_backward(*args)


class EmulatedChunkedOps(EmulatedOps):
    """The same for the class-chunked path: the chunk loop (csrc/chunk_loop.h) on CPU tensors with ATen's CPU
    matrix products, its CUDA epilogue kernels (csrc/cuda/chunk_epilogue.cuh) under the emulator."""

    def fused_lse(self, *args):
        return self._m.fused_lse_chunked(*args)

    def fused_lse_backward(self, *args):
        return self._m.fused_lse_backward_chunked(*args)

    def gemm_flops(self):
        return self._m.chunked_gemm_flops()

    def launches(self):
        """Kernel launches the emulator has run so far (every path's)."""
        return self._m.launch_count()


# sanitizer: (runtime library, environment, what a finding means)
SANITIZERS = {
    "address": ("libasan.so", {"ASAN_OPTIONS": "detect_leaks=0:exitcode=86"}, "out-of-bounds access"),
    "thread": ("libtsan.so", {"TSAN_OPTIONS": "exitcode=66"}, "data race (a missing barrier)"),
}


def _runtime_library(name):
    try:
        out = subprocess.run(["c++", f"-print-file-name={name}"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(out.stdout.strip())
    return str(path) if path.is_absolute() and path.exists() else None


def run_under_sanitizer(sanitizer, script, *args):
    """Runs tests/cuda_emu/SCRIPT in a child process that preloads the sanitizer's runtime (the emulator built with
    sanitize=SANITIZER cannot be loaded otherwise); returns the finished process."""
    import pytest
    from helpers import child_env, progress

    library, options, _ = SANITIZERS[sanitizer]
    # libstdc++ is preloaded too: python does not link it, and the sanitizer must find it at start-up
    preload = [_runtime_library(library), _runtime_library("libstdc++.so")]
    if None in preload:
        pytest.fail(f"sanitizer runtime not found by c++ -print-file-name: {library} / libstdc++.so")
    env = child_env(LD_PRELOAD=" ".join(preload), **options)
    # minutes of build and run: each line the child prints is shown as it comes, so the run is seen to move
    progress(f"{script} under {sanitizer} sanitizer: building the emulator (first run) and running ...")
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-u", str(HERE / script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    errors = []
    drain = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
    drain.start()
    killer = threading.Timer(1800, proc.kill)
    killer.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            progress(f"{script} ({sanitizer}, {time.monotonic() - started:.0f} s): {line.rstrip()}")
        proc.wait()
    finally:
        killer.cancel()
        drain.join()
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines), "".join(errors))
