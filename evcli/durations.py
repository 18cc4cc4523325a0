"""Lengths of training in relative units: ``"10%"`` of all steps, ``"5ep"`` epochs, ``"200step"`` steps.

Torch-free and import-free, so recipe schemas (``methods/*/config.py``) and the recipe loader can both use
it without importing each other.
"""

from __future__ import annotations

import re


class Duration(str):
    """A length of training: ``"10%"`` of all steps, ``"5ep"`` epochs or ``"200step"`` steps."""


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(%|ep|epochs?|steps?)\s*$")


def parse_duration(text: str) -> tuple[float, str]:
    """Split a duration into (amount, unit) with unit one of ``%``, ``ep``, ``step``.

    Raises:
        ValueError: the text is not a duration.
    """
    m = _DURATION_RE.match(str(text))
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. '10%', '5ep' or '200step')")
    amount, unit = float(m.group(1)), m.group(2)
    unit = "ep" if unit.startswith("ep") else ("step" if unit.startswith("step") else "%")
    return amount, unit


def resolve_duration(text: str, steps_per_epoch: int, total_steps: int) -> int:
    """Number of optimizer steps a duration stands for in a run of ``total_steps`` steps."""
    amount, unit = parse_duration(text)
    if unit == "%":
        return int(round(amount / 100.0 * total_steps))
    if unit == "ep":
        return int(round(amount * steps_per_epoch))
    return int(amount)
