"""Benchmark of `evcli deshadow`: quality on held-out built-in images, CPU latency / peak memory / MACs at
640x480, the machine's dense 3x3 convolution rate measured in the same run, and SADC's time against the
shadow area. Writes bench/results/deshadow.json.

Quality: the built-in val set (rendered shadows on the held-out photos ``coffee`` and scikit-learn's
``china.jpg``), for identity, colour transfer, and LAB-Net and SADC with the shipped default weights, under
both resize policies.

Timing: all timed variants run interleaved in one process (round-robin, median of rounds), so load from
other jobs on the machine hits them alike. The reference rate is the machine's best on a dense 3x3 conv (the
fastest sample of the faster memory format; fp32, and bf16 for the bf16 rows): noise only slows a sample
down, so the best one is what the machine can do, and efficiencies against it are conservative. LAB-Net
runs as the plain module-by-module forward (NCHW, channels-last, bf16), the fused CPU inference path
(``layers.fused_inference``: what ``evcli deshadow`` runs, fp32 and ``--precision bf16``) and torch.compile
of the plain forward (inductor, frozen weights, channels-last). Peak memory is measured once per model in a
child process (VmHWM). Everything runs with ``evcli.runtime.retain_freed_memory`` as the CLI does; the
fused fp32 LAB-Net is also timed in fresh child processes with and without it (glibc's defaults).

    python bench/deshadow.py [--rounds 3] [--val-images 16] [--val-size 128] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import os
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


def build_labnet_cl() -> torch.nn.Module:
    return build_labnet(True)


def build_labnet_bf16() -> torch.nn.Module:
    """LAB-Net channels-last as ``evcli deshadow --precision bf16`` runs it: the blocks in bfloat16, the global
    residual and the last 3x3 conv in fp32; fp32 in and out."""
    net = build_labnet(True).to(torch.bfloat16)
    net.final.float()
    return net


def plain(fn):  # noqa: ANN001, ANN201 - any callable model
    """``fn`` run with the plain module-by-module forward (``layers.plain_forward``), not the fused path."""
    from evcli.methods.deshadow.layers import plain_forward

    def run(*args):  # noqa: ANN002, ANN202
        with plain_forward():
            return fn(*args)

    return run


class SADCWithVGG(torch.nn.Module):
    """SADC and its frozen VGG16 as one callable (x, mask), as `evcli deshadow` runs them (MACs include VGG)."""

    def __init__(self, net: torch.nn.Module, vgg: torch.nn.Module):
        super().__init__()
        self.net, self.vgg = net, vgg
        self.dyn = net.dyn

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(x, mask, self.vgg)


def build_sadc(sparse: bool = True) -> torch.nn.Module:
    from evcli.methods.deshadow.layers import vgg16_features
    from evcli.methods.deshadow.sadc import SADCNet

    return SADCWithVGG(SADCNet(64, sparse=sparse), vgg16_features("random", None)[0]).eval()


def quality(n_images: int, size: int) -> dict:
    """Metrics of the baselines and the shipped LAB-Net on the held-out built-in images."""
    from evcli.data.shadow import VAL_PHOTOS, BuiltinShadowDataset
    from evcli.methods.deshadow.infer import load_remover
    from evcli.metrics.shadow import ShadowMetrics

    data = BuiltinShadowDataset(VAL_PHOTOS, n_images, size, seed=0, train=False)
    samples = [data[(0, i)] for i in range(len(data))]
    results: dict = {}
    from evcli.methods.deshadow.infer import shipped_weights

    preds: dict[str, list[torch.Tensor]] = {}
    for name in ("identity", "colour_transfer", "labnet", "labnet_bf16", "sadc"):
        method = name.removesuffix("_bf16")
        if method in ("labnet", "sadc") and shipped_weights(method) is None:
            results[name] = {"weights": "none shipped"}
            continue
        remover = load_remover(method, precision="bf16" if name.endswith("_bf16") else "fp32")
        accs = {p: ShadowMetrics(p) for p in ("256x256", "full")}
        preds[name] = []
        with torch.no_grad():
            for s in samples:
                mask = (s["mask"] > 0.9).float()[None]
                pred = remover.run(s["shadow"][None], mask).clamp(0, 1)
                preds[name].append(pred)
                for acc in accs.values():
                    acc.update(pred, s["free"][None], mask)
        learned = method in ("labnet", "sadc")
        weights = f"shipped {Path(remover.weights).name}" if learned else remover.weights
        results[name] = {"weights": weights, **{p: a.summary() for p, a in accs.items()}}
    if "labnet" in preds and "labnet_bf16" in preds:
        diff = max(float((a - b).abs().max()) for a, b in zip(preds["labnet"], preds["labnet_bf16"]))
        results["labnet_bf16"]["max_abs_diff_vs_fp32_8bit_levels"] = diff * 255.0
    return {"images": len(samples), "size": size, "photos": list(VAL_PHOTOS), "methods": results}


def child_run(model: str, w: int, h: int, reps: int = 0, retain: bool = True) -> dict:
    """One process of its own for ``model``: peak RSS growth (MiB) over a warm-up forward and ``reps`` timed
    ones, and their times. The kernel's high-water mark (VmHWM) is reset after the model is built
    (``/proc/self/clear_refs``). ``retain``: with ``evcli.runtime.retain_freed_memory`` as the CLI runs,
    or with glibc's default malloc (a fresh process: the setting cannot be undone once the heap holds the
    freed maps)."""
    code = (
        f"import time, torch, sys; sys.path.insert(0, {str(ROOT)!r}); import deshadow as b; "
        f"from evcli.runtime import retain_freed_memory; {'retain_freed_memory()' if retain else 'pass'}; "
        "torch.set_grad_enabled(False);"
        f"m = b.build_{model}(); x = torch.rand(1, 3, {h}, {w}); k = b._mask({h}, {w}, 0.15);"
        "x = x.contiguous(memory_format=torch.channels_last) if 'labnet' in " + repr(model) + " else x;"
        "kb = lambda key: int([l for l in open('/proc/self/status') if l.startswith(key)][0].split()[1]);"
        "open('/proc/self/clear_refs', 'w').write('5'); base = kb('VmRSS'); m(x, k); times = []\n"
        f"for _ in range({reps}):\n t0 = time.perf_counter(); m(x, k); times.append(time.perf_counter() - t0)\n"
        "print(kb('VmHWM'), base, *times)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    peak, base, *times = out.stdout.split()
    return {"peak_mib": round((int(peak) - int(base)) / 1024.0, 1), "times": [float(t) for t in times]}


class DynTimer:
    """Wall time spent inside a model's SADC DynConv layers (forward pre/post hooks; CPU ops are synchronous)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from evcli.methods.deshadow.sadc import DynConv

        self.layers = [m for m in model.modules() if isinstance(m, DynConv)]
        self.total, self._t0 = 0.0, 0.0
        for m in self.layers:
            m.register_forward_pre_hook(self._start)
            m.register_forward_hook(self._stop)

    def _start(self, *args) -> None:
        self._t0 = time.perf_counter()

    def _stop(self, *args) -> None:
        self.total += time.perf_counter() - self._t0

    def heavy_fraction(self) -> float:
        return sum(m.last_heavy_fraction for m in self.layers) / len(self.layers)


def compile_labnet(net: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> tuple[object, float]:
    """torch.compile (inductor, frozen weights) of a channels-last LAB-Net's plain forward; returns it (to be
    called under ``plain_forward``) and the compile time."""
    compiled = plain(torch.compile(net, options={"freezing": True}))
    t0 = time.perf_counter()
    compiled(x, mask)
    return compiled, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--val-images", type=int, default=16)
    ap.add_argument("--val-size", type=int, default=128)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant of LAB-Net")
    ap.add_argument("--size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"), help="timed image size")
    args = ap.parse_args()
    from evcli.runtime import retain_freed_memory

    retained = retain_freed_memory()  # as `evcli deshadow` does before inference
    torch.manual_seed(0)
    report: dict = {
        "command": "python bench/deshadow.py " + " ".join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "retain_freed_memory": retained,
            "load_average_before": list(os.getloadavg()),
        },
    }
    print("quality ...", file=sys.stderr)
    report["quality"] = quality(args.val_images, args.val_size)

    w, h = args.size
    x, mask = torch.rand(1, 3, h, w), _mask(h, w, 0.15)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    labnet, labnet_cl, sadc = build_labnet(), build_labnet(True), build_sadc(True)
    labnet_cl.load_state_dict(labnet.state_dict())
    labnet_bf16 = build_labnet_bf16()  # fed fp32 inputs and returning fp32, like the CLI
    sadc_dense = build_sadc(False)
    sadc_dense.load_state_dict(sadc.state_dict())
    print("counting MACs ...", file=sys.stderr)
    macs = {"labnet": count_macs(labnet, x, mask), "sadc_dense": count_macs(sadc_dense, x, mask)}
    conv = torch.nn.Conv2d(48, 48, 3, padding=1, bias=False).eval()
    conv_cl = torch.nn.Conv2d(48, 48, 3, padding=1, bias=False).eval().to(memory_format=torch.channels_last)
    conv_bf16 = torch.nn.Conv2d(48, 48, 3, padding=1, bias=False).eval()
    conv_bf16 = conv_bf16.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    conv_x = torch.rand(1, 48, 256, 256)
    conv_x_bf16 = conv_x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    conv_x_cl = conv_x.contiguous(memory_format=torch.channels_last)
    conv_macs = 48 * 48 * 9 * 256 * 256
    areas = (0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5)
    timer = DynTimer(sadc)
    timer_dense = DynTimer(sadc_dense)
    fractions: dict[float, float] = {}
    dyn_times: dict[str, list[float]] = {}

    def sadc_at(model: torch.nn.Module, t: DynTimer, key: str, area: float) -> None:
        t.total = 0.0
        model(x, _mask(h, w, area))
        dyn_times.setdefault(key, []).append(t.total)
        if model is sadc:
            fractions[area] = t.heavy_fraction()

    variants = {
        "conv3x3_48": lambda: conv(conv_x),
        "conv3x3_48_channels_last": lambda: conv_cl(conv_x_cl),
        "labnet_plain": lambda: plain(labnet)(x, mask),
        "labnet_plain_channels_last": lambda: plain(labnet_cl)(x_cl, mask),
        "labnet_channels_last": lambda: labnet_cl(x_cl, mask),
        "conv3x3_48_bf16": lambda: conv_bf16(conv_x_bf16),
        "labnet_bf16_plain": lambda: plain(labnet_bf16)(x_cl, mask),
        "labnet_bf16": lambda: labnet_bf16(x_cl, mask),
        "sadc_dense": lambda: sadc_at(sadc_dense, timer_dense, "sadc_dense", 0.15),
        **{f"sadc_sparse_area_{a}": (lambda a=a: sadc_at(sadc, timer, f"sadc_sparse_area_{a}", a)) for a in areas},
    }
    compile_info: dict = {"used": False}
    if not args.no_compile:
        print("compiling LAB-Net (inductor) ...", file=sys.stderr)
        try:
            with torch.no_grad():
                labnet_compiled, seconds = compile_labnet(build_labnet_cl(), x_cl, mask)
            variants["labnet_compiled"] = lambda: labnet_compiled(x_cl, mask)
            compile_info = {"used": True, "compile_s": seconds, "options": {"freezing": True}}
        except Exception as e:  # no C++ compiler, unsupported platform: record and go on
            compile_info = {"used": False, "error": f"{type(e).__name__}: {e}"[:300]}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        print("warm-up (one untimed call of every variant) ...", file=sys.stderr)
        for fn in variants.values():  # oneDNN primitive creation and first-touch allocation stay out of the rounds
            fn()
        dyn_times.clear()
        for r in range(args.rounds):
            print(f"timing round {r + 1}/{args.rounds} ...", file=sys.stderr)
            for name, fn in variants.items():
                reps = 10 if name.startswith("conv3x3") else 1  # the reference kernels are cheap: sample more
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    refs = ("conv3x3_48", "conv3x3_48_channels_last", "conv3x3_48_bf16")
    best = {k: conv_macs / min(times[k]) for k in refs}
    median_rate = {k: conv_macs / med[k] for k in refs}
    rate = max(best[k] for k in ("conv3x3_48", "conv3x3_48_channels_last"))
    rate_any = max(best.values())  # bf16 variants are measured against the fastest reference of all
    report["dense_conv_rate"] = {
        "what": "Conv2d 48->48 3x3 (LAB-Net's widest), input 1x48x256x256; the best sample of the faster memory "
        "format (fp32 rows), of all formats and dtypes (bf16 rows); medians for comparison",
        "gmac_per_s": rate / 1e9,
        "gmac_per_s_for_bf16": rate_any / 1e9,
        **{f"gmac_per_s_best_{k.removeprefix('conv3x3_48_') or 'nchw'}": v / 1e9 for k, v in best.items()},
        **{f"gmac_per_s_median_{k.removeprefix('conv3x3_48_') or 'nchw'}": v / 1e9 for k, v in median_rate.items()},
    }

    def eff(m: int, seconds: float) -> float:
        return (m / rate) / seconds

    def eff_bf16(m: int, seconds: float) -> float:
        return (m / rate_any) / seconds

    lab = {
        "macs_g": macs["labnet"] / 1e9,
        "latency_plain_nchw_s": med["labnet_plain"],
        "latency_plain_channels_last_s": med["labnet_plain_channels_last"],
        "latency_fused_channels_last_s": med["labnet_channels_last"],
        "latency_bf16_plain_s": med["labnet_bf16_plain"],
        "latency_bf16_fused_s": med["labnet_bf16"],
        "efficiency_plain_nchw": eff(macs["labnet"], med["labnet_plain"]),
        "efficiency_plain_channels_last": eff(macs["labnet"], med["labnet_plain_channels_last"]),
        "efficiency_fused_channels_last": eff(macs["labnet"], med["labnet_channels_last"]),
        "efficiency_bf16_plain": eff_bf16(macs["labnet"], med["labnet_bf16_plain"]),
        "efficiency_bf16_fused": eff_bf16(macs["labnet"], med["labnet_bf16"]),
        "cli": "evcli deshadow runs the fused path (fp32 channels-last; --precision bf16 for the bf16 row)",
        "peak_memory_mib": child_run("labnet_cl", w, h)["peak_mib"],
        "peak_memory_bf16_mib": child_run("labnet_bf16", w, h)["peak_mib"],
        "compile": compile_info,
    }
    print("LAB-Net fused fp32 in child processes, glibc malloc defaults vs retained ...", file=sys.stderr)
    runs = {retain: child_run("labnet_cl", w, h, reps=args.rounds, retain=retain) for retain in (False, True)}
    lab["malloc"] = {
        "what": "the fused fp32 path, each setting in a fresh process (warm-up + rounds), glibc's default malloc "
        "(large maps mmap'ed and returned on free) vs evcli.runtime.retain_freed_memory (what the CLI runs)",
        **{
            ("retained" if retain else "glibc_default"): {
                "latency_s": statistics.median(r["times"]),
                "efficiency": eff(macs["labnet"], statistics.median(r["times"])),
                "peak_memory_mib": r["peak_mib"],
                "times": r["times"],
            }
            for retain, r in runs.items()
        },
    }
    if "labnet_compiled" in med:
        lab["latency_compiled_s"] = med["labnet_compiled"]
        lab["efficiency_compiled"] = eff(macs["labnet"], med["labnet_compiled"])
    report["cost"] = {
        "size": [w, h],
        "counter": "evcli.methods.deshadow.cost.count_macs (conv + linear + ECA's functional Laplacian; "
        "attention matmuls, pooling, interpolation not counted); batch 1, shadow mask 15% of the image",
        "labnet": lab,
        "sadc": {
            "macs_dense_g": macs["sadc_dense"] / 1e9,
            "latency_sparse_s": med["sadc_sparse_area_0.1"],
            "latency_sparse_area": 0.1,
            "latency_dense_s": med["sadc_dense"],
            "efficiency_dense": eff(macs["sadc_dense"], med["sadc_dense"]),
            "peak_memory_sparse_mib": child_run("sadc", w, h)["peak_mib"],
            "note": "frozen random VGG16 hypercolumn (latency does not depend on its weights)",
        },
    }
    dense_dyn = statistics.median(dyn_times["sadc_dense"])
    report["sadc_time_vs_shadow_area"] = {
        "size": [w, h],
        "what": "whole network and its 8 DynConv layers (forward hooks); heavy_fraction = share of the dense "
        "heavy-path outputs the sparse tiles computed (mean over layers; 1.0 = the dense fallback)",
        "dense_s": med["sadc_dense"],
        "dense_dynconv_s": dense_dyn,
        "rows": [
            {
                "area": a,
                "sparse_s": med[f"sadc_sparse_area_{a}"],
                "sparse_dynconv_s": statistics.median(dyn_times[f"sadc_sparse_area_{a}"]),
                "heavy_fraction": fractions[a],
            }
            for a in areas
        ],
    }
    report["raw_times"] = times
    report["machine"]["load_average_after"] = list(os.getloadavg())
    out = ROOT / "results" / "deshadow.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("dense_conv_rate", "cost", "sadc_time_vs_shadow_area")}, indent=2))


if __name__ == "__main__":
    main()
