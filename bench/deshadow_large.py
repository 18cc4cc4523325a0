"""Very large photos through `evcli deshadow IMAGE -o OUT` (the CLI as a user runs it: shipped LAB-Net, the
shipped detector's mask, keep-lit on, compare picture written): wall time, peak memory and exit code.

Each case is a real photo upscaled (bicubic) to 12000x8000 and saved as a JPEG (quality 90); the CLI runs as
a subprocess and its peak resident memory is read from ``getrusage(RUSAGE_CHILDREN)`` (the largest child so
far: each case therefore runs from an interpreter of its own, so each peak is that case's). Default
photos, from Debian's opencv-doc examples (../shared/INSTALL.md): ``data/baboon.jpg`` (the detector flags
little of it) and ``text/scenetext02.jpg`` (it flags about a quarter): tiles with no shadow pixel nearby
are not run, so time depends on the mask while memory should not.

Usage::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/deshadow_large.py [--photos data/baboon.jpg ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OPENCV = Path("/opt/evdata/usr/share/doc/opencv-doc/examples")


def run_case(photo: Path, size: tuple[int, int], work: Path) -> dict:
    from PIL import Image

    big = work / f"{photo.stem}_{size[0]}x{size[1]}.jpg"
    Image.open(photo).convert("RGB").resize(size, Image.BICUBIC).save(big, quality=90)
    out = work / f"{photo.stem}_out.png"
    cmd = [sys.executable, "-m", "evcli", "deshadow", str(big), "-o", str(out), "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB, the largest child so far
    row = {
        "photo": str(photo),
        "size": list(size),
        "exit_code": proc.returncode,
        "wall_seconds": round(wall, 1),
        "peak_rss_gib": round(peak_kib / 2**20, 2),
        "stderr_lines": [ln for ln in proc.stderr.splitlines() if ln.strip()][:5],
    }
    try:
        report = json.loads(proc.stdout)
        image = report["images"][0]
        row["shadow_fraction"] = image.get("shadow_fraction")
        row["warnings"] = image.get("warnings")
    except (ValueError, KeyError, IndexError):
        row["stdout_tail"] = proc.stdout[-500:]
    row["outputs_written"] = sorted(p.name for p in work.glob(f"{photo.stem}_out*"))
    for p in work.glob(f"{photo.stem}*"):
        p.unlink()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--photo-dir", type=Path, default=OPENCV)
    ap.add_argument("--photos", nargs="+", default=["data/baboon.jpg", "text/scenetext02.jpg"])
    ap.add_argument("--width", type=int, default=12000)
    ap.add_argument("--height", type=int, default=8000)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "deshadow_large.json")
    args = ap.parse_args()
    missing = [p for p in args.photos if not (args.photo_dir / p).is_file()]
    if missing:
        print(f"error: photos not found under {args.photo_dir}: {', '.join(missing)} (see INSTALL.md)", file=sys.stderr)
        return 2
    load_before = list(os.getloadavg())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.photos:
            # one interpreter per case, so each peak is that case's own
            proc = subprocess.run(
                [sys.executable, __file__, "--one", str(args.photo_dir / name), str(args.width), str(args.height), tmp],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
            rows.append(json.loads(proc.stdout))
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "benchmark": "deshadow_large",
        "command": "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/deshadow_large.py " + " ".join(sys.argv[1:]),
        "what": "evcli deshadow BIG.jpg -o OUT.png --json (shipped LAB-Net, detector mask, keep-lit, compare picture)",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_before": load_before,
            "load_average_after": list(os.getloadavg()),
        },
        "cases": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--one":
        print(json.dumps(run_case(Path(sys.argv[2]), (int(sys.argv[3]), int(sys.argv[4])), Path(sys.argv[5]))))
        sys.exit(0)
    sys.exit(main())
