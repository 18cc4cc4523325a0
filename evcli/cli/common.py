"""Options and helpers shared by the subcommands (torch-free)."""

from __future__ import annotations

from enum import Enum
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


def flag(*names: str, help: str) -> Any:
    """A typed training flag: default None means "not typed", so the recipe's value stays."""
    return typer.Option(None, *names, help=help, show_default=False)


class Precision(str, Enum):
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


# Training flags shared by every training subcommand (each maps to one recipe key, see TRAIN_FLAG_KEYS).
WeightsOption = flag("--weights", help="Pretrained weights, a local .safetensors file.")
InitFromOption = flag("--init-from", help="Start from another run's weights (run folder or .safetensors).")
EpochsOption = flag("--epochs", help="Training epochs.")
MaxStepsOption = flag("--max-steps", help="Stop after this many optimizer steps.")
BatchSizeOption = flag("--batch-size", "-b", help="Batch size per process.")
LrOption = flag("--lr", help="Base learning rate.")
SeedOption = flag("--seed", help="Random seed.")
PrecisionOption = flag("--mixed-precision", help="no, bf16 or fp16 (CUDA).")
GradAccumOption = flag("--grad-accum", help="Micro-batches per optimizer step.")
EmaOption = typer.Option(None, "--ema/--no-ema", help="Keep an EMA of the weights.", show_default=False)
WorkersOption = flag("--workers", help="Data-loading worker processes.")
ResumeOption = flag("--resume", help="Continue the run in this folder exactly where it stopped.")
ForceOption = typer.Option(False, "--force", help="With --resume: allow overrides that change the schedule.")


def recipe_flags(typed: dict[str, Any]) -> dict[str, Any]:
    """Recipe keys of the flags the user typed: ``recipe_flags({"optim.lr": lr, ...})`` minus the Nones,
    with enums and paths turned into plain values."""
    plain = {}
    for key, value in typed.items():
        if value is None:
            continue
        plain[key] = value.value if isinstance(value, Enum) else (str(value) if isinstance(value, Path) else value)
    return plain


def train_or_resume(
    command: str, recipe: str | None, resume: Path | None, force: bool, flags: dict[str, Any], sets: list[str] | None
) -> dict[str, Any]:
    """Resolve the recipe (or the resumed run's) and train; returns the report."""
    from evcli.engine.run import prepare_resume, run_training
    from evcli.recipe import resolve_recipe

    if resume is not None:
        if recipe is not None:
            raise typer.BadParameter("--resume uses the run's own recipe; drop --recipe", param_hint="--recipe")
        rec, ckpt = prepare_resume(command, Path(resume), flags, sets or [], force)
    else:
        rec, ckpt = resolve_recipe(command, recipe_file=find_recipe(recipe), flags=flags, sets=sets or []), None
    return rec, run_training(rec, resume_checkpoint=ckpt)


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


def evaluate_weights(
    command: str, weights: Path, recipe: str | None, flags: dict[str, Any], sets: list[str] | None
) -> dict[str, Any]:
    """Evaluate a weights file or run folder with the recipe it was trained with (plus flags and --set)."""
    from evcli.engine.run import evaluation_recipe, run_evaluation

    rec = evaluation_recipe(command, weights, find_recipe(recipe), recipe_flags(flags), sets or [])
    return run_evaluation(rec, weights)


def classifier_eval_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The table rows of a classifier evaluation report."""
    m = report["metrics"]
    return [
        ("weights", report["weights"]),
        ("model", report["model"]),
        ("data", report["data"]),
        ("top-1 / top-5", f"{m['top1']:.2f}% / {m['top5']:.2f}%"),
        ("val loss", f"{m['loss']:.4f}"),
    ]
