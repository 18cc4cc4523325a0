"""evcli qat: accuracy of fp32, LSQ and LTS at 2, 3 and 4 bits (same init, epochs and seed), the weight updates LTS
eliminates and the backward FLOPs that saves (counted), and the real backward wall time saved by skipping the
weight gradient of entirely frozen channels and layers (timed, interleaved A/B, medians).

Protocol (the paper's: QAT fine-tunes a full-precision model). One fp32 run from scratch (``--pre-epochs``) is the
shared start; then ``evcli qat --init-from`` it, for ``--epochs`` each: fp32 (the same training unquantized), and
LSQ and LTS at every ``--bits``. All runs go through ``evcli.api`` (the CLI's code path), one process, one
evaluation at the end of each run (nothing is selected on the val data). Accuracy is on held-out data: the
built-in digits' val split (every 5th image per class), or Fashion-MNIST's t10k test images (a class-balanced
subset when ``--val-subset`` is set; the training files give a class-balanced ``--train-subset``).

Timing: each LTS run's last checkpoint is loaded (``evcli.api.load``: the model as training left it, frozen masks
included) and one training forward+backward of a ``--batch`` batch is timed with the weight-gradient skip on and
off, interleaved, ``--reps`` times each; the medians and their ratio are recorded.

Data: Fashion-MNIST as Debian ships it (``apt-get install dataset-fashion-mnist``), or ``--data builtin``.

Usage: python bench/qat.py --data builtin --out bench/results/qat_builtin.json
       python bench/qat.py --data /usr/share/datasets/fashion-mnist --out bench/results/qat_fashion.json
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import shlex
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path


def subset_idx_folder(src: Path, dst: Path, val_subset: int, seed: int) -> None:
    """An IDX folder with the full train files (linked) and a class-balanced subset of the t10k files."""
    import numpy as np

    from evcli.data.idx import load_idx_split

    dst.mkdir(parents=True, exist_ok=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        os.symlink(src / name, dst / name)
    images, labels = load_idx_split(src, "val")
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels.tolist()))
    per = val_subset // len(classes)
    keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per] for c in classes]))
    images, labels = images[keep], labels[keep]
    n, rows, cols = images.shape
    with gzip.open(dst / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, rows, cols) + images.astype(np.uint8).tobytes())
    with gzip.open(dst / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, n) + labels.astype(np.uint8).tobytes())


def time_backward(checkpoint: Path, batch: int, img_size: int, reps: int) -> dict:
    """Median training forward+backward time of the checkpoint's model with the frozen-weight gradient skip on and
    off (interleaved), and how much of the model the skip covers."""
    import torch

    from evcli import api
    from evcli.methods.qat.method import quant_layers

    loaded = api.load(checkpoint)
    model = loaded.model.train()
    layers = [m for _, m in quant_layers(model) if m.lts is not None]
    channels = sum(m.weight.shape[0] for m in layers)
    skipped = sum(
        0 if m.lts.active_channels is None else m.weight.shape[0] - m.lts.active_channels.numel() for m in layers
    )
    whole = sum(1 for m in layers if m.lts.active_channels is not None and m.lts.active_channels.numel() == 0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)

    def step(skip: bool) -> float:
        for m in layers:
            m.skip_frozen_grad = skip
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return time.perf_counter() - t

    step(True), step(False)  # warm-up
    on, off = [], []
    for _ in range(reps):
        on.append(step(True))
        off.append(step(False))
    return {
        "lts_channels": channels,
        "channels_skipped": skipped,
        "channels_skipped_fraction": skipped / max(1, channels),
        "layers_entirely_frozen": whole,
        "lts_layers": len(layers),
        "fwd_bwd_ms_skip_on_median": 1e3 * statistics.median(on),
        "fwd_bwd_ms_skip_off_median": 1e3 * statistics.median(off),
        "time_ratio_on_over_off": statistics.median(on) / statistics.median(off),
        "wall_time_saved_fraction": 1.0 - statistics.median(on) / statistics.median(off),
        "reps": reps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="IDX folder, or 'builtin'")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=None, help="default: 28 (IDX), 32 (builtin)")
    parser.add_argument("--pre-epochs", type=int, default=2, help="fp32 epochs of the shared start")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of every QAT / fp32 fine-tuning run")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-subset", type=int, default=2000, help="class-balanced training images (0: all)")
    parser.add_argument("--val-subset", type=int, default=1000, help="class-balanced t10k images (0: all 10,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--out", default="bench/results/qat.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("EVCLI_NO_PROGRESS", "1")
    import torch

    from evcli import api
    from evcli.console import set_quiet
    from evcli.recipe import effective_lr

    torch.set_num_threads(args.threads)
    set_quiet(True)
    builtin = args.data == "builtin"
    img = args.img_size or (32 if builtin else 28)
    start = time.perf_counter()
    rows, timings = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        data = None
        if not builtin:
            data = args.data
            if args.val_subset:
                data = f"{tmp}/data"
                subset_idx_folder(Path(args.data), Path(data), args.val_subset, args.seed)
        common = {
            "model.name": args.model,
            "data.img_size": img,
            "data.path": data,
            "data.train_subset": None if builtin or not args.train_subset else args.train_subset,
            "data.batch_size": args.batch,
            "data.workers": 0,
            "data.hflip": 0.0 if builtin else 0.5,
            "data.scale": [0.5, 1.0],
            "data.crop_pct": 1.0,
            "train.seed": args.seed,
            "train.log_every": 1000,
        }

        def run(name: str, flags: dict) -> dict:
            recipe = api.resolve("qat", flags={**common, **flags, "out.dir": f"{tmp}/{name}"})
            t0 = time.perf_counter()
            report = api.train(recipe)
            seconds = time.perf_counter() - t0
            m, lts = report["metrics"], report.get("lts") or {}
            row = {
                "run": name,
                "method": recipe.method.method,
                "bits": None if recipe.method.method == "fp32" else recipe.method.bits,
                "top1": m["top1"],
                "loss": m["loss"],
                "steps": report["steps"],
                "seconds": round(seconds, 1),
                "samples_per_s_contended": report["samples_per_s"],
                "optim": {n: o for n, o in report["optimizers"].items()},
                "lr": effective_lr(recipe.optim, args.batch),
            }
            if lts:
                row.update(
                    frozen_end=m.get("frozen"),
                    updates_eliminated=lts["updates_eliminated"],
                    backward_flops_saved_counted=lts["backward_flops_saved_counted"],
                    per_epoch=[
                        {k: h[k] for k in ("epoch", "frozen_end", "updates_eliminated", "backward_flops_saved_counted")}
                        for h in lts["history"]
                    ],
                )
            print(f"{name}: top-1 {m['top1']:.2f}%" + (f", frozen {m['frozen']:.3f}" if lts else ""), file=sys.stderr)
            return {**row, "_report": report}

        pre = run("fp32-start", {"qat.method": "fp32", "schedule.epochs": args.pre_epochs, "optim.lr": 0.05})
        pre_dir = pre["_report"]["run_dir"]
        fine = {"schedule.epochs": args.epochs, "model.init_from": pre_dir, "train.eval_every": f"{args.epochs}ep"}
        rows.append(run("fp32", {**fine, "qat.method": "fp32"}))
        for b in args.bits:
            for method in ("lsq", "lts"):
                rows.append(run(f"{method}-w{b}a{b}", {**fine, "qat.method": method, "qat.bits": b}))
                if method == "lts":
                    ckpt = Path(rows[-1]["_report"]["run_dir"]) / "checkpoints" / "last.safetensors"
                    timings[f"lts-w{b}a{b}"] = time_backward(ckpt, args.batch, img, args.reps)
        data_text = pre["_report"]["data"]
        pre_row = {k: v for k, v in pre.items() if k != "_report"}
        rows = [{k: v for k, v in r.items() if k != "_report"} for r in rows]
    fp32 = next(r["top1"] for r in rows if r["method"] == "fp32")
    for r in rows:
        r["top1_minus_fp32"] = r["top1"] - fp32
    by = {r["run"]: r for r in rows}
    for b in args.bits:
        by[f"lts-w{b}a{b}"]["top1_minus_lsq"] = by[f"lts-w{b}a{b}"]["top1"] - by[f"lsq-w{b}a{b}"]["top1"]
    result = {
        "benchmark": "qat",
        "command": " ".join(["python bench/qat.py", *(shlex.quote(a) for a in sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_contended": True,
        "setting": {
            "data": data_text,
            "subsets": None
            if builtin
            else {
                "train": f"class-balanced {args.train_subset} of the 60,000 train images (data.train_subset)"
                if args.train_subset
                else "all 60,000",
                "val": f"class-balanced {args.val_subset} of the 10,000 t10k test images (seed {args.seed})"
                if args.val_subset
                else "all 10,000 t10k",
            },
            "accuracy_on": "the final model of each run on held-out val data, evaluated once at the end (no selection)",
            "model": args.model,
            "img_size": img,
            "batch": args.batch,
            "start": f"fp32 from scratch, {args.pre_epochs} epochs, sgd lr 0.05 (top-1 {pre_row['top1']:.2f}%)",
            "qat_runs": f"{args.epochs} epoch(s) each from that start, seed {args.seed}; evcli qat defaults: sgd "
            "lr_base 0.01 at 256 (scaled), cosine, wd 1e-4; quantizer Adam 1e-4; first conv + classifier 8-bit; LTS "
            "γ 0.99, warm-up 20%, linear ρ, fixed weight step",
            "flops_counter": "counted, not timed: backward = dX + dW with equal MACs per quantized Conv2d/Linear; a "
            "frozen weight saves its share of dW; norms, activations and the forward are not counted",
            "timing": "fwd+bwd of one batch of the LTS run's last checkpoint (its end-of-training frozen masks), "
            "weight-gradient skip on vs off, interleaved, medians",
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "start_run": pre_row,
        "results": rows,
        "backward_timing": timings,
        "paper": "LTS abstract: 50-70% (other revision: 30-60%) of weight updates and 25-35% (15-30%) of backward "
        "FLOPs eliminated, accuracy on par with or better than the baseline",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        extra = (
            f" updates eliminated {100 * r['updates_eliminated']:.1f}%, "
            f"bwd FLOPs saved {100 * r['backward_flops_saved_counted']:.1f}% (counted)"
            if "updates_eliminated" in r
            else ""
        )
        print(f"{r['run']:>10}: top-1 {r['top1']:.2f}%{extra}")
    for k, t in timings.items():
        saved, frac = 100 * t["wall_time_saved_fraction"], t["channels_skipped_fraction"]
        print(f"{k}: skip saves {saved:.1f}% of fwd+bwd ({frac:.2f} of channels skipped)")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
