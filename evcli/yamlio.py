"""YAML that reads numbers and booleans the way a person means them.

PyYAML's ``safe_load`` follows YAML 1.1: ``1e-4`` becomes a *string*, ``2:4`` becomes the integer 124
(base-60) and ``no``/``on`` become booleans. :func:`load_yaml` uses YAML 1.2 core-schema scalars:
``1e-4`` is a float, ``2:4`` stays a string, and only ``true``/``false`` are booleans. A key given twice in
one mapping is an error naming both lines (PyYAML silently keeps the last one).
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class YamlSyntaxError(yaml.YAMLError):
    """Text that is not valid YAML, described in one line with its position."""


class DuplicateKeyError(YamlSyntaxError):
    """A mapping that gives the same key twice."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema implicit resolvers for bool, int and float, refusing duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        # Only the mapping's own keys: a key that overrides one merged in with `<<: *anchor` is not a duplicate.
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise DuplicateKeyError(f"duplicate key {key!r} at line {line} (first given at line {first_line[key]})")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


_StrictLoader.yaml_implicit_resolvers = {
    first: [
        (tag, rx)
        for tag, rx in resolvers
        if tag not in {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"),
)
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    return int(text, 0) if text.startswith(("0x", "0o")) else int(text)


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    text = str(loader.construct_scalar(node)).lower()
    if text.endswith(".inf"):
        return float("-inf") if text.startswith("-") else float("inf")
    if text == ".nan":
        return float("nan")
    return float(text)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def _one_line(exc: Exception) -> str:
    """PyYAML's multi-line message as ``problem (line L, column C)``."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return f"{exc.problem}{where}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def load_yaml(text: str) -> Any:
    """Parse YAML text with YAML 1.2 core-schema scalars.

    Raises:
        YamlSyntaxError: invalid YAML or a duplicate key, in one line naming the position.
    """
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except YamlSyntaxError:
        raise
    except (yaml.YAMLError, ValueError) as exc:
        raise YamlSyntaxError(_one_line(exc)) from exc


def parse_scalar(text: str) -> Any:
    """Parse one ``--set`` value (``1e-4``, ``2:4``, ``[1, 2]``, ``null``) like a YAML value."""
    if text == "":
        return ""
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


class _QuotingDumper(yaml.SafeDumper):
    """Quotes every string that a YAML 1.1 *or* a YAML 1.2 reader would take for a non-string."""


_QuotingDumper.yaml_implicit_resolvers = {
    first: list(yaml.SafeDumper.yaml_implicit_resolvers.get(first, []))
    + list(_StrictLoader.yaml_implicit_resolvers.get(first, []))
    for first in set(yaml.SafeDumper.yaml_implicit_resolvers) | set(_StrictLoader.yaml_implicit_resolvers)
}

# str subclasses (e.g. recipe Duration values) dump as plain strings
_QuotingDumper.add_multi_representer(str, lambda dumper, value: dumper.represent_str(str(value)))


def dump_yaml(data: Any) -> str:
    """Dump plain data to YAML that :func:`load_yaml` (and YAML 1.1 readers) read back unchanged."""
    return yaml.dump(data, Dumper=_QuotingDumper, sort_keys=False, default_flow_style=None, allow_unicode=True)
