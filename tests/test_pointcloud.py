"""PointMetaBase / PointNeXt: architecture sizes against the card, block structure, the smoothed CE, confusion
metrics, point data (voxels, passes, crops, collate, readers) and recipe checks."""

import numpy as np
import pytest
import torch

from evcli.data.points import (
    IGNORE,
    collate_points,
    crop_around,
    read_cloud,
    sample_points,
    voxel_passes,
    voxel_sample,
)
from evcli.errors import DataError, RecipeError
from evcli.methods.pointcloud.infer import smooth_cross_entropy
from evcli.methods.pointcloud.model import (
    MetaBlock,
    ModelSpec,
    build_model,
    count_flops,
    count_parameters,
    stage_radii,
)
from evcli.metrics.segmentation import confusion_matrix, confusion_summary

pytestmark = pytest.mark.usefixtures("one_thread")


def seg(name: str, classes: int = 13) -> torch.nn.Module:
    return build_model(ModelSpec("segmentation", name, 4, classes, 0.1))


@pytest.mark.parametrize(
    ("name", "paper_m"),
    [
        ("pointmetabase-l", 2.7),
        ("pointmetabase-xl", 15.3),
        ("pointmetabase-xxl", 19.7),
        ("pointnext-s", 0.8),
        ("pointnext-b", 3.8),
        ("pointnext-l", 7.1),
        ("pointnext-xl", 41.6),
    ],
)
def test_segmentation_parameters_match_the_papers(name: str, paper_m: float):
    # S3DIS: 4 input channels (rgb + height), 13 classes; the papers round to 0.1 M
    got = count_parameters(seg(name)) / 1e6
    assert abs(got - paper_m) <= max(0.02 * paper_m, 0.05), (name, got)


def test_classification_parameters_match_the_paper():
    m = build_model(ModelSpec("classification", "pointmetabase-s", 4, 15, 0.15, 1.5))  # ScanObjectNN: xyz + height
    assert abs(count_parameters(m) / 1e6 - 1.4) <= 0.028
    base = build_model(ModelSpec("classification", "pointnext-s", 4, 15, 0.15, 1.5))
    assert abs(count_parameters(base) / 1e6 - 1.4) <= 0.05


def test_radii_and_block_structure_of_l():
    assert stage_radii(0.1, 2.0, (1, 3, 5, 3, 3), (1, 4, 4, 4, 4)) == [
        [0.1],
        [0.1, 0.2, 0.2],
        [0.2, 0.4, 0.4, 0.4, 0.4],
        [0.4, 0.8, 0.8],
        [0.8, 1.6, 1.6],
    ]
    m = seg("pointmetabase-l")
    assert m.encoder.channels == [32, 64, 128, 256, 512]
    assert [len(s.blocks) for s in m.encoder.stages] == [0, 2, 4, 2, 2]
    blk = m.encoder.stages[1].blocks[0]
    assert isinstance(blk, MetaBlock)
    # phi: C->C + BN + ReLU before grouping; PW1 C->C (expansion 1) + BN + ReLU; PW2 C->C + BN, no act
    assert blk.phi[0].weight.shape == (64, 64, 1) and isinstance(blk.phi[2], torch.nn.ReLU)
    assert blk.pw[0][0].weight.shape == (64, 64, 1) and len(blk.pw[1]) == 2
    # one PE (3 -> C + BN + ReLU) per stage, shared by its blocks; the head stage is a bare linear layer
    assert m.encoder.stages[1].pe_encoder[0].weight.shape == (64, 3, 1, 1)
    head = m.encoder.stages[0].sa.convs1
    assert len(head) == 1 and head[0].bias is not None
    # SegHead: 32 -> 32 + BN + ReLU, dropout 0.5, 32 -> classes
    assert [type(x).__name__ for x in m.head] == ["Sequential", "Dropout", "Conv1d"] and m.head[1].p == 0.5


def test_block_formula_on_a_hand_made_case():
    blk = MetaBlock(2).eval()
    f = torch.tensor([[[1.0, -1.0, 2.0], [0.5, 0.0, -0.5]]])  # (B, C=2, N=3)
    pe = torch.zeros(1, 2, 3, 2)
    idx = torch.tensor([[[0, 1], [1, 2], [2, 0]]])
    with torch.no_grad():
        phi = blk.phi(f)
        agg = torch.stack([torch.maximum(phi[..., idx[0, i, 0]], phi[..., idx[0, i, 1]]) for i in range(3)], -1)
        expected = torch.relu(f + blk.pw(agg))
        assert torch.allclose(blk(f, pe, idx), expected)


def test_forward_shapes_and_flops_counter():
    m = seg("pointmetabase-s", 5).eval()
    p, f = torch.rand(2, 512, 3) * 2, torch.rand(2, 4, 512)
    with torch.no_grad():
        assert m(p, f).shape == (2, 5, 512)
    c = build_model(ModelSpec("classification", "pointnext-s", 3, 7, 0.15, 1.5)).eval()
    with torch.no_grad():
        assert c(p[:, :128], p[:, :128].transpose(1, 2)).shape == (2, 7)
    flops = count_flops(c, 64, 3, 1.0)
    assert flops > 0 and count_flops(c, 64, 3, 1.0, norm_act=True) > flops


@pytest.mark.slow
def test_flops_at_the_papers_profile():
    # DeepSpeed-style count (conv/linear MACs x 2 + BN + ReLU), batch 1, 15,000 points, in_channels 3
    for name, paper in (("pointmetabase-l", 2.0), ("pointmetabase-xl", 9.2), ("pointmetabase-xxl", 11.0)):
        m = build_model(ModelSpec("segmentation", name, 3, 13, 0.1))
        got = count_flops(m, 15000, 3, norm_act=True) / 1e9
        assert abs(got / paper - 1) < 0.05, (name, got)


def test_smooth_cross_entropy_formula():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    target = torch.tensor([0, IGNORE])
    eps = 0.2
    logp = torch.log_softmax(logits[0], 0)
    expected = -((1 - eps) * logp[0] + eps / 2 * (logp[1] + logp[2]))
    assert torch.allclose(smooth_cross_entropy(logits, target, eps), expected)
    assert torch.allclose(
        smooth_cross_entropy(logits, torch.tensor([0, 1]), 0.0),
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])),
    )
    seg_logits = logits.t().unsqueeze(0)  # (B=1, C=3, N=2)
    assert torch.allclose(smooth_cross_entropy(seg_logits, target.view(1, 2), eps), expected)


def test_confusion_metrics_with_ignore_and_absent_classes():
    pred = torch.tensor([0, 0, 1, 1, 2, 0])
    target = torch.tensor([0, 1, 1, 1, IGNORE, 0])
    cm = confusion_matrix(pred, target, 4)
    assert cm.tolist() == [[2, 0, 0, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    m = confusion_summary(cm)
    assert m["oa"] == pytest.approx(80.0)
    assert m["macc"] == pytest.approx(100 * (1 + 2 / 3) / 4)  # absent classes count as 0
    assert m["miou"] == pytest.approx(100 * (2 / 3 + 2 / 3) / 4)
    with pytest.raises(ValueError, match="label 7 outside"):
        confusion_matrix(pred, torch.tensor([0, 1, 1, 7, 0, 0]), 4)


def test_voxels_passes_cover_every_point_and_crop():
    rng = np.random.default_rng(0)
    xyz = rng.random((2000, 3)).astype(np.float32)
    passes = voxel_passes(xyz, 0.2)
    assert set(np.concatenate(passes).tolist()) == set(range(2000))
    first = voxel_sample(xyz, 0.2, None)
    assert len(first) == len(passes[0]) == len(np.unique(np.floor(xyz / 0.2 + 1e-9), axis=0))
    crop = crop_around(xyz, 300, rng)
    assert len(crop) == 300 and len(set(crop.tolist())) == 300


def test_collate_pads_with_ignored_copies():
    a = {"pos": torch.rand(5, 3), "x": torch.rand(4, 5), "y": torch.arange(5)}
    b = {"pos": torch.rand(3, 3), "x": torch.rand(4, 3), "y": torch.arange(3)}
    batch = collate_points([a, b])
    assert batch["pos"].shape == (2, 5, 3) and batch["x"].shape == (2, 4, 5)
    assert batch["y"][1].tolist() == [0, 1, 2, IGNORE, IGNORE]
    assert torch.equal(batch["pos"][1, 3:], b["pos"][:2])


def test_sampling_fewer_points_warns_and_repeats(capsys):
    pts = np.arange(12, dtype=np.float32).reshape(4, 3)
    out = sample_points(pts, 10, np.random.default_rng(0), "tiny test cloud")
    assert out.shape == (10, 3) and set(map(tuple, out.tolist())) == set(map(tuple, pts.tolist()))
    assert "fewer than the 10" in capsys.readouterr().err


def test_read_cloud_bad_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nan.txt").write_text("0 0 0\nnan 1 2\n")
    (tmp_path / "two.txt").write_text("0 0\n1 1\n")
    (tmp_path / "ragged.txt").write_text("0 0 0\n1 1\n")
    np.save(tmp_path / "ok.npy", np.ones((5, 7), np.float32))
    for name, message in [
        ("empty.txt", "empty file"),
        ("nan.txt", "NaN or infinite"),
        ("two.txt", "2 columns per point"),
        ("ragged.txt", "different numbers of columns"),
        ("missing.txt", "not found"),
    ]:
        with pytest.raises(DataError, match=message):
            read_cloud(tmp_path / name)
    assert read_cloud(tmp_path / "ok.npy").shape == (5, 7)


def test_recipe_checks_model_against_task():
    from evcli.recipe import resolve_recipe

    r = resolve_recipe("pointcloud", sets=["pointcloud.task=segmentation", "model.name=pointmetabase-l"])
    assert r.train.best_metric == "miou" and r.method.in_channels() == 4 and r.method.resolved_radius() == 0.1
    r = resolve_recipe("pointcloud")
    assert r.train.best_metric == "oa" and r.method.resolved_scaling() == 1.5 and r.method.height_index() == 1
    with pytest.raises(RecipeError, match="not a classification model"):
        resolve_recipe("pointcloud", sets=["model.name=pointmetabase-l"])
    with pytest.raises(RecipeError, match="needs colours"):
        resolve_recipe("pointcloud", sets=["pointcloud.features=rgb_height"])
    r = resolve_recipe("pointcloud", sets=["pointcloud.task=segmentation", "pointcloud.height_axis_release=true"])
    assert r.method.height_index(training=True) == 1 and r.method.height_index(training=False) == 2


def test_weights_for_another_class_count_get_a_new_head():
    from evcli.methods.pointcloud.method import PointCloudMethod
    from evcli.recipe import resolve_recipe

    rec = resolve_recipe("pointcloud", sets=["model.num_classes=12"])
    method = PointCloudMethod(rec)
    method._classes = []
    target = build_model(ModelSpec("classification", "pointmetabase-s", 3, 12, 0.15, 1.5))
    source = build_model(ModelSpec("classification", "pointmetabase-s", 3, 10, 0.15, 1.5)).state_dict()
    state, notes = method.adapt_weights(dict(source), target)
    assert [n.split(":")[0] for n in notes] == ["head.8.weight", "head.8.bias"]
    assert state["head.8.weight"].shape == (12, 256) and torch.equal(state["head.0.weight"], source["head.0.weight"])
    target.load_state_dict(state)  # everything else fits exactly
