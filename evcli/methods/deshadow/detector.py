"""The learned shadow detector behind ``evcli deshadow IMAGE`` (``--mask auto``): a compact U-Net.

Design: U-Net (Ronneberger, Fischer and Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015, arXiv 1505.04597) at a small width: four levels of two 3x3 conv + BatchNorm +
ReLU (widths c, 2c, 4c, 8c; c = 16 by default), max-pool down, bilinear up with skip concatenation, a 1x1
head to one shadow logit per pixel. Why this design: shadow detection is binary segmentation where both
context (is this dark region cast by something?) and sharp boundaries matter; the U-Net's skips give the
boundaries at full resolution and its 1/8 bottleneck a receptive field of about 140 px, with ~0.47 M
parameters (1.9 MB) and no pretrained backbone to download. It trains from scratch in CPU minutes on
rendered shadows.

Inference (:func:`detect_shadow`) runs at a working size (longer side resized to ``work_size``: the detector's
``work_size`` attribute, which :func:`evcli.methods.deshadow.infer.load_detector` sets from its weights' recipe,
``deshadow.detector_work_size`` or else the training crop size ``data.img_size``; ``WORK_SIZE`` = 384 px for
weights without a recipe), upsamples the probability map, thresholds it at 0.5 and drops regions under 0.2 % of
the image. The network's cost is thus bounded at any photo size (a 12000x8000 photo costs it what a 640x480 one
does) and a whole photo reaches it at the scale of the whole-photo training crops: a detector trained on
128 px crops and run at 384 px misses more shadow and flags more lit pixels (the 2026-12-03 val numbers are in
``bench/results/deshadow_detector_scale.json``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

WORK_SIZE = 384  # longer side of the detector's working image when its weights do not say (no recipe)
LOW_CONFIDENCE = 0.08  # warn when more than this fraction of the image is uncertain (0.25 < p < 0.75)
LARGE_MASK = 0.40  # warn when the estimated mask covers more than this fraction of the image


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ShadowDetector(nn.Module):
    """Compact U-Net: RGB in [0, 1] [N, 3, H, W] -> shadow logits [N, 1, H, W] (any H, W: padded to 8)."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        c = channels
        self.enc1, self.enc2, self.enc3 = _double_conv(3, c), _double_conv(c, 2 * c), _double_conv(2 * c, 4 * c)
        self.mid = _double_conv(4 * c, 8 * c)
        self.dec3, self.dec2, self.dec1 = (
            _double_conv(8 * c + 4 * c, 4 * c),
            _double_conv(4 * c + 2 * c, 2 * c),
            _double_conv(2 * c + c, c),
        )
        self.head = nn.Conv2d(c, 1, 1)
        self.work_size = WORK_SIZE  # inference: longer side of the working image (load_detector sets it)
        # inputs are centred so the first layer sees zero-mean values (no per-dataset statistics)
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        h, w = rgb.shape[-2:]
        ph, pw = (-h) % 8, (-w) % 8
        x = (rgb - self.mean) * 2.0
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        m = self.mid(F.max_pool2d(e3, 2))
        d3 = self.dec3(torch.cat([_up(m, e3), e3], 1))
        d2 = self.dec2(torch.cat([_up(d3, e2), e2], 1))
        d1 = self.dec1(torch.cat([_up(d2, e1), e1], 1))
        return self.head(d1)[..., :h, :w]


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def balanced_bce(logits: torch.Tensor, mask: torch.Tensor, pos_weight: float = 2.0) -> torch.Tensor:
    """Binary cross-entropy with shadow pixels weighted ``pos_weight`` x: shadows are the minority class and
    BER (the metric) averages the error rates of both classes; 1 favours fewer false alarms."""
    target = (mask > 0.5).to(logits.dtype)
    weight = 1.0 + (pos_weight - 1.0) * target
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight)


def confusion_sums(prob: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """``[TP, TN, FP, FN]`` pixel counts (float64) of a probability map against a binary mask."""
    pred = prob > threshold
    gt = mask > 0.5
    return torch.stack([(pred & gt).sum(), (~pred & ~gt).sum(), (pred & ~gt).sum(), (~pred & gt).sum()]).double()


def ber_iou(sums: torch.Tensor) -> dict[str, float]:
    """Balanced error rate (%) and IoU of the shadow class from ``[TP, TN, FP, FN]`` sums.

    BER = 100 (1 - (TP/(TP+FN) + TN/(TN+FP)) / 2), the standard shadow-detection metric (SBU/ISTD);
    a class with no pixels counts as fully correct."""
    tp, tn, fp, fn = (float(v) for v in sums)
    recall_s = tp / (tp + fn) if tp + fn > 0 else 1.0
    recall_n = tn / (tn + fp) if tn + fp > 0 else 1.0
    union = tp + fp + fn
    return {
        "ber": 100.0 * (1.0 - 0.5 * (recall_s + recall_n)),
        "ber_shadow": 100.0 * (1.0 - recall_s),
        "ber_nonshadow": 100.0 * (1.0 - recall_n),
        "iou": tp / union if union > 0 else 1.0,
    }


@dataclass
class Detection:
    """A detected mask [1, H, W] (0/1), the probability map at the detector's working size, and what a user
    should be told about it."""

    mask: torch.Tensor
    prob: torch.Tensor
    fraction: float
    uncertain: float  # fraction of pixels with 0.25 < p < 0.75

    def warnings(self) -> list[str]:
        out = []
        if self.fraction > LARGE_MASK:
            out.append(
                f"the estimated shadow mask covers {100 * self.fraction:.0f}% of the image (over "
                f"{100 * LARGE_MASK:.0f}%): check the written mask and pass a corrected one with --mask"
            )
        if self.uncertain > LOW_CONFIDENCE:
            out.append(
                f"the shadow detector is unsure about {100 * self.uncertain:.0f}% of the image: check the "
                "written mask and pass a corrected one with --mask"
            )
        return out


@torch.no_grad()
def detect_shadow(
    detector: nn.Module, rgb: torch.Tensor, threshold: float = 0.5, work_size: int | None = None
) -> Detection:
    """Shadow mask of one RGB image [3, H, W] in [0, 1] with a trained :class:`ShadowDetector`, run with the
    longer side resized to ``work_size`` (None: the detector's own ``work_size``, else ``WORK_SIZE``)."""
    if work_size is None:
        work_size = int(getattr(detector, "work_size", WORK_SIZE))
    h, w = rgb.shape[-2:]
    x = rgb[None].float()
    f = work_size / max(h, w)  # smaller photos are enlarged: a whole scene reaches it at its training scale
    if f != 1.0:
        size = (max(1, round(h * f)), max(1, round(w * f)))
        x = F.interpolate(x, size=size, mode="bilinear", antialias=f < 1.0, align_corners=False)
    prob = torch.sigmoid(detector(x).float())[0].clamp_(0, 1)  # [1, h', w'] at the working size
    full = prob
    if full.shape[-2:] != (h, w):
        full = F.interpolate(prob[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    uncertain = float(((full > 0.25) & (full < 0.75)).count_nonzero()) / (h * w)
    keep = (full > threshold).numpy()  # bool [1, H, W]
    del full  # a photo's full-size maps are large: one at a time
    if keep.any():  # speckles are not cast shadows: drop regions under 0.2 % of the image
        from evcli.methods.deshadow.baselines import _drop_small_regions

        keep = _drop_small_regions(keep[0], max(4, int(0.002 * h * w)))[None]
    mask = torch.from_numpy(keep).float()
    return Detection(mask, prob, float(mask.mean()), uncertain)
