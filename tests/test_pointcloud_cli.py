"""`evcli pointcloud` end to end on the built-in data: train / eval / resume / export / predict through the
engine for classification and segmentation, the standard dataset layouts, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from evcli.testing import imports_torch, interrupt_after, run_cli

TINY = ["pointcloud", "train", "--recipe", "pointcloud/tiny"]
TINY_SEG = ["pointcloud", "train", "--recipe", "pointcloud/tiny_seg"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("pc") / "cls"
    r = run_cli([*TINY, "-o", str(run), "--json"])
    assert r.code == 0, r.stderr
    return run


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("pc") / "seg"
    r = run_cli([*TINY_SEG, "-o", str(run), "--json"])
    assert r.code == 0, r.stderr
    return run


def test_help_does_not_import_torch():
    for args in (["pointcloud", "--help"], ["pointcloud", "train", "--help"], ["pointcloud", "predict", "--help"]):
        imported, out = imports_torch(args)
        assert not imported, args
    assert "built-in synthetic data" in run_cli(["pointcloud", "--help"]).stdout


def test_train_writes_a_complete_run(cls_run: Path):
    report = json.loads((cls_run / "report.json").read_text())
    assert {"oa", "macc", "miou"} <= set(report["metrics"]) and report["steps"] == 3
    assert report["architecture"] == "pointmetabase-s" and len(report["tables"]["per_class"]) == 10
    assert sum(row["count"] for row in report["tables"]["per_class"]) == 10  # one held-out cloud per class
    for name in ("resolved_recipe.yaml", "metrics.jsonl", "checkpoints/last.safetensors", "pictures/val_0.png"):
        assert (cls_run / name).exists(), name


def test_eval_reproduces_training_metrics_and_votes(cls_run: Path):
    r = run_cli(["pointcloud", "eval", str(cls_run), "--json"])
    assert r.code == 0, r.stderr
    train = json.loads((cls_run / "report.json").read_text())["metrics"]
    ev = json.loads(r.stdout)
    assert ev["metrics"]["oa"] == pytest.approx(train["oa"])
    assert np.array(ev["tables"]["confusion"]).sum() == 10 and ev["tables"]["per_class"][0]["class"] == "sphere"
    r = run_cli(["pointcloud", "eval", str(cls_run), "--votes", "3", "--json"])
    assert r.code == 0, r.stderr
    assert 0 <= json.loads(r.stdout)["metrics"]["oa"] <= 100


def test_resume_after_interrupt_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cls_run: Path):
    partial = tmp_path / "partial"
    interrupt_after(monkeypatch, 2)
    r = run_cli([*TINY, "-o", str(partial)])
    monkeypatch.undo()
    assert r.code == 130
    r = run_cli(["pointcloud", "train", "--resume", str(partial)])
    assert r.code == 0, r.stderr
    a, b = load_file(str(cls_run / "final.safetensors")), load_file(str(partial / "final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_scores_like_the_run(tmp_path: Path, cls_run: Path):
    out = tmp_path / "model.safetensors"
    r = run_cli(["pointcloud", "export", str(cls_run), "--which", "last", "-o", str(out), "--json"])
    assert r.code == 0, r.stderr
    exported = json.loads(r.stdout)["metrics"]
    r = run_cli(["pointcloud", "eval", str(out), "--json"])
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["oa"] == pytest.approx(exported["oa"])


def test_predict_class_and_png(tmp_path: Path, cls_run: Path):
    cloud = tmp_path / "few.txt"
    np.savetxt(cloud, np.random.default_rng(0).random((40, 3)))  # fewer points than the 64 asked for
    r = run_cli(["pointcloud", "predict", str(cloud), "--weights", str(cls_run), "--json"])
    assert r.code == 0, r.stderr
    out = json.loads(r.stdout)
    from evcli.data.points import SHAPE_CLASSES

    assert out["task"] == "classification" and out["class"] in SHAPE_CLASSES and 0 < out["probability"] <= 1
    assert Path(out["png"]).stat().st_size > 1000 and "fewer than the 64" in r.stderr
    r = run_cli(["pointcloud", "predict", str(cloud), "--weights", str(cls_run)])
    assert r.code == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert run_cli(["pointcloud", "predict", str(cloud), "--weights", str(cls_run), "--overwrite"]).code == 0


def test_segmentation_full_room_eval_and_predict(tmp_path: Path, seg_run: Path):
    report = json.loads((seg_run / "report.json").read_text())
    assert "iou_floor" in report["metrics"] and (seg_run / "pictures" / "val_0_truth.png").exists()
    r = run_cli(["pointcloud", "eval", str(seg_run), "--full-room", "--json"])
    assert r.code == 0, r.stderr
    ev = json.loads(r.stdout)
    assert "every original point" in ev["data"]
    from evcli.data.points import builtin_scene

    room = builtin_scene(1, 600)
    np.save(tmp_path / "room.npy", room)
    r = run_cli(["pointcloud", "predict", str(tmp_path / "room.npy"), "--weights", str(seg_run), "--json"])
    assert r.code == 0, r.stderr
    out = json.loads(r.stdout)
    labels = Path(out["labels"]).read_text().split()
    assert len(labels) == len(room) and set(labels) <= {str(i) for i in range(5)}
    np.savetxt(tmp_path / "xyz.txt", room[:, :3])
    r = run_cli(["pointcloud", "predict", str(tmp_path / "xyz.txt"), "--weights", str(seg_run), "--no-png"])
    assert r.code == 0 and "no colours" in r.stderr


def test_segmentation_eval_counts_every_point(seg_run: Path):
    from evcli import api
    from evcli.methods.pointcloud.infer import segment_points
    from evcli.methods.pointcloud.method import build_point_data

    loaded = api.load(seg_run)
    rec = loaded.recipe
    room = build_point_data(rec, training=False).val.rooms[0]

    logits = segment_points(loaded.model, room, rec.method)
    assert logits.shape == (len(room), 5) and torch.isfinite(logits).all()


def _h5(path: Path, n: int, labels: list[int]) -> None:
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h:
        h["data"] = np.random.default_rng(0).random((n, 80, 3)).astype(np.float32)
        h["label"] = np.array(labels, np.int64).reshape(-1, 1)


def test_standard_layouts_are_read(tmp_path: Path):
    from evcli import api
    from evcli.methods.pointcloud.method import build_point_data

    root = tmp_path / "modelnet40_ply_hdf5_2048"
    _h5(root / "ply_data_train0.h5", 6, [0, 1, 2, 0, 1, 2])
    _h5(root / "ply_data_test0.h5", 3, [0, 1, 2])
    rec = api.resolve("pointcloud", flags={"data.path": str(tmp_path), "pointcloud.num_points": 64})
    data = build_point_data(rec)
    assert len(data.train) == 6 and len(data.val) == 3 and data.classes == ["0", "1", "2"]
    item = data.val[(0, 1)]
    assert item["pos"].shape == (64, 3) and int(item["y"]) == 1
    s3dis = tmp_path / "s3dis" / "raw"
    s3dis.mkdir(parents=True)
    for name in ("Area_1_office_1", "Area_5_office_2"):
        room = np.random.default_rng(1).random((300, 7)).astype(np.float32)
        room[:, 3:6] *= 255
        room[:, 6] = np.arange(300) % 13
        np.save(s3dis / f"{name}.npy", room)
    rec = api.resolve(
        "pointcloud",
        flags={"data.path": str(s3dis.parent)},
        sets=["pointcloud.task=segmentation", "model.name=pointmetabase-l", "pointcloud.voxel_size=0.1"],
    )
    data = build_point_data(rec)
    assert len(data.train) == 30 and len(data.val) == 1 and len(data.classes) == 13  # loop 30
    assert data.train[(0, 0)]["x"].shape[0] == 4  # rgb + height


def test_bad_input_gets_one_line(tmp_path: Path, cls_run: Path):
    (tmp_path / "nan.txt").write_text("0 0 0\nnan 1 2\n")
    (tmp_path / "cols.txt").write_text("0 0\n1 1\n")
    (tmp_path / "empty.txt").write_text("")
    np.save(tmp_path / "pickled.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "broken.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 5\nproperty float x\nend_header\n1\n")
    cases = (("nan.txt", "NaN"), ("cols.txt", "columns"), ("empty.txt", "empty"), ("pickled.npy", "cannot read"))
    for name, message in (*cases, ("broken.ply", "")):
        r = run_cli(["pointcloud", "predict", str(tmp_path / name), "--weights", str(cls_run), "--no-png"])
        assert r.code == 3 and message in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
    r = run_cli(["pointcloud", "train", "--task", "detection"])
    assert r.code == 2 and "unknown --task" in r.stderr
    r = run_cli(["pointcloud", "train", "--model", "pointmetabase-l"])
    assert r.code == 2 and "not a classification model" in r.stderr
    r = run_cli(["pointcloud", "train", "--data", str(tmp_path / "nowhere")])
    assert r.code == 3 and "not found" in r.stderr
    bad = tmp_path / "badlabels"
    _h5(bad / "ply_data_train0.h5", 2, [0, 1])
    _h5(bad / "ply_data_test0.h5", 2, [0, 1])
    r = run_cli([*TINY, "--data", str(bad), "--set", "model.num_classes=1", "-o", str(tmp_path / "r")])
    assert r.code == 3 and "outside" in r.stderr and not (tmp_path / "r" / "checkpoints").exists()
    s3dis = tmp_path / "s3"
    s3dis.mkdir()
    room = np.zeros((50, 7), np.float32)
    room[:, :3] = np.random.default_rng(0).random((50, 3))
    room[0, 6] = 20  # label outside the 13 S3DIS classes
    np.save(s3dis / "Area_5_x.npy", room)
    np.save(s3dis / "Area_1_x.npy", room)
    r = run_cli([*TINY_SEG, "--data", str(s3dis), "-o", str(tmp_path / "r2")])
    assert r.code == 3 and "label 20 outside" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_full_room_eval_in_two_processes_counts_every_point_once(tmp_path: Path):
    """The engine path under `accelerate launch` (2 CPU processes, DDP over gloo), full-room evaluation."""
    from evcli.testing import launch_two_processes

    sets = [
        "--set",
        "pointcloud.eval_mode=full",
        "--set",
        "pointcloud.loop=2",
        "--set",
        "pointcloud.builtin_val_rooms=2",
    ]
    args = [*TINY_SEG[1:], *sets, "-o", str(tmp_path / "d"), "--json"]
    proc = launch_two_processes(["pointcloud", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["processes"] == 2 and report["steps"] == 1  # 4 crops, 2 per process, batch 2
    from evcli import api
    from evcli.methods.pointcloud.method import build_point_data

    rooms = build_point_data(api.load(tmp_path / "d").recipe, training=False).val.rooms
    assert len(rooms) == 2  # one held-out room per process: every original point counted once over both
    assert report["metrics"]["count"] == float(len(rooms[0]) + len(rooms[1]))
