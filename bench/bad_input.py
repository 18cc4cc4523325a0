"""The bad-input and run-safety corpus as one recorded run: every case of tests/test_validation.py (flags, --set,
YAML and TOML recipes), tests/test_file_safety.py (corrupt, truncated, bit-flipped and foreign safetensors files,
EXIF orientation, decompression bombs) and tests/test_run_safety.py (shared and non-empty run folders, outputs
over inputs or existing files, preemption by SIGTERM, --resume auto). Each case checks the exit code, that the
first stderr line is the one `error:` line, that no traceback is printed and that files that existed before are
unchanged. Writes bench/results/bad_input.json with the counts and the failing cases, if any.

Usage::

    HF_HUB_OFFLINE=1 python bench/bad_input.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

FILES = ["tests/test_validation.py", "tests/test_file_safety.py", "tests/test_run_safety.py"]


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--out", default="bench/results/bad_input.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *FILES],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        seconds = time.perf_counter() - t0
        cases = ET.parse(junit).getroot().iter("testcase")
        rows = []
        for case in cases:
            failed = case.find("failure") is not None or case.find("error") is not None
            skipped = case.find("skipped") is not None
            rows.append({"file": case.get("classname"), "case": case.get("name"), "failed": failed, "skipped": skipped})
    by_file = {}
    for r in rows:
        f = by_file.setdefault(r["file"], {"cases": 0, "clean": 0, "failed": 0, "skipped": 0})
        f["cases"] += 1
        f["failed" if r["failed"] else "skipped" if r["skipped"] else "clean"] += 1
    result = {
        "benchmark": "bad_input: the run-safety corpus",
        "command": "HF_HUB_OFFLINE=1 python bench/bad_input.py",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "cases": len(rows),
        "clean": sum(not r["failed"] and not r["skipped"] for r in rows),
        "failed": [f"{r['file']}::{r['case']}" for r in rows if r["failed"]],
        "skipped": [f"{r['file']}::{r['case']}" for r in rows if r["skipped"]],
        "by_file": by_file,
        "seconds": round(seconds, 1),
        "pytest_exit_code": proc.returncode,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        f"bad_input: {result['clean']} of {result['cases']} cases clean, {len(result['failed'])} failed -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
