"""The backend capability record (marginops/capabilities.py) against the README and the code that honours it."""

import warnings
from pathlib import Path

import pytest
import torch

from marginops import capabilities, functional, ops
from marginops._validation import check_module_options

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_dtype_table_is_the_records():
    """The README's dtype table is rendered from the records: a claim there is a claim the API reads."""
    assert capabilities.dtype_table() in README.read_text(), (
        "README.md's dtype table differs from marginops.capabilities.dtype_table(); paste:\n"
        + capabilities.dtype_table()
    )


def test_every_backend_name_has_a_record_and_is_accepted():
    assert ops.BACKENDS == capabilities.BACKENDS == ("auto", *capabilities.BACKEND_CAPABILITIES)
    for name in capabilities.BACKENDS:
        check_module_options(backend=name, reduction="mean", ignore_index=-100, interclass_filtering_threshold=0.0)
    with pytest.raises(ValueError, match="no backend 'nope'"):
        capabilities.capabilities("nope")


@pytest.mark.parametrize("backend", list(capabilities.BACKEND_CAPABILITIES))
def test_compute_dtype_follows_the_record(backend):
    """A backend with mixed precision runs bf16 products on a float32 weight without a word; one without runs the
    weight's dtype and says so once."""
    ops._warn_once.cache_clear()
    w = torch.zeros(3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = functional.compute_dtype_on(backend, torch.bfloat16, w)
    if capabilities.capabilities(backend).mixed_precision:
        assert got == torch.bfloat16 and not caught
    else:
        assert got == torch.float32 and len(caught) == 1


def test_only_the_reference_is_twice_differentiable():
    """The record's double_backward is what a second backward does (the CPU kernels raise, the oracle works)."""
    assert [n for n, c in capabilities.BACKEND_CAPABILITIES.items() if c.double_backward] == ["reference"]
    import marginops

    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4])
    for backend in ("reference", "cpu"):
        loss = marginops.margin_cross_entropy(x, w, y, marginops.ArcFace(s=8.0), backend=backend)
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        second = lambda: gx.pow(2).sum().backward()  # noqa: E731
        if capabilities.capabilities(backend).double_backward:
            second()
        else:
            with pytest.raises(RuntimeError, match="not differentiable"):
                second()
