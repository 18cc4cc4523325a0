"""SMMix benchmark: train-step cost of smmix vs cutmix vs none, and accuracy on the built-in data.

Part ``cost`` (one process, interleaved): three prepared evcli Trainers of ``evcli mix`` on the same
ViT, same initial weights, same pre-made batch; each round times one ``Trainer._train_step`` of each
method in rotating order. SMMix takes its SMMix branch on half the steps (Mixup on the rest), so the
per-method cost is the **mean** step time. Then, on the same batch, the SMMix branch is broken down:
the no-grad motivating forward, the window search + paste, and the rest (the training forward with
the token head, the extra losses, backward and the optimizer step).

Part ``accuracy``: ``evcli mix --recipe mix/quickstart --method M --seed S --epochs E --data D`` for
M in none/mixup/cutmix/mixup-cutmix (DeiT's switch, SMMix's own baseline)/smmix and 3 seeds, each in its own
process; mean and spread of the final model's top-1 on the val split, evaluated once at the end (nothing is
selected on it). The data is Fashion-MNIST (Debian's `dataset-fashion-mnist`, MIT licence; its 10,000 test images
are the val split) with a class-balanced training subset that fits a 2-core machine, or the built-in digits with
``--data builtin``.
Part ``ablation``: the same for SMMix without its consistency term, and without both extra terms.

Usage::

    python bench/smmix.py --part cost
    python bench/smmix.py --part accuracy --epochs 6 --train-subset 2000
    python bench/smmix.py --part ablation --epochs 6 --seeds 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

METHODS = ("none", "cutmix", "mixup-cutmix", "smmix")


def command_line() -> str:
    return " ".join(["python bench/smmix.py", *(shlex.quote(a) for a in sys.argv[1:])])


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }


def build(method: str, args: argparse.Namespace, switch_prob: float = 0.5) -> Any:
    """A prepared Trainer of ``evcli mix`` (no run folder)."""
    from evcli.engine.trainer import Trainer
    from evcli.recipe import resolve_recipe
    from evcli.registry import get_command

    flags = {
        "model.name": args.model,
        "data.img_size": args.img_size,
        "model.patch_size": args.patch_size,
        "data.batch_size": args.batch_size,
        "data.workers": 0,
        "schedule.epochs": 1,
        "schedule.sched": "constant",
        "mix.method": method,
        "mix.switch_prob": switch_prob,
    }
    recipe = resolve_recipe("mix", flags=flags)
    trainer = Trainer(recipe, get_command("mix").load_method_class()(recipe), run_dir=None)
    trainer._setup_training()
    return trainer


def forever(batch: Any) -> Iterator[Any]:
    while True:
        yield batch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def part_cost(args: argparse.Namespace) -> dict[str, Any]:
    from evcli.methods.mix import smmix as sm

    trainers = {m: build(m, args) for m in METHODS}
    reference = trainers["none"].eval_modules().unwrap("model").state_dict()
    for m in METHODS[1:]:
        trainers[m].method.backbone(trainers[m].eval_modules().unwrap("model")).load_state_dict(reference)
    t0 = trainers["none"]
    x, y = next(iter(t0.train_loader))
    batch = (x.to(t0.accelerator.device), y.to(t0.accelerator.device))
    streams = {m: forever(batch) for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    branch: list[float] = []
    for i in range(args.warmup + args.steps):
        order = METHODS[i % len(METHODS) :] + METHODS[: i % len(METHODS)]
        for m in order:
            tr = trainers[m]
            sync()
            start = time.perf_counter()
            out = tr._train_step(streams[m])
            sync()
            elapsed = time.perf_counter() - start
            tr.ctx.step += 1
            if i >= args.warmup:
                times[m].append(elapsed)
                if m == "smmix":
                    branch.append(float(out.logs.get("smmix", torch.tensor(0.0))))
    # breakdown of the SMMix branch on the same batch
    tr = trainers["smmix"]
    net = tr.eval_modules().unwrap("model")
    adapter, grid = net.adapter, tr.method.grid
    motivating, mixing = [], []
    for _ in range(args.steps):
        sync()
        a = time.perf_counter()
        net.eval()
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False), adapter.capture() as maps:
            net(batch[0].float())
        net.train()
        sync()
        b = time.perf_counter()
        scores = adapter.patch_scores(maps[-1])
        sm.smmix_images(batch[0], scores, grid, tr.method.sides[len(tr.method.sides) // 2])
        sync()
        c = time.perf_counter()
        motivating.append(b - a)
        mixing.append(c - b)
    smmix_branch = [t for t, s in zip(times["smmix"], branch) if s == 1.0]
    mixup_branch = [t for t, s in zip(times["smmix"], branch) if s == 0.0]
    mean = {m: statistics.fmean(v) for m, v in times.items()}
    med = statistics.median
    breakdown = {
        "smmix_branch_mean_s": statistics.fmean(smmix_branch) if smmix_branch else None,
        "mixup_branch_mean_s": statistics.fmean(mixup_branch) if mixup_branch else None,
        "motivating_forward_median_s": med(motivating),
        "window_search_and_paste_median_s": med(mixing),
    }
    if smmix_branch and mixup_branch:
        extra = breakdown["smmix_branch_mean_s"] - breakdown["mixup_branch_mean_s"]
        breakdown["smmix_branch_extra_s"] = extra
        breakdown["extra_not_motivating_or_mixing_s"] = extra - med(motivating) - med(mixing)
    return {
        "model": args.model,
        "img_size": args.img_size,
        "patch_size": args.patch_size,
        "batch_size": args.batch_size,
        "steps_per_method": args.steps,
        "warmup_steps": args.warmup,
        "mean_step_s": mean,
        "median_step_s": {m: med(v) for m, v in times.items()},
        "times_s": times,
        "smmix_branch_taken": branch,
        "ratio_smmix_over_cutmix": mean["smmix"] / mean["cutmix"],
        "ratio_smmix_over_mixup_cutmix": mean["smmix"] / mean["mixup-cutmix"],
        "ratio_cutmix_over_none": mean["cutmix"] / mean["none"],
        "target_ratio_smmix_over_cutmix": 1.20,
        "met": mean["smmix"] / mean["cutmix"] <= 1.20,
        "smmix_breakdown": breakdown,
        "notes": "data loading excluded (the same pre-made batch every step); means because SMMix takes its "
        "SMMix branch on ~half the steps; sides interleaved in rotating order in one process.",
    }


ABLATIONS = {
    "smmix": [],
    "smmix_no_consistency": ["--set", "mix.consistency_weight=0"],
    "smmix_no_fine_no_consistency": ["--set", "mix.consistency_weight=0", "--set", "mix.fine_weight=0"],
}


def data_args(args: argparse.Namespace) -> list[str]:
    if args.data == "builtin":
        return []
    # clothes are mirror-symmetric (the quickstart turns flips off for digits); one evaluation, at the end
    return ["--data", args.data, "--set", f"data.train_subset={args.train_subset}", "--set", "data.hflip=0.5"]


def part_accuracy(
    args: argparse.Namespace,
    methods: tuple[str, ...] = ("none", "mixup", "cutmix", "mixup-cutmix", "smmix"),
    save: Any = None,
) -> dict[str, Any]:
    """Every (seed, method) run in its own process; ``save(partial)`` after each, so a stopped bench keeps what ran."""
    runs: list[dict[str, Any]] = []
    data = ""
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for method in methods:
                variant = ["--method", "smmix", *ABLATIONS[method]] if method in ABLATIONS else ["--method", method]
                cmd = [sys.executable, "-m", "evcli", "mix", "--recipe", "mix/quickstart", *variant, *data_args(args)]
                cmd += ["--seed", str(seed), "--epochs", str(args.epochs), "-o", f"{tmp}/{method}-{seed}", "--json"]
                cmd += ["--set", f"train.eval_every={args.epochs}ep"]
                start = time.perf_counter()
                proc = subprocess.run([*cmd, "-q"], capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(proc.stderr)
                report = json.loads(proc.stdout)
                data = report["data"]
                runs.append(
                    {
                        "method": method,
                        "seed": seed,
                        "top1": report["metrics"]["top1"],
                        "top5": report["metrics"]["top5"],
                        "best_top1": report["best"].get("top1"),
                        "wall_s": round(time.perf_counter() - start, 1),
                    }
                )
                print(f"  {method:7s} seed {seed}: top-1 {runs[-1]['top1']:.2f}", file=sys.stderr)
                if save is not None:
                    save(_accuracy_result(args, methods, runs, data, partial=True))
    return _accuracy_result(args, methods, runs, data, partial=False)


def _accuracy_result(
    args: argparse.Namespace, methods: tuple[str, ...], runs: list[dict[str, Any]], data: str, partial: bool
) -> dict[str, Any]:
    summary = {}
    for method in methods:
        top1 = [r["top1"] for r in runs if r["method"] == method]
        if not top1:
            continue
        summary[method] = {
            "top1_mean": statistics.fmean(top1),
            "top1_std": statistics.stdev(top1) if len(top1) > 1 else None,
            "top1_min": min(top1),
            "top1_max": max(top1),
            "n": len(top1),
        }
    return {
        "recipe": "mix/quickstart",
        "epochs": args.epochs,
        "seeds": args.seeds,
        "runs": runs,
        "summary": summary,
        **({"partial": "the bench was still running when this was written"} if partial else {}),
        "data": data,
        "accuracy_on": "the final model on the val split (Fashion-MNIST: the 10,000 t10k test images), evaluated once "
        "at the end: no checkpoint is selected on it",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["cost", "accuracy", "ablation"], required=True)
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="IDX folder, or 'builtin'")
    parser.add_argument("--train-subset", type=int, default=2000, help="class-balanced training images")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    out = Path(args.out or f"bench/results/smmix_{args.part}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(part: dict[str, Any]) -> dict[str, Any]:
        result = {
            "benchmark": f"smmix_{args.part}",
            "command": command_line(),
            "machine": machine(),
            **part,
            "bench_wall_s": round(time.perf_counter() - started, 1),
        }
        out.write_text(json.dumps(result, indent=2) + "\n")
        return result

    if args.part == "cost":
        result = save(part_cost(args))
    elif args.part == "accuracy":
        result = save(part_accuracy(args, save=save))
    else:  # which SMMix term makes the difference, same recipe and seeds
        result = save(part_accuracy(args, tuple(ABLATIONS), save=save))
    if args.part == "cost":
        print(f"smmix/cutmix = {result['ratio_smmix_over_cutmix']:.3f} (mean step {result['mean_step_s']}) -> {out}")
    else:
        print(json.dumps(result["summary"], indent=1), f"-> {out}")


if __name__ == "__main__":
    main()
