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


def pytest_collection_modifyitems(items):
    # pytest-xdist hands tests out in collection order: the long ones (emulator, slow) first, so that the two
    # workers end together instead of one running a minutes-long test alone at the end
    items.sort(key=lambda item: 0 if item.get_closest_marker("slow") or item.get_closest_marker("emulator") else 1)
