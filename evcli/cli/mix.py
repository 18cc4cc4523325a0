"""`evcli mix`: train / evaluate / export an image classifier with image mixing (none, Mixup, CutMix)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from evcli.cli.common import (
    Flag,
    JsonOption,
    QuietOption,
    RecipeOption,
    SetOption,
    builtin_reference_rows,
    classifier_eval_rows,
    classifier_flags,
    evaluate_weights,
    export_command,
    flag,
    print_result,
    setup_output,
    training_command,
)

HELP = """Train an image classifier (any timm model) with batch image mixing: none, Mixup, CutMix, both
(mixup-cutmix: DeiT's per-batch switch) or SMMix.

SMMix (self-motivated image mixing, arXiv 2212.12977) works on ViTs (timm ViT/DeiT, CaiT, PVT v2):
half of the batches paste each partner's most-attended region over the image's least-attended one,
judged by the model's own last-layer attention, with a token-head loss per region and a consistency
loss; the other half take Mixup. Token grid and patch size come from the model.

Without --data it trains on the built-in data: scikit-learn's digits, 1,797 real 8x8 scans of
handwritten digits (10 classes) shipped inside scikit-learn, upsampled to --img-size (every 5th
image of each class is the val split). With --data DIR it reads an ImageFolder: DIR/train/<class>/*.jpg
and DIR/val/<class>/*.jpg.

A run writes one folder (--out): resolved_recipe.yaml, env.json, metrics.jsonl,
checkpoints/{last,best}.safetensors, final.safetensors (weights) and report.json.

Examples:

  evcli mix --recipe mix/quickstart

  evcli mix --method cutmix --model deit_tiny_patch16_224 --img-size 32 --epochs 5

  evcli mix --method smmix --model deit_tiny_patch16_224 --img-size 32 --save-mixed 8

  evcli mix --data ~/data/imagenette --img-size 160 --weights deit_tiny.safetensors

  evcli mix --resume runs/mix/20261124-101500-deit_tiny_patch16_224-cutmix

  accelerate launch --multi_gpu --num_processes 2 -m evcli mix --recipe mix/tiny

  evcli mix eval runs/mix/<run>/final.safetensors --img-size 32

  evcli mix export runs/mix/<run> -o deit_digits.safetensors
"""

app = typer.Typer(help=HELP, invoke_without_command=True, no_args_is_help=False)


class MixMethodName(str, Enum):
    none = "none"
    mixup = "mixup"
    cutmix = "cutmix"
    mixup_cutmix = "mixup-cutmix"
    smmix = "smmix"


def _rows(report: dict, recipe: object) -> list[tuple[str, str]]:
    m = report["metrics"]
    best = report.get("best") or {}
    rows = [
        ("method", f"{report['method']} on {report['model']} ({report['parameters'] / 1e6:.2f}M params)"),
        (
            "steps",
            f"{report['steps']} ({report['epochs']:.2f} epochs, {report['processes']} process(es), {report['device']})",
        ),
        ("top-1 / top-5", f"{m['top1']:.2f}% / {m['top5']:.2f}%"),
        *builtin_reference_rows(report),
        ("val loss", f"{m['loss']:.4f}"),
    ]
    if "ema_top1" in m:
        rows.append(("EMA top-1 / top-5", f"{m['ema_top1']:.2f}% / {m['ema_top5']:.2f}%"))
    if best:
        rows.append(("best top-1", f"{best.get('top1', float('nan')):.2f}% at step {best.get('step')}"))
    rows += [
        ("throughput", f"{report['samples_per_s']} img/s"),
        ("weights", report["files"]["weights"]),
        ("report", str(Path(report["run_dir"]) / "report.json")),
    ]
    return rows


OWN_FLAGS = [
    Flag(
        "method",
        MixMethodName,
        typer.Option(
            None,
            "--method",
            "-m",
            help="Mixing of each batch (default: cutmix); mixup-cutmix is DeiT's per-batch switch (p = "
            "mix.switch_prob); smmix for ViTs.",
            show_default=False,
        ),
        "mix.method",
    ),
    *classifier_flags("deit_tiny_patch16_224"),
    Flag(
        "save_mixed",
        int,
        flag("--save-mixed", help="SMMix: write a PNG of N mixed images with their regions to the run folder."),
        "mix.save_mixed",
    ),
]

app.callback()(
    training_command("mix", OWN_FLAGS, _rows, "evcli mix: result", "Train an image classifier with batch mixing.")
)


@app.command("eval")
def evaluate(
    weights: Path = typer.Argument(..., help="Weights (.safetensors) or a run folder.", show_default=False),
    recipe: str = RecipeOption,
    model: str = typer.Option(
        None, "--model", help="timm model name (default: from the weights' run).", show_default=False
    ),
    img_size: int = typer.Option(
        None, "--img-size", help="Input size (default: from the weights' run).", show_default=False
    ),
    data: Path = typer.Option(
        None, "--data", "-d", help="ImageFolder root (default: from the run, else built-in).", show_default=False
    ),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Batch size.", show_default=False),
    sets: list[str] = SetOption,
    json_out: bool = JsonOption,
    quiet: bool = QuietOption,
) -> None:
    """Evaluate weights on the val split: top-1 / top-5 accuracy and loss."""
    setup_output(quiet)
    flags = {"model.name": model, "data.img_size": img_size, "data.path": data, "data.eval_batch_size": batch_size}
    report = evaluate_weights("mix", weights, recipe, flags, sets)
    print_result(report, json_out, "evcli mix eval", classifier_eval_rows(report))


app.command("export")(export_command("mix"))
