"""Benchmark of `evcli distill-gan`: teacher vs student MACs / parameters at 256x256 against the CRD paper, and
student quality on held-out built-in images for the student alone, L1-to-teacher and CRD at the same budget.

Cost: the counter `evcli distill-gan cost` uses (evcli.methods.distill_gan.cost, torchprofile convention, plus
the exact count), for the original CycleGAN ResNet-9 generator (ngf 64), CRD's mobile teacher (ngf 64) and
the mobile student (ngf 16), compared with the paper's 56.8 G / 11.38 M and 1.41 G / 0.137 M.

Quality: all through evcli.api with the CLI's recipes (the code path `evcli distill-gan teacher|student`
runs), CycleGAN task on the built-in photo2sketch data (train photos only; val = coffee and grace_hopper
crops, never trained on, no checkpoint selection: the final weights of every run are scored):

1. teacher: mobile ResNet-9, width ``--teacher-width``, ``--teacher-steps`` steps;
2. the student (mobile ResNet-9, width 16) three ways, each ``--student-steps`` optimizer steps of the
   student: ``alone`` (its own CycleGAN, no teacher: `teacher --teacher-width 16`), ``l1`` (plain L1 to the
   teacher's output) and ``crd`` (rows / columns / patches RKD + style / feature with a random VGG16, offline +
   the teacher's frozen discriminator);
3. PSNR / SSIM of each student's output against the teacher's on the held-out images (`evcli distill-gan eval`
   with the teacher), and of the teacher against itself as a check (inf / 1);
4. does the teacher translate? The built-in B domain is made by a known function (the pencil sketch;
   CycleGAN: of other photos than A's), so every generator's held-out output is also scored against that
   function applied to its input, next to do-nothing baselines (a white page, the input's grey image); a
   picture of all of them is written to ``--out``.

    python bench/distill_gan.py [--img-size 32] [--teacher-steps 400] [--student-steps 300] [--out DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
PAPER = {"original_cyclegan": {"macs": 56.8e9, "params": 11.38e6}, "student": {"macs": 1.41e9, "params": 0.137e6}}


def cost_section() -> dict:
    from evcli.methods.distill_gan.cost import count_cost
    from evcli.methods.distill_gan.method import make_generator

    rows = {
        "original_cyclegan": count_cost(make_generator("resnet", 64, 9)),
        "mobile_teacher_w64": count_cost(make_generator("mobile_resnet", 64, 9)),
        "student": count_cost(make_generator("mobile_resnet", 16, 9)),
    }
    for name, paper in PAPER.items():
        rows[name]["paper_macs"], rows[name]["paper_params"] = paper["macs"], paper["params"]
        rows[name]["macs_vs_paper"] = rows[name]["macs"] / paper["macs"] - 1
        rows[name]["params_vs_paper"] = rows[name]["params"] / paper["params"] - 1
    s, t = rows["student"], rows["original_cyclegan"]
    return {
        "generators": rows,
        "reduction_vs_original": {"macs": t["macs"] / s["macs"], "params": t["params"] / s["params"]},
        "paper_reduction": {"macs": 56.8 / 1.41, "params": 11.38 / 0.137},
        "counter": s["counter"],
        "input": s["input"],
    }


def _recipe(sets: list[str]):
    from evcli import api

    return api.resolve("distill-gan", recipe_file=ROOT.parent / "evcli/recipes/distill-gan/builtin.yaml", sets=sets)


def quality_section(args: argparse.Namespace) -> dict:
    from evcli import api

    out = Path(args.out)
    common = [
        f"distill-gan.task={args.task}",
        f"data.img_size={args.img_size}",
        f"data.batch_size={args.batch_size}",
        "train.eval_every=100000step",
        f"distill-gan.patch_size={max(4, args.img_size // 4)}",
        f"distill-gan.builtin_samples={args.batch_size * 50}",
        "schedule.epochs=1000",
    ]
    runs: dict[str, dict] = {}

    def train(name: str, sets: list[str]) -> dict:
        if name in args.reuse:
            # a finished run of an earlier invocation with the same settings (its folder under --out)
            report = json.loads((out / name / "report.json").read_text())
            runs[name] = {
                "seconds": report.get("train_seconds_this_session"),
                "steps": report["steps"],
                "recipe_sets": [*common, *sets],
                "trained_parameters": report["trained_modules"],
                "reused": f"{out / name} (trained by an earlier invocation; not retrained)",
            }
            return report
        t0 = time.perf_counter()
        rec = _recipe([*common, *sets, f"out.dir={out / name}"])
        report = api.train(rec)
        runs[name] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "steps": report["steps"],
            "recipe_sets": [*common, *sets],
            "trained_parameters": report["trained_modules"],
        }
        return report

    train(
        "teacher",
        [
            "distill-gan.stage=teacher",
            f"distill-gan.teacher_width={args.teacher_width}",
            f"schedule.max_steps={args.teacher_steps}",
        ],
    )
    teacher = str(out / "teacher")
    student = [
        "distill-gan.stage=student",
        f"distill-gan.teacher_width={args.teacher_width}",
        f"distill-gan.teacher={teacher}",
        f"schedule.max_steps={args.student_steps}",
    ]
    train(
        "alone",
        ["distill-gan.stage=teacher", "distill-gan.teacher_width=16", f"schedule.max_steps={args.student_steps}"],
    )
    train("l1", [*student, "distill-gan.student_loss=l1"])
    train("crd", [*student, "distill-gan.student_loss=crd"])
    # every student scored against the teacher on the held-out val images, with the same evaluation recipe
    eval_recipe = _recipe([*common, *student])
    scores = {}
    for name in ("alone", "l1", "crd"):
        report = api.evaluate(eval_recipe, out / name / "final.safetensors")
        scores[name] = report["metrics"]
        runs[name]["data"] = report["data"]
    # the teacher's own quality (did it learn anything?), from its checkpoint (a CycleGAN teacher needs its G_B)
    teacher_recipe = _recipe([*common, "distill-gan.stage=teacher", f"distill-gan.teacher_width={args.teacher_width}"])
    teacher_eval = api.evaluate(teacher_recipe, out / "teacher" / "checkpoints" / "last.safetensors")["metrics"]
    result = {"runs": runs, "teacher_on_heldout": teacher_eval, "student_vs_teacher_on_heldout": scores}
    result["vs_sketch_reference_on_heldout"] = reference_scores(out, args.task, args.img_size)
    return result


def reference_scores(out: Path, task: str, img_size: int) -> dict:
    """Does the teacher translate? The built-in B domain is made by a known function
    (evcli.data.gan.pencil_sketch; CycleGAN: of other photos than A's), so each generator's output on the
    held-out A images is compared with that function applied to them, next to do-nothing baselines. Writes a
    picture (rows: held-out images; columns: input | reference | teacher | alone | l1 | crd)."""
    from evcli import api
    from evcli.data.gan import builtin_paired, builtin_unpaired, luminance, pencil_sketch
    from evcli.io.images import save_png
    from evcli.metrics.image import psnr, ssim

    val = (builtin_unpaired if task == "cyclegan" else builtin_paired)(img_size, img_size, 0, 1).val
    a = torch.stack([val[(0, i)]["A"] for i in range(len(val))])
    unit = (a + 1) / 2
    target = torch.stack([pencil_sketch(x) for x in unit])

    def score(y: torch.Tensor) -> dict:
        return {"psnr": round(float(psnr(y, target).mean()), 3), "ssim": round(float(ssim(y, target).mean()), 4)}

    grey = luminance(unit)[:, None].expand_as(unit)
    rows = {"white page": score(torch.ones_like(unit)), "the input's grey image": score(grey)}
    columns = [unit, target]
    for name in ("teacher", "alone", "l1", "crd"):
        loaded = api.load(out / name / "final.safetensors")
        with torch.no_grad():
            y = ((loaded.modules[loaded.method.weights_module](a).float() + 1) / 2).clamp(0, 1)
        rows[name] = score(y)
        columns.append(y)
    grid = torch.cat([torch.cat(list(col), 1) for col in columns], 2)  # [3, n*H, 6*W]
    picture = out / "heldout_input_reference_teacher_alone_l1_crd.png"
    save_png(grid, picture)
    return {
        "reference": "evcli.data.gan.pencil_sketch of each held-out A image (the function that made B)",
        "images": len(a),
        "scores": rows,
        "picture": str(picture),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("cyclegan", "pix2pix"), default="cyclegan")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--teacher-width", type=int, default=32)
    p.add_argument("--teacher-steps", type=int, default=400)
    p.add_argument("--student-steps", type=int, default=300)
    p.add_argument("--out", default="/tmp/evcli-bench-distill-gan")
    p.add_argument("--result", default=str(ROOT / "results" / "distill_gan.json"))
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument(
        "--reuse",
        nargs="*",
        default=[],
        choices=("teacher", "alone", "l1", "crd"),
        help="runs to take from --out as an earlier invocation with the same settings left them (not retrained)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: far faster on a contended machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("EVCLI_NO_PROGRESS", "1")
    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "torch": torch.__version__,
        "cpu_contended": True,
        "torch_threads": args.threads,
        "cost_at_256": cost_section(),
    }
    if not args.skip_quality:
        result["quality"] = {
            "task": (
                "CycleGAN photo2sketch (built-in), AtoB"
                if args.task == "cyclegan"
                else "Pix2Pix photo2sketch (built-in), AtoB"
            )
            + "; val = held-out coffee / grace_hopper crops",
            "img_size": args.img_size,
            "vgg": "random VGG16 features (fixed seed): no ImageNet weights offline",
            **quality_section(args),
        }
    path = Path(args.result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
