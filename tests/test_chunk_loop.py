"""The shared chunk loop's matrix products (csrc/chunk_loop.h, chunked::Products) on their own: whether
aten::addmm.dtype_out takes an fp32 addend is learnt per op call, so a failure never outlives the call that saw it
(it used to flip a process-wide static flag for good on the first exception).

A child process compiles a small extension around the header that registers CPU kernels for aten::mm.dtype_out and
aten::addmm.dtype_out (the CPU has none; registering them in the test process would reach every other CPU test), the
addmm one failing as a torch release that rejects the fp32 addend does, then runs several op calls' products.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import child_env

CSRC = Path(__file__).resolve().parent.parent / "csrc"

_EXTENSION = r"""
#include <torch/library.h>

#include <vector>

#include "chunk_loop.h"

namespace {
int64_t addmm_calls = 0;
int64_t failures_left = 0;

at::Tensor& addmm_dtype(const at::Tensor& self, const at::Tensor& a, const at::Tensor& b, at::ScalarType dtype,
                        const at::Scalar& beta, const at::Scalar& alpha, at::Tensor& out) {
  ++addmm_calls;
  TORCH_CHECK(failures_left-- <= 0, "addmm.dtype_out: the addend must have the operands' dtype (test kernel)");
  TORCH_CHECK(self.is_same(out) && beta.toDouble() == 1 && alpha.toDouble() == 1, "test kernel: out += a @ b only");
  out.addmm_(a.to(dtype), b.to(dtype));
  return out;
}

at::Tensor& mm_dtype(const at::Tensor& a, const at::Tensor& b, at::ScalarType dtype, at::Tensor& out) {
  at::mm_out(out, a.to(dtype), b.to(dtype));
  return out;
}
}  // namespace

TORCH_LIBRARY_IMPL(aten, CPU, m) {
  m.impl("addmm.dtype_out", addmm_dtype);
  m.impl("mm.dtype_out", mm_dtype);
}

// `calls` op calls, each with its own Products and two accumulations out += a @ b, the first `fail_first`
// addmm.dtype_out calls failing: how many times each op call tried addmm.dtype_out.
std::vector<int64_t> op_calls(int64_t calls, int64_t fail_first, at::Tensor out, const at::Tensor& a,
                              const at::Tensor& b) {
  failures_left = fail_first;
  std::vector<int64_t> tried;
  for (int64_t c = 0; c < calls; ++c) {
    const int64_t before = addmm_calls;
    marginops::chunked::Products gemm;
    gemm(out, a, b, true);
    gemm(out, a, b, true);
    tried.push_back(addmm_calls - before);
  }
  return tried;
}

// an op, not a Python module: no pybind11 or torch/extension.h to compile
TORCH_LIBRARY(marginops_chunk_loop_test, m) { m.def("op_calls", op_calls); }
"""

_CHILD = textwrap.dedent(
    """
    import os
    import sys
    import torch
    from torch.utils import cpp_extension

    source = os.path.join(sys.argv[3], "products.cpp")
    with open(source, "w") as f:
        f.write(sys.argv[1])
    cpp_extension.load(
        name="marginops_chunk_loop_products",
        sources=[source],
        extra_include_paths=[sys.argv[2]],
        extra_cflags=["-O1"],
        build_directory=sys.argv[3],
        is_python_module=False,
    )
    ext = torch.ops.marginops_chunk_loop_test
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, generator=g).bfloat16()
    b = torch.randn(7, 3, generator=g).bfloat16()
    out = torch.zeros(5, 3)
    print("tried", ext.op_calls(3, 1, out, a, b))
    # products of bf16 values are exact in fp32: six accumulations, whichever way each took
    expected = 6 * (a.float() @ b.float())
    print("close", bool(torch.allclose(out, expected, rtol=1e-6, atol=1e-6)))
    """
)


@pytest.mark.slow
def test_a_failed_addmm_dtype_out_lasts_one_op_call(tmp_path):
    build = tmp_path / "build"
    build.mkdir()
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, _EXTENSION, str(CSRC), str(build)],
        env=child_env(MAX_JOBS="1"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert child.returncode == 0, child.stderr[-4000:]
    # the first call: one try (it fails, the call's second accumulation goes through mm.dtype_out and an add);
    # the later calls try again and use it for both accumulations
    assert "tried [1, 2, 2]" in child.stdout, child.stdout
    assert "close True" in child.stdout, child.stdout
