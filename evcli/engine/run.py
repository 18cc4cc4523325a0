"""Run folders: where a run goes, what it writes before the first step, and refusing to reuse one.

A run folder holds ``resolved_recipe.yaml``, ``env.json``, ``metrics.jsonl``,
``checkpoints/{last,best}.safetensors``, ``final.safetensors`` and ``report.json``. Nothing here knows a
method: ``evcli.api`` puts runs together.
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
from evcli.console import is_main_process
from evcli.errors import CheckpointError, UsageError
from evcli.io.checkpoint import atomic_write_text
from evcli.recipe import Recipe, recipe_from_saved


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


def resume_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a run folder continues from."""
    if not run_dir.is_dir():
        raise CheckpointError(f"--resume: run folder not found: {run_dir}")
    ckpt = run_dir / "checkpoints" / "last.safetensors"
    if not ckpt.exists():
        raise CheckpointError(
            f"--resume: {run_dir} has no checkpoints/last.safetensors to continue from",
            hint="the run stopped before its first checkpoint; start it again",
        )
    return ckpt


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


def resolve_weights_source(source: str | Path) -> Path:
    """A run folder's exported weights (else its best, else last checkpoint), or a file as given."""
    p = Path(source).expanduser()
    if p.is_dir():
        for candidate in (
            p / "final.safetensors",
            p / "checkpoints" / "best.safetensors",
            p / "checkpoints" / "last.safetensors",
        ):
            if candidate.exists():
                return candidate
        raise CheckpointError(f"no weights in run folder {p} (no final.safetensors or checkpoints/)")
    return p
