"""Image reading that names the file when it fails, and normalises modes (16-bit, gray, RGBA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from evcli.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def is_image_file(path: Path) -> bool:
    """True for the file suffixes evcli reads as images."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as 8-bit RGB (16-bit and float images are rescaled, alpha dropped).

    Raises:
        DataError: the file is missing, truncated or not an image (the path is named).
    """
    p = Path(path)
    try:
        with Image.open(p) as img:
            img.load()
            return to_rgb(img)
    except FileNotFoundError as exc:
        raise DataError(f"image not found: {p}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"corrupt or unreadable image: {p} ({reason})",
            hint="fix or replace it",
        ) from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, rescaling 16-bit/32-bit data to 8 bits instead of clipping."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype("uint8")
        img = Image.fromarray(arr)
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def verify_image(path: Path) -> str | None:
    """Return None if the image decodes, else the reason it does not."""
    try:
        with Image.open(path) as img:
            img.load()
    except Exception as exc:  # any decoder failure counts as corrupt
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def save_png(t: Any, path: Path) -> None:
    """Write a tensor [C, H, W] in [0, 1] (C = 1 or 3) as an 8-bit PNG."""
    arr = (t.detach().float().cpu().clamp(0, 1) * 255.0 + 0.5).byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(path)
