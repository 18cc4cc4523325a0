"""Image classification data: ImageFolder layouts, MNIST-style IDX folders and the built-in digits.

Every sample's augmentation is seeded by (run seed, epoch, sample index) (``evcli.data.loading``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from evcli.console import warn
from evcli.data.idx import idx_classes, is_idx_folder, load_idx_split
from evcli.data.loading import mix_seed, seeded_rng
from evcli.errors import DataError
from evcli.io.images import is_image_file, load_rgb, verify_image

BUILTIN_DESCRIPTION = (
    "scikit-learn's digits: 1,797 real 8x8 grayscale scans of handwritten digits 0-9 (UCI "
    "optdigits), shipped inside scikit-learn; every 5th image of each class is held out for val"
)


# --------------------------------------------------------------------------------------------------
# Sources: where images and labels come from


class ImageSource:
    """A list of labelled images that can be loaded by index."""

    classes: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError


class FolderSource(ImageSource):
    """Images under ``root/<class>/...`` (an ImageFolder split)."""

    def __init__(self, root: Path, classes: list[str] | None = None, skip_corrupt: bool = False):
        if not root.is_dir():
            raise DataError(f"data folder not found: {root}")
        found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not found:
            raise DataError(f"no class folders in {root} (expected {root}/<class>/<image>)")
        self.classes = classes if classes is not None else found
        unknown = [c for c in found if c not in self.classes]
        if unknown:
            raise DataError(f"{root} has classes not in train/: {', '.join(unknown[:5])}")
        self.paths: list[Path] = []
        self.labels = []
        for label, name in enumerate(self.classes):
            folder = root / name
            if not folder.is_dir():
                continue
            files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
            self.paths += files
            self.labels += [label] * len(files)
        if not self.paths:
            raise DataError(f"no images found in {root} (looked for .jpg/.png/... under class folders)")
        if skip_corrupt:
            self._drop_corrupt()

    def _drop_corrupt(self) -> None:
        keep = []
        for i, p in enumerate(self.paths):
            reason = verify_image(p)
            if reason is None:
                keep.append(i)
            else:
                warn(f"skipping corrupt image {p} ({reason})")
        if not keep:
            raise DataError("every image is unreadable")
        self.paths = [self.paths[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]

    def load(self, index: int) -> Image.Image:
        try:
            return load_rgb(self.paths[index])
        except DataError as exc:
            if "corrupt" in str(exc):  # a training folder can skip such files
                exc.hint = "fix or remove it, or set data.skip_corrupt=true to skip such files"
            raise


class ArraySource(ImageSource):
    """Images held in memory as a uint8 array [N, H, W] or [N, H, W, 3]."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], classes: list[str]):
        self.images = images
        self.labels = [int(v) for v in labels]
        self.classes = classes

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")


def builtin_digits() -> tuple[ArraySource, ArraySource]:
    """scikit-learn's digits as (train, val): every 5th image of each class goes to val."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
    labels = digits.target.astype(int)
    seen: dict[int, int] = {}
    train_idx, val_idx = [], []
    for i, y in enumerate(labels):
        seen[y] = seen.get(y, 0) + 1
        (val_idx if seen[y] % 5 == 0 else train_idx).append(i)
    classes = [str(c) for c in range(10)]
    return (
        ArraySource(images[train_idx], labels[train_idx], classes),
        ArraySource(images[val_idx], labels[val_idx], classes),
    )


class SubsetSource(ImageSource):
    """The images of another source at the given indices."""

    def __init__(self, source: ImageSource, indices: Sequence[int]):
        self.source = source
        self.indices = list(indices)
        self.classes = source.classes
        self.labels = [source.labels[i] for i in self.indices]

    def load(self, index: int) -> Image.Image:
        return self.source.load(self.indices[index])


def balanced_subset(labels: Sequence[int], size: int) -> list[int]:
    """``size`` indices taking the classes in turn (round robin, each class's images in file order), sorted."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    picked: list[int] = []
    depth = 0
    while len(picked) < size:
        for q in queues:
            if depth < len(q) and len(picked) < size:
                picked.append(q[depth])
        depth += 1
    return sorted(picked)


def idx_sources(root: Path) -> tuple[ArraySource, ArraySource]:
    """An MNIST-style IDX folder (MNIST, Fashion-MNIST) as (train, val = the t10k files)."""
    train_images, train_labels = load_idx_split(root, "train")
    val_images, val_labels = load_idx_split(root, "val")
    classes = idx_classes(root, np.concatenate([train_labels, val_labels]))
    return ArraySource(train_images, train_labels, classes), ArraySource(val_images, val_labels, classes)


# --------------------------------------------------------------------------------------------------
# Dataset and sampler


class SeededDataset(Dataset):
    """Applies a transform with an RNG seeded by (seed, epoch, index); indexed by (epoch, index)."""

    def __init__(self, source: ImageSource, transform: Callable[[Image.Image], Any], seed: int):
        self.source = source
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[Any, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        img = self.source.load(index)
        with seeded_rng(mix_seed(self.seed, epoch, index)):
            x = self.transform(img)
        return x, self.source.labels[index]


# --------------------------------------------------------------------------------------------------
# Building the data of a run


@dataclass
class ClassificationData:
    """Train and val datasets of one run with their class names and a description."""

    train: SeededDataset
    val: SeededDataset
    classes: list[str]
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def build_transforms(cfg: Any, img_size: int, mean: Sequence[float], std: Sequence[float]):
    """timm train/eval transforms for a DataConfig."""
    from timm.data import create_transform

    common = dict(input_size=img_size, interpolation=cfg.interpolation, mean=tuple(mean), std=tuple(std))
    train_tf = create_transform(
        is_training=True,
        scale=tuple(cfg.scale),
        hflip=cfg.hflip,
        auto_augment=cfg.auto_augment,
        color_jitter=cfg.color_jitter,
        re_prob=cfg.re_prob,
        **common,
    )
    eval_tf = create_transform(is_training=False, crop_pct=cfg.crop_pct, **common)
    return train_tf, eval_tf


def build_classification_data(
    cfg: Any, img_size: int, mean: Sequence[float], std: Sequence[float], seed: int, eval_only: bool = False
) -> ClassificationData:
    """Train/val datasets from ``cfg.path`` (ImageFolder with train/ and val/) or the built-in set. With
    ``eval_only``, a plain folder of class subfolders (as timm's validate.py reads) is the val set.

    Raises:
        DataError: missing folder, no class folders, no images, val classes not in train.
    """
    train_tf, eval_tf = build_transforms(cfg, img_size, mean, std)
    idx = cfg.path is not None and is_idx_folder(Path(cfg.path).expanduser())
    plain = cfg.path is not None and eval_only and not idx and Path(cfg.path).expanduser().is_dir()
    if plain and not (Path(cfg.path).expanduser() / "val").is_dir():
        root = Path(cfg.path).expanduser()
        val_src = FolderSource(root, skip_corrupt=cfg.skip_corrupt)
        val = SeededDataset(val_src, eval_tf, seed)
        return ClassificationData(
            train=val,
            val=val,
            classes=val_src.classes,
            description=f"image folder {root}: {len(val_src)} images, {len(val_src.classes)} classes",
        )
    if cfg.path is None:
        train_src, val_src = builtin_digits()
        description = f"built-in digits ({BUILTIN_DESCRIPTION})"
    elif is_idx_folder(Path(cfg.path).expanduser()):
        train_src, val_src = idx_sources(Path(cfg.path).expanduser())
        description = f"MNIST-style IDX folder {Path(cfg.path).expanduser()} (train files / t10k files)"
    else:
        root = Path(cfg.path).expanduser()
        if not root.exists():
            raise DataError(f"data folder not found: {root}")
        if not root.is_dir():
            raise DataError(f"--data must be a folder with train/ and val/ inside, got a file: {root}")
        if not (root / "train").is_dir():
            raise DataError(
                f"no train/ folder in {root} (expected {root}/train/<class>/<image>, or the MNIST-style "
                "train-images-idx3-ubyte[.gz] files)"
            )
        if not (root / "val").is_dir():
            raise DataError(f"no val/ folder in {root} (expected {root}/val/<class>/<image>)")
        train_src = FolderSource(root / "train", skip_corrupt=cfg.skip_corrupt)
        val_src = FolderSource(root / "val", classes=train_src.classes, skip_corrupt=cfg.skip_corrupt)
        description = f"ImageFolder {root}"
    subset = getattr(cfg, "train_subset", None)
    if subset is not None and subset < len(train_src):
        train_src = SubsetSource(train_src, balanced_subset(train_src.labels, subset))
        description += f" (train subset: {subset} images, class-balanced)"
    subset = getattr(cfg, "val_subset", None)
    if subset is not None and subset < len(val_src):
        val_src = SubsetSource(val_src, balanced_subset(val_src.labels, subset))
        description += f" (val subset: {subset} images, class-balanced)"
    return ClassificationData(
        train=SeededDataset(train_src, train_tf, seed),
        val=SeededDataset(val_src, eval_tf, seed),
        classes=train_src.classes,
        description=description + f": {len(train_src)} train / {len(val_src)} val images, "
        f"{len(train_src.classes)} classes",
    )
