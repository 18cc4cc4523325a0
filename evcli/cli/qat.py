"""`evcli qat`: quantization-aware training (LSQ, LTS, fp32 reference), evaluation and the integer export."""

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
    classifier_eval_rows,
    classifier_flags,
    evaluate_weights,
    flag,
    print_result,
    setup_output,
    training_command,
)

HELP = """Quantization-aware training of an image classifier (any timm CNN or ViT) at 2, 3, 4 or 8 bits, with our
own LSQ fake-quant layers (learned step sizes for weights and activations) and the Lottery Ticket Scratcher
(LTS, arXiv 2211.08544): a weight whose full-precision value stays close to its quantization level is frozen
for good, removing its updates and (where whole channels or layers freeze) its weight gradient.

--method lts (default), lsq (the baseline), fp32 (the same training unquantized, for reference). Every
Conv2d/Linear is quantized; the first conv and the classifier at 8 bits (qat.first_last_bits).
Start from a full-precision or sparsified run with --init-from: a sparse run's zeros (N:M or unstructured) are
kept through QAT and checked in the integer export.

Without --data it trains on the built-in data: scikit-learn's digits, 1,797 real 8x8 scans of handwritten
digits (10 classes) shipped inside scikit-learn, upsampled to --img-size (32 px; every 5th image of each class
is the val split). --data DIR reads an ImageFolder (DIR/train/<class>/*, DIR/val/<class>/*) or an MNIST-style
IDX folder (Fashion-MNIST: /usr/share/datasets/fashion-mnist).

A run folder holds resolved_recipe.yaml, metrics.jsonl, checkpoints/{last,best}.safetensors, final.safetensors
(the fake-quant model with its step sizes), report.json (bits; for LTS the per-epoch frozen fractions, weight
updates eliminated and the backward FLOPs saved, counted), lts.json and lts.png.

Examples:

  evcli qat --bits 4 --model resnet18

  evcli qat --method lsq --bits 2 --init-from runs/qat/<fp32-run>

  evcli qat --bits 4 --init-from runs/sparsify/<2:4-run>

  evcli qat --recipe qat/tiny

  evcli qat eval runs/qat/<run>

  evcli qat export runs/qat/<run> --onnx        (integer weights + scales, checked; int8 QDQ ONNX, checked)
"""

app = typer.Typer(help=HELP, invoke_without_command=True, no_args_is_help=False)


class QatMethodName(str, Enum):
    lts = "lts"
    lsq = "lsq"
    fp32 = "fp32"


class LtsSchedule(str, Enum):
    constant = "constant"
    linear = "linear"
    sine = "sine"


def _rows(report: dict, recipe: object) -> list[tuple[str, str]]:
    m = report["metrics"]
    q = report.get("qat", {})
    run = Path(report["run_dir"])
    rows = [
        ("method", f"{report['method']} on {report['model']} ({report['parameters'] / 1e6:.2f}M params)"),
        (
            "steps",
            f"{report['steps']} ({report['epochs']:.2f} epochs, {report['processes']} process(es), {report['device']})",
        ),
        ("top-1 / top-5", f"{m['top1']:.2f}% / {m['top5']:.2f}%"),
        ("val loss", f"{m['loss']:.4f}"),
    ]
    if q.get("method") != "fp32" and q:
        rows.append(
            (
                "bits",
                f"W{q['weight_bits']}A{q['act_bits']}, first/last {q['first_last_bits']} "
                f"({q['quantized_layers']} quantized layers)",
            )
        )
    lts = report.get("lts")
    if lts:
        rows += [
            ("weights frozen at the end", f"{100 * m.get('frozen', 0.0):.1f}%"),
            ("weight updates eliminated", f"{100 * lts['updates_eliminated']:.1f}% (over all steps)"),
            ("backward FLOPs saved", f"{100 * lts['backward_flops_saved_counted']:.1f}% (counted, not timed)"),
        ]
    if "sparsity" in m:
        rows.append(("kept sparsity", f"{100 * m['sparsity']:.1f}% ({q.get('sparse_source', {}).get('pattern')})"))
    rows += [
        ("weights (fake-quant model)", report["files"]["weights"]),
        ("LTS chart", report["files"].get("lts_chart", "-")),
        ("report", str(run / "report.json")),
    ]
    return rows


OWN_FLAGS = [
    Flag(
        "method",
        QatMethodName,
        typer.Option(
            None, "--method", "-m", help="lts (default), lsq (baseline) or fp32 (reference).", show_default=False
        ),
        "qat.method",
    ),
    Flag("bits", int, flag("--bits", help="Bits of weights and activations, 2-8 (default 4)."), "qat.bits"),
    Flag("weight_bits", int, flag("--weight-bits", help="Weight bits, 2-8 (default: --bits)."), "qat.weight_bits"),
    Flag("act_bits", int, flag("--act-bits", help="Activation bits, 2-8 (default: --bits)."), "qat.act_bits"),
    Flag(
        "lts_schedule",
        LtsSchedule,
        flag("--lts-schedule", help="LTS threshold growth: linear (default), sine, or constant at --lts-rate."),
        "qat.lts_schedule",
    ),
    Flag(
        "lts_rate",
        float,
        flag("--lts-rate", help="LTS constant threshold ρ in [0, 1], a fraction of the level spacing (default 0.1)."),
        "qat.lts_rate",
    ),
    Flag(
        "lts_gamma",
        float,
        flag("--lts-gamma", help="EMA factor γ of the LTS distance, in [0, 1) (default 0.99)."),
        "qat.lts_gamma",
    ),
    Flag(
        "lts_warmup",
        str,
        flag("--lts-warmup", help="Steps before freezing: 20% (default), 5ep, 200step."),
        "qat.lts_warmup",
    ),
    *classifier_flags("resnet18"),
    Flag(
        "lr",
        float,
        flag("--lr", help="Weights' learning rate, as given (default: optim.lr_base 0.01 at batch 256, scaled)."),
        "optim.lr",
    ),
]

app.callback()(training_command("qat", OWN_FLAGS, _rows, "evcli qat: result", "Quantization-aware training."))


@app.command("eval")
def evaluate(
    weights: Path = typer.Argument(..., help="A qat run folder, checkpoint or integer export.", show_default=False),
    recipe: str = RecipeOption,
    data: Path = typer.Option(None, "--data", "-d", help="Data (default: the run's).", show_default=False),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Batch size.", show_default=False),
    sets: list[str] = SetOption,
    json_out: bool = JsonOption,
    quiet: bool = QuietOption,
) -> None:
    """Evaluate a QAT run (its best checkpoint) or an integer export on the val split: top-1/top-5, loss."""
    setup_output(quiet)
    from evcli.methods.qat.export import evaluation_source

    source, int_export = evaluation_source(weights)
    if int_export:
        from evcli.methods.qat.export import evaluate_integer_export

        report = evaluate_integer_export(source, data, batch_size)
    else:
        report = evaluate_weights("qat", source, recipe, {"data.path": data, "data.eval_batch_size": batch_size}, sets)
    rows = classifier_eval_rows(report)
    if "frozen" in report["metrics"]:
        rows.append(("weights frozen (LTS)", f"{100 * report['metrics']['frozen']:.1f}%"))
    print_result(report, json_out, "evcli qat eval", rows)


@app.command("export")
def export(
    run: Path = typer.Argument(..., help="A qat run folder (or its training checkpoint).", show_default=False),
    output: Path = typer.Option(
        None, "--output", "-o", help="Output (default: RUN/export-<which>.int.safetensors).", show_default=False
    ),
    which: str = typer.Option("best", "--which", help="Checkpoint to export: best or last."),
    onnx: bool = typer.Option(False, "--onnx", help="Also write an int8 QDQ ONNX file, checked with onnxruntime."),
    overwrite: bool = OverwriteOption,
    json_out: bool = JsonOption,
    quiet: bool = QuietOption,
) -> None:
    """Integer weights (2/4-bit packed) and scales as safetensors, read back and checked against the fake-quant
    model on the val data (max logit error); a sparse source's pattern is checked on the integer levels."""
    setup_output(quiet)
    from evcli.methods.qat.export import export_run

    res = export_run(run, which, output, overwrite=overwrite, onnx=onnx)
    rows = [
        ("from", res["checkpoint"]),
        ("step", str(res["step"])),
        ("integer export", res["weights"]),
        ("weight bits", ", ".join(map(str, res["bits"])) + f" ({res['layers']} layers)"),
        ("file size", f"{res['file_bytes']:,} bytes (fp32 weights: {res['fp32_bytes']:,})"),
    ]
    c = res.get("check")
    rows.append(
        (
            "export vs fake-quant",
            f"max logit error {c['max_abs_logit_error']:.2e}, top-1 {c['top1_other']:.2f}% vs "
            f"{c['top1_reference']:.2f}% on {c['images']} val images"
            if c
            else res["data"],
        )
    )
    sp = res.get("sparse")
    if sp:
        rows.append(
            (
                "kept sparsity",
                f"{sp['pattern']}: {100 * sp['overall_sparsity']:.1f}% zeros, "
                + ("verified" if sp["ok"] else "FAILED"),
            )
        )
    o = res.get("onnx")
    if o:
        rows.append(
            (
                "int8 QDQ ONNX",
                f"{o['file']}: {o['runtime']}, max logit error {o['max_abs_logit_error']:.2e}, top-1 "
                f"{o['top1_other']:.2f}% (PyTorch {o['top1_reference']:.2f}%)"
                if o.get("checked")
                else f"{o['file']} ({o.get('note')})",
            )
        )
    print_result(res, json_out, "evcli qat export", rows)
    if sp and not sp["ok"]:
        from evcli.console import error

        error(f"the integer export is not {sp['pattern']}: " + ", ".join(sp["failing"][:8]))
        raise typer.Exit(1)
