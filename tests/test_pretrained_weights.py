"""Pretrained weights load as a timm user expects: another classifier size is re-initialised, a ViT's position and
patch embeddings are resampled to the run's grid and patch size, and another architecture is still refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from evcli.testing import make_image_folder, run_cli


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=4, size=32)


def _save(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _run(folder: Path, out: Path, *args: str) -> tuple[int, str]:
    r = run_cli(["mix", "--data", str(folder), "--img-size", "32", "-b", "4", "--workers", "0", "--max-steps", "1",
                 "--set", "mix.method=none", "-o", str(out), *args])  # fmt: skip
    return r.code, r.stderr


def test_imagenet_resnet_weights_load_into_a_three_class_run(folder: Path, tmp_path: Path):
    torch.manual_seed(0)
    source = timm.create_model("test_resnet", num_classes=1000)
    code, err = _run(
        folder, tmp_path / "r", "--model", "test_resnet", "--weights", str(_save(source, tmp_path / "w.st"))
    )
    assert code == 0, err
    assert "classifier fc.bias, fc.weight re-initialised (1000 classes in the file, 3 here)" in err
    from safetensors.torch import load_file

    after = load_file(str(tmp_path / "r" / "checkpoints" / "last.safetensors"))
    # the backbone came from the file (one AdamW step at lr 5e-4 moves a weight by ~5e-4 at most), the head did not
    backbone = {k: v.detach() for k, v in source.named_parameters() if not k.startswith("fc.")}  # not BN stats
    assert backbone and all(torch.allclose(after[f"module.model.{k}"], v, atol=2e-3) for k, v in backbone.items())
    assert after["module.model.fc.weight"].shape == (3, source.fc.in_features)


def test_vit_weights_at_another_size_and_patch_are_resampled(folder: Path, tmp_path: Path):
    source = timm.create_model("test_vit", num_classes=1000, img_size=64, patch_size=16)  # a 4x4 grid
    code, err = _run(
        folder,
        tmp_path / "v",
        "--model",
        "test_vit",
        "--patch-size",
        "4",
        "--weights",
        str(_save(source, tmp_path / "v.st")),
    )
    assert code == 0, err
    assert "pos_embed resampled [1, 17, " in err and "(token grid [8, 8])" in err
    assert "patch_embed.proj.weight resampled to [4, 4] px patches" in err


def test_another_architecture_is_still_refused(folder: Path, tmp_path: Path):
    source = timm.create_model("test_vit", num_classes=3, img_size=32, patch_size=4)
    code, err = _run(
        folder, tmp_path / "x", "--model", "test_resnet", "--weights", str(_save(source, tmp_path / "x.st"))
    )
    assert code == 3 and "does not fit this model" in err and not (tmp_path / "x").exists()


def test_eval_reads_a_plain_class_folder_and_refuses_other_classes(folder: Path, tmp_path: Path):
    code, err = _run(folder, tmp_path / "run", "--model", "test_resnet")
    assert code == 0, err
    r = run_cli(["mix", "eval", str(tmp_path / "run"), "--data", str(folder / "val"), "--json"])
    assert r.code == 0, r.stderr
    import json

    report = json.loads(r.stdout)
    assert report["data"].startswith("image folder") and "6 images, 3 classes" in report["data"]
    expected = json.loads(run_cli(["mix", "eval", str(tmp_path / "run"), "--json"]).stdout)["metrics"]
    assert report["metrics"] == expected  # the same images as the run's val split
    other = make_image_folder(tmp_path / "other", classes=4, per_class=1, size=32)
    r = run_cli(["mix", "eval", str(tmp_path / "run"), "--data", str(other / "val")])
    assert r.code == 2 and "are not the classes" in r.stderr and "Traceback" not in r.stderr


def test_timm_export_folder_loads_in_timm_and_scores_like_evcli(folder: Path, tmp_path: Path):
    import json

    run = tmp_path / "vit"
    code, err = _run(folder, run, "--model", "test_vit", "--patch-size", "4", "--ema")
    assert code == 0, err
    r = run_cli(["mix", "export", str(run), "--format", "timm", "--json"])
    assert r.code == 0, r.stderr
    report = json.loads(r.stdout)
    out = Path(report["weights"]).parent
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_vit" and config["num_classes"] == 3
    assert config["label_names"] == ["class_0", "class_1", "class_2"]
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["pretrained_cfg"]["crop_pct"] == 0.875
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    ours = __import__("evcli.api", fromlist=["load"]).load(report["weights"]).model.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ours(x))  # timm's own loader gives the same network
    # timm's preprocessing from the config is evcli's
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 32, 32) and cfg["interpolation"] == "bicubic"
    # the EMA weights export too; an existing output is not replaced
    r = run_cli(["mix", "export", str(run), "--which", "ema", "--json"])
    assert r.code == 0 and json.loads(r.stdout)["which"] == "ema"
    r = run_cli(["mix", "export", str(run), "--format", "timm"])
    assert r.code == 2 and "not an empty folder" in r.stderr


def test_pretrained_loads_from_the_local_hugging_face_cache_only(folder: Path, tmp_path: Path):
    import os
    import subprocess
    import sys

    cache = tmp_path / "hub"
    repo = cache / "models--timm--test_resnet.r160_in1k"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    source = timm.create_model("test_resnet", num_classes=1000)
    _save(source, snapshot / "model.safetensors")
    from timm.models._hub import save_config_for_hf

    save_config_for_hf(source, str(snapshot / "config.json"))
    args = ["--data", str(folder), "--img-size", "32", "-b", "4", "--workers", "0", "--max-steps", "1"]
    args += ["--set", "mix.method=none", "--pretrained"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EVCLI_NO_PROGRESS": "1"}

    def run(hub: Path, out: str, model: str = "test_resnet") -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "evcli", "mix", *args, "--model", model, "-o", str(tmp_path / out)]
        return subprocess.run(cmd, capture_output=True, text=True, env={**env, "HF_HUB_CACHE": str(hub)}, timeout=300)

    found = run(cache, "found")
    assert found.returncode == 0, found.stderr
    assert "weights: loaded test_resnet pretrained" in found.stderr and "re-initialised (1000 classes" in found.stderr
    missing = run(tmp_path / "empty", "missing")
    assert missing.returncode == 3 and "not in the local Hugging Face cache" in missing.stderr
    assert not (tmp_path / "missing").exists()
    hub = run(cache, "from_hub", model="hf-hub:timm/test_resnet.r160_in1k")  # architecture from the cached config
    assert hub.returncode == 0, hub.stderr
    assert "weights: loaded hf-hub:timm/test_resnet.r160_in1k pretrained" in hub.stderr
    gone = run(tmp_path / "empty", "gone", model="hf-hub:timm/test_resnet.r160_in1k")
    assert gone.returncode == 3 and "not in the local Hugging Face cache" in gone.stderr


def test_a_timm_export_folder_is_accepted_as_weights_and_checked(folder: Path, tmp_path: Path):
    import json

    run = tmp_path / "src"
    code, err = _run(folder, run, "--model", "test_resnet")
    assert code == 0, err
    r = run_cli(["mix", "export", str(run), "--format", "timm", "--json"])
    assert r.code == 0, r.stderr
    exported = Path(json.loads(r.stdout)["weights"]).parent
    code, err = _run(folder, tmp_path / "again", "--model", "test_resnet", "--weights", str(exported))
    assert code == 0 and "weights: loaded" in err and "model.safetensors" in err
    code, err = _run(folder, tmp_path / "other", "--model", "test_vit", "--weights", str(exported))
    assert code == 2 and "describes a 'test_resnet', this run builds a 'test_vit'" in err
    assert not (tmp_path / "other").exists()


def test_onnx_export_scores_like_pytorch(folder: Path, tmp_path: Path):
    import json

    pytest.importorskip("onnxruntime")
    run = tmp_path / "onnx"
    code, err = _run(folder, run, "--model", "test_resnet")
    assert code == 0, err
    r = run_cli(["mix", "export", str(run), "--format", "onnx", "--json"])
    assert r.code == 0, r.stderr
    report = json.loads(r.stdout)
    check = report["onnx_check"]
    assert check["checked"] and check["runtime"].startswith("onnxruntime") and check["images"] == 6
    assert check["max_abs_logit_error"] < 1e-3 and check["top1_onnx"] == check["top1_pytorch"]
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(report["weights"], providers=["CPUExecutionProvider"])
    out = session.run(None, {"images": np.zeros((5, 3, 32, 32), np.float32)})[0]
    assert out.shape == (5, 3)  # a dynamic batch


def test_grayscale_weights_have_their_first_conv_adapted(folder: Path, tmp_path: Path):
    source = timm.create_model("test_resnet", num_classes=3, in_chans=1)
    code, err = _run(
        folder, tmp_path / "g", "--model", "test_resnet", "--weights", str(_save(source, tmp_path / "g.st"))
    )
    assert code == 0, err
    assert "conv1.0.weight adapted from 1 to 3 input channels" in err
