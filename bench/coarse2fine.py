"""CF-ViT bench: FLOPs per stage of DeiT-S against the card, and accuracy / FLOPs / CPU throughput of a CF-ViT against
the dense ViT of the same size on Fashion-MNIST and on the built-in digits, through the code path the CLI runs.

    python bench/coarse2fine.py          # writes bench/results/coarse2fine.json (about 40 min at one thread)

1. FLOPs: DeiT-S (timm deit_small_patch16_224) at 224 px, batch 1, counted by evcli.ops.flops (named in the JSON):
   dense, CF-ViT 7x7 coarse / fine / eta=1 total, CF-ViT 9x9 at 288 px; torch's FlopCounterMode next to it (fused
   attention on CPU, which it does not count, and plain matmul attention).
2. Per data set: a dense ViT of DeiT-Tiny's width (96 x 6 blocks, 3 heads, 4 px patches, 32 px) trained from
   scratch, then a CF-ViT of the same size fine-tuned from it for half as many epochs (``--init-from`` the dense
   run, the workflow of the README; ``--cfvit-init scratch`` trains it from scratch like the dense run instead),
   through ``evcli.api.train``, what ``evcli coarse2fine`` runs. The threshold eta is picked on a held-out *selection*
   split (never trained on): the eta with the fewest FLOPs whose accuracy is within 0.5 points of the eta=1
   accuracy there. Then, on the *test* split (never trained on, never used to pick anything): accuracy and FLOPs at
   every eta (``sweep_run``, the code of ``evcli coarse2fine sweep``), and throughput of ``CFViT.early_exit`` at the
   picked eta and at eta=1 against the dense ViT, batch 64, interleaved repeats, medians.
   Fashion-MNIST: train = the first --train-images of its train files, selection = the next --select-images of them,
   test = the first --test-images of t10k. Built-in digits: train = the built-in train split minus every 4th image
   (selection), test = the built-in val split.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import shutil
import struct
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("EVCLI_NO_PROGRESS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_idx(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """IDX files (gzip) as MNIST ships them."""
    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = images.shape
    with gzip.open(folder / f"{split}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x00000803, n, rows, cols) + images.astype(np.uint8).tobytes())
    with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x00000801, n) + labels.astype(np.uint8).tobytes())


def split_folders(work: Path, name: str, train, select, test) -> tuple[Path, Path]:
    """Two IDX folders: ``<name>-fit`` (train / val = selection split) and ``<name>-test`` (val = test split)."""
    fit, tst = work / f"{name}-fit", work / f"{name}-test"
    for folder in (fit, tst):
        shutil.rmtree(folder, ignore_errors=True)
    write_idx(fit, "train", *train)
    write_idx(fit, "t10k", *select)
    write_idx(tst, "train", train[0][:64], train[1][:64])  # unused by evaluation, required by the layout
    write_idx(tst, "t10k", *test)
    return fit, tst


def fashion_splits(work: Path, n_train: int, n_select: int, n_test: int) -> tuple[Path, Path, str]:
    from evcli.data.idx import load_idx_split

    images, labels = load_idx_split(FASHION, "train")
    test_images, test_labels = load_idx_split(FASHION, "val")
    fit, tst = split_folders(
        work,
        "fashion-mnist",
        (images[:n_train], labels[:n_train]),
        (images[n_train : n_train + n_select], labels[n_train : n_train + n_select]),
        (test_images[:n_test], test_labels[:n_test]),
    )
    what = (
        f"Fashion-MNIST ({FASHION}): train = train files [0, {n_train}), selection = train files "
        f"[{n_train}, {n_train + n_select}), test = t10k [0, {n_test})"
    )
    return fit, tst, what


def digits_splits(work: Path) -> tuple[Path, Path, str]:
    from evcli.data.classification import builtin_digits

    train, val = builtin_digits()

    def arrays(src, idx):
        idx = list(idx)
        return src.images[idx], np.asarray([src.labels[i] for i in idx])

    n = len(train.labels)
    keep = [i for i in range(n) if i % 4]
    sel = [i for i in range(n) if i % 4 == 0]
    fit, tst = split_folders(
        work, "digits", arrays(train, keep), arrays(train, sel), arrays(val, range(len(val.labels)))
    )
    what = (
        f"built-in digits (scikit-learn): train = built-in train split minus every 4th image ({len(keep)}), "
        f"selection = every 4th ({len(sel)}), test = built-in val split ({len(val.labels)})"
    )
    return fit, tst, what


def flops_section() -> dict:
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    from evcli.methods.coarse2fine.model import CFViT, fine_tokens, stage_macs
    from evcli.ops.flops import COUNTER, count_macs

    dense = timm.create_model("deit_small_patch16_224", num_classes=1000).eval()
    ours = sum(r.macs for r in count_macs(dense, (3, 224, 224)))
    with torch.no_grad(), FlopCounterMode(display=False) as fused:
        dense(torch.zeros(1, 3, 224, 224))
    for blk in dense.blocks:
        blk.attn.fused_attn = False
    with torch.no_grad(), FlopCounterMode(display=False) as plain:
        dense(torch.zeros(1, 3, 224, 224))
    for blk in dense.blocks:
        blk.attn.fused_attn = True
    c7 = stage_macs(CFViT(dense, 7).eval())
    c9 = stage_macs(CFViT(timm.create_model("deit_small_patch16_224", num_classes=1000, img_size=288), 9).eval())
    g = lambda v: round(v / 1e9, 4)  # noqa: E731
    return {
        "counter": COUNTER,
        "model": "timm deit_small_patch16_224, batch 1; GFLOPs = G multiply-accumulates (the ViT papers' convention)",
        "params_M": round(sum(p.numel() for p in dense.parameters()) / 1e6, 3),
        "dense_224": {
            "evcli": g(ours),
            "card": 4.6,
            "torch_FlopCounterMode_fused_cpu": g(fused.get_total_flops() / 2),
            "torch_FlopCounterMode_plain_attention": g(plain.get_total_flops() / 2),
        },
        "cfvit_7x7": {
            "coarse": g(c7["coarse"]),
            "fine": g(c7["fine"]),
            "eta1_total": g(c7["total"]),
            "card": {"coarse": 1.1, "fine": 2.9, "eta1_total": 4.0},
            "fine_tokens": fine_tokens(7, 0.5),
        },
        "cfvit_9x9_288px": {
            "coarse": g(c9["coarse"]),
            "fine": g(c9["fine"]),
            "eta1_total": g(c9["total"]),
            "card": {"coarse": 1.8, "fine": 4.9, "eta1_total": 6.8},
            "fine_tokens": fine_tokens(9, 0.5),
        },
    }


def train(fit: Path, method: str, out: Path, args, epochs: int, init_from: Path | None = None) -> tuple[dict, float]:
    from evcli import api

    flags = {
        "model.name": "deit_tiny_patch16_224",
        "model.patch_size": 4,
        "model.kwargs": {"embed_dim": args.dim, "depth": args.depth, "num_heads": args.heads},
        "data.path": str(fit),
        "data.img_size": 32,
        "data.batch_size": args.batch_size,
        "data.workers": 0,
        "data.hflip": 0.0,
        "data.scale": [args.min_scale, 1.0],
        "data.crop_pct": 1.0,
        "optim.lr": args.lr,
        "schedule.epochs": epochs,
        "schedule.warmup": "5%",
        "train.eval_every": "100%",  # one evaluation (of the selection split) at the end: nothing picks a checkpoint
        "train.log_every": 50,
        "coarse2fine.method": method,
        "coarse2fine.mix_prob": args.mix_prob,  # a few hundred steps: Mixup/CutMix only slow the start down
        "coarse2fine.label_smoothing": args.label_smoothing,
        "out.dir": str(out),
    }
    if init_from is not None:
        flags["model.init_from"] = str(init_from)
    shutil.rmtree(out, ignore_errors=True)
    recipe = api.resolve("coarse2fine", flags=flags)
    start = time.perf_counter()
    report = api.train(recipe)
    return report, time.perf_counter() - start


def dataset_section(name: str, fit: Path, tst: Path, what: str, work: Path, args, epochs: int) -> dict:
    from evcli import api
    from evcli.methods.coarse2fine.sweep import pick_threshold, sweep_run

    cf_run, dense_run = work / f"{name}-cfvit", work / f"{name}-dense"
    dense_report, dense_s = train(fit, "dense", dense_run, args, epochs)
    fine_tune = args.cfvit_init == "dense"  # evcli coarse2fine --init-from <the dense run>: fine-tune into a CF-ViT
    cf_epochs = max(1, round(epochs * args.finetune_fraction)) if fine_tune else epochs
    cf_report, cf_s = train(fit, "cfvit", cf_run, args, cf_epochs, init_from=dense_run if fine_tune else None)
    etas = [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 1.0]

    def recipe_on(folder: Path):
        return api.evaluation_recipe("coarse2fine", cf_run, None, {"data.path": str(folder)}, [])

    # 1. pick eta on the selection split (FLOPs only: no timing needed to pick)
    sel = sweep_run(cf_run, recipe_on(fit), etas, None, batch_size=64, timing_batches=1, repeats=1, timed=[])
    ref = next(r["top1"] for r in sel["rows"] if r["eta"] == 1.0)
    pick = pick_threshold(sel["rows"], ref, args.tolerance)
    eta = pick["eta"]
    # 2. the test split: accuracy and FLOPs at every eta; throughput at the pick and at eta=1, against the dense ViT
    test = sweep_run(
        cf_run,
        recipe_on(tst),
        etas,
        dense_run,
        batch_size=64,
        timing_batches=args.timing_batches,
        repeats=args.repeats,
        timed=sorted({eta, 1.0}),
    )
    at = {r["eta"]: r for r in test["rows"]}
    picked, full, dense = at[eta], at[1.0], test["dense"]
    return {
        "data": what,
        "train": {
            "recipe": {k: v for k, v in cf_report.items() if k in ("model", "steps", "epochs")},
            "dense": {"epochs": epochs, "steps": dense_report.get("steps")},
            "cfvit": {
                "init": "fine-tuned from the dense run's final weights (--init-from)"
                if args.cfvit_init == "dense"
                else "from scratch, same recipe and epochs as the dense run",
                "epochs": cf_epochs,
                "steps": cf_report.get("steps"),
            },
            "optim": f"adamw lr {args.lr} (batch {args.batch_size}), wd 0.05, cosine, 5% warm-up; label smoothing "
            f"{args.label_smoothing}; Mixup/CutMix prob {args.mix_prob}; crops of {args.min_scale}-1 of the area, "
            "no flips",
            "model_kwargs": {
                "embed_dim": args.dim,
                "depth": args.depth,
                "num_heads": args.heads,
                "patch": 4,
                "img_size": 32,
                "coarse_grid": 4,
            },
            "seconds": {"dense": round(dense_s, 1), "cfvit": round(cf_s, 1)},
            "parameters": {"dense": dense_report["parameters"], "cfvit": cf_report["parameters"]},
        },
        "selection": {
            "rule": f"fewest FLOPs with top-1 >= eta=1 top-1 - {args.tolerance} on the selection split",
            "eta1_top1": ref,
            "picked_eta": eta,
            "rows": sel["rows"],
        },
        "test": {
            "rows": test["rows"],
            "cfvit_top1_eta1": full["top1"],
            "cfvit_top1_coarse_only": test["top1_coarse"],
            "cfvit_top1_at_pick": picked["top1"],
            "within_tolerance_on_test": picked["top1"] >= full["top1"] - args.tolerance,
            "exit_ratio_at_pick": picked["exit_ratio"],
            "gflops": {"dense": dense["gflops"], "cfvit_eta1": full["gflops"], "cfvit_at_pick": picked["gflops"]},
            "dense_top1": dense["top1"],
            "images_per_s": {
                "dense": dense["images_per_s"],
                "cfvit_eta1": full["images_per_s"],
                "cfvit_at_pick": picked["images_per_s"],
            },
            "speedup_at_pick_vs_dense": picked["speedup_vs_dense"],
            "speedup_eta1_vs_dense": full["speedup_vs_dense"],
            "target_speedup": 2.0,
            "meets_target": bool(picked["speedup_vs_dense"] >= 2.0),
            "timing": test["timing"],
            "timing_runs_s": {
                "dense": dense["timing_runs_s"],
                "cfvit_at_pick": picked["timing_runs_s"],
                "cfvit_eta1": full["timing_runs_s"],
            },
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "coarse2fine.json"))
    p.add_argument("--work", default="/tmp/evcli-bench-coarse2fine")
    p.add_argument("--datasets", default="fashion,digits")
    p.add_argument("--train-images", type=int, default=8000)
    p.add_argument(
        "--select-images", type=int, default=8000, help="selection split (resolves a 0.5-point rule: 2,000 did not)"
    )
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=8, help="Fashion-MNIST training epochs (the dense ViT)")
    p.add_argument("--digits-epochs", type=int, default=20)
    p.add_argument(
        "--cfvit-init",
        choices=["dense", "scratch"],
        default="dense",
        help="dense: fine-tune the dense run into a CF-ViT (--init-from); scratch: train it like the dense run",
    )
    p.add_argument("--finetune-fraction", type=float, default=0.5, help="CF-ViT fine-tune epochs / dense epochs")
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timing-batches", type=int, default=6)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tolerance", type=float, default=0.5)
    p.add_argument("--mix-prob", type=float, default=0.0, help="Mixup/CutMix probability (paper recipe: 1.0)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="the command's default")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-scale", type=float, default=0.9, help="RandomResizedCrop area range [min, 1]")
    p.add_argument("--batch-size", type=int, default=32, help="training batch (timing is always batch 64)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict = {
        "bench": "coarse2fine",
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch_threads": args.threads},
        "torch": torch.__version__,
        "cpu_contended": True,
        "flops": flops_section(),
    }
    print(json.dumps(result["flops"], indent=1), file=sys.stderr)
    for name in args.datasets.split(","):
        if name == "fashion":
            fit, tst, what = fashion_splits(work, args.train_images, args.select_images, args.test_images)
        elif name == "digits":
            fit, tst, what = digits_splits(work)
        else:
            raise SystemExit(f"unknown data set {name}")
        epochs = args.epochs if name == "fashion" else args.digits_epochs
        section_start = time.perf_counter()
        result[name] = dataset_section(name, fit, tst, what, work, args, epochs)
        result[name]["recorded_by"] = {
            "command": result["command"],
            "date": result["date"],
            "seconds": round(time.perf_counter() - section_start, 1),
        }
        print(json.dumps({k: v for k, v in result[name]["test"].items() if k != "rows"}, indent=1), file=sys.stderr)
    result["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # a run of some data sets keeps the other data sets' sections of the file, with their commands
        previous = json.loads(out.read_text())
        for name in ("fashion", "digits"):
            if name not in result and name in previous:
                result[name] = previous[name]
                result[name].setdefault(
                    "recorded_by", {"command": previous.get("command"), "date": previous.get("date")}
                )
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
