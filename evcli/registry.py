"""The one table of subcommand methods, filled by a decorator on each method's config class.

Each entry names the method's recipe schema (a torch-free dataclass), where its implementation lives
(imported only when a run starts), and the command's defaults over the common sections. The CLI, the
recipe loader and checkpoint metadata all speak these names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evcli.errors import UsageError


@dataclass
class CommandSpec:
    """One registered subcommand method."""

    name: str
    config: type
    implementation: str  # "module:Class" of the engine Method, imported lazily
    help: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)  # dotted keys over the common sections
    sections: dict[str, type] = field(default_factory=dict)  # common sections this command replaces
    # dotted keys applied over `defaults` when the run uses the built-in data (no data.path): settings that let
    # the command's default model learn on the small built-in set; a recipe file or flag still overrides them
    builtin_defaults: dict[str, Any] = field(default_factory=dict)

    def load_method_class(self) -> type:
        module, _, attr = self.implementation.partition(":")
        return getattr(importlib.import_module(module), attr)


_COMMANDS: dict[str, CommandSpec] = {}


def register_command(
    name: str,
    implementation: str,
    help: str = "",
    defaults: dict[str, Any] | None = None,
    sections: dict[str, type] | None = None,
    builtin_defaults: dict[str, Any] | None = None,
) -> Callable[[type], type]:
    """Class decorator registering a method config dataclass as the schema of subcommand ``name``.

    ``sections`` replaces common recipe sections by the command's own typed ones (same name, e.g. a
    ``data`` section for point clouds without ``img_size``). ``builtin_defaults`` apply over ``defaults`` only
    when the run reads the built-in data.
    """

    def wrap(cls: type) -> type:
        _COMMANDS[name] = CommandSpec(
            name,
            cls,
            implementation,
            help,
            dict(defaults or {}),
            dict(sections or {}),
            dict(builtin_defaults or {}),
        )
        return cls

    return wrap


def _load_all() -> None:
    """Import every ``evcli/methods/<name>/config.py`` (torch-free); each registers its command."""
    import evcli.methods

    root = Path(evcli.methods.__file__).parent
    for config in sorted(root.glob("*/config.py")):
        importlib.import_module(f"evcli.methods.{config.parent.name}.config")


def commands() -> dict[str, CommandSpec]:
    """All registered subcommand methods by name."""
    _load_all()
    return dict(_COMMANDS)


def get_command(name: str) -> CommandSpec:
    """The spec of one subcommand, or a UsageError naming the known ones."""
    table = commands()
    if name not in table:
        raise UsageError(f"unknown command '{name}' (known: {', '.join(sorted(table))})")
    return table[name]
