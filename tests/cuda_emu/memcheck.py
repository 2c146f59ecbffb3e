"""``python memcheck.py address|thread``, run by tests/test_op_backend_specific.py in a child process that preloads the
sanitizer's runtime: the emulator built with -fsanitize=<that> runs forward + backward cases covering every kernel
path, the scalar and the 16-byte load paths, subcenters, class_index and partial tiles.
  address: any access outside x, weight, labels, the per-row inputs, the outputs, the workspaces or the requested
           dynamic shared memory is reported (the emulator's compute-sanitizer --tool memcheck).
  thread:  two threads touching the same shared-memory bytes, one of them writing, with no barrier between them
           is reported (the emulator's racecheck)."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cuda_emulator  # noqa: E402
from op_cases import Case, run_op  # noqa: E402

ops = cuda_emulator.EmulatedOps(cuda_emulator.load(sanitize=sys.argv[1] if len(sys.argv) > 1 else "address"))
for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
    for config in (
        dict(B=37, D=61, C=101, k=3, class_index=True, non_target=1, filter_threshold=0.2),
        dict(B=70, D=64, C=90),
        dict(B=3, D=8, C=5),
    ):
        # torch's CPU allocator gives each tensor its own exact-size malloc: ASan's redzones border every one
        print(f"{dtype} {config}", flush=True)
        case = Case(**config).on(dtype)
        outs = run_op(ops, case)
        assert all(o.numel() == 0 or bool(torch.isfinite(o.double()).all()) for o in outs), (dtype, config)
print("memcheck: clean")
