"""Options and helpers shared by the subcommands (torch-free)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

import typer

from evcli.console import emit_json, out_console, set_quiet
from evcli.errors import RecipeError, UsageError

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
OverwriteOption = typer.Option(False, "--overwrite", help="Replace output files that already exist.")
RunArgument = typer.Argument(..., help="Run folder (or a training checkpoint file).", show_default=False)
ExportOutputOption = typer.Option(
    None, "--output", "-o", help="Output (default: RUN/export-<which>.safetensors, -timm/, .onnx).", show_default=False
)
FormatOption = typer.Option(
    "safetensors",
    "--format",
    help="safetensors (one file); timm: a folder with model.safetensors and config.json that "
    'timm.create_model("local-dir:FOLDER", pretrained=True) loads; onnx: an ONNX file, checked against '
    "PyTorch on the val data with onnxruntime when installed.",
)
WhichOption = typer.Option(
    "best", "--which", help="Checkpoint to export: best, last, or ema (the last checkpoint's EMA weights)."
)


def flag(*names: str, help: str) -> Any:
    """A typed training flag: default None means "not typed", so the recipe's value stays."""
    return typer.Option(None, *names, help=help, show_default=False)


class Precision(str, Enum):
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class Flag:
    """One command-line flag of a subcommand: its Python name, type, Typer option and the recipe key it sets
    (None: the command handles it)."""

    name: str
    annotation: Any
    option: Any
    key: str | None = None


# The flags of every training subcommand (a subcommand may replace one by declaring a flag of the same name,
# e.g. with its own help text).
COMMON_TRAIN_FLAGS: list[Flag] = [
    Flag("recipe", str, RecipeOption),
    Flag("data", Path, flag("--data", "-d", help="Data folder (default: the built-in data)."), "data.path"),
    Flag("weights", Path, flag("--weights", help="Pretrained weights, a local .safetensors file."), "model.weights"),
    Flag(
        "init_from",
        Path,
        flag("--init-from", help="Start from another run's weights (run folder or .safetensors)."),
        "model.init_from",
    ),
    Flag("epochs", int, flag("--epochs", help="Training epochs."), "schedule.epochs"),
    Flag("max_steps", int, flag("--max-steps", help="Stop after this many optimizer steps."), "schedule.max_steps"),
    Flag("batch_size", int, flag("--batch-size", "-b", help="Batch size per process."), "data.batch_size"),
    Flag(
        "lr",
        float,
        flag("--lr", help="Learning rate, as given (or --lr-base)."),
        "optim.lr",
    ),
    Flag(
        "lr_base",
        float,
        flag(
            "--lr-base", help="Learning rate at optim.lr_base_batch (256) images per step, scaled to the global batch."
        ),
        "optim.lr_base",
    ),
    Flag("seed", int, flag("--seed", help="Random seed."), "train.seed"),
    Flag(
        "mixed_precision",
        Precision,
        flag("--mixed-precision", help="no, bf16 or fp16 (CUDA) (default: accelerate launch's, else no)."),
        "train.mixed_precision",
    ),
    Flag("grad_accum", int, flag("--grad-accum", help="Micro-batches per optimizer step."), "train.grad_accum"),
    Flag(
        "ema",
        bool,
        typer.Option(None, "--ema/--no-ema", help="Keep an EMA of the weights.", show_default=False),
        "train.ema",
    ),
    Flag("workers", int, flag("--workers", help="Data-loading worker processes."), "data.workers"),
    Flag(
        "log_with",
        list[str],
        typer.Option(
            None,
            "--log-with",
            metavar="TRACKER",
            help="Also log to an Accelerate tracker: tensorboard, wandb, mlflow, ... (repeatable).",
            show_default=False,
        ),
        "train.log_with",
    ),
    Flag(
        "out",
        Path,
        flag("--out", "-o", help="Run folder (default: runs/<command>/<time>-<model>-<method>)."),
        "out.dir",
    ),
    Flag(
        "resume",
        Path,
        flag(
            "--resume",
            help="Continue the run in this folder exactly where it stopped; auto (with --out): resume if it has a "
            "checkpoint, else start there.",
        ),
    ),
    Flag(
        "force", bool, typer.Option(False, "--force", help="With --resume: allow overrides that change the schedule.")
    ),
    Flag("sets", list[str], SetOption),
    Flag("json_out", bool, JsonOption),
    Flag("quiet", bool, QuietOption),
]


def classifier_flags(default_model: str, builtin_img_size: int = 32) -> list[Flag]:
    """The flags of the image-classifier subcommands (timm model, input size, ImageFolder data, corrupt files)."""
    return [
        Flag("model", str, flag("--model", help=f"timm model name (default: {default_model})."), "model.name"),
        Flag(
            "img_size",
            int,
            flag("--img-size", help=f"Input size in pixels (default: 224; {builtin_img_size} on the built-in data)."),
            "data.img_size",
        ),
        Flag(
            "patch_size",
            int,
            flag("--patch-size", help="ViT patch size (default: the model's; 8x8 grid below 64 px)."),
            "model.patch_size",
        ),
        Flag(
            "data",
            Path,
            flag(
                "--data",
                "-d",
                help="ImageFolder root with train/ and val/, or an MNIST-style folder of IDX files (Fashion-MNIST); "
                "default: built-in digits.",
            ),
            "data.path",
        ),
        Flag(
            "pretrained",
            bool,
            flag(
                "--pretrained",
                help="Start from timm's pretrained weights of --model (a tag picks them: resnet50.a1_in1k), read "
                "from the local Hugging Face cache; never downloads.",
            ),
            "model.pretrained",
        ),
        Flag(
            "skip_corrupt",
            bool,
            flag("--skip-corrupt", help="Skip unreadable images with a warning."),
            "data.skip_corrupt",
        ),
    ]


def recipe_flags(typed: dict[str, Any]) -> dict[str, Any]:
    """Recipe keys of the flags the user typed: ``recipe_flags({"optim.lr": lr, ...})`` minus the Nones,
    with enums and paths turned into plain values."""
    plain = {}
    for key, value in typed.items():
        if value is None or value == []:
            continue
        plain[key] = value.value if isinstance(value, Enum) else (str(value) if isinstance(value, Path) else value)
    return plain


def _with_signature(fn: Callable[..., Any], flags: list[Flag], group: bool) -> Callable[..., Any]:
    """Give ``fn(**kwargs)`` the signature Typer reads its options from."""
    params = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.option, annotation=f.annotation)
        for f in flags
    ]
    if group:
        params.insert(0, inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))
    fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn


def merge_flags(own: list[Flag], common: list[Flag]) -> list[Flag]:
    """The subcommand's own flags first, then the common ones it did not replace."""
    names = {f.name for f in own}
    return [*own, *(f for f in common if f.name not in names)]


def training_command(
    command: str,
    own: list[Flag],
    rows: Callable[[dict[str, Any], Any], list[tuple[str, str]]],
    title: str,
    doc: str,
    group: bool = True,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> Callable[..., Any]:
    """The training entry of a subcommand: the common training flags plus ``own``, recipe resolution (or
    ``--resume``), ``evcli.api.train``, and the result table of ``rows(report, recipe)`` (or ``--json``).

    Args:
        command: the registered command name.
        own: the subcommand's own flags (a flag named like a common one replaces it).
        rows: the result table's rows.
        title: the result table's title.
        doc: the help text of the command.
        group: the function is a Typer group callback (``evcli X`` trains, ``evcli X eval`` ...).
        check: called with the typed values before anything runs (cross-flag checks).
    """
    flags = merge_flags(own, COMMON_TRAIN_FLAGS)

    def train(**kwargs: Any) -> None:
        ctx = kwargs.pop("ctx", None)
        if ctx is not None and ctx.invoked_subcommand is not None:
            return
        setup_output(kwargs["quiet"])
        if check is not None:
            check(kwargs)
        values = recipe_flags({f.key: kwargs[f.name] for f in flags if f.key})
        recipe, report = train_or_resume(
            command, kwargs["recipe"], kwargs["resume"], kwargs["force"], values, kwargs["sets"]
        )
        if report:
            print_result(report, kwargs["json_out"], title, rows(report, recipe))

    train.__doc__ = doc
    return _with_signature(train, flags, group)


def export_command(command: str) -> Callable[..., Any]:
    """``evcli X export RUN``: a run's checkpoint through the method's export, as plain weights."""

    def export(
        run: Path = RunArgument,
        output: Path = ExportOutputOption,
        which: str = WhichOption,
        format: str = FormatOption,
        overwrite: bool = OverwriteOption,
        json_out: bool = JsonOption,
        quiet: bool = QuietOption,
    ) -> None:
        """Export a run's checkpoint as plain weights, train-only parts dropped, with val metrics measured on
        the export."""
        setup_output(quiet)
        from evcli import api

        report = api.export(command, run, which, output, overwrite=overwrite, format=format)
        rows = export_rows(report)
        print_result(report, json_out, f"evcli {command} export", rows)

    return export


def export_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The result table of an export: source, file, its own metrics and (ONNX) the runtime check."""
    rows = [
        ("from", report["checkpoint"]),
        ("step", str(report["step"])),
        ("weights", report["weights"]),
        ("tensors", str(report["tensors"])),
        *export_metric_rows(report),
    ]
    check = report.get("onnx_check")
    if check is not None:
        rows.append(
            (
                "ONNX check",
                f"{check['runtime']}: max logit error {check['max_abs_logit_error']:.2e}, top-1 "
                f"{check['top1_onnx']:.2f}% (PyTorch {check['top1_pytorch']:.2f}%) on {check['images']} images"
                if check["checked"]
                else check["note"],
            )
        )
    return rows


def export_metric_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The export's own val metrics (measured on the exported weights), or why there are none."""
    m = report.get("metrics") or {}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, float)) or "-"
    return [("val metrics of the export", shown), ("", report.get("metrics_note", ""))]


def train_or_resume(
    command: str, recipe: str | None, resume: Path | None, force: bool, flags: dict[str, Any], sets: list[str] | None
) -> tuple[Any, dict[str, Any]]:
    """Resolve the recipe (or the resumed run's) and train; returns the recipe and the report.

    ``--resume auto --out DIR`` resumes DIR when it holds a checkpoint and starts a run there otherwise: one
    command line for the first start and every requeue of a preemptible job.
    """
    from evcli import api

    out = flags.get("out.dir")
    if resume is not None and str(resume) == "auto":
        if out is None:
            raise UsageError("--resume auto needs --out DIR: the folder to resume, or to start the run in")
        if (Path(out) / "checkpoints" / "last.safetensors").exists():
            resume = Path(out)
        else:
            rec = api.resolve(command, recipe_file=find_recipe(recipe), flags=flags, sets=sets or [])
            return rec, api.train(rec, restart=True)
    elif resume is not None and out is not None and Path(out).resolve() != Path(resume).resolve():
        raise UsageError(
            f"--resume {resume} continues that run in its own folder; --out {out} cannot move it",
            hint="drop --out (or start a new run with --out and no --resume)",
        )
    if resume is not None:
        if recipe is not None:
            raise typer.BadParameter("--resume uses the run's own recipe; drop --recipe", param_hint="--recipe")
        flags = {k: v for k, v in flags.items() if k != "out.dir"}
        rec, ckpt = api.resume(command, Path(resume), flags, sets or [], force)
    else:
        rec, ckpt = api.resolve(command, recipe_file=find_recipe(recipe), flags=flags, sets=sets or []), None
    return rec, api.train(rec, resume_from=ckpt)


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
    from evcli import api

    rec = api.evaluation_recipe(command, weights, find_recipe(recipe), recipe_flags(flags), sets or [])
    return api.evaluate(rec, weights)


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


def _builtin_references() -> dict[str, Any]:
    """The recorded references shipped in evcli/data/builtin_references.json ({} if it cannot be read)."""
    import json

    try:
        return json.loads(resources.files("evcli.data").joinpath("builtin_references.json").read_text())
    except (OSError, ValueError):
        return {}


def builtin_reference_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """On the built-in digits: what a linear model scores on the same val split (a recorded result shipped with
    the package, bench/builtin_references.py), so a user can judge the run's top-1."""
    if "built-in digits" not in str(report.get("data", "")) or "val subset" in str(report.get("data", "")):
        return []
    refs = _builtin_references()
    if "linear" not in refs:
        return []
    return [("reference", f"a linear model (logistic regression on the pixels) scores {refs['linear']['top1']:.2f}% "
             "on this val split (recorded)")]  # fmt: skip


# The recipe keys that define a training budget: a recorded dense reference is quoted only for a run whose values
# of all of them are the reference run's (any other model, size, schedule or optimizer is another setting).
BUDGET_PREFIXES = ("model.", "data.", "optim.", "schedule.")
NOT_BUDGET = ("data.workers",)


def budget_setting(recipe: Any) -> dict[str, Any]:
    """The budget-defining keys of a resolved recipe, as plain JSON values."""
    import json

    from evcli.recipe import _flatten

    flat = json.loads(json.dumps(_flatten(recipe.to_dict()), default=str))
    return {k: v for k, v in flat.items() if k.startswith(BUDGET_PREFIXES) and k not in NOT_BUDGET}


def dense_reference_rows(report: dict[str, Any], recipe: Any) -> list[tuple[str, str]]:
    """For a compression run on the built-in data: the same model trained dense with the same recipe and budget,
    when bench/builtin_references.py recorded that exact setting (shipped in evcli/data/builtin_references.json)."""
    if "built-in digits" not in str(report.get("data", "")) or report.get("method") == "dense":
        return []
    setting = budget_setting(recipe)
    for ref in _builtin_references().get("dense", []):
        if ref.get("command_name") == recipe.command and ref.get("setting") == setting:
            return [("dense reference", f"{ref['model']} trained dense with the same recipe and budget scores "
                     f"{ref['top1']:.2f}% (recorded: `{ref['command']}`)")]  # fmt: skip
    return []
