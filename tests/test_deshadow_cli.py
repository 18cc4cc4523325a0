"""`evcli deshadow` end to end: train / eval / resume / export through the engine, `evcli deshadow IMAGE`
and `DIR/` inference, baselines, the shipped default weights, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from evcli.testing import interrupt_after, run_cli

TINY = ["deshadow", "train", "--recipe", "deshadow/tiny"]


def _photo(path: Path, size: tuple[int, int] = (40, 32), mode: str = "RGB") -> Path:
    rng = np.random.default_rng(0)
    arr = rng.integers(90, 220, size=(size[1], size[0], 3), dtype=np.uint8)
    arr[size[1] // 4 : size[1] // 2, size[0] // 4 : size[0] // 2] //= 3  # a dark "shadow" block
    img = Image.fromarray(arr)
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":
        img = img.convert("RGBA")
    elif mode == "I;16":
        img = Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("deshadow") / "run"
    r = run_cli([*TINY, "-o", str(run), "--json"])
    assert r.code == 0, r.stderr
    return run


def test_train_writes_a_run_folder_and_report(tiny_run: Path):
    report = json.loads((tiny_run / "report.json").read_text())
    assert report["method"] == "labnet" and report["steps"] == 3
    assert report["vgg"] == "none (perceptual term off: its pixel-level L1 only)" and report["eval_resize"] == "full"
    m = report["metrics"]
    assert {"lab_mae_s", "lab_mae_ns", "lab_mae_all", "psnr", "ssim"} <= set(m)
    assert "built-in rendered shadows" in report["data"]
    for name in (
        "resolved_recipe.yaml",
        "metrics.jsonl",
        "final.safetensors",
        "checkpoints/last.safetensors",
        "pictures/val_0_shadow_mask_result_gt.png",
    ):
        assert (tiny_run / name).exists(), name


def test_eval_reproduces_training_metrics_and_prints_policy(tiny_run: Path):
    r = run_cli(["deshadow", "eval", str(tiny_run), "--json"])
    assert r.code == 0, r.stderr
    ev = json.loads(r.stdout)
    train = json.loads((tiny_run / "report.json").read_text())["metrics"]
    assert ev["metrics"]["lab_mae_all"] == pytest.approx(train["lab_mae_all"])
    assert ev["eval_resize"] == "full"
    r = run_cli(["deshadow", "eval", str(tiny_run), "--resize", "256x256"])
    assert r.code == 0 and "256x256" in r.stdout


def test_baselines_evaluate_through_the_same_tool():
    args = [
        "--set",
        "deshadow.builtin_val_samples=2",
        "--set",
        "deshadow.builtin_val_size=32",
        "--resize",
        "full",
        "--json",
    ]
    ident = json.loads(run_cli(["deshadow", "eval", "--method", "identity", *args]).stdout)["metrics"]
    ct = json.loads(run_cli(["deshadow", "eval", "--method", "colour-transfer", *args]).stdout)["metrics"]
    assert ident["lab_mae_s"] > 5.0  # the rendered shadows are there
    assert ct["lab_mae_s"] < ident["lab_mae_s"]  # colour transfer removes part of them
    assert ct["lab_mae_ns"] == pytest.approx(ident["lab_mae_ns"], abs=1e-9)  # it leaves lit pixels alone


def test_resume_after_interrupt_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_run: Path):
    full = tiny_run  # the uninterrupted run of the same recipe
    partial = tmp_path / "partial"
    interrupt_after(monkeypatch, 2)
    r = run_cli([*TINY, "-o", str(partial)])
    monkeypatch.undo()
    assert r.code == 130
    r = run_cli(["deshadow", "train", "--resume", str(partial)])
    assert r.code == 0, r.stderr
    a, b = load_file(str(full / "final.safetensors")), load_file(str(partial / "final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    r = run_cli(["deshadow", "export", str(full), "--which", "last", "-o", str(tmp_path / "x.safetensors")])
    assert r.code == 0, r.stderr


def test_remove_one_image_with_estimated_mask(tmp_path: Path, tiny_run: Path):
    img = _photo(tmp_path / "photo.png")
    r = run_cli(["deshadow", str(img), "--weights", str(tiny_run), "--json"])
    assert r.code == 0, r.stderr
    out = json.loads(r.stdout)["images"][0]
    result = Image.open(out["output"])
    assert result.size == (40, 32)
    assert Path(out["mask"]).exists() and "estimated" in out["mask_source"]
    w, h = Image.open(out["compare"]).size  # labelled panels, enlarged to a readable height (aspect kept)
    assert h >= 256 and w == 3 * round(40 * (h - max(20, 256 // 14)) / 32) + 16


def test_remove_subcommand_name_and_directory_with_masks(tmp_path: Path, tiny_run: Path):
    for name in ("a", "b"):
        _photo(tmp_path / "in" / f"{name}.png")
    (tmp_path / "masks").mkdir()
    Image.new("L", (40, 32), 0).save(tmp_path / "masks" / "a.png")
    r = run_cli(["deshadow", "remove", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-w", str(tiny_run)])
    assert r.code == 0, r.stderr
    assert (tmp_path / "out" / "a.png").exists() and (tmp_path / "out" / "b.png").exists()
    r = run_cli(
        [
            "deshadow",
            str(tmp_path / "in"),
            "-o",
            str(tmp_path / "out2"),
            "--mask",
            str(tmp_path / "masks"),
            "--method",
            "identity",
            "--no-compare",
        ]
    )
    assert r.code == 0, r.stderr
    assert "no mask named b.*" in r.stderr  # b has no mask: estimated, with a warning
    assert not (tmp_path / "out2" / "a_mask.png").exists() and (tmp_path / "out2" / "b_mask.png").exists()
    # identity with an all-zero mask writes the input back unchanged
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "out2" / "a.png")), np.asarray(Image.open(tmp_path / "in" / "a.png"))
    )


def test_folder_goes_past_a_corrupt_image_and_fails_at_the_end(tmp_path: Path):
    for name in ("a", "c"):
        _photo(tmp_path / "in" / f"{name}.png")
    (tmp_path / "in" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "out"
    r = run_cli(["deshadow", str(tmp_path / "in"), "-o", str(out), "--method", "identity", "--no-compare", "--json"])
    assert r.code == 3 and "Traceback" not in r.stderr
    assert (out / "a.png").exists() and (out / "c.png").exists() and not (out / "b.png").exists()
    assert "skipped b.png" in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1 of 3 images could not be processed: b.png" in errors[0], r.stderr
    report = json.loads(r.stdout)
    assert [Path(e["input"]).name for e in report["images"]] == ["a.png", "c.png"]
    assert [Path(f["input"]).name for f in report["failed"]] == ["b.png"]


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_gray_rgba_and_16_bit_images(tmp_path: Path, mode: str):
    img = _photo(tmp_path / "x.png", mode=mode)
    r = run_cli(["deshadow", str(img), "--method", "colour-transfer", "-o", str(tmp_path / "y.png")])
    assert r.code == 0, r.stderr
    assert Image.open(tmp_path / "y.png").mode == "RGB"


def test_mask_of_another_size_and_not_binary_is_fixed_with_warnings(tmp_path: Path):
    img = _photo(tmp_path / "x.png")
    mask = tmp_path / "m.png"
    Image.fromarray(np.linspace(0, 255, 20 * 16).reshape(16, 20).astype(np.uint8)).save(mask)
    r = run_cli(["deshadow", str(img), "--method", "identity", "--mask", str(mask), "--json"])
    assert r.code == 0, r.stderr
    assert "resized" in r.stderr and "not binary" in r.stderr
    assert 0 < json.loads(r.stdout)["images"][0]["shadow_fraction"] < 0.5  # thresholded at 0.9


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["deshadow", "nothere.png"], 3, "image not found: nothere.png"),
        (["deshadow", "EMPTY"], 3, "no images in"),
        (["deshadow", "IMG", "--method", "labnett"], 2, "unknown --method 'labnett' (did you mean 'labnet'?)"),
        (["deshadow", "CORRUPT"], 3, "corrupt or unreadable image"),
        (["deshadow", "IMG", "--mask", "nomask.png"], 3, "mask not found"),
        (["deshadow", "train", "--method", "unet"], 2, "unknown --method 'unet'"),
        (["deshadow", "eval", "--method", "identity", "--resize", "512"], 2, "unknown --resize '512'"),
    ],
)
def test_bad_input_gets_one_error_line(tmp_path: Path, args: list[str], code: int, message: str):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    img = _photo(tmp_path / "ok.png")
    mapping = {"EMPTY": str(tmp_path / "empty"), "CORRUPT": str(tmp_path / "bad.png"), "IMG": str(img)}
    r = run_cli([mapping.get(a, a) for a in args])
    assert r.code == code, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert "skip_corrupt" not in r.stderr  # a training-data hint has no place in inference


def test_pretrained_vgg_missing_offline_stops_with_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty torchvision cache
    r = run_cli([*TINY, "--perceptual", "-o", str(tmp_path / "r")])
    assert r.code == 3
    assert "needs ImageNet VGG16 weights" in r.stderr and "deshadow.vgg=random" in r.stderr


def test_sadc_trains_with_random_vgg_and_infers_sparsely(tmp_path: Path):
    run = tmp_path / "sadc"
    r = run_cli(
        [*TINY, "--method", "sadc", "--vgg", "random", "--set", "deshadow.channels=8", "-o", str(run), "--json"]
    )
    assert r.code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["method"] == "sadc" and report["vgg"].startswith("random VGG16")
    assert "kd" in (run / "metrics.jsonl").read_text()
    # the frozen VGG16 is not in the weights: only the 8-channel SADC parameters are
    assert report["parameters"] < 100_000
    img = _photo(tmp_path / "p.png")
    r = run_cli(["deshadow", str(img), "--weights", str(run), "-o", str(tmp_path / "o.png")])
    assert r.code == 0, r.stderr


@pytest.mark.parametrize("method", ["labnet", "sadc"])
def test_default_weights_ship_and_the_design_example_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
):
    from evcli.methods.deshadow.infer import shipped_weights

    assert shipped_weights(method) is not None
    _photo(tmp_path / "image.png", size=(64, 48))
    monkeypatch.chdir(tmp_path)
    r = run_cli(["deshadow", "image.png", "--method", method])
    assert r.code == 0, r.stderr
    assert Image.open(tmp_path / "image_deshadow.png").size == (64, 48)
    assert (tmp_path / "image_deshadow_mask.png").exists()


@pytest.mark.parametrize("args", [["deshadow", "--help"], ["deshadow", "train", "--help"], ["deshadow", "x.png", "-h"]])
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


def test_deshadow_trains_in_two_processes(tmp_path: Path):
    """The same engine path under `accelerate launch` (2 CPU processes, DDP over gloo)."""
    from evcli.testing import launch_two_processes

    args = ["deshadow", "train", "--recipe", "deshadow/tiny", "--max-steps", "2", "-o", str(tmp_path / "d"), "--json"]
    proc = launch_two_processes(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["processes"] == 2 and report["steps"] == 2
    assert report["metrics"]["images"] == 2.0  # every val image counted once over both processes


def test_bf16_inference_is_close_to_fp32_and_refused_where_it_does_not_apply(tmp_path: Path):
    img = _photo(tmp_path / "p.png", size=(64, 48))
    outs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.png"
        r = run_cli(["deshadow", str(img), "--precision", precision, "-o", str(out), "--no-compare"])
        assert r.code == 0, r.stderr
        outs[precision] = np.asarray(Image.open(out), dtype=np.int16)
    diff = np.abs(outs["fp32"] - outs["bf16"])
    # bf16 blocks with an fp32 residual: pixels move by ~1.5 8-bit levels at most on the bench's images
    assert diff.mean() < 0.5 and diff.max() <= 4
    r = run_cli(["deshadow", str(img), "--precision", "fp16"])
    assert r.code == 2 and "fp32 or bf16" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(["deshadow", str(img), "--method", "sadc", "--precision", "bf16"])
    assert r.code == 2 and "LAB-Net" in r.stderr and "Traceback" not in r.stderr
