"""Record the README quickstart: run `evcli mix --recipe mix/quickstart` and keep its report and wall time.

Usage: python bench/quickstart.py [--out bench/results/quickstart.json]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/results/quickstart.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "evcli", "mix", "--recipe", "mix/quickstart", "-o", f"{tmp}/run", "--json", "-q"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        report = json.loads(proc.stdout)
    import torch

    result = {
        "benchmark": "quickstart",
        "command": " ".join(["python bench/quickstart.py", *(shlex.quote(a) for a in sys.argv[1:])]),
        "runs": "evcli mix --recipe mix/quickstart",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "wall_seconds": round(wall, 1),
        "top1": report["metrics"]["top1"],
        "top5": report["metrics"]["top5"],
        "val_loss": report["metrics"]["loss"],
        "steps": report["steps"],
        "img_per_s": report["samples_per_s"],
        "parameters": report["parameters"],
        "data": report["data"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"quickstart: top-1 {result['top1']:.2f}% in {result['wall_seconds']} s -> {args.out}")


if __name__ == "__main__":
    main()
