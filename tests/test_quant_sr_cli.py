"""`evcli quant-sr` end to end: full-precision and quantized (DDTB, PAMS) training through the engine, eval per
named set with bicubic alongside, exact resume, integer export scored like the live model, upscale (grayscale,
RGBA, tiled), and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from evcli.testing import interrupt_after, run_cli

FP = ["quant-sr", "train", "--recipe", "quant-sr/tiny_fp"]
Q = ["quant-sr", "train", "--recipe", "quant-sr/tiny"]


def _image(path: Path, size: tuple[int, int] = (40, 32), mode: str = "RGB") -> Path:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant_sr")
    r = run_cli([*FP, "-o", str(root / "fp")])
    assert r.code == 0, r.stderr
    r = run_cli([*Q, "--teacher", str(root / "fp"), "-o", str(root / "ddtb")])
    assert r.code == 0, r.stderr
    return {"fp": root / "fp", "ddtb": root / "ddtb", "root": root}


def test_fp_and_ddtb_runs_write_run_folders_and_reports(runs: dict[str, Path]):
    fp = json.loads((runs["fp"] / "report.json").read_text())
    q = json.loads((runs["ddtb"] / "report.json").read_text())
    assert fp["bits"] == 32 and fp["quantizer"].startswith("none") and "teacher" not in fp["frozen_modules"]
    assert fp["method"] == "fp32" and q["method"] == "ddtb"
    assert q["bits"] == 2 and q["quantizer"] == "ddtb" and q["frozen_modules"]["teacher"].endswith("final.safetensors")
    assert set(q["optimizers"]) == {"weights", "bounds"} and q["optimizers"]["bounds"]["base_lr"] == 1e-2
    cal = q["calibration"]
    assert cal["quantizers"] == 6 and len(cal["dynamic"]) == 1  # int(6 * 0.3)
    assert all(lo < hi for lo, hi in cal["bounds"].values())
    assert q["size"]["size_bytes"] < q["size"]["fp32_size_bytes"]
    assert list((runs["ddtb"] / "pictures").glob("*bicubic_fp32_quantized_hr.png"))
    logs = [json.loads(line) for line in (runs["ddtb"] / "metrics.jsonl").read_text().splitlines()]
    train = [rec for rec in logs if rec["split"] == "train"]
    assert "gate_reg" in train[0] and "gate_reg" not in train[1]  # warm-up: 1 step
    assert all("at" in rec and "l1" in rec for rec in train)
    val = [rec for rec in logs if rec["split"] == "val"][-1]
    assert val["psnr_bicubic"] > 20 and val["images"] == 3


def test_eval_reproduces_training_metrics_and_bicubic_baseline(runs: dict[str, Path]):
    r = run_cli(["quant-sr", "eval", str(runs["ddtb"]), "--json"])
    assert r.code == 0, r.stderr
    got = json.loads(r.stdout)["metrics"]
    trained = json.loads((runs["ddtb"] / "report.json").read_text())["metrics"]
    assert got["psnr"] == pytest.approx(trained["psnr"], abs=1e-9)
    r = run_cli(["quant-sr", "eval", "--method", "bicubic", "--set", "quant-sr.builtin_val_crop=32", "--json"])
    assert r.code == 0, r.stderr
    bic = json.loads(r.stdout)["metrics"]
    assert bic["psnr"] == pytest.approx(trained["psnr_bicubic"], abs=1e-9)


def test_export_holds_integer_weights_and_scores_like_the_live_model(runs: dict[str, Path], tmp_path: Path):
    out = tmp_path / "q.safetensors"
    r = run_cli(["quant-sr", "export", str(runs["ddtb"]), "--which", "last", "-o", str(out), "--json"])
    assert r.code == 0, r.stderr
    report = json.loads(r.stdout)
    tensors = load_file(str(out))
    assert tensors["body.0.conv1.weight"].dtype == torch.uint8 and int(tensors["body.0.conv1.weight"].max()) <= 3
    assert bool(tensors["body.0.conv1.weight_is_codes"]) and tensors["head.weight"].dtype == torch.float32
    final = json.loads((runs["ddtb"] / "report.json").read_text())["metrics"]
    assert report["metrics"]["psnr"] == pytest.approx(final["psnr"], abs=1e-6)


def test_resume_after_interrupt_is_exact(runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    partial = tmp_path / "partial"
    interrupt_after(monkeypatch, 2)
    r = run_cli([*Q, "--teacher", str(runs["fp"]), "-o", str(partial)])
    monkeypatch.undo()
    assert r.code == 130, r.stderr
    r = run_cli(["quant-sr", "train", "--resume", str(partial)])
    assert r.code == 0, r.stderr
    a, b = load_file(str(runs["ddtb"] / "final.safetensors")), load_file(str(partial / "final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pams_baseline_trains_in_the_same_subcommand(runs: dict[str, Path]):
    out = runs["root"] / "pams"
    r = run_cli([*Q, "--method", "pams", "--bits", "3", "--teacher", str(runs["fp"]), "-o", str(out), "--json"])
    assert r.code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["quantizer"] == "pams" and report["calibration"]["dynamic"] == []
    assert all(lo == -hi for lo, hi in report["calibration"]["bounds"].values())


@pytest.mark.parametrize("mode", ["L", "RGBA", "RGB"])
def test_upscale_grayscale_rgba_and_tiles(runs: dict[str, Path], tmp_path: Path, mode: str):
    img = _image(tmp_path / "in.png", (40, 32), mode)
    out = tmp_path / "out.png"
    r = run_cli(["quant-sr", "upscale", str(img), "--weights", str(runs["ddtb"]), "-o", str(out), "--json"])
    assert r.code == 0, r.stderr
    got = Image.open(out)
    assert got.size == (160, 128) and got.mode == mode
    # the same command again: the output exists and is never overwritten without --overwrite
    r = run_cli(["quant-sr", "upscale", str(img), "--weights", str(runs["ddtb"]), "-o", str(out)])
    assert r.code == 2 and "already exists" in r.stderr


def test_tiled_upscale_matches_whole_image_for_fp_weights(runs: dict[str, Path]):
    from evcli.methods.quant_sr.infer import load_upscaler, upscale_image

    model, _ = load_upscaler(runs["fp"])
    rgb = torch.rand(3, 37, 45)
    whole = upscale_image(model, rgb, tile=256)
    tiled = upscale_image(model, rgb, tile=16, overlap=8)
    assert whole.shape == tiled.shape == (3, 148, 180)
    assert float((whole - tiled).abs().max()) < 1e-4


def _benchmark(root: Path) -> Path:
    for name in ("Set5", "Set14"):
        for i in range(2):
            hr = _image(root / name / "HR" / f"img{i}.png", (48, 40))
            lr = Image.open(hr).resize((12, 10), Image.BICUBIC)
            (root / name / "LR_bicubic" / "X4").mkdir(parents=True, exist_ok=True)
            lr.save(root / name / "LR_bicubic" / "X4" / f"img{i}x4.png")
    return root


def test_eval_per_named_benchmark_set(runs: dict[str, Path], tmp_path: Path):
    bench = _benchmark(tmp_path / "benchmark")
    r = run_cli(["quant-sr", "eval", str(runs["ddtb"]), "--benchmark", str(bench), "--json"])
    assert r.code == 0, r.stderr
    m = json.loads(r.stdout)["metrics"]
    assert m["Set5/images"] == 2 and m["Set14/images"] == 2 and "builtin-held-out/psnr" in m


@pytest.mark.parametrize(
    "args, code, message",
    [
        ([*FP, "--scale", "5"], 2, "--scale must be 2, 3 or 4, got 5"),
        ([*FP, "--bits", "1"], 2, "--bits must be 2, 3 or 4"),
        ([*FP, "--bits", "33"], 2, "--bits must be 2, 3 or 4"),
        ([*FP, "--set", "quant-sr.bits=33"], 2, "quant-sr.bits"),
        ([*Q], 2, "give --teacher"),
        ([*Q, "--teacher", "FP", "--scale", "2", "--patch-size", "32"], 2, "is a x4 model, this run is x2"),
        ([*FP, "--method", "lsq"], 2, "unknown --method 'lsq'"),
        ([*FP, "--data", "SMALL", "--benchmark", "BENCH", "--patch-size", "64"], 3, "smaller than the HR patch"),
        (["quant-sr", "eval", "DDTB", "--scale", "2"], 2, "is a x4 model, not x2"),
        (["quant-sr", "upscale", "IMG", "--weights", "DDTB", "--scale", "3"], 2, "is a x4 model, not x3"),
        (["quant-sr", "upscale", "nothere.png", "--weights", "DDTB"], 3, "image not found"),
        (["quant-sr", "upscale", "CORRUPT", "--weights", "DDTB"], 3, "corrupt or unreadable image"),
        (["quant-sr", "eval", "--method", "bicubic", "--benchmark", "nothere"], 3, "benchmark folder not found"),
    ],
)
def test_bad_input_gets_one_error_line(runs: dict[str, Path], tmp_path: Path, args: list[str], code: int, message: str):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _image(tmp_path / "small" / "a.png", (40, 32))
    _image(tmp_path / "small" / "b.png", (80, 72))
    bench = _benchmark(tmp_path / "benchmark")
    mapping = {
        "FP": str(runs["fp"]),
        "DDTB": str(runs["ddtb"]),
        "IMG": str(_image(tmp_path / "ok.png")),
        "CORRUPT": str(tmp_path / "bad.png"),
        "SMALL": str(tmp_path / "small"),
        "BENCH": str(bench),
    }
    r = run_cli([mapping.get(a, a) for a in args] + (["-o", str(tmp_path / "run")] if args[1] == "train" else []))
    assert r.code == code, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["quant-sr", "--help"], ["quant-sr", "train", "--help"]])
def test_help_is_fast_and_does_not_import_torch(args: list[str]):
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "evcli", *args],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=120,
    )
    modules = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "import time:" in line}
    assert proc.returncode == 0 and "Usage" in proc.stdout
    assert "torch" not in modules


@pytest.mark.slow
def test_fp_and_ddtb_train_in_two_processes(tmp_path: Path):
    """The same engine path under `accelerate launch` (2 CPU processes, DDP over gloo): the calibration's choices
    (gated quantizers, bounds) are rank 0's, broadcast with the module's parameters and buffers."""
    from evcli.testing import launch_two_processes

    fp = tmp_path / "fp"
    proc = launch_two_processes([*FP, "--max-steps", "2", "-o", str(fp), "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["processes"] == 2 and report["steps"] == 2 and report["metrics"]["images"] == 3.0
    proc = launch_two_processes([*Q, "--teacher", str(fp), "--max-steps", "2", "-o", str(tmp_path / "q"), "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (
        report["processes"] == 2 and report["metrics"]["images"] == 3.0 and len(report["calibration"]["dynamic"]) == 1
    )
