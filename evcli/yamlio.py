"""YAML that reads numbers and booleans the way a person means them.

PyYAML's ``safe_load`` follows YAML 1.1: ``1e-4`` becomes a *string*, ``2:4`` becomes the integer 124
(base-60) and ``no``/``on`` become booleans. :func:`load_yaml` uses YAML 1.2 core-schema scalars:
``1e-4`` is a float, ``2:4`` stays a string, and only ``true``/``false`` are booleans.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema implicit resolvers for bool, int and float."""


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
    return float(text)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def load_yaml(text: str) -> Any:
    """Parse YAML text with YAML 1.2 core-schema scalars."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass


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
