"""Checks of plain numbers and of a margin spec's fields: a leaf module, so that marginops/margins.py can run
them when a spec is built while marginops/_validation.py (which imports margins) stays the one entry point for
callers."""

from __future__ import annotations

import dataclasses
import math


def check_number(
    name: str,
    value,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    why: str = "",
) -> None:
    """ValueError unless ``value`` is a finite real number in the interval [low, high] (open ends as asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if (low, high) == (-math.inf, math.inf):
            interval = "a finite number"
        else:
            interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            interval = interval.replace("3.14159", "pi").replace("1.5708", "pi/2")
        raise ValueError(f"{name} must be {interval}, got {value!r}{'; ' + why if why else ''}")


def check_finite_fields(spec) -> None:
    """ValueError for a NaN or infinite number in any field of a margin spec (a dataclass)."""
    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{type(spec).__name__}.{field.name} must be finite, got {value!r}")
