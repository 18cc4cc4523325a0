"""Shadow removal on image files: loading a model (shipped default weights, a run's weights, or a
baseline), masks (given or estimated), tiled inference for large images, and the files written.

Usable without the CLI::

    from evcli.methods.deshadow.infer import load_remover, remove_shadow
    remover = load_remover("labnet")           # the shipped default weights
    result = remove_shadow(remover, rgb, mask)  # tensors [3, H, W] / [1, H, W] in [0, 1]

At full resolution on CPU, call ``evcli.runtime.retain_freed_memory()`` once first, as the CLI does (glibc
otherwise maps and zeroes fresh pages for every large feature map: 1.6x slower LAB-Net in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evcli.console import warn
from evcli.errors import CheckpointError, DataError, UsageError
from evcli.io.images import is_image_file, load_rgb

MODEL_METHODS = ("labnet", "sadc")
BASELINES = ("identity", "colour_transfer")
ALL_METHODS = MODEL_METHODS + BASELINES
BF16_LABNET_ONLY = "--precision bf16 is for LAB-Net; the other methods run in fp32"


def shipped_weights(method: str) -> Path | None:
    """The default weights shipped in the package for ``method``, if any."""
    path = Path(str(resources.files("evcli.methods.deshadow") / "weights" / f"{method}_builtin.safetensors"))
    return path if path.is_file() else None


def normalise_method(name: str) -> str:
    """``colour-transfer`` / ``color_transfer`` -> ``colour_transfer``; UsageError for unknown names."""
    key = name.strip().lower().replace("-", "_").replace("color", "colour")
    if key not in ALL_METHODS:
        from evcli.recipe import did_you_mean

        raise UsageError(
            f"unknown --method '{name}'{did_you_mean(key, ALL_METHODS)} "
            f"(choices: labnet, sadc, identity, colour-transfer)"
        )
    return key


@dataclass
class Remover:
    """A ready shadow remover: the model (RGB, mask -> RGB), its method, where its weights came from."""

    model: nn.Module
    method: str
    weights: str
    mask_threshold: float
    recipe: Any = None
    features: nn.Module | None = None  # SADC's frozen VGG16 backbone

    def run(self, rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Shadow-free RGB [N, 3, H, W] of RGB images and binary masks."""
        if self.features is None:
            return self.model(rgb, mask)
        return self.model(rgb, mask, features=self.features)


def load_remover(
    method: str | None, weights: str | Path | None = None, vgg_weights: str | None = None, precision: str = "fp32"
) -> Remover:
    """Build the model of ``method`` (or of the weights' own recipe when ``method`` is None).

    ``precision="bf16"`` runs LAB-Net's blocks in bfloat16 and its global residual, last conv and the LAB
    conversions in fp32: about 2x faster on CPUs with AVX-512 BF16, pixels move by 1.5 8-bit levels at
    most on the bench's images (bench/deshadow.py).

    Raises:
        CheckpointError: no weights for a learned method, or weights that do not fit.
        UsageError: ``method`` contradicts the weights' recipe.
    """
    from evcli.methods.deshadow.baselines import ColourTransfer, Identity

    if method is not None:
        method = normalise_method(method)
    if precision not in ("fp32", "bf16"):
        raise UsageError(f"--precision must be fp32 or bf16, got '{precision}'")
    if method in BASELINES:
        if precision == "bf16":
            raise UsageError(BF16_LABNET_ONLY)
        model = Identity() if method == "identity" else ColourTransfer()
        return Remover(model.eval(), method, "none (baseline)", 0.9)
    if weights is None:
        name = method or "labnet"
        weights = shipped_weights(name)
        if weights is None:
            raise CheckpointError(
                f"no default weights ship for --method {name}",
                hint=f"train some with `evcli deshadow train --method {name}` and pass --weights RUN_DIR",
            )
    from evcli.engine.run import resolve_weights_source
    from evcli.io.checkpoint import load_model_weights, model_weights_from, read_safetensors
    from evcli.methods.deshadow.config import DeshadowConfig
    from evcli.methods.deshadow.method import DeshadowModel
    from evcli.recipe import recipe_from_saved

    path = resolve_weights_source(weights)
    tensors, meta = read_safetensors(path, "weights file")
    saved = meta.get("recipe")
    recipe = None
    if isinstance(saved, dict):
        if saved.get("command") != "deshadow":
            raise CheckpointError(f"{path} holds weights of 'evcli {saved.get('command')}', not of 'evcli deshadow'")
        recipe = recipe_from_saved(saved)
        cfg = recipe.method
        if method is not None and method != cfg.method:
            raise UsageError(f"{path} holds {cfg.method} weights, not {method}", hint=f"use --method {cfg.method}")
    else:  # weights without evcli metadata: the paper-size network of the named method
        cfg = DeshadowConfig(method=method or "labnet")
    if vgg_weights:
        cfg.vgg, cfg.vgg_weights = "pretrained", vgg_weights
    vgg = None
    if cfg.method == "sadc":
        from evcli.methods.deshadow.layers import vgg16_features

        vgg, _ = vgg16_features(cfg.vgg, cfg.vgg_weights)
    model = DeshadowModel(cfg)
    load_model_weights(model, model_weights_from(tensors, meta), str(path), strict=True)
    if cfg.method == "labnet":
        # channels-last runs LAB-Net's small dilated convs about 1.6x faster on CPU (bench/deshadow.py)
        model.net.to(memory_format=torch.channels_last)
        if precision == "bf16":  # the blocks in bf16; the global residual and the last 3x3 conv stay fp32
            model.net.to(torch.bfloat16)
            model.net.final.float()
    elif precision == "bf16":
        raise UsageError(BF16_LABNET_ONLY)
    return Remover(model.eval(), cfg.method, str(path), cfg.mask_threshold_test, recipe, vgg)


@torch.no_grad()
def remove_shadow(remover: Remover, rgb: torch.Tensor, mask: torch.Tensor, tile: int = 1024) -> torch.Tensor:
    """Shadow-free RGB [3, H, W] of ``rgb`` [3, H, W] with a binary ``mask`` [1, H, W].

    Images larger than ``tile`` on a side are processed in overlapping tiles (64 px overlap) blended with
    linear ramps, which bounds memory at any size.
    """
    h, w = rgb.shape[-2:]
    if max(h, w) <= tile:
        return remover.run(rgb[None], mask[None])[0].clamp(0, 1)
    overlap = 64
    step = tile - overlap
    out = torch.zeros_like(rgb)
    weight = torch.zeros(1, h, w)
    ys = list(range(0, max(h - tile, 0) + 1, step)) + ([h - tile] if h > tile and (h - tile) % step else [])
    xs = list(range(0, max(w - tile, 0) + 1, step)) + ([w - tile] if w > tile and (w - tile) % step else [])
    for y in ys:
        for x in xs:
            th, tw = min(tile, h), min(tile, w)
            part = remover.run(rgb[None, :, y : y + th, x : x + tw], mask[None, :, y : y + th, x : x + tw])[0]
            ramp_y = torch.clamp(torch.minimum(torch.arange(th) + 1, th - torch.arange(th)) / overlap, max=1.0)
            ramp_x = torch.clamp(torch.minimum(torch.arange(tw) + 1, tw - torch.arange(tw)) / overlap, max=1.0)
            wgt = (ramp_y[:, None] * ramp_x[None, :])[None]
            out[:, y : y + th, x : x + tw] += part.clamp(0, 1) * wgt
            weight[:, y : y + th, x : x + tw] += wgt
    return out / weight.clamp_min(1e-6)


def read_image(path: Path) -> torch.Tensor:
    """An image file as RGB [3, H, W] in [0, 1] (16-bit, grayscale, RGBA handled; DataError names the file)."""
    img = np.asarray(load_rgb(path), dtype=np.float32) / 255.0
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()


def read_user_mask(path: Path, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """A user's mask file as a binary [1, H, W]: resized (nearest, with a warning) to the image size and
    thresholded (with a warning when it is not binary)."""
    from evcli.data.shadow import load_mask

    m = load_mask(path, size, warn_resize=True)
    values = torch.unique(m)
    if not bool(((values == 0) | (values == 1)).all()):
        warn(f"mask {path} is not binary ({values.numel()} levels): thresholded at {threshold}")
    return (m > threshold).float()


def comparison(before: torch.Tensor, mask: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """before | mask | after side by side with 8 px white gaps, [3, H, 3W + 16]."""
    gap = torch.ones(3, before.shape[1], 8)
    return torch.cat([before, gap, mask.expand(3, -1, -1), gap, after], dim=2)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (sorted); DataError when there are none."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    if not files:
        raise DataError(f"no images in {folder} (looked for .png/.jpg/... files)")
    return files
