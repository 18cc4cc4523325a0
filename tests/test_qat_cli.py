"""evcli qat end to end on a tiny ImageFolder (timm test_resnet, 16 px): train LTS through the CLI, the run folder and
its LTS report, the state that makes resume exact, the integer export (packed, read back, checked against the
fake-quant model), the int8 QDQ ONNX export, evaluation of the export, a sparse start kept through QAT, bad input."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evcli import api
from evcli.engine.trainer import Trainer
from evcli.io.checkpoint import read_metadata, save_weights
from evcli.testing import make_image_folder, run_cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARGS = ["--recipe", "qat/tiny", "--epochs", "2", "--set", "train.ckpt_every=1step", "--set", "train.eval_every=2step"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 3 classes x 6 train images: 2 steps of batch 8 per epoch; 2 val images per class
    return make_image_folder(tmp_path_factory.mktemp("qat-data"), classes=3, per_class=6, size=16, val_per_class=2)


@pytest.fixture(scope="module")
def lts_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("qat-runs") / "lts"
    res = run_cli(["qat", *ARGS, "--data", str(data), "--out", str(run), "--json", "-q"])
    assert res.code == 0, res.stderr
    return run, json.loads(res.stdout)


def test_lts_run_folder_report_and_state(lts_run: tuple[Path, dict]):
    run, report = lts_run
    assert report["steps"] == 4 and report["method"] == "lts"
    assert set(report["optimizers"]) == {"weights", "quant"}
    assert report["optimizers"]["quant"]["name"] == "adam"
    hist = report["lts"]["history"]
    assert [h["epoch"] for h in hist] == [0, 1]
    assert hist[0]["frozen_end"] == 0.0  # warm-up (2 steps) still running at the end of epoch 0
    assert 0.5 < hist[1]["frozen_end"] <= 1.0  # linear ρ reaches 0.5 at step 3 of 4
    # updates eliminated = mean over the 4 steps of the frozen fraction after each step
    assert 0 < report["lts"]["updates_eliminated"] < hist[1]["frozen_end"]
    assert 0 < report["lts"]["backward_flops_saved_counted"] <= 0.5
    assert report["metrics"]["frozen"] == pytest.approx(hist[1]["frozen_end"])
    for name in ("lts.png", "lts.json", "final.safetensors", "metrics.jsonl", "resolved_recipe.yaml"):
        assert (run / name).exists(), name
    ckpt = load_file(str(run / "checkpoints" / "last.safetensors"))
    for part in ("w_quant.step", "a_quant.step", "a_quant.signed"):
        assert any(k.startswith("module.model.") and k.endswith(part) for k in ckpt), part
    # the per-weight LTS state is the method's checkpointed state, not part of the model's weights
    assert not any(".lts." in k for k in ckpt if k.startswith("module."))
    lts = {k.removeprefix("state.method.lts."): v for k, v in ckpt.items() if k.startswith("state.method.lts.")}
    for part in ("distance", "prev_level", "frozen_step", "frozen_value", "started"):
        assert any(k.endswith("." + part) for k in lts), part
    # the classifier is 8-bit and never freezes (v2 code)
    assert not any(k.startswith("fc.") for k in lts)
    # frozen weights hold exactly the value they had when they froze
    for key in [k for k in lts if k.endswith(".frozen_step")]:
        layer = key.removesuffix("frozen_step")
        frozen = lts[key] > 0
        weight = ckpt["module.model." + layer + "weight"]
        assert torch.equal(weight[frozen], lts[layer + "frozen_value"][frozen])
    final = load_file(str(run / "final.safetensors"))
    assert not any(".lts." in k for k in final) and any(k.endswith("w_quant.step") for k in final)
    # the export loads after transform (engine: export_is_transformed) and scores like the run
    ev = run_cli(["qat", "eval", str(run / "final.safetensors"), "--json", "-q"])
    assert ev.code == 0, ev.stderr
    assert json.loads(ev.stdout)["metrics"]["top1"] == report["metrics"]["top1"]


def test_resume_after_a_kill_is_bit_exact(lts_run: tuple[Path, dict], data: Path, tmp_path: Path, monkeypatch):
    run, _ = lts_run
    original = Trainer._train_step

    def killed(self: Trainer, batches):  # noqa: ANN001
        out = original(self, batches)
        if self.ctx.step + 1 == 3:
            raise RuntimeError("simulated kill")
        return out

    killed_run = tmp_path / "killed"
    with monkeypatch.context() as m:
        m.setattr(Trainer, "_train_step", killed)
        with pytest.raises(RuntimeError, match="simulated kill"):
            run_cli(["qat", *ARGS, "--data", str(data), "--out", str(killed_run), "-q"])
    assert read_metadata(killed_run / "checkpoints" / "last.safetensors")["step"] == 2
    res = run_cli(["qat", "--resume", str(killed_run), "--json", "-q"])
    assert res.code == 0, res.stderr
    a = load_file(str(run / "checkpoints" / "last.safetensors"))
    b = load_file(str(killed_run / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = json.loads((run / "report.json").read_text()), json.loads(res.stdout)
    assert ra["lts"] == rb["lts"]  # history and running sums come back with the method state


def test_integer_export_onnx_and_eval(lts_run: tuple[Path, dict]):
    run, report = lts_run
    res = run_cli(["qat", "export", str(run), "--which", "last", "--onnx", "--json", "-q"])
    assert res.code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["check"]["max_abs_logit_error"] <= 1e-5
    assert out["check"]["top1_other"] == out["check"]["top1_reference"] == report["metrics"]["top1"]
    assert out["onnx"]["checked"] and out["onnx"]["quantize_linear"] > 0
    assert out["onnx"]["top1_other"] == out["onnx"]["top1_reference"]
    tensors = load_file(out["weights"])
    meta = read_metadata(out["weights"], "weights file")
    assert meta["kind"] == "qat_int"
    layers = meta["layers"]
    inner = [n for n, v in layers.items() if v["weight_bits"] == 4]
    assert inner and all(layers[n]["packed"] for n in inner)
    for n in inner:  # 4-bit: two levels per byte
        assert tensors[f"{n}.weight_q"].dtype == torch.uint8
        assert tensors[f"{n}.weight_q"].numel() == math.ceil(math.prod(layers[n]["shape"]) / 2)
    assert layers["fc"]["weight_bits"] == 8 and tensors["fc.weight_q"].dtype == torch.int8
    assert layers["conv1.0"]["weight_bits"] == 8 and layers["conv1.0"]["act_signed"] is True
    # a second export does not overwrite the first
    again = run_cli(["qat", "export", str(run), "--which", "last"])
    assert again.code == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    # evaluating the integer export scores like the run
    ev = run_cli(["qat", "eval", out["weights"], "--json", "-q"])
    assert ev.code == 0, ev.stderr
    assert json.loads(ev.stdout)["metrics"]["top1"] == report["metrics"]["top1"]
    # a run folder evaluates its best checkpoint (the fake-quant model with its step sizes)
    ev = run_cli(["qat", "eval", str(run), "--json", "-q"])
    assert ev.code == 0, ev.stderr
    assert json.loads(ev.stdout)["metrics"]["top1"] == report["best"]["top1"]


def _sparse_source(path: Path) -> Path:
    import timm

    from evcli.ops.nm import nm_mask

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    state = model.state_dict()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Conv2d) and mod.in_channels % 4 == 0:
            w = state[f"{name}.weight"]
            state[f"{name}.weight"] = w * nm_mask(w, 2, 4)
    meta = {"recipe": {"command": "sparsify", "sparsify": {"nm": "2:4", "sparsity": None}}, "classes": []}
    return save_weights(path, state, meta)


def test_a_sparse_start_keeps_its_2_4_pattern_through_lsq_and_the_export(data: Path, tmp_path: Path):
    src = _sparse_source(tmp_path / "sparse.safetensors")
    run = tmp_path / "lsq"
    res = run_cli(
        [
            "qat",
            *ARGS,
            "--method",
            "lsq",
            "--bits",
            "2",
            "--weights",
            str(src),
            "--data",
            str(data),
            "--out",
            str(run),
            "--max-steps",
            "2",
            "--json",
            "-q",
        ]
    )
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["qat"]["sparse_source"]["nm"] == "2:4"
    assert report["metrics"]["sparsity"] >= 0.5
    assert "lts" not in report
    out = run_cli(["qat", "export", str(run), "--json", "-q"])
    assert out.code == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["sparse"]["ok"] and res["sparse"]["overall_sparsity"] >= 0.5
    assert res["bits"] == [2, 8]
    # sparsify -> qat: `evcli sparsify verify` passes on the integer export (2:4 of the kept layers' levels)
    verify = run_cli(["sparsify", "verify", res["weights"], "--json"])
    assert verify.code == 0, verify.stderr
    checked = [row["layer"] for row in json.loads(verify.stdout)["layers"]]
    assert checked == report["qat"]["sparse_source"]["layers"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--bits", "0"], "qat.bits' must be >= 2"),
        (["--bits", "1"], "qat.bits' must be >= 2"),
        (["--bits", "9"], "qat.bits' must be <= 8"),
        (["--lts-rate", "1.5"], "qat.lts_rate' must be in [0, 1]"),
        (["--lts-rate", "-0.1"], "qat.lts_rate' must be in [0, 1]"),
        (["--set", "qat.lts_gamma=1"], "qat.lts_gamma' must be in [0, 1)"),
    ],
)
def test_bad_numbers_are_one_line_exit_2(args: list[str], message: str, tmp_path: Path):
    res = run_cli(["qat", *args, "--out", str(tmp_path / "r")])
    assert res.code == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "r").exists()


def test_bits_abc_is_a_usage_error(tmp_path: Path):
    res = run_cli(["qat", "--bits", "abc", "--out", str(tmp_path / "r")])
    assert res.code == 2 and "--bits" in res.stderr and "Traceback" not in res.stderr


def test_a_model_with_no_quantizable_layer(data: Path, tmp_path: Path):
    res = run_cli(
        [
            "qat",
            "--recipe",
            "qat/tiny",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "r"),
            "--set",
            'qat.ignore=["type:Conv2d", "type:Linear"]',
        ]
    )
    assert res.code == 2 and "no Conv2d/Linear layer to quantize" in res.stderr and "Traceback" not in res.stderr


def test_export_of_a_run_that_is_not_qat(tmp_path: Path):
    import evcli.testing.toy  # noqa: F401  registers toy-quant

    run = tmp_path / "toy"
    api.train(api.resolve("toy-quant", flags={"out.dir": str(run), "schedule.max_steps": 1}))
    res = run_cli(["qat", "export", str(run)])
    assert res.code == 2 and "not a QAT run" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(["qat", "export", str(tmp_path / "missing")])
    assert res.code == 3 and "Traceback" not in res.stderr


def test_help_lists_the_methods_and_examples():
    res = run_cli(["qat", "--help"])
    assert res.code == 0
    for text in ("--method", "lts", "--bits", "--lts-rate", "export", "Examples"):
        assert text in res.stdout
