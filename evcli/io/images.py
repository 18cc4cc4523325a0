"""Image reading that names the file when it fails, uprights EXIF-rotated photos, refuses decompression
bombs, and normalises modes (16-bit, gray, RGBA).

Size limit: an image of more than :data:`DEFAULT_MAX_IMAGE_PIXELS` pixels (178,956,970, the size at which
Pillow itself stops with ``DecompressionBombError``: about 13,377 x 13,377, or a 0.54 GB 8-bit RGB array)
is refused with a ``DataError`` before it is decoded, so a tiny file whose header claims 60000x60000
cannot exhaust memory. The environment variable ``EVCLI_MAX_IMAGE_PIXELS`` raises or lowers the limit
(``0`` turns it off); DataLoader worker processes inherit it.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from evcli.errors import DataError, EvcliError, UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
MAX_PIXELS_ENV = "EVCLI_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 2 * int(1024 * 1024 * 1024 // 4 // 3)  # 178,956,970: Pillow's own hard stop
# Pillow's limit is a module global: evcli sets it to its own limit only while it decodes, under this lock.
_PIL_LIMIT_LOCK = threading.RLock()


def is_image_file(path: Path) -> bool:
    """True for the file suffixes evcli reads as images."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def max_image_pixels() -> int | None:
    """The largest image (width x height) evcli decodes: ``EVCLI_MAX_IMAGE_PIXELS`` or the default; None
    when the variable is ``0`` (no limit).

    Raises:
        UsageError: the variable is set to something other than a whole number >= 0.
    """
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "").replace(",", "")
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(
            f"{MAX_PIXELS_ENV} must be a whole number of pixels (0 for no limit), got {os.environ[MAX_PIXELS_ENV]!r}"
        )
    return value or None


class _Unreadable(Exception):
    """Why an image cannot be used; ``pixels`` (the size it needs, 0 if unknown) is set when it is over the
    pixel limit rather than damaged."""

    def __init__(self, reason: str, pixels: int | None = None):
        super().__init__(reason)
        self.reason, self.pixels = reason, pixels


@contextmanager
def _decoded(p: Path) -> Iterator[Image.Image]:
    """The image at ``p`` opened, size-checked against :func:`max_image_pixels` and decoded.

    Raises:
        FileNotFoundError: no such file.
        _Unreadable: not an image, damaged, or over the pixel limit.
    """
    limit = max_image_pixels()
    w = h = 0
    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = None  # the size is checked below, with evcli's limit and message
            with Image.open(p) as img:
                w, h = img.size
                if limit is not None and w * h > limit:
                    raise _Unreadable(
                        f"{w}x{h} = {w * h:,} pixels, over the limit of {limit:,} set by {MAX_PIXELS_ENV} "
                        "(a decompression bomb or an oversized image)",
                        pixels=w * h,
                    )
                # Frames and tiles that a decoder sizes on its own (GIF, TIFF, ICO) stay within the limit too:
                # Pillow raises DecompressionBombError above twice its MAX_IMAGE_PIXELS.
                Image.MAX_IMAGE_PIXELS = None if limit is None else (limit + 1) // 2
                img.load()
                yield img
        except (_Unreadable, FileNotFoundError, EvcliError):
            raise
        except Image.DecompressionBombError as exc:
            raise _Unreadable(
                f"a decompression bomb: a {w}x{h} image with a frame or tile over the limit of {limit:,} pixels "
                f"set by {MAX_PIXELS_ENV}",
                pixels=0,
            ) from exc
        except MemoryError as exc:
            raise _Unreadable(f"{w}x{h} pixels, more than the memory available to decode it") from exc
        except Exception as exc:  # any decoder failure (OSError, SyntaxError, struct.error, ...) is a damaged file
            raise _Unreadable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as 8-bit RGB, upright (EXIF orientation applied, as viewers show it; 16-bit and float
    images are rescaled, alpha dropped).

    Raises:
        DataError: the file is missing, truncated, not an image, or larger than :func:`max_image_pixels`
            (the path, its size and the limit are named).
    """
    p = Path(path)
    try:
        with _decoded(p) as img:
            try:
                upright = ImageOps.exif_transpose(img)
            except Exception:  # a damaged EXIF block: the pixels are fine, keep them as stored
                upright = img
            return to_rgb(upright)
    except FileNotFoundError as exc:
        raise DataError(f"image not found: {p}") from exc
    except _Unreadable as exc:
        if exc.pixels is not None:
            raise DataError(
                f"image {p} is too large: {exc.reason}",
                hint=f"if you trust the file, raise the limit: {MAX_PIXELS_ENV}={exc.pixels or 0} (0 = no limit)",
            ) from exc
        raise DataError(f"corrupt or unreadable image: {p} ({exc.reason})", hint="fix or replace it") from exc


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
    """Return None if the image decodes within the pixel limit, else the reason it does not."""
    try:
        with _decoded(Path(path)):
            pass
    except FileNotFoundError:
        return "file not found"
    except _Unreadable as exc:
        return exc.reason
    except EvcliError:  # a bad EVCLI_MAX_IMAGE_PIXELS is the user's setting, not this image's fault
        raise
    except Exception as exc:  # any other decoder failure counts as corrupt
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def save_png(t: Any, path: Path) -> None:
    """Write a tensor [C, H, W] in [0, 1] (C = 1 or 3) as an 8-bit PNG."""
    import numpy as np

    t = t.detach().cpu()
    arr = np.empty((t.shape[1], t.shape[2], t.shape[0]), np.uint8)
    rows = max(1, (1 << 22) // max(1, t.shape[0] * t.shape[2]))  # bands of ~4M values: no full-size copies
    for y in range(0, t.shape[1], rows):
        band = t[:, y : y + rows].float().clamp(0, 1).mul_(255.0).add_(0.5)
        arr[y : y + rows] = band.byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(path)
