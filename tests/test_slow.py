"""Slow end-to-end runs (skipped by default; run with `python -m pytest -m slow`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evcli.testing import run_cli


@pytest.mark.slow
def test_quickstart_learns(tmp_path: Path):
    """The full quickstart (under 2.5 minutes on 2 cores) reaches well above chance (10%) on the val digits."""
    r = run_cli(["mix", "--recipe", "mix/quickstart", "-o", str(tmp_path / "qs"), "--json"])
    assert r.code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["metrics"]["top1"] > 50.0
    assert report["best"]["top1"] >= report["metrics"]["top1"] - 1e-9 or report["best"]["step"] < report["steps"]
