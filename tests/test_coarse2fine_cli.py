"""`evcli coarse2fine` end to end on the built-in data: train (tiny recipe), eval, sweep (JSON + PNG), export,
resume, --init-from a plain ViT, the dense baseline, and bad input (one line, exit code, no traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evcli.testing import interrupt_after, launch_two_processes, make_image_folder, run_cli

TINY = ["--recipe", "coarse2fine/tiny", "--max-steps", "2", "--set", "train.eval_every=2step"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes, 8 train / 4 val images each at 16 px (evaluation passes stay short on a shared CPU)."""
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=8, val_per_class=4)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> tuple[Path, dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("c2f") / "run"
    r = run_cli(["coarse2fine", *TINY, "--data", str(folder), "-o", str(out), "--json"])
    torch.set_num_threads(threads)
    assert r.code == 0, r.stderr
    return out, json.loads(r.stdout)


def _one_line_error(r, code: int, text: str) -> None:
    assert r.code == code, (r.code, r.stderr)
    assert text in r.stderr and "Traceback" not in r.stderr


def test_train_writes_the_run_with_the_sweep(run):
    out, report = run
    m = report["metrics"]
    assert report["method"] == "cfvit" and report["steps"] == 2
    for eta in (0, 0.5, 0.9, 1):
        assert 0.0 <= m[f"eta{eta:g}/top1"] <= 100.0
    assert m["eta0/exit_ratio"] == 1.0 and m["eta1/exit_ratio"] == 0.0
    assert m["eta0/gflops"] == pytest.approx(m["gflops_coarse"]) and m["eta1/gflops"] == pytest.approx(m["gflops_full"])
    assert m["top1"] == m["eta1/top1"]
    for name in ("final.safetensors", "sweep.png", "report.json", "metrics.jsonl", "checkpoints/last.safetensors"):
        assert (out / name).exists(), name
    weights = load_file(str(out / "final.safetensors"))
    assert weights["pos_embed_coarse"].shape == (1, 1 + 2 * 2, 64) and "reuse.fc1.weight" in weights
    assert report["informative_selection_from_step"] == 1  # 50% of 2 steps (tiny recipe)
    assert "attention" in report["flop_counter"]


def test_eval_sweep_and_export(run, tmp_path: Path):
    out, report = run
    r = run_cli(["coarse2fine", "eval", str(out), "--threshold", "0.0", "--json"])
    assert r.code == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["metrics"]["exit_ratio"] == 1.0 and ev["metrics"]["top1_eta"] == ev["metrics"]["top1_coarse"]
    assert ev["metrics"]["top1"] == pytest.approx(report["metrics"]["top1"])

    args = ["coarse2fine", "sweep", str(out), "--thresholds", "0,0.5,1", "-b", "4", "--timing-batches", "1"]
    r = run_cli([*args, "--repeats", "1", "-o", str(tmp_path / "sw"), "--json"])
    assert r.code == 0, r.stderr
    sweep = json.loads(r.stdout)
    assert [row["eta"] for row in sweep["rows"]] == [0.0, 0.5, 1.0]
    assert sweep["rows"][0]["gflops"] < sweep["rows"][-1]["gflops"] and sweep["dense"]["images_per_s"] > 0
    assert (tmp_path / "sw" / "sweep.png").stat().st_size > 1000
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["rows"] == sweep["rows"]
    r = run_cli([*args, "-o", str(tmp_path / "sw")])
    _one_line_error(r, 2, "already exists")  # never overwrites without --overwrite

    r = run_cli(["coarse2fine", "export", str(out), "--which", "last", "-o", str(tmp_path / "x.safetensors")])
    assert r.code == 0, r.stderr
    exported, final = load_file(str(tmp_path / "x.safetensors")), load_file(str(out / "final.safetensors"))
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    r = run_cli(["coarse2fine", "export", str(out), "--format", "onnx", "-o", str(tmp_path / "x.onnx")])
    _one_line_error(r, 2, "image classifiers")


def test_bad_input(run, tmp_path: Path):
    out, _ = run
    _one_line_error(
        run_cli(["coarse2fine", "eval", str(out), "--threshold", "1.5"]), 2, "--threshold must be in [0, 1]"
    )
    _one_line_error(run_cli(["coarse2fine", "sweep", str(out), "--thresholds", "0.5,-1"]), 2, "[0, 1]")
    _one_line_error(run_cli(["coarse2fine", "sweep", str(out), "--thresholds", "a,b"]), 2, "separated by commas")
    r = run_cli(["coarse2fine", *TINY, "--threshold", "2", "-o", str(tmp_path / "t")])
    _one_line_error(r, 2, "coarse2fine.threshold")
    r = run_cli(["coarse2fine", *TINY, "--img-size", "20", "-o", str(tmp_path / "bad")])
    _one_line_error(r, 2, "image size 20 does not fit a coarse grid of 2")
    r = run_cli(["coarse2fine", *TINY, "--model", "deit_tiny_distilled_patch16_224", "-o", str(tmp_path / "bad2")])
    _one_line_error(r, 2, "cannot be a CF-ViT")
    # a plain ViT's weights given to eval: point to --init-from
    import timm

    plain = timm.create_model("test_vit", img_size=16, patch_size=4, num_classes=10)
    save_file(dict(plain.state_dict()), str(tmp_path / "plain.safetensors"))
    r = run_cli(["coarse2fine", "eval", str(tmp_path / "plain.safetensors")])
    _one_line_error(r, 2, "holds a plain ViT")
    assert "--init-from" in r.stderr


def test_init_from_plain_vit_on_builtin_data_and_dense_baseline(tmp_path: Path, folder: Path):
    import timm

    plain = timm.create_model("test_vit", img_size=16, patch_size=4, num_classes=10)
    save_file(dict(plain.state_dict()), str(tmp_path / "plain.safetensors"))
    one = ["--max-steps", "1", "--set", "train.eval_every=1step", "--set", "coarse2fine.sweep=[1.0]"]
    r = run_cli(
        [
            "coarse2fine",
            "--recipe",
            "coarse2fine/tiny",
            *one,
            "--init-from",
            str(tmp_path / "plain.safetensors"),
            "-o",
            str(tmp_path / "init"),
        ]
    )
    assert r.code == 0, r.stderr
    assert "plain ViT -> CF-ViT: pos_embed_coarse resampled" in r.stderr
    r = run_cli(
        [
            "coarse2fine",
            "--recipe",
            "coarse2fine/tiny",
            *one,
            "--method",
            "dense",
            "--data",
            str(folder),
            "-o",
            str(tmp_path / "d"),
            "--json",
        ]
    )
    assert r.code == 0, r.stderr
    dense = json.loads(r.stdout)
    assert dense["method"] == "dense" and "eta1/top1" not in dense["metrics"]
    assert dense["metrics"]["gflops"] > 0 and "pos_embed_coarse" not in load_file(
        str(tmp_path / "d" / "final.safetensors")
    )
    _one_line_error(run_cli(["coarse2fine", "sweep", str(tmp_path / "d")]), 2, "dense baseline")


def test_resume_after_interrupt_is_bit_exact_across_the_selection_switch(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
):
    args = [
        "coarse2fine",
        "--recipe",
        "coarse2fine/tiny",
        "--data",
        str(folder),
        "--max-steps",
        "3",
        "--set",
        "train.eval_every=3step",
        "--set",
        "train.ckpt_every=1step",
        "--set",
        "coarse2fine.selection_start=2step",
        "--set",
        "coarse2fine.sweep=[1.0]",
    ]
    r = run_cli([*args, "-o", str(tmp_path / "full")])
    assert r.code == 0, r.stderr
    interrupt_after(monkeypatch, 1)
    r = run_cli([*args, "-o", str(tmp_path / "split")])
    monkeypatch.undo()
    assert r.code == 130, r.stderr
    r = run_cli(["coarse2fine", "--resume", str(tmp_path / "split")])
    assert r.code == 0, r.stderr
    a, b = (
        load_file(str(tmp_path / "full" / "final.safetensors")),
        load_file(str(tmp_path / "split" / "final.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    flags = [rec["informative"] for rec in logs if "informative" in rec]
    assert flags == [0.0, 0.0, 1.0]


def test_help_lists_the_commands_and_examples():
    r = run_cli(["coarse2fine", "--help"])
    assert r.code == 0
    for word in ("sweep", "eval", "export", "--threshold", "--coarse-grid", "built-in", "--init-from"):
        assert word in r.stdout, word
    r = run_cli(["coarse2fine", "sweep", "--help"])
    assert r.code == 0 and "--thresholds" in r.stdout and "--baseline" in r.stdout


@pytest.mark.slow
def test_two_processes_train_and_sum_the_sweep(tmp_path: Path, folder: Path):
    """DDP over gloo through accelerate launch: the per-threshold sums reduce over both processes."""
    args = ["coarse2fine", *TINY, "--data", str(folder), "-o", str(tmp_path / "ddp"), "--json"]
    proc = launch_two_processes(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1 and reports[0]["processes"] == 2
    m = reports[0]["metrics"]
    assert m["eta0/exit_ratio"] == 1.0 and 0.0 <= m["eta0.5/top1"] <= 100.0
    r = run_cli(["coarse2fine", "eval", str(tmp_path / "ddp"), "--json"])
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["top1"] == pytest.approx(m["top1"])
