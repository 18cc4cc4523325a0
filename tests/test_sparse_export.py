"""A sparse export is never born dense: "best" is only an evaluation at the target pattern, an export of a
checkpoint that was never trained at it warns, and the export's metadata holds metrics measured on the
exported weights themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evcli.io.checkpoint import read_metadata
from evcli.ops.nm import is_nm
from evcli.testing import make_image_folder, run_cli


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=8, size=16)


def _args(folder: Path, out: Path, *extra: str) -> list[str]:
    return [
        "sparsify",
        "--nm",
        "2:4",
        "--model",
        "test_resnet",
        "--img-size",
        "16",
        "-b",
        "4",
        "--workers",
        "0",
        "--data",
        str(folder),
        "--set",
        "sparsify.update_every=step",
        "-o",
        str(out),
        *extra,
    ]


def test_best_is_chosen_only_among_evaluations_at_the_target_pattern(folder: Path, tmp_path: Path):
    run = tmp_path / "lbc"
    # 6 steps per epoch, 3 epochs, an evaluation every 2 steps; exact 2:4 from t_f = 50% (step 9) on
    r = run_cli(
        _args(folder, run, "--epochs", "3", "--set", "train.eval_every=2step", "--set", "sparsify.t_f=50%", "--json")
    )
    assert r.code == 0, r.stderr
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["split"] == "val"]
    assert [e["nm_exact"] for e in evals][:2] == [0.0, 0.0]  # the early evaluations were not yet 2:4
    best = read_metadata(run / "checkpoints" / "best.safetensors")["best"]
    assert best["nm_exact"] == 1.0 and best["step"] >= 10
    r = run_cli(["sparsify", "export", str(run), "--json"])
    assert r.code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["verified"] and res["trained_at_pattern"] and "not trained at" not in r.stderr
    meta = read_metadata(res["weights"])
    assert meta["metrics"] == res["metrics"] and "measured on the exported weights" in meta["metrics_note"]
    assert meta["metrics"]["sparsity"] == pytest.approx(0.5, abs=0.01)  # measured on the export, not the dense eval
    # the packed N:M file verifies and loads back as the same network (its values are fp16)
    packed = res["packed"]["packed_file"]
    r = run_cli(["sparsify", "verify", packed, "--json"])
    assert r.code == 0 and json.loads(r.stdout)["ok"], r.stderr
    from safetensors.torch import load_file

    from evcli import api

    dense = load_file(res["weights"])
    back = api.load(packed).model.state_dict()
    for k, v in dense.items():
        if ".evcli_site." in k:
            continue
        expected = v.half().float() if v.is_floating_point() else v
        assert torch.equal(back[k].float() if v.is_floating_point() else back[k], expected), k
    # the folded sparse model as ONNX scores like PyTorch (onnxruntime, when installed)
    pytest.importorskip("onnxruntime")
    r = run_cli(["sparsify", "export", str(run), "--format", "onnx", "-o", str(run / "sparse.onnx"), "--json"])
    assert r.code == 0, r.stderr
    check = json.loads(r.stdout)["onnx_check"]
    assert check["checked"] and check["max_abs_logit_error"] < 1e-3 and check["top1_onnx"] == check["top1_pytorch"]


def test_export_of_a_checkpoint_never_trained_at_the_pattern_warns_and_reports_its_own_score(
    folder: Path, tmp_path: Path
):
    run = tmp_path / "early"
    # t_f far past the end: the run never reaches exact 2:4, so no evaluation may be best
    r = run_cli(_args(folder, run, "--epochs", "1", "--set", "sparsify.t_f=10ep"))
    assert r.code == 0, r.stderr
    assert "no evaluation of this run was eligible as best" in r.stderr
    assert not (run / "checkpoints" / "best.safetensors").exists()
    r = run_cli(["sparsify", "export", str(run), "--json"])
    assert r.code == 0, r.stderr
    res = json.loads(r.stdout)
    assert not res["trained_at_pattern"] and "was not trained at 2:4" in r.stderr
    from safetensors.torch import load_file

    weights = load_file(res["weights"])
    conv = weights["layer1.0.conv2.weight"]
    assert is_nm(conv, 2, 4)  # pruned to the pattern all the same
    assert read_metadata(res["weights"])["metrics"]["top1"] == res["metrics"]["top1"]
