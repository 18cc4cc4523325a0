"""`evcli pointcloud`: PointMetaBase and the PointNeXt baseline for point-cloud classification and semantic
segmentation: train, eval, export, predict, and the size table (parameters, FLOPs) of the networks."""

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

HELP = """Point-cloud classification and segmentation with PointMetaBase (arXiv 2211.14462), and its baseline
PointNeXt (NeurIPS 2022) built from the same pure-PyTorch point ops (FPS, ball query, grouping, three-NN).

Sizes: --model pointmetabase-s|l|xl|xxl|xxxl, pointnext-s|b|l|xl (classification: pointmetabase-s,
pointnext-s). Data: ModelNet40 / ScanObjectNN HDF5 folders (classification), S3DIS <root>/raw/Area_*.npy
(segmentation). Without --data: built-in synthetic data made on the fly, never ModelNet or S3DIS: clouds sampled
from trimesh primitives and compositions (10 classes: sphere, box, cylinder, cone, torus, capsule, table,
dumbbell, mushroom, snowman), or rooms of floor, walls, boxes, columns and balls (5 classes).

Examples:

  evcli pointcloud train --recipe pointcloud/tiny

  evcli pointcloud train --model pointnext-s --epochs 30

  evcli pointcloud train --task segmentation --model pointmetabase-l --data ~/data/s3disfull

  evcli pointcloud train --recipe pointcloud/s3dis_pointmetabase_l --data ~/data/s3disfull

  evcli pointcloud eval runs/pointcloud/<run> --full-room

  evcli pointcloud predict room.npy --weights runs/pointcloud/<run>

  evcli pointcloud export runs/pointcloud/<run>

  evcli pointcloud sizes --task segmentation
"""

app = typer.Typer(help=HELP, no_args_is_help=True)

TASKS = ("classification", "segmentation")


def _check_choice(value: str | None, choices: tuple[str, ...], name: str) -> str | None:
    if value is not None and value not in choices:
        from evcli.recipe import did_you_mean

        raise UsageError(f"unknown {name} '{value}'{did_you_mean(value, choices)} (choices: {', '.join(choices)})")
    return value


TRAIN_FLAGS = [
    Flag("task", str, flag("--task", "-t", help="classification or segmentation."), "pointcloud.task"),
    Flag(
        "model",
        str,
        flag("--model", "-m", help="pointmetabase-s|l|xl|xxl|xxxl or pointnext-s|b|l|xl (default pointmetabase-s)."),
        "model.name",
    ),
    Flag(
        "data",
        Path,
        flag(
            "--data",
            "-d",
            help="ModelNet40/ScanObjectNN HDF5 folder, or S3DIS root (raw/Area_*.npy); default: built-in.",
        ),
        "data.path",
    ),
    Flag("num_points", int, flag("--num-points", help="Classification: points per cloud."), "pointcloud.num_points"),
    Flag("voxel_max", int, flag("--voxel-max", help="Segmentation: points per training crop."), "pointcloud.voxel_max"),
]


def _check_train(typed: dict[str, Any]) -> None:
    _check_choice(typed["task"], TASKS, "--task")


def _metric_rows(m: dict[str, float]) -> list[tuple[str, str]]:
    return [("OA / mAcc / mIoU", f"{m.get('oa', 0):.2f} / {m.get('macc', 0):.2f} / {m.get('miou', 0):.2f}")]


def _train_rows(report: dict[str, Any], recipe: Any) -> list[tuple[str, str]]:
    return [
        ("model", f"{recipe.model.name} ({report['parameters'] / 1e6:.3f}M params, {recipe.method.task})"),
        ("steps", f"{report['steps']} ({report['epochs']:.2f} epochs, {report['device']})"),
        *_metric_rows(report["metrics"]),
        ("weights", report["files"]["weights"]),
        ("report", str(Path(report["run_dir"]) / "report.json")),
    ]


app.command("train")(
    training_command(
        "pointcloud",
        TRAIN_FLAGS,
        _train_rows,
        "evcli pointcloud train",
        "Train PointMetaBase or PointNeXt (built-in synthetic shapes or rooms without --data).",
        group=False,
        check=_check_train,
    )
)


@app.command("eval")
def evaluate(
    weights: Path = typer.Argument(..., help="Run folder or weights (.safetensors).", show_default=False),
    recipe: str = RecipeOption,
    data: Path = typer.Option(None, "--data", "-d", help="Data folder (default: the run's).", show_default=False),
    full_room: bool = typer.Option(
        False, "--full-room", help="Segmentation: infer every original point (multi-pass), the paper's test protocol."
    ),
    votes: int = typer.Option(
        None, "--votes", help="Classification: test-time votes (random scaling).", show_default=False
    ),
    sets: list[str] = SetOption,
    json_out: bool = JsonOption,
    quiet: bool = QuietOption,
) -> None:
    """OA, mAcc and mIoU (confusion matrix over the whole val set) of a run or weights file."""
    setup_output(quiet)
    if votes is not None and votes < 1:
        raise UsageError(f"--votes must be >= 1, got {votes}")
    if not weights.exists():
        raise DataError(f"weights not found: {weights}")
    from evcli import api

    flags = recipe_flags(
        {"data.path": data, "pointcloud.eval_mode": "full" if full_room else None, "pointcloud.votes": votes}
    )
    rec = api.evaluation_recipe("pointcloud", weights, find_recipe(recipe), flags, sets or [])
    report = api.evaluate(rec, weights)
    rows = [("weights", report["weights"]), ("data", report["data"]), *_metric_rows(report["metrics"])]
    rows += [(k, f"{v:.2f}") for k, v in report["metrics"].items() if k.startswith("iou_")]
    print_result(report, json_out, "evcli pointcloud eval", rows)


app.command("export")(export_command("pointcloud"))


@app.command("predict")
def predict(
    cloud: Path = typer.Argument(..., help="Point file: .ply, .npy or .txt (x y z [r g b] ...).", show_default=False),
    weights: Path = typer.Option(..., "--weights", "-w", help="Run folder or weights file.", show_default=False),
    output: Path = typer.Option(
        None,
        "--output",
        "-o",
        help="Labels file (segmentation: one label per line; default CLOUD_labels.txt) beside a PNG.",
        show_default=False,
    ),
    votes: int = typer.Option(1, "--votes", help="Classification: test-time votes."),
    png: bool = typer.Option(True, "--png/--no-png", help="Also write a PNG of the cloud coloured by prediction."),
    overwrite: bool = OverwriteOption,
    json_out: bool = JsonOption,
    quiet: bool = QuietOption,
) -> None:
    """Labels per point (segmentation) or a class (classification) for one cloud, and a PNG rendering."""
    setup_output(quiet)
    if votes < 1:
        raise UsageError(f"--votes must be >= 1, got {votes}")
    if not weights.exists():
        raise DataError(f"weights not found: {weights}")
    from evcli.data.points import read_cloud

    points = read_cloud(cloud)
    out = output or cloud.with_name(f"{cloud.stem}_labels.txt")
    picture = out.with_suffix(".png")
    from evcli.api import check_new_file

    check_new_file(out, overwrite, [cloud])
    if png:
        check_new_file(picture, overwrite, [cloud])
    from evcli import api
    from evcli.methods.pointcloud.infer import classify_points, render_cloud, segment_points

    loaded = api.load(weights)
    cfg, names = loaded.recipe.method, list(loaded.trainer.ctx.classes)
    result: dict[str, Any] = {"input": str(cloud), "points": len(points), "weights": str(loaded.path), "task": cfg.task}
    if cfg.task == "segmentation":
        if points.shape[1] < 6:
            from evcli.console import warn

            warn(f"{cloud} has no colours (x y z only): using grey; the model was trained with rgb")
        labels = segment_points(loaded.model, points, cfg).argmax(1).numpy()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(str(int(v)) for v in labels) + "\n", encoding="utf-8")
        counts = {
            (names[c] if c < len(names) else str(c)): int((labels == c).sum()) for c in sorted(set(labels.tolist()))
        }
        result.update({"labels": str(out), "label_counts": counts})
        title = f"{cloud.name}: predicted labels"
    else:
        logits = classify_points(loaded.model, points, cfg, votes=votes)
        probs = logits.softmax(0)
        c = int(probs.argmax())
        name = names[c] if c < len(names) else str(c)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"{name}\n", encoding="utf-8")
        labels = None
        result.update({"class": name, "class_index": c, "probability": round(float(probs[c]), 4), "labels": str(out)})
        title = f"{cloud.name}: {name} ({100 * float(probs[c]):.1f}%)"
    if png:
        import numpy as np

        shown = labels if labels is not None else np.full(len(points), result["class_index"])
        render_cloud(points[:, :3], shown, picture, title, names)
        result["png"] = str(picture)
    rows = [("input", str(cloud)), ("points", str(len(points)))]
    if cfg.task == "classification":
        rows.append(("class", f"{result['class']} ({100 * result['probability']:.1f}%)"))
    else:
        rows += [(k, str(v)) for k, v in result["label_counts"].items()]
    rows += [("labels", str(out))] + ([("png", str(picture))] if png else [])
    print_result(result, json_out, "evcli pointcloud predict", rows)


@app.command("sizes")
def sizes(
    task: str = typer.Option("segmentation", "--task", "-t", help="classification or segmentation."),
    points: int = typer.Option(
        None, "--points", help="Points per cloud (default 15000 seg, 1024 cls).", show_default=False
    ),
    json_out: bool = JsonOption,
    quiet: bool = QuietOption,
) -> None:
    """Parameters and FLOPs of every network size at batch 1 (counted as the paper's DeepSpeed profile: conv/linear
    MACs x 2 plus norms and activations; sampling and neighbour search not counted)."""
    setup_output(quiet)
    _check_choice(task, TASKS, "--task")
    if points is not None and not 64 <= points <= 200000:
        raise UsageError(f"--points must be in 64..200000, got {points}")
    from evcli.methods.pointcloud.model import (
        CLS_ARCHS,
        SEG_ARCHS,
        ModelSpec,
        build_model,
        count_flops,
        count_parameters,
    )

    n = points or (15000 if task == "segmentation" else 1024)
    table = SEG_ARCHS if task == "segmentation" else CLS_ARCHS
    rows_out = []
    for name in table:
        spec = ModelSpec(task, name, 3 if task == "segmentation" else 4, 13 if task == "segmentation" else 15,
                         0.1 if task == "segmentation" else 0.15, 2.0 if task == "segmentation" else 1.5)  # fmt: skip
        model = build_model(spec)
        ext = 3.0 if task == "segmentation" else 1.0
        rows_out.append(
            {
                "model": name,
                "params_m": round(count_parameters(model) / 1e6, 3),
                "gflops": round(count_flops(model, n, spec.in_channels, ext, norm_act=True) / 1e9, 3),
                "gflops_conv_only": round(count_flops(model, n, spec.in_channels, ext) / 1e9, 3),
            }
        )
    report = {
        "task": task,
        "points": n,
        "counter": "forward hooks: 2 x MACs of Conv/Linear + BatchNorm (2/element) + ReLU (1/element), as "
        "DeepSpeed's profiler counts them in eval mode; gflops_conv_only: Conv/Linear only",
        "models": rows_out,
    }
    rows = [
        (
            r["model"],
            f"{r['params_m']:.3f} M params, {r['gflops']:.3f} GFLOPs ({r['gflops_conv_only']:.3f} conv/linear)",
        )
        for r in rows_out
    ]
    print_result(report, json_out, f"evcli pointcloud sizes ({task}, {n} points, batch 1)", rows)
