"""Reference results on the built-in data that result tables quote next to a run's own numbers.

Writes evcli/data/builtin_references.json (shipped with the package): what a plain linear model, scikit-learn's
LogisticRegression on the raw 8x8 pixels scaled to [0, 1] (lbfgs, C = 1, max_iter 2000), scores on the built-in
digits' val split (every 5th image of each class; the same split every evcli run uses). A user who sees a
network score below it knows the run has not learned what the data allows.

Usage: python bench/builtin_references.py
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
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


def main() -> None:
    import sklearn

    start = time.perf_counter()
    top1 = linear_top1()
    result = {
        "benchmark": "builtin_references",
        "command": " ".join(["python bench/builtin_references.py", *(shlex.quote(a) for a in sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "scikit_learn": sklearn.__version__,
        "data": "built-in digits (scikit-learn): 1,442 train / 355 val, every 5th image of each class held out",
        "linear": {
            "model": "logistic regression (scikit-learn, raw 8x8 pixels in [0, 1], lbfgs, C=1, max_iter 2000)",
            "top1": top1,
        },
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"linear model on the built-in digits: {top1:.2f}% top-1 -> {OUT}")


if __name__ == "__main__":
    main()
