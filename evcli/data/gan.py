"""Image-to-image translation data for ``evcli distill-gan``: the CycleGAN unpaired layout, the Pix2Pix
aligned ``AB`` layout, and built-in unpaired and paired sets made from real photos that ship in packages.

Every sample is a dict of float tensors in [-1, 1] (the generators' range): ``A`` (source, [3, H, W]) and,
for training and paired data, ``B`` (target domain image; unpaired: a random, unrelated B image). Datasets
are indexed by ``(epoch, index)`` and all randomness of a sample comes from ``seeded_rng(mix_seed(seed,
epoch, index))``, so runs and resumes are exact.

Preprocessing (the CycleGAN code base's ``resize_and_crop``): training images are resized to
``load_size`` x ``load_size`` (286 for 256 crops), randomly cropped to ``img_size`` and flipped
horizontally with probability 1/2 (Pix2Pix: the same crop and flip on A and B); evaluation images are
resized to ``img_size`` x ``img_size`` with no crop or flip.

Built-in data (real photos from scikit-image, scikit-learn and matplotlib, no download):

* unpaired ``photo2sepia``: domain A = colour photos (astronaut, rocket, china.jpg, coffee held out for
  val, grace_hopper.jpg held out for val); domain B = *other* photos (chelsea, cat, flower.jpg; val:
  immunohistochemistry) turned into warm sepia prints (a fixed tone curve). The two domains share no photo.
* paired ``edges2photo``: A = the photo's edge map (Canny on the grey image, black lines on white, as in
  edges2shoes), B = the photo; train on astronaut, rocket, china, chelsea, cat, flower; val on coffee and
  grace_hopper (held out).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from evcli.data.loading import mix_seed, seeded_rng
from evcli.errors import DataError
from evcli.io.images import is_image_file, load_rgb

UNPAIRED_TRAIN_A = ("astronaut", "rocket", "china")
UNPAIRED_TRAIN_B = ("chelsea", "cat", "flower")
UNPAIRED_VAL_A = ("coffee", "grace_hopper")
UNPAIRED_VAL_B = ("immunohistochemistry",)
PAIRED_TRAIN = ("astronaut", "rocket", "china", "chelsea", "cat", "flower")
PAIRED_VAL = ("coffee", "grace_hopper")
BUILTIN_UNPAIRED = (
    "built-in unpaired photo2sepia: A = colour photos (scikit-image astronaut, rocket; scikit-learn china.jpg), "
    "B = other photos (chelsea, cat, flower.jpg) as warm sepia prints; val A = coffee and matplotlib's "
    "grace_hopper.jpg (held out)"
)
BUILTIN_PAIRED = (
    "built-in paired edges2photo: A = Canny edge map of a photo, B = the photo (scikit-image astronaut, rocket, "
    "chelsea, cat; scikit-learn china.jpg, flower.jpg); val on coffee and grace_hopper.jpg (held out)"
)


def builtin_photo(name: str) -> np.ndarray:
    """One built-in photo as uint8 [H, W, 3]."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    elif name == "grace_hopper":
        from matplotlib import cbook
        from PIL import Image

        with cbook.get_sample_data("grace_hopper.jpg") as fh:
            img = np.asarray(Image.open(fh).convert("RGB"))
    else:
        import skimage.data

        img = getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def sepia(rgb: torch.Tensor) -> torch.Tensor:
    """A warm sepia print of RGB [3, H, W] in [0, 1]: luminance through a fixed tone curve, brown-tinted."""
    y = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    y = y.clamp(0, 1) ** 0.9
    tint = torch.tensor([1.07, 0.87, 0.62]).reshape(3, 1, 1)
    return (y[None] * tint + torch.tensor([0.05, 0.03, 0.0]).reshape(3, 1, 1)).clamp(0, 1)


def edge_map(rgb: torch.Tensor) -> torch.Tensor:
    """Black Canny edges (sigma 2) on white of RGB [3, H, W] in [0, 1], as 3 channels."""
    from skimage.feature import canny

    grey = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]).numpy()
    edges = canny(grey, sigma=2.0)
    return torch.from_numpy(1.0 - edges.astype(np.float32))[None].expand(3, -1, -1).contiguous()


def _resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """[C, H, W] to size x size (bicubic, like the CycleGAN code's PIL resize)."""
    if tuple(img.shape[-2:]) == (size, size):
        return img
    return F.interpolate(img[None], size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)


def _crop_flip(stack: torch.Tensor, crop: int, train: bool) -> torch.Tensor:
    """Random crop and h-flip of [C, H, W] (training; one draw for the whole stack), identity otherwise."""
    if not train:
        return stack
    h, w = stack.shape[-2:]
    top = int(torch.randint(0, h - crop + 1, ()))
    left = int(torch.randint(0, w - crop + 1, ()))
    stack = stack[:, top : top + crop, left : left + crop]
    if float(torch.rand(())) < 0.5:
        stack = stack.flip(-1)
    return stack


def _to_unit(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0


@dataclass
class Prep:
    """Resize / crop sizes of one split."""

    img_size: int
    load_size: int
    train: bool

    @property
    def resize_to(self) -> int:
        return self.load_size if self.train else self.img_size


class UnpairedDataset(Dataset):
    """Unpaired A and B images (tensors [3, H, W] in [0, 1], or files): sample i is A[i % len(A)] with a
    random B (training) or B[i % len(B)] (evaluation)."""

    def __init__(self, a: list[Any], b: list[Any], prep: Prep, seed: int, length: int | None = None):
        self.a, self.b, self.prep, self.seed = a, b, prep, seed
        self.length = length or max(len(a), len(b) if prep.train else 0, 1)
        self._cache: dict[tuple[str, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return self.length if self.prep.train else len(self.a)

    def _image(self, side: str, i: int) -> torch.Tensor:
        key = (side, i)
        if key not in self._cache:
            item = (self.a if side == "A" else self.b)[i]
            img = item if isinstance(item, torch.Tensor) else _to_unit(np.asarray(load_rgb(item)))
            img = _resize(img, self.prep.resize_to)
            if len(self._cache) < 512:
                self._cache[key] = img
            return img
        return self._cache[key]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, i = key
        with seeded_rng(mix_seed(self.seed, epoch, i, 0x6A)):
            a = _crop_flip(self._image("A", i % len(self.a)), self.prep.img_size, self.prep.train)
            j = int(torch.randint(0, len(self.b), ())) if self.prep.train else i % len(self.b)
            b = _crop_flip(self._image("B", j), self.prep.img_size, self.prep.train)
        return {"A": a * 2 - 1, "B": b * 2 - 1}


class PairedDataset(Dataset):
    """Aligned (A, B) pairs: tensors [6, H, W] in [0, 1], or Pix2Pix ``AB`` files (A left, B right)."""

    def __init__(self, items: list[Any], prep: Prep, seed: int, length: int | None = None, b_to_a: bool = False):
        self.items, self.prep, self.seed = items, prep, seed
        self.length = length or len(items)
        self.b_to_a = b_to_a
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.length if self.prep.train else len(self.items)

    def _pair(self, i: int) -> torch.Tensor:
        if i in self._cache:
            return self._cache[i]
        item = self.items[i]
        if isinstance(item, torch.Tensor):
            stack = item
        else:
            ab = _to_unit(np.asarray(load_rgb(item)))
            h, w = ab.shape[-2:]
            if w != 2 * h:
                raise DataError(
                    f"{item} is {w}x{h}: a Pix2Pix aligned image holds A and B side by side (width = 2 x height)"
                )
            stack = torch.cat([ab[:, :, : w // 2], ab[:, :, w // 2 :]])
        stack = _resize(stack, self.prep.resize_to)
        if len(self._cache) < 512:
            self._cache[i] = stack
        return stack

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, i = key
        with seeded_rng(mix_seed(self.seed, epoch, i, 0x6B)):
            stack = _crop_flip(self._pair(i % len(self.items)), self.prep.img_size, self.prep.train)
        a, b = (stack[3:], stack[:3]) if self.b_to_a else (stack[:3], stack[3:])
        return {"A": a * 2 - 1, "B": b * 2 - 1}


@dataclass
class GanData:
    """Train and val sets of a distill-gan run."""

    train: Dataset
    val: Dataset
    description: str
    num_classes: int = 0


def _photo(name: str, size: int) -> torch.Tensor:
    """A built-in photo, centre-cropped to a square, resized to ``size`` (the crops come from this image)."""
    img = _to_unit(builtin_photo(name))
    h, w = img.shape[-2:]
    s = min(h, w)
    img = img[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    return _resize(img, size)


def builtin_unpaired(img_size: int, load_size: int, seed: int, samples: int) -> GanData:
    """The built-in photo2sepia set (see the module docstring)."""
    tr, va = Prep(img_size, load_size, True), Prep(img_size, load_size, False)
    ta = [_photo(n, load_size) for n in UNPAIRED_TRAIN_A]
    tb = [sepia(_photo(n, load_size)) for n in UNPAIRED_TRAIN_B]
    vb = [sepia(_photo(n, img_size)) for n in UNPAIRED_VAL_B]
    # val A: each held-out photo at full view and its four quadrants (10 images)
    va_a = []
    for n in UNPAIRED_VAL_A:
        full = _photo(n, 2 * img_size)
        va_a.append(_resize(full, img_size))
        va_a += [full[:, y : y + img_size, x : x + img_size] for y in (0, img_size) for x in (0, img_size)]
    return GanData(
        UnpairedDataset(ta, tb, tr, seed, length=samples),
        UnpairedDataset(va_a, vb, va, seed),
        f"{BUILTIN_UNPAIRED}: {samples} train crops/epoch at {img_size} px, {len(va_a)} val images",
    )


def builtin_paired(img_size: int, load_size: int, seed: int, samples: int) -> GanData:
    """The built-in edges2photo set (see the module docstring)."""
    tr, va = Prep(img_size, load_size, True), Prep(img_size, load_size, False)

    def pair(photo: torch.Tensor) -> torch.Tensor:
        return torch.cat([edge_map(photo), photo])

    train = [pair(_photo(n, load_size)) for n in PAIRED_TRAIN]
    val = []
    for n in PAIRED_VAL:
        full = _photo(n, 2 * img_size)
        views = [_resize(full, img_size)]
        views += [full[:, y : y + img_size, x : x + img_size] for y in (0, img_size) for x in (0, img_size)]
        val += [pair(v) for v in views]
    return GanData(
        PairedDataset(train, tr, seed, length=samples),
        PairedDataset(val, va, seed),
        f"{BUILTIN_PAIRED}: {samples} train crops/epoch at {img_size} px, {len(val)} val pairs",
    )


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def cyclegan_folders(root: Path, img_size: int, load_size: int, seed: int, direction: str) -> GanData:
    """CycleGAN layout: ``trainA``, ``trainB``, ``testA`` (or ``valA``), ``testB`` (or ``valB``)."""
    sides = {}
    for split, names in (("train", ("train",)), ("test", ("test", "val"))):
        for side in "AB":
            folder = _first_dir(root, tuple(n + side for n in names))
            if folder is None:
                raise DataError(f"CycleGAN layout: no folder {root / (split + side)}")
            files = _images(folder)
            if not files:
                raise DataError(f"CycleGAN layout: {folder} holds no images", hint="both domains need images")
            sides[split + side] = files
    a, b = ("A", "B") if direction == "AtoB" else ("B", "A")
    tr, va = Prep(img_size, load_size, True), Prep(img_size, load_size, False)
    train = UnpairedDataset(sides["train" + a], sides["train" + b], tr, seed)
    val = UnpairedDataset(sides["test" + a], sides["test" + b], va, seed)
    return GanData(
        train,
        val,
        f"CycleGAN folders {root} ({direction}): {len(sides['train' + a])} / {len(sides['train' + b])} train, "
        f"{len(sides['test' + a])} test source images",
    )


def pix2pix_folders(root: Path, img_size: int, load_size: int, seed: int, direction: str) -> GanData:
    """Pix2Pix aligned layout: ``train/`` and ``val/`` (or ``test/``) of ``AB`` images (A left, B right)."""
    train_dir = _first_dir(root, ("train",))
    val_dir = _first_dir(root, ("val", "test"))
    if train_dir is None or val_dir is None:
        raise DataError(f"Pix2Pix layout: expected {root}/train and {root}/val (or test) of side-by-side AB images")
    tr_files, va_files = _images(train_dir), _images(val_dir)
    for folder, files in ((train_dir, tr_files), (val_dir, va_files)):
        if not files:
            raise DataError(f"Pix2Pix layout: {folder} holds no images")
    for p in (tr_files[0], va_files[0]):
        w, h = load_rgb(p).size
        if w != 2 * h:
            raise DataError(f"{p} is {w}x{h}: a Pix2Pix aligned image holds A and B side by side (width = 2 x height)")
    b_to_a = direction == "BtoA"
    train = PairedDataset(tr_files, Prep(img_size, load_size, True), seed, b_to_a=b_to_a)
    val = PairedDataset(va_files, Prep(img_size, load_size, False), seed, b_to_a=b_to_a)
    return GanData(
        train, val, f"Pix2Pix aligned folders {root} ({direction}): {len(tr_files)} train, {len(va_files)} val"
    )


def build_gan_data(recipe: Any) -> GanData:
    """Datasets of a distill-gan recipe: built-in (``data.path`` null) or the task's folder layout."""
    cfg, data, seed = recipe.method, recipe.data, recipe.train.seed
    size, load = data.img_size, cfg.resolved_load_size(data.img_size)
    if data.path is None:
        build = builtin_unpaired if cfg.task == "cyclegan" else builtin_paired
        return build(size, load, seed, cfg.builtin_samples)
    root = Path(data.path).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    build = cyclegan_folders if cfg.task == "cyclegan" else pix2pix_folders
    return build(root, size, load, seed, cfg.direction)
