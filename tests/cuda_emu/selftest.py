"""``python selftest.py address|thread KERNEL``, run by tests/test_op_backend_specific.py in a child process that
preloads the sanitizer's runtime: one deliberately broken kernel of tests/cuda_emu/selftest.cpp under the emulator
built with that sanitizer, which must report it (a read past a buffer, a shared-memory race)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cuda_emulator  # noqa: E402

module = cuda_emulator.load(sanitize=sys.argv[1])
print("selftest: returned", module.selftest(sys.argv[2]))
