"""Baselines of ``evcli deshadow`` and the classical shadow-mask estimator.

* ``identity``: the input itself (what every method must beat on non-shadow pixels).
* ``colour_transfer``: Reinhard-style statistics matching in CIE-LAB: inside the mask, each LAB channel
  is shifted and scaled so that its mean and standard deviation match those of the lit ring around the
  shadow (the mask dilated by ``ring`` pixels, minus the mask; all lit pixels if the ring is empty).
* :func:`estimate_shadow_mask`: a classical detector for images without a mask: shadows are darker and
  bluer than the surfaces they fall on, so the score ``L + 0.5 b`` (CIE-LAB, after a 5x5 box blur) is
  thresholded with Otsu's method, then the mask is cleaned by a 3x3 opening and a 7x7 closing and regions
  below 0.2 % of the image are dropped. Dark objects are flagged too: check the written mask and pass a
  corrected one with ``--mask``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evcli.methods.deshadow.layers import dilate, erode
from evcli.metrics.image import lab_to_rgb, rgb_to_lab


class Identity(nn.Module):
    """Returns the input image."""

    def forward(self, rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return rgb


class ColourTransfer(nn.Module):
    """Per-image LAB mean/std matching of the shadow region to its lit surroundings."""

    def __init__(self, ring: int = 21) -> None:
        super().__init__()
        self.ring = ring

    def forward(self, rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lab = rgb_to_lab(rgb.double())
        out = lab.clone()
        for i in range(rgb.shape[0]):
            m = mask[i : i + 1] > 0.5
            if not bool(m.any()):
                continue
            ring = (dilate(m.double(), self.ring) > 0.5) & ~m
            if not bool(ring.any()):
                ring = ~m
            if not bool(ring.any()):
                continue
            src = lab[i][:, m[0, 0]]  # [3, S]
            ref = lab[i][:, ring[0, 0]]  # [3, R]
            scale = ref.std(1, unbiased=False) / src.std(1, unbiased=False).clamp_min(1e-3)
            moved = (src - src.mean(1, keepdim=True)) * scale[:, None] + ref.mean(1, keepdim=True)
            out[i][:, m[0, 0]] = moved
        return lab_to_rgb(out).to(rgb.dtype)


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-d array (maximises the between-class variance); the minimum for an array with
    (almost) no spread, which then has nothing below the threshold (a flat image has no shadow to find)."""
    low, high = float(values.min()), float(values.max())
    if not high - low > 1e-6 * max(1.0, abs(high)):
        return low
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between))])


@torch.no_grad()
def estimate_shadow_mask(rgb: torch.Tensor) -> torch.Tensor:
    """A binary shadow mask [1, H, W] (float 0/1) of one RGB image [3, H, W] in [0, 1] (see module doc)."""
    lab = rgb_to_lab(F.avg_pool2d(rgb[None].float(), 5, stride=1, padding=2, count_include_pad=False))[0]
    score = lab[0] + 0.5 * lab[2]
    t = _otsu(score.flatten().numpy())
    m = (score < t).float()[None, None]
    m = dilate(erode(m, 3), 3)  # opening: drops speckles
    m = erode(dilate(m, 7), 7)  # closing: fills small holes
    keep = _drop_small_regions(m[0, 0].numpy() > 0.5, max(16, int(0.002 * m.numel())))
    return torch.from_numpy(keep.astype(np.float32))[None]


def _drop_small_regions(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """Remove 4-connected regions smaller than ``min_pixels`` (scipy's labelling when present)."""
    try:
        from scipy import ndimage
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        return mask
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    good = sizes >= min_pixels
    good[0] = False
    return good[labels]
