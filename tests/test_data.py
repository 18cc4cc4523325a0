"""Data: the built-in digits, ImageFolder reading, bad images, deterministic sharded batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evcli.data.classification import build_classification_data, builtin_digits
from evcli.data.loading import ShardedBatchSampler
from evcli.errors import DataError
from evcli.io.images import load_rgb
from evcli.recipe import resolve_recipe
from evcli.testing import make_image_folder

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _data(path: Path | None, **sets: object):
    r = resolve_recipe(
        "mix",
        flags={
            "data.path": str(path) if path else None,
            "data.img_size": 16,
            **{f"data.{k}": v for k, v in sets.items()},
        },
    )
    return build_classification_data(r.data, 16, MEAN, STD, seed=0)


def test_builtin_digits_are_real_and_split():
    train, val = builtin_digits()
    assert len(train) + len(val) == 1797 and len(val) == 355
    assert sorted(set(val.labels)) == list(range(10))
    img = train.load(0)
    assert img.size == (8, 8) and img.mode == "RGB"
    assert np.asarray(img).std() > 10  # real strokes, not a blank or synthetic constant


def test_image_folder(tmp_path: Path):
    root = make_image_folder(tmp_path, classes=3, per_class=4, size=20)
    data = _data(root)
    assert data.classes == ["class_0", "class_1", "class_2"] and len(data.train) == 12 and len(data.val) == 6
    x, y = data.train[(0, 5)]
    assert x.shape == (3, 16, 16) and y == 1


def test_augmentation_is_keyed_by_epoch_and_index(tmp_path: Path):
    data = _data(make_image_folder(tmp_path), scale=[0.3, 1.0])
    a, b = data.train[(0, 1)][0], data.train[(0, 1)][0]
    assert torch.equal(a, b)  # same key, same sample, whatever happened in between
    assert not torch.equal(a, data.train[(1, 1)][0])  # another epoch, another crop


@pytest.mark.parametrize("problem", ["missing", "file", "no_train", "no_val", "empty", "no_images"])
def test_folder_errors(tmp_path: Path, problem: str):
    root = tmp_path / "d"
    if problem == "file":
        root.write_text("x")
    elif problem == "no_train":
        (root / "val" / "a").mkdir(parents=True)
    elif problem == "no_val":
        make_image_folder(root)
        import shutil

        shutil.rmtree(root / "val")
    elif problem == "empty":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
    elif problem == "no_images":
        (root / "train" / "a").mkdir(parents=True)
        (root / "val" / "a").mkdir(parents=True)
        (root / "train" / "a" / "notes.txt").write_text("x")
    with pytest.raises(DataError) as info:
        _data(root)
    assert str(root) in info.value.message


def test_corrupt_image_is_named_or_skipped(tmp_path: Path):
    root = make_image_folder(tmp_path)
    bad = root / "train" / "class_1" / "000.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    data = _data(root)
    index = data.train.source.paths.index(bad)
    with pytest.raises(DataError, match="000.png"):
        data.train[(0, index)]
    skipped = _data(root, skip_corrupt=True)
    assert len(skipped.train) == len(data.train) - 1 and bad not in skipped.train.source.paths


@pytest.mark.parametrize("mode", ["I;16", "L", "RGBA", "P", "LA"])
def test_image_modes_become_rgb(tmp_path: Path, mode: str):
    arr = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16) if mode == "I;16" else None
    if arr is not None:
        img = Image.fromarray(arr)
    else:
        img = Image.new(mode, (8, 8))
    path = tmp_path / "x.png"
    img.save(path)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (8, 8)
    if mode == "I;16":
        assert np.asarray(rgb)[..., 0].max() > 200  # rescaled, not clipped to 255 everywhere
        assert np.asarray(rgb)[0, 0, 0] == 0


def test_sampler_shards_and_resumes():
    a = ShardedBatchSampler(23, 4, rank=0, world=2, seed=1)
    b = ShardedBatchSampler(23, 4, rank=1, world=2, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    ia = [i for batch in a for _, i in batch]
    ib = [i for batch in b for _, i in batch]
    assert len(a) == 2 and not set(ia) & set(ib)
    a.set_epoch(3, start_batch=1)
    assert [i for batch in a for _, i in batch] == ia[4:]
    a.set_epoch(4)
    assert [i for batch in a for _, i in batch] != ia
    ev = [ShardedBatchSampler(23, 4, rank=r, world=2, train=False) for r in range(2)]
    seen = sorted(i for s in ev for batch in s for _, i in batch)
    assert seen == list(range(23))  # evaluation sees every sample exactly once


def _write_idx(root: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    import gzip
    import struct

    opener = gzip.open if gz else open
    ext = ".gz" if gz else ""
    with opener(root / f"{prefix}-images-idx3-ubyte{ext}", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, *images.shape) + images.astype(np.uint8).tobytes())
    with opener(root / f"{prefix}-labels-idx1-ubyte{ext}", "wb") as f:
        f.write(struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_is_train_and_t10k(tmp_path: Path, gz: bool):
    rng = np.random.default_rng(0)
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    train_imgs = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    _write_idx(root, "train", train_imgs, np.arange(12) % 10, gz)
    _write_idx(root, "t10k", rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.arange(5) % 10, gz)
    data = _data(root)
    assert len(data.train) == 12 and len(data.val) == 5
    assert data.classes[:2] == ["t-shirt", "trouser"]  # a folder named fashion-mnist gets Fashion-MNIST's names
    x, y = data.val[(0, 3)]
    assert x.shape == (3, 16, 16) and y == 3
    src = data.train.source
    assert np.array_equal(np.asarray(src.load(7))[..., 0], train_imgs[7])  # pixels read where the header says


def test_idx_folder_errors(tmp_path: Path):
    root = tmp_path / "mnist"
    root.mkdir()
    imgs = np.zeros((4, 8, 8), np.uint8)
    _write_idx(root, "train", imgs, np.arange(4), gz=False)
    with pytest.raises(DataError, match="no t10k-images-idx3-ubyte"):
        _data(root)
    _write_idx(root, "t10k", imgs, np.arange(4), gz=False)
    assert _data(root).classes == ["0", "1", "2", "3"]
    path = root / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        _data(root)
    path.write_bytes(b"\x00\x00\x08\x01" + bytes(20))
    with pytest.raises(DataError, match="not an IDX file"):
        _data(root)


def test_train_and_val_subsets_are_class_balanced():
    data = _data(None, train_subset=50)
    labels = [data.train.source.labels[i] for i in range(len(data.train))]
    assert len(labels) == 50 and all(labels.count(c) == 5 for c in range(10))
    assert len(data.val) == 355
    assert "train subset: 50" in data.description
    data = _data(None, val_subset=20)
    assert len(data.train) == 1442 and sorted(data.val.source.labels) == sorted(list(range(10)) * 2)


def test_shipped_linear_reference_is_what_the_bench_computes():
    """The result tables quote this number: it must be what logistic regression really scores on the split."""
    import importlib.util
    import json
    from importlib import resources

    spec = importlib.util.spec_from_file_location("refs", Path(__file__).parents[1] / "bench" / "builtin_references.py")
    refs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(refs)
    shipped = json.loads(resources.files("evcli.data").joinpath("builtin_references.json").read_text())
    assert shipped["linear"]["top1"] == pytest.approx(refs.linear_top1(), abs=0.01)
