"""SADC (arXiv 2205.04908): shadow-aware dynamic convolution and the DHAN-style network around it.

A :class:`DynConv` runs a heavy two-layer full convolution on shadow pixels and a light depthwise
convolution on the others, each with a residual. In training both paths are computed densely and
blended by the mask (and the layer records the channel statistics that the intra-convolution
distillation compares); at inference the heavy path is evaluated only on the image tiles that hold shadow
pixels (and, for its first conv, their receptive field), batched into one convolution per conv, so its
cost scales with the shadow area.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from evcli.methods.deshadow.layers import ConvLayer, dilate, erode, pad_reflect

VGG_BLOCKS = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # VGG16 features[:-1] in five blocks
HYPERCOLUMN_CHANNELS = (3, 64, 128, 256, 512, 512)  # 1475 in all


def _tile_index(region: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices ([n, size, 1], [n, 1, size]) of the ``size`` x ``size`` tiles of an [H, W] map
    that hold any pixel of ``region``; ``t[:, rows, cols]`` gathers them as [C, n, size, size].

    Tiles lie on a grid; the last row and column are moved back to end at the border (they overlap their
    neighbours, with equal values) so every tile is whole. Needs ``size <= H, W``.
    """
    h, w = region.shape
    occupied = F.max_pool2d(region[None, None].float(), size, size, ceil_mode=True)[0, 0] > 0
    cells = occupied.nonzero()
    top = (cells[:, 0] * size).clamp(max=h - size)
    left = (cells[:, 1] * size).clamp(max=w - size)
    steps = torch.arange(size, device=region.device)
    return (top[:, None] + steps)[:, :, None], (left[:, None] + steps)[:, None, :]


def _tile_conv(xpad: torch.Tensor, conv: nn.Conv2d, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``conv`` + LeakyReLU evaluated on the given tiles only, batched into one call.

    Args:
        xpad: one map [C, H + 2p, W + 2p], padded by the conv's ``p`` on every side.
        rows, cols: the tiles (``_tile_index``), in unpadded coordinates.

    Returns:
        [C_out, n, size, size]: the valid convolution of each tile's crop (the tile plus its halo), so the
        MACs are those of the tiles' pixels.
    """
    halo = torch.arange(conv.dilation[0] * (conv.kernel_size[0] - 1) + 1, device=rows.device)
    crop_rows = torch.cat([rows, rows[:, -1:] + halo[1:, None]], dim=1)  # the tile plus 2p rows below
    crop_cols = torch.cat([cols, cols[:, :, -1:] + halo[None, 1:]], dim=2)
    crops = xpad[:, crop_rows, crop_cols].transpose(0, 1)  # [n, C, size + 2p, size + 2p]
    out = F.conv2d(crops, conv.weight, conv.bias, dilation=conv.dilation, groups=conv.groups)
    return F.leaky_relu(out, 0.2).transpose(0, 1)


def _reflect_border(buf: torch.Tensor, pad: int) -> None:
    """Fill the ``pad``-wide border of [C, H + 2p, W + 2p] in place by reflecting its interior (the same
    values as ``F.pad(interior, mode="reflect")``)."""
    if pad == 0:
        return
    p = pad
    buf[:, :p, p:-p] = buf[:, p + 1 : 2 * p + 1, p:-p].flip(1)
    buf[:, -p:, p:-p] = buf[:, -2 * p - 1 : -p - 1, p:-p].flip(1)
    buf[:, :, :p] = buf[:, :, p + 1 : 2 * p + 1].flip(2)
    buf[:, :, -p:] = buf[:, :, -2 * p - 1 : -p - 1].flip(2)


class DynConv(nn.Module):
    """Shadow-aware dynamic convolution: ``m * (heavy(x) + x) + (1 - m) * (light(x) + x)`` with heavy =
    two full k x k ConvLayers and light = one depthwise k x k ConvLayer (dilation ``d``).

    Args:
        channels: C_in = C_out.
        kernel, dilation: of all three convolutions.
        sparse: evaluate the heavy path only where needed at inference (training is always dense).
    """

    # The sparse path is used while its tiles hold less than this fraction of the dense path's outputs
    # (bench/deshadow.py: on CPU the tiled path costs more than the dense one from about 40-50 %).
    SPARSE_BELOW = 0.4

    def __init__(self, channels: int, kernel: int = 3, dilation: int = 1, sparse: bool = True):
        super().__init__()
        self.conv_a = ConvLayer(channels, channels, kernel, dilation)
        self.conv_b = ConvLayer(channels, channels, kernel, dilation)
        self.light = ConvLayer(channels, channels, kernel, dilation, groups=channels)
        self.sparse = sparse
        self.last_heavy_fraction = 1.0  # share of the dense heavy path the last sparse forward computed
        self.stats: tuple[torch.Tensor, torch.Tensor] | None = None  # (heavy boundary, light ring) means

    def forward(self, x: torch.Tensor, m: torch.Tensor, inner: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
        if not self.training and self.sparse:
            return self._sparse(x, m)
        heavy = self.conv_b(self.conv_a(x))
        light = self.light(x)
        if self.training:
            self.stats = (_region_mean(heavy, inner, m), _region_mean(light, outer, m))
        return x + m * heavy + (1.0 - m) * light

    def _sparse(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Inference: the light depthwise path everywhere (C*k*k MACs per pixel), the heavy two-conv path only
        on the tiles that hold shadow pixels; equal to the dense path at every pixel (tested).

        conv_b at a shadow pixel reads conv_a's output up to ``pad`` pixels away (or its reflection at the
        border, which lies within ``pad`` pixels too), so conv_a runs on the tiles meeting the shadow dilated
        by ``pad`` and conv_b on the tiles meeting the shadow, each batched into one convolution.
        """
        out = x + self.light(x)
        h, w = x.shape[-2:]
        pad = self.conv_a.pad
        size = max(32, min(128, 2 * pad))  # a tile's halo costs a copy, not MACs: larger tiles for larger dilations
        fractions = []
        for i in range(x.shape[0]):
            shadow = m[i, 0] > 0.5
            if not bool(shadow.any()):
                fractions.append(0.0)
                continue
            tiles_b = _tile_index(shadow, size) if size <= min(h, w) and pad < min(h, w) else None
            if tiles_b is not None:
                need = dilate(shadow[None, None].float(), 2 * pad + 1)[0, 0] > 0.5 if pad else shadow
                tiles_a = _tile_index(need, size)
                fraction = (len(tiles_a[0]) + len(tiles_b[0])) * size * size / (2.0 * h * w)
            if tiles_b is None or fraction >= self.SPARSE_BELOW:  # small map or large shadow: dense is cheaper
                heavy = self.conv_b(self.conv_a(x[i : i + 1]))[0]
                out[i] = torch.where(shadow, x[i] + heavy, out[i])
                fractions.append(1.0)
                continue
            fractions.append(fraction)
            a_pad = x.new_zeros(x.shape[1], h + 2 * pad, w + 2 * pad)  # conv_a's output, reflection-padded
            rows, cols = tiles_a
            x_pad = pad_reflect(x[i : i + 1], pad)[0]
            a_pad[:, rows + pad, cols + pad] = _tile_conv(x_pad, self.conv_a.conv, rows, cols)
            _reflect_border(a_pad, pad)
            rows, cols = tiles_b
            heavy = _tile_conv(a_pad, self.conv_b.conv, rows, cols)
            xi, oi = x[i], out[i]
            oi[:, rows, cols] = torch.where(shadow[rows, cols], xi[:, rows, cols] + heavy, oi[:, rows, cols])
        self.last_heavy_fraction = sum(fractions) / max(len(fractions), 1)
        return out


def _region_mean(feat: torch.Tensor, region: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per-sample channel means of ``feat`` over ``region``; the global means where the mask covers <= 100
    pixels or > 99 % of the image (the boundary is then meaningless)."""
    area = m.flatten(1).sum(1)
    hw = m.shape[-1] * m.shape[-2]
    region_sum = region.flatten(1).sum(1)
    use_global = (area <= 100) | (area > 0.99 * hw) | (region_sum < 1)
    regional = (feat * region).flatten(2).sum(2) / region_sum.clamp_min(1.0)[:, None]
    return torch.where(use_global[:, None], feat.flatten(2).mean(2), regional)


class Aggregation(nn.Module):
    """SE-style channel attention (avg-pool, Linear C -> C/8 + ReLU, Linear -> C, sigmoid) then a 3x3
    ConvLayer to ``cout``."""

    def __init__(self, cin: int, cout: int = 64) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cin, cin // 8), nn.Linear(cin // 8, cin)
        self.conv = ConvLayer(cin, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return self.conv(x * w[:, :, None, None])


class SPP(nn.Module):
    """Spatial pyramid pooling: average pools (kernel = stride 4, 8, 16, 32; capped at the map size),
    1x1 ConvLayer each, bicubic upsampling, concat with the input, 3x3 ConvLayer back to C."""

    def __init__(self, channels: int = 64, levels: tuple[int, ...] = (4, 8, 16, 32)) -> None:
        super().__init__()
        self.levels = levels
        self.convs = nn.ModuleList(ConvLayer(channels, channels, 1) for _ in levels)
        self.fuse = ConvLayer(channels * (len(levels) + 1), channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        outs = [x]
        for s, conv in zip(self.levels, self.convs):
            s = max(1, min(s, h, w))
            p = conv(F.avg_pool2d(x, s, s))
            outs.append(F.interpolate(p, size=(h, w), mode="bicubic", align_corners=False))
        return self.fuse(torch.cat(outs, dim=1))


class Hypercolumn(nn.Module):
    """Frozen VGG16 hypercolumn (input + five block outputs = 1475 channels, bicubic to full size) followed
    by the trainable 1x1 fusion to C + LeakyReLU.

    The fusion is applied to each level at its own resolution before upsampling and the results are
    summed; 1x1 convolution and bicubic upsampling are both linear, so this equals fusing the upsampled
    1475-channel stack (up to float rounding) without materialising it (1.8 GB at 640x480).
    """

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.fusion = nn.Conv2d(sum(HYPERCOLUMN_CHANNELS), channels, 1)
        self._levels: list[tuple[int, int]] = []

    def forward(self, rgb: torch.Tensor, features: nn.Sequential) -> torch.Tensor:
        """``features``: the frozen VGG16 feature stack (a frozen module of the run, never part of this one)."""
        h, w = rgb.shape[-2:]
        with torch.no_grad():
            levels, x = [rgb], rgb
            for a, b in VGG_BLOCKS:
                x = features[a:b](x)
                levels.append(x)
        weight = self.fusion.weight
        out, start = None, 0
        self._levels = []
        for feat, c in zip(levels, HYPERCOLUMN_CHANNELS):
            y = F.conv2d(feat.detach(), weight[:, start : start + c])
            self._levels.append((feat.shape[-2] * feat.shape[-1] * feat.shape[0], c))
            start += c
            if y.shape[-2:] != (h, w):
                y = F.interpolate(y, size=(h, w), mode="bicubic", align_corners=False)
            out = y if out is None else out + y
        return F.leaky_relu(out + self.fusion.bias[None, :, None, None], 0.2)

    def macs(self, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> int:
        """MACs of the factorised fusion (the VGG convs are counted by their own hooks)."""
        return sum(pixels * c * self.fusion.out_channels for pixels, c in self._levels)


class SADCNet(nn.Module):
    """The SADC shadow-removal network (``ShadowRemoval(channels=64)`` of the card), without the release's
    unused modules. Output: the shadow-free RGB image (no global residual). Its frozen VGG16 hypercolumn
    backbone is given to ``forward`` (``features``): it is a frozen module of the run, not part of the
    trained network's parameters, checkpoints or exports."""

    STAGES = (((1, 1), (3, 1)), ((3, 2), (3, 4)), ((3, 8), (3, 16)), ((3, 32), (3, 64)))  # (kernel, dilation)

    def __init__(self, channels: int = 64, morph: int = 7, sparse: bool = True):
        super().__init__()
        c = channels
        self.morph = morph
        self.hypercolumn = Hypercolumn(c)
        self.dyn = nn.ModuleList(DynConv(c, k, d, sparse) for stage in self.STAGES for k, d in stage)
        self.agg0, self.agg1 = Aggregation(2 * c, c), Aggregation(3 * c, c)
        self.agg2, self.agg3 = Aggregation(3 * c, c), Aggregation(4 * c, c)
        self.spp = SPP(c)
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, rgb: torch.Tensor, mask: torch.Tensor, features: nn.Sequential) -> torch.Tensor:
        """RGB in [0, 1] [N, 3, H, W], a binary mask [N, 1, H, W] and the VGG16 features -> shadow-free RGB."""
        m = mask
        inner = m - erode(m, self.morph)
        outer = dilate(m, self.morph) - m
        f = self.hypercolumn(rgb, features)
        d = self.dyn
        o01 = d[0](f, m, inner, outer)
        o02 = d[1](o01, m, inner, outer)
        a0 = self.agg0(torch.cat([o01, o02], 1))
        o11 = d[2](a0, m, inner, outer)
        o12 = d[3](o11, m, inner, outer)
        a1 = self.agg1(torch.cat([a0, o11, o12], 1))
        o21 = d[4](a1, m, inner, outer)
        o22 = d[5](o21, m, inner, outer)
        a2 = self.agg2(torch.cat([a1, o21, o22], 1))
        o31 = d[6](a2, m, inner, outer)
        o32 = d[7](o31, m, inner, outer)
        a3 = self.agg3(torch.cat([a1, a2, o31, o32], 1))  # agg1, not agg0: as in the card
        return self.head(self.spp(a3))

    def kd_stats(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(heavy boundary mean, light ring mean) of every DynConv from the last training forward."""
        return [layer.stats for layer in self.dyn if layer.stats is not None]


def kd_coefficient(epoch: int, start: int, total: int) -> float:
    """c(e) of the distillation term: 0 before ``start``, then 1 - cos(pi/2 * (e - start) / (total - start))."""
    if epoch < start or total <= start:
        return 0.0
    return 1.0 - math.cos(math.pi / 2.0 * min(1.0, (epoch - start) / (total - start)))
