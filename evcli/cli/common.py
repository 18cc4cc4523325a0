"""Options and helpers shared by the subcommands (torch-free)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import typer

from evcli.console import emit_json, out_console, set_quiet
from evcli.errors import RecipeError

RecipeOption = typer.Option(
    None,
    "--recipe",
    "-r",
    help="Recipe file (.yaml/.toml) or shipped recipe name (see `evcli recipe list`).",
    show_default=False,
)
SetOption = typer.Option(
    None,
    "--set",
    "-s",
    metavar="KEY=VALUE",
    help="Override any recipe key, e.g. --set optim.lr=1e-4 (repeatable).",
    show_default=False,
)
JsonOption = typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables.")
QuietOption = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr.")


def shipped_recipes_root() -> Path:
    """Folder of the recipes shipped inside the package (``evcli/recipes/<command>/*.yaml``)."""
    return Path(str(resources.files("evcli") / "recipes"))


def shipped_recipes() -> dict[str, Path]:
    """Shipped recipe name (``mix/tiny``) -> file."""
    root = shipped_recipes_root()
    return {f"{p.parent.name}/{p.stem}": p for p in sorted(root.glob("*/*.yaml")) + sorted(root.glob("*/*.toml"))}


def find_recipe(name_or_path: str | None) -> Path | None:
    """A recipe path from a file path or a shipped name; RecipeError if neither exists."""
    if name_or_path is None:
        return None
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    table = shipped_recipes()
    key = name_or_path.removesuffix(".yaml").removesuffix(".toml")
    if key in table:
        return table[key]
    from evcli.recipe import did_you_mean

    raise RecipeError(
        f"recipe not found: {name_or_path}{did_you_mean(key, table)}",
        hint="give a file path, or a name from `evcli recipe list`",
    )


def setup_output(quiet: bool) -> None:
    set_quiet(quiet)


def print_result(obj: dict[str, Any], as_json: bool, title: str, rows: list[tuple[str, str]]) -> None:
    """The result of a command on stdout: one JSON object, or a small table."""
    if as_json:
        emit_json(obj)
        return
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    out_console.print(table)
