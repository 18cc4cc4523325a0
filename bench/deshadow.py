"""Benchmark of `evcli deshadow`: quality on held-out built-in images, CPU latency / peak memory / MACs at
640x480, the machine's dense 3x3 convolution rate measured in the same run, and SADC's time against the
shadow area. Writes bench/results/deshadow.json.

Quality: the built-in val set (rendered shadows on the held-out photos ``coffee`` and scikit-learn's
``china.jpg``), for identity, colour transfer and LAB-Net with the shipped default weights, under both
resize policies. SADC has no shipped weights (see docs/deshadow.md), so its quality is not measured here.

Timing: all timed variants run interleaved in one process (round-robin, median of rounds), because other
jobs share the machine's cores; peak memory is measured once per model in a child process (VmHWM).

    python bench/deshadow.py [--rounds 3] [--val-images 16] [--val-size 128]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from evcli.methods.deshadow.cost import count_macs

ROOT = Path(__file__).resolve().parent


def _mask(h: int, w: int, area: float) -> torch.Tensor:
    """A centred rectangle covering ``area`` of an h x w image, [1, 1, h, w]."""
    m = torch.zeros(1, 1, h, w)
    if area > 0:
        side = area**0.5
        mh, mw = int(round(h * side)), int(round(w * side))
        top, left = (h - mh) // 2, (w - mw) // 2
        m[..., top : top + mh, left : left + mw] = 1
    return m


def build_labnet(channels_last: bool = False) -> torch.nn.Module:
    from evcli.methods.deshadow.labnet import LABNet

    net = LABNet(32).eval()
    return net.to(memory_format=torch.channels_last) if channels_last else net


def build_sadc(sparse: bool = True) -> torch.nn.Module:
    from evcli.methods.deshadow.layers import vgg16_features
    from evcli.methods.deshadow.sadc import SADCNet

    net = SADCNet(vgg16_features("random", None)[0], 64, sparse=sparse).eval()
    return net


def quality(n_images: int, size: int) -> dict:
    """Metrics of the baselines and the shipped LAB-Net on the held-out built-in images."""
    from evcli.data.shadow import VAL_PHOTOS, BuiltinShadowDataset
    from evcli.methods.deshadow.infer import load_remover
    from evcli.metrics.shadow import ShadowMetrics

    data = BuiltinShadowDataset(VAL_PHOTOS, n_images, size, seed=0, train=False)
    samples = [data[(0, i)] for i in range(len(data))]
    results: dict = {}
    for name in ("identity", "colour_transfer", "labnet"):
        remover = load_remover(name)
        accs = {p: ShadowMetrics(p) for p in ("256x256", "full")}
        with torch.no_grad():
            for s in samples:
                mask = (s["mask"] > 0.9).float()[None]
                pred = remover.model(s["shadow"][None], mask).clamp(0, 1)
                for acc in accs.values():
                    acc.update(pred, s["free"][None], mask)
        results[name] = {"weights": remover.weights, **{p: a.summary() for p, a in accs.items()}}
    return {"images": len(samples), "size": size, "photos": list(VAL_PHOTOS), "methods": results}


def peak_memory_child(model: str) -> float:
    """Peak RSS growth (MiB) of one 640x480 forward of ``model`` in a child process: the kernel's high-water
    mark (VmHWM) is reset after the model is built (``/proc/self/clear_refs``), then read after the forward."""
    code = (
        f"import torch, sys; sys.path.insert(0, {str(ROOT)!r}); import deshadow as b; "
        "torch.set_grad_enabled(False);"
        f"m = b.build_{model}(); x = torch.rand(1, 3, 480, 640); k = b._mask(480, 640, 0.15);"
        "kb = lambda key: int([l for l in open('/proc/self/status') if l.startswith(key)][0].split()[1]);"
        "open('/proc/self/clear_refs', 'w').write('5'); base = kb('VmRSS'); m(x, k); print(kb('VmHWM'), base)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200)
    peak, base = (int(v) for v in out.stdout.split())
    return round((peak - base) / 1024.0, 1)  # KiB -> MiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--val-images", type=int, default=16)
    ap.add_argument("--val-size", type=int, default=128)
    ap.add_argument("--area-size", type=int, nargs=2, default=[320, 240], metavar=("W", "H"))
    args = ap.parse_args()
    torch.manual_seed(0)
    report: dict = {
        "command": "python bench/deshadow.py " + " ".join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "note": "2 shared cores (other jobs ran alongside): compare ratios from the same run",
        },
    }
    print("quality ...", file=sys.stderr)
    report["quality"] = quality(args.val_images, args.val_size)

    h, w = 480, 640
    x, mask = torch.rand(1, 3, h, w), _mask(h, w, 0.15)
    labnet, labnet_cl, sadc = build_labnet(), build_labnet(True), build_sadc(True)
    sadc_dense = build_sadc(False)
    sadc_dense.load_state_dict(sadc.state_dict())
    print("counting MACs ...", file=sys.stderr)
    macs = {"labnet": count_macs(labnet, x, mask), "sadc_dense": count_macs(sadc_dense, x, mask)}
    conv = torch.nn.Conv2d(48, 48, 3, padding=1, bias=False).eval()
    conv_x = torch.rand(1, 48, 256, 256)
    conv_macs = 48 * 48 * 9 * 256 * 256
    x_cl = x.contiguous(memory_format=torch.channels_last)
    cw, ch = args.area_size
    xa = torch.rand(1, 3, ch, cw)
    areas = (0.0, 0.1, 0.25, 0.5)
    variants = {
        "conv3x3_48": lambda: conv(conv_x),
        "labnet": lambda: labnet(x, mask),
        "labnet_channels_last": lambda: labnet_cl(x_cl, mask),
        "sadc_sparse": lambda: sadc(x, mask),
        "sadc_dense": lambda: sadc_dense(x, mask),
        "sadc_dense_small": lambda: sadc_dense(xa, _mask(ch, cw, 0.25)),  # dense cost does not depend on area
        **{f"sadc_sparse_area_{a}": (lambda a=a: sadc(xa, _mask(ch, cw, a))) for a in areas},
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for _ in range(3):  # warm-up of the small reference kernel only (the big models warm up in round 1)
            conv(conv_x)
        for r in range(args.rounds):
            print(f"timing round {r + 1}/{args.rounds} ...", file=sys.stderr)
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
                if name == "conv3x3_48":  # the reference rate is cheap: sample it more often
                    for _ in range(4):
                        t0 = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = conv_macs / med["conv3x3_48"]
    report["dense_conv_rate"] = {
        "what": "Conv2d 48->48 3x3, input 1x48x256x256, fp32, median of rounds",
        "seconds": med["conv3x3_48"],
        "gmac_per_s": rate / 1e9,
    }
    report["cost_640x480"] = {
        "counter": "evcli.methods.deshadow.cost.count_macs (conv + linear + ECA's functional Laplacian; "
        "attention matmuls, pooling, interpolation not counted); batch 1, 640x480, shadow mask 15% of the image",
        "labnet": {
            "macs_g": macs["labnet"] / 1e9,
            "latency_s": med["labnet"],
            "latency_channels_last_s": med["labnet_channels_last"],
            "efficiency": (macs["labnet"] / rate) / med["labnet"],
            "efficiency_channels_last": (macs["labnet"] / rate) / med["labnet_channels_last"],
            "peak_memory_mib": peak_memory_child("labnet"),
        },
        "sadc": {
            "macs_dense_g": macs["sadc_dense"] / 1e9,
            "latency_sparse_s": med["sadc_sparse"],
            "latency_dense_s": med["sadc_dense"],
            "efficiency_dense": (macs["sadc_dense"] / rate) / med["sadc_dense"],
            "peak_memory_mib": peak_memory_child("sadc"),
            "note": "frozen random VGG16 hypercolumn (latency does not depend on its weights)",
        },
    }
    report["sadc_time_vs_shadow_area"] = {
        "size": [cw, ch],
        "rows": [
            {"area": a, "sparse_s": med[f"sadc_sparse_area_{a}"], "dense_s": med["sadc_dense_small"]} for a in areas
        ],
    }
    report["raw_times"] = times
    out = ROOT / "results" / "deshadow.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("dense_conv_rate", "cost_640x480", "sadc_time_vs_shadow_area")}, indent=2))


if __name__ == "__main__":
    main()
