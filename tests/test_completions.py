"""The shipped completion scripts are what the installed ``evcli`` entry point generates now."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_are_current(shell: str):
    exe = shutil.which("evcli", path=os.path.dirname(sys.executable)) or shutil.which("evcli")
    assert exe, "the evcli entry point is not installed"
    proc = subprocess.run(
        [exe, "--show-completion", shell],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    shipped = (ROOT / "completions" / f"evcli.{shell}").read_text()
    assert proc.stdout == shipped, f"completions/evcli.{shell} is stale: run completions/generate.sh"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = next(line.strip() for line in readme.splitlines() if "pytest" in line and "pip install" in line)
    assert test_cmd in ci
    assert "constraints.txt" in test_cmd and "HF_HUB_OFFLINE=1" in test_cmd
