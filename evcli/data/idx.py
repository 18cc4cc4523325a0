"""MNIST-style IDX folders (MNIST, Fashion-MNIST, KMNIST): the four files as their publishers ship them.

A folder holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``). The train files are the train split and the t10k
files the val split. Format: big-endian; images after a 16-byte header (magic 0x00000803, count, rows, cols),
labels after an 8-byte header (magic 0x00000801, count).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from evcli.errors import DataError

SPLITS = {"train": "train", "val": "t10k"}
FASHION_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
]  # fmt: skip


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def is_idx_folder(root: Path) -> bool:
    """True when ``root`` holds at least the train images file of an IDX dataset."""
    return root.is_dir() and _find(root, "train-images-idx3-ubyte") is not None


def _read(path: Path, magic: int, header: int) -> tuple[np.ndarray, tuple[int, ...]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(data) < header or struct.unpack(">I", data[:4])[0] != magic:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dims = struct.unpack(">" + "I" * ((header - 4) // 4), data[4:header])
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DataError(f"{path} is truncated: {len(data) - header} bytes of data, header says {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header), dims


def load_idx_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, rows, cols] uint8 and labels [N] int64 of ``split`` ("train" or "val" = t10k)."""
    prefix = SPLITS[split]
    img_path = _find(root, f"{prefix}-images-idx3-ubyte")
    lab_path = _find(root, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lab_path is None:
        missing = f"{prefix}-images-idx3-ubyte" if img_path is None else f"{prefix}-labels-idx1-ubyte"
        raise DataError(f"{root} has no {missing}[.gz] (an MNIST-style folder needs the four IDX files)")
    flat, (n, rows, cols) = _read(img_path, 0x00000803, 16)
    labels, (m,) = _read(lab_path, 0x00000801, 8)
    if n != m:
        raise DataError(f"{root}: {n} images but {m} labels in the {prefix} files")
    return flat.reshape(n, rows, cols), labels.astype(np.int64)


def idx_classes(root: Path, labels: np.ndarray) -> list[str]:
    """Class names: a ``classes.txt`` (one per line) if present, Fashion-MNIST's names for a folder named so,
    else the label numbers."""
    n = int(labels.max()) + 1 if labels.size else 0
    listed = root / "classes.txt"
    if listed.is_file():
        names = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
        if len(names) < n:
            raise DataError(f"{listed} names {len(names)} classes but the labels go up to {n - 1}")
        return names
    if "fashion" in root.resolve().name.lower() and n <= len(FASHION_CLASSES):
        return FASHION_CLASSES[: max(n, 10)]
    return [str(i) for i in range(max(n, 1))]
