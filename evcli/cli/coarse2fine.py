"""`evcli coarse2fine`: train / evaluate / sweep / export a CF-ViT (coarse-to-fine ViT with early exit)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from evcli.cli.common import (
    Flag,
    JsonOption,
    OverwriteOption,
    QuietOption,
    RecipeOption,
    SetOption,
    classifier_flags,
    evaluate_weights,
    export_command,
    find_recipe,
    flag,
    print_result,
    recipe_flags,
    setup_output,
    training_command,
)
from evcli.errors import UsageError

HELP = """Train a CF-ViT (coarse-to-fine vision transformer, arXiv 2203.03821) and run it with early exit.

One timm ViT runs twice: on a coarse copy of the image (c x c tokens of the model's own patches, at
c x patch px), then, only for images whose coarse max-softmax is below the threshold eta, on the full
image where the ceil(c^2/2) coarse patches with the most class attention are split into 2x2 fine
patches and the coarse features are reused. The fine stage runs at the input size (2 x c x patch px):
--img-size 224 means c = 7 with 16 px patches (125 fine tokens), 288 means c = 9. Training: CE on the
fine output + KL from the coarse output to the detached fine one; informative selection from 67% of
training on. --method dense trains the plain ViT of the same size (the baseline) in the same tool.

Without --data it trains on the built-in data: scikit-learn's digits, 1,797 real 8x8 scans of
handwritten digits (10 classes) shipped inside scikit-learn, upsampled to --img-size (every 5th
image of each class is the val split). --data DIR reads an ImageFolder (DIR/train/<class>/*.jpg,
DIR/val/<class>/*.jpg) or an MNIST-style folder of IDX files (Fashion-MNIST).

A run writes one folder (--out): resolved_recipe.yaml, env.json, metrics.jsonl (top-1 at every eta of
coarse2fine.sweep, exit ratio, average GFLOPs), checkpoints/, final.safetensors, sweep.png, report.json.

Examples:

  evcli coarse2fine --recipe coarse2fine/tiny

  evcli coarse2fine --model deit_tiny_patch16_224 --patch-size 4 --img-size 32 --epochs 5

  evcli coarse2fine --init-from runs/mix/<plain-vit-run> --img-size 32 --patch-size 4 --epochs 3

  evcli coarse2fine --method dense --img-size 32 --patch-size 4 --out runs/c2f/dense

  evcli coarse2fine --recipe coarse2fine/deit_small_7x7_imagenet --data ~/data/imagenet

  evcli coarse2fine eval runs/coarse2fine/<run> --threshold 0.8

  evcli coarse2fine sweep runs/coarse2fine/<run> --baseline runs/c2f/dense

  evcli coarse2fine export runs/coarse2fine/<run> -o cfvit.safetensors
"""

app = typer.Typer(help=HELP, invoke_without_command=True, no_args_is_help=False)


class C2FMethod(str, Enum):
    cfvit = "cfvit"
    dense = "dense"


def _rows(report: dict, recipe: object) -> list[tuple[str, str]]:
    m = report["metrics"]
    rows = [
        ("method", f"{report['method']} on {report['model']} ({report['parameters'] / 1e6:.2f}M params)"),
        ("steps", f"{report['steps']} ({report['epochs']:.2f} epochs, {report['processes']} process(es))"),
        ("top-1 (all fine, eta=1)" if report["method"] == "cfvit" else "top-1", f"{m['top1']:.2f}%"),
    ]
    if "top1_coarse" in m:
        rows += [
            ("top-1 coarse stage only", f"{m['top1_coarse']:.2f}%"),
            ("top-1 at the threshold", f"{m['top1_eta']:.2f}% ({100 * m['exit_ratio']:.1f}% exit early)"),
        ]
    rows.append(("average GFLOPs", f"{m['gflops']:.4g}"))
    rows += [
        ("throughput (training)", f"{report['samples_per_s']} img/s"),
        ("weights", report["files"]["weights"]),
        ("report", str(Path(report["run_dir"]) / "report.json")),
    ]
    return rows


OWN_FLAGS = [
    Flag(
        "method",
        C2FMethod,
        flag("--method", "-m", help="cfvit (default) or dense: the plain ViT of the same size (baseline)."),
        "coarse2fine.method",
    ),
    *classifier_flags("deit_tiny_patch16_224"),
    Flag(
        "coarse_grid",
        int,
        flag("--coarse-grid", help="c: coarse c x c tokens; the input must be 2 x c x patch px (default: from it)."),
        "coarse2fine.coarse_grid",
    ),
    Flag(
        "threshold",
        float,
        flag("--threshold", help="eta in [0, 1]: exit after the coarse stage when max softmax >= eta (default 1)."),
        "coarse2fine.threshold",
    ),
]

app.callback()(
    training_command(
        "coarse2fine", OWN_FLAGS, _rows, "evcli coarse2fine: result", "Train a CF-ViT (or the dense baseline)."
    )
)


def _check_threshold(value: float | None, what: str = "--threshold") -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise UsageError(f"{what} must be in [0, 1] (a max-softmax confidence), got {value:g}")


def _eval_rows(report: dict) -> list[tuple[str, str]]:
    m = report["metrics"]
    rows = [("weights", report["weights"]), ("model", report["model"]), ("data", report["data"])]
    if "top1_coarse" in m:
        rows += [
            ("top-1 (all fine, eta=1)", f"{m['top1']:.2f}%"),
            ("top-1 coarse stage only", f"{m['top1_coarse']:.2f}%"),
            (
                f"top-1 at eta={report['threshold']:g}",
                f"{m['top1_eta']:.2f}% ({100 * m['exit_ratio']:.1f}% exit early)",
            ),
            (
                "average GFLOPs at eta",
                f"{m['gflops']:.4g} (coarse {m['gflops_coarse']:.4g}, both {m['gflops_full']:.4g})",
            ),
        ]
    else:
        rows += [("top-1 (dense ViT)", f"{m['top1']:.2f}%"), ("GFLOPs", f"{m['gflops']:.4g}")]
    return rows


@app.command("eval")
def evaluate(
    weights: Path = typer.Argument(
        ..., help="Run folder or weights (.safetensors) of a coarse2fine run.", show_default=False
    ),
    threshold: float = typer.Option(
        None, "--threshold", help="eta in [0, 1] (default: the run's).", show_default=False
    ),
    recipe: str = RecipeOption,
    data: Path = typer.Option(None, "--data", "-d", help="Data (default: the run's).", show_default=False),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Batch size.", show_default=False),
    sets: list[str] = SetOption,
    json_out: bool = JsonOption,
    quiet: bool = QuietOption,
) -> None:
    """Evaluate a CF-ViT: top-1 of the fine and coarse stages, top-1 / exit ratio / GFLOPs at the threshold and at
    every eta of coarse2fine.sweep (one pass). A plain ViT is refused: fine-tune it with --init-from."""
    setup_output(quiet)
    _check_threshold(threshold)
    from evcli.methods.coarse2fine.sweep import check_cfvit_source

    check_cfvit_source(weights)
    flags = {"coarse2fine.threshold": threshold, "data.path": data, "data.eval_batch_size": batch_size}
    report = evaluate_weights("coarse2fine", weights, recipe, flags, sets)
    from evcli import api

    rec = api.evaluation_recipe("coarse2fine", weights, find_recipe(recipe), recipe_flags(flags), sets or [])
    report["threshold"] = rec.method.threshold
    print_result(report, json_out, "evcli coarse2fine eval", _eval_rows(report))


def _parse_thresholds(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UsageError(f"--thresholds takes numbers separated by commas, got {text!r}") from None
    if not values:
        raise UsageError("--thresholds is empty")
    for v in values:
        _check_threshold(v, "every --thresholds value")
    return values


@app.command("sweep")
def sweep(
    weights: Path = typer.Argument(..., help="Run folder or weights of a CF-ViT run.", show_default=False),
    thresholds: str = typer.Option(
        None, "--thresholds", help="Comma-separated etas (default: the run's coarse2fine.sweep).", show_default=False
    ),
    baseline: Path = typer.Option(
        None,
        "--baseline",
        help="A dense baseline run (coarse2fine --method dense) to compare with (default: time the same-size "
        "dense ViT only).",
        show_default=False,
    ),
    data: Path = typer.Option(None, "--data", "-d", help="Data (default: the run's).", show_default=False),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Batch size of the timing and evaluation."),
    timing_batches: int = typer.Option(4, "--timing-batches", help="Full val batches timed per eta."),
    repeats: int = typer.Option(3, "--repeats", help="Interleaved timing repeats (the median is kept)."),
    output: Path = typer.Option(
        None, "--output", "-o", help="Output folder (default: RUN/sweep, or WEIGHTS.sweep/).", show_default=False
    ),
    overwrite: bool = OverwriteOption,
    sets: list[str] = SetOption,
    json_out: bool = JsonOption,
    quiet: bool = QuietOption,
) -> None:
    """Accuracy, average GFLOPs (counted per stage) and measured throughput at every eta; sweep.json and sweep.png
    (accuracy vs GFLOPs) in the output folder."""
    setup_output(quiet)
    etas = _parse_thresholds(thresholds)
    for name, value in (("--batch-size", batch_size), ("--timing-batches", timing_batches), ("--repeats", repeats)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    from evcli.methods.coarse2fine.sweep import check_cfvit_source

    check_cfvit_source(weights)
    folder = output or (weights / "sweep" if weights.is_dir() else weights.with_suffix(".sweep"))
    from evcli.api import check_new_file

    json_path, png_path = folder / "sweep.json", folder / "sweep.png"
    for p in (json_path, png_path):
        check_new_file(p, overwrite)
    from evcli import api
    from evcli.methods.coarse2fine.sweep import plot_curve, sweep_run

    rec = api.evaluation_recipe("coarse2fine", weights, None, recipe_flags({"data.path": data}), sets or [])
    result = sweep_run(weights, rec, etas or list(rec.method.sweep), baseline, batch_size, timing_batches, repeats)
    folder.mkdir(parents=True, exist_ok=True)
    import json

    from evcli.io.checkpoint import atomic_write_text

    dense = result["dense"] if result["dense"].get("top1") is not None else None
    plot_curve(result["rows"], dense, png_path, title=f"CF-ViT {result['model']} ({result['data']})"[:90])
    result["files"] = {"json": str(json_path), "plot": str(png_path)}
    atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
    rows = [("weights", result["weights"]), ("data", result["data"])]
    for r in result["rows"]:
        rows.append(
            (
                f"eta={r['eta']:g}",
                f"top-1 {r['top1']:.2f}%  exit {100 * r['exit_ratio']:.0f}%  {r['gflops']:.4g} GFLOPs  "
                + (f"{r['images_per_s']:.0f} img/s ({r['speedup_vs_dense']:.2f}x dense)" if r["images_per_s"] else ""),
            )
        )
    d = result["dense"]
    rows.append(
        (
            "dense ViT",
            (f"top-1 {d['top1']:.2f}%  " if d.get("top1") is not None else "")
            + f"{d['gflops']:.4g} GFLOPs  {d['images_per_s']:.0f} img/s",
        )
    )
    pick = result["pick"]
    if "eta" in pick:
        speed = (
            f"{pick['speedup_vs_dense']:.2f}x dense" if pick.get("speedup_vs_dense") else f"{pick['gflops']:.4g} GFLOPs"
        )
        rows.append(("pick", f"eta={pick['eta']:g}: {speed} ({pick['rule']})"))
    rows += [("json", str(json_path)), ("plot", str(png_path))]
    print_result(result, json_out, "evcli coarse2fine sweep", rows)


app.command("export")(export_command("coarse2fine"))
