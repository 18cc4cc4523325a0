"""Image-quality measures and colour conversions shared by image-restoration commands.

``rgb_to_lab`` follows the CIE definition used by scikit-image and MATLAB's ``makecform('srgb2lab')``
(sRGB companding, D65 white, L in [0, 100]); ``rgb_to_lab8`` packs it the way OpenCV does for 8-bit
images (L * 255/100, a + 128, b + 128), divided by 255, which is the network space of LAB-Net.
PSNR and SSIM take images in [0, 1], shaped [..., C, H, W].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# sRGB (linear) -> XYZ under D65, and its inverse (IEC 61966-2-1).
_RGB2XYZ = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
    dtype=torch.float64,
)
_XYZ2RGB = torch.linalg.inv(_RGB2XYZ)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
_EPS = (6.0 / 29.0) ** 3
_KAPPA = (29.0 / 6.0) ** 2 / 3.0


def _apply3(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,...jhw->...ihw", matrix.to(x), x)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE-LAB (L in [0, 100], a/b roughly [-128, 127]) of sRGB images in [0, 1], shaped [..., 3, H, W]."""
    rgb = rgb.clamp(0.0, 1.0)
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = _apply3(_RGB2XYZ, lin) / _WHITE.to(rgb).view(3, 1, 1)
    f = torch.where(xyz > _EPS, xyz.clamp_min(1e-12) ** (1.0 / 3.0), _KAPPA * xyz + 4.0 / 29.0)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-3)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] (clipped) of CIE-LAB images shaped [..., 3, H, W]; the inverse of :func:`rgb_to_lab`."""
    L, a, b = lab.unbind(-3)
    fy = (L + 16.0) / 116.0
    f = torch.stack([fy + a / 500.0, fy, fy - b / 200.0], dim=-3)
    xyz = torch.where(f > 6.0 / 29.0, f**3, (f - 4.0 / 29.0) / _KAPPA) * _WHITE.to(lab).view(3, 1, 1)
    lin = _apply3(_XYZ2RGB, xyz).clamp(0.0, 1.0)
    return torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(1e-12) ** (1.0 / 2.4) - 0.055, 12.92 * lin).clamp(0, 1)


def rgb_to_lab8(rgb: torch.Tensor) -> torch.Tensor:
    """OpenCV's 8-bit LAB container scaled to [0, 1]: (L * 255/100, a + 128, b + 128) / 255."""
    lab = rgb_to_lab(rgb)
    L, a, b = lab.unbind(-3)
    return (torch.stack([L * (255.0 / 100.0), a + 128.0, b + 128.0], dim=-3) / 255.0).clamp(0.0, 1.0)


def lab8_to_rgb(lab8: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_lab8` (sRGB in [0, 1])."""
    x = lab8 * 255.0
    L, a, b = x.unbind(-3)
    return lab_to_rgb(torch.stack([L * (100.0 / 255.0), a - 128.0, b - 128.0], dim=-3))


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per image of [N, C, H, W] tensors (identical images give +inf, capped at 100 dB)."""
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-10))).clamp(max=100.0)


def _gaussian_window(size: int, sigma: float, channels: int, ref: torch.Tensor) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).to(ref).expand(channels, 1, size, size).contiguous()


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, win: int = 11) -> torch.Tensor:
    """SSIM per image (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03), averaged
    over channels and valid window positions. Images smaller than the window use a window of their size."""
    x, y = pred.double(), target.double()
    c = x.shape[1]
    win = min(win, x.shape[-1], x.shape[-2])
    if win % 2 == 0:
        win -= 1
    w = _gaussian_window(win, 1.5, c, x)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = F.conv2d(x, w, groups=c), F.conv2d(y, w, groups=c)
    sxx = F.conv2d(x * x, w, groups=c) - mu_x**2
    syy = F.conv2d(y * y, w, groups=c) - mu_y**2
    sxy = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)
