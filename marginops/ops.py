"""The fused op: registration (fake impls, autograd) and backend dispatch.

Contract of ``fused_lse`` (every backend: csrc/cpu, csrc/cuda, triton_kernels; oracle:
``marginops.reference.fused_lse``)::

    x (B, D) normalized embeddings; weight (R, D) raw class weights, R = C·k (k = subcenters)
    column j is class cls(j) = class_index[j] (or j); n_r = max(‖weight[r]‖, 1e-12)
    c_ij = max over the k rows r of cls(j) of x_i·weight[r]/n_r
    z_ij = target_logit[i]                           if j == labels[i]  (labels[i] = -1: no target)
         = 0                                         if c_ij > filter_threshold (filtered)
         = row_scale[i]·c_ij·(t + c_ij)              if non_target == 1 and c_ij > threshold[i]
                                                     (t = non_target_param, a one-element tensor)
         = row_scale[i]·c_ij                         otherwise
    lse_i = log Σ_j exp(z_ij)      argmax_i = argmax_j c_ij (raw cosine)

Backward returns gradients for x, weight, target_logit and row_scale; the target column's gradient
reaches the margin through target_logit, i.e. through the autograd graph of the pre-pass.

Dtypes: x and weight in one dtype, or mixed precision: x bf16 / fp16 with a float32 weight.  The matrix products
run in x's dtype (weight rows rounded to it as they are used, never as a copy of all of W), norms and every other
step in float32; grad_x comes back in x's dtype, grad_weight in float32.  target_logit, row_scale, threshold, lse
and their gradients are in the accumulation dtype (float64 for float64 inputs, else float32).
"""

from __future__ import annotations

import functools
import inspect
import typing
import warnings
from typing import Optional

import torch

from . import _build, config, path_ranking
from .capabilities import BACKENDS, triton_usable  # noqa: F401  (re-exported for callers that read them here)
from .non_target import non_target_max_abs_dphi

# "cuda": the class-chunked path (cuBLAS products + one epilogue kernel per chunk; MARGINOPS_CUDA_PATH=fused, read
# once per op call, switches it to the fused kernels); "cuda_fused": the fused CUDA kernels whatever the environment;
# "hybrid": the Triton forward, a backward of Triton gradient blocks and cuBLAS products (triton_kernels/hybrid_*.py).
# "auto" on CUDA takes the fastest of these by the committed ranking (marginops/path_ranking.py).


# The forward op's arguments by schema name (csrc/marginops.cpp's TORCH_LIBRARY schema; the Triton launchers and the
# reference take the same names).  Everything that crosses the op boundary goes by these names, never by position,
# so an argument added to the schema cannot land in another parameter (_check_schema_names holds them equal).
OP_ARGUMENTS = (
    "x",
    "weight",
    "labels",
    "target_logit",
    "row_scale",
    "threshold",
    "class_index",
    "non_target_param",
    "non_target",
    "filter_threshold",
    "subcenters",
    "deterministic",
    "switches",
)
# the tensors the backward needs besides the forward's output lse; the rest of OP_ARGUMENTS are plain parameters
_SAVED = ("x", "weight", "labels", "target_logit", "row_scale", "threshold", "class_index")
# the inputs the backward returns a gradient for (the others get None)
_DIFFERENTIABLE = ("x", "weight", "target_logit", "row_scale")


def _check_schema_names(op) -> None:
    """The registered schema's argument names are OP_ARGUMENTS (forward) or grad_lse, lse, OP_ARGUMENTS with the
    need-grad flags before the switches (backward): a schema changed on one side of the boundary fails here."""
    names = tuple(a.name for a in op.default._schema.arguments)
    backward = ("grad_lse", "lse", *OP_ARGUMENTS[:-1], "need_grad_x", "need_grad_weight", OP_ARGUMENTS[-1])
    if names not in (OP_ARGUMENTS, backward):
        raise RuntimeError(f"marginops: {op.default._schema} does not take marginops.ops.OP_ARGUMENTS by name")


def _setup_context(ctx, inputs, output):
    named = dict(zip(OP_ARGUMENTS, inputs))
    lse, _ = output
    ctx.save_for_backward(*(named[name] for name in _SAVED), lse)
    # the plain parameters, the switches the forward ran with among them: the backward must not read them again
    ctx.params = {name: value for name, value in named.items() if name not in _SAVED}


def _double_backward_message(backend: str) -> str:
    return (
        f"marginops: the fused op's backward (backend={backend!r}) is not differentiable, so higher-order gradients "
        "(torch.autograd.grad(..., create_graph=True) followed by a backward through the result, e.g. a gradient "
        "penalty) would be wrong; use backend='reference' (plain PyTorch, twice differentiable) for them"
    )


def _once_differentiable(grads: tuple, message: str) -> tuple:
    """``grads`` behind a node that raises ``message`` when a second backward reaches it (as
    torch.autograd.function.once_differentiable does, but also when only the saved inputs, not the
    incoming gradient, require grad: a gradient penalty's case)."""
    present = [g for g in grads if g is not None]
    err_fn = torch._C._functions.DelayedError(message.encode(), len(present))

    def leaf(g):
        g = g.detach()
        g.requires_grad_(True)
        return g

    wrapped = iter(err_fn(*[leaf(g) for g in present]))
    return tuple(None if g is None else next(wrapped) for g in grads)


def _make_backward(backward_op, backend: str):
    """The op's autograd backward; backend "cpp" (the C++ op: "cpu" or "cuda" by the tensors' device), "triton" or
    "hybrid"."""

    def backward(ctx, grad_lse, _grad_argmax):
        *saved, lse = ctx.saved_tensors
        inputs = dict(zip(_SAVED, saved), **ctx.params)
        x = inputs["x"]
        if grad_lse is None:
            grad_lse = torch.zeros_like(lse)
        # create_graph=True runs this with grad mode on: the kernels' gradients are not differentiable, so
        # anything that differentiates them again must fail loudly rather than miss their contribution
        higher_order = (
            torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and any(t is not None and t.requires_grad for t in (grad_lse, *(inputs[n] for n in _DIFFERENTIABLE)))
        )
        # a gradient nobody wants (frozen weight, embeddings without requires_grad) is not formed: the kernels
        # return it empty, without its matrix product or its C x D / B x D allocation
        needs = dict(zip(OP_ARGUMENTS, ctx.needs_input_grad))
        need_x, need_weight = needs["x"], needs["weight"]
        with torch.no_grad():
            grads = backward_op(
                grad_lse=grad_lse.contiguous(), lse=lse, **inputs, need_grad_x=need_x, need_grad_weight=need_weight
            )
        if higher_order:
            grads = _once_differentiable(
                tuple(grads), _double_backward_message(x.device.type if backend == "cpp" else backend)
            )
        # the backward op returns its gradients in _DIFFERENTIABLE's order
        returned = dict(zip(_DIFFERENTIABLE, grads))
        returned["x"] = returned["x"] if need_x else None
        returned["weight"] = returned["weight"] if need_weight else None
        return tuple(returned.get(name) for name in OP_ARGUMENTS)

    return backward


def _check_op_shapes(x, weight, labels, target_logit, row_scale, threshold, class_index, subcenters) -> None:
    """What the kernels assume of their inputs, checked while tracing too (fake tensors, symbolic sizes)."""
    torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "fused_lse: x and weight must be 2-D")
    torch._check(weight.shape[1] == x.shape[1], lambda: "fused_lse: x and weight differ in feature size")
    for name, t in (
        ("labels", labels),
        ("target_logit", target_logit),
        ("row_scale", row_scale),
        ("threshold", threshold),
    ):
        torch._check(t.dim() == 1 and t.shape[0] == x.shape[0], lambda name=name: f"fused_lse: {name} must be (B,)")
    torch._check(subcenters >= 1, lambda: "fused_lse: subcenters must be >= 1")
    torch._check(weight.shape[0] % subcenters == 0, lambda: "fused_lse: weight rows not a multiple of subcenters")
    if class_index is not None:
        torch._check(class_index.dim() == 1, lambda: "fused_lse: class_index must be 1-D")


def _fake_forward(
    x,
    weight,
    labels,
    target_logit,
    row_scale,
    threshold,
    class_index,
    non_target_param,
    non_target,
    filter_threshold,
    subcenters,
    deterministic,
    switches=-1,
):
    _check_op_shapes(x, weight, labels, target_logit, row_scale, threshold, class_index, subcenters)
    torch._check(non_target_param.numel() == 1, lambda: "fused_lse: non_target_param must have one element")
    rows = x.shape[0]
    return target_logit.new_empty(rows), labels.new_empty(rows, dtype=torch.long)


def _fake_backward(
    grad_lse,
    lse,
    x,
    weight,
    labels,
    target_logit,
    row_scale,
    threshold,
    class_index,
    non_target_param,
    non_target,
    filter_threshold,
    subcenters,
    deterministic,
    need_grad_x=True,
    need_grad_weight=True,
    switches=-1,
):
    _check_op_shapes(x, weight, labels, target_logit, row_scale, threshold, class_index, subcenters)
    torch._check(
        grad_lse.shape == lse.shape == labels.shape, lambda: "fused_lse_backward: grad_lse and lse must be (B,)"
    )
    return (
        torch.empty_like(x) if need_grad_x else x.new_empty(0),
        torch.empty_like(weight) if need_grad_weight else weight.new_empty(0),
        torch.empty_like(target_logit),
        torch.empty_like(row_scale),
    )


_registered: set = set()


def _register_cpp_op() -> None:
    """Fake impls and autograd for the C++ op; once, after the extension defined the schema."""
    if "cpp" in _registered:
        return
    for op in (
        torch.ops.marginops.fused_lse,
        torch.ops.marginops.fused_lse_backward,
        torch.ops.marginops.fused_lse_cuda_fused,
        torch.ops.marginops.fused_lse_cuda_fused_backward,
    ):
        _check_schema_names(op)
    torch.library.register_fake("marginops::fused_lse")(_fake_forward)
    torch.library.register_fake("marginops::fused_lse_backward")(_fake_backward)
    torch.library.register_autograd(
        "marginops::fused_lse",
        _make_backward(torch.ops.marginops.fused_lse_backward, "cpp"),
        setup_context=_setup_context,
    )
    # the fused CUDA kernels under their own name (backend="cuda_fused"), same schemas
    torch.library.register_fake("marginops::fused_lse_cuda_fused")(_fake_forward)
    torch.library.register_fake("marginops::fused_lse_cuda_fused_backward")(_fake_backward)
    torch.library.register_autograd(
        "marginops::fused_lse_cuda_fused",
        _make_backward(torch.ops.marginops.fused_lse_cuda_fused_backward, "cpp"),
        setup_context=_setup_context,
    )
    _registered.add("cpp")


# torch.compile runs these at trace time and keeps the result as a constant, so that building,
# loading and registering never end up inside a graph.
@torch.compiler.assume_constant_result
def _ensure_cpp_op(kind: str) -> bool:
    (_build.load_cuda if kind == "cuda" else _build.load_cpu)()
    _register_cpp_op()
    return True


def cpp_op(kind: str):
    """torch.ops.marginops.fused_lse with the "cpu" or "cuda" kernels loaded (raises BuildError)."""
    _ensure_cpp_op(kind)
    return torch.ops.marginops.fused_lse


def triton_kernels():
    """marginops.triton_kernels, also from a source checkout where triton_kernels/ sits beside marginops/."""
    try:
        from . import triton_kernels as module
    except ImportError:
        import importlib.util
        import sys
        from pathlib import Path

        root = Path(__file__).resolve().parent.parent / "triton_kernels"
        if not (root / "__init__.py").is_file():
            raise
        spec = importlib.util.spec_from_file_location(
            "marginops.triton_kernels", root / "__init__.py", submodule_search_locations=[str(root)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["marginops.triton_kernels"] = module
        spec.loader.exec_module(module)
    return module


# The Triton launchers with what they need from marginops, as the ops' implementations: the switches (read now for
# -1; the forward's, carried by autograd, for a backward), the non-target mode's max |dphi/dc| and the hybrid plan's
# chunk sizes.  triton_kernels imports nothing from marginops (tests/test_layout.py).
def _schema_signature(launcher) -> inspect.Signature:
    """The launcher's signature without its keyword-only arguments (those marginops passes besides the schema's),
    with its annotations resolved: what torch.library infers the op's schema from."""
    hints = typing.get_type_hints(launcher)
    signature = inspect.signature(launcher)
    schema = [p.replace(annotation=hints[p.name]) for p in signature.parameters.values() if p.kind != p.KEYWORD_ONLY]
    return signature.replace(parameters=schema, return_annotation=hints["return"])


def _triton_impl(launcher_name: str):
    """triton_kernels.<launcher_name> as an op implementation: the schema's arguments by name, plus the switches
    read now where the call passes -1, max |dphi/dc| for a backward, the chunk sizes for a launcher that plans
    chunks."""
    launcher = getattr(triton_kernels(), launcher_name)
    signature = _schema_signature(launcher)
    extras = inspect.signature(launcher).parameters

    def impl(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        if arguments["switches"] < 0:
            arguments["switches"] = _read_triton_switches()
        if "max_abs_dphi" in extras:
            t = arguments["non_target_param"].reshape(1)
            arguments["max_abs_dphi"] = non_target_max_abs_dphi(arguments["non_target"], t)
        if "cols_per_chunk" in extras:
            arguments["rows_per_tile"] = config.integer("MARGINOPS_CHUNK_ROWS")
            arguments["cols_per_chunk"] = config.integer("MARGINOPS_CHUNK_COLS")
        return launcher(**arguments)

    impl.__signature__ = signature
    impl.__name__ = impl.__qualname__ = launcher_name
    return impl


@torch.compiler.assume_constant_result
def _ensure_triton_op() -> bool:
    """Register the Triton launchers as torch.library.triton_op (torch.compile traces into them)."""
    if "triton" not in _registered:
        forward = torch.library.triton_op("marginops::triton_fused_lse", mutates_args=())(
            _triton_impl("fused_lse_forward")
        )
        backward = torch.library.triton_op("marginops::triton_fused_lse_backward", mutates_args=())(
            _triton_impl("fused_lse_backward")
        )
        forward.register_autograd(_make_backward(backward, "triton"), setup_context=_setup_context)
        _check_schema_names(torch.ops.marginops.triton_fused_lse)
        _check_schema_names(torch.ops.marginops.triton_fused_lse_backward)
        _registered.add("triton")
    return True


def triton_op():
    _ensure_triton_op()
    return torch.ops.marginops.triton_fused_lse


@torch.compiler.assume_constant_result
def _ensure_hybrid_op() -> bool:
    """The hybrid path (backend "hybrid"): the Triton forward under its own name, with the hybrid backward (a Triton
    gradient-block kernel per class chunk, torch.mm products) as its autograd formula."""
    if "hybrid" not in _registered:
        forward = torch.library.triton_op("marginops::hybrid_fused_lse", mutates_args=())(
            _triton_impl("fused_lse_forward")
        )
        backward = torch.library.triton_op("marginops::hybrid_fused_lse_backward", mutates_args=())(
            _triton_impl("hybrid_backward")
        )
        forward.register_autograd(_make_backward(backward, "hybrid"), setup_context=_setup_context)
        _check_schema_names(torch.ops.marginops.hybrid_fused_lse)
        _check_schema_names(torch.ops.marginops.hybrid_fused_lse_backward)
        _registered.add("hybrid")
    return True


def hybrid_op():
    _ensure_hybrid_op()
    return torch.ops.marginops.hybrid_fused_lse


@torch.compiler.assume_constant_result
def _build_failure(kind: str) -> str:
    return _build.build_failure(kind) or ""


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _cuda_path_unavailable(path: str, device: torch.device) -> Optional[str]:
    """Why ``path`` cannot run on ``device`` (None if it can): the CUDA build for the C++ paths, Triton for the rest."""
    if path in ("cuda", "cuda_fused"):
        return _build_failure("cuda") or None
    return triton_usable(device)


@torch.compiler.assume_constant_result
def _auto_cuda_backend(index: int) -> str:
    """The first path of the committed ranking (marginops/path_ranking.py) that can run on CUDA device ``index``."""
    device = torch.device("cuda", index)
    reasons = []
    for path in path_ranking.cuda_order(torch.cuda.get_device_name(index)):
        reason = _cuda_path_unavailable(path, device)
        if reason is None:
            return path
        reasons.append(f"{path}: {reason}")
        if path == "cuda":  # a failed build is worth a word; a missing Triton is an ordinary installation
            _warn_once(f"marginops: CUDA kernels unavailable ({reason}); trying the next path")
    _warn_once(f"marginops: no CUDA path can run ({'; '.join(reasons)}); using the reference backend")
    return "reference"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` on ``device``; "auto" falls back with one warning per reason.  On CUDA
    "auto" takes the first path that can run in the committed ranking (marginops/path_ranking.py)."""
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return _auto_cuda_backend(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu":
        reason = _build_failure("cpu")
        if not reason:
            return "cpu"
        _warn_once(f"marginops: C++ CPU kernels unavailable ({reason}); using the reference backend")
        return "reference"
    return "reference"


# torch.compile runs the readers when it traces (their value is a constant of the graph), as it runs the Triton
# launchers' Python; eager code reads at every op call.
@torch.compiler.assume_constant_result
def _read_cuda_switches() -> int:
    _ensure_cpp_op("cuda")
    return torch.ops.marginops.read_cuda_switches()


@torch.compiler.assume_constant_result
def _read_triton_switches() -> int:
    kernels = triton_kernels()

    def setting(attribute: str, switch: str) -> bool:
        """The package's attribute (ALLOW_TF32, FAST_GRAD_DOTS) if set to True / False, else the switch, now."""
        value = getattr(kernels, attribute, None)
        return config.flag(switch) if value is None else bool(value)

    return kernels.pack_switches(
        tf32=setting("ALLOW_TF32", "MARGINOPS_TRITON_TF32"),
        fast_grad_dots=setting("FAST_GRAD_DOTS", "MARGINOPS_TRITON_FAST_BWD"),
        autotune=config.flag("MARGINOPS_TRITON_AUTOTUNE"),
    )


def read_switches(backend: str) -> int:
    """The per-call switches of ``backend``'s kernels, read once for an op call's forward and carried to its
    backward (the ops' ``switches`` argument): a switch changed in between must not give the backward another
    path or precision than the forward.  Opaque: packed by the backend's own reader (C++:
    csrc/switches.h read_cuda_switches; Triton: _read_triton_switches, packed by triton_kernels.pack_switches).
    -1 for backends that read none per call."""
    if backend in ("cuda", "cuda_fused"):
        return _read_cuda_switches()
    if backend in ("triton", "hybrid"):
        return _read_triton_switches()
    return -1


def non_target_param_tensor(value) -> torch.Tensor:
    """The op's non_target_param from a number or a tensor: a 0-dim float64 CPU tensor, a copy (the op saves it
    for the backward, and a module updates its own t in place).  A tensor is copied, never read on the host, so a
    module's state buffer flows into the op under torch.compile(fullgraph=True)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64, copy=True).reshape(())
    return torch.tensor(float(value), dtype=torch.float64)


def fused_lse(
    backend: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target_logit: torch.Tensor,
    row_scale: torch.Tensor,
    threshold: torch.Tensor,
    class_index: Optional[torch.Tensor] = None,
    non_target_param=0.0,
    non_target: int = 0,
    filter_threshold: float = 2.0,
    subcenters: int = 1,
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the fused op on a concrete backend ("cpu", "cuda", "cuda_fused", "triton", "hybrid", or "reference": the
    materialized oracle with the same semantics); inputs already validated."""
    arguments = dict(
        x=x.contiguous(),
        weight=weight.contiguous(),
        labels=labels.contiguous(),
        target_logit=target_logit.contiguous(),
        row_scale=row_scale.contiguous(),
        threshold=threshold.contiguous(),
        class_index=None if class_index is None else class_index.contiguous(),
        non_target_param=non_target_param_tensor(non_target_param),
        non_target=int(non_target),
        filter_threshold=float(filter_threshold),
        subcenters=int(subcenters),
        deterministic=bool(deterministic),
        switches=-1,
    )
    assert tuple(arguments) == OP_ARGUMENTS
    if backend == "reference":
        from . import reference

        del arguments["deterministic"], arguments["switches"]  # the oracle has one summation order, no switches
        return reference.fused_lse(**arguments)
    arguments["switches"] = read_switches(backend)
    if backend in ("cpu", "cuda"):
        return cpp_op(backend)(**arguments)
    if backend == "cuda_fused":
        cpp_op("cuda")
        return torch.ops.marginops.fused_lse_cuda_fused(**arguments)
    if backend == "triton":
        return triton_op()(**arguments)
    if backend == "hybrid":
        return hybrid_op()(**arguments)
    raise ValueError(f"fused_lse has no backend {backend!r}")
