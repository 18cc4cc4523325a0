"""`evcli env`: versions and devices, for bug reports."""

from __future__ import annotations

import typer

from evcli.cli.common import JsonOption, print_result


def env(json_out: bool = JsonOption) -> None:
    """Print evcli, Python, torch, timm, accelerate versions and the devices this machine has."""
    from evcli.engine.run import environment

    info = environment()
    rows = [(k, ", ".join(v) if isinstance(v, list) else str(v)) for k, v in info.items()]
    print_result(info, json_out, "evcli environment", rows)


def register(app: typer.Typer) -> None:
    app.command("env")(env)
