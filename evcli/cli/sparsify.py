"""`evcli sparsify`: train / evaluate / export / verify / bench sparse classifiers (LBC, OptG, magnitude, SR-STE)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from evcli.cli.common import (
    ExportOutputOption,
    Flag,
    FormatOption,
    JsonOption,
    OverwriteOption,
    QuietOption,
    RecipeOption,
    RunArgument,
    SetOption,
    WhichOption,
    builtin_reference_rows,
    classifier_eval_rows,
    classifier_flags,
    dense_reference_rows,
    evaluate_weights,
    export_metric_rows,
    export_rows,
    flag,
    print_result,
    setup_output,
    training_command,
)

HELP = """Train a sparse image classifier (any timm CNN or ViT): N:M sparsity with LBC (default for --nm),
unstructured sparsity with OptG (default for --sparsity), and the magnitude and SR-STE baselines.

By default every Conv2d/Linear except the stem conv and the classifier is sparse; with N:M, layers whose
input channels do not divide by M are listed and left dense. Choose layers with sparsify.targets /
sparsify.ignore patterns: a name, re:<regex>, type:Conv2d.

Without --data it trains on the built-in data: scikit-learn's digits, 1,797 real 8x8 scans of
handwritten digits (10 classes) shipped inside scikit-learn, upsampled to --img-size (16 px by default;
every 5th image of each class is the val split), 8 epochs, no flips: settings under which the headline commands
learn the digits in minutes (a recipe file, flag or --set overrides them). With --data DIR it reads an ImageFolder:
DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg.

A run folder holds resolved_recipe.yaml, env.json, metrics.jsonl, checkpoints/{last,best}.safetensors,
final.safetensors (masks folded in), report.json, sparsity.json and sparsity.png (per-layer chart).

Examples:

  evcli sparsify --nm 2:4 --model resnet50

  evcli sparsify --method optg --sparsity 0.9 --model resnet18

  evcli sparsify --method srste --nm 2:4 --init-from runs/mix/<dense-run>

  evcli sparsify --recipe sparsify/tiny_lbc

  evcli sparsify export runs/sparsify/<run>        (folded weights, packed N:M file, chart)

  evcli sparsify verify runs/sparsify/<run>/export-best.safetensors --nm 2:4

  evcli sparsify bench runs/sparsify/<run>/export-best.safetensors
"""

app = typer.Typer(help=HELP, invoke_without_command=True, no_args_is_help=False)


class SparsifyMethodName(str, Enum):
    lbc = "lbc"
    optg = "optg"
    magnitude = "magnitude"
    srste = "srste"
    dense = "dense"


def _check(typed: dict) -> None:
    if typed["nm"] is not None and typed["sparsity"] is not None:
        from evcli.errors import UsageError

        raise UsageError(
            "--nm and --sparsity cannot be combined: N:M fixes the sparsity at 1 - N/M",
            hint="use --nm 2:4 (lbc, srste, magnitude) or --sparsity 0.9 (optg, magnitude)",
        )


def _rows(report: dict, recipe: object) -> list[tuple[str, str]]:
    m = report["metrics"]
    run = Path(report["run_dir"])
    rows = [
        ("method", f"{report['method']} on {report['model']} ({report['parameters'] / 1e6:.2f}M params)"),
        (
            "steps",
            f"{report['steps']} ({report['epochs']:.2f} epochs, {report['processes']} process(es), {report['device']})",
        ),
        ("top-1 / top-5", f"{m['top1']:.2f}% / {m['top5']:.2f}%"),
        *builtin_reference_rows(report),
        *dense_reference_rows(report, recipe),
        ("val loss", f"{m['loss']:.4f}"),
        ("sparsity (targeted layers)", f"{100 * m.get('sparsity', 0.0):.2f}%"),
    ]
    if "nm_exact" in m:
        rows.append(("exact N:M at the end", "yes" if m["nm_exact"] == 1.0 else "no (before t_f)"))
    rows += [
        ("weights (masks folded in)", report["files"]["weights"]),
        ("per-layer chart", report["files"].get("sparsity_chart", "none (dense run)")),
        ("report", str(run / "report.json")),
    ]
    return rows


OWN_FLAGS = [
    Flag(
        "method",
        SparsifyMethodName,
        typer.Option(
            None,
            "--method",
            "-m",
            help="lbc, optg, magnitude, srste, or dense for reference (default: lbc for N:M, optg for --sparsity).",
            show_default=False,
        ),
        "sparsify.method",
    ),
    Flag("nm", str, flag("--nm", help="N:M pattern along input channels, e.g. 2:4 (default 2:4)."), "sparsify.nm"),
    Flag(
        "sparsity",
        float,
        flag("--sparsity", help="Unstructured target sparsity in (0, 1), e.g. 0.9."),
        "sparsify.sparsity",
    ),
    *classifier_flags("resnet18", builtin_img_size=16),
    Flag(
        "lr",
        float,
        flag(
            "--lr",
            help="Learning rate, as given (default: optim.lr_base 0.1 at batch 256, scaled to the global batch).",
        ),
        "optim.lr",
    ),
]

app.callback()(
    training_command(
        "sparsify", OWN_FLAGS, _rows, "evcli sparsify: result", "Train a sparse image classifier.", check=_check
    )
)


@app.command("eval")
def evaluate(
    weights: Path = typer.Argument(..., help="Weights (.safetensors) or a run folder.", show_default=False),
    recipe: str = RecipeOption,
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
    """Evaluate weights on the val split: top-1 / top-5, loss and the sparsity of the targeted layers."""
    setup_output(quiet)
    report = evaluate_weights(
        "sparsify",
        weights,
        recipe,
        {"data.img_size": img_size, "data.path": data, "data.eval_batch_size": batch_size},
        sets,
    )
    sparsity = ("sparsity (targeted layers)", f"{100 * report['metrics'].get('sparsity', 0.0):.2f}%")
    print_result(report, json_out, "evcli sparsify eval", [*classifier_eval_rows(report), sparsity])


@app.command("export")
def export(
    run: Path = RunArgument,
    output: Path = ExportOutputOption,
    which: str = WhichOption,
    format: str = FormatOption,
    overwrite: bool = OverwriteOption,
    json_out: bool = JsonOption,
    quiet: bool = QuietOption,
) -> None:
    """Export with masks folded in (scores/masks dropped), verify it, write the packed N:M file and the chart;
    or (--format timm / onnx) the folded model as a timm folder or an ONNX file."""
    setup_output(quiet)
    if format != "safetensors":
        from evcli import api

        report = api.export("sparsify", run, which, output, overwrite=overwrite, format=format)
        print_result(report, json_out, "evcli sparsify export", export_rows(report))
        return
    from evcli.methods.sparsify.report import export_run

    res = export_run(run, which, output, overwrite=overwrite)
    rows = [
        ("from", res["checkpoint"]),
        ("step", str(res["step"])),
        ("weights", res["weights"]),
        ("pattern", f"{res['pattern']} ({'verified' if res['verified'] else 'NOT verified'})"),
        ("sparsity (targeted layers)", f"{100 * res['overall_sparsity']:.2f}%"),
        ("per-layer chart", res["chart"] or "none (dense run)"),
        *export_metric_rows(res),
    ]
    p = res["packed"]
    if p:
        rows += [
            ("packed N:M file", p["packed_file"]),
            (
                "packed / dense fp16 (sparse layers)",
                f"{p['layers_packed_bytes']:,} / {p['layers_dense_fp16_bytes']:,} bytes = {p['layers_ratio']:.4f}",
            ),
            (
                "whole file on disk",
                f"{p['file_bytes']:,} bytes packed vs {p['dense_fp16_bytes']:,} dense fp16 "
                f"({p['file_ratio_vs_fp16']:.3f}); fp32 export {p['dense_file_bytes']:,}",
            ),
        ]
    print_result(res, json_out, "evcli sparsify export", rows)
    if not res["verified"]:
        from evcli.console import error

        error("the export is not " + res["pattern"] + ": " + ", ".join(res["failing_layers"][:8]))
        raise typer.Exit(1)


@app.command("verify")
def verify(
    file: Path = typer.Argument(..., help="Exported weights (.safetensors).", show_default=False),
    nm: str = typer.Option(None, "--nm", help="N:M pattern to check (default: the run's).", show_default=False),
    sparsity: float = typer.Option(
        None, "--sparsity", help="Unstructured sparsity to check instead of N:M.", show_default=False
    ),
    tol: float = typer.Option(0.005, "--tol", help="Allowed shortfall of --sparsity."),
    json_out: bool = JsonOption,
    quiet: bool = QuietOption,
) -> None:
    """Check that every targeted weight is N:M (or reaches --sparsity); exit 1 listing the failing layers."""
    setup_output(quiet)
    from evcli.console import error
    from evcli.methods.sparsify.report import verify_file

    res = verify_file(file, nm=nm, sparsity=sparsity, tol=tol)
    if json_out:
        print_result(res, True, "", [])
    else:
        from rich.table import Table

        from evcli.console import out_console

        table = Table(title=f"evcli sparsify verify: {res['pattern']} ({res['checked']})", title_justify="left")
        for col in ("layer", "shape", "nonzeros", "sparsity", "check"):
            table.add_column(col)
        for r in res["layers"]:
            check = ("ok" if r["ok"] else f"FAIL ({r['bad_groups']} groups)") if "ok" in r else ""
            table.add_row(
                r["layer"], "x".join(map(str, r["shape"])), f"{r['nonzeros']:,}", f"{r['sparsity']:.4f}", check
            )
        out_console.print(table)
        out_console.print(f"overall sparsity of the checked layers: {res['overall_sparsity']:.4f}")
    if not res["ok"]:
        error(f"{file} is not {res['pattern']}: {len(res['failing'])} failing: " + ", ".join(res["failing"]))
        raise typer.Exit(1)


@app.command("bench")
def bench(
    file: Path = typer.Argument(..., help="Exported weights (.safetensors) of a sparsify run.", show_default=False),
    batch: list[int] = typer.Option(
        None, "--batch", help="Batch sizes of the CUDA sweep (repeatable).", show_default=False
    ),
    img_size: int = typer.Option(None, "--img-size", help="Input size (default: the run's).", show_default=False),
    iters: int = typer.Option(20, "--iters", help="Timed iterations per batch size (at most 5 on CPU)."),
    cpu: bool = typer.Option(False, "--cpu", help="Report on CPU even when CUDA is available."),
    json_out: bool = JsonOption,
    quiet: bool = QuietOption,
) -> None:
    """Dense vs sparse on one named runtime: CUDA 2:4 semi-structured Linear kernels, or CPU size/FLOPs only."""
    setup_output(quiet)
    from evcli.errors import UsageError

    counts = [*(("--batch", b) for b in batch or []), ("--iters", iters), ("--img-size", img_size)]
    for flag_name, value in counts:
        if value is not None and value < 1:
            raise UsageError(f"{flag_name} must be >= 1, got {value}")
    from evcli.methods.sparsify.report import bench_file

    res = bench_file(file, batch or [1, 8, 32, 128], img_size=img_size, iters=iters, cpu=cpu)
    rows = [
        ("model / pattern", f"{res['model']} {res['pattern']}"),
        ("runtime", res["runtime"]),
        ("file size", f"{res['file_bytes']:,} bytes"),
        (
            "nonzeros",
            f"{res['nonzeros']:,} of {res['weights']:,} weights "
            f"({res['targeted_nonzeros']:,} of {res['targeted_weights']:,} in sparse layers)",
        ),
        (
            "MACs dense / ideal sparse",
            f"{res['macs_dense'] / 1e6:.2f}M / {res['macs_sparse_ideal'] / 1e6:.2f}M "
            f"at {res['input']} ({res['mac_counter']})",
        ),
    ]
    if "targeted_packed_ratio_fp16" in res:
        rows.append(("packed / dense fp16 (sparse layers)", f"{res['targeted_packed_ratio_fp16']:.4f}"))
    for r in res["speed"]:
        rows.append(
            (
                f"batch {r['batch']}",
                f"dense {r['dense_ms']:.3f} ms, sparse {r['sparse_ms']:.3f} ms, "
                f"x{r['speedup']:.2f}" + (" (sparse is SLOWER)" if r["sparse_slower"] else ""),
            )
        )
    for r in res.get("cpu_timing", []):
        rows.append((f"batch {r['batch']} (CPU, dense kernels)", f"{r['ms']:.3f} ms, {r['img_per_s']:.1f} img/s"))
    rows.append(("speed", res["speed_claim"]))
    print_result(res, json_out, "evcli sparsify bench", rows)
