"""`evcli recipe list|show|validate`: the shipped recipes and checking your own."""

from __future__ import annotations

from pathlib import Path

import typer

from evcli.cli.common import JsonOption, SetOption, find_recipe, shipped_recipes
from evcli.console import emit_json, err_console, out_console
from evcli.errors import EXIT_USAGE, RecipeError

app = typer.Typer(help="List, show and validate recipes.", no_args_is_help=True)


def _describe(path: Path) -> str:
    """First comment line of a recipe file."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def _command_of(path: Path) -> str:
    from evcli.recipe import read_recipe_file

    data = read_recipe_file(path)
    command = data.get("command")
    if not isinstance(command, str):
        raise RecipeError(f"{path} has no 'command' key (e.g. command: mix)")
    return command


@app.command("list")
def list_recipes(json_out: bool = JsonOption) -> None:
    """List the recipes shipped with evcli (use a name with --recipe)."""
    table = shipped_recipes()
    rows = [
        {"name": name, "command": _command_of(p), "description": _describe(p), "path": str(p)}
        for name, p in table.items()
    ]
    if json_out:
        emit_json({"recipes": rows})
        return
    from rich.table import Table

    t = Table("name", "command", "description", title="shipped recipes", title_justify="left")
    for row in rows:
        t.add_row(row["name"], row["command"], row["description"])
    out_console.print(t)


@app.command("show")
def show(
    name: str = typer.Argument(..., help="Shipped recipe name, recipe file, or a command name for its defaults."),
    sets: list[str] = SetOption,
    json_out: bool = JsonOption,
) -> None:
    """Print a recipe fully resolved (every key, defaults filled in) as YAML.

    Examples: `evcli recipe show mix/tiny`, `evcli recipe show mix` (defaults),
    `evcli recipe show my.yaml --set optim.lr=1e-3`.
    """
    from evcli.recipe import resolve_recipe
    from evcli.registry import commands

    if name in commands() and not Path(name).is_file():
        recipe = resolve_recipe(name, sets=sets or [])
    else:
        path = find_recipe(name)
        recipe = resolve_recipe(_command_of(path), recipe_file=path, sets=sets or [])
    if json_out:
        emit_json(recipe.to_dict())
    else:
        out_console.print(recipe.to_yaml(), markup=False, end="")


@app.command("validate")
def validate(
    paths: list[str] = typer.Argument(..., help="Recipe files or shipped names."),
    json_out: bool = JsonOption,
) -> None:
    """Check recipes against their command's schema; exit 2 if any is invalid."""
    from evcli.recipe import resolve_recipe

    results = []
    for item in paths:
        try:
            path = find_recipe(item)
            resolve_recipe(_command_of(path), recipe_file=path)
            results.append({"recipe": item, "ok": True})
        except RecipeError as exc:
            results.append({"recipe": item, "ok": False, "error": exc.message})
    bad = [r for r in results if not r["ok"]]
    if json_out:
        emit_json({"ok": not bad, "results": results})
    else:
        for r in results:
            if r["ok"]:
                out_console.print(f"ok      {r['recipe']}", markup=False)
            else:
                err_console.print(f"invalid {r['recipe']}: {r['error']}", style="red", markup=False)
    if bad:
        raise typer.Exit(EXIT_USAGE)
