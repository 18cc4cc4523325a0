"""Building blocks shared by LAB-Net and SADC: padded convolutions, mask morphology, VGG16 features."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from evcli.errors import CheckpointError


def pad_reflect(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflection padding; where the map is too small to reflect ``pad`` pixels (dilations of 16-64 on
    small images), replicate padding instead, so any image size runs (the papers' crops are >= 256)."""
    if pad == 0:
        return x
    if pad < x.shape[-1] and pad < x.shape[-2]:
        return F.pad(x, (pad, pad, pad, pad), mode="reflect")
    return F.pad(x, (pad, pad, pad, pad), mode="replicate")


class ConvLayer(nn.Module):
    """Reflection pad + conv (with bias) + optional LeakyReLU(0.2); no normalisation."""

    def __init__(
        self, cin: int, cout: int, kernel: int = 3, dilation: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        super().__init__()
        self.pad = dilation * (kernel - 1) // 2
        self.conv = nn.Conv2d(cin, cout, kernel, dilation=dilation, groups=groups, bias=True)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(pad_reflect(x, self.pad))
        return F.leaky_relu(y, 0.2, inplace=not torch.is_grad_enabled()) if self.act else y

    # fp32 convs of dilation up to this run with oneDNN's zero padding and recompute the border bands with
    # reflection (a few % of the pixels) instead of writing a reflection-padded copy of the input: 2 % faster
    # LAB-Net in fp32, none in bf16, whose maps fit in the cache (bench/deshadow.py's machine)
    BORDER_FIX_MAX = 8

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` with the LeakyReLU as a oneDNN post-op of the conv, for inputs where
        :func:`fused_inference` holds; equal to ``forward`` up to float rounding."""
        p = self.pad
        h, w = x.shape[-2:]
        if 0 < p <= self.BORDER_FIX_MAX and 4 * p <= min(h, w) and x.dtype == torch.float32:
            y = self._conv_act(x, p)  # zero padding: right everywhere but the p-pixel border bands
            y[..., :p, :] = self._conv_act(F.pad(x[..., : 2 * p, :], (p, p, p, 0), mode="reflect"))
            y[..., h - p :, :] = self._conv_act(F.pad(x[..., h - 2 * p :, :], (p, p, 0, p), mode="reflect"))
            y[..., p : h - p, :p] = self._conv_act(F.pad(x[..., : 2 * p], (p, 0, 0, 0), mode="reflect"))
            y[..., p : h - p, w - p :] = self._conv_act(F.pad(x[..., w - 2 * p :], (0, p, 0, 0), mode="reflect"))
            return y
        return self._conv_act(pad_reflect(x, p))

    def _conv_act(self, x: torch.Tensor, padding: int = 0) -> torch.Tensor:
        c = self.conv
        act = ("leaky_relu", [0.2]) if self.act else ("none", [])
        return _CONV_POINTWISE(
            x, c.weight, c.bias, [padding, padding], list(c.stride), list(c.dilation), c.groups, act[0], act[1], ""
        )


# --------------------------------------------------------------------------------------------------
# Fused CPU inference (oneDNN post-ops through the ops torch.compile's inductor uses)


def _mkldnn_op(name: str, overload: str | None = None):  # noqa: ANN202 - a torch op or None
    try:
        op = getattr(torch.ops.mkldnn, name)
        return getattr(op, overload) if overload else op
    except (AttributeError, RuntimeError):
        return None


_CONV_POINTWISE = _mkldnn_op("_convolution_pointwise")
_CONV_ADD_ = _mkldnn_op("_convolution_pointwise_", "binary")
_FUSED = {"on": True}  # switched by plain_forward (a dict, not a ContextVar: torch.compile traces it)


def fused_inference(x: torch.Tensor) -> bool:
    """Whether inference on ``x`` takes the fused CPU path: one image, no autograd, fp32 or bf16 on a CPU
    with oneDNN, and not switched off by :func:`plain_forward`.

    The fused path computes the same convolutions (same MACs, fp32 results equal to rounding), with the
    activations and the sums of concatenations folded into the convolutions: no concatenated maps, fewer
    passes over memory (bench/deshadow.py)."""
    return (
        _FUSED["on"]
        and fused_available()
        and x.device.type == "cpu"
        and x.shape[0] == 1
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and fused_bf16_available()))
        and not torch.is_grad_enabled()
    )


_BF16_FUSED: dict[str, bool] = {}


def fused_bf16_available() -> bool:
    """Whether oneDNN's fused convolution runs in bf16 on this CPU (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT;
    without them bf16 inference takes the plain path, which torch runs on any CPU). Probed once."""
    if "ok" not in _BF16_FUSED:
        ok = fused_available()
        if ok:
            x = torch.zeros(1, 1, 3, 3, dtype=torch.bfloat16)
            w = torch.zeros(1, 1, 1, 1, dtype=torch.bfloat16)
            try:
                _CONV_POINTWISE(x, w, None, [0, 0], [1, 1], [1, 1], 1, "none", [], "")
            except RuntimeError:
                ok = False
        _BF16_FUSED["ok"] = ok
    return _BF16_FUSED["ok"]


def fused_available() -> bool:
    """Whether this torch build has the oneDNN ops of the fused path (and oneDNN is on)."""
    return (
        _CONV_POINTWISE is not None
        and _CONV_ADD_ is not None
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


@contextmanager
def plain_forward() -> Iterator[None]:
    """Run the modules' plain forward (module by module) inside this block: the MAC counter's hooks see every
    conv, and tests compare the fused path against it."""
    before = _FUSED["on"]
    _FUSED["on"] = False
    try:
        yield
    finally:
        _FUSED["on"] = before


def conv1x1_sum(parts: Sequence[torch.Tensor], conv: nn.Conv2d, act: bool = True, weight: torch.Tensor | None = None):
    """``act(conv(cat(parts, dim=1)))`` for a 1x1 ``conv`` without building the concatenation: the conv of
    each part accumulated in place into one output (oneDNN's binary-add post-op). ``weight`` replaces the
    conv's weight (a folded one)."""
    weight = conv.weight if weight is None else weight
    y = None
    start = 0
    for p in parts:
        w = weight[:, start : start + p.shape[1]].contiguous()
        start += p.shape[1]
        if y is None:
            y = _CONV_POINTWISE(p, w, conv.bias, [0, 0], [1, 1], [1, 1], 1, "none", [], "")
        else:
            y = _CONV_ADD_(y, p, w, None, [0, 0], [1, 1], [1, 1], 1, "add", 1.0, None, [], None)
    if start != weight.shape[1]:
        raise ValueError(f"parts have {start} channels, the conv takes {weight.shape[1]}")
    return F.leaky_relu_(y, 0.2) if act else y


def dilate(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Binary dilation of a [N, 1, H, W] 0/1 mask with a size x size square of ones (odd ``size``).

    Separable (a row max, then a column max): O(size) per pixel, not O(size^2), which matters for the
    129 x 129 squares of SADC's sparse inference at dilation 64."""
    half = size // 2
    rows = F.max_pool2d(mask, (1, size), stride=1, padding=(0, half))
    return F.max_pool2d(rows, (size, 1), stride=1, padding=(half, 0))


def erode(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Binary erosion with a size x size square (outside the image counts as mask, like kornia's default)."""
    return 1.0 - dilate(1.0 - mask, size)


def init_kaiming(module: nn.Module) -> None:
    """Kaiming-normal (fan_in) weights and zero biases for every conv and linear layer (the papers' init)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, a=0.0, mode="fan_in")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------------
# VGG16 (torchvision's architecture; weights from a local safetensors file or torchvision's cache)

VGG_CACHE_FILE = "vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1 file name


def vgg16_features(source: str, weights_file: str | None) -> tuple[nn.Sequential, str]:
    """torchvision's VGG16 ``features`` with ImageNet weights (``source="pretrained"``) or random ones.

    Pretrained weights come from ``weights_file`` (.safetensors: a full VGG16 state dict or its
    ``features.*`` part) or, failing that, from torchvision's own download cache through its API; nothing
    is downloaded.

    Returns:
        The frozen module (eval mode) and a sentence saying which weights it holds.

    Raises:
        CheckpointError: pretrained weights asked for and none available offline.
    """
    import torchvision
    from torchvision.models.vgg import cfgs, make_layers

    def features_only() -> nn.Sequential:
        # torchvision's VGG16 feature layers and its own conv init, without building the 120 M-parameter
        # classifier (seconds of init for weights the losses never use)
        feats = make_layers(cfgs["D"], batch_norm=False)
        for m in feats.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        return feats

    if source == "random":
        with torch.random.fork_rng(devices=[]):  # a fixed seed: the "random VGG" of every run is the same
            torch.manual_seed(0x56_47_47)
            features = features_only()
        used = "random VGG16 features (torchvision architecture and init, fixed seed; the SADC release's behaviour)"
    elif weights_file:
        from evcli.io.checkpoint import read_safetensors

        features = features_only()
        tensors, _ = read_safetensors(weights_file, "VGG16 weights file")
        feats = {k.removeprefix("features."): v for k, v in tensors.items() if not k.startswith("classifier.")}
        own = features.state_dict()
        if set(feats) != set(own) or any(tuple(feats[k].shape) != tuple(own[k].shape) for k in own):
            raise CheckpointError(f"{weights_file} does not hold torchvision VGG16 weights (features.* keys)")
        features.load_state_dict(feats)
        used = f"ImageNet VGG16 from {weights_file}"
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG_CACHE_FILE
        if not cached.is_file():
            raise CheckpointError(
                "the perceptual loss / SADC backbone needs ImageNet VGG16 weights and none are available offline "
                f"(looked for torchvision's cache {cached})",
                hint="pass --vgg-weights vgg16.safetensors, or set deshadow.vgg=random, or deshadow.perceptual=false",
            )
        features = features_only()
        state = torchvision.models.VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)  # its own cache
        features.load_state_dict(
            {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        )
        used = f"ImageNet VGG16 from torchvision's cache {cached}"
    features = features.eval()
    for p in features.parameters():
        p.requires_grad_(False)
    return features, used
