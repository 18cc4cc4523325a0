"""Point-cloud data: readers of the standard layouts (ModelNet40 / ScanObjectNN HDF5, S3DIS ``Area_*.npy``, point
files .ply/.npy/.txt), the built-in synthetic sets (clouds sampled from primitive and composite trimesh meshes;
rooms of floor, walls, boxes, columns and balls), voxel subsampling, crops, augmentations, and the collate that
pads variable point counts.

Datasets are indexed by ``(epoch, index)``; every random choice of a sample is seeded by (seed, epoch, index),
so a resumed run sees the same samples (evcli.data.loading).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from evcli.data.loading import mix_seed
from evcli.errors import DataError

IGNORE = -100
S3DIS_CLASSES = [
    "ceiling", "floor", "wall", "beam", "column", "window", "door", "table", "chair", "sofa", "bookcase", "board",
    "clutter",
]  # fmt: skip
# OpenPoints' S3DIS colour statistics (rgb / 255)
COLOR_MEAN = np.array([0.5136457, 0.49523646, 0.44921124], np.float32)
COLOR_STD = np.array([0.18308958, 0.18415008, 0.19252081], np.float32)

SHAPE_CLASSES = [
    "sphere", "box", "cylinder", "cone", "torus", "capsule", "table", "dumbbell", "mushroom", "snowman",
]  # fmt: skip
SCENE_CLASSES = ["floor", "wall", "box", "column", "ball"]


# --------------------------------------------------------------------------------------------------
# reading point files


def check_cloud(points: np.ndarray, source: str, min_columns: int = 3) -> np.ndarray:
    """A float32 (N, C) array with finite coordinates, or a DataError naming the problem."""
    if points.ndim == 1 and points.size:
        points = points.reshape(1, -1)
    if points.ndim != 2 or points.shape[0] == 0:
        raise DataError(f"{source}: no points")
    if points.shape[1] < min_columns:
        raise DataError(f"{source}: {points.shape[1]} columns per point, expected at least {min_columns} (x y z ...)")
    points = points.astype(np.float32, copy=False)
    bad = ~np.isfinite(points[:, :3]).all(1)
    if bad.any():
        raise DataError(
            f"{source}: {int(bad.sum())} point(s) with NaN or infinite coordinates (first at row {int(bad.argmax())})"
        )
    return points


def _read_ply(path: Path) -> np.ndarray:
    """x y z [r g b] [label] of a .ply (ascii or binary) through trimesh."""
    import trimesh

    try:
        loaded = trimesh.load(str(path), process=False)
    except Exception as exc:  # trimesh raises many types on a broken file
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(f"cannot read {path} as a point cloud ({type(exc).__name__}: {detail})") from exc
    xyz = np.asarray(getattr(loaded, "vertices", np.zeros((0, 3))), np.float32)
    cols = [xyz]
    colors = getattr(getattr(loaded, "visual", None), "vertex_colors", None)
    if colors is not None and len(colors) == len(xyz):
        cols.append(np.asarray(colors, np.float32)[:, :3])
    attrs = (getattr(loaded, "metadata", {}) or {}).get("_ply_raw", {}).get("vertex", {}).get("data")
    if attrs is not None and "label" in getattr(attrs, "dtype", np.dtype([])).names:
        cols.append(np.asarray(attrs["label"], np.float32).reshape(-1, 1))
    return np.concatenate(cols, 1) if len(xyz) else np.zeros((0, 3), np.float32)


def read_cloud(path: str | Path) -> np.ndarray:
    """A point file as a float32 (N, C) array: .npy (never pickled), .txt/.xyz/.csv (whitespace or comma
    separated), .ply. Columns: x y z [r g b] [label]."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"point file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        elif suffix in (".txt", ".xyz", ".csv", ".pts"):
            if p.stat().st_size == 0:
                raise DataError(f"{p}: empty file")
            text = p.read_text(encoding="utf-8", errors="strict").replace(",", " ")
            rows = [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
            widths = {len(r) for r in rows}
            if len(widths) > 1:
                raise DataError(f"{p}: rows have different numbers of columns ({', '.join(map(str, sorted(widths)))})")
            arr = np.array(rows, dtype=np.float32) if rows else np.zeros((0, 3), np.float32)
        elif suffix == ".ply":
            arr = _read_ply(p)
        else:
            raise DataError(f"{p}: unknown point file type {suffix!r} (use .ply, .npy or .txt)")
    except DataError:
        raise
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {p}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"{p}: not a numeric array ({arr.dtype})")
    return check_cloud(np.asarray(arr), str(p))


# --------------------------------------------------------------------------------------------------
# sampling, voxels, crops


def sample_points(points: np.ndarray, n: int, rng: np.random.Generator, source: str = "cloud") -> np.ndarray:
    """``n`` rows of ``points``: a random subset, or all rows plus rows drawn with replacement when the cloud
    has fewer (with a warning once per source)."""
    if len(points) >= n:
        return points[rng.choice(len(points), n, replace=False)]
    _warn_once(f"{source} has {len(points)} points, fewer than the {n} asked for: repeating points")
    extra = rng.choice(len(points), n - len(points), replace=True)
    return np.concatenate([points, points[extra]])


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message in _WARNED:
        return
    _WARNED.add(message)
    from evcli.console import warn

    warn(message)


def fnv_hash(keys: np.ndarray) -> np.ndarray:
    """FNV-1a 64-bit hash of integer rows (voxel coordinates)."""
    keys = keys.astype(np.uint64)
    h = np.full(len(keys), np.uint64(14695981039346656037), np.uint64)
    for j in range(keys.shape[1]):
        h = np.bitwise_xor(h, keys[:, j])
        h = h * np.uint64(1099511628211)
    return h


def voxelize(coord: np.ndarray, voxel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Points sorted by voxel (``floor((coord - min) / voxel)``, FNV-1a hash): (sort order, points per voxel)."""
    grid = np.floor((coord - coord.min(0)) / voxel_size).astype(np.int64)
    with np.errstate(over="ignore"):
        keys = fnv_hash(grid)
    order = np.argsort(keys, kind="stable")
    _, counts = np.unique(keys[order], return_counts=True)
    return order, counts


def voxel_sample(coord: np.ndarray, voxel_size: float, rng: np.random.Generator | None) -> np.ndarray:
    """One point per voxel: a random one (training, ``rng``) or the first in sort order (``rng`` None)."""
    order, counts = voxelize(coord, voxel_size)
    starts = np.cumsum(counts) - counts
    pick = starts + (rng.integers(0, counts) if rng is not None else 0)
    return order[pick]


def voxel_passes(coord: np.ndarray, voxel_size: float) -> list[np.ndarray]:
    """Index sets covering every point: pass i takes the (i mod count)-th point of each voxel, for
    ``max(count)`` passes (OpenPoints' full-scene test)."""
    order, counts = voxelize(coord, voxel_size)
    starts = np.cumsum(counts) - counts
    return [order[starts + (i % counts)] for i in range(int(counts.max()))]


def crop_around(coord: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the ``n`` points nearest to a random point (all points when there are fewer)."""
    if len(coord) <= n:
        return np.arange(len(coord))
    seed = coord[rng.integers(len(coord))]
    d = ((coord - seed) ** 2).sum(1)
    return np.sort(np.argpartition(d, n - 1)[:n])


# --------------------------------------------------------------------------------------------------
# augmentation and features


@dataclass
class Augment:
    """Training augmentations (the card's per-dataset settings)."""

    scale: tuple[float, float] = (0.9, 1.1)
    anisotropic: bool = True
    rotate: str = "z"  # z | y | none: random rotation about that axis (full circle)
    jitter: tuple[float, float] = (0.005, 0.02)  # sigma, clip (0: none)
    shift: float = 0.0  # random translation in [-shift, shift]
    color_drop: float = 0.0
    auto_contrast: bool = False


def augment_xyz(xyz: np.ndarray, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    s = rng.uniform(aug.scale[0], aug.scale[1], 3 if aug.anisotropic else 1).astype(np.float32)
    xyz = xyz * s
    if aug.rotate in ("z", "y"):
        a = rng.uniform(-math.pi, math.pi)
        c, sn = math.cos(a), math.sin(a)
        if aug.rotate == "z":
            rot = np.array([[c, -sn, 0], [sn, c, 0], [0, 0, 1]], np.float32)
        else:
            rot = np.array([[c, 0, sn], [0, 1, 0], [-sn, 0, c]], np.float32)
        xyz = xyz @ rot.T
    if aug.jitter[0] > 0:
        xyz = xyz + np.clip(rng.normal(0, aug.jitter[0], xyz.shape), -aug.jitter[1], aug.jitter[1]).astype(np.float32)
    if aug.shift > 0:
        xyz = xyz + rng.uniform(-aug.shift, aug.shift, 3).astype(np.float32)
    return xyz.astype(np.float32)


def augment_rgb(rgb: np.ndarray, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """rgb in 0..255: random auto-contrast (p 0.2, blend), then drop all colour with ``color_drop``."""
    if aug.auto_contrast and rng.random() < 0.2:
        lo, hi = rgb.min(0, keepdims=True), rgb.max(0, keepdims=True)
        stretched = (rgb - lo) * (255.0 / np.maximum(hi - lo, 1e-6))
        blend = rng.random()
        rgb = (1 - blend) * rgb + blend * stretched
    if aug.color_drop > 0 and rng.random() < aug.color_drop:
        rgb = np.zeros_like(rgb)
    return rgb


def normalize_rgb(rgb: np.ndarray) -> np.ndarray:
    return ((rgb / 255.0 - COLOR_MEAN) / COLOR_STD).astype(np.float32)


def center_normalize(xyz: np.ndarray) -> np.ndarray:
    """Centre at the mean and scale into the unit sphere (ScanObjectNN's PointsToTensor + normalisation)."""
    xyz = xyz - xyz.mean(0)
    r = float(np.sqrt((xyz**2).sum(1)).max())
    return (xyz / max(r, 1e-9)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# built-in data


def _shape_mesh(name: str, rng: np.random.Generator) -> Any:
    """One random instance of a built-in shape class (trimesh primitives and compositions), y up."""
    import trimesh
    from trimesh.creation import box, capsule, cone, cylinder, icosphere, torus

    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    up = trimesh.transformations.rotation_matrix(-math.pi / 2, [1, 0, 0])  # trimesh's z-up primitives -> y up

    def at(mesh: Any, x: float = 0.0, y: float = 0.0, z: float = 0.0) -> Any:
        mesh.apply_translation([x, y, z])
        return mesh

    if name == "sphere":
        parts = [icosphere(2, radius=u(0.6, 1.0))]
    elif name == "box":
        parts = [box([u(0.5, 1.5), u(0.5, 1.5), u(0.5, 1.5)])]
    elif name == "cylinder":
        parts = [cylinder(u(0.3, 0.6), u(1.0, 2.0), sections=24).apply_transform(up)]
    elif name == "cone":
        parts = [cone(u(0.4, 0.8), u(1.0, 1.8), sections=24).apply_transform(up)]
    elif name == "torus":
        parts = [torus(u(0.6, 0.9), u(0.15, 0.3))]
    elif name == "capsule":
        parts = [capsule(u(0.8, 1.6), u(0.25, 0.45)).apply_transform(up)]
    elif name == "table":
        w, d, h = u(1.2, 2.0), u(0.8, 1.2), u(0.7, 1.1)
        parts = [at(box([w, 0.08, d]), y=h)]
        for sx in (-1, 1):
            for sz in (-1, 1):
                parts.append(
                    at(
                        cylinder(0.05, h, sections=10).apply_transform(up),
                        sx * (w / 2 - 0.1),
                        h / 2,
                        sz * (d / 2 - 0.1),
                    )
                )
    elif name == "dumbbell":
        length, r = u(1.2, 2.0), u(0.25, 0.4)
        bar = cylinder(0.08, length, sections=12).apply_transform(
            trimesh.transformations.rotation_matrix(math.pi / 2, [0, 1, 0])
        )
        parts = [bar, at(icosphere(2, radius=r), x=-length / 2), at(icosphere(2, radius=r), x=length / 2)]
    elif name == "mushroom":
        stem_h = u(0.6, 1.0)
        cap = icosphere(2, radius=u(0.5, 0.8))
        cap.vertices[:, 1] = np.maximum(cap.vertices[:, 1], 0.0) * 0.7
        parts = [at(cylinder(u(0.1, 0.2), stem_h, sections=16).apply_transform(up), y=stem_h / 2), at(cap, y=stem_h)]
    elif name == "snowman":
        r1, r2 = u(0.5, 0.7), u(0.3, 0.45)
        parts = [at(icosphere(2, radius=r1), y=r1), at(icosphere(2, radius=r2), y=2 * r1 + r2 * 0.8)]
    else:
        raise ValueError(name)
    return trimesh.util.concatenate(parts)


def builtin_shape_cloud(cls: int, n_points: int, seed: int) -> np.ndarray:
    """Surface points (n, 3) of one random instance of built-in shape class ``cls``, y up, random yaw."""
    import trimesh

    rng = np.random.default_rng(seed)
    mesh = _shape_mesh(SHAPE_CLASSES[cls], rng)
    pts, _ = trimesh.sample.sample_surface(mesh, n_points, seed=int(rng.integers(2**31)))
    yaw = rng.uniform(-math.pi, math.pi)
    c, s = math.cos(yaw), math.sin(yaw)
    rot = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return (np.asarray(pts) @ rot.T).astype(np.float32)


def builtin_scene(seed: int, n_points: int) -> np.ndarray:
    """A synthetic room as an (n, 7) array like S3DIS (x, y, z, r, g, b 0..255, label; z up): floor, walls,
    boxes, columns and balls, each with its own noisy colour."""
    import trimesh
    from trimesh.creation import box, cylinder, icosphere

    rng = np.random.default_rng(seed)
    w, d, h = rng.uniform(3.0, 5.0), rng.uniform(3.0, 5.0), 2.6
    meshes: list[tuple[Any, int]] = [(box([w, d, 0.02]), 0)]
    meshes[0][0].apply_translation([w / 2, d / 2, 0])
    for x0, y0, sx, sy in ((w / 2, 0, w, 0.02), (w / 2, d, w, 0.02), (0, d / 2, 0.02, d), (w, d / 2, 0.02, d)):
        wall = box([sx, sy, h])
        wall.apply_translation([x0, y0, h / 2])
        meshes.append((wall, 1))
    for _ in range(int(rng.integers(1, 4))):
        bw, bd, bh = rng.uniform(0.4, 1.0, 3)
        b = box([bw, bd, bh])
        b.apply_translation([rng.uniform(0.6, w - 0.6), rng.uniform(0.6, d - 0.6), bh / 2])
        meshes.append((b, 2))
    for _ in range(int(rng.integers(1, 3))):
        c = cylinder(rng.uniform(0.1, 0.25), h, sections=16)
        c.apply_translation([rng.uniform(0.3, w - 0.3), rng.uniform(0.3, d - 0.3), h / 2])
        meshes.append((c, 3))
    for _ in range(int(rng.integers(1, 4))):
        r = rng.uniform(0.15, 0.35)
        s = icosphere(2, radius=r)
        s.apply_translation([rng.uniform(0.5, w - 0.5), rng.uniform(0.5, d - 0.5), r])
        meshes.append((s, 4))
    areas = np.array([m.area for m, _ in meshes])
    counts = np.maximum(1, np.round(areas / areas.sum() * n_points)).astype(int)
    palette = rng.uniform(40, 215, (len(SCENE_CLASSES), 3))
    rows = []
    for (mesh, label), k in zip(meshes, counts):
        pts, _ = trimesh.sample.sample_surface(mesh, int(k), seed=int(rng.integers(2**31)))
        rgb = np.clip(palette[label] + rng.normal(0, 20, (len(pts), 3)), 0, 255)
        rows.append(np.concatenate([pts, rgb, np.full((len(pts), 1), label)], 1))
    scene = np.concatenate(rows).astype(np.float32)
    scene[:, :3] += rng.normal(0, 0.005, (len(scene), 3)).astype(np.float32)
    return scene


# --------------------------------------------------------------------------------------------------
# datasets


def _key(key: tuple[int, int] | int) -> tuple[int, int]:
    return key if isinstance(key, tuple) else (0, int(key))


@dataclass
class ClsSettings:
    num_points: int = 1024
    features: str = "xyz"  # xyz | xyz_height
    height_axis: int = 1  # gravity axis of the height feature (y for ModelNet / ScanObjectNN)
    center_normalize: bool = False
    augment: Augment | None = None
    seed: int = 0
    train_first_points: bool = False  # the first num_points in a random order (ModelNet40), else a random subset


class ClassificationClouds(Dataset):
    """Clouds (n, P, 3) with labels; a sample is ``num_points`` points (a seeded random subset each epoch in
    training, the first ``num_points`` in evaluation, as the ModelNet40 loader), augmented in training.

    Item: ``{"pos": (P, 3), "x": (C, P), "y": ()}``.
    """

    def __init__(self, clouds: np.ndarray, labels: np.ndarray, settings: ClsSettings, train: bool, name: str):
        self.clouds, self.labels, self.s, self.train, self.name = clouds, labels.astype(np.int64), settings, train, name

    def __len__(self) -> int:
        return len(self.clouds)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, torch.Tensor]:
        epoch, i = _key(key)
        pts = self.clouds[i]
        s = self.s
        if self.train:
            rng = np.random.default_rng(mix_seed(s.seed, epoch, i, 0xC1))
            if s.train_first_points and len(pts) >= s.num_points:
                xyz = pts[: s.num_points][rng.permutation(s.num_points)]
            else:
                xyz = sample_points(pts, s.num_points, rng, self.name)
            if s.center_normalize:
                xyz = center_normalize(xyz)
            if s.augment is not None:
                xyz = augment_xyz(xyz, s.augment, rng)
        else:
            xyz = (
                pts[: s.num_points]
                if len(pts) >= s.num_points
                else sample_points(pts, s.num_points, np.random.default_rng(i), self.name)
            )
            if s.center_normalize:
                xyz = center_normalize(xyz)
        return cls_item(xyz, int(self.labels[i]), s)


def cls_features(xyz: np.ndarray, features: str, height_axis: int) -> np.ndarray:
    """Input features (C, P): xyz, or xyz plus height above the lowest point along ``height_axis``."""
    if features == "xyz":
        return xyz.T.copy()
    height = xyz[:, height_axis : height_axis + 1] - xyz[:, height_axis].min()
    return np.concatenate([xyz, height], 1).T.copy()


def cls_item(xyz: np.ndarray, label: int, s: ClsSettings) -> dict[str, torch.Tensor]:
    xyz = np.ascontiguousarray(xyz, np.float32)
    return {
        "pos": torch.from_numpy(xyz),
        "x": torch.from_numpy(cls_features(xyz, s.features, s.height_axis)),
        "y": torch.tensor(label, dtype=torch.long),
    }


@dataclass
class SegSettings:
    voxel_size: float = 0.04
    voxel_max: int = 24000
    loop: int = 30
    features: str = "rgb_height"  # rgb_height (4) | xyz_rgb_height (7)
    height_axis: int = 2
    augment: Augment | None = None
    num_classes: int = 13
    seed: int = 0


def seg_features(xyz: np.ndarray, rgb: np.ndarray, features: str, height_axis: int) -> np.ndarray:
    """(C, N) input features: normalised rgb and height (``z - min z``), with xyz first for ``xyz_rgb_height``."""
    height = xyz[:, height_axis : height_axis + 1] - xyz[:, height_axis].min()
    cols = [normalize_rgb(rgb), height]
    if features == "xyz_rgb_height":
        cols.insert(0, xyz)
    return np.concatenate(cols, 1).T.astype(np.float32).copy()


def check_labels(labels: np.ndarray, num_classes: int, source: str) -> np.ndarray:
    lab = labels.astype(np.int64)
    bad = (lab < 0) | (lab >= num_classes)
    if bad.any():
        raise DataError(f"{source}: label {int(lab[bad][0])} outside the class range 0..{num_classes - 1}")
    return lab


class SegmentationRooms(Dataset):
    """Rooms (N, 7): training samples are voxel-subsampled (a random point per voxel), cropped to
    ``voxel_max`` points around a random point, shifted to the origin and augmented, ``loop`` times per
    room per epoch; evaluation samples are whole rooms voxel-subsampled once (``mode="voxel"``) or with
    every original point (``mode="full"``, for multi-pass inference).

    Item: ``{"pos": (N, 3), "x": (C, N), "y": (N,)}`` (full mode adds ``"room"``: the index).
    """

    def __init__(self, rooms: list[np.ndarray], names: list[str], s: SegSettings, train: bool, mode: str = "voxel"):
        self.rooms, self.names, self.s, self.train, self.mode = rooms, names, s, train, mode
        for room, name in zip(rooms, names):
            check_labels(room[:, 6], s.num_classes, name)

    def __len__(self) -> int:
        return len(self.rooms) * (self.s.loop if self.train else 1)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, torch.Tensor]:
        epoch, i = _key(key)
        room = self.rooms[i % len(self.rooms)]
        s = self.s
        if self.train:
            rng = np.random.default_rng(mix_seed(s.seed, epoch, i, 0x5E6))
            pick = voxel_sample(room[:, :3], s.voxel_size, rng)
            sub = room[pick]
            sub = sub[crop_around(sub[:, :3], s.voxel_max, rng)]
            xyz = sub[:, :3] - sub[:, :3].min(0)
            rgb = sub[:, 3:6]
            if s.augment is not None:
                xyz = augment_xyz(xyz, s.augment, rng)
                rgb = augment_rgb(rgb, s.augment, rng)
        elif self.mode == "voxel":
            sub = room[voxel_sample(room[:, :3], s.voxel_size, None)]
            xyz, rgb = sub[:, :3] - sub[:, :3].min(0), sub[:, 3:6]
        else:
            return {"room": torch.tensor(i), "points": torch.from_numpy(room)}
        return {
            "pos": torch.from_numpy(np.ascontiguousarray(xyz, np.float32)),
            "x": torch.from_numpy(seg_features(xyz, rgb, s.features, s.height_axis)),
            "y": torch.from_numpy(sub[:, 6].astype(np.int64)),
        }


def collate_points(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples of different point counts: shorter clouds are padded to the longest with copies of their
    own points (evenly spread), whose labels are ``IGNORE`` so that losses and metrics skip them."""
    if "points" in samples[0]:
        return {"room": torch.stack([s["room"] for s in samples]), "points": [s["points"] for s in samples]}
    n = max(s["pos"].shape[0] for s in samples)
    pos, x, y = [], [], []
    for s in samples:
        k = s["pos"].shape[0]
        if k < n:
            extra = torch.arange(n - k) % k
            pos.append(torch.cat([s["pos"], s["pos"][extra]]))
            x.append(torch.cat([s["x"], s["x"][:, extra]], 1))
            if s["y"].dim():
                y.append(torch.cat([s["y"], torch.full((n - k,), IGNORE, dtype=torch.long)]))
            else:
                y.append(s["y"])
        else:
            pos.append(s["pos"])
            x.append(s["x"])
            y.append(s["y"])
    return {"pos": torch.stack(pos), "x": torch.stack(x), "y": torch.stack(y)}


# --------------------------------------------------------------------------------------------------
# readers of the standard layouts


def read_h5_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """ModelNet40 (``modelnet40_ply_hdf5_2048/ply_data_{train,test}*.h5``) or ScanObjectNN
    (``h5_files/main_split/{training,test}_objectdataset_augmentedrot_scale75.h5``) HDF5 files with ``data``
    (n, P, 3) and ``label`` (n, 1)."""
    import h5py

    words = ("train",) if split == "train" else ("test",)
    files = sorted(p for p in root.rglob("*.h5") if any(w in p.name for w in words))
    preferred = [p for p in files if "augmentedrot_scale75" in p.name]
    if preferred:
        files = preferred
    elif any("objectdataset" in p.name for p in files):
        files = [p for p in files if p.name.startswith(("training_objectdataset.", "test_objectdataset."))] or files
    if not files:
        raise DataError(f"no {split} .h5 files under {root}", hint="expected ModelNet40 or ScanObjectNN HDF5 files")
    data, labels = [], []
    for f in files:
        try:
            with h5py.File(f, "r") as h:
                if "data" not in h or "label" not in h:
                    raise DataError(f"{f}: needs datasets 'data' and 'label'")
                data.append(np.asarray(h["data"][:, :, :3], np.float32))
                labels.append(np.asarray(h["label"]).reshape(-1).astype(np.int64))
        except OSError as exc:
            raise DataError(f"cannot read {f}: {exc}") from exc
    d, lab = np.concatenate(data), np.concatenate(labels)
    if not np.isfinite(d).all():
        raise DataError(f"{root}: NaN or infinite coordinates in the {split} files")
    return d, lab, files


def read_s3dis(
    root: Path, test_area: int, with_train: bool = True
) -> tuple[list[np.ndarray], list[str], list[np.ndarray], list[str]]:
    """``<root>/raw/Area_{1..6}_<room>.npy`` (or directly in root): N x 7 float (xyz, rgb 0..255, label)."""
    folder = root / "raw" if (root / "raw").is_dir() else root
    files = sorted(folder.glob("Area_*.npy"))
    if not files:
        raise DataError(
            f"no Area_*.npy rooms in {folder}", hint="S3DIS as PointNeXt prepares it: <root>/raw/Area_5_office_1.npy"
        )
    train, train_names, val, val_names = [], [], [], []
    for f in files:
        is_val = f.name.startswith(f"Area_{test_area}_")
        if not is_val and not with_train:
            continue
        try:
            room = np.load(f, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"cannot read {f}: {exc}") from exc
        if room.ndim != 2 or room.shape[1] < 7:
            raise DataError(f"{f}: expected N x 7 (x y z r g b label), got shape {room.shape}")
        room = check_cloud(room[:, :7], str(f), 7)
        target = (val, val_names) if is_val else (train, train_names)
        target[0].append(room)
        target[1].append(f.stem)
    if not val:
        raise DataError(f"no rooms of Area_{test_area} in {folder} (the test area)")
    return train, train_names, val, val_names


@dataclass
class PointData:
    """What the engine needs: train and val datasets, a description, the collate and the class names."""

    train: Dataset
    val: Any
    description: str
    classes: list[str]
    collate_fn: Any = field(default=collate_points)
