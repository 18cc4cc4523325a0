"""N:M pattern text (``"2:4"``) parsing, torch-free so that recipe validation and ``--help`` can use it."""

from __future__ import annotations

import re

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
MAX_M = 16


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; N:M needs 1 <= N < M <= 16.

    Raises:
        ValueError: with a message naming the problem (wrong form, N >= M, M > 16, zero).
    """
    m = _NM_RE.match(str(text))
    if not m:
        raise ValueError(f"N:M must look like 2:4 (two integers separated by ':'), got {text!r}")
    n, big_m = int(m.group(1)), int(m.group(2))
    if big_m < 1 or n < 1:
        raise ValueError(f"N:M needs N >= 1 and M >= 1, got {text!r}")
    if n >= big_m:
        raise ValueError(f"N:M needs N < M (N kept out of every M), got {text!r}")
    if big_m > MAX_M:
        raise ValueError(f"N:M supports M <= {MAX_M}, got {text!r}")
    return n, big_m
