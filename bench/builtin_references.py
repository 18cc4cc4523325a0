"""Reference results on the built-in data that result tables quote next to a run's own numbers.

Writes evcli/data/builtin_references.json (shipped with the package): what a plain linear model, scikit-learn's
LogisticRegression on the raw 8x8 pixels scaled to [0, 1] (lbfgs, C = 1, max_iter 2000), scores on the built-in
digits' val split (every 5th image of each class; the same split every evcli run uses). A user who sees a
network score below it knows the run has not learned what the data allows.

``--part dense`` trains the dense references of the headline compression commands on the built-in data (the same
model, recipe and budget with ``--method dense``); `evcli sparsify` quotes one in its result table when the run's
model, data, optimizer and schedule settings are exactly the recorded ones.

Usage: python bench/builtin_references.py [--part linear|dense|all]
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

OUT = Path(__file__).resolve().parents[1] / "evcli" / "data" / "builtin_references.json"


def linear_top1() -> float:
    """Top-1 (%) of logistic regression on the built-in digits split."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from evcli.data.classification import builtin_digits

    train, val = builtin_digits()
    x = train.images.reshape(len(train), -1) / 255.0
    xv = val.images.reshape(len(val), -1) / 255.0
    model = LogisticRegression(C=1.0, max_iter=2000).fit(x, np.array(train.labels))
    return round(100.0 * float((model.predict(xv) == np.array(val.labels)).mean()), 2)


# The compression commands whose dense reference is recorded: (the command a user runs, its dense twin).
DENSE = [
    ("evcli sparsify --nm 2:4 --model resnet50", ["sparsify", "--method", "dense", "--model", "resnet50"]),
    ("evcli sparsify --method optg --sparsity 0.9 --model resnet18",
     ["sparsify", "--method", "dense", "--model", "resnet18"]),
]  # fmt: skip


def dense_reference(args: list[str]) -> dict:
    """Train the dense twin through the CLI and keep its top-1 and its budget-defining recipe keys."""
    from evcli.cli.common import budget_setting
    from evcli.recipe import recipe_from_saved
    from evcli.yamlio import load_yaml

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "evcli", *args, "-o", f"{tmp}/run", "--json", "-q"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        report = json.loads(proc.stdout)
        recipe = recipe_from_saved(load_yaml(Path(tmp, "run", "resolved_recipe.yaml").read_text()))
    return {
        "command": "evcli " + " ".join(args),
        "command_name": recipe.command,
        "model": report["model"],
        "top1": round(report["metrics"]["top1"], 2),
        "wall_seconds": round(wall, 1),
        "train_seconds": report["train_seconds_this_session"],
        "setting": budget_setting(recipe),
    }


def main() -> None:
    import sklearn
    import torch

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=["linear", "dense", "all"], default="all")
    args = parser.parse_args()
    result = json.loads(OUT.read_text()) if OUT.exists() else {}
    result.update({
        "benchmark": "builtin_references",
        "command": " ".join(["python bench/builtin_references.py", *(shlex.quote(a) for a in sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_before": [round(x, 2) for x in os.getloadavg()]},
        "data": "built-in digits (scikit-learn): 1,442 train / 355 val, every 5th image of each class held out",
    })  # fmt: skip
    if args.part in ("linear", "all"):
        start = time.perf_counter()
        top1 = linear_top1()
        result["scikit_learn"] = sklearn.__version__
        result["linear"] = {
            "model": "logistic regression (scikit-learn, raw 8x8 pixels in [0, 1], lbfgs, C=1, max_iter 2000)",
            "top1": top1,
            "wall_seconds": round(time.perf_counter() - start, 1),
        }
        result.pop("wall_seconds", None)
        print(f"linear model on the built-in digits: {top1:.2f}% top-1")
    if args.part in ("dense", "all"):
        result["dense"] = []
        for compressed, dense_args in DENSE:
            ref = {"reference_for": compressed, **dense_reference(dense_args)}
            result["dense"].append(ref)
            print(f"{ref['command']}: {ref['top1']:.2f}% top-1 in {ref['wall_seconds']} s")
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {OUT}")


if __name__ == "__main__":
    main()
