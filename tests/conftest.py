import os

import torch

# Triton runs CPU tensors only through its interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    import helpers

    helpers.PYTEST_CONFIG = config  # helpers.progress writes past the output capture
