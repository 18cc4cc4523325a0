"""Upscaling a user's image with ``quant-sr`` weights: loading (scale checked), tiled inference, and
grayscale / RGBA handling (a grayscale image comes back grayscale; an alpha channel is upscaled bicubically
and re-attached)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from evcli.errors import UsageError


def load_upscaler(weights: str | Path, scale: int | None = None) -> tuple[Any, Any]:
    """The network of a weights file or run folder (eval mode) and its recipe; refuses another scale."""
    from evcli import api
    from evcli.engine.run import resolve_weights_source
    from evcli.errors import CheckpointError
    from evcli.io.checkpoint import read_metadata

    path = resolve_weights_source(weights)
    if not path.exists():
        raise CheckpointError(f"weights not found: {path}")
    meta = read_metadata(path, "weights file")
    saved = meta.get("recipe") or {}
    if saved.get("command") != "quant-sr":
        what = f"an 'evcli {saved.get('command')}' file" if saved.get("command") else "not an evcli quant-sr file"
        raise UsageError(f"{path} is {what}; upscale needs quant-sr weights")
    own = saved.get("quant-sr") or {}
    if scale is not None and own.get("scale") != scale:
        raise UsageError(
            f"{path} is a x{own.get('scale')} model, not x{scale}", hint=f"drop --scale or use x{scale} weights"
        )
    loaded = api.load(path)
    return loaded.model.eval(), loaded.recipe


def read_image_modes(path: Path) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """RGB [3, H, W] in [0, 1], the alpha channel [1, H, W] (or None), and whether the image is grayscale."""
    from PIL import Image

    from evcli.io.images import load_rgb

    rgb_img = load_rgb(path)  # decodes safely (size limits, corrupt files -> DataError)
    with Image.open(path) as img:
        mode = img.mode
        alpha = None
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            alpha = torch.from_numpy(np.asarray(rgba)[..., 3].copy()).float()[None] / 255.0
            rgb_img = rgba.convert("RGB")
    rgb = torch.from_numpy(np.asarray(rgb_img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    return rgb, alpha, mode in ("L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "1")


@torch.no_grad()
def upscale_image(model: Any, rgb: torch.Tensor, tile: int = 256, overlap: int = 8) -> torch.Tensor:
    """SR of [3, h, w]: whole, or in overlapping LR tiles of ``tile`` px (``overlap`` px of context each side
    is computed and discarded), which bounds memory at any size."""
    s = model.scale
    device = next(model.parameters()).device
    h, w = rgb.shape[-2:]
    if max(h, w) <= tile:
        return model(rgb[None].to(device))[0].float().clamp(0, 1).cpu()
    out = torch.zeros(3, h * s, w * s)
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            y0, x0 = max(0, y - overlap), max(0, x - overlap)
            y1, x1 = min(h, y + tile + overlap), min(w, x + tile + overlap)
            part = model(rgb[None, :, y0:y1, x0:x1].to(device))[0].float().clamp(0, 1).cpu()
            th, tw = min(tile, h - y), min(tile, w - x)
            oy, ox = (y - y0) * s, (x - x0) * s
            out[:, y * s : (y + th) * s, x * s : (x + tw) * s] = part[:, oy : oy + th * s, ox : ox + tw * s]
    return out


def write_image(path: Path, sr: torch.Tensor, alpha: torch.Tensor | None, gray: bool, scale: int) -> None:
    """Save SR as PNG: grayscale (the mean of the channels) for a grayscale input, with the bicubically
    upscaled alpha for an RGBA input."""
    from evcli.data.sr import bicubic_up
    from evcli.io.images import save_png

    if gray:
        save_png(sr.mean(0, keepdim=True), path)
        return
    if alpha is not None:
        from PIL import Image

        a = bicubic_up(alpha[None].expand(-1, 3, -1, -1), scale)[0, :1]
        arr = (torch.cat([sr, a]).clamp(0, 1) * 255.0 + 0.5).byte().permute(1, 2, 0).numpy()
        Image.fromarray(arr, mode="RGBA").save(path)
        return
    save_png(sr, path)
