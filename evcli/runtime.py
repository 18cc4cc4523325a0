"""Process-level settings for CPU inference on large images.

glibc's malloc serves every block above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and gives it
back to the kernel on ``free``. PyTorch's CPU allocator does not cache, so each large feature map of a
full-resolution forward (a 32-channel fp32 map of a 640x480 image is 39 MB) is new memory, and the kernel
zeroes and maps it page by page on first touch: LAB-Net's fused fp32 forward at 640x480 takes 5.6 s with
glibc's defaults and 3.5 s without this (bench/deshadow.py, 2 cores). :func:`retain_freed_memory` turns
that off for the process, the way jemalloc or tcmalloc behave: large blocks come from the heap and freed
memory stays there for the next map. The cost is memory: the process keeps what it freed until it exits,
and the heap fragments, so the peak resident memory of a 640x480 LAB-Net forward is about twice glibc's
(1.18 vs 0.62 GB, bench). The CLI's inference command calls it unless ``EVCLI_MALLOC=default`` is set;
library code never does on its own.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_GLIBC_DEFAULTS = {_M_MMAP_MAX: 65536, _M_TRIM_THRESHOLD: 128 * 1024}


def _mallopt():  # noqa: ANN202 - a ctypes function or None
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").mallopt  # glibc only (musl has no mallopt)
    except (OSError, AttributeError):
        return None


def retain_freed_memory(on: bool = True) -> bool:
    """Keep freed memory in the process (``on``) or restore glibc's defaults (``on=False``: mmap for large
    blocks, trim the heap above 128 KiB free). Returns whether the setting applied (glibc on Linux)."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    if on:
        settings = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1}
    else:
        settings = _GLIBC_DEFAULTS
    return all(mallopt(param, value) == 1 for param, value in settings.items())


def retain_freed_memory_unless_opted_out() -> bool:
    """:func:`retain_freed_memory`, unless the environment says ``EVCLI_MALLOC=default`` (keep glibc's
    behaviour: slower full-size inference, half the peak memory)."""
    if os.environ.get("EVCLI_MALLOC", "").strip().lower() == "default":
        return False
    return retain_freed_memory()
