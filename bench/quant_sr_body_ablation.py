"""Does the quantized body of a `evcli quant-sr` EDSR contribute? Each given run (fp32 or quantized) is scored on
its own held-out sets twice through ``evcli.api.evaluate`` (the CLI's evaluation): as trained, and with the
residual body switched off (``feat = head(x)`` instead of ``body_tail(body(head(x))) + head(x)``: the fp32 head,
upsampler and tail alone, as fine-tuned in that run). If a quantized model scores the same without its body, its
gain over bicubic comes from the full-precision layers, not from the quantized ones.

    python bench/quant_sr_body_ablation.py RUN [RUN ...] --out bench/results/quant_sr_body_ablation.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="quant-sr run folders")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("EVCLI_NO_PROGRESS", "1")
    torch.set_num_threads(args.threads)
    from evcli import api
    from evcli.console import set_quiet
    from evcli.methods.quant_sr import models

    set_quiet(True)
    as_trained = models.SRNet.forward_features

    def body_off(self, lr):  # the same computation as SRNet.forward_features without the residual body
        x = self.head(lr * models.RGB_RANGE - self.mean)
        return (self.tail(self.upsample(x)) + self.mean) / models.RGB_RANGE, x

    results = {}
    for run in args.runs:
        recipe = api.load(run).recipe
        row = {"bits": recipe.method.bits, "method": recipe.method.method if recipe.method.bits < 32 else "fp32"}
        for name, forward in (("as_trained", as_trained), ("body_off", body_off)):
            models.SRNet.forward_features = forward
            try:
                m = api.evaluate(recipe, run)["metrics"]
            finally:
                models.SRNet.forward_features = as_trained
            sets = sorted({k.split("/")[0] for k in m if k.endswith("/psnr")})
            row[name] = {s: {"psnr": round(m[f"{s}/psnr"], 3), "ssim": round(m[f"{s}/ssim"], 4)} for s in sets}
            row["bicubic"] = {s: round(m[f"{s}/psnr_bicubic"], 3) for s in sets}
        row["body_gain_db"] = {s: round(row["as_trained"][s]["psnr"] - row["body_off"][s]["psnr"], 3) for s in sets}
        results[str(run)] = row
        print(run, row["body_gain_db"], file=sys.stderr)
    out = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "metric": "PSNR / SSIM on Y (border = scale), whole held-out images, final weights of each run",
        "body_gain_db": "as_trained - body_off PSNR: what the (quantized) residual body adds",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
