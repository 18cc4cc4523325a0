"""SR networks of ``evcli quant-sr``: EDSR (baseline: 16 blocks x 64 channels; paper size: 32 x 256, residual
scale 0.1) and SRResNet (16 blocks x 64, BN, PReLU), full precision or with the quantizers of DDTB / PAMS.

Quantizer placement follows the DDTB release (card, "What is quantised"), stated here because SR-quantization
repositories differ on it: in each residual block, ``quant_act1`` quantizes the block input for the skip branch
only, ``quant_act2`` the activation after the ReLU between the two convs, ``quant_act3`` the block output
before the skip add; the block's two 3x3 convs have quantized weights and the first conv reads the
*unquantized* block input. The head conv, the body's last conv, the upsampler and the tail stay full
precision. SRResNet blocks: a quantizer before each conv, the same skip-branch and output quantizers.

Images are [0, 1] RGB at the interface; inside, the networks work on the 0-255 range with EDSR's mean shift
(0.4488, 0.4371, 0.4040), as the papers' code does, so activation magnitudes (and thus bound initialisations)
are the papers'.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from evcli.methods.quant_sr.quantizers import DDTBActQuant, PAMSActQuant, QuantConv2d

RGB_MEAN = (0.4488, 0.4371, 0.4040)
RGB_RANGE = 255.0

# (blocks, channels, res_scale) of each named architecture
ARCHS: dict[str, tuple[int, int, float]] = {
    "edsr_baseline": (16, 64, 1.0),
    "edsr": (32, 256, 0.1),
    "srresnet": (16, 64, 1.0),
}


class QuantSpec:
    """How a network is quantized: bits (32: full precision), method (ddtb | pams), gate gradient mode."""

    def __init__(self, bits: int = 32, method: str = "ddtb", gate_ste: bool = True, weight_clip: float = 99.0):
        self.bits, self.method, self.gate_ste, self.weight_clip = bits, method, gate_ste, weight_clip

    @property
    def quantized(self) -> bool:
        return self.bits < 32

    def act(self, channels: int) -> nn.Module:
        if not self.quantized:
            return nn.Identity()
        if self.method == "pams":
            return PAMSActQuant(self.bits)
        return DDTBActQuant(self.bits, channels, gate_ste=self.gate_ste)

    def conv(self, cin: int, cout: int, k: int = 3, bias: bool = True) -> nn.Conv2d:
        if not self.quantized:
            return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)
        mode = "sym" if self.method == "pams" else "asym99"
        return QuantConv2d(
            cin, cout, k, padding=k // 2, bias=bias, bits=self.bits, mode=mode, clip_percent=self.weight_clip
        )


def conv3(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)


class ResBlock(nn.Module):
    """EDSR residual block (conv-ReLU-conv, residual scale), with the card's three activation quantizers."""

    def __init__(self, c: int, res_scale: float, q: QuantSpec):
        super().__init__()
        self.res_scale = res_scale
        self.conv1 = q.conv(c, c)
        self.conv2 = q.conv(c, c)
        self.quant_act1 = q.act(c)
        self.quant_act2 = q.act(c)
        self.quant_act3 = q.act(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.quant_act1(x)
        out = self.quant_act2(torch.relu(self.conv1(x)))
        out = self.quant_act3(self.conv2(out) * self.res_scale)
        return out + skip


class SRResBlock(nn.Module):
    """SRResNet block (conv-BN-PReLU-conv-BN) with a quantizer before each conv, on the skip and the output."""

    def __init__(self, c: int, q: QuantSpec):
        super().__init__()
        self.conv1, self.bn1, self.act = q.conv(c, c, bias=False), nn.BatchNorm2d(c), nn.PReLU()
        self.conv2, self.bn2 = q.conv(c, c, bias=False), nn.BatchNorm2d(c)
        self.quant_act1 = q.act(c)
        self.quant_act2 = q.act(c)
        self.quant_act3 = q.act(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.quant_act1(x)
        out = self.act(self.bn1(self.conv1(skip)))
        out = self.quant_act3(self.bn2(self.conv2(self.quant_act2(out))))
        return out + skip


def upsampler(scale: int, c: int, act: bool = False) -> nn.Sequential:
    """Sub-pixel upsampler: x2 stages for 2/4, one x3 stage for 3 (full precision)."""
    layers: list[nn.Module] = []
    if scale in (2, 4):
        for _ in range(int(math.log2(scale))):
            layers += [conv3(c, 4 * c), nn.PixelShuffle(2)] + ([nn.PReLU()] if act else [])
    elif scale == 3:
        layers += [conv3(c, 9 * c), nn.PixelShuffle(3)] + ([nn.PReLU()] if act else [])
    else:
        raise ValueError(f"scale must be 2, 3 or 4, got {scale}")
    return nn.Sequential(*layers)


class SRNet(nn.Module):
    """EDSR or SRResNet: head conv -> residual body -> body conv (+ global skip) -> upsampler -> tail conv.

    ``forward(lr)`` returns the SR image; ``forward_features(lr)`` also the feature after the body and the
    global skip (64 channels, LR resolution), the attention-transfer feature of DDTB and PAMS.
    """

    def __init__(
        self,
        arch: str = "edsr_baseline",
        scale: int = 4,
        blocks: int | None = None,
        channels: int | None = None,
        res_scale: float | None = None,
        q: QuantSpec | None = None,
    ):
        super().__init__()
        q = q or QuantSpec()
        nb, nc, rs = ARCHS[arch]
        nb, nc = blocks or nb, channels or nc
        rs = rs if res_scale is None else res_scale
        self.arch, self.scale = arch, scale
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1) * RGB_RANGE, persistent=False)
        if arch == "srresnet":
            self.head = nn.Sequential(nn.Conv2d(3, nc, 9, padding=4), nn.PReLU())
            self.body = nn.Sequential(*[SRResBlock(nc, q) for _ in range(nb)])
            self.body_tail = nn.Sequential(conv3(nc, nc, bias=False), nn.BatchNorm2d(nc))
            self.upsample = upsampler(scale, nc, act=True)
            self.tail = nn.Conv2d(nc, 3, 9, padding=4)
        else:
            self.head = conv3(3, nc)
            self.body = nn.Sequential(*[ResBlock(nc, rs, q) for _ in range(nb)])
            self.body_tail = conv3(nc, nc)
            self.upsample = upsampler(scale, nc)
            self.tail = conv3(nc, 3)

    def forward_features(self, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.head(lr * RGB_RANGE - self.mean)
        feat = self.body_tail(self.body(x)) + x
        sr = self.tail(self.upsample(feat))
        return (sr + self.mean) / RGB_RANGE, feat

    def forward(self, lr: torch.Tensor, features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """SR image of ``lr`` ([N, 3, h, w] in [0, 1]); with ``features`` also the body feature (through any DDP
        wrapper, unlike calling ``forward_features``)."""
        sr, feat = self.forward_features(lr)
        return (sr, feat) if features else sr

    def act_quantizers(self) -> list[tuple[str, nn.Module]]:
        """The activation quantizers in network order (names as in the state dict)."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, (DDTBActQuant, PAMSActQuant))]

    def quant_convs(self) -> list[tuple[str, QuantConv2d]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, QuantConv2d)]


def build_sr_net(cfg: Any, bits: int | None = None) -> SRNet:
    """The network of a ``quant-sr`` config (``bits``: override, e.g. 32 for the full-precision teacher)."""
    b = cfg.bits if bits is None else bits
    q = QuantSpec(b, cfg.method if cfg.method in ("ddtb", "pams") else "ddtb", cfg.gate_grad == "ste", cfg.weight_clip)
    return SRNet(cfg.arch, cfg.scale, cfg.blocks, cfg.channels, cfg.res_scale, q)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
