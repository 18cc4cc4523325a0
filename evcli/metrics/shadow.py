"""The shadow-removal evaluation protocol of ISTD/SRD papers: LAB error on shadow, non-shadow and all
pixels, PSNR and SSIM, with an explicit resize policy.

What "RMSE" means in these papers is a mean absolute error in CIE-LAB: per pixel, |dL| + |da| + |db|,
summed over a region of the whole dataset and divided by the number of pixels of that region
(dataset-level, per pixel) for S (shadow), NS (non-shadow) and All. PSNR and SSIM are computed per
image in RGB on [0, 1] and averaged; the masked PSNR variants zero the other region in both images.

Resize policy (printed with every result, since numbers differ by more than 1 LAB unit between them):

* ``256x256``: result, ground truth and mask resized to 256x256 before anything else (bicubic with
  antialiasing for images, bilinear for the mask, then mask = value != 0), as the community MATLAB
  scripts do;
* ``full``: evaluated at the images' own resolution, mask = value > 0.5.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from evcli.metrics.image import psnr, rgb_to_lab, ssim

ResizePolicy = Literal["256x256", "full"]
RESIZE_POLICIES: tuple[str, ...] = ("256x256", "full")


def apply_resize_policy(
    pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, policy: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images [N, 3, H, W] in [0, 1] and a mask [N, 1, H, W] as the policy evaluates them (mask boolean)."""
    if policy == "256x256":
        size = (256, 256)
        pred = F.interpolate(pred.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
        gt = F.interpolate(gt.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
        m = F.interpolate(mask.float(), size=size, mode="bilinear", align_corners=False) > 1e-6
        return pred.clamp(0, 1), gt.clamp(0, 1), m
    if policy == "full":
        return pred.float().clamp(0, 1), gt.float().clamp(0, 1), mask.float() > 0.5
    raise ValueError(f"unknown resize policy {policy!r} (choices: {', '.join(RESIZE_POLICIES)})")


class ShadowMetrics:
    """Accumulates the protocol's sums over batches; :meth:`totals` can be summed over processes."""

    FIELDS = ("err_s", "err_ns", "n_s", "n_ns", "psnr", "psnr_s", "psnr_ns", "ssim", "images")

    def __init__(self, policy: str = "256x256", device: torch.device | str = "cpu"):
        if policy not in RESIZE_POLICIES:
            raise ValueError(f"unknown resize policy {policy!r} (choices: {', '.join(RESIZE_POLICIES)})")
        self.policy = policy
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> None:
        """Add a batch: RGB result and ground truth [N, 3, H, W] in [0, 1], mask [N, 1, H, W]."""
        pred, gt, m = apply_resize_policy(pred, gt, mask, self.policy)
        pred, gt, mf = pred.double(), gt.double(), m.double()
        err = (rgb_to_lab(pred) - rgb_to_lab(gt)).abs().sum(1, keepdim=True)  # |dL|+|da|+|db| per pixel
        s = torch.stack(
            [
                (err * mf).sum(),
                (err * (1 - mf)).sum(),
                mf.sum(),
                (1 - mf).sum(),
                psnr(pred, gt).sum(),
                psnr(pred * mf, gt * mf).sum(),
                psnr(pred * (1 - mf), gt * (1 - mf)).sum(),
                ssim(pred, gt).sum(),
                torch.tensor(float(pred.shape[0]), dtype=torch.float64),
            ]
        )
        self.sums += s.to(self.sums)

    def totals(self) -> torch.Tensor:
        """The raw sums (reduce them over processes, then call :func:`shadow_summary`)."""
        return self.sums

    def summary(self) -> dict[str, float]:
        return shadow_summary(self.sums, self.policy)


def shadow_summary(sums: torch.Tensor, policy: str) -> dict[str, float]:
    """Final metrics from (possibly process-summed) :class:`ShadowMetrics` sums (all floats, so they can be
    logged; the caller prints ``policy`` beside them)."""
    err_s, err_ns, n_s, n_ns, p, p_s, p_ns, ss, n = sums.tolist()
    n = max(n, 1.0)
    nan = float("nan")
    return {
        "lab_mae_s": err_s / n_s if n_s > 0 else nan,
        "lab_mae_ns": err_ns / n_ns if n_ns > 0 else nan,
        "lab_mae_all": (err_s + err_ns) / max(n_s + n_ns, 1.0),
        "psnr": p / n,
        "psnr_s": p_s / n,
        "psnr_ns": p_ns / n,
        "ssim": ss / n,
        "images": n,
    }


def evaluate_pairs(
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], policy: str = "256x256"
) -> dict[str, float]:
    """Metrics of a list of (result, ground truth, mask) triples, each [3, H, W] / [1, H, W]."""
    acc = ShadowMetrics(policy)
    for pred, gt, mask in pairs:
        acc.update(pred[None], gt[None], mask[None])
    return acc.summary()
