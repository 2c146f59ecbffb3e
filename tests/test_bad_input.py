"""Bad input raises a clear error naming the argument, before any kernel runs."""

import pytest
import torch
from helpers import make_problem

import marginops


def _call(emb, weight, labels, **kwargs):
    return marginops.margin_cross_entropy(emb, weight, labels, marginops.ArcFace(), **kwargs)


@pytest.fixture
def problem():
    return make_problem(8, 16, 50, dtype=torch.float32)


@pytest.mark.parametrize("backend", ["cpu", "reference", "auto"])
@pytest.mark.parametrize(
    "case, error, match",
    [
        ("label_too_large", ValueError, r"labels out of range.*\[0, 50\)"),
        ("label_negative", ValueError, r"labels out of range"),
        ("embedding_size_mismatch", ValueError, r"embedding size mismatch"),
        ("dtype_mismatch", TypeError, r"weight dtype torch.float64 differs"),
        ("embeddings_1d", ValueError, r"embeddings must be 2-D"),
        ("weight_3d", ValueError, r"weight must be 2-D"),
        ("labels_2d", ValueError, r"labels must be 1-D"),
        ("labels_float", TypeError, r"labels must be an integer tensor"),
        ("labels_wrong_length", ValueError, r"labels has 7 entries"),
        ("empty_batch", ValueError, r"empty batch"),
        ("empty_weight", ValueError, r"embedding size mismatch|no rows"),
        ("integer_embeddings", TypeError, r"floating-point"),
    ],
)
def test_bad_input_raises_clear_error(problem, backend, case, error, match):
    emb, weight, labels = problem
    if case == "label_too_large":
        labels[3] = 50
    elif case == "label_negative":
        labels[0] = -1
    elif case == "embedding_size_mismatch":
        weight = weight[:, :15]
    elif case == "dtype_mismatch":
        weight = weight.double()
    elif case == "embeddings_1d":
        emb = emb[0]
    elif case == "weight_3d":
        weight = weight[None]
    elif case == "labels_2d":
        labels = labels[:, None]
    elif case == "labels_float":
        labels = labels.float()
    elif case == "labels_wrong_length":
        labels = labels[:7]
    elif case == "empty_batch":
        emb, labels = emb[:0], labels[:0]
    elif case == "empty_weight":
        weight = weight[:0]
    elif case == "integer_embeddings":
        emb, weight = emb.long(), weight.long()
    with pytest.raises(error, match=match):
        _call(emb, weight, labels, backend=backend)


def test_bad_options(problem):
    emb, weight, labels = problem
    with pytest.raises(ValueError, match="reduction must be one of"):
        _call(emb, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="backend must be one of"):
        _call(emb, weight, labels, backend="gpu")
    with pytest.raises(TypeError, match="margin must be a marginops margin spec"):
        marginops.margin_cross_entropy(emb, weight, labels, "arcface")
    with pytest.raises(ValueError, match="not a multiple of subcenters"):
        marginops.margin_cross_entropy(emb, weight, labels, marginops.SubCenterArcFace(k=3))


def test_backend_device_and_dtype_mismatch(problem):
    emb, weight, labels = problem
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        _call(emb, weight, labels, backend="cuda")
    with pytest.raises(TypeError, match="backend='cpu' supports float64, float32, bfloat16 and float16"):
        _call(emb.to(torch.float8_e5m2), weight.to(torch.float8_e5m2), labels, backend="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to place tensors on two devices")
def test_device_mismatch(problem):
    emb, weight, labels = problem
    with pytest.raises(ValueError, match="must be on one device"):
        _call(emb.cuda(), weight, labels)


def test_custom_ignore_index_and_invalid_margins(problem):
    emb, weight, labels = problem
    labels[2] = -1
    loss = _call(emb, weight, labels, ignore_index=-1, backend="cpu")
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="SphereFace.m must be an integer"):
        marginops.SphereFace(m=2.5)
    with pytest.raises(ValueError, match="ArcFace.m must be in"):
        marginops.ArcFace(m=4.0)
    with pytest.raises(ValueError, match="s must be a positive"):
        marginops.CosFace(s=-1.0)


def test_op_rejects_out_of_range_class_index_without_reading_memory():
    """Called directly, the C++ op still never reads outside weight."""
    from marginops import ops

    emb, weight, labels = make_problem(4, 8, 10, dtype=torch.float32)
    x = torch.nn.functional.normalize(emb)
    z = torch.zeros(4)
    with pytest.raises(RuntimeError, match="class_index"):
        ops.fused_lse("cpu", x, weight, labels, z, z + 1, z, torch.tensor([0, 11]))
