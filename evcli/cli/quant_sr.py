"""`evcli quant-sr`: ultra-low-bit super-resolution (DDTB, PAMS baseline, bicubic) on EDSR / SRResNet: train,
evaluate (PSNR / SSIM on Y per dataset folder), export integer weights, upscale a user's image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from evcli.cli.common import (
    Flag,
    JsonOption,
    OverwriteOption,
    QuietOption,
    RecipeOption,
    SetOption,
    export_command,
    find_recipe,
    flag,
    print_result,
    recipe_flags,
    setup_output,
    training_command,
)
from evcli.errors import DataError, UsageError

HELP = """Ultra-low-bit super-resolution: DDTB (arXiv 2203.03844) and the PAMS baseline on EDSR / SRResNet.

DDTB quantizes activations with trainable upper and lower bounds and, at the 30% of layers whose ranges vary
most between inputs, a tiny 2-bit gate that rescales both bounds per image; weights use a 1st/99th-percentile
clip; the quantized network is distilled (L1 + attention transfer) from its full-precision teacher.

Train the full-precision network first (--bits 32), then quantize with --teacher. Without --data it trains
on built-in real photos shipped in pip packages (scikit-image, scikit-learn china.jpg) and evaluates on
held-out ones (scikit-image coffee, scikit-learn flower.jpg, matplotlib grace_hopper.jpg) with bicubic LR
made on the fly. With --data it reads DIV2K (DIV2K_train_HR/) or any HR folder, and evaluates on
Set5/Set14/B100/Urban100 folders (HR/ [+ LR_bicubic/X4/]) in DATA/benchmark or --benchmark.

Examples:

  evcli quant-sr train --recipe quant-sr/tiny_fp --out runs/fp

  evcli quant-sr train --bits 32 --scale 4 --epochs 20 --out runs/edsr_fp

  evcli quant-sr train --method ddtb --bits 2 --teacher runs/edsr_fp --out runs/ddtb2

  evcli quant-sr train --method pams --bits 2 --teacher runs/edsr_fp

  evcli quant-sr train --recipe quant-sr/edsr_x4_ddtb_2bit --data ~/data/DIV2K --teacher edsr_x4.safetensors

  evcli quant-sr eval runs/ddtb2 --benchmark ~/data/benchmark

  evcli quant-sr eval --method bicubic --scale 4

  evcli quant-sr export runs/ddtb2 -o edsr_x4_2bit.safetensors

  evcli quant-sr upscale photo.png --weights runs/ddtb2 -o photo_x4.png
"""

app = typer.Typer(help=HELP, no_args_is_help=True)

METHODS = ("ddtb", "pams")


def _choice(value: Any, choices: tuple, name: str) -> Any:
    if value is None:
        return None
    if value not in choices:
        from evcli.recipe import did_you_mean

        shown = ", ".join(str(c) for c in choices)
        raise UsageError(
            f"unknown {name} '{value}'{did_you_mean(str(value), [str(c) for c in choices])} (choices: {shown})"
        )
    return value


def _check_bits(bits: int | None) -> None:
    if bits is not None and bits not in (2, 3, 4, 5, 6, 7, 8, 32):
        raise UsageError(f"--bits must be 2, 3 or 4 (the paper's; up to 8) or 32 (full precision), got {bits}")


def _check_scale(scale: int | None) -> None:
    if scale is not None and scale not in (2, 3, 4):
        raise UsageError(f"--scale must be 2, 3 or 4, got {scale}")


def _metric_rows(metrics: dict[str, float]) -> list[tuple[str, str]]:
    rows = []
    names = sorted({k.rsplit("/", 1)[0] for k in metrics if k.endswith("psnr") and "/" in k})
    for prefix in names or [""]:
        p = f"{prefix}/" if prefix else ""
        if f"{p}psnr" not in metrics:
            continue
        rows.append(
            (
                f"{prefix or 'val'} PSNR / SSIM (Y)",
                f"{metrics[f'{p}psnr']:.2f} dB / {metrics[f'{p}ssim']:.4f}  (bicubic {metrics[f'{p}psnr_bicubic']:.2f}"
                f" / {metrics[f'{p}ssim_bicubic']:.4f}, {int(metrics[f'{p}images'])} images)",
            )
        )
    if "size_bytes" in metrics:
        ratio = metrics["fp32_size_bytes"] / metrics["size_bytes"]
        rows.append(
            (
                "model size",
                f"{int(metrics['size_bytes']):,} bytes at {int(metrics['bits'])} bits "
                f"(fp32 {int(metrics['fp32_size_bytes']):,}, {ratio:.1f}x smaller)",
            )
        )
    return rows


def _train_rows(report: dict[str, Any], recipe: Any) -> list[tuple[str, str]]:
    return [
        ("method", f"{report['quantizer']} {report['bits']}-bit {report['arch']} x{report['scale']}"),
        ("steps", f"{report['steps']} ({report['epochs']:.2f} epochs, {report['device']})"),
        *_metric_rows(report["metrics"]),
        ("weights", report["files"]["weights"]),
        ("report", str(Path(report["run_dir"]) / "report.json")),
    ]


TRAIN_FLAGS = [
    Flag("method", str, flag("--method", "-m", help="Quantizer: ddtb (default) or pams."), "quant-sr.method"),
    Flag(
        "bits", int, flag("--bits", help="2, 3 or 4 (up to 8); 32 trains the full-precision network."), "quant-sr.bits"
    ),
    Flag("scale", int, flag("--scale", help="Upscaling factor: 2, 3 or 4."), "quant-sr.scale"),
    Flag("arch", str, flag("--arch", help="edsr_baseline (16x64), edsr (32x256) or srresnet."), "quant-sr.arch"),
    Flag(
        "teacher", Path, flag("--teacher", help="Full-precision weights or --bits 32 run folder."), "quant-sr.teacher"
    ),
    Flag(
        "data",
        Path,
        flag("--data", "-d", help="DIV2K root or a folder of HR images (default: built-in photos)."),
        "data.path",
    ),
    Flag(
        "benchmark", Path, flag("--benchmark", help="Folder with Set5/ Set14/ B100/ Urban100/."), "quant-sr.benchmark"
    ),
    Flag("patch_size", int, flag("--patch-size", help="HR training patch (paper: 192 at x4)."), "data.img_size"),
    Flag(
        "dynamic_ratio",
        float,
        flag("--dynamic-ratio", help="Fraction of quantizers with a gate (EDSR 0.3, SRResNet 0.1)."),
        "quant-sr.dynamic_ratio",
    ),
    Flag(
        "bound_init",
        str,
        flag("--bound-init", help="all_bits (calibrate bounds at every width) or release (2-bit only, else +-10)."),
        "quant-sr.bound_init",
    ),
    Flag(
        "gate_grad",
        str,
        flag("--gate-grad", help="ste (gradients through the gate's quantizers) or release (detached)."),
        "quant-sr.gate_grad",
    ),
]


def _check_train(typed: dict[str, Any]) -> None:
    _choice(typed["method"], METHODS, "--method")
    _check_bits(typed["bits"])
    _check_scale(typed["scale"])
    _choice(typed["arch"], ("edsr_baseline", "edsr", "srresnet"), "--arch")
    _choice(typed["bound_init"], ("all_bits", "release"), "--bound-init")
    _choice(typed["gate_grad"], ("ste", "release"), "--gate-grad")


app.command("train")(
    training_command(
        "quant-sr",
        TRAIN_FLAGS,
        _train_rows,
        "evcli quant-sr train",
        "Train full-precision (--bits 32) or quantize (--bits 2/3/4 --teacher FP) an SR network (built-in photos "
        "without --data).\n\nExamples:\n\n  evcli quant-sr train --bits 32 --out runs/edsr_fp\n\n"
        "  evcli quant-sr train --method ddtb --bits 2 --teacher runs/edsr_fp\n\n"
        "  evcli quant-sr train --recipe quant-sr/edsr_x4_ddtb_2bit --data ~/data/DIV2K --teacher edsr_x4.safetensors",
        group=False,
        check=_check_train,
    )
)


@app.command("eval")
def evaluate(
    weights: Path = typer.Argument(None, help="Weights (.safetensors) or run folder.", show_default=False),
    method: str = typer.Option(None, "--method", "-m", help="bicubic: the baseline (no weights).", show_default=False),
    scale: int = typer.Option(None, "--scale", help="Upscaling factor (must match the weights).", show_default=False),
    recipe: str = RecipeOption,
    data: Path = typer.Option(
        None, "--data", "-d", help="Data root (benchmark/ inside or beside it).", show_default=False
    ),
    benchmark: Path = typer.Option(
        None, "--benchmark", help="Folder with Set5/ Set14/ B100/ Urban100/.", show_default=False
    ),
    sets: list[str] = SetOption,
    json_out: bool = JsonOption,
    quiet: bool = QuietOption,
) -> None:
    """PSNR and SSIM on Y (border = scale) per evaluation set, with bicubic alongside, and the model size."""
    setup_output(quiet)
    _check_scale(scale)
    _choice(method, ("bicubic", *METHODS), "--method")
    from evcli import api

    flags = recipe_flags({"data.path": data, "quant-sr.benchmark": benchmark})
    if method == "bicubic":
        if weights is not None:
            raise UsageError("--method bicubic is the baseline and takes no weights")
        from evcli.methods.quant_sr.method import evaluate_bicubic
        from evcli.recipe import resolve_recipe

        if scale is not None:
            flags["quant-sr.scale"] = scale
        rec = resolve_recipe("quant-sr", recipe_file=find_recipe(recipe), flags=flags, sets=sets or [])
        report = evaluate_bicubic(rec)
    else:
        if weights is None:
            raise UsageError("give WEIGHTS (a .safetensors file or run folder), or --method bicubic")
        rec = api.evaluation_recipe("quant-sr", weights, find_recipe(recipe), flags, sets or [])
        if scale is not None and scale != rec.method.scale:
            raise UsageError(f"{weights} is a x{rec.method.scale} model, not x{scale}")
        report = api.evaluate(rec, weights)
        report["method"] = f"{rec.method.method if rec.method.bits < 32 else 'fp32'} {rec.method.bits}-bit"
    rows = [
        ("method", report["method"]),
        ("weights", report["weights"]),
        ("data", report["data"]),
        *_metric_rows(report["metrics"]),
    ]
    print_result(report, json_out, "evcli quant-sr eval", rows)


app.command("export")(export_command("quant-sr"))


@app.command("upscale")
def upscale(
    image: Path = typer.Argument(..., help="Image to upscale (RGB, grayscale or RGBA).", show_default=False),
    weights: Path = typer.Option(
        ..., "--weights", "-w", help="Weights (.safetensors) or run folder.", show_default=False
    ),
    output: Path = typer.Option(
        None, "--output", "-o", help="Output PNG (default: IMAGE_x<scale>.png).", show_default=False
    ),
    scale: int = typer.Option(
        None, "--scale", help="Expected upscaling factor (checked against the weights).", show_default=False
    ),
    tile: int = typer.Option(256, "--tile", help="Largest LR tile side processed at once; larger images are tiled."),
    overwrite: bool = OverwriteOption,
    json_out: bool = JsonOption,
    quiet: bool = QuietOption,
) -> None:
    """Upscale one image with a trained (full-precision or quantized) model."""
    setup_output(quiet)
    _check_scale(scale)
    if tile < 16:
        raise UsageError(f"--tile must be >= 16, got {tile}")
    if not image.exists():
        raise DataError(f"image not found: {image}")
    from evcli.api import check_new_file
    from evcli.methods.quant_sr.infer import load_upscaler, read_image_modes, upscale_image, write_image

    model, rec = load_upscaler(weights, scale)
    s = rec.method.scale
    out = output or image.with_name(f"{image.stem}_x{s}.png")
    check_new_file(out, overwrite, [image])
    rgb, alpha, gray = read_image_modes(image)
    sr = upscale_image(model, rgb, tile)
    write_image(out, sr, alpha, gray, s)
    report = {
        "input": str(image),
        "output": str(out),
        "scale": s,
        "bits": rec.method.bits,
        "size_in": [rgb.shape[2], rgb.shape[1]],
        "size_out": [sr.shape[2], sr.shape[1]],
        "mode": "grayscale" if gray else ("RGBA" if alpha is not None else "RGB"),
    }
    rows = [(k, str(v)) for k, v in report.items()]
    print_result(report, json_out, "evcli quant-sr upscale", rows)
