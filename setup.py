"""Pure-Python install by default: the C++/CUDA sources ship as package data (marginops/_csrc) and
compile on first use.  MARGINOPS_BUILD_EXT=1 builds them now instead (needs torch importable, so
install with --no-build-isolation); MARGINOPS_BUILD_CUDA=1 adds the CUDA kernels."""

import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

# the package's switchboard (stdlib only), loaded by path: setup.py runs before marginops is importable
_spec = importlib.util.spec_from_file_location("_marginops_config", os.path.join("marginops", "config.py"))
config = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = config  # dataclasses look their module up while the class is built
_spec.loader.exec_module(config)

# csrc/ ships as data of the (import-less) packages marginops._csrc[.cpu|.cuda], compiled on first use
CSRC_PACKAGES = ["marginops._csrc", "marginops._csrc.cpu", "marginops._csrc.cuda"]
PACKAGES = find_packages(include=["marginops", "marginops.*"]) + CSRC_PACKAGES + ["marginops.triton_kernels"]
PACKAGE_DIR = {"marginops._csrc": "csrc", "marginops.triton_kernels": "triton_kernels"}
PACKAGE_DATA = {name: ["*.cpp", "*.h", "*.cu", "*.cuh"] for name in CSRC_PACKAGES}
PACKAGE_DATA["marginops"] = ["path_ranking.json"]  # what backend="auto" picks on CUDA (bench/gpu_model.py)


def extensions():
    if not config.flag("MARGINOPS_BUILD_EXT"):
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    include = [os.path.abspath("csrc")]
    exts = [
        CppExtension(
            "marginops._C",
            ["csrc/marginops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp")),
            include_dirs=include,
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ]
    if config.flag("MARGINOPS_BUILD_CUDA"):
        exts.append(
            CUDAExtension(
                "marginops._C_cuda",
                sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")),
                include_dirs=include,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]},
            )
        )
    return exts, {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extensions()
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
