"""`evcli mix` end to end: train, evaluate, resume, export on built-in data and on an ImageFolder;
and 2-process training through `accelerate launch`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evcli.testing import TINY_ARGS, interrupt_after, launch_two_processes, make_image_folder, run_cli


@pytest.mark.parametrize("method", ["none", "mixup", "cutmix", "mixup-cutmix"])
def test_mix_methods_train_on_builtin_data(tmp_path: Path, method: str):
    r = run_cli(["mix", *TINY_ARGS, "--method", method, "-o", str(tmp_path / "run"), "--json"])
    assert r.code == 0, r.stderr
    report = json.loads(r.stdout)  # exactly one JSON object on stdout
    assert report["method"] == method and report["steps"] == 3
    assert 0.0 <= report["metrics"]["top1"] <= report["metrics"]["top5"] <= 100.0
    run = tmp_path / "run"
    for name in (
        "resolved_recipe.yaml",
        "env.json",
        "metrics.jsonl",
        "report.json",
        "final.safetensors",
        "checkpoints/last.safetensors",
        "checkpoints/best.safetensors",
    ):
        assert (run / name).exists(), name
    assert "built-in digits" in report["data"]


def test_cutmix_on_image_folder_train_eval_resume_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=8)
    run = tmp_path / "run"
    args = [
        "mix",
        *TINY_ARGS,
        "--method",
        "cutmix",
        "--data",
        str(data),
        "-b",
        "4",
        "--max-steps",
        "4",
        "--set",
        "train.ckpt_every=1step",
        "-o",
        str(run),
    ]
    r = run_cli(args + ["--json"])
    assert r.code == 0, r.stderr
    report = json.loads(r.stdout)
    assert "ImageFolder" in report["data"] and report["steps"] == 4

    # evaluate the exported weights (model and data come from the run's recipe)
    r = run_cli(["mix", "eval", str(run / "final.safetensors"), "--json"])
    assert r.code == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["metrics"]["top1"] == pytest.approx(report["metrics"]["top1"])

    # export the best checkpoint through the method's export hook
    r = run_cli(["mix", "export", str(run), "--which", "last", "-o", str(tmp_path / "x.safetensors"), "--json"])
    assert r.code == 0, r.stderr
    exported, final = load_file(str(tmp_path / "x.safetensors")), load_file(str(run / "final.safetensors"))
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)

    # the same run interrupted (as by Ctrl-C) after step 2: exit 130, then --resume finishes identically
    partial = tmp_path / "partial"
    interrupt_after(monkeypatch, 2)
    r = run_cli([*args[:-1], str(partial)])
    monkeypatch.undo()
    assert r.code == 130 and f"--resume {partial}" in r.stderr
    r = run_cli(["mix", "--resume", str(partial), "--json"])
    assert r.code == 0, r.stderr
    again = load_file(str(partial / "final.safetensors"))
    assert all(torch.equal(again[k], final[k]) for k in final)


def test_weights_flag_loads_local_safetensors(tmp_path: Path):
    r = run_cli(["mix", *TINY_ARGS, "--max-steps", "1", "-o", str(tmp_path / "a")])
    assert r.code == 0, r.stderr
    r = run_cli(
        [
            "mix",
            *TINY_ARGS,
            "--max-steps",
            "1",
            "--weights",
            str(tmp_path / "a" / "final.safetensors"),
            "-o",
            str(tmp_path / "b"),
        ]
    )
    assert r.code == 0, r.stderr
    assert "weights: loaded" in r.stderr
    r = run_cli(["mix", *TINY_ARGS, "--max-steps", "1", "--init-from", str(tmp_path / "a"), "-o", str(tmp_path / "c")])
    assert r.code == 0, r.stderr


def test_two_processes_through_accelerate_launch(tmp_path: Path):
    proc = launch_two_processes(["mix", *TINY_ARGS, "--max-steps", "2", "-o", str(tmp_path / "ddp"), "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1  # rank 0 only
    assert reports[0]["processes"] == 2 and reports[0]["steps"] == 2
    assert (tmp_path / "ddp" / "final.safetensors").exists()


@pytest.mark.parametrize("name", ["mix/tiny", "mix/quickstart"])
def test_shipped_small_recipes_run(tmp_path: Path, name: str):
    r = run_cli(["mix", "--recipe", name, "--max-steps", "2", "-b", "8", "-o", str(tmp_path / "r"), "--json"])
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == 2


def test_bf16_autocast_on_cpu(tmp_path: Path):
    r = run_cli(["mix", *TINY_ARGS, "--max-steps", "1", "--mixed-precision", "bf16", "-o", str(tmp_path / "r")])
    assert r.code == 0, r.stderr


@pytest.mark.parametrize(("switch_prob", "cutmix_share"), [(0.0, 0.0), (1.0, 1.0), (0.5, 0.5)])
def test_mixup_cutmix_switches_per_batch(switch_prob: float, cutmix_share: float):
    """DeiT's baseline: each batch is CutMix (pixels copied whole from one image) with p = switch_prob, else Mixup."""
    import numpy as np

    from evcli.methods.mix.method import MixMethod
    from evcli.recipe import resolve_recipe

    recipe = resolve_recipe("mix", flags={"mix.method": "mixup-cutmix", "mix.switch_prob": switch_prob})
    method = MixMethod(recipe)
    method.num_classes = lambda ctx: 10
    method.build(type("Ctx", (), {"recipe": recipe, "classes": [str(i) for i in range(10)]})())
    np.random.seed(0)
    x = torch.rand(4, 3, 16, 16)
    y = torch.arange(4)
    cutmix = 0
    trials = 40
    for _ in range(trials):
        mixed, _ = method.mixer(x.clone(), y)
        copied = torch.isclose(mixed, x) | torch.isclose(mixed, x.flip(0))
        cutmix += int(bool(copied.all()))
    assert abs(cutmix / trials - cutmix_share) <= 0.2


def test_result_table_quotes_the_linear_reference_on_builtin_data(tmp_path: Path):
    r = run_cli(["mix", *TINY_ARGS, "--method", "none", "-o", str(tmp_path / "run")])
    assert r.code == 0, r.stderr
    assert "reference" in r.stdout and "logistic regression" in r.stdout
