"""LAB-Net (arXiv 2208.13039): a lightweight mask-guided shadow-removal network working in LAB.

Input: the image in OpenCV's 8-bit LAB container scaled to [0, 1] (see ``evcli.metrics.image.rgb_to_lab8``)
and a binary shadow mask. Two cross-fused streams of Basic Blocks (parallel dilated convs of widths
C/2, C, 3C/2), Enhanced Channel Attention (per-channel standard deviation of a Laplacian response),
Local Spatial Attention letting shadow pixels attend to the non-shadow ring around them, and a global
residual. ``channels=32`` is the paper's size (0.93 M parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evcli.methods.deshadow.layers import ConvLayer, conv1x1_sum, dilate, fused_inference

LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])  # 4-neighbour Laplacian


def _std_from_sums(total: torch.Tensor, squares: torch.Tensor, n: int) -> torch.Tensor:
    """Sample standard deviation from the sum and the sum of squares of ``n`` values (a Laplacian response
    has a mean near 0: no cancellation)."""
    mean = total / n
    return ((squares - n * mean * mean) / max(n - 1, 1)).clamp_min(0.0).sqrt()


class EnhancedChannelAttention(nn.Module):
    """ECA: depthwise 3x3 Laplacian (no padding) -> per-channel std over H, W -> Linear(c, c/8) + LeakyReLU
    -> Linear(c/8, c) + sigmoid -> rescale the input.

    Args:
        channels: input channels.
        laplacian: ``"fixed"`` (the paper: a constant 4-neighbour Laplacian, a buffer) or ``"trainable"``
            (the released code: the depthwise kernel is Kaiming-initialised and trained).
    """

    def __init__(self, channels: int, laplacian: str = "fixed", reduction: int = 8) -> None:
        super().__init__()
        self.channels = channels
        self.laplacian = laplacian
        if laplacian == "fixed":
            self.register_buffer("kernel", LAPLACIAN.expand(channels, 1, 3, 3).clone(), persistent=False)
        else:
            self.kernel = nn.Parameter(torch.empty(channels, 1, 3, 3))
            nn.init.kaiming_normal_(self.kernel, mode="fan_in")
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def forward(self, x: torch.Tensor, scale: bool = True) -> torch.Tensor:
        """``x`` rescaled by the attention weights, or (``scale=False``) the weights [N, C] themselves."""
        w = self.channel_weights(x)
        return x * w[:, :, None, None] if scale else w

    def channel_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The attention weights [N, C] that ``forward`` multiplies the input by."""
        edges = F.conv2d(x, self.kernel.to(x.dtype), groups=self.channels)
        if edges.is_contiguous(memory_format=torch.channels_last) and not edges.is_contiguous():
            # channels-last: the std from the first two moments, one pass each without a copy (2.4x faster
            # than aten's std over that layout)
            flat = edges.permute(0, 2, 3, 1).flatten(1, 2)  # [N, HW, C]
            stat = _std_from_sums(flat.sum(dim=1), (flat * flat).sum(dim=1), flat.shape[1])
        else:
            stat = edges.flatten(2).std(dim=2)
        return self.weights_from_std(stat)

    def weights_from_std(self, stat: torch.Tensor) -> torch.Tensor:
        """The attention weights [N, C] from the per-channel std [N, C] of the Laplacian response."""
        return torch.sigmoid(self.fc2(F.leaky_relu(self.fc1(stat), 0.2)))

    CHUNK_BYTES = 5 << 19  # rows of a map per step of std_parts (2.5 MiB): its Laplacian response stays in cache

    def std_parts(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The per-channel std [1, C] of the Laplacian response of ``cat(parts, dim=1)`` (one image), without
        the concatenation and without a full-size response map: each part in row chunks (a view of a
        channels-last map), each chunk's response reduced at once to its channel sums and sums of squares
        (accumulated in fp32; bf16 squares are rounded to bf16 first)."""
        stats, start = [], 0
        for p in parts:
            c, h, w = p.shape[1:]
            kernel = self.kernel[start : start + c].to(p.dtype)
            start += c
            rows = max(8, self.CHUNK_BYTES // (w * c * p.element_size()))
            total = torch.zeros(c, dtype=torch.float32)
            squares = torch.zeros(c, dtype=torch.float32)
            for r in range(0, h - 2, rows):
                edges = F.conv2d(p[:, :, r : min(h, r + rows + 2)], kernel, groups=c)
                flat = edges.permute(0, 2, 3, 1).reshape(-1, c)  # [rows x W, c]; a view for channels-last maps
                total += flat.sum(dim=0).float()
                squares += (flat * flat).sum(dim=0).float()
            stats.append(_std_from_sums(total, squares, (h - 2) * (w - 2)))
        return torch.cat(stats)[None]

    def macs(self, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> int:
        """Multiply-accumulates of the functional depthwise 3x3 (for ``cost.count_macs``)."""
        n, c, h, w = args[0].shape
        return n * c * max(h - 2, 0) * max(w - 2, 0) * 9


class LocalSpatialAttention(nn.Module):
    """LSA: at a fixed working size, shadow pixels' features are replaced by attention over the features
    of the non-shadow ring around the shadow (queries q at shadow pixels, keys = values = k at ring
    pixels); the result is upsampled, concatenated with the input and fused by a 1x1 conv.

    Args:
        channels: feature channels C (q and k have 3C/2).
        size: working size (the papers' down_w = down_h: 256 for ISTD, 128 for SRD).
        chunk: queries per attention chunk (bounds memory; exact, softmax is per query).
        stride: ``None`` (the papers): a fixed ``size`` x ``size`` working grid at any input size (aspect
            distorted). An integer: the grid is the input divided by ``stride`` (aspect kept), capped so that
            its longer side is at most ``size``; a network trained on crops then attends at the same
            downsampling factor on larger photos (up to the cap).
    """

    def __init__(self, channels: int, size: int = 256, chunk: int = 4096, stride: int | None = None) -> None:
        super().__init__()
        self.dim = channels * 3 // 2
        self.q = ConvLayer(channels, self.dim, 3)
        self.k = ConvLayer(channels, self.dim, 3)
        self.fuse = ConvLayer(channels + self.dim, channels, 1)
        self.size, self.chunk, self.stride = size, chunk, stride

    def working_size(self, h: int, w: int) -> tuple[int, int]:
        """The attention grid (rows, columns) for an input of ``h`` x ``w``."""
        if not self.stride:
            return self.size, self.size
        sh, sw = -(-h // self.stride), -(-w // self.stride)
        f = min(1.0, self.size / max(sh, sw))
        return max(1, round(sh * f)), max(1, round(sw * f))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, ring: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        gh, gw = self.working_size(h, w)
        small = F.interpolate(x, size=(gh, gw), mode="nearest")
        m = F.interpolate(mask, size=(gh, gw), mode="nearest")[:, 0] > 0.5
        r = F.interpolate(ring, size=(gh, gw), mode="nearest")[:, 0] > 0.5
        q, k = self.q(small), self.k(small)
        scale = self.dim**-0.5
        rows = []
        for i in range(x.shape[0]):
            ki = k[i].flatten(1)  # [D, P]
            out = ki.clone()
            s_idx = m[i].flatten().nonzero().squeeze(1)
            r_idx = r[i].flatten().nonzero().squeeze(1)
            if s_idx.numel() > 0:
                if r_idx.numel() == 0:
                    out[:, s_idx] = 0.0  # no ring to borrow from: the release zeroes shadow features
                else:
                    keys = ki[:, r_idx]  # [D, R], also the values
                    queries = q[i].flatten(1)[:, s_idx]  # [D, S]
                    parts = []
                    for j in range(0, s_idx.numel(), self.chunk):
                        att = torch.softmax((queries[:, j : j + self.chunk].t() @ keys) * scale, dim=-1)  # [s, R]
                        parts.append(keys @ att.t())  # [D, s]
                    out = out.index_copy(1, s_idx, torch.cat(parts, dim=1))
            rows.append(out.view(self.dim, gh, gw))
        small = torch.stack(rows)
        if fused_inference(x):
            # a 1x1 conv commutes with nearest upsampling: fuse the attended part at the working size and
            # upsample the C-channel result, not the 3C/2-channel one (no full-size concatenation)
            conv = self.fuse.conv
            wx, wa = conv.weight[:, : x.shape[1]].contiguous(), conv.weight[:, x.shape[1] :].contiguous()
            part = F.conv2d(small.contiguous(memory_format=torch.channels_last), wa)
            y = conv1x1_sum([x], conv, act=False, weight=wx)
            y += F.interpolate(part, size=(h, w), mode="nearest")
            return F.leaky_relu_(y, 0.2)
        attended = F.interpolate(small, size=(h, w), mode="nearest")
        return self.fuse(torch.cat([x, attended], dim=1))


class BasicBlock(nn.Module):
    """Three groups of parallel dilated 3x3 convs (widths C/2, C, 3C/2; dilations (1,4,16), (2,8,32),
    (4,16,64)), each fused 3C -> C by a 1x1 conv; ECA over the three group outputs, 1x1 3C -> C and a
    3x3 conv to ``cout``. No internal residual."""

    DILATIONS = ((1, 4, 16), (2, 8, 32), (4, 16, 64))

    def __init__(self, cin: int, cout: int, channels: int, laplacian: str = "fixed") -> None:
        super().__init__()
        c = channels
        widths = (c // 2, c, c * 3 // 2)
        self.groups = nn.ModuleList()
        self.fuses = nn.ModuleList()
        for g, dils in enumerate(self.DILATIONS):
            src = cin if g == 0 else c
            self.groups.append(nn.ModuleList(ConvLayer(src, wd, 3, dilation=d) for wd, d in zip(widths, dils)))
            self.fuses.append(ConvLayer(sum(widths), c, 1))
        self.eca = EnhancedChannelAttention(3 * c, laplacian)
        self.squeeze = ConvLayer(3 * c, c, 1)
        self.out = ConvLayer(c, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_inference(x):
            return self._fused(x)
        feats = []
        for branches, fuse in zip(self.groups, self.fuses):
            x = fuse(torch.cat([b(x) for b in branches], dim=1))
            feats.append(x)
        cat = torch.cat(feats, dim=1)
        w = self.eca(cat, scale=False)  # a module call: the MAC counter's hook sees the Laplacian
        if self._folds(cat):
            # inference, one image: fold ECA's channel scaling into the 1x1 conv that follows,
            # squeeze(x * w) = act((W diag(w)) x + b), instead of a pass over the 3C-channel map
            sq = self.squeeze.conv
            squeezed = F.leaky_relu(F.conv2d(cat, sq.weight * w[0, None, :, None, None], sq.bias), 0.2, inplace=True)
            return self.out(squeezed)
        return self.out(self.squeeze(cat * w[:, :, None, None]))

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        """The forward of one image on the fused CPU path (``layers.fused_inference``): every conv with its
        LeakyReLU as one call, each group's 1x1 over the concatenation as accumulated 1x1s of its parts,
        ECA's statistics per part and its scaling folded into the squeeze conv; no concatenated map."""
        feats = []
        for branches, fuse in zip(self.groups, self.fuses):
            x = conv1x1_sum([b.fused(x) for b in branches], fuse.conv)
            feats.append(x)
        w = self.eca.weights_from_std(self.eca.std_parts(feats).to(self.eca.fc1.weight.dtype))
        squeezed = conv1x1_sum(feats, self.squeeze.conv, weight=self.squeeze.conv.weight * w[0, None, :, None, None])
        return self.out.fused(squeezed)

    def macs(self, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> int:
        """MACs of the folded 1x1 conv, which bypasses ``self.squeeze`` (for ``cost.count_macs``)."""
        x = args[0]
        if not self._folds(x):
            return 0
        c = self.squeeze.conv
        return x.shape[-2] * x.shape[-1] * c.in_channels * c.out_channels

    @staticmethod
    def _folds(x: torch.Tensor) -> bool:
        """Whether the forward folds ECA's scaling into the squeeze conv: inference on one image (the
        weights are per sample)."""
        return x.shape[0] == 1 and not torch.is_grad_enabled()


class LABNet(nn.Module):
    """The network: convst, three cross-fused stages of two Basic Blocks (an L stream and an AB stream),
    LSA after the fusions of stages 2 and 3, final blocks to 1 (L) and 2 (AB) channels, global residual
    and a last 3x3 ConvLayer.

    Args:
        channels: C (32 in the paper).
        laplacian: ECA kernel, ``"fixed"`` (paper) or ``"trainable"`` (release).
        lsa_size: LSA working size (256 ISTD, 128 SRD); with ``lsa_stride`` the cap of its longer side.
        ring_kernel: dilation square of the mask that defines the non-shadow ring (11).
        lsa_stride: None (papers: fixed square grid) or the downsampling factor of the LSA grid.
    """

    def __init__(
        self,
        channels: int = 32,
        laplacian: str = "fixed",
        lsa_size: int = 256,
        ring_kernel: int = 11,
        lsa_stride: int | None = None,
    ):
        super().__init__()
        c = channels
        self.ring_kernel = ring_kernel
        self.convst = ConvLayer(3, 3, 3)
        self.block1 = BasicBlock(4, c, c, laplacian)
        self.block2 = BasicBlock(4, c, c, laplacian)
        self.fuse1_l, self.fuse1_ab = ConvLayer(2 * c, c, 1), ConvLayer(2 * c, c, 1)
        self.block3 = BasicBlock(c, c, c, laplacian)
        self.block4 = BasicBlock(c, c, c, laplacian)
        self.fuse2_l, self.fuse2_ab = ConvLayer(2 * c, c, 1), ConvLayer(2 * c, c, 1)
        self.lsa2_l, self.lsa2_ab = (
            LocalSpatialAttention(c, lsa_size, stride=lsa_stride),
            LocalSpatialAttention(c, lsa_size, stride=lsa_stride),
        )
        self.block5 = BasicBlock(c, c, c, laplacian)
        self.block6 = BasicBlock(c, c, c, laplacian)
        self.fuse3_l, self.fuse3_ab = ConvLayer(2 * c, c, 1), ConvLayer(2 * c, c, 1)
        self.lsa3_l, self.lsa3_ab = (
            LocalSpatialAttention(c, lsa_size, stride=lsa_stride),
            LocalSpatialAttention(c, lsa_size, stride=lsa_stride),
        )
        self.block_l = BasicBlock(c, 1, c, laplacian)
        self.block_ab = BasicBlock(c, 2, c, laplacian)
        self.final = ConvLayer(3, 3, 3)

    def forward(self, lab: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """LAB in [0, 1] (OpenCV 8-bit container / 255) [N, 3, H, W] and a binary mask [N, 1, H, W].

        Mixed precision: the blocks run in the dtype of ``convst``'s weights and the global residual with the
        last conv in the dtype of ``final``'s, so a bf16 network with an fp32 ``final`` (``--precision bf16``)
        adds its correction to the unrounded input and returns fp32."""
        body, head = self.convst.conv.weight.dtype, self.final.conv.weight.dtype
        residual = lab.to(head)
        lab, mask = lab.to(body), mask.to(body)
        ring = dilate(mask, self.ring_kernel) - mask
        x = torch.cat([self.convst(lab), mask], dim=1)
        b1, b2 = self.block1(x), self.block2(x)
        lum, ab = self._cross(b1, b2, self.fuse1_l, self.fuse1_ab)
        b3, b4 = self.block3(lum), self.block4(ab)
        lum, ab = self._cross(b3, b4, self.fuse2_l, self.fuse2_ab)
        lum, ab = self.lsa2_l(lum, mask, ring), self.lsa2_ab(ab, mask, ring)
        b5, b6 = self.block5(lum), self.block6(ab)
        lum, ab = self._cross(b5, b6, self.fuse3_l, self.fuse3_ab)
        lum, ab = self.lsa3_l(lum, mask, ring), self.lsa3_ab(ab, mask, ring)
        out = torch.cat([self.block_l(lum), self.block_ab(ab)], dim=1)
        return self.final(out.to(head) + residual)

    @staticmethod
    def _cross(a: torch.Tensor, b: torch.Tensor, to_l: ConvLayer, to_ab: ConvLayer) -> tuple[torch.Tensor, ...]:
        """The cross fusion of two streams: 1x1 convs of cat(a, b) to the L and the AB stream."""
        if fused_inference(a):
            return conv1x1_sum([a, b], to_l.conv), conv1x1_sum([a, b], to_ab.conv)
        cat = torch.cat([a, b], dim=1)
        return to_l(cat), to_ab(cat)
