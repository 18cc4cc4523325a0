"""Super-resolution metrics: PSNR and SSIM on the Y channel (BT.601, MATLAB ``rgb2ycbcr``) with a border of
``scale`` pixels shaved, on 8-bit-rounded images, as the SR papers (and the DDTB release) measure them.

Y in [16, 235] / 255 = (16 + 65.481 R + 128.553 G + 24.966 B) / 255 for R, G, B in [0, 1]; PSNR =
-10 log10(MSE) on that [0, 1] scale; SSIM: Wang et al. (11x11 Gaussian, sigma 1.5) on Y, via
:func:`evcli.metrics.image.ssim`.
"""

from __future__ import annotations

import torch

from evcli.metrics.image import ssim

Y_COEFFS = (65.481, 128.553, 24.966)


def quantize8(x: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] images to 8-bit levels (what a saved PNG holds)."""
    return (x.clamp(0, 1) * 255.0).round() / 255.0


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] RGB in [0, 1] -> [N, 1, H, W] Y in [16/255, 235/255]."""
    c = torch.tensor(Y_COEFFS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (16.0 + (x * c).sum(1, keepdim=True)) / 255.0


def shave(x: torch.Tensor, border: int) -> torch.Tensor:
    return x[..., border:-border, border:-border] if border > 0 else x


def psnr_y(sr: torch.Tensor, hr: torch.Tensor, border: int) -> torch.Tensor:
    """Per-image PSNR (dB) on Y of 8-bit-rounded SR against HR, ``border`` px shaved ([N] float64)."""
    a = shave(rgb_to_y(quantize8(sr.double())), border)
    b = shave(rgb_to_y(quantize8(hr.double())), border)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


def ssim_y(sr: torch.Tensor, hr: torch.Tensor, border: int) -> torch.Tensor:
    """Per-image SSIM on Y (same rounding and border as :func:`psnr_y`)."""
    a = shave(rgb_to_y(quantize8(sr.double())), border)
    b = shave(rgb_to_y(quantize8(hr.double())), border)
    return ssim(a, b, data_range=1.0)
