"""Accuracy of the sparsify methods against their baselines on Fashion-MNIST, same epochs and seeds.

Runs `evcli sparsify` (through the library, one process: the code path of the CLI) for: dense, magnitude 2:4,
SR-STE 2:4, LBC 2:4, and magnitude vs OptG at 90% unstructured (OptG with its two tie rules and the fixed-mask
finish), each over the same seeds, on timm resnet18 at 28 px, and records top-1 mean and spread with the realized
sparsity of the targeted layers.
Accuracy is the final model's on held-out test images (one evaluation, at the end: nothing is selected on
them). Training and test sets are class-balanced subsets (data.train_subset, data.val_subset) so that the
runs fit a shared 2-core machine; the JSON says how large. `--only CONFIG... --seeds S...` adds configs, or
seeds of configs, to an existing file of the same setting (per seed, the new run's value wins).

Data: Fashion-MNIST as Debian ships it (`apt-get install dataset-fashion-mnist`, MIT licence), read from its IDX
files; `--data builtin` runs on the built-in digits instead.

Usage: python bench/sparsify_accuracy.py [--epochs 5] [--train-subset 2000] [--val-subset 2000] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

CONFIGS: list[tuple[str, dict]] = [
    ("dense", {"sparsify.method": "dense"}),
    ("magnitude 2:4", {"sparsify.method": "magnitude", "sparsify.nm": "2:4"}),
    ("SR-STE 2:4", {"sparsify.method": "srste", "sparsify.nm": "2:4"}),
    ("LBC 2:4", {"sparsify.method": "lbc", "sparsify.nm": "2:4"}),
    ("magnitude 90%", {"sparsify.method": "magnitude", "sparsify.sparsity": 0.9}),
    ("OptG 90%", {"sparsify.method": "optg", "sparsify.sparsity": 0.9}),
    # the reference's tie rule: scores tied at the threshold are kept, so early epochs stay near dense
    ("OptG 90% reference ties", {"sparsify.method": "optg", "sparsify.sparsity": 0.9, "sparsify.optg_ties": "keep"}),
    # the card's fixed-mask finish for short runs: the sigmoid over the first half, one mask at exactly p after
    (
        "OptG 90% fixed tail 50%",
        {"sparsify.method": "optg", "sparsify.sparsity": 0.9, "sparsify.optg_fixed_tail": "50%"},
    ),
]


def _row(name: str, extra: dict, seeds: list[int], top1: list, sparsity: list, seconds: list) -> dict:
    return {
        "config": name,
        "overrides": extra,
        "seeds": seeds,
        "top1_per_seed": top1,
        "top1_mean": statistics.mean(top1),
        "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
        "top1_min": min(top1),
        "top1_max": max(top1),
        "sparsity_per_seed": sparsity,
        "sparsity_targeted_layers": statistics.mean(sparsity),
        "seconds_per_seed": seconds,
        "seconds_per_run": statistics.mean(seconds),
    }


def _merge_seeds(old: dict, new: dict, old_seeds: list[int]) -> dict:
    """One row from an earlier file's row and this run's row of the same config: per seed, this run's value wins."""
    seeds = old.get("seeds", old_seeds)
    n = len(seeds)
    per_seed = {
        s: (t, sp, sec)
        for s, t, sp, sec in zip(
            seeds,
            old["top1_per_seed"],
            old.get("sparsity_per_seed", [old["sparsity_targeted_layers"]] * n),
            old.get("seconds_per_seed", [old["seconds_per_run"]] * n),
        )
    }
    per_seed.update(zip(new["seeds"], zip(new["top1_per_seed"], new["sparsity_per_seed"], new["seconds_per_seed"])))
    order = sorted(per_seed)
    return _row(
        new["config"],
        new["overrides"],
        order,
        [per_seed[s][0] for s in order],
        [per_seed[s][1] for s in order],
        [per_seed[s][2] for s in order],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=28)
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="IDX folder, or 'builtin'")
    parser.add_argument("--train-subset", type=int, default=2000, help="class-balanced training images (0: all)")
    parser.add_argument("--val-subset", type=int, default=2000, help="class-balanced test images (0: all)")
    parser.add_argument("--only", nargs="+", help="run only these configs (by name)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--out", default="bench/results/sparsify_accuracy.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("EVCLI_NO_PROGRESS", "1")
    import torch

    from evcli.api import train as run_training
    from evcli.console import set_quiet
    from evcli.recipe import effective_lr, resolve_recipe

    torch.set_num_threads(args.threads)
    set_quiet(True)
    common = {
        "model.name": args.model,
        "data.img_size": args.img_size,
        "data.path": None if args.data == "builtin" else args.data,
        "data.train_subset": args.train_subset or None,
        "data.val_subset": args.val_subset or None,
        "data.batch_size": 64,
        "data.workers": 0,
        "data.hflip": 0.0 if args.data == "builtin" else 0.5,  # digits are not mirror-symmetric; clothes are
        "data.scale": [0.5, 1.0],
        "data.crop_pct": 1.0,
        "schedule.epochs": args.epochs,
        "train.eval_every": f"{args.epochs}ep",  # one evaluation, at the end
        "train.log_every": 1000,
        # from scratch, magnitude pruning is gradual (cubic ramp over the same t_i..t_f as LBC's removal)
        "sparsify.magnitude_schedule": "gradual",
    }
    rows = []
    start = time.perf_counter()
    # the file as it was before this run (--only merges into it)
    previous = json.loads(Path(args.out).read_text()) if args.only and Path(args.out).exists() else None

    def write(complete: bool) -> None:
        """The result file, rewritten after every config (a stopped bench keeps what it measured)."""
        result = {
            "benchmark": "sparsify_accuracy",
            "command": " ".join(["python bench/sparsify_accuracy.py", *(shlex.quote(a) for a in sys.argv[1:])]),
            "setting": {
                "data": data_text,
                "accuracy_on": "the final model on the val split (Fashion-MNIST: t10k test images, never trained on), "
                "evaluated once at the end: no checkpoint is selected on it",
                **{k: v for k, v in common.items() if k not in ("train.log_every",)},
                "seeds": args.seeds,
                "optim": optim + " (evcli sparsify defaults, from the resolved recipe)",
                "schedules": "LBC t_i 0, t_f 50%, p 3, per epoch; OptG beta 1, per epoch, each epoch's masks at "
                "exactly its sparsity (ties by |W|; 'reference ties': ties kept), exactly 0.9 at the end; "
                "magnitude gradual cubic t_i 0..t_f 50%; SR-STE decay 2e-4",
            },
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()},
            "torch": torch.__version__,
            "wall_seconds": round(time.perf_counter() - start, 1),
            "complete": complete,
            "results": rows,
        }
        out = Path(args.out)
        if previous is not None:
            # --only adds rows, or seeds to rows, in an existing file of the same setting; other rows are kept
            old = previous
            ignore = ("data", "seeds")
            same = {k: v for k, v in old.get("setting", {}).items() if k not in ignore} == {
                k: v for k, v in result["setting"].items() if k not in ignore
            }
            if same:
                old_seeds = old["setting"].get("seeds", [])
                merged = {r["config"]: r for r in old.get("results", [])}
                for r in rows:
                    before = merged.get(r["config"])
                    merged[r["config"]] = _merge_seeds(before, r, old_seeds) if before else r
                order = [name for name, _ in CONFIGS]
                result["results"] = sorted(merged.values(), key=lambda r: order.index(r["config"]))
                result["setting"]["seeds"] = sorted(set(old_seeds) | set(args.seeds))
                result["command"] = f"{old.get('command')}; {result['command']}"
                result["wall_seconds"] = round(old.get("wall_seconds", 0) + result["wall_seconds"], 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")

    optim = ""
    data_text = ""
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in CONFIGS:
            if args.only and name not in args.only:
                continue
            top1, sparsity, seconds = [], [], []
            for seed in args.seeds:
                flags = {**common, **extra, "train.seed": seed, "out.dir": f"{tmp}/{name.replace(' ', '_')}-{seed}"}
                recipe = resolve_recipe("sparsify", flags=flags)
                o, sc = recipe.optim, recipe.schedule
                optim = (
                    f"{o.name} lr {effective_lr(o, recipe.data.batch_size):g} (lr_base {o.lr_base:g} at batch "
                    f"{o.lr_base_batch}, batch {recipe.data.batch_size}) momentum {o.momentum} wd "
                    f"{o.weight_decay:g}, {sc.sched}, warmup {sc.warmup}"
                )
                t0 = time.perf_counter()
                report = run_training(recipe)
                data_text = report["data"]
                seconds.append(time.perf_counter() - t0)
                top1.append(report["metrics"]["top1"])
                sparsity.append(report["metrics"].get("sparsity", 0.0))
                print(f"{name} seed {seed}: top-1 {top1[-1]:.2f}% sparsity {sparsity[-1]:.4f}", file=sys.stderr)
            rows.append(_row(name, extra, list(args.seeds), top1, sparsity, seconds))
            write(complete=False)
    write(complete=True)
    for r in rows:
        spread = f"{r['top1_mean']:.2f} ± {r['top1_std']:.2f}%"
        print(f"{r['config']:>20}: top-1 {spread} (sparsity {r['sparsity_targeted_layers']:.3f})")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
