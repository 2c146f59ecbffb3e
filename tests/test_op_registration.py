"""The fused op as a PyTorch citizen: gradcheck, torch.library.opcheck, torch.compile."""

import pytest
import torch
from helpers import HAS_TRITON, KERNEL_BACKENDS, device_for, make_problem

import marginops
from marginops import config, ops


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "margin",
    [marginops.ArcFace(s=8.0), marginops.CurricularFace(s=8.0, t=0.4), marginops.SphereFace(m=3, lambda_=2.0)],
    ids=["arcface", "curricular", "sphereface"],
)
def test_gradcheck_float64(backend, margin):
    device = device_for(backend)
    emb, weight, labels = make_problem(5, 7, 11, device=device, ignore_rows=(2,))
    emb.requires_grad_(True)
    weight.requires_grad_(True)

    def fn(e, w):
        return marginops.margin_cross_entropy(e, w, labels, margin, reduction="none", backend=backend)

    assert torch.autograd.gradcheck(fn, (emb, weight), eps=1e-6, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# torch.library.opcheck on every registered op, from one list of samples (arguments by schema name)

# sample: (id, problem options) — mixed precision, 16-bit, sub-centres, class_index, filtering, non-target modes
SAMPLES = [
    ("f32-curricular", dict(dtype=torch.float32, non_target=1)),
    ("f64-class_index", dict(dtype=torch.float64, class_index=True)),
    ("bf16", dict(dtype=torch.bfloat16)),
    ("mixed-bf16", dict(dtype=torch.bfloat16, weight_dtype=torch.float32)),
    ("mixed-fp16-subcenters", dict(dtype=torch.float16, weight_dtype=torch.float32, subcenters=2)),
    ("f32-subcenters-filter", dict(dtype=torch.float32, subcenters=3, filter_threshold=0.3)),
]
# the backward's need-grad flags: both, a frozen weight, frozen embeddings
NEED_GRADS = [(True, True), (True, False), (False, True)]

# registered op -> (its forward op, the devices it has kernels for); every op of the namespace must be here
REGISTERED = {
    "fused_lse": ("fused_lse", ("cpu", "cuda")),
    "fused_lse_backward": ("fused_lse", ("cpu", "cuda")),
    "fused_lse_cuda_fused": ("fused_lse_cuda_fused", ("cuda",)),
    "fused_lse_cuda_fused_backward": ("fused_lse_cuda_fused", ("cuda",)),
    "triton_fused_lse": ("triton_fused_lse", ("cpu", "cuda")),
    "triton_fused_lse_backward": ("triton_fused_lse", ("cpu", "cuda")),
    "hybrid_fused_lse": ("hybrid_fused_lse", ("cpu", "cuda")),
    "hybrid_fused_lse_backward": ("hybrid_fused_lse", ("cpu", "cuda")),
}


def _forward_kwargs(
    device, dtype, weight_dtype=None, class_index=False, subcenters=1, non_target=0, filter_threshold=2.0
):
    B, D, C = 6, 9, 11
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64))
    weight = torch.randn(C * subcenters, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (B,), generator=g)
    labels[1] = -1  # an ignored row
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    index = torch.randperm(C, generator=g)[: C - 2] if class_index else None  # a subset of the classes
    if index is not None:
        labels = torch.where(torch.isin(labels, index), labels, -1)
    kwargs = dict(
        x=x.to(device, dtype),
        weight=weight.to(device, weight_dtype or dtype),
        labels=labels.to(device),
        target_logit=torch.randn(B, generator=g, dtype=acc).to(device),
        row_scale=torch.full((B,), 5.0, dtype=acc, device=device),
        threshold=(torch.rand(B, generator=g, dtype=acc) - 0.5).to(device),
        class_index=None if index is None else index.to(device),
        non_target_param=torch.tensor(0.3, dtype=torch.float64),  # CurricularFace's t
        non_target=non_target,
        filter_threshold=filter_threshold,
        subcenters=subcenters,
        deterministic=True,
    )
    return kwargs


def _positional(op, kwargs):
    """The op's arguments in its schema's order, from a dict keyed by the schema's names (never by position)."""
    names = [a.name for a in op.default._schema.arguments]
    assert set(kwargs) <= set(names), f"{sorted(set(kwargs) - set(names))} not in {op.default._schema}"
    return tuple(kwargs[n] for n in names if n in kwargs)


def _load(name):
    if name.startswith("hybrid"):
        ops.hybrid_op()
    elif name.startswith("triton"):
        ops.triton_op()
    else:
        ops.cpp_op("cuda" if torch.cuda.is_available() else "cpu")
    return getattr(torch.ops.marginops, name)


def _devices():
    return ["cuda"] if torch.cuda.is_available() else ["cpu"]


# ops that take and return no tensor (the switch readers: read_cuda_switches, and _read_switch, the test hook of
# tests/test_switches.py): opcheck has nothing to check on them
NO_TENSOR_OPS = {"read_cuda_switches", "_read_switch"}


def test_every_registered_op_has_opcheck_samples():
    ops.cpp_op("cpu")
    if HAS_TRITON:
        ops.triton_op()
        ops.hybrid_op()
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("marginops::")}
    missing = registered - set(REGISTERED) - NO_TENSOR_OPS
    assert not missing, f"ops without opcheck samples: {sorted(missing)}"
    for name in NO_TENSOR_OPS & registered:
        schema = getattr(torch.ops.marginops, name).default._schema
        assert "Tensor" not in str(schema), f"{schema} takes or returns tensors: give it opcheck samples"


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("sample", [options for _, options in SAMPLES], ids=[name for name, _ in SAMPLES])
@pytest.mark.parametrize("name", list(REGISTERED))
def test_opcheck(name, sample, device):
    forward_name, devices = REGISTERED[name]
    if device not in devices:
        pytest.skip(f"{name} has {'/'.join(devices)} kernels only")
    if name.startswith(("triton", "hybrid")):
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        if device == "cpu" and not config.flag("TRITON_INTERPRET"):
            pytest.skip("Triton runs CPU tensors only under TRITON_INTERPRET=1")
    if name.startswith("fused_lse_cuda_fused") and "weight_dtype" in sample:
        pytest.skip("the fused CUDA kernels have no mixed precision (capabilities: cuda_fused)")
    checks = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if name.startswith(("triton", "hybrid")) and device == "cpu":
        checks = checks[:-1]  # the interpreter runs kernels eagerly: no AOT graph of CPU tensors
    forward = _load(forward_name)
    kwargs = _forward_kwargs(device, **sample)
    if name == forward_name:
        for key in ("x", "weight", "target_logit", "row_scale"):
            kwargs[key].requires_grad_(True)
        torch.library.opcheck(forward, _positional(forward, kwargs), test_utils=checks)
        return
    backward = _load(name)
    lse, _ = forward(*_positional(forward, kwargs))
    for need_x, need_w in NEED_GRADS:
        grads = dict(kwargs, grad_lse=torch.linspace(0.5, 1.5, lse.numel(), dtype=lse.dtype, device=device), lse=lse)
        grads.update(need_grad_x=need_x, need_grad_weight=need_w)
        torch.library.opcheck(backward, _positional(backward, grads), test_utils=checks)


def test_torch_compile_fullgraph_module_forward_backward():
    torch._dynamo.reset()
    emb, _, labels = make_problem(16, 32, 300, dtype=torch.float32)
    loss_fn = marginops.nn.ArcFaceLoss(32, 300, backend="cpu")
    eager_emb = emb.clone().requires_grad_(True)
    eager = loss_fn(eager_emb, labels)
    eager.backward()
    eager_grad_w = loss_fn.weight.grad.clone()
    loss_fn.weight.grad = None

    compiled = torch.compile(loss_fn, fullgraph=True)
    comp_emb = emb.clone().requires_grad_(True)
    loss = compiled(comp_emb, labels)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(comp_emb.grad, eager_emb.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss_fn.weight.grad, eager_grad_w, rtol=1e-4, atol=1e-6)


def test_fake_implementations_check_shapes():
    """The fake (meta) kernels refuse what the real kernels would, so a traced graph cannot carry a bad shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = ops.cpp_op("cpu")
    with FakeTensorMode():
        x, w = torch.empty(4, 8), torch.empty(10, 8)
        labels, rows = torch.zeros(4, dtype=torch.long), torch.empty(4)
        t = torch.empty((), dtype=torch.float64)  # non_target_param
        lse, argmax = op(x, w, labels, rows, rows, rows, None, t, 0, 2.0, 1, True)
        assert lse.shape == (4,) and argmax.dtype == torch.long
        with pytest.raises(RuntimeError, match="feature size"):
            op(x, torch.empty(10, 7), labels, rows, rows, rows, None, t, 0, 2.0, 1, True)
        with pytest.raises(RuntimeError, match="target_logit"):
            op(x, w, labels, torch.empty(3), rows, rows, None, t, 0, 2.0, 1, True)
        with pytest.raises(RuntimeError, match="subcenters"):
            op(x, w, labels, rows, rows, rows, None, t, 0, 2.0, 3, True)
        with pytest.raises(RuntimeError, match="non_target_param"):
            op(x, w, labels, rows, rows, rows, None, torch.empty(2, dtype=torch.float64), 0, 2.0, 1, True)


def test_the_op_boundary_goes_by_schema_names():
    """Every registered schema takes ops.OP_ARGUMENTS by name (the reference, the Triton launchers and the autograd
    glue pass arguments by these names); a schema whose arguments were reordered or extended is refused."""
    from types import SimpleNamespace

    ops.cpp_op("cpu")
    for name in ("fused_lse", "fused_lse_backward", "fused_lse_cuda_fused", "fused_lse_cuda_fused_backward"):
        ops._check_schema_names(getattr(torch.ops.marginops, name))

    def fake_op(names):
        arguments = [SimpleNamespace(name=n) for n in names]
        return SimpleNamespace(default=SimpleNamespace(_schema=SimpleNamespace(arguments=arguments)))

    swapped = list(ops.OP_ARGUMENTS)
    swapped[4], swapped[5] = swapped[5], swapped[4]
    for names in (swapped, [*ops.OP_ARGUMENTS, "new_flag"]):
        with pytest.raises(RuntimeError, match="OP_ARGUMENTS by name"):
            ops._check_schema_names(fake_op(names))
    import inspect

    from marginops import reference

    assert tuple(inspect.signature(reference.fused_lse).parameters)[:11] == ops.OP_ARGUMENTS[:11]
