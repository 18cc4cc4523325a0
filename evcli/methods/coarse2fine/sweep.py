"""The threshold sweep of a CF-ViT run: accuracy and average FLOPs at every eta (from the engine-owned evaluation's
summed counts), measured early-exit throughput at every eta (the model's own ``early_exit``, batch by batch,
interleaved with the dense ViT of the same size), a JSON record and a PNG of accuracy against FLOPs.

Also the check that a weights file given to ``eval`` / ``sweep`` is a CF-ViT, not a plain ViT.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from evcli.errors import UsageError


def check_cfvit_source(source: str | Path) -> None:
    """Refuse weights that are not a coarse2fine run's, with a hint: a plain ViT (an ``evcli mix`` run, timm
    weights) is fine-tuned into a CF-ViT with ``--init-from``, never evaluated as one."""
    from safetensors import safe_open

    from evcli.engine.run import resolve_weights_source
    from evcli.io.checkpoint import read_metadata

    path = resolve_weights_source(source)
    meta = read_metadata(path, "weights file")
    command = (meta.get("recipe") or {}).get("command") or meta.get("command")
    if command == "coarse2fine":
        return
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if any(k.endswith("pos_embed_coarse") for k in keys):
        return
    made = f" (from 'evcli {command}')" if command else ""
    if any(k.endswith("pos_embed") for k in keys):
        raise UsageError(
            f"{source} holds a plain ViT{made}, not a CF-ViT: it has no coarse position embedding or reuse block",
            hint=f"fine-tune it into a CF-ViT first: evcli coarse2fine --init-from {source}",
        )
    raise UsageError(
        f"{source} is not a CF-ViT{made}", hint="give the run folder or weights of an evcli coarse2fine run"
    )


def curve_from_metrics(metrics: dict[str, float], thresholds: list[float]) -> list[dict[str, float]]:
    """Rows (eta, top1, exit_ratio, gflops) of an evaluation's per-threshold metrics."""
    from evcli.methods.coarse2fine.method import sweep_key

    rows = []
    for eta in thresholds:
        k = sweep_key(eta)
        if f"{k}/top1" in metrics:
            rows.append(
                {
                    "eta": eta,
                    "top1": metrics[f"{k}/top1"],
                    "exit_ratio": metrics[f"{k}/exit_ratio"],
                    "gflops": metrics[f"{k}/gflops"],
                }
            )
    return rows


def plot_curve(
    rows: list[dict[str, float]], dense: dict[str, float] | None, path: str | Path, title: str = "CF-ViT"
) -> Path:
    """Accuracy against average GFLOPs (= GMACs) of the sweep, each point labelled with its eta; the dense ViT as a
    star when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    xs, ys = [r["gflops"] for r in rows], [r["top1"] for r in rows]
    ax.plot(xs, ys, "o-", color="tab:blue", label="CF-ViT, threshold eta")
    for r in rows:
        ax.annotate(f"{r['eta']:g}", (r["gflops"], r["top1"]), textcoords="offset points", xytext=(3, -9), fontsize=7)
    if dense is not None:
        ax.plot([dense["gflops"]], [dense["top1"]], "*", ms=12, color="tab:red", label="dense ViT")
    ax.set_xlabel("average GFLOPs per image (multiply-accumulates, evcli.ops.flops)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def time_models(
    runs: dict[str, Any], batches: list[Any], repeats: int = 3, warmup: int = 1
) -> dict[str, dict[str, float]]:
    """Interleaved timing: ``runs`` maps a label to ``fn(x)``; each repeat times every label over all ``batches``
    in turn (model time only, no data loading). Returns per label the median seconds and images/s."""
    import torch

    images = sum(int(x.shape[0]) for x in batches)
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in runs.values():
                fn(batches[0])
        for _ in range(repeats):
            for label, fn in runs.items():
                start = time.perf_counter()
                for x in batches:
                    fn(x)
                times[label].append(time.perf_counter() - start)
    return {
        k: {"median_s": statistics.median(v), "images_per_s": images / statistics.median(v), "runs_s": v}
        for k, v in times.items()
    }


def pick_threshold(rows: list[dict[str, Any]], reference_top1: float, tolerance: float = 0.5) -> dict[str, Any] | None:
    """The fastest row (by measured throughput, else fewest FLOPs) whose accuracy is within ``tolerance`` points of
    ``reference_top1`` (the eta = 1 accuracy)."""
    ok = [r for r in rows if r["top1"] >= reference_top1 - tolerance]
    if not ok:
        return None
    return max(ok, key=lambda r: (r.get("images_per_s") or 0.0, -r["gflops"]))


def sweep_run(
    source: str | Path,
    recipe: Any,
    thresholds: list[float],
    baseline: str | Path | None = None,
    batch_size: int = 64,
    timing_batches: int = 4,
    repeats: int = 3,
    tolerance: float = 0.5,
    timed: list[float] | None = None,
) -> dict[str, Any]:
    """The sweep of one CF-ViT (``source``: run folder or weights), optionally against a dense baseline run.

    Accuracy / exit ratio / FLOPs at each eta come from one evaluation over the whole val set (summed counts);
    throughput is timed on the first ``timing_batches`` full val batches of ``batch_size``, interleaved over the
    etas and the dense ViT of the same size (the baseline's weights when given, else the same architecture with
    random weights: time does not depend on the values). ``timed``: time only these etas (default: all)."""
    import torch

    from evcli import api
    from evcli.methods.coarse2fine.method import CoarseToFineMethod

    if recipe.method.method != "cfvit":
        raise UsageError("sweep runs a CF-ViT; this run is the dense baseline", hint="give it with --baseline")
    recipe.method.sweep = sorted(set(thresholds))
    recipe.data.eval_batch_size = batch_size
    report = api.evaluate(recipe, source)
    metrics = report["metrics"]
    rows = curve_from_metrics(metrics, recipe.method.sweep)
    loaded = api.load(source, recipe)
    model = loaded.model.eval()
    batches = _timing_batches(loaded, batch_size, timing_batches)
    dense_model, dense_row = _dense(recipe, baseline, loaded, batch_size)
    runs: dict[str, Any] = {"dense": dense_model}
    for eta in recipe.method.sweep if timed is None else sorted(set(timed)):
        runs[f"eta={eta:g}"] = lambda x, eta=eta: model.early_exit(x, eta)
    timing = time_models(runs, batches, repeats=repeats)
    dense_speed = timing["dense"]["images_per_s"]
    for r in rows:
        t = timing.get(f"eta={r['eta']:g}")
        r["images_per_s"] = t["images_per_s"] if t else None
        r["speedup_vs_dense"] = t["images_per_s"] / dense_speed if t else None
        if t:
            r["timing_runs_s"] = t["runs_s"]
    dense_row["timing_runs_s"] = timing["dense"]["runs_s"]
    dense_row.update({"images_per_s": dense_speed})
    reference = next((r["top1"] for r in rows if r["eta"] >= 1.0), metrics["top1"])
    pick = pick_threshold(rows, reference, tolerance)
    macs = CoarseToFineMethod.stage_macs(loaded.method, model)
    return {
        "weights": report["weights"],
        "model": recipe.model.name,
        "data": report["data"],
        "coarse_grid": model.coarse_grid,
        "fine_tokens": 1 + 4 * model.num_informative + model.coarse_grid**2 - model.num_informative,
        "top1_coarse": metrics["top1_coarse"],
        "top1_eta1": reference,
        "gflops_per_image": {k: v / 1e9 for k, v in macs.items()},
        "flop_counter": _counter(),
        "rows": rows,
        "dense": dense_row,
        "pick": {"rule": f"fastest eta within {tolerance} points of the eta=1 accuracy", **(pick or {})},
        "timing": {
            "batch_size": batch_size,
            "batches": len(batches),
            "repeats": repeats,
            "interleaved": True,
            "device": str(next(model.parameters()).device),
            "threads": torch.get_num_threads(),
            "what": "model time of CFViT.early_exit / the dense forward per batch (no data loading), medians",
        },
    }


def _counter() -> str:
    from evcli.ops.flops import COUNTER

    return COUNTER


def _timing_batches(loaded: Any, batch_size: int, count: int) -> list[Any]:
    trainer = loaded.trainer
    trainer.build_data()
    loader = next(iter(trainer.make_val_loaders().values()))
    batches = []
    device = next(loaded.model.parameters()).device
    for x, _ in loader:
        if x.shape[0] != batch_size:
            break
        batches.append(x.to(device))
        if len(batches) >= count:
            break
    if not batches:
        raise UsageError(
            f"the val set has fewer than {batch_size} images: no full batch to time",
            hint="lower --batch-size",
        )
    return batches


def _dense(recipe: Any, baseline: str | Path | None, loaded: Any, batch_size: int) -> tuple[Any, dict[str, Any]]:
    """The dense ViT to time against, and its row (accuracy and FLOPs when it is a trained baseline run)."""
    from evcli import api

    if baseline is not None:
        base_recipe = api.evaluation_recipe("coarse2fine", baseline, None, {"data.path": recipe.data.path}, [])
        if base_recipe.method.method != "dense":
            raise UsageError(f"--baseline {baseline} is not a dense baseline run (coarse2fine.method dense)")
        base_recipe.data.eval_batch_size = batch_size
        base = api.evaluate(base_recipe, baseline)
        model = api.load(baseline, base_recipe).model.eval()
        m = base["metrics"]
        return model, {"weights": base["weights"], "top1": m["top1"], "gflops": m["gflops"], "trained": True}
    from evcli.methods.coarse2fine.model import CFViT

    cf = loaded.model
    assert isinstance(cf, CFViT)
    from evcli.models.timm_models import create_model

    r = recipe.model
    dense = create_model(
        r.name,
        num_classes=cf.num_classes,
        img_size=recipe.data.img_size,
        patch_size=r.patch_size,
        kwargs=r.kwargs,
        warn_tag=False,
    )
    dense = dense.to(next(cf.parameters()).device).eval()
    import torch

    from evcli.ops.flops import counting

    with counting(dense) as c:
        dense(torch.zeros(1, 3, recipe.data.img_size, recipe.data.img_size, device=next(cf.parameters()).device))
    return dense, {"weights": None, "top1": None, "gflops": c.total / 1e9, "trained": False}
