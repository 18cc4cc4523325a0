"""`evcli mix`: train / evaluate / export an image classifier with image mixing (none, Mixup, CutMix)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from evcli.cli.common import (
    BatchSizeOption,
    EmaOption,
    EpochsOption,
    ForceOption,
    GradAccumOption,
    InitFromOption,
    JsonOption,
    LrOption,
    MaxStepsOption,
    Precision,
    PrecisionOption,
    QuietOption,
    RecipeOption,
    ResumeOption,
    SeedOption,
    SetOption,
    WeightsOption,
    WorkersOption,
    classifier_eval_rows,
    evaluate_weights,
    print_result,
    recipe_flags,
    setup_output,
    train_or_resume,
)

HELP = """Train an image classifier (any timm model) with batch image mixing: none, Mixup, CutMix or SMMix.

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
    smmix = "smmix"


@app.callback()
def train(
    ctx: typer.Context,
    recipe: str = RecipeOption,
    method: MixMethodName = typer.Option(
        None, "--method", "-m", help="Mixing of each batch (default: cutmix); smmix for ViTs.", show_default=False
    ),
    model: str = typer.Option(
        None, "--model", help="timm model name (default: deit_tiny_patch16_224).", show_default=False
    ),
    img_size: int = typer.Option(
        None, "--img-size", help="Input size in pixels (default: 224; 32 on the built-in data).", show_default=False
    ),
    patch_size: int = typer.Option(
        None, "--patch-size", help="ViT patch size (default: the model's; 8x8 grid below 64 px).", show_default=False
    ),
    weights: Path = WeightsOption,
    init_from: Path = InitFromOption,
    data: Path = typer.Option(
        None,
        "--data",
        "-d",
        help="ImageFolder root with train/ and val/ (default: built-in digits).",
        show_default=False,
    ),
    epochs: int = EpochsOption,
    max_steps: int = MaxStepsOption,
    batch_size: int = BatchSizeOption,
    lr: float = LrOption,
    seed: int = SeedOption,
    mixed_precision: Precision = PrecisionOption,
    grad_accum: int = GradAccumOption,
    ema: bool = EmaOption,
    workers: int = WorkersOption,
    skip_corrupt: bool = typer.Option(
        None, "--skip-corrupt", help="Skip unreadable images with a warning.", show_default=False
    ),
    out: Path = typer.Option(
        None, "--out", "-o", help="Run folder (default: runs/mix/<time>-<model>-<method>).", show_default=False
    ),
    resume: Path = ResumeOption,
    force: bool = ForceOption,
    save_mixed: int = typer.Option(
        None,
        "--save-mixed",
        help="SMMix: write a PNG of N mixed images with their regions to the run folder.",
        show_default=False,
    ),
    sets: list[str] = SetOption,
    json_out: bool = JsonOption,
    quiet: bool = QuietOption,
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    setup_output(quiet)
    flags = recipe_flags(
        {
            "mix.method": method,
            "model.name": model,
            "data.img_size": img_size,
            "model.patch_size": patch_size,
            "model.weights": weights,
            "model.init_from": init_from,
            "data.path": data,
            "schedule.epochs": epochs,
            "schedule.max_steps": max_steps,
            "data.batch_size": batch_size,
            "optim.lr": lr,
            "train.seed": seed,
            "train.mixed_precision": mixed_precision,
            "train.grad_accum": grad_accum,
            "train.ema": ema,
            "data.workers": workers,
            "mix.save_mixed": save_mixed,
            "data.skip_corrupt": skip_corrupt,
            "out.dir": out,
        }
    )
    _, report = train_or_resume("mix", recipe, resume, force, flags, sets)
    _print_report(report, json_out)


def _print_report(report: dict, json_out: bool) -> None:
    if not report:
        return
    m = report["metrics"]
    best = report.get("best") or {}
    rows = [
        ("method", f"{report['method']} on {report['model']} ({report['parameters'] / 1e6:.2f}M params)"),
        (
            "steps",
            f"{report['steps']} ({report['epochs']:.2f} epochs, {report['processes']} process(es), {report['device']})",
        ),
        ("top-1 / top-5", f"{m['top1']:.2f}% / {m['top5']:.2f}%"),
        ("val loss", f"{m['loss']:.4f}"),
    ]
    if "ema_top1" in m:
        rows.append(("EMA top-1 / top-5", f"{m['ema_top1']:.2f}% / {m['ema_top5']:.2f}%"))
    if best:
        rows.append(("best top-1", f"{best.get('top1', float('nan')):.2f}% at step {best.get('step')}"))
    rows += [
        ("throughput", f"{report['img_per_s']} img/s"),
        ("weights", report["files"]["weights"]),
        ("report", str(Path(report["run_dir"]) / "report.json")),
    ]
    print_result(report, json_out, "evcli mix: result", rows)


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


@app.command("export")
def export(
    run: Path = typer.Argument(..., help="Run folder (or a training checkpoint file).", show_default=False),
    output: Path = typer.Option(
        None, "--output", "-o", help="Output file (default: RUN/export-<which>.safetensors).", show_default=False
    ),
    which: str = typer.Option("best", "--which", help="Checkpoint to export: best or last."),
    json_out: bool = JsonOption,
    quiet: bool = QuietOption,
) -> None:
    """Export a run's checkpoint as plain weights (.safetensors), train-only parts dropped."""
    setup_output(quiet)
    from evcli.engine.run import run_export

    report = run_export("mix", run, which, output)
    print_result(
        report,
        json_out,
        "evcli mix export",
        [
            ("from", report["checkpoint"]),
            ("step", str(report["step"])),
            ("weights", report["weights"]),
            ("tensors", str(report["tensors"])),
        ],
    )
