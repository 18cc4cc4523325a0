"""Benchmark of `evcli deshadow` on photos the shipped weights never saw: the learned shadow detector against
the classical (Otsu) estimator, LAB-Net and SADC with the estimated and with the true mask against colour
transfer, shadow-free photos, and the detector's CPU latency against LAB-Net's. Writes
bench/results/deshadow_quality.json with the command, machine and torch version, and whether each target of
issue 14 is met.

Data: the held-out photos of evcli.data.shadow (VAL_PHOTOS; and OPENCV_VAL_PHOTOS when Debian's opencv-doc
photos are present: INSTALL.md, ``apt-get download opencv-doc`` and extract ``examples/``), each resized to
a longer side of 480 px, with ``--shadows`` rendered shadows per photo (render_shadow, seeds 1000 + i,
never the training seeds' stream) and the photo itself as a shadow-free case. Every removal runs the code
path of ``evcli deshadow IMAGE`` (``estimate_mask`` then ``remove_shadow``; keep-lit on, the default; the
papers' output, ``--no-keep-lit``, is recorded beside it).

Metrics: LAB mean absolute error (|dL|+|da|+|db| per pixel, skimage-style CIE-LAB, full resolution) against
the shadow-free photo on the true shadow region (S) and the rest (lit, NS); detector BER and IoU (pixel sums
over all cases, and the mean over cases).

    python bench/deshadow_quality.py [--photo-dir /opt/evdata/usr/share/doc/opencv-doc/examples/data]
    python bench/deshadow_quality.py --photo-dir .../opencv-doc/examples --photos hfs/data/000.jpg ... --out FILE
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
OPENCV_DATA = "/opt/evdata/usr/share/doc/opencv-doc/examples/data"


def lab_mae(pred: torch.Tensor, gt: torch.Tensor, region: torch.Tensor) -> float:
    """LAB MAE (sum of the three channels' |delta|, mean over ``region`` pixels); nan for an empty region."""
    from evcli.metrics.image import rgb_to_lab

    err = (rgb_to_lab(pred[None].double()) - rgb_to_lab(gt[None].double())).abs().sum(1)[0]
    r = region[0] > 0.5
    return float(err[r].mean()) if bool(r.any()) else float("nan")


def held_out_cases(
    photo_dir: str | None, shadows: int, side: int, photos: list[str] | None = None
) -> tuple[list[dict], list[dict], list[str]]:
    from evcli.data.shadow import _photo_tensor, photo_names, render_shadow

    names = tuple(f"opencv:{p}" for p in photos) if photos else photo_names(photo_dir, held_out=True)
    cases, free_cases = [], []
    for p, name in enumerate(names):
        photo = _photo_tensor(name, photo_dir)
        h, w = photo.shape[-2:]
        f = side / max(h, w)
        size = (round(h * f) // 8 * 8, round(w * f) // 8 * 8)
        free = F.interpolate(photo[None], size=size, mode="bilinear", antialias=True)[0].clamp(0, 1)
        free_cases.append({"photo": name, "free": free})
        arr = free.permute(1, 2, 0).numpy()
        for i in range(shadows):
            shadow, mask = render_shadow(arr, np.random.default_rng(1000 + p * 100 + i))
            cases.append(
                {
                    "photo": name,
                    "shadow": torch.from_numpy(shadow).permute(2, 0, 1).contiguous(),
                    "free": free,
                    "mask": torch.from_numpy(mask)[None],
                }
            )
    return cases, free_cases, list(names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photo-dir", default=OPENCV_DATA if Path(OPENCV_DATA).is_dir() else None)
    ap.add_argument("--shadows", type=int, default=2, help="rendered shadows per held-out photo")
    ap.add_argument("--side", type=int, default=480, help="longer side of the held-out images")
    ap.add_argument("--rounds", type=int, default=5, help="latency rounds (interleaved; median)")
    ap.add_argument(
        "--photos",
        nargs="+",
        default=None,
        help="evaluate these image files (paths relative to --photo-dir) instead of the built-in held-out set, "
        "e.g. a fresh set that never influenced any design choice",
    )
    ap.add_argument("--detector", default=None, help="detector weights (default: the shipped ones)")
    ap.add_argument("--labnet", default=None, help="LAB-Net weights (default: the shipped ones), e.g. a candidate")
    ap.add_argument("--sadc", default=None, help="SADC weights (default: the shipped ones)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "deshadow_quality.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from evcli.methods.deshadow.baselines import estimate_shadow_mask
    from evcli.methods.deshadow.detector import ber_iou, confusion_sums, detect_shadow
    from evcli.methods.deshadow.infer import estimate_mask, load_detector, load_remover, remove_shadow
    from evcli.runtime import retain_freed_memory

    retain_freed_memory()
    t0 = time.time()
    cases, free_cases, names = held_out_cases(args.photo_dir, args.shadows, args.side, args.photos)
    detector = load_detector(args.detector)
    removers = {m: load_remover(m, getattr(args, m)) for m in ("labnet", "sadc")}
    colour = load_remover("colour_transfer")

    # --- detection -----------------------------------------------------------------------------------
    det_rows = []
    sums = {"detector": torch.zeros(4, dtype=torch.float64), "otsu": torch.zeros(4, dtype=torch.float64)}
    for c in cases:
        d = detect_shadow(detector, c["shadow"])
        o = estimate_shadow_mask(c["shadow"])
        c["est"] = d.mask
        c["det_warnings"] = d.warnings()
        row = {"photo": c["photo"], "true_fraction": float(c["mask"].mean())}
        for key, m in (("detector", d.mask), ("otsu", o)):
            cs = confusion_sums(m, c["mask"])
            sums[key] += cs
            row[key] = {"fraction": float(m.mean()), **ber_iou(cs)}
        det_rows.append(row)
    detection = {}
    for key in sums:
        pooled = ber_iou(sums[key])
        detection[key] = {
            "ber_pooled": pooled["ber"],
            "iou_pooled": pooled["iou"],
            "ber_shadow_pooled": pooled["ber_shadow"],
            "ber_nonshadow_pooled": pooled["ber_nonshadow"],
            "ber_mean": statistics.mean(r[key]["ber"] for r in det_rows),
            "iou_mean": statistics.mean(r[key]["iou"] for r in det_rows),
        }
    free_det = []
    for fc in free_cases:
        d = detect_shadow(detector, fc["free"])
        fc["est"] = d.mask
        free_det.append(
            {
                "photo": fc["photo"],
                "detector_fraction": d.fraction,
                "otsu_fraction": float(estimate_shadow_mask(fc["free"]).mean()),
                "warnings": d.warnings(),
            }
        )

    # --- removal with the estimated mask (the CLI's default path) ---------------------------------------
    removal = {}
    for name, rem in removers.items():
        for keep in (True, False):
            rows = []
            for c in cases:
                out = remove_shadow(rem, c["shadow"], c["est"], keep_lit=keep)
                s0, s1 = lab_mae(c["shadow"], c["free"], c["mask"]), lab_mae(out, c["free"], c["mask"])
                n0, n1 = lab_mae(c["shadow"], c["free"], 1 - c["mask"]), lab_mae(out, c["free"], 1 - c["mask"])
                ok = s1 <= 0.7 * s0 and n1 - n0 <= 2.0
                rows.append({"photo": c["photo"], "s_in": s0, "s_out": s1, "ns_in": n0, "ns_out": n1, "pass": ok})
            free_rows = []
            for fc in free_cases:
                out = remove_shadow(rem, fc["free"], fc["est"], keep_lit=keep)
                change = lab_mae(out, fc["free"], torch.ones_like(fc["free"][:1]))
                free_rows.append({"photo": fc["photo"], "change": change, "pass": change <= 2.0})
            removal[f"{name}{'' if keep else '_no_keep_lit'}"] = {
                "cases": rows,
                "pass_rate": sum(r["pass"] for r in rows) / len(rows),
                "shadow_free": free_rows,
                "shadow_free_max_change": max(r["change"] for r in free_rows),
            }

    # --- removal with the true mask against colour transfer ------------------------------------------
    true_mask = {}
    ct_rows = []
    for c in cases:
        out = remove_shadow(colour, c["shadow"], c["mask"], keep_lit=True)
        ct_rows.append(lab_mae(out, c["free"], c["mask"]))
    for name, rem in [*removers.items(), ("colour_transfer", colour)]:
        for keep in (True, False):
            if name == "colour_transfer" and not keep:
                continue
            rows = []
            for c, ct in zip(cases, ct_rows):
                out = remove_shadow(rem, c["shadow"], c["mask"], keep_lit=keep)
                s0, s1 = lab_mae(c["shadow"], c["free"], c["mask"]), lab_mae(out, c["free"], c["mask"])
                n0, n1 = lab_mae(c["shadow"], c["free"], 1 - c["mask"]), lab_mae(out, c["free"], 1 - c["mask"])
                rows.append(
                    {"photo": c["photo"], "s_in": s0, "s_out": s1, "s_colour_transfer": ct, "ns_in": n0, "ns_out": n1}
                )
            true_mask[f"{name}{'' if keep else '_no_keep_lit'}"] = {
                "s_out_mean": statistics.mean(r["s_out"] for r in rows),
                "s_colour_transfer_mean": statistics.mean(ct_rows),
                "s_in_mean": statistics.mean(r["s_in"] for r in rows),
                "beats_colour_transfer_cases": sum(r["s_out"] < r["s_colour_transfer"] for r in rows),
                "ns_increase_mean": statistics.mean(r["ns_out"] - r["ns_in"] for r in rows),
                "ns_increase_max": max(r["ns_out"] - r["ns_in"] for r in rows),
                "cases": rows,
            }

    # --- latency at 640x480 (interleaved rounds, median) -----------------------------------------------
    from evcli.data.shadow import _photo_tensor, render_shadow

    photo = F.interpolate(_photo_tensor("coffee", None)[None], size=(480, 640), mode="bilinear", antialias=True)[0]
    shadow, mask = render_shadow(photo.clamp(0, 1).permute(1, 2, 0).numpy(), np.random.default_rng(7))
    rgb, m = torch.from_numpy(shadow).permute(2, 0, 1).contiguous(), torch.from_numpy(mask)[None]
    timers = {
        "detector": lambda: estimate_mask(rgb, detector),
        "otsu": lambda: estimate_mask(rgb, None, "otsu"),
        "labnet": lambda: remove_shadow(removers["labnet"], rgb, m),
        "sadc": lambda: remove_shadow(removers["sadc"], rgb, m),
    }
    for fn in timers.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(args.rounds):
        for k, fn in timers.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}

    # --- targets --------------------------------------------------------------------------------------
    targets = {
        "estimated_mask_pass_rate_ge_75pct": {
            m: {"value": removal[m]["pass_rate"], "met": removal[m]["pass_rate"] >= 0.75} for m in removers
        },
        "shadow_free_change_le_2": {
            m: {"value": removal[m]["shadow_free_max_change"], "met": removal[m]["shadow_free_max_change"] <= 2.0}
            for m in removers
        },
        "true_mask_beats_colour_transfer_on_shadow": {
            m: {
                "value": true_mask[m]["s_out_mean"],
                "colour_transfer": true_mask[m]["s_colour_transfer_mean"],
                "cases_beaten": f"{true_mask[m]['beats_colour_transfer_cases']}/{len(cases)}",
                "met": true_mask[m]["s_out_mean"] < true_mask[m]["s_colour_transfer_mean"],
            }
            for m in removers
        },
        "true_mask_lit_within_plus_1": {
            m: {
                "mean": true_mask[m]["ns_increase_mean"],
                "max": true_mask[m]["ns_increase_max"],
                "met": true_mask[m]["ns_increase_max"] <= 1.0,
            }
            for m in removers
        },
        "detector_latency_le_15pct_of_labnet": {
            "value": med["detector"] / med["labnet"],
            "met": med["detector"] / med["labnet"] <= 0.15,
        },
        "detector_beats_otsu": {
            "ber": [detection["detector"]["ber_pooled"], detection["otsu"]["ber_pooled"]],
            "iou": [detection["detector"]["iou_pooled"], detection["otsu"]["iou_pooled"]],
            "met": detection["detector"]["ber_pooled"] < detection["otsu"]["ber_pooled"]
            and detection["detector"]["iou_pooled"] > detection["otsu"]["iou_pooled"],
        },
    }
    report = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_before": list(os.getloadavg()),
        },
        "data": {
            "held_out_photos": names,
            "photo_dir": args.photo_dir,
            "shadow_cases": len(cases),
            "shadow_free_cases": len(free_cases),
            "longer_side": args.side,
            "renderer": "evcli.data.shadow.render_shadow, rng seeds 1000 + 100 * photo + i",
        },
        "weights": {
            "detector": args.detector or "shipped",
            "detector_work_size": int(detector.work_size),
            "labnet": args.labnet or "shipped",
            "sadc": args.sadc or "shipped",
        },
        "targets": targets,
        "detection": detection,
        "detection_cases": det_rows,
        "shadow_free_detection": free_det,
        "estimated_mask": removal,
        "true_mask": true_mask,
        "latency_640x480_s": med,
        "latency_raw_s": times,
        "seconds": time.time() - t0,
    }
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(json.dumps({"targets": targets, "detection": detection, "latency_640x480_s": med}, indent=2))


if __name__ == "__main__":
    main()
