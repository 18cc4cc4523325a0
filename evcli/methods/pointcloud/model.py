"""PointMetaBase (arXiv 2211.14462) and its baseline PointNeXt (NeurIPS 2022), built from the same point ops.

Layout as in OpenPoints: coordinates ``p`` are (B, N, 3), features ``f`` are (B, C, N), grouped tensors are
(B, C, M, K); pointwise layers are 1x1 convolutions, each conv-BN-ReLU unless said otherwise.

PointMetaBase block: ``f <- ReLU(f + PW2(PW1(max_j [phi(f)_j + PE(dp_ij)])))`` with ``phi`` applied to all
points *before* grouping and one position embedding ``PE(dp)`` per stage shared by its blocks. PointNeXt's
set abstraction and InvResMLP instead group ``[dp, f_j]`` and run their MLP on every neighbour.

Sizes (``ARCHS``): the papers' configurations plus ``pointmetabase-s`` for segmentation on a CPU (ours).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from evcli.ops.points import ball_query, furthest_point_sample, gather_points, group, group_points, three_interpolation


@dataclass(frozen=True)
class Arch:
    """One network size: encoder family, depth and width, and the set-abstraction variant."""

    family: str  # pointmetabase | pointnext
    blocks: tuple[int, ...]
    width: int
    sa_layers: int
    sa_use_res: bool
    expansion: int
    note: str = ""


# Segmentation (strides 1,4,4,4,4) and classification (strides 1,2,2,2,2,1) sizes.
SEG_ARCHS: dict[str, Arch] = {
    "pointmetabase-s": Arch("pointmetabase", (1, 2, 2, 2, 2), 32, 1, False, 1, "ours: a small size for CPUs"),
    "pointmetabase-l": Arch("pointmetabase", (1, 3, 5, 3, 3), 32, 1, False, 1),
    "pointmetabase-xl": Arch("pointmetabase", (1, 4, 7, 4, 4), 64, 1, False, 1),
    "pointmetabase-xxl": Arch("pointmetabase", (1, 5, 9, 5, 5), 64, 1, False, 1),
    "pointmetabase-xxxl": Arch("pointmetabase", (1, 6, 11, 6, 6), 64, 1, False, 1),
    "pointnext-s": Arch("pointnext", (1, 1, 1, 1, 1), 32, 2, True, 4),
    "pointnext-b": Arch("pointnext", (1, 2, 3, 2, 2), 32, 1, False, 4),
    "pointnext-l": Arch("pointnext", (1, 3, 5, 3, 3), 32, 1, False, 4),
    "pointnext-xl": Arch("pointnext", (1, 4, 7, 4, 4), 64, 1, False, 4),
}
CLS_ARCHS: dict[str, Arch] = {
    "pointmetabase-s": Arch("pointmetabase", (1, 1, 1, 1, 1, 1), 32, 2, True, 1),
    "pointnext-s": Arch("pointnext", (1, 1, 1, 1, 1, 1), 32, 2, True, 4),
}
SEG_STRIDES = (1, 4, 4, 4, 4)
CLS_STRIDES = (1, 2, 2, 2, 2, 1)


def conv1d(cin: int, cout: int, bn: bool = True, act: bool = True) -> nn.Sequential:
    """1x1 Conv1d (bias only without BN) + BN + ReLU."""
    layers: list[nn.Module] = [nn.Conv1d(cin, cout, 1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm1d(cout))
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def conv2d(cin: int, cout: int, bn: bool = True, act: bool = True) -> nn.Sequential:
    """1x1 Conv2d (bias only without BN) + BN + ReLU, on grouped (B, C, M, K) tensors."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def stage_radii(radius: float, scaling: float, blocks: tuple[int, ...], strides: tuple[int, ...]) -> list[list[float]]:
    """Radius of every block: a downsampling stage uses ``r`` for its set abstraction and ``r * scaling`` for
    its blocks and the next stage; a stride-1 stage keeps ``r``."""
    out = []
    for n, s in zip(blocks, strides):
        if s == 1:
            out.append([radius] * n)
        else:
            out.append([radius] + [radius * scaling] * (n - 1))
            radius *= scaling
    return out


class SetAbstraction(nn.Module):
    """First block of a stage: FPS by ``stride``, ball query, local max. ``pointmetabase``: MLP on all points
    before grouping plus a position embedding of dp; ``pointnext``: MLP on ``[dp, f_j]`` per neighbour.
    A stride-1 non-head stage groups all points (global feature); the head stage is a single pointwise conv."""

    def __init__(
        self,
        family: str,
        cin: int,
        cout: int,
        layers: int,
        stride: int,
        radius: float,
        nsample: int,
        use_res: bool,
        is_head: bool,
        normalize_dp: bool = True,
    ):
        super().__init__()
        self.family, self.stride, self.radius, self.nsample = family, stride, radius, nsample
        self.is_head = is_head
        self.all_aggr = not is_head and stride == 1
        self.use_res = use_res and not self.all_aggr and not is_head
        self.normalize_dp = normalize_dp
        if is_head:
            self.convs1 = conv1d(cin, cout, bn=False, act=False)
            return
        mid = cout // 2 if stride > 1 else cout
        chans = [cin] + [mid] * (layers - 1) + [cout]
        if self.use_res:
            self.skipconv = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()
            self.act = nn.ReLU(inplace=True)
        last_act = not self.use_res
        if family == "pointmetabase":
            self.convs1 = nn.Sequential(
                *[conv1d(chans[i], chans[i + 1], act=i < len(chans) - 2 or last_act) for i in range(len(chans) - 1)]
            )
            pe = [3] + [32, 32] * (min(layers, 2) - 1) + [cout]
            self.convs2 = nn.Sequential(*[conv2d(pe[i], pe[i + 1]) for i in range(len(pe) - 1)])
        else:
            chans[0] = cin + 3
            self.convs = nn.Sequential(
                *[conv2d(chans[i], chans[i + 1], act=i < len(chans) - 2 or last_act) for i in range(len(chans) - 1)]
            )

    def forward(self, p: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_head:
            return p, self.convs1(f)
        if self.all_aggr:
            new_p = p
            dp, fj = p.transpose(1, 2).unsqueeze(2), None  # absolute xyz, (B, 3, 1, N)
            idx = None
        else:
            sample = furthest_point_sample(p, max(1, p.shape[1] // self.stride))  # tiny clouds keep one point
            new_p = gather_points(p, sample)
            idx = ball_query(self.radius, self.nsample, p, new_p)
            if self.use_res:
                identity = self.skipconv(f.gather(2, sample.unsqueeze(1).expand(-1, f.shape[1], -1)))
        if self.family == "pointmetabase":
            f = self.convs1(f)
            if idx is None:
                fj = f.unsqueeze(2)
            else:
                dp, fj = group_points(p, new_p, idx, f, self.radius if self.normalize_dp else None)
            f = (self.convs2(dp) + fj).max(dim=-1).values
        else:
            if idx is None:
                fj = f.unsqueeze(2)
            else:
                dp, fj = group_points(p, new_p, idx, f, self.radius if self.normalize_dp else None)
            f = self.convs(torch.cat([dp, fj], 1)).max(dim=-1).values
        if self.use_res:
            f = self.act(f + identity)
        return new_p, f


class MetaBlock(nn.Module):
    """The PointMetaBase block: phi before grouping, the stage's shared PE, max, two pointwise layers, residual."""

    def __init__(self, channels: int, expansion: int = 1):
        super().__init__()
        mid = channels * expansion
        self.phi = conv1d(channels, channels)
        self.pw = nn.Sequential(conv1d(channels, mid), conv1d(mid, channels, act=False))
        self.act = nn.ReLU(inplace=True)

    def forward(self, f: torch.Tensor, pe: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        agg = (pe + group(self.phi(f), idx)).max(dim=-1).values
        return self.act(self.pw(agg) + f)


class InvResMLP(nn.Module):
    """PointNeXt's block: conv on grouped ``[dp, f_j]`` (per neighbour), max, inverted bottleneck, residual."""

    def __init__(self, channels: int, expansion: int = 4):
        super().__init__()
        mid = channels * expansion
        self.local = conv2d(channels + 3, channels)
        self.pw = nn.Sequential(conv1d(channels, mid), conv1d(mid, channels, act=False))
        self.act = nn.ReLU(inplace=True)

    def forward(self, f: torch.Tensor, dp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        agg = self.local(torch.cat([dp, group(f, idx)], 1)).max(dim=-1).values
        return self.act(self.pw(agg) + f)


class Stage(nn.Module):
    """A set abstraction followed by ``blocks - 1`` blocks on the sampled points. The blocks share one ball
    query (same points, same radius) and, for PointMetaBase, one position embedding of the stage."""

    def __init__(
        self,
        arch: Arch,
        cin: int,
        cout: int,
        n_blocks: int,
        stride: int,
        radii: list[float],
        nsample: int,
        is_head: bool,
    ):
        super().__init__()
        layers = arch.sa_layers if not is_head else 1
        self.sa = SetAbstraction(arch.family, cin, cout, layers, stride, radii[0], nsample, arch.sa_use_res, is_head)
        self.family = arch.family
        self.block_radius = radii[-1]
        self.nsample = nsample
        block = MetaBlock if arch.family == "pointmetabase" else InvResMLP
        self.blocks = nn.ModuleList([block(cout, arch.expansion) for _ in range(n_blocks - 1)])
        if arch.family == "pointmetabase" and n_blocks > 1:
            self.pe_encoder = conv2d(3, cout)

    def forward(self, p: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p, f = self.sa(p, f)
        if len(self.blocks):
            idx = ball_query(self.block_radius, self.nsample, p, p)
            dp, _ = group_points(p, p, idx, None, self.block_radius)
            ctx = self.pe_encoder(dp) if self.family == "pointmetabase" else dp
            for blk in self.blocks:
                f = blk(f, ctx, idx)
        return p, f


class Encoder(nn.Module):
    """Stages of set abstraction + blocks; channels double at every downsampling stage."""

    def __init__(
        self,
        arch: Arch,
        in_channels: int,
        strides: tuple[int, ...],
        radius: float,
        radius_scaling: float,
        nsample: int = 32,
    ):
        super().__init__()
        if len(arch.blocks) != len(strides):
            raise ValueError(f"{len(arch.blocks)} stages of blocks for {len(strides)} strides")
        width, channels = arch.width, []
        for s in strides:
            if s != 1:
                width *= 2
            channels.append(width)
        radii = stage_radii(radius, radius_scaling, arch.blocks, strides)
        stages, cin = [], in_channels
        for i, (n, s) in enumerate(zip(arch.blocks, strides)):
            stages.append(Stage(arch, cin, channels[i], n, s, radii[i], nsample, is_head=i == 0 and s == 1))
            cin = channels[i]
        self.stages = nn.ModuleList(stages)
        self.channels = channels
        self.radii = radii

    def forward(self, p: torch.Tensor, f: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ps, fs = [p], [f]
        for stage in self.stages:
            p, f = stage(p, f)
            ps.append(p)
            fs.append(f)
        return ps[1:], fs[1:]


class FeaturePropagation(nn.Module):
    """One decoder stage: three-NN interpolation of the coarse features onto the finer points, concatenated
    with the skip features, then two pointwise layers."""

    def __init__(self, cin: int, cout: int, layers: int = 2):
        super().__init__()
        chans = [cin] + [cout] * layers
        self.convs = nn.Sequential(*[conv1d(chans[i], chans[i + 1]) for i in range(layers)])

    def forward(self, p_fine: torch.Tensor, f_fine: torch.Tensor, p_coarse: torch.Tensor, f_coarse: torch.Tensor):
        return self.convs(torch.cat([f_fine, three_interpolation(p_fine, p_coarse, f_coarse)], 1))


class Decoder(nn.Module):
    """PointNeXt's U-Net decoder: from the coarsest stage back to full resolution."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.fp = nn.ModuleList(
            [FeaturePropagation(channels[i] + channels[i + 1], channels[i]) for i in range(len(channels) - 1)]
        )

    def forward(self, ps: list[torch.Tensor], fs: list[torch.Tensor]) -> torch.Tensor:
        f = fs[-1]
        for i in range(len(fs) - 2, -1, -1):
            f = self.fp[i](ps[i], fs[i], ps[i + 1], f)
        return f


class PointSegmenter(nn.Module):
    """Encoder + decoder + SegHead: per-point logits (B, classes, N) of points (B, N, 3) and features (B, C, N)."""

    def __init__(self, arch: Arch, in_channels: int, num_classes: int, radius: float = 0.1, nsample: int = 32):
        super().__init__()
        self.encoder = Encoder(arch, in_channels, SEG_STRIDES, radius, 2.0, nsample)
        self.decoder = Decoder(self.encoder.channels)
        c = self.encoder.channels[0]
        self.head = nn.Sequential(conv1d(c, c), nn.Dropout(0.5), nn.Conv1d(c, num_classes, 1))

    def forward(self, p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        ps, fs = self.encoder(p, f)
        return self.head(self.decoder(ps, fs))


class PointClassifier(nn.Module):
    """Encoder (global feature) + ClsHead: logits (B, classes) of points (B, N, 3) and features (B, C, N)."""

    def __init__(
        self,
        arch: Arch,
        in_channels: int,
        num_classes: int,
        radius: float = 0.15,
        scaling: float = 1.5,
        nsample: int = 32,
    ):
        super().__init__()
        self.encoder = Encoder(arch, in_channels, CLS_STRIDES, radius, scaling, nsample)
        c = self.encoder.channels[-1]
        self.head = nn.Sequential(
            nn.Linear(c, 512, bias=False),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(512, 256, bias=False),
            nn.BatchNorm1d(256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(256, num_classes),
        )

    def forward(self, p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        _, fs = self.encoder(p, f)
        return self.head(fs[-1].squeeze(-1))


@dataclass
class ModelSpec:
    """What builds a network: task, size name, input channels, classes, radius, nsample."""

    task: str
    name: str
    in_channels: int
    num_classes: int
    radius: float
    radius_scaling: float = 2.0
    nsample: int = 32
    extra: dict[str, Any] = field(default_factory=dict)


def build_model(spec: ModelSpec) -> nn.Module:
    """The network of a spec; an unknown size is a ValueError naming the known ones."""
    table = SEG_ARCHS if spec.task == "segmentation" else CLS_ARCHS
    if spec.name not in table:
        raise ValueError(f"unknown {spec.task} model {spec.name!r} (known: {', '.join(table)})")
    arch = table[spec.name]
    if spec.task == "segmentation":
        return PointSegmenter(arch, spec.in_channels, spec.num_classes, spec.radius, spec.nsample)
    return PointClassifier(arch, spec.in_channels, spec.num_classes, spec.radius, spec.radius_scaling, spec.nsample)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(
    model: nn.Module, n_points: int, in_channels: int, extent: float = 3.0, seed: int = 0, norm_act: bool = False
) -> int:
    """FLOPs of one forward (batch 1, ``n_points`` random points in a cube of side ``extent``), counted by
    forward hooks ("layer FLOP counter"): 2 x multiply-accumulates per output element of every Conv1d / Conv2d /
    Linear (``2 * C_in * C_out * positions``); with ``norm_act`` also what DeepSpeed's profiler (the paper's
    counter) adds in eval mode: 2 per element of a BatchNorm (affine) and 1 per element of a ReLU. Sampling,
    neighbour search, gathers, interpolation and pooling are never counted, as in the paper's profile."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(1, n_points, 3, generator=g) * extent
    f = torch.rand(1, in_channels, n_points, generator=g)
    total = [0]

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            total[0] += 2 * module.in_features * output.numel()
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            total[0] += 2 * module.in_channels * output.numel()
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            total[0] += 2 * output.numel()
        else:  # ReLU
            total[0] += output.numel()

    kinds: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)
    if norm_act:
        kinds += (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(p, f)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return total[0]
