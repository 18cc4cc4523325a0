"""`evcli distill-gan` end to end: teacher -> student (frozen teacher) -> eval -> export -> translate, the online
algorithm (CycleGAN phases, Pix2Pix every step), the L1 baseline, bit-exact resume, and one-line errors for bad
input (exit codes, no traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from evcli.testing import interrupt_after, run_cli

TEACHER = ["distill-gan", "teacher", "-r", "distill-gan/tiny"]
STUDENT = ["distill-gan", "student", "-r", "distill-gan/tiny"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill_gan")
    teacher, student = root / "teacher", root / "student"
    r = run_cli([*TEACHER, "-o", str(teacher), "--json"])
    assert r.code == 0, r.stderr
    r = run_cli([*STUDENT, "--teacher", str(teacher), "-o", str(student), "--json"])
    assert r.code == 0, r.stderr
    return {"root": root, "teacher": teacher, "student": student}


def test_teacher_run_trains_two_generators_and_two_discriminators(runs: dict[str, Path]):
    report = json.loads((runs["teacher"] / "report.json").read_text())
    assert report["stage"] == "teacher" and set(report["trained_modules"]) == {"G_A", "G_B", "D_A", "D_B"}
    assert set(report["optimizers"]) == {"G", "D"} and "psnr_cycle" in report["metrics"]
    exported = load_file(str(runs["teacher"] / "final.safetensors"))
    assert "model.1.weight" in exported and exported["model.1.weight"].shape == (8, 3, 7, 7)  # G_A only
    assert "photo2sketch" in report["data"]
    # the cycle PSNR needs G_B: measured from the checkpoint, not from the exported G_A alone
    r = run_cli(["distill-gan", "eval", str(runs["teacher"] / "checkpoints" / "last.safetensors"), "--json"])
    assert r.code == 0 and json.loads(r.stdout)["metrics"]["psnr_cycle"] == pytest.approx(
        report["metrics"]["psnr_cycle"]
    )
    r = run_cli(["distill-gan", "eval", str(runs["teacher"]), "--json"])
    assert r.code == 0 and "psnr_cycle" not in json.loads(r.stdout)["metrics"]


def test_student_run_keeps_the_teacher_out_of_its_checkpoint(runs: dict[str, Path]):
    report = json.loads((runs["student"] / "report.json").read_text())
    assert report["stage"] == "student" and list(report["trained_modules"]) == ["S"]
    assert set(report["frozen_modules"]) == {"G_A", "D_A", "vgg"}  # online teacher D frozen, VGG frozen
    assert report["vgg"].startswith("random VGG16")
    assert {"psnr_vs_teacher", "ssim_vs_teacher"} <= set(report["metrics"])
    ckpt = load_file(str(runs["student"] / "checkpoints" / "last.safetensors"))
    assert ckpt and all(k.startswith("module.S.") for k in ckpt if k.startswith("module."))
    cost = report["cost_at_256"]
    assert cost["student"]["params"] == report["trained_modules"]["S"] and "torchprofile" in cost["student"]["counter"]
    assert (runs["student"] / "pictures" / "val_0_input_teacher_student.png").exists()
    metrics = [json.loads(line) for line in (runs["student"] / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m["split"] == "train"]
    assert all({"s_rows", "s_cols", "s_patch", "s_style", "s_feature", "s_adv"} <= set(m) for m in train)


def test_eval_export_and_translate(runs: dict[str, Path], tmp_path: Path):
    student = runs["student"]
    r = run_cli(["distill-gan", "eval", str(student), "--json"])
    assert r.code == 0, r.stderr
    report = json.loads(r.stdout)
    trained = json.loads((student / "report.json").read_text())["metrics"]
    assert report["metrics"]["psnr_vs_teacher"] == pytest.approx(trained["psnr_vs_teacher"], rel=1e-6)
    out = tmp_path / "export.safetensors"
    r = run_cli(["distill-gan", "export", str(student), "--which", "last", "-o", str(out), "--json"])
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["psnr_vs_teacher"] == pytest.approx(trained["psnr_vs_teacher"], rel=1e-6)
    img = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 45, 3), dtype=np.uint8)).save(img)
    r = run_cli(["distill-gan", "translate", str(img), "--weights", str(out), "-o", str(tmp_path / "o.png"), "--json"])
    assert r.code == 0, r.stderr
    result = json.loads(r.stdout)
    assert Image.open(result["output"]).size == (45, 30)
    assert Image.open(result["grid"]).size == (3 * 45 + 8, 30)  # input | teacher | student
    r = run_cli(["distill-gan", "translate", str(img), "--weights", str(out), "-o", str(img)])
    assert r.code == 2 and "one of the inputs" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(["distill-gan", "translate", str(img), "--weights", str(out), "-o", str(tmp_path / "o.png")])
    assert r.code == 2 and "already exists" in r.stderr


@pytest.mark.slow
def test_online_pix2pix_updates_teacher_and_student_every_step(tmp_path: Path):
    r = run_cli(["distill-gan", "student", "-r", "distill-gan/tiny_pix2pix", "-o", str(tmp_path / "p"), "--json"])
    assert r.code == 0, r.stderr
    report = json.loads(r.stdout)
    assert {"psnr_vs_teacher", "psnr_vs_target", "ssim_vs_target"} <= set(report["metrics"])
    train = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in train if m["split"] == "train"]
    assert all({"d", "g_recon", "s_rows", "s_style"} <= set(m) and "s_adv" not in m for m in train)
    assert "photo2sketch" in report["data"]


def test_online_l1_baseline_phases_and_exact_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The online CycleGAN schedule (teacher, student, teacher with tiny's 1-step phases) with the L1
    baseline; a run interrupted after step 3 (image pools filled) resumes to the same weights."""
    args = [*STUDENT, "--student-loss", "l1", "--set", "train.eval_every=100step"]
    full, partial = tmp_path / "full", tmp_path / "partial"
    r = run_cli([*args, "-o", str(full)])
    assert r.code == 0, r.stderr
    records = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in records if m["split"] == "train"]
    assert [m["phase_student"] for m in train] == [0.0, 1.0, 0.0]
    assert "s_l1" in train[1] and "g_cycle" in train[0] and "s_rows" not in train[1]
    report = json.loads((full / "report.json").read_text())
    assert set(report["trained_modules"]) == {"S", "G_A", "G_B", "D_A", "D_B"} and "vgg" not in report["frozen_modules"]
    assert Path(report["files"]["teacher_weights"]).exists()
    assert load_file(str(full / "final.safetensors"))["model.1.weight"].shape == (4, 3, 7, 7)  # S only
    interrupt_after(monkeypatch, 2)
    r = run_cli([*args, "-o", str(partial)])
    monkeypatch.undo()
    assert r.code == 130, r.stderr
    r = run_cli(["distill-gan", "student", "--resume", str(partial)])
    assert r.code == 0, r.stderr
    a = load_file(str(full / "checkpoints" / "last.safetensors"))
    b = load_file(str(partial / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--student-width", "0"], 2, "--student-width must be a positive width, got 0"),
        (["--set", "distill-gan.student_width=-4"], 2, "must be >= 1"),
        (["--student-width", "6"], 2, "multiple of 4"),
        (["--task", "pix2pics"], 2, "did you mean 'pix2pix'"),
        (["--teacher", "/nonexistent/teacher"], 3, "teacher file not found"),
        (["--vgg", "pretrained", "--teacher", "TEACHER"], 3, "need ImageNet VGG16 weights"),
        (["--teacher", "TEACHER", "--teacher-width", "16"], 3, "generator of width 8 with 2 blocks; this recipe's"),
        (["--teacher", "TEACHER", "--set", "distill-gan.teacher_arch=resnet"], 3, "this recipe's teacher is a ResNet"),
        (["--teacher", "TEACHER/final.safetensors"], 3, "needs the teacher's discriminator"),
        (["--teacher", "TEACHER", "--task", "pix2pix"], 3, "is a cyclegan teacher"),
    ],
)
def test_bad_student_input(runs: dict[str, Path], tmp_path: Path, extra: list[str], code: int, message: str):
    extra = [x.replace("TEACHER", str(runs["teacher"])) for x in extra]
    r = run_cli([*STUDENT, *extra, "-o", str(tmp_path / "run")])
    assert r.code == code, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_data_layouts(tmp_path: Path):
    img = np.random.default_rng(0).integers(0, 255, (12, 18, 3), dtype=np.uint8)
    for side in ("trainA", "testA", "testB"):
        (tmp_path / "cg" / side).mkdir(parents=True)
        Image.fromarray(img).save(tmp_path / "cg" / side / "x.png")
    (tmp_path / "cg" / "trainB").mkdir()
    r = run_cli([*TEACHER, "--data", str(tmp_path / "cg")])
    assert r.code == 3 and "trainB holds no images" in r.stderr and "Traceback" not in r.stderr
    for split in ("train", "val"):
        (tmp_path / "p2p" / split).mkdir(parents=True)
        Image.fromarray(img).save(tmp_path / "p2p" / split / "x.png")
    r = run_cli(["distill-gan", "teacher", "-r", "distill-gan/tiny_pix2pix", "--data", str(tmp_path / "p2p")])
    assert r.code == 3 and "width = 2 x height" in r.stderr and "Traceback" not in r.stderr


def test_cost_command_names_counter_and_size():
    r = run_cli(["distill-gan", "cost", "--teacher-width", "8", "--student-width", "4", "--size", "32", "--json"])
    assert r.code == 0, r.stderr
    c = json.loads(r.stdout)
    assert c["student"]["params"] < c["teacher"]["params"] and c["teacher"]["input"] == "1x3x32x32"
    assert "torchprofile convention" in c["teacher"]["counter"]
    r = run_cli(["distill-gan", "cost", "--size", "30"])
    assert r.code == 2 and "multiple of 4" in r.stderr


@pytest.mark.slow
def test_fid_with_user_inception_weights(runs: dict[str, Path], tmp_path: Path):
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    weights = tmp_path / "inception.safetensors"
    save_file(
        {k: v.contiguous() for k, v in inception_v3(weights=None, init_weights=True).state_dict().items()}, weights
    )
    r = run_cli(["distill-gan", "eval", str(runs["student"]), "--json"])
    assert r.code == 0 and "fid" not in json.loads(r.stdout)["metrics"]  # no weights: no number called FID
    r = run_cli(["distill-gan", "eval", str(runs["student"]), "--inception-weights", str(weights), "--json"])
    assert r.code == 0, r.stderr
    fid = json.loads(r.stdout)["metrics"]["fid"]
    assert np.isfinite(fid) and fid > 0
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(2)}, bad)
    r = run_cli(["distill-gan", "eval", str(runs["student"]), "--inception-weights", str(bad)])
    assert r.code == 3 and "does not hold torchvision InceptionV3 weights" in r.stderr


@pytest.mark.slow
def test_two_processes_train_the_teacher_like_one(runs: dict[str, Path], tmp_path: Path):
    """DDP (2 CPU processes, batch 1 each) matches one process at batch 2, including G_A's second use in the
    cycle loss (called through the module itself, its gradient synchronised by the wrapper's hooks). Biases right
    before an InstanceNorm have no true gradient (the norm removes them): Adam moves them by rounding noise, so
    only the weights are compared."""
    from evcli.testing import launch_two_processes

    out = tmp_path / "ddp"
    r = launch_two_processes([*TEACHER, "-o", str(out), "--set", "data.batch_size=1"])
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = load_file(str(out / "final.safetensors")), load_file(str(runs["teacher"] / "final.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a if k.endswith("weight"))
    two = json.loads((out / "report.json").read_text())["metrics"]["psnr_cycle"]
    one = json.loads((runs["teacher"] / "report.json").read_text())["metrics"]["psnr_cycle"]
    assert two == pytest.approx(one, abs=0.01)
