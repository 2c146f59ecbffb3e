"""The fused op as a PyTorch citizen: gradcheck, torch.library.opcheck, torch.compile."""

import pytest
import torch
from helpers import KERNEL_BACKENDS, device_for, make_problem

import marginops
from marginops import ops


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


def _op_args(device, dtype=torch.float32, class_index=None):
    emb, weight, labels = make_problem(6, 9, 23, dtype=dtype, device=device)
    labels[1] = -1
    x = torch.nn.functional.normalize(emb).requires_grad_(True)
    weight.requires_grad_(True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    target = torch.randn(6, dtype=acc, device=device).requires_grad_(True)
    scale = torch.full((6,), 5.0, dtype=acc, device=device).requires_grad_(True)
    threshold = torch.rand(6, dtype=acc, device=device) - 0.5
    t = torch.tensor(0.3, dtype=torch.float64)  # non_target_param: CurricularFace's t
    return (x, weight, labels, target, scale, threshold, class_index, t, 1, 0.8, 1, True)


def test_opcheck_cpp_op():
    op = ops.cpp_op("cpu")
    torch.library.opcheck(op, _op_args("cpu"))
    torch.library.opcheck(op, _op_args("cpu", torch.float64, class_index=torch.tensor([3, 0, 7, 22, 5, 9])))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.cuda
def test_opcheck_cuda_op():
    torch.library.opcheck(ops.cpp_op("cuda"), _op_args("cuda"))


@pytest.mark.parametrize("backend", [b for b in KERNEL_BACKENDS if b.values[0] == "triton"])
def test_opcheck_triton_op(backend):
    device = device_for(backend)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if device.type == "cpu":
        # the interpreter runs kernels eagerly, so it cannot be traced into an AOT graph on CPU tensors
        checks = checks[:-1]
    torch.library.opcheck(ops.triton_op(), _op_args(device), test_utils=checks)


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
