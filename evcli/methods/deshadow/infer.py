"""Shadow removal on image files: loading a model (shipped default weights, a run's weights, or a
baseline), masks (given or estimated), tiled inference for large images, and the files written.

Usable without the CLI::

    from evcli.methods.deshadow.infer import estimate_mask, load_detector, load_remover, remove_shadow
    remover = load_remover("labnet")           # the shipped default weights
    mask, warnings = estimate_mask(rgb, load_detector())  # the shipped shadow detector
    result = remove_shadow(remover, rgb, mask)  # tensors [3, H, W] / [1, H, W] in [0, 1]

The lit region is kept: by default the result is the network's output inside the mask dilated by
``KEEP_LIT_MARGIN`` px (feathered over ``KEEP_LIT_FEATHER`` px) and the input pixels elsewhere (not in the
papers; ``keep_lit=False`` / ``--no-keep-lit`` returns the network's output everywhere, as they do).

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
MASK_METHODS = ("detector", "otsu")
KEEP_LIT_MARGIN = 8  # px the mask is dilated by before the network's output replaces the input
KEEP_LIT_FEATHER = 7  # px of linear blend outside that (the mask itself always takes the network's output)


def shipped_weights(method: str) -> Path | None:  # method: labnet, sadc or detector
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
        if cfg.method == "detector":
            raise UsageError(
                f"{path} holds shadow-detector weights, not a shadow remover's",
                hint="give LAB-Net or SADC weights with --weights (the detector runs with --mask auto)",
            )
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
def remove_shadow(
    remover: Remover, rgb: torch.Tensor, mask: torch.Tensor, tile: int = 1024, keep_lit: bool = True
) -> torch.Tensor:
    """Shadow-free RGB [3, H, W] of ``rgb`` [3, H, W] with a binary ``mask`` [1, H, W].

    Images larger than ``tile`` on a side are processed in overlapping tiles (``tile // 16`` px overlap,
    64 at the default) blended with linear ramps, which bounds the network's memory at any size. With
    ``keep_lit`` (the default) pixels away from the mask keep their input values (:func:`keep_lit_weight`);
    tiles with no such pixel are not run (their output would be discarded), and an empty mask returns the
    input unchanged without running the network. Full-size buffers: the output, the tiles' blend weights
    and the keep-lit weight (20 bytes a pixel besides the input); the blend is done in place.
    """
    if keep_lit and not bool((mask > 0.5).any()):
        return rgb.clone()
    weight = keep_lit_weight(mask) if keep_lit else None
    out = _run_tiled(remover, rgb, mask, tile, needed=weight)
    if weight is None:
        return out
    return out.sub_(rgb).mul_(weight).add_(rgb)  # weight * out + (1 - weight) * rgb, rgb exact where weight is 0


def keep_lit_weight(mask: torch.Tensor, margin: int = KEEP_LIT_MARGIN, feather: int = KEEP_LIT_FEATHER) -> torch.Tensor:
    """The network's share of each output pixel [1, H, W] when the lit region is kept: a box blur (radius
    ``feather``) of the mask dilated by ``margin`` px: 1 on the mask and up to ``margin - feather`` px
    around it, 0 from ``margin + feather`` px on, a linear blend between."""
    import torch.nn.functional as F

    from evcli.methods.deshadow.layers import dilate

    weight = dilate((mask > 0.5).float()[None], 2 * margin + 1)
    if feather > 0:
        k = 2 * feather + 1
        weight = F.avg_pool2d(weight, (1, k), stride=1, padding=(0, feather), count_include_pad=False)
        weight = F.avg_pool2d(weight, (k, 1), stride=1, padding=(feather, 0), count_include_pad=False)
    return weight[0]


MIN_SIDE = 32  # smaller images are padded (replicated edges) to this: SADC's VGG16 pools 4 times


def _run_tiled(
    remover: Remover, rgb: torch.Tensor, mask: torch.Tensor, tile: int, needed: torch.Tensor | None = None
) -> torch.Tensor:
    """The network's output over the whole image, tile by tile; with ``needed`` (a [1, H, W] weight), tiles
    where it is 0 everywhere are skipped and left 0 (no pixel of theirs is used)."""
    h, w = rgb.shape[-2:]
    if h < MIN_SIDE or w < MIN_SIDE:
        import torch.nn.functional as F

        ph, pw = max(0, MIN_SIDE - h), max(0, MIN_SIDE - w)
        big = F.pad(torch.cat([rgb, mask])[None], (0, pw, 0, ph), mode="replicate")[0]
        return remover.run(big[None, :3], big[None, 3:])[0, :, :h, :w].clamp(0, 1)
    if max(h, w) <= tile:
        return remover.run(rgb[None], mask[None])[0].clamp(0, 1)  # a new tensor: a model may return its input
    overlap = max(4, min(64, tile // 16))
    step = tile - overlap
    out = torch.zeros_like(rgb)
    weight = torch.zeros(1, h, w)
    ys = list(range(0, max(h - tile, 0) + 1, step)) + ([h - tile] if h > tile and (h - tile) % step else [])
    xs = list(range(0, max(w - tile, 0) + 1, step)) + ([w - tile] if w > tile and (w - tile) % step else [])
    th, tw = min(tile, h), min(tile, w)
    ramp_y = torch.clamp(torch.minimum(torch.arange(th) + 1, th - torch.arange(th)) / overlap, max=1.0)
    ramp_x = torch.clamp(torch.minimum(torch.arange(tw) + 1, tw - torch.arange(tw)) / overlap, max=1.0)
    wgt = (ramp_y[:, None] * ramp_x[None, :])[None]
    for y in ys:
        for x in xs:
            if needed is not None and not bool(needed[:, y : y + th, x : x + tw].any()):
                continue
            part = remover.run(rgb[None, :, y : y + th, x : x + tw], mask[None, :, y : y + th, x : x + tw])[0]
            out[:, y : y + th, x : x + tw].addcmul_(part.clamp(0, 1), wgt)
            weight[:, y : y + th, x : x + tw] += wgt
    return out.div_(weight.clamp_(min=1e-6))


def read_image(path: Path) -> torch.Tensor:
    """An image file as RGB [3, H, W] in [0, 1] (16-bit, grayscale, RGBA handled; DataError names the file)."""
    img = torch.from_numpy(np.array(load_rgb(path), dtype=np.uint8))  # reordered in 8 bits, 4x less than float
    return img.permute(2, 0, 1).contiguous().float().div_(255.0)


def read_user_mask(path: Path, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """A user's mask file as a binary [1, H, W]: resized (nearest, with a warning) to the image size and
    thresholded (with a warning when it is not binary)."""
    from evcli.data.shadow import load_mask

    m = load_mask(path, size, warn_resize=True)
    values = torch.unique(m)
    if not bool(((values == 0) | (values == 1)).all()):
        warn(f"mask {path} is not binary ({values.numel()} levels): thresholded at {threshold}")
    return (m > threshold).float()


COMPARE_MIN_HEIGHT = 256  # panels are enlarged (nearest) to at least this height
COMPARE_MAX_HEIGHT = 720  # and shrunk (area) to at most this one


def comparison(
    before: torch.Tensor, mask: torch.Tensor, after: torch.Tensor, labels: tuple[str, str, str] | None = None
) -> torch.Tensor:
    """Labelled panels ``input | mask | output`` side by side with 8 px white gaps, [3, H', W'] in [0, 1].

    Panels are scaled to a readable height (256-720 px, aspect kept) and each gets its label in a white band
    above it."""
    import torch.nn.functional as F
    from PIL import Image, ImageDraw, ImageFont

    labels = labels or ("input", "mask", "output")
    h, w = before.shape[-2:]
    target = min(max(h, COMPARE_MIN_HEIGHT), COMPARE_MAX_HEIGHT)
    nh, nw = target, max(1, round(w * target / h))
    panels = []
    for t in (before, mask, after):  # resized first, so a large image is never copied at full size
        t = t.float()[None]  # float32 input: no copy
        if (nh, nw) != (h, w):
            t = F.interpolate(t, size=(nh, nw), mode="nearest" if nh > h else "area")
        panels.append(t[0].clamp(0, 1).expand(3, -1, -1))
    band = max(20, nh // 14)
    try:
        font = ImageFont.load_default(size=int(band * 0.7))
    except (TypeError, OSError):  # Pillow without FreeType: its small bitmap font
        font = ImageFont.load_default()
    out = []
    for panel, text in zip(panels, labels):
        strip = Image.new("RGB", (max(nw, 1), band), (255, 255, 255))
        ImageDraw.Draw(strip).text((4, band // 8), text, fill=(0, 0, 0), font=font)
        head = torch.from_numpy(np.asarray(strip, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append(torch.cat([head, panel], dim=1))
        out.append(torch.ones(3, nh + band, 8))
    return torch.cat(out[:-1], dim=2)


def load_detector(weights: str | Path | None = None) -> nn.Module:
    """The shadow detector (the shipped one, or ``weights``: a detector run folder or .safetensors), eval mode.

    Raises:
        CheckpointError: no shipped detector, or weights that are not a detector's.
    """
    from evcli.engine.run import resolve_weights_source
    from evcli.io.checkpoint import load_model_weights, model_weights_from, read_safetensors
    from evcli.methods.deshadow.config import DeshadowConfig
    from evcli.methods.deshadow.method import DeshadowModel
    from evcli.recipe import recipe_from_saved

    if weights is None:
        weights = shipped_weights("detector")
        if weights is None:
            raise CheckpointError(
                "no shadow detector ships in this installation",
                hint="use --mask-method otsu, or pass a mask with --mask",
            )
    path = resolve_weights_source(weights)
    tensors, meta = read_safetensors(path, "detector weights file")
    saved = meta.get("recipe")
    recipe = recipe_from_saved(saved) if isinstance(saved, dict) else None
    cfg = recipe.method if recipe is not None else DeshadowConfig(method="detector")
    if cfg.method != "detector":
        raise CheckpointError(f"{path} holds {cfg.method} weights, not a shadow detector's")
    model = DeshadowModel(cfg)
    load_model_weights(model, model_weights_from(tensors, meta), str(path), strict=True)
    net = model.net.eval()
    if recipe is not None:  # photos reach it at the scale of its training crops (detector.detect_shadow)
        net.work_size = cfg.detector_work_size or recipe.data.img_size
    return net


def estimate_mask(
    rgb: torch.Tensor, detector: nn.Module | None = None, method: str = "detector"
) -> tuple[torch.Tensor, list[str]]:
    """A binary shadow mask [1, H, W] of ``rgb`` and the warnings a user should see (a mask over 40 % of the
    image; a detector unsure about much of it). ``method``: ``detector`` (learned; ``detector`` is loaded
    when None) or ``otsu`` (the classical estimator of :mod:`baselines`)."""
    from evcli.methods.deshadow.detector import Detection, detect_shadow

    if method == "otsu":
        from evcli.methods.deshadow.baselines import estimate_shadow_mask

        m = estimate_shadow_mask(rgb)
        det = Detection(m, m, float(m.mean()), 0.0)
    elif method == "detector":
        det = detect_shadow(detector if detector is not None else load_detector(), rgb)
    else:
        raise UsageError(f"unknown --mask-method '{method}' (choices: {', '.join(MASK_METHODS)})")
    return det.mask, det.warnings()


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (sorted); DataError when there are none."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    if not files:
        raise DataError(f"no images in {folder} (looked for .png/.jpg/... files)")
    return files
