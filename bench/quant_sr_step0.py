"""Where does a 2-bit `evcli quant-sr` EDSR lose its body? The full-precision teacher is quantized with PAMS and
DDTB and calibrated exactly as a quantized run starts (the method's own ``calibrate`` on the training loader's first
batches: dynamic-layer choice, bound initialisation), then scored *before any fine-tuning* on the held-out sets,
with parts of the quantization switched off:

* ``all``: everything quantized (what fine-tuning starts from);
* ``weights_only``: quantized conv weights, activation quantizers off;
* ``acts_only``: all activation quantizers on, full-precision weights;
* ``act1_only`` / ``act2_only`` / ``act3_only``: one activation quantizer per block on (act1: the block input
  on the skip branch, act2: after the ReLU, act3: the block output before the skip add), full-precision weights;

next to the teacher as trained and with its residual body switched off (``feat = head(x)``). Scoring is the
method's own ``eval_step`` / ``summarize`` (PSNR / SSIM on Y, border = scale, whole images). The data are the
folders that ``bench/quant_sr.py --work`` prepares.

    python bench/quant_sr_step0.py --teacher RUN --work FOLDER --blocks 8 --channels 32 [--bits 2 3 4]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from types import SimpleNamespace

import torch


class _Modules:
    """The two views of built modules that the method's hooks read (``unwrap`` for calibration, attributes for
    evaluation)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def unwrap(self, name: str) -> torch.nn.Module:
        return getattr(self, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, required=True, help="an fp32 quant-sr run trained on --work's train/")
    ap.add_argument("--work", type=Path, required=True, help="the data folder of bench/quant_sr.py --work")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--calib", type=int, default=10)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "quant_sr_step0.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("EVCLI_NO_PROGRESS", "1")
    torch.set_num_threads(args.threads)
    from evcli import api
    from evcli.console import set_quiet
    from evcli.data.loading import ShardedBatchSampler, make_loader
    from evcli.data.sr import build_sr_data
    from evcli.methods.quant_sr import models
    from evcli.methods.quant_sr.method import QuantSRMethod, collate_sr

    set_quiet(True)
    work = args.work
    sets = [s for s in ("builtin", "opencv") if (work / "benchmark" / s).is_dir()]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quant_sr import data_sets

    base = [
        *data_sets(work, sets, args.blocks, args.channels, args.patch, args.batch),
        f"quant-sr.teacher={args.teacher}",
        f"quant-sr.calib_batches={args.calib}",
    ]

    def score(method: QuantSRMethod, model: torch.nn.Module, data) -> dict:
        model.eval()
        out = {}
        with torch.no_grad():
            for name, ds in data.val.items():
                sums = None
                for i in range(len(ds)):
                    t = method.eval_step(_Modules(model), collate_sr([ds[i]]), None)["totals"]
                    sums = t if sums is None else sums + t
                m = method.summarize({"totals": sums}, None)
                out[name] = {"psnr": round(m["psnr"], 3), "ssim": round(m["ssim"], 4)}
        return out

    as_trained = models.SRNet.forward_features

    def body_off(self, lr):  # SRNet.forward_features without the residual body
        x = self.head(lr * models.RGB_RANGE - self.mean)
        return (self.tail(self.upsample(x)) + self.mean) / models.RGB_RANGE, x

    results: dict = {}
    data = None
    for bits in args.bits:
        for qmethod in ("pams", "ddtb"):
            recipe = api.resolve("quant-sr", sets=[*base, f"quant-sr.bits={bits}", f"quant-sr.method={qmethod}"])
            if data is None:
                data = build_sr_data(recipe)
            method = QuantSRMethod(recipe)
            if "fp32" not in results:
                teacher = method.build(SimpleNamespace(training=True))["teacher"].module
                results["fp32"] = {"as_trained": score(method, teacher, data)}
                models.SRNet.forward_features = body_off
                try:
                    results["fp32"]["body_off"] = score(method, teacher, data)
                finally:
                    models.SRNet.forward_features = as_trained
                print("fp32", results["fp32"], file=sys.stderr)
            row = {}
            for variant in ("all", "weights_only", "acts_only", "act1_only", "act2_only", "act3_only"):
                model = method.build(SimpleNamespace(training=True))["model"]
                sampler = ShardedBatchSampler(len(data.train), args.batch, seed=recipe.train.seed, train=True)
                loader = make_loader(data.train, sampler, 0, False, collate_sr)  # the run's own calibration batches

                def batches(loader=loader):
                    for i, b in enumerate(loader):
                        if i >= args.calib:
                            break
                        yield b

                with torch.no_grad():
                    method.calibrate(_Modules(model), batches(), None)
                if variant != "all" and variant != "weights_only":
                    for conv in (c for _, c in model.quant_convs()):
                        conv.quantized_weight = lambda c=conv: c.weight  # full-precision weights
                if variant == "weights_only":
                    for _, q in model.act_quantizers():
                        q.enabled.fill_(False)
                elif variant.startswith("act") and variant != "acts_only":
                    keep = "quant_" + variant.split("_")[0]
                    for n, q in model.act_quantizers():
                        q.enabled.fill_(n.endswith(keep))
                row[variant] = score(method, model, data)
            row["dynamic_quantizers"] = len(method.calibration["dynamic"])
            results[f"{qmethod}_{bits}bit"] = row
            print(qmethod, bits, {k: v for k, v in row.items()}, file=sys.stderr)

    out = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "torch": torch.__version__,
        "teacher": str(args.teacher),
        "network": f"EDSR {args.blocks} blocks x {args.channels} channels, x4",
        "calibration": f"the method's calibrate on the first {args.calib} batches of the training loader, as a run's "
        f"calibration sees them ({args.batch} x {args.patch} px HR), bound init M = 99 for every bit width "
        "(quant-sr.bound_init all_bits)",
        "fine_tuning": "none: every quantized row is the model a quantized run starts training from",
        "metric": "PSNR / SSIM on Y (border = scale), whole held-out images, the method's eval_step",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
