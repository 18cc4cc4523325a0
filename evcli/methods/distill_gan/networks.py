"""Generators and discriminators of ``evcli distill-gan``: the mobile ResNet-9 generator (CRD's teacher and
student at any width), the standard CycleGAN ResNet-9 generator, the Pix2Pix U-Net generator (the card's other
Pix2Pix teacher / student), and the 70x70 PatchGAN discriminator.

All take and return images in [-1, 1]. In the ResNet generators InstanceNorm has no affine parameters and every
convolution followed by it keeps its bias (the CycleGAN code base's convention); the U-Net uses BatchNorm (the
card's ``--norm batch``). The PatchGAN has InstanceNorm, or BatchNorm (``norm="batch"``, the release's
``--norm batch`` for the U-Net setting). Conv weights start from N(0, 0.02), BatchNorm scales from N(1, 0.02).
"""

from __future__ import annotations

import torch
from torch import nn

GENERATOR_ARCHS = ("mobile_resnet", "resnet", "unet")
RESNET_ARCHS = ("mobile_resnet", "resnet")
DISC_NORMS = ("instance", "batch")


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 -> InstanceNorm -> pointwise 1x1 (MobileNet-style separable convolution)."""

    def __init__(self, channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size, groups=channels, bias=True),
            nn.InstanceNorm2d(channels),
            nn.Conv2d(channels, out_channels, 1, bias=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ResnetBlock(nn.Module):
    """x + [pad1, conv3x3, IN, ReLU, (dropout), pad1, conv3x3, IN]; ``mobile`` swaps the convs for separable
    ones (MobileResnetBlock)."""

    def __init__(self, dim: int, mobile: bool, dropout: float = 0.0):
        super().__init__()

        def conv() -> nn.Module:
            return SeparableConv2d(dim, dim) if mobile else nn.Conv2d(dim, dim, 3, bias=True)

        layers: list[nn.Module] = [nn.ReflectionPad2d(1), conv(), nn.InstanceNorm2d(dim), nn.ReLU(True)]
        if dropout > 0 or mobile:  # the mobile block always carries its (p=0 by default) dropout
            layers.append(nn.Dropout(dropout))
        layers += [nn.ReflectionPad2d(1), conv(), nn.InstanceNorm2d(dim)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """CycleGAN's ResNet generator: c7s1-ngf, d2ngf, d4ngf, ``n_blocks`` residual blocks at 4ngf, u2ngf, ungf,
    c7s1-3, tanh. ``arch="mobile_resnet"`` uses separable convolutions in the blocks (GAN Compression / OMGD /
    CRD's MobileResnetGenerator)."""

    def __init__(self, ngf: int = 64, arch: str = "mobile_resnet", n_blocks: int = 9, in_ch: int = 3, out_ch: int = 3):
        super().__init__()
        if arch not in RESNET_ARCHS:
            raise ValueError(f"unknown ResNet generator architecture {arch!r}")
        self.ngf, self.arch, self.n_blocks = ngf, arch, n_blocks
        self.size_multiple = 4  # two stride-2 convolutions
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_ch, ngf, 7, bias=True),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(True),
        ]
        for i in range(2):
            c = ngf * 2**i
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=True), nn.InstanceNorm2d(2 * c), nn.ReLU(True)]
        layers += [ResnetBlock(4 * ngf, mobile=arch == "mobile_resnet") for _ in range(n_blocks)]
        for i in range(2):
            c = ngf * 2 ** (2 - i)
            layers += [
                nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1, bias=True),
                nn.InstanceNorm2d(c // 2),
                nn.ReLU(True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_ch, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        init_normal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def unet_widths(ngf: int, num_downs: int) -> list[int]:
    """Channels after each downsampling of the U-Net, outermost first: ngf, 2ngf, 4ngf, then 8ngf."""
    return [ngf * min(2**i, 8) for i in range(num_downs)]


class UnetGenerator(nn.Module):
    """The Pix2Pix U-Net (Isola et al. 2017): ``num_downs`` stride-2 4x4 convolutions down (8 = unet_256 for
    256 px, 7 = unet_128), 4x4 stride-2 transposed convolutions up, the encoder's output at every level
    concatenated to the decoder's input at that level.

    Level i (0 = outermost) has width ``unet_widths(ngf, num_downs)[i]``. Down: LeakyReLU 0.2, conv, BatchNorm;
    the outermost level has no LeakyReLU and no norm (it sees the image), the innermost no norm (its output is
    1x1 at the full depth). Up: ReLU, transposed conv to the width of the level above, BatchNorm; the outermost
    ends in Tanh instead, and the 8ngf levels between level 4 and the innermost (``num_downs - 5`` of them) end
    in ``Dropout(dropout)``. As in the Pix2Pix code with BatchNorm, no convolution has a bias except the last
    transposed one (54,413,955 parameters for unet_256 at ngf 64).

    Args:
        ngf: width of the outermost level.
        num_downs: downsamplings; inputs must have sides divisible by ``2**num_downs``.
        in_ch: input channels.
        out_ch: output channels.
        dropout: dropout probability of the decoder's deep 8ngf levels (Pix2Pix trains with 0.5; the CRD / OMGD
            release with 0).
    """

    def __init__(self, ngf: int = 64, num_downs: int = 8, in_ch: int = 3, out_ch: int = 3, dropout: float = 0.5):
        super().__init__()
        if num_downs < 2:
            raise ValueError(f"the U-Net needs at least 2 downsamplings, got {num_downs}")
        self.ngf, self.arch, self.num_downs, self.dropout = ngf, "unet", num_downs, dropout
        self.size_multiple = 2**num_downs
        widths = unet_widths(ngf, num_downs)
        innermost = num_downs - 1
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        for i, width in enumerate(widths):
            # not in place: the encoder output it reads is also a skip connection
            down: list[nn.Module] = [] if i == 0 else [nn.LeakyReLU(0.2)]
            down.append(nn.Conv2d(in_ch if i == 0 else widths[i - 1], width, 4, stride=2, padding=1, bias=False))
            if 0 < i < innermost:
                down.append(nn.BatchNorm2d(width))
            self.down.append(nn.Sequential(*down))
            up_in = width if i == innermost else 2 * width  # below the innermost: the skip concatenated
            up_out = out_ch if i == 0 else widths[i - 1]
            up: list[nn.Module] = [
                nn.ReLU(True),  # its input is a fresh tensor (a concatenation, or the innermost conv's output)
                nn.ConvTranspose2d(up_in, up_out, 4, stride=2, padding=1, bias=i == 0),
                nn.Tanh() if i == 0 else nn.BatchNorm2d(up_out),
            ]
            if dropout > 0 and 4 <= i < innermost:
                up.append(nn.Dropout(dropout))
            self.up.append(nn.Sequential(*up))
        init_normal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(
                f"the U-Net generator with {self.num_downs} downsamplings needs an input height and width "
                f"divisible by {self.size_multiple}, got {h}x{w}"
            )
        skips = []
        for down in self.down:
            x = down(x)
            skips.append(x)
        y = self.up[-1](skips[-1])
        for i in range(self.num_downs - 2, -1, -1):
            y = self.up[i](torch.cat([skips[i], y], 1))
        return y


class NLayerDiscriminator(nn.Module):
    """70x70 PatchGAN (n_layers=3): C64(s2, no norm) - C128(s2) - C256(s2) - C512(s1) - C1(s1), 4x4 kernels,
    padding 1, LeakyReLU 0.2.

    Args:
        in_ch: input channels (3 CycleGAN, 6 Pix2Pix's source+output pair).
        ndf: width of the first convolution.
        n_layers: stride-2 convolutions after the first one, the last of them at stride 1.
        norm: ``instance`` (InstanceNorm without affine, every convolution with a bias) or ``batch`` (the
            Pix2Pix code's ``--norm batch``: BatchNorm, and the convolutions it follows have no bias; the first
            and the last convolution keep theirs). BatchNorm normalises over the batch: call it on real and fake
            images separately.
    """

    def __init__(self, in_ch: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "instance"):
        super().__init__()
        if norm not in DISC_NORMS:
            raise ValueError(f"unknown discriminator norm {norm!r} (one of {', '.join(DISC_NORMS)})")
        self.norm = norm
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=norm == "instance"),
                nn.InstanceNorm2d(ndf * mult) if norm == "instance" else nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)
        init_normal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def discriminator_norm(state: dict[str, torch.Tensor]) -> str:
    """``batch`` or ``instance``: the norm of a PatchGAN state dict (only BatchNorm has running statistics)."""
    return "batch" if any(k.endswith(".running_mean") for k in state) else "instance"


@torch.no_grad()
def init_normal(module: nn.Module, gain: float = 0.02) -> None:
    """CycleGAN's ``init_type=normal``: conv / linear weights ~ N(0, gain), biases 0; BatchNorm scales
    ~ N(1, gain), shifts 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)


def describe_generator(state: dict[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """(architecture, width, residual blocks or U-Net depth) of a generator state dict, read from its tensors;
    None when the tensors are not a generator of this module. ``make_generator`` takes the same triple."""
    first = state.get("down.0.0.weight")
    if first is not None and first.ndim == 4 and tuple(first.shape[1:]) == (3, 4, 4):
        depth = len({k.split(".")[1] for k in state if k.startswith("down.")})
        return "unet", int(first.shape[0]), depth
    first = state.get("model.1.weight")
    if first is None or first.ndim != 4 or tuple(first.shape[1:]) != (3, 7, 7):
        return None
    ngf = int(first.shape[0])
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("model.") and ".conv_block." in k}
    arch = "mobile_resnet" if any(".conv_block.1.conv." in k for k in state) else "resnet"
    return arch, ngf, len(blocks)
