"""What each backend can do, in one record per backend.

The API (which compute dtype a call runs in), the backend resolver and validation, the tests' choice of what to
exercise and the README's dtype table all read this table, so that a claim and the code that honours it cannot
drift apart.  tests/test_capabilities.py checks the README's table against :func:`dtype_table` and runs every
claim below on the backends present.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
        # CPU tensors only under TRITON_INTERPRET=1 (ops.triton_usable says why not otherwise)
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
