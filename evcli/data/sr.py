"""Super-resolution data: HR images with bicubic LR made on the fly (random HR patches, flips, transposes),
the standard SR folder layouts, and the built-in photo sets.

Layouts read by :func:`build_sr_data`:

* training (``data.path``): a DIV2K root (``DIV2K_train_HR/``, optionally ``DIV2K_train_LR_bicubic/X<s>/``
  with ``<id>x<s>.png``), a folder with ``HR/`` (optionally ``LR_bicubic/X<s>/``), or a plain folder of HR
  images;
* evaluation (``quant-sr.benchmark``, default ``data.path/benchmark`` or ``data.path/../benchmark``): one
  subfolder per set (Set5, Set14, B100, Urban100), each ``HR/`` (+ ``LR_bicubic/X<s>/``) or a plain folder of
  HR images. Every set found is one named val set.

Bicubic LR (no LR folder): antialiased bicubic downsampling (PyTorch's ``antialias=True``, the kernel MATLAB's
``imresize`` uses) of the HR image cropped to a multiple of the scale, rounded to 8 bits. Training patches
are downsampled patch by patch (borders differ slightly from downsampling the whole image).

Built-in data (no ``data.path``): real photos shipped in pip packages. Training: scikit-image's astronaut,
chelsea, rocket, camera, coins, brick, grass, gravel, immunohistochemistry, hubble_deep_field and
scikit-learn's china.jpg; held out (never trained on): scikit-image's coffee, scikit-learn's flower.jpg and
matplotlib's grace_hopper.jpg.

Samples are dicts ``{"lr": [3, h, w], "hr": [3, h*s, w*s]}`` in [0, 1], indexed by ``(epoch, index)`` keys;
a training sample's randomness comes from ``mix_seed(seed, epoch, index)``.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from evcli.data.loading import mix_seed
from evcli.errors import DataError
from evcli.io.images import is_image_file, load_rgb

BUILTIN_TRAIN = (
    "astronaut", "chelsea", "rocket", "camera", "coins", "brick", "grass", "gravel",
    "immunohistochemistry", "hubble_deep_field", "china",
)  # fmt: skip
BUILTIN_HELD_OUT = ("coffee", "flower", "grace_hopper")
BUILTIN_DESCRIPTION = (
    "built-in photos: scikit-image (astronaut, chelsea, rocket, camera, coins, brick, grass, gravel, "
    "immunohistochemistry, hubble_deep_field) and scikit-learn china.jpg for training; held out: scikit-image "
    "coffee, scikit-learn flower.jpg, matplotlib grace_hopper.jpg; bicubic LR made on the fly"
)


@functools.lru_cache(maxsize=32)
def builtin_image(name: str) -> np.ndarray:
    """One built-in photo as uint8 [H, W, 3] (cached: scikit-learn's decode of china.jpg takes seconds)."""
    if name == "grace_hopper":
        import matplotlib.cbook as cbook

        return np.asarray(load_rgb(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    if name in ("china", "flower"):  # scikit-learn's sample photos, read from its package without importing it
        import importlib.util

        spec = importlib.util.find_spec("sklearn")
        if spec is not None and spec.submodule_search_locations:
            path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "images" / f"{name}.jpg"
            if path.is_file():
                return np.asarray(load_rgb(path))
    from evcli.data.shadow import builtin_photo

    return builtin_photo(name)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).float() / 255.0


def modcrop(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Crop [.., H, W] to multiples of ``scale`` (bottom / right)."""
    h, w = hr.shape[-2:]
    return hr[..., : h - h % scale, : w - w % scale]


def bicubic_down(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Antialiased bicubic downsampling of [3, H, W] or [N, 3, H, W] (H, W multiples of scale), 8-bit rounded."""
    x = hr[None] if hr.dim() == 3 else hr
    lr = F.interpolate(
        x, size=(x.shape[-2] // scale, x.shape[-1] // scale), mode="bicubic", antialias=True, align_corners=False
    )
    lr = (lr.clamp(0, 1) * 255.0).round() / 255.0
    return lr[0] if hr.dim() == 3 else lr


def bicubic_up(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """The bicubic baseline: [N, 3, h, w] -> [N, 3, h*s, w*s] in [0, 1]."""
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)


def augment(lr: torch.Tensor, hr: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Random h-flip, v-flip and transpose, the same for LR and HR (EDSR's augmentation)."""
    if rng.random() < 0.5:
        lr, hr = lr.flip(-1), hr.flip(-1)
    if rng.random() < 0.5:
        lr, hr = lr.flip(-2), hr.flip(-2)
    if rng.random() < 0.5:
        lr, hr = lr.transpose(-1, -2), hr.transpose(-1, -2)
    return lr.contiguous(), hr.contiguous()


@dataclass
class SRImage:
    """One HR image source (a file or a built-in photo) and its LR file, if the layout has one."""

    name: str
    read: Callable[[], torch.Tensor]  # -> HR [3, H, W] in [0, 1]
    lr_path: Path | None = None
    size: tuple[int, int] | None = None  # (width, height) when known without decoding


def _file_reader(path: Path) -> Callable[[], torch.Tensor]:
    return lambda: to_tensor(np.asarray(load_rgb(path)))


def read_lr(path: Path) -> torch.Tensor:
    return to_tensor(np.asarray(load_rgb(path)))


class SRTrainDataset(Dataset):
    """Random HR patches (``patch`` px) with their LR, ``repeat`` patches per image per epoch."""

    def __init__(
        self,
        images: list[SRImage],
        scale: int,
        patch: int,
        repeat: int,
        do_augment: bool,
        seed: int,
        cache: bool = False,
    ):
        self.images, self.scale, self.patch, self.repeat = images, scale, patch, repeat
        self.do_augment, self.seed = do_augment, seed
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None
        for item in images:  # refuse too-small images before training starts, not in a loader worker
            if item.size is not None and min(item.size) < patch:
                raise DataError(
                    f"HR image {item.name} ({item.size[0]}x{item.size[1]}) is smaller than the HR patch size {patch}",
                    hint="lower --patch-size (data.img_size) or remove the image",
                )

    def __len__(self) -> int:
        return len(self.images) * self.repeat

    def _hr(self, i: int) -> torch.Tensor:
        if self.cache is not None and i in self.cache:
            return self.cache[i].float() / 255.0
        hr = modcrop(self.images[i].read(), self.scale)
        if self.cache is not None:  # kept as 8-bit: a quarter of the memory of float
            self.cache[i] = (hr * 255.0).round().to(torch.uint8)
        return hr

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = key
        i = index % len(self.images)
        item = self.images[i]
        hr = self._hr(i)
        s, p = self.scale, self.patch
        h, w = hr.shape[-2:]
        if h < p or w < p:
            raise DataError(
                f"HR image {item.name} ({w}x{h}) is smaller than the HR patch size {p}",
                hint="lower --patch-size (data.img_size) or remove the image",
            )
        rng = random.Random(mix_seed(self.seed, epoch, index))
        ly, lx = rng.randrange(0, (h - p) // s + 1), rng.randrange(0, (w - p) // s + 1)
        hr_patch = hr[:, ly * s : ly * s + p, lx * s : lx * s + p]
        if item.lr_path is not None:
            lr_full = read_lr(item.lr_path)
            lr_patch = lr_full[:, ly : ly + p // s, lx : lx + p // s]
        else:
            lr_patch = bicubic_down(hr_patch, s)
        if self.do_augment:
            lr_patch, hr_patch = augment(lr_patch, hr_patch, rng)
        return {"lr": lr_patch, "hr": hr_patch}


class SREvalDataset(Dataset):
    """Whole images (or centre crops of ``crop`` px): HR cropped to a multiple of the scale, LR from the
    layout's LR file or made by bicubic downsampling."""

    def __init__(self, images: list[SRImage], scale: int, crop: int | None = None):
        self.images, self.scale, self.crop = images, scale, crop
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, torch.Tensor]:
        index = key[1] if isinstance(key, tuple) else key
        if index in self._cache:
            return self._cache[index]
        item = self.images[index]
        s = self.scale
        hr = modcrop(item.read(), s)
        lr = read_lr(item.lr_path) if item.lr_path is not None else None
        if lr is not None and tuple(lr.shape[-2:]) != (hr.shape[-2] // s, hr.shape[-1] // s):
            raise DataError(
                f"LR image {item.lr_path} is {lr.shape[-1]}x{lr.shape[-2]}, expected "
                f"{hr.shape[-1] // s}x{hr.shape[-2] // s} for its HR image at x{s}"
            )
        if self.crop is not None:
            c = self.crop - self.crop % s
            h, w = hr.shape[-2:]
            ch, cw = min(c, h), min(c, w)
            y0, x0 = ((h - ch) // 2) // s * s, ((w - cw) // 2) // s * s
            hr = hr[:, y0 : y0 + ch, x0 : x0 + cw]
            if lr is not None:
                lr = lr[:, y0 // s : (y0 + ch) // s, x0 // s : (x0 + cw) // s]
        if lr is None:
            lr = bicubic_down(hr, s)
        if min(lr.shape[-2:]) < 2:
            raise DataError(f"image {item.name} is too small for x{s} ({hr.shape[-1]}x{hr.shape[-2]})")
        sample = {"lr": lr.contiguous(), "hr": hr.contiguous()}
        if len(self._cache) < 64:
            self._cache[index] = sample
        return sample


@dataclass
class SRData:
    train: Any
    val: dict[str, Any]
    description: str
    sets: dict[str, int] = field(default_factory=dict)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def _lr_for(hr: Path, lr_dir: Path | None, scale: int) -> Path | None:
    if lr_dir is None:
        return None
    for name in (f"{hr.stem}x{scale}{hr.suffix}", f"{hr.stem}x{scale}.png", hr.name):
        if (lr_dir / name).is_file():
            return lr_dir / name
    raise DataError(f"no LR image for {hr.name} in {lr_dir} (looked for {hr.stem}x{scale}.png)")


def folder_images(root: Path, scale: int, hr_names: tuple[str, ...], lr_names: tuple[str, ...]) -> list[SRImage]:
    """The HR images (and their LR files) of one SR folder in any of the standard layouts."""
    hr_dir, lr_dir = root, None
    for name in hr_names:
        if (root / name).is_dir():
            hr_dir = root / name
            break
    for name in lr_names:
        cand = root / name / f"X{scale}"
        if cand.is_dir():
            lr_dir = cand
            break
    files = _images_in(hr_dir)
    if not files:
        raise DataError(f"no HR images in {hr_dir} (looked for .png/.jpg/... files)")
    return [SRImage(p.name, _file_reader(p), _lr_for(p, lr_dir, scale), _header_size(p)) for p in files]


def _header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file header (no decoding); None when unreadable (the loader reports it)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except Exception:
        return None


def builtin_sets(scale: int, val_crop: int | None) -> tuple[list[SRImage], list[SRImage]]:
    def reader(name: str) -> Callable[[], torch.Tensor]:
        return lambda: to_tensor(builtin_image(name))

    train = [SRImage(n, reader(n)) for n in BUILTIN_TRAIN]
    held = [SRImage(n, reader(n)) for n in BUILTIN_HELD_OUT]
    return train, held


def find_benchmark(recipe: Any) -> Path | None:
    cfg = recipe.method
    if cfg.benchmark:
        p = Path(cfg.benchmark).expanduser()
        if not p.is_dir():
            raise DataError(f"benchmark folder not found: {p}")
        return p
    if recipe.data.path:
        root = Path(recipe.data.path)
        for cand in (root / "benchmark", root.parent / "benchmark"):
            if cand.is_dir():
                return cand
    return None


def benchmark_sets(root: Path, names: list[str], scale: int, crop: int | None) -> dict[str, SREvalDataset]:
    """The named sets found under a benchmark root (``HR/`` + ``LR_bicubic/X<s>/`` or plain HR folders)."""
    found = {}
    for name in names:
        folder = root / name
        if folder.is_dir():
            found[name] = SREvalDataset(folder_images(folder, scale, ("HR",), ("LR_bicubic",)), scale, crop)
    if not found:
        raise DataError(f"none of the evaluation sets {', '.join(names)} is in {root}")
    return found


def build_sr_data(recipe: Any, training: bool = True) -> SRData:
    """Training and evaluation data of a ``quant-sr`` recipe."""
    cfg, data = recipe.method, recipe.data
    s, patch = cfg.scale, data.img_size
    if data.path is None:
        train_imgs, held = builtin_sets(s, cfg.builtin_val_crop)
        train = SRTrainDataset(train_imgs, s, patch, cfg.repeat, cfg.augment, recipe.train.seed, cache=True)
        bench = find_benchmark(recipe)
        val: dict[str, Any] = {"builtin-held-out": SREvalDataset(held, s, cfg.val_crop or cfg.builtin_val_crop)}
        if bench is not None:
            val.update(benchmark_sets(bench, cfg.val_sets, s, cfg.val_crop))
        desc = BUILTIN_DESCRIPTION
    else:
        root = Path(data.path)
        if not root.is_dir():
            raise DataError(f"data folder not found: {root}")
        imgs = folder_images(root, s, ("DIV2K_train_HR", "HR"), ("DIV2K_train_LR_bicubic", "LR_bicubic"))
        train = SRTrainDataset(imgs, s, patch, cfg.repeat, cfg.augment, recipe.train.seed, cache=cfg.cache)
        bench = find_benchmark(recipe)
        if bench is None:
            raise DataError(
                f"no evaluation sets for {root}: put Set5/ Set14/ ... in {root}/benchmark or give quant-sr.benchmark"
            )
        val = dict(benchmark_sets(bench, cfg.val_sets, s, cfg.val_crop))
        desc = f"{root} ({len(imgs)} HR images), evaluated on {', '.join(val)} in {bench}"
    return SRData(train, val, desc, {k: len(v) for k, v in val.items()})
