"""Shared helpers for evcli's tests: tiny recipes, tiny image folders, an in-process CLI runner."""

from __future__ import annotations

import io
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TINY_FLAGS: dict[str, Any] = {
    "model.name": "test_vit",
    "model.patch_size": 4,
    "data.img_size": 16,
    "data.batch_size": 8,
    "data.workers": 0,
    "data.hflip": 0.0,
    "data.scale": [0.5, 1.0],
    "schedule.epochs": 1,
    "schedule.max_steps": 3,
    "train.log_every": 1,
}
"""Recipe overrides for a run of a few seconds: timm's test_vit at 16 px, batch 8, 3 steps."""

TINY_ARGS = [
    "--model",
    "test_vit",
    "--patch-size",
    "4",
    "--img-size",
    "16",
    "-b",
    "8",
    "--workers",
    "0",
    "--epochs",
    "1",
    "--max-steps",
    "3",
    "--set",
    "data.hflip=0.0",
    "--set",
    "train.log_every=1",
]
"""The same as CLI arguments."""


def make_image_folder(
    root: Path, classes: int = 3, per_class: int = 6, size: int = 16, val_per_class: int = 2, seed: int = 0
) -> Path:
    """An ImageFolder ``root/{train,val}/<class>/*.png`` of random-pattern RGB images (class = hue)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
                img[..., c % 3] += 150
                Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


@dataclass
class CliResult:
    """Exit code and captured output of one in-process CLI call."""

    code: int
    stdout: str
    stderr: str


def run_cli(args: list[str]) -> CliResult:
    """Run ``evcli ARGS`` in this process through the real entry point (error handling included)."""
    from evcli.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["evcli", *args]
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return CliResult(code, out.getvalue(), err.getvalue())


def launch_two_processes(args: list[str], timeout: int = 300, script: str | None = None):  # noqa: ANN201
    """Run ``evcli ARGS`` (or ``python SCRIPT ARGS``) in 2 CPU processes (DDP over gloo) through the real
    ``accelerate launch``; returns the subprocess.CompletedProcess."""
    import os
    import shutil
    import subprocess

    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if accelerate is None:
        raise RuntimeError("the accelerate launcher is not installed next to this python")
    cmd = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *(["-m", "evcli"] if script is None else [script]),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def imports_torch(args: list[str], env: dict[str, str] | None = None) -> tuple[bool, str]:
    """Run ``python -m evcli ARGS`` with ``-X importtime``: (whether torch or timm got imported, stdout)."""
    import os
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "evcli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    modules = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "import time:" in line}
    return "torch" in modules or "timm" in modules, proc.stdout


def interrupt_after(monkeypatch: Any, steps: int) -> None:
    """Make the next training run stop after ``steps`` optimizer steps as Ctrl-C would (checkpoint written, exit
    130), for resume tests; undone by ``monkeypatch.undo()`` or at the test's end."""
    from evcli.engine.trainer import Trainer

    original = Trainer._train_step

    def interrupting(self: Trainer, batches: Any) -> Any:
        out = original(self, batches)
        if self.ctx.step + 1 == steps:
            self._interrupt = True
        return out

    monkeypatch.setattr(Trainer, "_train_step", interrupting)
