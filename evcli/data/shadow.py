"""Shadow-removal data: the built-in rendered-shadow set, the ISTD and SRD folder layouts, and the
paper's paired augmentation.

Every sample is a dict of float tensors: ``shadow`` and ``free`` (RGB, [3, H, W] in [0, 1]) and
``mask`` ([1, H, W] in [0, 1], not yet thresholded: LAB-Net thresholds at 0.5 in training and 0.9 at
test). Datasets are indexed by ``(epoch, index)`` like the classification ones, and all randomness of a
sample comes from ``seeded_rng(mix_seed(seed, epoch, index))``, so runs and resumes are exact.

Built-in data: real photos that ship inside installed packages (scikit-image's ``skimage.data`` and
scikit-learn's sample images), onto which :func:`render_shadow` casts synthetic shadows: a random
occluder shape (polygon, ellipses or a band), a soft penumbra (Gaussian-blurred edge), a darkening that
is bluer than the light (shadows are lit by sky light only), and a warm colour shift concentrated in
the penumbra. Two photos (``coffee`` and scikit-learn's ``china.jpg``) are held out for validation.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset

from evcli.data.loading import mix_seed, seeded_rng
from evcli.errors import DataError
from evcli.io.images import is_image_file, load_rgb

# Photos that ship in Python packages (no root needed). Names: plain ``skimage.data`` names, ``china`` /
# ``flower`` (scikit-learn), ``grace_hopper`` (matplotlib), ``motorcycle`` (skimage's stereo_motorcycle, left).
TRAIN_PHOTOS = (
    "astronaut",
    "chelsea",
    "rocket",
    "camera",
    "coins",
    "brick",
    "grass",
    "gravel",
    "flower",
    "moon",
    "clock",
    "grace_hopper",
    "hubble_deep_field",
    "immunohistochemistry",
)
VAL_PHOTOS = ("coffee", "china", "motorcycle")  # held out: never trained on by any shipped weights
# Debian's opencv-doc example photos (``deshadow.photo_dir``: .../opencv-doc/examples/data; see INSTALL.md):
# natural photos only (no logos, charts, chessboards, renders; messi5 and photos of unclear origin left out).
OPENCV_TRAIN_PHOTOS = (
    "aero1.jpg",
    "apple.jpg",
    "baboon.jpg",
    "butterfly.jpg",
    "orange.jpg",
    "stuff.jpg",
    "graf1.png",
    "graf3.png",
    "leuvenA.jpg",
    "leuvenB.jpg",
    "aloeL.jpg",
    "aloeR.jpg",
    "rubberwhale1.png",
    "rubberwhale2.png",
    "smarties.png",
    "box_in_scene.png",
    "basketball1.png",
    "basketball2.png",
)
OPENCV_VAL_PHOTOS = ("fruits.jpg", "building.jpg", "squirrel_cls.jpg", "aero3.jpg", "home.jpg")
MAX_PHOTO_SIDE = 512  # photos are downscaled so that their shorter side is at most this (memory, scale)
BUILTIN_DESCRIPTION = (
    "built-in rendered shadows: real photos shipped in scikit-image, scikit-learn and matplotlib (and, with "
    "deshadow.photo_dir, Debian's opencv-doc example photos) with synthetic cast shadows (hard and soft, "
    "bluish or coloured, solid and partial occluders such as fences and branches, some shadow-free "
    "samples); held-out photos (coffee, china.jpg, motorcycle; opencv: fruits, building, squirrel_cls, "
    "aero3, home) are never trained on"
)


def photo_names(photo_dir: str | None, held_out: bool) -> tuple[str, ...]:
    """The built-in photo set of a split: package photos, plus opencv-doc ones when ``photo_dir`` is given."""
    base = VAL_PHOTOS if held_out else TRAIN_PHOTOS
    if not photo_dir:
        return base
    extra = OPENCV_VAL_PHOTOS if held_out else OPENCV_TRAIN_PHOTOS
    return base + tuple(f"opencv:{n}" for n in extra)


def builtin_photo(name: str, photo_dir: str | None = None) -> np.ndarray:
    """One built-in photo as uint8 [H, W, 3] (grayscale photos are repeated over three channels).

    ``opencv:FILE`` names a file of ``photo_dir`` (Debian's opencv-doc ``examples/data``)."""
    if name.startswith("opencv:"):
        if not photo_dir:
            raise DataError(f"photo {name} needs deshadow.photo_dir (Debian's opencv-doc examples/data folder)")
        path = Path(photo_dir).expanduser() / name.split(":", 1)[1]
        if not path.is_file():
            raise DataError(
                f"photo not found: {path}",
                hint="install Debian's opencv-doc example data (INSTALL.md) or unset deshadow.photo_dir",
            )
        img = np.asarray(load_rgb(path))
    elif name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    elif name == "grace_hopper":
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            img = np.asarray(Image.open(f).convert("RGB"))
    else:
        try:
            import skimage.data
        except ImportError as exc:  # pragma: no cover - a dependency of evcli
            raise DataError("the built-in shadow data needs scikit-image (pip install scikit-image)") from exc
        img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def _photo_tensor(name: str, photo_dir: str | None) -> torch.Tensor:
    """A built-in photo as float [3, H, W], downscaled so that its shorter side is at most MAX_PHOTO_SIDE."""
    t = _to_tensor(builtin_photo(name, photo_dir))
    h, w = t.shape[-2:]
    if min(h, w) > MAX_PHOTO_SIDE:
        f = MAX_PHOTO_SIDE / min(h, w)
        t = F.interpolate(t[None], size=(round(h * f), round(w * f)), mode="bilinear", antialias=True)[0]
    return t.clamp(0, 1).contiguous()


# --------------------------------------------------------------------------------------------------
# Shadow rendering


def _occluder(size: tuple[int, int], rng: np.random.Generator, kind: int | None = None) -> Image.Image:
    """A binary occluder silhouette ("L" image): a solid shape covering roughly 10-50 % of the frame, or a
    partial one (fence slats, branches) with light coming through."""
    w, h = size
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    kind = int(rng.integers(0, 5)) if kind is None else kind
    cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
    scale = rng.uniform(0.2, 0.45) * min(w, h)
    if kind == 0:  # a star-shaped polygon (a person, a pole's top, foliage)
        n = int(rng.integers(5, 11))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = scale * rng.uniform(0.5, 1.4, n)
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii)]
        draw.polygon(pts, fill=255)
    elif kind == 1:  # a cluster of ellipses (a tree crown, a car)
        for _ in range(int(rng.integers(1, 4))):
            ox, oy = cx + rng.normal(0, scale * 0.4), cy + rng.normal(0, scale * 0.4)
            rx, ry = scale * rng.uniform(0.4, 1.0), scale * rng.uniform(0.3, 0.8)
            draw.ellipse([ox - rx, oy - ry, ox + rx, oy + ry], fill=255)
    elif kind == 2:  # a band (a building edge or a pole) crossing the frame at an angle
        _band(draw, cx, cy, rng.uniform(0, math.pi), scale * rng.uniform(0.4, 1.0), w, h)
    elif kind == 3:  # fence slats or blinds: parallel bars with light between them (a partial occluder)
        angle = rng.uniform(0, math.pi)
        period = scale * rng.uniform(0.25, 0.6)
        width = period * rng.uniform(0.35, 0.7)
        count = int(rng.integers(2, 6))
        dx, dy = -math.sin(angle), math.cos(angle)
        for i in range(count):
            off = (i - (count - 1) / 2) * period
            _band(draw, cx + dx * off, cy + dy * off, angle, width, w, h)
    else:  # branches: thick random strokes (a partial occluder with irregular holes)
        for _ in range(int(rng.integers(2, 6))):
            x, y = cx + rng.normal(0, scale * 0.5), cy + rng.normal(0, scale * 0.5)
            pts = [(x, y)]
            heading = rng.uniform(0, 2 * math.pi)
            for _ in range(int(rng.integers(2, 5))):
                heading += rng.normal(0, 0.6)
                step = scale * rng.uniform(0.3, 0.8)
                x, y = x + step * math.cos(heading), y + step * math.sin(heading)
                pts.append((x, y))
            draw.line(pts, fill=255, width=max(1, int(scale * rng.uniform(0.08, 0.25))), joint="curve")
    return canvas


def _band(draw: ImageDraw.ImageDraw, cx: float, cy: float, angle: float, width: float, w: int, h: int) -> None:
    dx, dy = math.cos(angle), math.sin(angle)
    nx, ny = -dy * width / 2, dx * width / 2
    far = 2 * max(w, h)
    pts = [
        (cx - dx * far + nx, cy - dy * far + ny),
        (cx + dx * far + nx, cy + dy * far + ny),
        (cx + dx * far - nx, cy + dy * far - ny),
        (cx - dx * far - nx, cy - dy * far - ny),
    ]
    draw.polygon(pts, fill=255)


def render_shadow(
    free: np.ndarray, rng: np.random.Generator, shadow_free: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Cast a synthetic shadow on a shadow-free photo.

    One or two occluders (solid shapes, fence slats or branches); a hard (sharp) or soft (Gaussian
    penumbra) edge; a darkening that is usually bluer than the light (sky light) and sometimes tinted
    another colour (light through foliage, coloured surroundings); a warm shift in the penumbra.

    Args:
        free: float32 [H, W, 3] in [0, 1].
        rng: the sample's random generator.
        shadow_free: probability that the sample gets no shadow at all (an empty mask).

    Returns:
        ``(shadow, mask)``: the shadowed image (float32 [H, W, 3] in [0, 1]) and the binary shadow mask
        (float32 [H, W], 1 where the occluder's soft shadow covers at least half of the light).
    """
    h, w = free.shape[:2]
    if shadow_free > 0 and rng.random() < shadow_free:
        return free.astype(np.float32), np.zeros((h, w), np.float32)
    hard = _occluder((w, h), rng)
    if rng.random() < 0.25:  # a second occluder
        hard = Image.fromarray(np.maximum(np.asarray(hard), np.asarray(_occluder((w, h), rng))))
    if rng.random() < 0.3:  # a hard shadow: a near or sharp-edged occluder
        softness = rng.uniform(0.0, 0.004) * min(w, h)
    else:  # penumbra width grows with occluder distance
        softness = rng.uniform(0.005, 0.04) * min(w, h)
    blurred = hard.filter(ImageFilter.GaussianBlur(radius=float(softness))) if softness >= 0.3 else hard
    alpha = np.asarray(blurred, dtype=np.float32) / 255.0
    darkness = rng.uniform(0.25, 0.7)  # fraction of the direct light that remains
    if rng.random() < 0.7:  # sky light is bluer than sun light: the shadow keeps relatively more blue
        tint = np.array([rng.uniform(0.8, 0.95), rng.uniform(0.9, 1.0), rng.uniform(1.0, 1.2)], dtype=np.float32)
    else:  # a coloured shadow (green under foliage, warm indoor bounce light, ...)
        tint = rng.uniform(0.75, 1.25, 3).astype(np.float32)
    factor = np.clip(darkness * tint, 0.05, 1.0)
    a = alpha[..., None]
    shadow = free * (1.0 - a * (1.0 - factor))
    # Penumbra: a warm colour shift that peaks half-way through the soft edge.
    penumbra = (4.0 * alpha * (1.0 - alpha))[..., None]
    warm = np.array([rng.uniform(0.02, 0.06), rng.uniform(0.0, 0.02), -rng.uniform(0.0, 0.04)], dtype=np.float32)
    shadow = np.clip(shadow + penumbra * warm * (0.5 + free), 0.0, 1.0)
    return shadow.astype(np.float32), (alpha >= 0.5).astype(np.float32)


def noisy_mask(mask: torch.Tensor, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A detector-like corruption of a binary shadow mask [1, H, W] (not in the papers: ``deshadow.mask_noise``).

    The true mask's border moves (dilated or eroded by up to 4 px), and a false region is added: an occluder
    silhouette (:func:`_occluder`) anywhere in the image, half the time only its darker pixels (the learned
    detector's false alarms sit on dark objects and dark textures). The ground truth is not touched, so a
    remover trained on such masks learns to leave a lit region alone when it is masked by mistake.

    Args:
        mask: 0/1 float [1, H, W].
        image: the RGB image the mask belongs to, [3, H, W] in [0, 1] (for the darker-pixels variant).
        rng: the sample's random generator.
    """
    h, w = mask.shape[-2:]
    out = mask.float()[None]
    r = int(rng.integers(-4, 5))
    if r > 0:
        out = F.max_pool2d(out, 2 * r + 1, stride=1, padding=r)
    elif r < 0:
        out = 1.0 - F.max_pool2d(1.0 - out, 2 * -r + 1, stride=1, padding=-r)
    blob = np.asarray(_occluder((w, h), rng)) > 127
    if rng.random() < 0.5:
        lum = image.float().mean(0).numpy()
        blob &= lum < np.quantile(lum, rng.uniform(0.2, 0.6))
    return torch.maximum(out[0], torch.from_numpy(blob)[None].to(out)).to(mask.dtype)


def noisy_masks(masks: torch.Tensor, images: torch.Tensor, p: float, rng: np.random.Generator) -> torch.Tensor:
    """:func:`noisy_mask` applied to each sample of a batch [N, 1, H, W] with probability ``p``."""
    if p <= 0:
        return masks
    out = masks.clone()
    for i in range(masks.shape[0]):
        if rng.random() < p:
            out[i] = noisy_mask(masks[i].cpu(), images[i].detach().cpu(), rng).to(out)
    return out


# --------------------------------------------------------------------------------------------------
# Paired augmentation (the papers' ShadowgtDataset, applied once to shadow, mask and ground truth)


@dataclass
class PairedAugment:
    """Random resize (shorter side in [load_size, max_size), keep aspect, nearest), 4x {h-flip, rot90,
    none}, random rotation of +-``rotate`` degrees (nearest, corners filled with 0), random crop ``crop``
    and random h-flip, identically on every channel of ``stack`` [C, H, W]. Uses Python's ``random``."""

    crop: int
    load_size: int
    max_size: int = 480
    rotate: float = 20.0

    def __call__(self, stack: torch.Tensor) -> torch.Tensor:
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        h, w = stack.shape[-2:]
        lo, hi = self.load_size, max(self.load_size + 1, self.max_size)
        short = random.randrange(lo, hi)
        size = [short, max(1, round(w * short / h))] if h <= w else [max(1, round(h * short / w)), short]
        stack = TF.resize(stack, size, interpolation=InterpolationMode.NEAREST)
        for _ in range(4):
            op = random.randrange(3)
            if op == 0:
                stack = stack.flip(-1)
            elif op == 1:
                stack = stack.rot90(1, dims=(-2, -1))
        if self.rotate > 0:
            angle = random.uniform(-self.rotate, self.rotate)
            stack = TF.rotate(stack, angle, interpolation=InterpolationMode.NEAREST, fill=0.0)
        return random_crop(stack, self.crop, hflip=True)


def random_crop(stack: torch.Tensor, crop: int, hflip: bool) -> torch.Tensor:
    """A random ``crop`` x ``crop`` window (the image is first enlarged if smaller), then a random h-flip."""
    h, w = stack.shape[-2:]
    if h < crop or w < crop:
        s = crop / min(h, w)
        stack = F.interpolate(stack[None], size=(max(crop, round(h * s)), max(crop, round(w * s))), mode="nearest")[0]
        h, w = stack.shape[-2:]
    top, left = random.randrange(h - crop + 1), random.randrange(w - crop + 1)
    stack = stack[..., top : top + crop, left : left + crop]
    if hflip and random.random() < 0.5:
        stack = stack.flip(-1)
    return stack.contiguous()


def _split(stack: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"shadow": stack[0:3], "free": stack[3:6], "mask": stack[6:7]}


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(img))
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    return t.permute(2, 0, 1).float() if t.ndim == 3 else t[None].float()


# --------------------------------------------------------------------------------------------------
# Datasets


class BuiltinShadowDataset(Dataset):
    """Rendered shadows on built-in photos: ``length`` random crops per epoch (train) or a fixed set (val)."""

    def __init__(
        self,
        photos: tuple[str, ...],
        length: int,
        size: int,
        seed: int,
        train: bool,
        photo_dir: str | None = None,
        shadow_free: float = 0.0,
    ):
        self.photos = [_photo_tensor(n, photo_dir) for n in photos]
        self.names = photos
        self.length, self.size, self.seed, self.train = length, size, seed, train
        self.shadow_free = shadow_free

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if not self.train:
            epoch = 0  # the val set is the same images every time
        with seeded_rng(mix_seed(self.seed, epoch, index, 0x5AD0)):
            photo = self.photos[index % len(self.photos)]
            h, w = photo.shape[-2:]
            # A crop of a random scale of the photo (down to ~half its shorter side) for variety.
            scale = random.uniform(self.size / min(h, w), 1.0) if self.train else 1.0
            side = max(self.size, int(min(h, w) * scale))
            img = random_crop(photo, side, hflip=self.train)
            img = F.interpolate(img[None], size=(self.size, self.size), mode="bilinear", antialias=True)[0]
            rng = np.random.default_rng(mix_seed(self.seed, epoch, index, 0x5AD1))
            free = img.clamp(0, 1).permute(1, 2, 0).numpy()
            shadow, mask = render_shadow(free, rng, self.shadow_free)
        return {"shadow": _to_tensor(shadow), "free": img.clamp(0, 1).contiguous(), "mask": _to_tensor(mask)}


class PairedFolderDataset(Dataset):
    """(shadow, mask, shadow-free) file triples; training samples are augmented, test samples are not."""

    def __init__(
        self,
        triples: list[tuple[Path, Path, Path]],
        seed: int,
        augment: Callable[[torch.Tensor], torch.Tensor] | None,
        test_size: tuple[int, int] | None = None,
    ):
        self.triples, self.seed, self.augment, self.test_size = triples, seed, augment, test_size

    def __len__(self) -> int:
        return len(self.triples)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        a, b, c = self.triples[index]
        shadow = _to_tensor(np.asarray(load_rgb(a)))
        free = _to_tensor(np.asarray(load_rgb(c)))
        mask = load_mask(b, shadow.shape[-2:], warn_resize=False)
        if free.shape[-2:] != shadow.shape[-2:]:
            free = F.interpolate(free[None], size=shadow.shape[-2:], mode="bilinear", antialias=True)[0]
        stack = torch.cat([shadow, free, mask])
        if self.augment is not None:
            with seeded_rng(mix_seed(self.seed, epoch, index, 0x15D)):
                stack = self.augment(stack)
        elif self.test_size is not None:  # the papers' test.py resizes to size_w x size_h (nearest)
            w, h = self.test_size
            stack = F.interpolate(stack[None], size=(h, w), mode="nearest")[0]
        return _split(stack)


def load_mask(path: Path, size: torch.Size | tuple[int, int], warn_resize: bool = True) -> torch.Tensor:
    """A mask file as [1, H, W] in [0, 1] (any mode, 16-bit too), resized (nearest) to ``size``.

    The mask is read upright like the photo (:func:`load_rgb` applies EXIF orientation to both), so a mask
    drawn over the photo as a viewer shows it lines up; oversized and damaged files raise ``DataError``."""
    img = load_rgb(path).convert("L")
    m = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
    if tuple(m.shape[-2:]) != tuple(size):
        if warn_resize:
            from evcli.console import warn

            warn(f"mask {path} is {m.shape[-1]}x{m.shape[-2]}, the image {size[1]}x{size[0]}: resized (nearest)")
        m = F.interpolate(m[None], size=tuple(size), mode="nearest")[0]
    return m


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def _by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in _images(folder)}


def istd_triples(root: Path, split: str) -> list[tuple[Path, Path, Path]]:
    """ISTD layout: ``root/{split}_A`` shadow, ``{split}_B`` mask (same stem), ``{split}_C`` shadow-free
    (same file name as A). ``split`` is ``train`` or ``test``."""
    folders = [root / f"{split}_{x}" for x in "ABC"]
    for f in folders:
        if not f.is_dir():
            raise DataError(f"ISTD layout: no folder {f} (expected {root}/{split}_A, {split}_B, {split}_C)")
    masks, frees = _by_stem(folders[1]), _by_stem(folders[2])
    triples = []
    for a in _images(folders[0]):
        if a.stem not in masks:
            raise DataError(f"ISTD layout: no mask for {a.name} in {folders[1]}")
        if a.stem not in frees:
            raise DataError(f"ISTD layout: no shadow-free image for {a.name} in {folders[2]}")
        triples.append((a, masks[a.stem], frees[a.stem]))
    if not triples:
        raise DataError(f"no images in {folders[0]}")
    return triples


def _sub(root: Path, name: str) -> Path:
    for cand in (name, name.capitalize(), name.upper()):
        if (root / cand).is_dir():
            return root / cand
    raise DataError(f"SRD layout: no folder {root / name}")


def srd_triples(root: Path, split: str, mask_dir: Path | None) -> list[tuple[Path, Path, Path]]:
    """SRD layout: ``root/{split}/shadow`` and ``root/{split}/shadow_free`` (ground truth named like the
    shadow image, or with ``_no_shadow`` / ``_free`` appended); masks (SRD ships none; DHAN's are the usual
    ones) from ``mask_dir/{split}`` or ``mask_dir``, default ``root/{split}/mask``, named like the shadow."""
    base = _sub(root, split)
    shadow_dir, free_dir = _sub(base, "shadow"), _sub(base, "shadow_free")
    if mask_dir is None:
        masks_root = base / "mask"
    else:
        masks_root = mask_dir / split if (mask_dir / split).is_dir() else mask_dir
    if not masks_root.is_dir():
        raise DataError(
            f"SRD layout: no mask folder {masks_root}",
            hint="SRD ships no masks: pass deshadow.mask_dir (e.g. DHAN's SRD masks)",
        )
    frees, masks = _by_stem(free_dir), _by_stem(masks_root)
    triples = []
    for a in _images(shadow_dir):
        gt = next((frees[s] for s in (a.stem, a.stem + "_no_shadow", a.stem + "_free") if s in frees), None)
        if gt is None:
            raise DataError(f"SRD layout: no shadow-free image for {a.name} in {free_dir}")
        if a.stem not in masks:
            raise DataError(f"SRD layout: no mask for {a.name} in {masks_root}")
        triples.append((a, masks[a.stem], gt))
    if not triples:
        raise DataError(f"no images in {shadow_dir}")
    return triples


@dataclass
class ShadowData:
    """Train and val sets of a deshadow run (``num_classes`` is 0: not a classification task)."""

    train: Dataset
    val: Dataset
    description: str
    num_classes: int = 0


def build_shadow_data(recipe: Any) -> ShadowData:
    """Datasets of a deshadow recipe: built-in (``data.path`` null), ISTD or SRD layout."""
    cfg, data, seed = recipe.method, recipe.data, recipe.train.seed
    crop = data.img_size
    if data.path is None:
        photo_dir = cfg.photo_dir
        train_photos, val_photos = photo_names(photo_dir, False), photo_names(photo_dir, True)
        train = BuiltinShadowDataset(
            train_photos, cfg.builtin_train_samples, crop, seed, True, photo_dir, cfg.shadow_free
        )
        val = BuiltinShadowDataset(
            val_photos, cfg.builtin_val_samples, cfg.builtin_val_size, seed, False, photo_dir, cfg.shadow_free
        )
        return ShadowData(
            train,
            val,
            f"{BUILTIN_DESCRIPTION}: {len(train_photos)} train photos, {len(train)} crops/epoch at {crop} px; "
            f"{len(val_photos)} held-out photos, {len(val)} val images at "
            f"{cfg.builtin_val_size} px",
        )
    root = Path(data.path).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    layout = cfg.layout
    if layout == "auto":
        layout = "istd" if (root / "train_A").is_dir() or (root / "test_A").is_dir() else "srd"
    augment = PairedAugment(crop=crop, load_size=cfg.load_size, max_size=cfg.max_size, rotate=cfg.rotate)
    test_size = tuple(cfg.test_size) if cfg.test_size else None
    if layout == "istd":
        tr, te = istd_triples(root, "train"), istd_triples(root, "test")
    else:
        mask_dir = Path(cfg.mask_dir).expanduser() if cfg.mask_dir else None
        tr, te = srd_triples(root, "train", mask_dir), srd_triples(root, "test", mask_dir)
    return ShadowData(
        PairedFolderDataset(tr, seed, augment),
        PairedFolderDataset(te, seed, None, test_size),  # type: ignore[arg-type]
        f"{layout.upper()} layout {root}: {len(tr)} train / {len(te)} test triples",
    )
