"""Run folders: create or resume one, save the resolved recipe and environment, run a method in it.

A run folder holds ``resolved_recipe.yaml``, ``env.json``, ``metrics.jsonl``,
``checkpoints/{last,best}.safetensors``, ``final.safetensors`` and ``report.json``.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from evcli import __version__
from evcli.console import is_main_process, log
from evcli.errors import CheckpointError, UsageError
from evcli.io.checkpoint import atomic_write_text
from evcli.recipe import Recipe, explain_provenance, locked_changes, recipe_from_saved, resolve_recipe
from evcli.registry import get_command


def default_run_dir(recipe: Recipe) -> Path:
    """``runs/<command>/<YYYYmmdd-HHMMSS>-<model>-<method>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    method = getattr(recipe.method, "method", recipe.command)
    return Path("runs") / recipe.command / f"{stamp}-{recipe.model.name}-{method}"


def environment() -> dict[str, Any]:
    """Versions and devices, for env.json and ``evcli env``."""
    import accelerate
    import safetensors
    import timm
    import torch
    import torchvision

    info: dict[str, Any] = {
        "evcli": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "safetensors": safetensors.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        ).stdout.strip()
        info["git_sha"] = sha or None
    except (OSError, subprocess.SubprocessError):
        info["git_sha"] = None
    return info


def load_run_recipe(run_dir: Path) -> Recipe:
    """The resolved recipe saved in a run folder (its last checkpoint's copy if the file is gone)."""
    path = run_dir / "resolved_recipe.yaml"
    if path.exists():
        from evcli.yamlio import load_yaml

        return recipe_from_saved(load_yaml(path.read_text(encoding="utf-8")))
    from evcli.io.checkpoint import read_metadata

    return recipe_from_saved(read_metadata(run_dir / "checkpoints" / "last.safetensors")["recipe"])


def prepare_resume(
    command: str, run_dir: Path, flags: dict[str, Any], sets: list[str], force: bool
) -> tuple[Recipe, Path]:
    """Recipe and checkpoint to continue ``run_dir``; refuses schedule-changing overrides without force."""
    if not run_dir.is_dir():
        raise CheckpointError(f"--resume: run folder not found: {run_dir}")
    ckpt = run_dir / "checkpoints" / "last.safetensors"
    if not ckpt.exists():
        raise CheckpointError(
            f"--resume: {run_dir} has no checkpoints/last.safetensors to continue from",
            hint="the run stopped before its first checkpoint; start it again",
        )
    saved = load_run_recipe(run_dir)
    if saved.command != command:
        raise UsageError(f"{run_dir} is an 'evcli {saved.command}' run, not 'evcli {command}'")
    recipe = resolve_recipe(command, flags=flags, sets=sets, base=saved.to_dict())
    changed = locked_changes(saved, recipe)
    if changed and not force:
        raise UsageError(
            f"--resume would change {', '.join(changed)}, which alters the resumed run",
            hint="drop those overrides, or add --force to change them anyway",
        )
    recipe.out.dir = str(run_dir)
    return recipe, ckpt


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run folder that already holds a run (nothing written before is ever overwritten)."""
    if (run_dir / "checkpoints" / "last.safetensors").exists() or (run_dir / "report.json").exists():
        raise UsageError(
            f"run folder {run_dir} already holds a run",
            hint=f"continue it with --resume {run_dir}, or choose another --out",
        )


def write_run_files(recipe: Recipe, run_dir: Path) -> None:
    """Create the run folder with its resolved recipe and environment (rank 0)."""
    if not is_main_process():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "resolved_recipe.yaml", recipe.to_yaml())
    atomic_write_text(run_dir / "env.json", json.dumps({**environment(), "seed": recipe.train.seed}, indent=2) + "\n")


def run_training(recipe: Recipe, resume_checkpoint: Path | None = None) -> dict[str, Any]:
    """Train ``recipe`` in its run folder (fresh, or resumed from ``resume_checkpoint``).

    The folder is created only once data, model, weights and optimizer are built, so a mistake in any
    of them leaves nothing behind.
    """
    from evcli.engine.trainer import Trainer

    run_dir = Path(recipe.out.dir) if recipe.out.dir else default_run_dir(recipe)
    recipe.out.dir = str(run_dir)
    if resume_checkpoint is None:
        check_run_dir(run_dir)
    log(f"run folder: {run_dir}")
    log(explain_provenance(recipe))
    method = get_command(recipe.command).load_method_class()(recipe)
    trainer = Trainer(recipe, method, run_dir, resume_from=resume_checkpoint)
    return trainer.fit(on_ready=lambda: write_run_files(recipe, run_dir))


def run_evaluation(recipe: Recipe, weights: Path) -> dict[str, Any]:
    """Evaluate a weights file (or run folder) on the recipe's val data."""
    from evcli.engine.trainer import Trainer, resolve_weights_source

    path = resolve_weights_source(weights)
    method = get_command(recipe.command).load_method_class()(recipe)
    return Trainer(recipe, method, None).evaluate_only(path, strict=recipe.model.weights_strict)


def evaluation_recipe(
    command: str, weights: Path, recipe_file: Path | None, flags: dict[str, Any], sets: list[str]
) -> Recipe:
    """Recipe for evaluating ``weights``: the recipe the weights were trained with (from their run folder or
    metadata) unless a recipe file is given, then the flags and --set on top."""
    from evcli.engine.trainer import resolve_weights_source
    from evcli.io.checkpoint import read_metadata

    base = None
    if recipe_file is None:
        p = Path(weights).expanduser()
        if p.is_dir() and ((p / "resolved_recipe.yaml").exists() or (p / "checkpoints").is_dir()):
            base = load_run_recipe(p).to_dict()
        else:
            meta = read_metadata(resolve_weights_source(p))
            base = meta.get("recipe")
            if base is not None and base.get("command") != command:
                raise UsageError(f"{weights} was made by 'evcli {base.get('command')}', not 'evcli {command}'")
    recipe = resolve_recipe(command, recipe_file=recipe_file, flags=flags, sets=sets, base=base)
    recipe.model.weights = recipe.model.init_from = None
    return recipe


def run_export(command: str, run: Path, which: str, output: Path | None) -> dict[str, Any]:
    """Export a run's best/last checkpoint through the method's export hook as plain weights."""
    from evcli.engine.trainer import Trainer
    from evcli.io.checkpoint import read_metadata

    if which not in ("best", "last"):
        raise UsageError(f"--which must be 'best' or 'last', got {which!r}")
    run = Path(run).expanduser()
    if run.is_dir():
        ckpt = run / "checkpoints" / f"{which}.safetensors"
        if not ckpt.exists() and which == "best":
            ckpt = run / "checkpoints" / "last.safetensors"
        if not ckpt.exists():
            raise CheckpointError(f"no checkpoint in {run}/checkpoints to export")
    else:
        ckpt = run
    meta = read_metadata(ckpt)
    if meta.get("kind") != "training":
        raise CheckpointError(f"{ckpt} is not an evcli training checkpoint")
    recipe = recipe_from_saved(meta["recipe"])
    if recipe.command != command:
        raise UsageError(f"{ckpt} is an 'evcli {recipe.command}' checkpoint, not 'evcli {command}'")
    out = Path(output) if output else (run if run.is_dir() else run.parent) / f"export-{which}.safetensors"
    method = get_command(command).load_method_class()(recipe)
    return Trainer(recipe, method, None).export_only(ckpt, out)
