"""``python memcheck_chunked.py``, run by tests/test_chunked.py in a child process that preloads AddressSanitizer:
the emulator built with -fsanitize=address runs the class-chunked path (chunk loop + csrc/cuda/chunk_epilogue.cuh)
forward + backward in every dtype, with subcenters, class_index, ragged chunks and row tiles, and the frozen-part
variants of the backward; any access outside a buffer is reported (the emulator's compute-sanitizer memcheck)."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cuda_emulator  # noqa: E402
from op_cases import Case, run_op  # noqa: E402

ops = cuda_emulator.EmulatedChunkedOps(cuda_emulator.load(sanitize="address"))
os.environ["MARGINOPS_CHUNK_ROWS"] = "16"
for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
    for cols, config in (
        ("37", dict(B=37, D=61, C=101, k=3, class_index=True, non_target=1, filter_threshold=0.2)),
        ("37", dict(B=70, D=64, C=90)),
        ("37", dict(B=3, D=8, C=5)),
        # the epilogues' 16-byte loop over 2 column splits, then a last chunk of 76 classes (16-byte for the fp32
        # block, one column at a time for an fp16 gradient block), partial row blocks
        ("512", dict(B=37, D=16, C=1100, class_index=True)),
    ):
        # torch's CPU allocator gives each tensor its own exact-size malloc: ASan's redzones border every one
        os.environ["MARGINOPS_CHUNK_COLS"] = cols
        print(f"{dtype} {cols} {config}", flush=True)
        case = Case(**config).on(dtype)
        outs = run_op(ops, case)
        assert all(o.numel() == 0 or bool(torch.isfinite(o.double()).all()) for o in outs), (dtype, config)
        lse = outs[0].to(case.target_logit.dtype)
        for need in ((False, True), (True, False)):
            ops.fused_lse_backward(case.grad, lse, *case.args(), True, *need)
print("memcheck: clean")
