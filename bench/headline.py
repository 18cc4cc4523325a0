"""Record the README's headline commands as a new user runs them, on the built-in data: wall time, accuracy, and
for the compression commands the realized sparsity and pattern.

Each command runs verbatim (plus ``--json -q`` to capture its report, which changes no computation) in a fresh
temporary folder, one after the other, with nothing else of this script running. The dense references the
sparsify result tables quote are recorded by bench/builtin_references.py --part dense.

Usage: python bench/headline.py [--only quickstart|sparsify-nm|sparsify-optg ...] [--out bench/results/headline.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "quickstart": "evcli mix --recipe mix/quickstart",
    "sparsify-nm": "evcli sparsify --nm 2:4 --model resnet50",
    "sparsify-optg": "evcli sparsify --method optg --sparsity 0.9 --model resnet18",
}
# The targets on 2 CPU cores (top-1 %, seconds of training).
TARGETS = {
    "quickstart": {"top1_min": 95.0, "train_seconds_max": 180},
    "sparsify-nm": {"top1_min": 90.0, "train_seconds_max": 300, "nm_exact": True},
    "sparsify-optg": {"top1_min": 85.0},
}


def run(command: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "evcli", *shlex.split(command)[1:], "--json", "-q"]
        load = os.getloadavg()[0]
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"{command} failed:\n{proc.stderr}")
        report = json.loads(proc.stdout)
    m = report["metrics"]
    row = {
        "command": command,
        "wall_seconds": round(wall, 1),
        "train_seconds": report["train_seconds_this_session"],
        "top1": round(m["top1"], 2),
        "top5": round(m["top5"], 2),
        "val_loss": round(m["loss"], 4),
        "steps": report["steps"],
        "epochs": report["epochs"],
        "img_per_s": report["samples_per_s"],
        "parameters": report["parameters"],
        "load_average_before": round(load, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
    }
    if "sparsity" in m:
        row["sparsity"] = round(m["sparsity"], 4)
    if "nm_exact" in m:
        row["nm_exact"] = m["nm_exact"] == 1.0
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="+", choices=list(COMMANDS), default=list(COMMANDS))
    parser.add_argument("--out", default="bench/results/headline.json")
    args = parser.parse_args()
    import torch

    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    result.update({
        "benchmark": "headline",
        "command": " ".join(["python bench/headline.py", *(shlex.quote(a) for a in sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "data": "built-in digits (scikit-learn): 1,442 train / 355 val",
        "targets": TARGETS,
    })  # fmt: skip
    for name in args.only:
        row = run(COMMANDS[name])
        target = TARGETS[name]
        row["met"] = (
            row["top1"] >= target["top1_min"]
            and row["train_seconds"] <= target.get("train_seconds_max", float("inf"))
            and row.get("nm_exact", True) == target.get("nm_exact", row.get("nm_exact", True))
        )
        # --only replaces some rows of the file: each row says which invocation recorded it, and when
        row["recorded_by"] = result["command"]
        row["recorded_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        result["runs"][name] = row
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{row['command']}: top-1 {row['top1']:.2f}% in {row['train_seconds']} s of training "
              f"({row['wall_seconds']} s wall) -> {out}")  # fmt: skip


if __name__ == "__main__":
    main()
