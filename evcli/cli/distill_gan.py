"""`evcli distill-gan`: train a CycleGAN / Pix2Pix teacher, distill it into a small student with CRD (content
relationship distillation), evaluate, export, translate images, count MACs."""

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
from evcli.errors import UsageError

HELP = """Compress a CycleGAN / Pix2Pix generator into a small student by content relationship distillation.

Method: CRD (arXiv 2212.11091). The student (a mobile ResNet-9 generator, width 16, or with --student-arch unet
the Pix2Pix U-Net) learns from the teacher's output images only: row strips, column strips and 32x32 patches of
both outputs are matched by relational distances and angles (RKD), plus VGG16 style/feature terms and, for
CycleGAN, the teacher's discriminator (frozen) as adversary. Baselines in the same tool: the student alone
(`teacher --teacher-width 16`, no distillation) and plain output L1 to the teacher (`student --student-loss l1`).

Built-in data (no --data): real photos shipped in scikit-image, scikit-learn and matplotlib. CycleGAN task:
photo2sketch, A = photos, B = pencil sketches of 7 other photos; Pix2Pix task: photo2sketch, A = a photo,
B = its pencil sketch (15 photos). All cut into tiles at up to three scales; coffee and grace_hopper.jpg are
held out for evaluation. With --data: the CycleGAN layout (trainA, trainB, testA,
testB) or the Pix2Pix aligned layout (train/, val/ of side-by-side AB images).

VGG16 (style/feature terms): torchvision's ImageNet weights from its local cache or --vgg-weights FILE;
nothing is downloaded. On the built-in data the default is a fixed random VGG16 (said in the report).

Examples:

  evcli distill-gan teacher -r distill-gan/builtin --out runs/teacher

  evcli distill-gan student -r distill-gan/builtin --teacher runs/teacher

  evcli distill-gan student -r distill-gan/builtin --teacher runs/teacher --student-loss l1

  evcli distill-gan teacher -r distill-gan/crd_horse2zebra --data ~/data/horse2zebra

  evcli distill-gan student -r distill-gan/crd_horse2zebra --data ~/data/horse2zebra --teacher runs/h2z-teacher

  evcli distill-gan translate horse.png --weights runs/student -o zebra.png

  evcli distill-gan cost --json
"""

app = typer.Typer(help=HELP, no_args_is_help=True)

TASKS = ("cyclegan", "pix2pix")
TEACHER_ARCHS = ("mobile_resnet", "resnet", "unet")
STUDENT_ARCHS = ("mobile_resnet", "unet")


def _choice(value: str | None, choices: tuple[str, ...], name: str) -> None:
    if value is not None and value not in choices:
        from evcli.recipe import did_you_mean

        raise UsageError(f"unknown {name} '{value}'{did_you_mean(value, choices)} (choices: {', '.join(choices)})")


COMMON = [
    Flag(
        "data",
        Path,
        flag(
            "--data",
            "-d",
            help="CycleGAN root (trainA, trainB, testA, testB) or Pix2Pix root (train/, val/ of AB images); "
            "default: built-in photos.",
        ),
        "data.path",
    ),
    Flag("task", str, flag("--task", help="cyclegan (unpaired) or pix2pix (paired)."), "distill-gan.task"),
    Flag("img_size", int, flag("--img-size", help="Training crop in pixels (paper: 256)."), "data.img_size"),
    Flag(
        "teacher_width",
        int,
        flag("--teacher-width", help="Teacher generator width ngf (paper: 64)."),
        "distill-gan.teacher_width",
    ),
    Flag(
        "teacher_arch",
        str,
        flag(
            "--teacher-arch",
            help="mobile_resnet (CRD's teacher), resnet (the original CycleGAN generator) or unet (the Pix2Pix U-Net, "
            "Pix2Pix task; depth: distill-gan.unet_depth, default the deepest <= 8 the image size allows).",
        ),
        "distill-gan.teacher_arch",
    ),
    Flag(
        "inception_weights",
        Path,
        flag(
            "--inception-weights",
            help="torchvision InceptionV3 weights (.safetensors): adds FID of the outputs against the val targets "
            "(torchvision's network, not pytorch-fid's: not comparable with the papers' FIDs).",
        ),
        "distill-gan.inception_weights",
    ),
]

TEACHER_FLAGS = [
    Flag("stage", str, typer.Option("teacher", "--stage", hidden=True), "distill-gan.stage"),
    *COMMON,
]

STUDENT_FLAGS = [
    Flag("stage", str, typer.Option("student", "--stage", hidden=True), "distill-gan.stage"),
    *COMMON,
    Flag(
        "teacher",
        Path,
        flag(
            "--teacher",
            help="Trained teacher: a teacher run folder, checkpoint or weights .safetensors (default: train the "
            "teacher online in this run, as the paper does).",
        ),
        "distill-gan.teacher",
    ),
    Flag(
        "student_width",
        int,
        flag("--student-width", help="Student generator width ngf (paper: 16)."),
        "distill-gan.student_width",
    ),
    Flag(
        "student_arch",
        str,
        flag("--student-arch", help="mobile_resnet (CRD's student) or unet (the Pix2Pix U-Net)."),
        "distill-gan.student_arch",
    ),
    Flag(
        "student_loss",
        str,
        flag("--student-loss", help="crd (the method) or l1 (baseline: plain L1 to the teacher's output)."),
        "distill-gan.student_loss",
    ),
    Flag(
        "vgg",
        str,
        flag("--vgg", help="VGG16 of the style/feature terms: auto, pretrained or random."),
        "distill-gan.vgg",
    ),
    Flag(
        "vgg_weights",
        Path,
        flag("--vgg-weights", help="ImageNet VGG16 weights (.safetensors; torchvision's state dict)."),
        "distill-gan.vgg_weights",
    ),
]


def _check(typed: dict[str, Any]) -> None:
    _choice(typed.get("task"), TASKS, "--task")
    _choice(typed.get("teacher_arch"), TEACHER_ARCHS, "--teacher-arch")
    _choice(typed.get("student_arch"), STUDENT_ARCHS, "--student-arch")
    _choice(typed.get("student_loss"), ("crd", "l1"), "--student-loss")
    _choice(typed.get("vgg"), ("auto", "pretrained", "random"), "--vgg")
    for key, name in (("student_width", "--student-width"), ("teacher_width", "--teacher-width")):
        if typed.get(key) is not None and typed[key] <= 0:
            raise UsageError(f"{name} must be a positive width, got {typed[key]}")
    if typed.get("vgg_weights") is not None and typed.get("vgg") is None:
        typed["vgg"] = "pretrained"


def _metric_rows(m: dict[str, float]) -> list[tuple[str, str]]:
    rows = []
    if "psnr_vs_teacher" in m:
        rows.append(("student vs teacher", f"PSNR {m['psnr_vs_teacher']:.2f} dB / SSIM {m['ssim_vs_teacher']:.4f}"))
    if "psnr_vs_target" in m:
        rows.append(("vs ground truth", f"PSNR {m['psnr_vs_target']:.2f} dB / SSIM {m['ssim_vs_target']:.4f}"))
    if "psnr_cycle" in m:
        rows.append(("cycle A->B->A", f"PSNR {m['psnr_cycle']:.2f} dB"))
    if "fid" in m:
        rows.append(("FID (torchvision InceptionV3)", f"{m['fid']:.2f}"))
    return rows


def _cost_rows(cost: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for who in ("teacher", "student"):
        if who in cost:
            c = cost[who]
            rows.append((f"{who} at 256x256", f"{c['macs'] / 1e9:.3f} GMACs, {c['params'] / 1e6:.4f} M params"))
    if "macs_reduction" in cost:
        rows.append(("reduction", f"{cost['macs_reduction']:.1f}x MACs, {cost['params_reduction']:.1f}x params"))
    return rows


def _train_rows(report: dict[str, Any], recipe: Any) -> list[tuple[str, str]]:
    return [
        ("stage", f"{report['stage']} ({report['task']}, {report['model']})"),
        ("steps", f"{report['steps']} ({report['epochs']:.2f} epochs, {report['device']})"),
        ("teacher", report.get("teacher") or "-"),
        ("vgg", report["vgg"]),
        *_metric_rows(report["metrics"]),
        *_cost_rows(report["cost_at_256"]),
        ("weights", report["files"]["weights"]),
        ("report", str(Path(report["run_dir"]) / "report.json")),
    ]


app.command("teacher")(
    training_command(
        "distill-gan",
        TEACHER_FLAGS,
        _train_rows,
        "evcli distill-gan teacher",
        "Train the teacher GAN: CycleGAN (two generators, two discriminators, cycle and identity losses) or "
        "Pix2Pix (L1 x 100 + hinge GAN). --teacher-width 16 trains the student-sized generator alone (the "
        "no-distillation baseline).",
        group=False,
        check=_check,
    )
)

app.command("student")(
    training_command(
        "distill-gan",
        STUDENT_FLAGS,
        _train_rows,
        "evcli distill-gan student",
        "Distill a teacher into the small student with CRD (or --student-loss l1). With --teacher the teacher "
        "is frozen; without it the teacher trains online in the same run (the card's schedule).",
        group=False,
        check=_check,
    )
)


@app.command("eval")
def evaluate(
    weights: Path = typer.Argument(..., help="Run folder, checkpoint or weights (.safetensors).", show_default=False),
    teacher: Path = typer.Option(
        None, "--teacher", help="Teacher to compare a student with (default: the run's own).", show_default=False
    ),
    recipe: str = RecipeOption,
    data: Path = typer.Option(None, "--data", "-d", help="Data root (default: the run's).", show_default=False),
    inception_weights: Path = typer.Option(
        None, "--inception-weights", help="torchvision InceptionV3 .safetensors: adds FID.", show_default=False
    ),
    sets: list[str] = SetOption,
    json_out: bool = JsonOption,
    quiet: bool = QuietOption,
) -> None:
    """PSNR / SSIM of a student's output against its teacher's (and against the target on paired data) on the
    val images; a teacher's cycle-reconstruction PSNR."""
    setup_output(quiet)
    from evcli import api

    flags = recipe_flags(
        {"data.path": data, "distill-gan.teacher": teacher, "distill-gan.inception_weights": inception_weights}
    )
    rec = api.evaluation_recipe("distill-gan", weights, find_recipe(recipe), flags, sets or [])
    report = api.evaluate(rec, weights)
    rows = [("weights", report["weights"]), ("data", report["data"]), *_metric_rows(report["metrics"])]
    print_result(report, json_out, "evcli distill-gan eval", rows)


app.command("export")(export_command("distill-gan"))


@app.command("translate")
def translate_cmd(
    image: Path = typer.Argument(..., help="An image of the source domain.", show_default=False),
    weights: Path = typer.Option(
        ..., "--weights", "-w", help="Run folder, checkpoint or exported weights of a generator.", show_default=False
    ),
    output: Path = typer.Option(
        None, "--output", "-o", help="Output PNG (default: IMAGE_translated.png).", show_default=False
    ),
    teacher: Path = typer.Option(
        None, "--teacher", help="Teacher for the grid (default: the student's own).", show_default=False
    ),
    grid_out: bool = typer.Option(
        True, "--grid/--no-grid", help="Also write OUTPUT_grid.png: input | teacher | student."
    ),
    overwrite: bool = OverwriteOption,
    json_out: bool = JsonOption,
    quiet: bool = QuietOption,
) -> None:
    """Translate one image with a generator; with a student, also write an input | teacher | student grid."""
    setup_output(quiet)
    from evcli.api import check_new_file
    from evcli.errors import DataError

    if not image.is_file():
        raise DataError(f"image not found: {image}")
    out = output or image.with_name(f"{image.stem}_translated.png")
    check_new_file(out, overwrite, [image])
    from evcli.io.images import save_png
    from evcli.methods.distill_gan.infer import grid, load_translator, read_image, translate

    tr = load_translator(weights, teacher)
    grid_path = out.with_name(f"{out.stem}_grid.png")
    want_grid = grid_out and tr.teacher is not None
    if want_grid:
        check_new_file(grid_path, overwrite, [image])
    rgb = read_image(image)
    result = translate(tr.generator, rgb)
    save_png(result, out)
    report: dict[str, Any] = {"input": str(image), "output": str(out), "weights": tr.weights, "role": tr.role}
    if want_grid:
        save_png(grid(rgb, translate(tr.teacher, rgb), result), grid_path)
        report["grid"] = str(grid_path)
    elif grid_out and tr.role == "student":
        report["grid_note"] = "no teacher at hand for the grid (pass --teacher)"
    rows = [(k, str(v)) for k, v in report.items()]
    print_result(report, json_out, "evcli distill-gan translate", rows)


@app.command("cost")
def cost_cmd(
    recipe: str = RecipeOption,
    teacher_width: int = typer.Option(None, "--teacher-width", help="Teacher ngf (default 64).", show_default=False),
    teacher_arch: str = typer.Option(
        None, "--teacher-arch", help="mobile_resnet, resnet or unet (default: mobile_resnet).", show_default=False
    ),
    student_width: int = typer.Option(None, "--student-width", help="Student ngf (default 16).", show_default=False),
    student_arch: str = typer.Option(
        None, "--student-arch", help="mobile_resnet or unet (default: mobile_resnet).", show_default=False
    ),
    size: int = typer.Option(256, "--size", help="Input side in pixels."),
    sets: list[str] = SetOption,
    json_out: bool = JsonOption,
    quiet: bool = QuietOption,
) -> None:
    """MACs and parameters of the teacher and student generators (counter and input size named). A U-Net's depth
    is the recipe's (distill-gan.unet_depth, or the deepest <= 8 that data.img_size allows); --size must be
    divisible by 2**depth."""
    setup_output(quiet)
    _check(
        {
            "teacher_arch": teacher_arch,
            "student_arch": student_arch,
            "teacher_width": teacher_width,
            "student_width": student_width,
        }
    )
    if size <= 0 or size % 4:
        raise UsageError(f"--size must be a positive multiple of 4, got {size}")
    from evcli import api
    from evcli.methods.distill_gan.cost import count_cost
    from evcli.methods.distill_gan.method import recipe_generator

    flags = recipe_flags(
        {
            "distill-gan.teacher_width": teacher_width,
            "distill-gan.teacher_arch": teacher_arch,
            "distill-gan.student_width": student_width,
            "distill-gan.student_arch": student_arch,
        }
    )
    rec = api.resolve("distill-gan", find_recipe(recipe), flags, sets or [])
    cfg, img_size = rec.method, rec.data.img_size
    specs = {role: cfg.generator_spec(role, img_size) for role in ("teacher", "student")}
    for role, (arch, _, depth) in specs.items():
        if arch == "unet" and size % 2**depth:
            raise UsageError(
                f"--size {size} is not divisible by {2**depth}, the input multiple of the {role}'s U-Net "
                f"(depth {depth})",
                hint="pass a --size divisible by it, or set distill-gan.unet_depth (or data.img_size) lower",
            )
    t = count_cost(recipe_generator(cfg, "teacher", img_size), size)
    s = count_cost(recipe_generator(cfg, "student", img_size), size)

    def described(role: str) -> dict[str, Any]:
        arch, width, depth = specs[role]
        return {"arch": arch, "width": width, **({"depth": depth} if arch == "unet" else {})}

    report = {
        "teacher": {**described("teacher"), **t},
        "student": {**described("student"), **s},
        "macs_reduction": t["macs"] / s["macs"],
        "params_reduction": t["params"] / s["params"],
    }
    rows = _cost_rows(report) + [
        (
            "exact MACs (transposed conv at its true cost)",
            f"teacher {t['macs_exact'] / 1e9:.3f} G, student {s['macs_exact'] / 1e9:.3f} G",
        ),
        ("counter", t["counter"]),
        ("input", t["input"]),
    ]
    print_result(report, json_out, "evcli distill-gan cost", rows)
