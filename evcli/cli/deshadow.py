"""`evcli deshadow`: remove shadows from images (LAB-Net, SADC, baselines); train and evaluate the methods.

``evcli deshadow IMAGE`` and ``evcli deshadow DIR/`` run the default subcommand ``remove``; ``train``,
``eval`` and ``export`` are subcommands. A Typer group cannot take a positional argument in its callback
(it would swallow subcommand names), so the group routes any first word that is not a subcommand name
to ``remove`` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

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

HELP = """Remove shadows with LAB-Net or SADC (mask-guided); train, evaluate, compare with baselines.

Methods: LAB-Net (arXiv 2208.13039) and SADC (arXiv 2205.04908); baselines: identity, colour transfer.

Both methods are mask-guided: give a shadow mask with --mask, or (--mask auto, the default) a learned
shadow detector (a compact U-Net shipped in the package) estimates one and writes it beside the output so
you can check and correct it; --mask-method otsu uses the classical estimator (Otsu threshold on CIE
L + 0.5 b) instead. A mask over 40% of the image, or one the detector is unsure of, prints a warning.

The lit region is kept: pixels more than ~15 px from the mask keep their input values (not in the papers;
--no-keep-lit gives the network's output everywhere, as the papers do).

Default weights ship inside the package for LAB-Net, SADC and the detector, trained on CPU on rendered
shadows over real photos (scikit-image, scikit-learn, matplotlib and Debian's opencv-doc photos); they
are small CPU-trained models, not a match for weights trained on ISTD/SRD (use --weights).

Examples:

  evcli deshadow image.png --method labnet

  evcli deshadow photos/ -o clean/ --mask masks/

  evcli deshadow image.png --mask-method otsu --no-keep-lit

  evcli deshadow train --recipe deshadow/detector_builtin

  evcli deshadow image.png --method colour-transfer --mask mask.png

  evcli deshadow train --recipe deshadow/tiny

  evcli deshadow train --method labnet --data ~/data/ISTD --epochs 300 --vgg-weights vgg16.safetensors

  evcli deshadow eval runs/deshadow/<run> --data ~/data/ISTD --resize 256x256

  evcli deshadow eval --method identity --json
"""


class _DefaultToRemove(TyperGroup):
    """Routes ``evcli deshadow IMAGE ...`` (any first word that is not a subcommand) to ``remove``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["remove", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(help=HELP, cls=_DefaultToRemove, no_args_is_help=True)


def _check_choice(value: str | None, choices: tuple[str, ...], flag: str) -> str | None:
    if value is None:
        return None
    if value not in choices:
        from evcli.recipe import did_you_mean

        raise UsageError(f"unknown {flag} '{value}'{did_you_mean(value, choices)} (choices: {', '.join(choices)})")
    return value


# --------------------------------------------------------------------------------------------------
# remove (the default)


@app.command("remove")
def remove(
    source: Path = typer.Argument(..., help="An image file or a folder of images.", show_default=False),
    method: str = typer.Option(
        None,
        "--method",
        "-m",
        help="labnet, sadc, identity or colour-transfer (default: the weights' method, else labnet).",
        show_default=False,
    ),
    output: Path = typer.Option(
        None,
        "--output",
        "-o",
        help="Output file (one image) or folder (default: IMAGE_deshadow.png / DIR_deshadow/).",
        show_default=False,
    ),
    mask_arg: str = typer.Option(
        "auto",
        "--mask",
        help="Shadow mask image (for a folder: a folder of masks named like the images), or auto: estimate one.",
    ),
    mask_method: str = typer.Option(
        "detector",
        "--mask-method",
        help="How --mask auto estimates a mask: detector (learned, shipped) or otsu (classical).",
    ),
    keep_lit: bool = typer.Option(
        True,
        "--keep-lit/--no-keep-lit",
        help="Keep input pixels away from the mask (default); --no-keep-lit: the network's output everywhere "
        "(the papers').",
    ),
    weights: Path = typer.Option(
        None, "--weights", "-w", help="Weights (.safetensors) or a run folder (default: shipped).", show_default=False
    ),
    vgg_weights: Path = typer.Option(
        None, "--vgg-weights", help="ImageNet VGG16 .safetensors (SADC's backbone).", show_default=False
    ),
    tile: int = typer.Option(1024, "--tile", help="Largest side processed at once; larger images are tiled."),
    compare: bool = typer.Option(True, "--compare/--no-compare", help="Also write a before | mask | after PNG."),
    precision: str = typer.Option(
        "fp32",
        "--precision",
        help="LAB-Net arithmetic: fp32, or bf16 (blocks in bfloat16, residual in fp32; about 2x faster with "
        "AVX-512 BF16, pixels move up to ~1.5 8-bit levels).",
    ),
    overwrite: bool = OverwriteOption,
    json_out: bool = JsonOption,
    quiet: bool = QuietOption,
) -> None:
    """Remove shadows from an image or a folder of images (the default: `evcli deshadow IMAGE`)."""
    setup_output(quiet)
    if tile < 128:
        raise UsageError(f"--tile must be >= 128, got {tile}")
    from evcli.methods.deshadow.infer import MASK_METHODS

    _check_choice(mask_method, MASK_METHODS, "--mask-method")
    mask = None if mask_arg.strip().lower() == "auto" else Path(mask_arg)
    if not source.exists():
        raise DataError(f"image not found: {source}")
    from evcli.methods.deshadow.infer import list_images, load_remover

    images = list_images(source) if source.is_dir() else [source]
    if mask is not None and not mask.exists():
        raise DataError(f"mask not found: {mask}")
    if method is not None:
        from evcli.methods.deshadow.infer import normalise_method

        normalise_method(method)  # an unknown --method is reported before anything is loaded
    remover = load_remover(method, weights, str(vgg_weights) if vgg_weights else None, precision=precision)
    detector = None
    if mask_method == "detector" and (mask is None or mask.is_dir()):
        from evcli.methods.deshadow.infer import load_detector

        detector = load_detector()
    from evcli.runtime import retain_freed_memory_unless_opted_out

    retain_freed_memory_unless_opted_out()  # full-size maps reuse freed memory, not fresh pages (evcli/runtime.py)
    if source.is_dir():
        out_dir = output or source.parent / f"{source.name}_deshadow"
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"--output must be a folder when the input is a folder: {out_dir}")
        if mask is not None and not mask.is_dir():
            raise DataError(f"--mask must be a folder of masks when the input is a folder: {mask}")
        jobs = []
        for img in images:
            m = None
            if mask is not None:
                found = [p for p in sorted(mask.iterdir()) if p.stem == img.stem and p.is_file()]
                m = found[0] if found else None
                if m is None:
                    from evcli.console import warn

                    warn(f"no mask named {img.stem}.* in {mask}: estimating one")
            jobs.append((img, m, out_dir / f"{img.stem}.png"))
    else:
        out = output or source.with_name(f"{source.stem}_deshadow.png")
        if out.is_dir():
            out = out / f"{source.stem}.png"
        jobs = [(source, mask, out)]
    _check_outputs(jobs, compare, overwrite)
    for _, _, out in jobs:
        out.parent.mkdir(parents=True, exist_ok=True)
    results, failed = [], []
    for img, m, out in jobs:
        try:
            results.append(_remove_one(remover, img, m, out, tile, compare, detector, mask_method, keep_lit))
        except DataError as exc:
            if not source.is_dir():
                raise
            from evcli.console import warn  # a folder goes on past an unreadable image or mask, fails at the end

            warn(f"skipped {img.name}: {exc}")
            failed.append({"input": str(img), "error": str(exc)})
    report = {
        "method": remover.method,
        "weights": remover.weights,
        "keep_lit": keep_lit,
        "images": results,
        "failed": failed,
    }
    rows = [("method", remover.method), ("weights", remover.weights), ("images", str(len(results)))]
    rows += [(r["input"], f"-> {r['output']} (mask: {r['mask_source']})") for r in results[:20]]
    rows += [(f["input"], f"skipped: {f['error']}") for f in failed[:20]]
    print_result(report, json_out, "evcli deshadow", rows)
    if failed:
        names = ", ".join(Path(f["input"]).name for f in failed[:5]) + (", ..." if len(failed) > 5 else "")
        raise DataError(
            f"{len(failed)} of {len(jobs)} images could not be processed: {names}",
            hint="the others are written; fix or remove these and run again",
        )


def _outputs(out: Path, mask: Path | None, compare: bool) -> list[Path]:
    """Every file one image's removal writes: the result, the estimated mask (no --mask), the comparison."""
    return [out, *([] if mask is not None else [out.with_name(f"{out.stem}_mask.png")])] + (
        [out.with_name(f"{out.stem}_compare.png")] if compare else []
    )


def _check_outputs(jobs: list[tuple[Path, Path | None, Path]], compare: bool, overwrite: bool) -> None:
    """Before anything is written: no output replaces an input, nor (without --overwrite) an existing file."""
    from evcli.api import check_new_file

    inputs = [img for img, _, _ in jobs] + [m for _, m, _ in jobs if m is not None]
    for _, m, out in jobs:
        for target in _outputs(out, m, compare):
            check_new_file(target, overwrite, inputs)


def _remove_one(
    remover: Any,
    image: Path,
    mask: Path | None,
    out: Path,
    tile: int,
    compare: bool,
    detector: Any = None,
    mask_method: str = "detector",
    keep_lit: bool = True,
) -> dict[str, Any]:
    from evcli.console import log, warn
    from evcli.io.images import save_png
    from evcli.methods.deshadow.detector import LARGE_MASK
    from evcli.methods.deshadow.infer import comparison, estimate_mask, read_image, read_user_mask, remove_shadow

    rgb = read_image(image)
    entry: dict[str, Any] = {"input": str(image), "output": str(out), "size": [rgb.shape[2], rgb.shape[1]]}
    if mask is not None:
        m = read_user_mask(mask, tuple(rgb.shape[-2:]), remover.mask_threshold)
        entry["mask_source"] = str(mask)
        notes = []
        if not bool(m.any()):
            notes.append(f"mask {mask} is empty: nothing to remove" + (", the output is the input" if keep_lit else ""))
        elif bool(m.all()):
            notes.append(
                f"mask {mask} covers the whole image: no lit region to take colours from, expect little change"
            )
        elif float(m.mean()) > LARGE_MASK:
            notes.append(f"mask {mask} covers {100 * float(m.mean()):.0f}% of the image (over {100 * LARGE_MASK:.0f}%)")
    else:
        m, notes = estimate_mask(rgb, detector, mask_method)
        mask_out = _outputs(out, None, False)[1]
        save_png(m, mask_out)
        entry["mask_source"] = f"estimated ({mask_method}), written to {mask_out}"
        entry["mask"] = str(mask_out)
    for note in notes:
        warn(f"{image.name}: {note}")
    entry["warnings"] = notes
    entry["shadow_fraction"] = round(float(m.mean()), 4)
    result = remove_shadow(remover, rgb, m, tile, keep_lit=keep_lit)
    save_png(result, out)
    if compare:
        cmp_out = _outputs(out, mask, True)[-1]
        mask_label = "mask" if mask is not None else f"mask ({mask_method})"
        save_png(comparison(rgb, m, result, ("input", mask_label, f"output ({remover.method})")), cmp_out)
        entry["compare"] = str(cmp_out)
    log(f"{image} -> {out} (shadow {100 * entry['shadow_fraction']:.1f}% of the image)")
    return entry


# --------------------------------------------------------------------------------------------------
# train


def _train_rows(report: dict[str, Any], recipe: Any) -> list[tuple[str, str]]:
    return [
        ("method", f"{report['method']} ({report['parameters'] / 1e6:.3f}M params)"),
        ("steps", f"{report['steps']} ({report['epochs']:.2f} epochs, {report['device']})"),
        ("vgg", report["vgg"]),
        *_metric_rows(report["metrics"], recipe.method.eval_resize),
        ("weights", report["files"]["weights"]),
        ("report", str(Path(report["run_dir"]) / "report.json")),
    ]


TRAIN_FLAGS = [
    Flag(
        "method",
        str,
        flag("--method", "-m", help="labnet, sadc, or detector (the shadow detector) (default: labnet)."),
        "deshadow.method",
    ),
    Flag(
        "data",
        Path,
        flag(
            "--data",
            "-d",
            help="ISTD (train_A/B/C, test_A/B/C) or SRD (train|test/shadow, shadow_free) root (default: built-in).",
        ),
        "data.path",
    ),
    Flag("layout", str, flag("--layout", help="auto, istd or srd."), "deshadow.layout"),
    Flag("mask_dir", Path, flag("--mask-dir", help="SRD masks folder."), "deshadow.mask_dir"),
    Flag("img_size", int, flag("--img-size", help="Training crop (papers: 256 ISTD)."), "data.img_size"),
    Flag(
        "vgg", str, flag("--vgg", help="VGG16 weights: pretrained (ImageNet) or random (SADC release)."), "deshadow.vgg"
    ),
    Flag(
        "vgg_weights",
        Path,
        flag("--vgg-weights", help="ImageNet VGG16 weights (.safetensors)."),
        "deshadow.vgg_weights",
    ),
    Flag(
        "perceptual",
        bool,
        typer.Option(
            None,
            "--perceptual/--no-perceptual",
            help="The VGG16 levels of the perceptual loss (off: its pixel L1 only).",
            show_default=False,
        ),
        "deshadow.perceptual",
    ),
    Flag(
        "eca_laplacian",
        str,
        flag("--eca-laplacian", help="LAB-Net ECA kernel: fixed (paper) or trainable (release)."),
        "deshadow.eca_laplacian",
    ),
]


def _check_train(typed: dict[str, Any]) -> None:
    _check_choice(typed["method"], ("labnet", "sadc", "detector"), "--method")
    _check_choice(typed["layout"], ("auto", "istd", "srd"), "--layout")
    _check_choice(typed["vgg"], ("pretrained", "random"), "--vgg")
    _check_choice(typed["eca_laplacian"], ("fixed", "trainable"), "--eca-laplacian")


app.command("train")(
    training_command(
        "deshadow",
        TRAIN_FLAGS,
        _train_rows,
        "evcli deshadow train",
        "Train LAB-Net or SADC (built-in rendered shadows without --data; ISTD/SRD layouts with it).",
        group=False,
        check=_check_train,
    )
)


def _metric_rows(m: dict[str, float], resize: str) -> list[tuple[str, str]]:
    if "ber" in m:  # the shadow detector
        return [("BER / IoU", f"{m['ber']:.2f}% / {m['iou']:.3f}")]
    return [
        ("LAB MAE S / NS / All", f"{m['lab_mae_s']:.2f} / {m['lab_mae_ns']:.2f} / {m['lab_mae_all']:.2f}"),
        ("PSNR / SSIM", f"{m['psnr']:.2f} dB / {m['ssim']:.4f}"),
        ("resize policy", resize),
    ]


# --------------------------------------------------------------------------------------------------
# eval and export


@app.command("eval")
def evaluate(
    weights: Path = typer.Argument(
        None, help="Weights (.safetensors) or run folder (default: shipped / none for baselines).", show_default=False
    ),
    method: str = typer.Option(
        None, "--method", "-m", help="labnet, sadc, identity or colour-transfer.", show_default=False
    ),
    recipe: str = RecipeOption,
    data: Path = typer.Option(
        None, "--data", "-d", help="ISTD/SRD root (default: from the run, else built-in).", show_default=False
    ),
    layout: str = typer.Option(None, "--layout", help="auto, istd or srd.", show_default=False),
    mask_dir: Path = typer.Option(None, "--mask-dir", help="SRD masks folder.", show_default=False),
    resize: str = typer.Option(
        None, "--resize", help="Evaluation protocol: 256x256 (resize all) or full.", show_default=False
    ),
    vgg_weights: Path = typer.Option(
        None, "--vgg-weights", help="ImageNet VGG16 .safetensors (SADC's backbone).", show_default=False
    ),
    sets: list[str] = SetOption,
    json_out: bool = JsonOption,
    quiet: bool = QuietOption,
) -> None:
    """LAB mean absolute error (the papers' "RMSE") on shadow / non-shadow / all pixels, PSNR and SSIM."""
    setup_output(quiet)
    from evcli.methods.deshadow.infer import BASELINES, normalise_method, shipped_weights

    name = normalise_method(method) if method else None
    flags = recipe_flags(
        {
            "data.path": data,
            "deshadow.layout": _check_choice(layout, ("auto", "istd", "srd"), "--layout"),
            "deshadow.mask_dir": mask_dir,
            "deshadow.eval_resize": _check_choice(resize, ("256x256", "full"), "--resize"),
            "deshadow.vgg_weights": vgg_weights,
        }
    )
    if vgg_weights is not None:
        flags["deshadow.vgg"] = "pretrained"
    from evcli import api

    if name in BASELINES:
        if weights is not None:
            raise UsageError(f"--method {method} is a baseline and takes no weights")
        from evcli.methods.deshadow.method import evaluate_baseline
        from evcli.recipe import resolve_recipe

        rec = resolve_recipe("deshadow", recipe_file=find_recipe(recipe), flags=flags, sets=sets or [])
        report = evaluate_baseline(rec, name)
    else:
        if weights is None:
            weights = shipped_weights(name or "labnet")
            if weights is None:
                raise UsageError(f"no default weights ship for --method {name}; give WEIGHTS")
        if name is not None:
            flags["deshadow.method"] = name
        rec = api.evaluation_recipe("deshadow", weights, find_recipe(recipe), flags, sets or [])
        report = api.evaluate(rec, weights)
        report["method"] = rec.method.method
    report["eval_resize"] = rec.method.eval_resize
    rows = [
        ("method", report.get("method", "")),
        ("weights", report["weights"]),
        ("data", report["data"]),
        *_metric_rows(report["metrics"], rec.method.eval_resize),
    ]
    print_result(report, json_out, "evcli deshadow eval", rows)


app.command("export")(export_command("deshadow"))
