"""Which working size suits a shadow detector: BER / IoU of ``detect_shadow`` (the code path of ``evcli deshadow
IMAGE --mask auto``) at several working sizes, on validation images (the held-out photos with the val renders of a
detector recipe, as whole-photo squares at ``--val-size`` px) and thresholds, plus the share of shadow-free images
flagged.

These are the recipes' val images (not the quality bench's 480 px cases): choosing a working size here does not
touch bench/deshadow_quality.py's sets. Writes bench/results/deshadow_detector_scale.json (command, machine).

    python bench/deshadow_detector_scale.py --weights SHIPPED A.safetensors B.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
OPENCV_DATA = "/opt/evdata/usr/share/doc/opencv-doc/examples/data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", nargs="+", default=["SHIPPED"], help="detector files (SHIPPED: the shipped one)")
    ap.add_argument("--work-sizes", nargs="+", type=int, default=[128, 192, 256, 384])
    ap.add_argument("--thresholds", nargs="+", type=float, default=[0.5], help="probability thresholds (0.5: evcli's)")
    ap.add_argument("--val-size", type=int, default=384, help="side of the square val images (whole photos)")
    ap.add_argument("--samples", type=int, default=32, help="val images (the recipes' builtin_val_samples)")
    ap.add_argument("--seed", type=int, default=2, help="val render seed (a recipe's train.seed)")
    ap.add_argument("--shadow-free", type=float, default=0.4, help="share of shadow-free val images")
    ap.add_argument("--photo-dir", default=OPENCV_DATA if Path(OPENCV_DATA).is_dir() else None)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "deshadow_detector_scale.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from evcli.data.shadow import BuiltinShadowDataset, photo_names
    from evcli.methods.deshadow.detector import ber_iou, confusion_sums, detect_shadow
    from evcli.methods.deshadow.infer import load_detector

    t0, load = time.time(), list(os.getloadavg())
    names = photo_names(args.photo_dir, True)
    ds = BuiltinShadowDataset(names, args.samples, args.val_size, args.seed, False, args.photo_dir, args.shadow_free)
    samples = [ds[i] for i in range(len(ds))]
    rows = []
    for w in args.weights:
        det = load_detector(None if w == "SHIPPED" else w)
        for ws in args.work_sizes:
            for th in args.thresholds:
                sums, flagged = torch.zeros(4, dtype=torch.float64), []
                for s in samples:
                    d = detect_shadow(det, s["shadow"], threshold=th, work_size=ws)
                    sums += confusion_sums(d.mask, s["mask"])
                    if not bool(s["mask"].any()):
                        flagged.append(d.fraction)
                row = {"weights": w, "own_work_size": int(det.work_size), "work_size": ws, "threshold": th}
                row.update(ber_iou(sums))
                row["shadow_free_flagged_mean"] = sum(flagged) / max(1, len(flagged))
                rows.append(row)
                print(json.dumps(row))
    report = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_before": load,
        },
        "data": {
            "photos": list(names),
            "photo_dir": args.photo_dir,
            "images": len(samples),
            "shadow_free_images": sum(1 for s in samples if not bool(s["mask"].any())),
            "val_size": args.val_size,
            "renderer": f"evcli.data.shadow.BuiltinShadowDataset val renders, seed {args.seed}",
        },
        "rows": rows,
        "seconds": time.time() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
