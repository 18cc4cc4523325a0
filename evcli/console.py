"""Where output goes: results on stdout, logs/warnings/progress on stderr, only from rank 0.

Multi-process runs (``accelerate launch``) set ``RANK``; every rank but 0 stays quiet so a user sees
each line once.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console

err_console = Console(stderr=True, highlight=False, soft_wrap=True)
out_console = Console(highlight=False, soft_wrap=True)


def process_rank() -> int:
    """This process's global rank as set by the launcher (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0 (or when not running under a distributed launcher)."""
    return process_rank() == 0


_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence info logs (warnings and errors still print)."""
    global _quiet
    _quiet = quiet


def log(message: str) -> None:
    """Informational line on stderr (rank 0 only)."""
    if is_main_process() and not _quiet:
        err_console.print(message, markup=False)


def warn(message: str) -> None:
    """Warning line on stderr (rank 0 only)."""
    if is_main_process():
        err_console.print(f"warning: {message}", style="yellow", markup=False)


def error(message: str, hint: str | None = None) -> None:
    """Error line (and hint) on stderr; printed by every rank only if it is rank 0."""
    if is_main_process():
        err_console.print(f"error: {message}", style="bold red", markup=False)
        if hint:
            err_console.print(f"hint: {hint}", markup=False)


def emit_json(obj: Any) -> None:
    """Print exactly one JSON object on stdout (rank 0 only)."""
    if is_main_process():
        sys.stdout.write(json.dumps(obj, indent=None, sort_keys=False, default=str) + "\n")
        sys.stdout.flush()
