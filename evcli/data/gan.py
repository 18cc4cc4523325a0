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

* unpaired ``photo2sketch``: domain A = photos (UNPAIRED_TRAIN_A; coffee and grace_hopper.jpg held out for
  val); domain B = pencil sketches of *other* photos (UNPAIRED_TRAIN_B; val: immunohistochemistry). The two
  domains share no photo. Both are cut into tiles at up to three scales (below).
* paired ``photo2sketch``: A = a photo, B = its pencil sketch (the classic colour dodge of the grey image
  by its blurred negative: dark lines on white where the photo has edges and texture). A local, deterministic
  mapping a Pix2Pix teacher can learn from a few photos and apply to photos it never saw (an edges-to-photo
  task cannot be learnt from a handful of photos). Train tiles: 15 package photos (PAIRED_TRAIN), each at up
  to three scales (the square photo resized to 1, 2 and 4 x ``load_size``, never above its own size) cut
  into ``load_size`` tiles, the sketch made per tile; val: coffee and grace_hopper (held out), full view and
  four quadrants each.

The generators (instance norm after their first convolution, as in CycleGAN) cannot see an image's global
brightness and contrast (their output is the same for ``a * x + b``, ``a > 0``), so a built-in target that
depends on absolute tone (the earlier sepia prints) can only be approximated; a pencil sketch divides the
image by its own blur and hardly depends on exposure.
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

UNPAIRED_TRAIN_A = ("astronaut", "rocket", "china", "flower", "hubble_deep_field", "coins", "gravel")
UNPAIRED_TRAIN_B = ("chelsea", "cat", "camera", "brick", "grass", "moon", "clock")
UNPAIRED_VAL_A = ("coffee", "grace_hopper")
UNPAIRED_VAL_B = ("immunohistochemistry",)
PAIRED_TRAIN = (
    "astronaut",
    "rocket",
    "china",
    "chelsea",
    "cat",
    "flower",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
    "coins",
    "brick",
    "grass",
    "gravel",
    "moon",
    "clock",
)
PAIRED_VAL = ("coffee", "grace_hopper")
BUILTIN_UNPAIRED = (
    "built-in unpaired photo2sketch: A = photos (scikit-image astronaut, rocket, hubble_deep_field, coins, gravel; "
    "scikit-learn china.jpg, flower.jpg), B = pencil sketches of other photos (scikit-image chelsea, cat, camera, "
    "brick, grass, moon, clock), both cut into tiles at up to 3 scales; val A = coffee and matplotlib's "
    "grace_hopper.jpg (held out)"
)
BUILTIN_PAIRED = (
    "built-in paired photo2sketch: A = a photo, B = its pencil sketch (colour dodge of the grey image by its "
    "blurred negative); 15 package photos (scikit-image astronaut, rocket, chelsea, cat, hubble_deep_field, "
    "immunohistochemistry, camera, coins, brick, grass, gravel, moon, clock; scikit-learn china.jpg, flower.jpg) "
    "cut into tiles at up to 3 scales; val on coffee and grace_hopper.jpg (held out)"
)
SKETCH_SIGMA = 2.0  # pixels of the tile the sketch is made on


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


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [C, H, W] (radius 3 sigma; reflect padding, replicate on images narrower
    than the radius)."""
    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=img.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c, h, w = img.shape
    x = img[None]
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect" if radius < w else "replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect" if radius < h else "replicate")
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x[0]


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of RGB [..., 3, H, W] as [..., H, W]."""
    return 0.299 * rgb[..., 0, :, :] + 0.587 * rgb[..., 1, :, :] + 0.114 * rgb[..., 2, :, :]


def pencil_sketch(rgb: torch.Tensor, sigma: float = SKETCH_SIGMA) -> torch.Tensor:
    """Pencil sketch of RGB [3, H, W] in [0, 1] as 3 equal channels: the grey image divided by the inverse of
    its blurred negative (colour dodge), so flat areas turn white and edges and texture leave dark lines."""
    grey = luminance(rgb)[None]
    blurred_negative = _gaussian_blur(1.0 - grey, sigma)
    sketch = (grey / (1.0 - blurred_negative).clamp_min(1e-3)).clamp(0, 1)
    return sketch.expand(3, -1, -1).contiguous()


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
            # an epoch shorter than A (built-in tiles): each sample draws its A image at random, so every
            # tile is seen; otherwise A is walked in order (the CycleGAN code's unaligned dataset)
            random_a = self.prep.train and self.length < len(self.a)
            ia = int(torch.randint(0, len(self.a), ())) if random_a else i % len(self.a)
            a = _crop_flip(self._image("A", ia), self.prep.img_size, self.prep.train)
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
            # an epoch shorter than the set (built-in tiles): each sample draws its pair at random
            random_pair = self.prep.train and self.length < len(self.items)
            j = int(torch.randint(0, len(self.items), ())) if random_pair else i % len(self.items)
            stack = _crop_flip(self._pair(j), self.prep.img_size, self.prep.train)
        a, b = (stack[3:], stack[:3]) if self.b_to_a else (stack[:3], stack[3:])
        return {"A": a * 2 - 1, "B": b * 2 - 1}


@dataclass
class GanData:
    """Train and val sets of a distill-gan run."""

    train: Dataset
    val: Dataset
    description: str
    num_classes: int = 0


def _square(name: str) -> torch.Tensor:
    """A built-in photo, centre-cropped to a square, in [0, 1]."""
    img = _to_unit(builtin_photo(name))
    h, w = img.shape[-2:]
    s = min(h, w)
    return img[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]


def _photo(name: str, size: int) -> torch.Tensor:
    """A built-in photo, centre-cropped to a square, resized to ``size`` (the crops come from this image)."""
    return _resize(_square(name), size)


def _tiles(name: str, tile: int) -> list[torch.Tensor]:
    """A built-in photo at 1, 2 and 4 x ``tile`` (never above its own size, always at least once), each scale
    cut into non-overlapping ``tile`` x ``tile`` tiles: whole-scene views and close-ups."""
    square = _square(name)
    sizes = [tile * m for m in (1, 2, 4) if m == 1 or tile * m <= square.shape[-1]]
    out = []
    for size in sizes:
        view = _resize(square, size)
        out += [view[:, y : y + tile, x : x + tile] for y in range(0, size, tile) for x in range(0, size, tile)]
    return out


def builtin_unpaired(img_size: int, load_size: int, seed: int, samples: int) -> GanData:
    """The built-in unpaired photo2sketch set (see the module docstring)."""
    tr, va = Prep(img_size, load_size, True), Prep(img_size, load_size, False)
    ta = [t for n in UNPAIRED_TRAIN_A for t in _tiles(n, load_size)]
    tb = [pencil_sketch(t) for n in UNPAIRED_TRAIN_B for t in _tiles(n, load_size)]
    vb = [pencil_sketch(_photo(n, img_size)) for n in UNPAIRED_VAL_B]
    # val A: each held-out photo at full view and its four quadrants (10 images)
    va_a = []
    for n in UNPAIRED_VAL_A:
        full = _photo(n, 2 * img_size)
        va_a.append(_resize(full, img_size))
        va_a += [full[:, y : y + img_size, x : x + img_size] for y in (0, img_size) for x in (0, img_size)]
    return GanData(
        UnpairedDataset(ta, tb, tr, seed, length=samples),
        UnpairedDataset(va_a, vb, va, seed),
        f"{BUILTIN_UNPAIRED}: {len(ta)} / {len(tb)} train tiles, {samples} crops/epoch at {img_size} px, "
        f"{len(va_a)} val images",
    )


def builtin_paired(img_size: int, load_size: int, seed: int, samples: int) -> GanData:
    """The built-in photo2sketch set (see the module docstring)."""
    tr, va = Prep(img_size, load_size, True), Prep(img_size, load_size, False)

    def pair(photo: torch.Tensor) -> torch.Tensor:
        return torch.cat([photo, pencil_sketch(photo)])

    train = [pair(t) for n in PAIRED_TRAIN for t in _tiles(n, load_size)]
    val = []
    for n in PAIRED_VAL:
        full = _photo(n, 2 * img_size)
        views = [_resize(full, img_size)]
        views += [full[:, y : y + img_size, x : x + img_size] for y in (0, img_size) for x in (0, img_size)]
        val += [pair(v) for v in views]
    return GanData(
        PairedDataset(train, tr, seed, length=samples),
        PairedDataset(val, va, seed),
        f"{BUILTIN_PAIRED}: {len(train)} train tiles, {samples} crops/epoch at {img_size} px, {len(val)} val pairs",
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
