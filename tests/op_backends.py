"""The backends the op-level suite (tests/test_op_suite.py) runs against, one adapter each.

An adapter says how to get the op (an object with ``fused_lse`` / ``fused_lse_backward`` taking the op's
arguments, marginops/ops.py), on which device its tensors live, what it supports (dtypes, whether
``deterministic=False`` takes another code path, whether its entry point checks arguments, its switches), the
docs/DESIGN.md §4 slack of its 16-bit paths, and the problem sizes it runs at (the CPU emulator and the Triton
interpreter are 1000× slower than the C++ kernels, so they get smaller classes counts; every size keeps the
feature it is named for: partial tiles, many class splits, several feature chunks, …).  A test asks the
adapter; what a backend does not support is skipped with the reason the adapter gives, never passed silently.

Adding a backend (e.g. the chunked CUDA path) is one ``OpBackend(...)`` entry in ``BACKENDS``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import pytest
import torch
from op_cases import F32_SLACK, F32_SLACK_CPU, LOW_SLACK_CPU, LOW_SLACK_CUDA, LOW_SLACK_TRITON_GPU

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
LOW = (BF16, F16)


class _Ops:
    """Two functions with the op's signatures (for backends that are not torch.ops.marginops)."""

    def __init__(self, forward, backward):
        self.fused_lse, self.fused_lse_backward = forward, backward


@dataclass(frozen=True)
class OpBackend:
    name: str
    device: str
    load: Callable[[], Any]  # -> the op (first use may compile)
    dtypes: tuple  # x / weight dtypes the kernels take
    # mixed precision: the 16-bit x dtypes it takes with a float32 weight (products in x's dtype, dW in float32)
    mixed_dtypes: tuple = ()
    unavailable: Callable[[], Optional[str]] = lambda: None  # why it cannot run here (-> skip), else None
    marks: tuple = ()
    # deterministic=False takes another code path (float atomics): results close, not bitwise equal
    atomic_path: bool = False
    # the kernels' entry point checks its arguments (Triton's launchers rely on marginops/_validation.py)
    checks_arguments: bool = True
    # it also rejects a non-contiguous weight and more than 64 subcenters (the CPU kernels take any layout, any k)
    checks_layout: bool = False
    f32_slack: float = F32_SLACK  # docs/DESIGN.md §4 slack of the float32 path (op_cases.py says why)
    low_slack: Optional[float] = None  # docs/DESIGN.md §4 slack of the bf16 / fp16 paths (op_cases.py says why)
    # switches: each a function(monkeypatch) that turns it on for the rest of the test, or why there is none
    tf32: Union[Callable, str] = "no TF32 switch"
    fast_backward: Union[Callable, str] = "no fast-backward switch"  # one fp16 rounding of the gradient operand
    fast_backward_dtypes: tuple = ()
    # sizes: Case keyword arguments (plus "env": {variable: value}, "deterministic": bool; a precision case may
    # also name the "dtypes" it runs in, by default float32, bf16 and fp16 where the backend takes them) by name
    grid_shapes: dict = field(default_factory=dict)  # the full float64 feature grid runs on each
    float64_shapes: dict = field(default_factory=dict)  # one feature mix each (curricular, filter, …)
    precision_cases: dict = field(default_factory=dict)  # float32 / bf16 / fp16 under the docs/DESIGN.md §4 rule
    sizes: dict = field(default_factory=dict)  # single-purpose cases, by test (see DEFAULT_SIZES)
    extra_tiny_shapes: tuple = ()
    # 2^31 offsets through class_index: None if it runs, else why not
    big_offsets_skip: Optional[str] = None
    bad_input_dtypes: tuple = (F32, torch.int32, F64)  # case dtype, a rejected one, another accepted one

    def size(self, name):
        return {**DEFAULT_SIZES[name], **self.sizes.get(name, {})}

    def skip_unless(self, dtype=None):
        """Skip (with the reason) if this backend cannot run here or does not take ``dtype``."""
        reason = self.unavailable()
        if reason:
            pytest.skip(reason)
        if dtype is not None and dtype not in self.dtypes:
            pytest.skip(f"{self.name} kernels take {', '.join(str(d)[6:] for d in self.dtypes)} only")

    def skip_unless_mixed(self, dtype):
        """Skip unless this backend runs ``dtype`` x with a float32 weight."""
        self.skip_unless()
        if dtype not in self.mixed_dtypes:
            pytest.skip(f"{self.name}: no mixed precision ({dtype} x with a float32 weight)")


# Single-purpose sizes every backend starts from (a backend overrides what is too slow for it).
DEFAULT_SIZES = {
    "every_mode": dict(B=21, D=40, C=40, k=2, class_index=True, filter_threshold=0.3),
    "zero_rows": dict(C=300),
    "class_index_zero": dict(C=500, k=3),
    "nan": dict(C=1001),
    "deterministic": dict(B=64, D=64, C=30000, non_target=1, filter_threshold=0.2),
    "switches": dict(B=70, D=64, C=900),  # tf32 and the fast backward
    "large_gradient": dict(B=37, D=64, C=200, non_target=1, filter_threshold=0.2),
    "small_norm": dict(B=37, D=64, C=120, non_target=1, filter_threshold=0.2),  # C / k classes with k = 3
    "no_target": dict(B=9, C=50, none_every=1),
    "atomic": dict(C=121, filter_threshold=0.3, class_index=True),
    "offsets": dict(B=8, D=64, C=8, none_every=4),
    "labels": dict(C=200),  # out-of-range labels
}


def _cpu_ops():
    from marginops import _build

    _build.load_cpu()
    return torch.ops.marginops


def _cuda_ops():
    from marginops import _build

    _build.load_cuda()
    return torch.ops.marginops


def _emulated_ops():
    import cuda_emulator

    return cuda_emulator.EmulatedOps(cuda_emulator.load())


def _chunked_emulated_ops():
    import cuda_emulator

    return cuda_emulator.EmulatedChunkedOps(cuda_emulator.load())


def _cuda_fused_ops():
    from marginops import _build

    _build.load_cuda()
    return _Ops(torch.ops.marginops.fused_lse_cuda_fused, torch.ops.marginops.fused_lse_cuda_fused_backward)


def _chunks(**case):
    """A case of the class-chunked path: chunks of 37 classes, tiles of 16 rows (ragged last ones)."""
    return dict(case, env={"MARGINOPS_CHUNK_COLS": "37", "MARGINOPS_CHUNK_ROWS": "16"})


def _triton_ops():
    from marginops import ops

    ops.triton_op()  # registers both triton_ops: the launchers with what marginops passes them (switches, bounds)
    return _Ops(torch.ops.marginops.triton_fused_lse, torch.ops.marginops.triton_fused_lse_backward)


def _hybrid_ops():
    from marginops import ops

    ops.hybrid_op()  # registers both triton_ops
    return _Ops(torch.ops.marginops.hybrid_fused_lse, torch.ops.marginops.hybrid_fused_lse_backward)


def _hybrid_chunks(cols="37", rows="20", **case):
    """A case of the hybrid path crossing chunks and row tiles: chunks of 37 classes (ragged against the
    interpreter's 32-column tiles and the last chunk), row tiles of 20 (a partial 16-row program in each)."""
    return dict(case, env={"MARGINOPS_CHUNK_COLS": cols, "MARGINOPS_CHUNK_ROWS": rows})


def _hybrid_one_tile(cols="37", **case):
    """Chunks of 37 classes and the batch in one row tile: 16-bit inputs take grad_weight through the product with
    the projection in its epilogue (_hybrid_dw_kernel) instead of U and the row pass."""
    return dict(case, env={"MARGINOPS_CHUNK_COLS": cols})


def _cuda_tf32(monkeypatch):
    monkeypatch.setenv("MARGINOPS_CUDA_TF32", "1")  # read by the op at each call


def _cuda_fast_backward(monkeypatch):
    monkeypatch.setenv("MARGINOPS_CUDA_FAST_BWD", "1")


def _triton_tf32(monkeypatch):
    from marginops.ops import triton_kernels

    monkeypatch.setattr(triton_kernels(), "ALLOW_TF32", True)  # read by marginops.ops at each call


def _triton_fast_backward(monkeypatch):
    from marginops.ops import triton_kernels

    monkeypatch.setattr(triton_kernels(), "FAST_GRAD_DOTS", True, raising=False)


def _emu(**case):
    """An emulator case on 2 emulated SMs: few class splits, each looping over many class tiles."""
    return dict(case, env={"MARGINOPS_EMU_SMS": "2"})


# The CUDA kernels' sizes on a GPU; the emulator runs the same features at smaller sizes.
_CUDA_PRECISION = {
    "ragged": dict(),
    "k3_class_index": dict(k=3, class_index=True),
    "curricular_filter": dict(non_target=1, filter_threshold=0.2),
    "many_splits": dict(B=9, D=16, C=20000),
    "row_tiles_vec": dict(B=150, D=64, C=700),
    "d_chunks": dict(B=70, D=600, C=700, non_target=1),
}
_CUDA_FLOAT64_SHAPES = {  # several D chunks (fp64: 300 > one chunk), subcenters 5 and 64
    "d_chunks": dict(B=20, D=300, C=500),
    "k5": dict(B=20, D=300, C=97, k=5, class_index=True),
    "k64": dict(B=11, D=16, C=20, k=64),
}

_TRITON_PRECISION = (  # natively the whole grid is cheap; the interpreter runs two cases, one per code path
    {
        f"{name}_{'det' if det else 'atomic'}": dict(case, B=67, D=128, C=1001, deterministic=det)
        for name, case in (
            ("ragged", dict()),
            ("curricular_filter", dict(non_target=1, filter_threshold=0.3)),
            ("k3_class_index", dict(k=3, class_index=True)),
        )
        for det in (True, False)
    }
    if HAS_CUDA
    else {
        "curricular_filter": dict(C=101, non_target=1, filter_threshold=0.3, dtypes=(F32, BF16)),
        "k3_class_index_atomic": dict(C=41, k=3, class_index=True, deterministic=False, dtypes=(F32, F16)),
    }
)

BACKENDS = [
    OpBackend(
        name="cpu",
        device="cpu",
        load=_cpu_ops,
        dtypes=(F64, F32, BF16, F16),
        mixed_dtypes=(BF16, F16),
        grid_shapes={"ragged": dict(B=37, D=61, C=1001), "many_chunks": dict(B=9, D=16, C=20000)},
        # the shared chunk loop with chunks of 37 classes and tiles of 16 rows (by default one tile of all rows)
        float64_shapes={**_CUDA_FLOAT64_SHAPES, "row_tiles": _chunks(B=37, D=61, C=200, k=2, class_index=True)},
        precision_cases={
            **{k: _CUDA_PRECISION[k] for k in ("ragged", "k3_class_index", "curricular_filter", "many_splits")},
            "row_tiles": _chunks(B=37, D=61, C=300, k=3, class_index=True),
        },
        f32_slack=F32_SLACK_CPU,
        low_slack=LOW_SLACK_CPU,
        bad_input_dtypes=(F64, torch.int32, F32),
    ),
    OpBackend(
        name="triton",
        device="cuda" if HAS_CUDA else "cpu",
        load=_triton_ops,
        dtypes=(F64, F32, BF16, F16),
        mixed_dtypes=(BF16, F16),
        unavailable=lambda: None if HAS_TRITON else "triton is not installed",
        atomic_path=True,
        checks_arguments=False,
        low_slack=LOW_SLACK_TRITON_GPU if HAS_CUDA else LOW_SLACK_CUDA,
        tf32=_triton_tf32 if HAS_CUDA else "the interpreter runs tl.dot in IEEE fp32 whatever the precision",
        fast_backward=_triton_fast_backward,
        fast_backward_dtypes=(F16,),
        # interpreter tiles are 16 rows x 32 classes x 32 features: B=37, D=61, C=30 cross partial row and K tiles
        # in one partial class tile (the interpreter's cost grows with class tiles x subcenters); the shapes
        # below and the atomic / precision cases cross several class tiles
        grid_shapes={"ragged": dict(B=37, D=61, C=30)},
        float64_shapes={
            "k2_even_d_atomic": dict(B=19, D=64, C=40, k=2, deterministic=False),
            "even_d_exact_tiles": dict(B=32, D=64, C=64, non_target=1),
        },
        precision_cases=_TRITON_PRECISION,
        sizes={}
        if HAS_CUDA
        else {
            "every_mode": dict(C=20),
            "zero_rows": dict(C=30),
            "class_index_zero": dict(C=30),
            "nan": dict(B=21, C=40),
            "deterministic": dict(B=37, D=61, C=40, filter_threshold=0.4),
            "switches": dict(B=37, D=64, C=60),
            "small_norm": dict(B=37, D=61, C=60),
            "large_gradient": dict(B=37, D=61, C=101),
            "atomic": dict(C=52),
            "labels": dict(C=50),
        },
        extra_tiny_shapes=((1, 20, 3, 1),),
        big_offsets_skip=None if HAS_CUDA else "a 4.3 GB weight through the interpreter: GPU only",
    ),
    OpBackend(
        # the Triton forward with the hybrid backward (Triton gradient blocks + torch.mm products per class chunk);
        # under the interpreter its products are torch's CPU float32 GEMMs on the 16-bit values
        name="hybrid",
        device="cuda" if HAS_CUDA else "cpu",
        load=_hybrid_ops,
        dtypes=(F64, F32, BF16, F16),
        mixed_dtypes=(BF16, F16),
        unavailable=lambda: None if HAS_TRITON else "triton is not installed",
        checks_arguments=False,
        low_slack=LOW_SLACK_TRITON_GPU if HAS_CUDA else LOW_SLACK_CUDA,
        tf32=_triton_tf32 if HAS_CUDA else "the interpreter runs tl.dot in IEEE fp32 whatever the precision",
        fast_backward=_triton_fast_backward,
        fast_backward_dtypes=(F16,),
        grid_shapes={"ragged": _hybrid_chunks(B=37, D=61, C=60)},
        float64_shapes={
            "one_class_per_chunk": _hybrid_chunks(cols="1", rows="1", B=7, D=33, C=12, k=2),
            "default_plan": dict(B=70, D=64, C=150),
            "k5": _hybrid_chunks(cols="7", B=6, D=300, C=30, k=5, class_index=True),
            "k64": _hybrid_chunks(cols="3", B=4, D=16, C=8, k=64),
        },
        precision_cases={
            "ragged": _hybrid_chunks(B=67, D=128, C=300),
            "k3_class_index": _hybrid_chunks(B=67, D=128, C=300, k=3, class_index=True),
            "curricular_filter": _hybrid_chunks(B=67, D=128, C=1001, non_target=1, filter_threshold=0.3),
            "default_plan": dict(B=67, D=128, C=1001),
            "one_tile_k3_class_index": _hybrid_one_tile(B=67, D=128, C=300, k=3, class_index=True),
        }
        if HAS_CUDA
        else {
            "curricular_filter": _hybrid_chunks(C=101, non_target=1, filter_threshold=0.3),
            "k3_class_index": _hybrid_chunks(C=41, k=3, class_index=True),
            "one_tile_filter": _hybrid_one_tile(B=37, D=61, C=101, non_target=1, filter_threshold=0.3),
            "one_tile_k3_class_index": _hybrid_one_tile(B=37, D=61, C=41, k=3, class_index=True),
        },
        # (zero_rows, small_norm, large_gradient and labels build their Case directly: no "env")
        sizes={}
        if HAS_CUDA
        else {
            "every_mode": _hybrid_chunks(cols="11", C=40),
            "zero_rows": dict(C=30),
            "class_index_zero": _hybrid_chunks(C=30),
            "nan": _hybrid_chunks(B=21, C=40),
            "deterministic": _hybrid_chunks(B=37, D=61, C=40, filter_threshold=0.4),
            "switches": _hybrid_chunks(B=37, D=64, C=60),
            "small_norm": dict(B=37, D=61, C=60),
            "large_gradient": dict(B=37, D=61, C=101),
            "no_target": _hybrid_chunks(),
            "atomic": _hybrid_chunks(C=52),
            "labels": dict(C=50),
        },
        extra_tiny_shapes=((1, 20, 3, 1),),
        big_offsets_skip=None if HAS_CUDA else "a 4.3 GB weight through the interpreter: GPU only",
    ),
    OpBackend(
        name="cuda",
        device="cuda",
        load=_cuda_ops,
        dtypes=(F64, F32, BF16, F16),
        mixed_dtypes=(BF16, F16),  # on the chunked path (its default)
        unavailable=lambda: None if HAS_CUDA else "needs a GPU",
        marks=(pytest.mark.cuda,),
        low_slack=LOW_SLACK_CUDA,
        checks_layout=True,
        tf32=_cuda_tf32,
        fast_backward=_cuda_fast_backward,
        fast_backward_dtypes=(F16,),  # bf16: always one rounding
        grid_shapes={
            "ragged": dict(B=37, D=61, C=1001),
            "many_splits": dict(B=9, D=16, C=20000),
            "row_tiles_vec": dict(B=150, D=64, C=700),
        },
        float64_shapes=_CUDA_FLOAT64_SHAPES,
        precision_cases=_CUDA_PRECISION,
        sizes={"deterministic": dict(B=150)},
        extra_tiny_shapes=((65, 8, 3, 1),),  # more rows than one row tile
    ),
    OpBackend(
        # the fused CUDA kernels (backend="cuda_fused"; "cuda" above runs the class-chunked path by default)
        name="cuda_fused",
        device="cuda",
        load=_cuda_fused_ops,
        dtypes=(F64, F32, BF16, F16),
        unavailable=lambda: None if HAS_CUDA else "needs a GPU",
        marks=(pytest.mark.cuda,),
        low_slack=LOW_SLACK_CUDA,
        checks_layout=True,
        tf32=_cuda_tf32,
        fast_backward=_cuda_fast_backward,
        fast_backward_dtypes=(F16,),
        grid_shapes={
            "ragged": dict(B=37, D=61, C=1001),
            "many_splits": dict(B=9, D=16, C=20000),
            "row_tiles_vec": dict(B=150, D=64, C=700),
        },
        float64_shapes=_CUDA_FLOAT64_SHAPES,
        precision_cases=_CUDA_PRECISION,
        sizes={"deterministic": dict(B=150)},
        extra_tiny_shapes=((65, 8, 3, 1),),
    ),
    OpBackend(
        # the class-chunked CUDA path (the default of fused_lse on CUDA tensors): the chunk loop on CPU tensors,
        # its CUDA epilogue kernels under the emulator
        name="cuda_chunked_emu",
        device="cpu",
        load=_chunked_emulated_ops,
        dtypes=(F64, F32, BF16, F16),
        mixed_dtypes=(BF16, F16),
        marks=(pytest.mark.emulator,),
        low_slack=LOW_SLACK_CUDA,
        # fp16: one rounding of the gradient block instead of hi + lo (bf16 always rounds once)
        fast_backward=_cuda_fast_backward,
        fast_backward_dtypes=(F16,),
        grid_shapes={"ragged": _chunks(B=37, D=61, C=200)},
        float64_shapes={
            "one_class_per_chunk": dict(
                B=7, D=33, C=30, k=2, env={"MARGINOPS_CHUNK_COLS": "1", "MARGINOPS_CHUNK_ROWS": "1"}
            ),
            "default_plan": dict(B=70, D=64, C=150),
            "k5": _chunks(B=6, D=300, C=30, k=5, class_index=True),
            "k64": _chunks(B=4, D=16, C=8, k=64),
        },
        precision_cases={
            "ragged": _chunks(B=37, D=61, C=300),
            "k3_class_index": _chunks(B=37, D=61, C=300, k=3, class_index=True),
            "curricular_filter": _chunks(B=37, D=61, C=300, non_target=1, filter_threshold=0.2),
            "many_classes": dict(B=9, D=16, C=3000, env={"MARGINOPS_CHUNK_COLS": "512"}),
            "b64_d128": dict(B=64, D=128, C=1000, env={"MARGINOPS_CHUNK_COLS": "300", "MARGINOPS_CHUNK_ROWS": "40"}),
            "wide_d": _chunks(B=5, D=600, C=40, non_target=1),
        },
        # (large_gradient, small_norm and zero_rows build their Case directly: no "env"; tests/test_chunked.py
        # runs them with small chunks)
        sizes={
            "every_mode": _chunks(),
            "zero_rows": dict(C=300),
            "class_index_zero": _chunks(C=200),
            "nan": _chunks(C=300),
            "deterministic": _chunks(B=37, D=64, C=200),  # three row tiles, a ragged last one
            "no_target": _chunks(),
            "atomic": _chunks(),
        },
        extra_tiny_shapes=((65, 8, 3, 1),),
    ),
    OpBackend(
        name="cuda_emu",
        device="cpu",
        load=_emulated_ops,
        dtypes=(F64, F32, BF16, F16),
        marks=(pytest.mark.emulator,),
        low_slack=LOW_SLACK_CUDA,
        checks_layout=True,
        tf32=_cuda_tf32,
        fast_backward=_cuda_fast_backward,
        fast_backward_dtypes=(F16,),
        grid_shapes={"ragged": dict(B=37, D=61, C=200)},
        float64_shapes={
            "row_tiles_vec": dict(B=70, D=64, C=150),
            "tiles_per_split": _emu(B=9, D=16, C=3000),
            "d_chunks": dict(B=5, D=300, C=40),
            "k5": dict(B=6, D=300, C=30, k=5, class_index=True),
            "k64": dict(B=4, D=16, C=8, k=64),
        },
        precision_cases={
            "ragged": _emu(B=37, D=61, C=300),
            "k3_class_index": _emu(B=37, D=61, C=300, k=3, class_index=True),
            "curricular_filter": _emu(B=37, D=61, C=300, non_target=1, filter_threshold=0.2),
            "tiles_per_split": _emu(B=9, D=16, C=3000),
            "row_tiles_vec": _emu(B=70, D=64, C=150),
            "d_chunks": _emu(B=5, D=600, C=40, non_target=1),
        },
        sizes={
            "zero_rows": dict(C=300),
            "class_index_zero": dict(C=200),
            "nan": dict(C=300),
            "deterministic": _emu(B=70, D=64, C=200),
            "switches": dict(B=37, D=64, C=200),
        },
        extra_tiny_shapes=((65, 8, 3, 1),),
    ),
]
BY_NAME = {b.name: b for b in BACKENDS}


def params(cases: Callable[[OpBackend], list] = lambda b: [(None, ())]):
    """pytest parameters (backend, *values) with ids "backend-case_id": ``cases(backend)`` lists that backend's
    (case_id or None, values tuple) pairs; the backend's marks go on each of its parameters."""
    return [
        pytest.param(b, *values, id=b.name + (f"-{case_id}" if case_id else ""), marks=b.marks)
        for b in BACKENDS
        for case_id, values in cases(b)
    ]
