"""What each backend can do, in one record per backend.

The API (which compute dtype a call runs in), the backend resolver and validation, the tests' choice of what to
exercise and the README's dtype table all read this table, so that a claim and the code that honours it cannot
drift apart.  tests/test_capabilities.py checks the README's table against :func:`dtype_table` and runs every
claim below on the backends present.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import config

SAME_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Capabilities:
    name: str
    devices: tuple  # device types its tensors may live on
    mixed_precision: bool  # bf16 / fp16 products on a float32 weight (compute_dtype, autocast)
    double_backward: bool  # a backward through the gradients (create_graph=True)
    skips_unneeded_gradients: bool  # a frozen weight or embedding costs neither its product nor its memory
    # README dtype table cells: (float64/float32, bfloat16/float16, mixed); "" is a plain ✓
    notes: tuple = ("", "", "")


BACKEND_CAPABILITIES = {
    c.name: c
    for c in (
        Capabilities("reference", ("cpu", "cuda"), True, True, False),
        Capabilities("cpu", ("cpu",), True, False, True, notes=("", "float32 GEMMs on the 16-bit values", "")),
        Capabilities("cuda", ("cuda",), True, False, True),
        Capabilities("cuda_fused", ("cuda",), False, False, True),
        # CPU tensors only under TRITON_INTERPRET=1 (triton_usable says why not otherwise)
        Capabilities("triton", ("cuda", "cpu"), True, False, True),
        # the Triton forward; backward: Triton gradient blocks + torch.mm products per class chunk (docs/CHUNKED.md)
        Capabilities("hybrid", ("cuda", "cpu"), True, False, True),
    )
}

# every name a caller may pass: the concrete backends and "auto" (resolved by ops.resolve_backend)
BACKENDS = ("auto", *BACKEND_CAPABILITIES)


def capabilities(backend: str) -> Capabilities:
    """The record of a concrete backend (not "auto": resolve it first)."""
    try:
        return BACKEND_CAPABILITIES[backend]
    except KeyError:
        raise ValueError(f"no backend {backend!r}; backends: {', '.join(BACKEND_CAPABILITIES)}") from None


def mixed_precision_backends() -> tuple:
    return tuple(name for name, c in BACKEND_CAPABILITIES.items() if c.mixed_precision)


def dtype_table() -> str:
    """The README's dtype table, rendered from the records."""
    names = list(BACKEND_CAPABILITIES)
    lines = [
        "| embeddings and weight | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    rows = ("float64, float32", "bfloat16, float16", "float32 weight, 16-bit products (mixed)")
    for index, label in enumerate(rows):
        cells = []
        for name in names:
            c = BACKEND_CAPABILITIES[name]
            note = c.notes[index]
            if index == 2 and not c.mixed_precision:
                cells.append("float32, one warning")
            else:
                cells.append(f"✓ ({note})" if note else "✓")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def triton_usable(device: torch.device) -> Optional[str]:
    """None if the Triton backend can run on this device, else why not."""
    if device.type == "cpu" and not config.flag("TRITON_INTERPRET"):
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    if device.type not in ("cpu", "cuda"):
        return f"Triton backend does not support device {device}"
    try:
        import triton
    except ImportError:
        return "triton is not installed (pip install 'marginops[triton]')"
    if device.type == "cpu":
        return _interpreter_unusable(triton.__version__)
    return None


def _major_minor(version: str) -> tuple:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())


def _interpreter_unusable(triton_version: str) -> Optional[str]:
    """Triton 3.6's interpreter converts 1-element arrays with int(), which numpy 2.4 turned into an error."""
    try:
        import numpy
    except ImportError:
        return None
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy.__version__) >= (2, 4):
        return (
            f"triton {triton_version}'s interpreter does not work with numpy {numpy.__version__} "
            "(install numpy<2.4, or triton>=3.8)"
        )
    return None
