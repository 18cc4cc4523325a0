"""Run folders: where a run goes, what it writes before the first step, and refusing to reuse one.

A run folder holds ``resolved_recipe.yaml``, ``env.json``, ``metrics.jsonl``,
``checkpoints/{last,best}.safetensors``, ``final.safetensors`` and ``report.json``. Nothing here knows a
method: ``evcli.api`` puts runs together.
"""

from __future__ import annotations

import json
import os
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
    """The resolved recipe saved in a run folder (its last checkpoint's copy if the file is gone).

    Raises:
        CheckpointError: the saved recipe cannot be read (not UTF-8, not YAML, not a mapping, none in the checkpoint).
        RecipeError: it reads but does not validate; the message names the file.
    """
    from evcli.errors import RecipeError

    path = run_dir / "resolved_recipe.yaml"
    if path.exists():
        from evcli.yamlio import YamlSyntaxError, load_yaml

        try:
            data = load_yaml(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, YamlSyntaxError) as exc:
            reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else str(exc)
            raise CheckpointError(
                f"cannot read the run's recipe {path}: {reason}",
                hint="restore the file, or delete it to use the copy in checkpoints/last.safetensors",
            ) from exc
    else:
        from evcli.io.checkpoint import read_metadata

        path = run_dir / "checkpoints" / "last.safetensors"
        data = read_metadata(path).get("recipe")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds no saved recipe (expected a mapping of recipe sections)")
    try:
        return recipe_from_saved(data)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc.message}", hint=exc.hint) from exc


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
            p / "model.safetensors",  # a timm / Hugging Face model folder (evcli X export --format timm)
            p / "final.safetensors",
            p / "checkpoints" / "best.safetensors",
            p / "checkpoints" / "last.safetensors",
        ):
            if candidate.exists():
                return candidate
        raise CheckpointError(f"no weights in run folder {p} (no final.safetensors or checkpoints/)")
    return p


# --------------------------------------------------------------------------------------------------
# Claiming a run folder: one run per folder, atomically, for as long as it runs

CLAIM_FILE = ".evcli-run"  # marks a run folder; locked (flock) by the process running in it


def _holds_run(folder: Path) -> bool:
    return any(
        (folder / name).exists()
        for name in (CLAIM_FILE, "resolved_recipe.yaml", "report.json", "metrics.jsonl", "checkpoints")
    )


class RunClaim:
    """A run folder claimed by this process: created (or found empty) and marked atomically, and locked while
    the run lives, so two runs never share a folder (two starts in the same second get two folders; a second
    ``--resume`` of a running run is refused).

    Args:
        folder: the folder asked for.
        explicit: the user named it (``--out``): it must be new or empty. Otherwise (a default name) a taken name
            gets a ``-2``, ``-3``... suffix.
        resume: continue the run in ``folder`` (it must hold one, not in use).
        restart: ``--resume auto`` found no checkpoint: start over in a folder whose earlier run never wrote one.
    """

    def __init__(self, folder: Path, explicit: bool, resume: bool = False, restart: bool = False):
        self.created = False
        self.fd: int | None = None
        if resume:
            self.path = folder
            self._lock(fresh=False)
            return
        base, n = folder, 1
        while True:
            try:
                self._claim(folder, explicit, restart)
                break
            except FileExistsError:
                if explicit:
                    raise UsageError(
                        f"--out {folder} is already used by another run",
                        hint=f"continue it with --resume {folder}, or choose another --out",
                    ) from None
                n += 1
                folder = base.with_name(f"{base.name}-{n}")
        self.path = folder

    def _claim(self, folder: Path, explicit: bool, restart: bool) -> None:
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--out {folder} is a file, not a folder", hint="choose a new or empty folder")
        if folder.is_dir() and any(folder.iterdir()):
            if not explicit:
                raise FileExistsError(folder)
            if (folder / "checkpoints" / "last.safetensors").exists() or (folder / "report.json").exists():
                raise UsageError(
                    f"run folder {folder} already holds a run",
                    hint=f"continue it with --resume {folder}, or choose another --out",
                )
            if not (restart and _holds_run(folder)):
                what = "a run that stopped before its first checkpoint" if _holds_run(folder) else "files"
                raise UsageError(
                    f"--out {folder} is not empty (it holds {what}); a run starts only in a new or empty folder",
                    hint="choose another --out"
                    + (f", or start it over with --resume auto --out {folder}" if _holds_run(folder) else ""),
                )
            self.path = folder
            self._lock(fresh=False)  # refuses a folder whose run is still alive
            for name in ("metrics.jsonl", "resolved_recipe.yaml", "env.json"):
                (folder / name).unlink(missing_ok=True)
            return
        try:
            folder.mkdir(parents=True)
            self.created = True
        except FileExistsError:
            if any(folder.iterdir()):
                raise
        self.path = folder
        self._lock(fresh=True)

    def _lock(self, fresh: bool) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: the O_EXCL claim still holds, without the liveness lock
            fcntl = None
        flags = os.O_RDWR | os.O_CREAT | (os.O_EXCL if fresh else 0)
        try:
            self.fd = os.open(self.path / CLAIM_FILE, flags, 0o644)
        except FileExistsError:
            raise
        except OSError as exc:
            raise UsageError(f"cannot create a run in {self.path}: {exc.strerror}") from exc
        try:
            if fcntl is not None:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise UsageError(
                f"run folder {self.path} is in use by another evcli process",
                hint="wait for it to finish, or choose another --out",
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, json.dumps({"pid": os.getpid(), "started": time.time()}).encode())

    def release(self, failed_before_start: bool = False) -> None:
        """Unlock; a folder this claim created and nothing was written to is removed again."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if failed_before_start and self.created:
            (self.path / CLAIM_FILE).unlink(missing_ok=True)
            try:
                self.path.rmdir()
            except OSError:
                pass
