"""Fake quantizers of ``evcli quant-sr``: DDTB's dual-trainable-bound activation quantizer with its dynamic
gate, PAMS's trainable symmetric clip, and the weight quantizers (DDTB: per-layer 1st/99th-percentile clip,
asymmetric; PAMS: per-layer max-abs, symmetric).

All rounding is straight-through (``round_ste``). The asymmetric grid (DDTB card, "Quantisers"):

    x_c = clamp(x, l, u);  s = (2^k - 1) / (u - l);  z = round(s l);  q = round(s x_c - z);  x_hat = (q + z) / s

``q`` is clamped to [0, 2^k - 1] so a layer holds exactly 2^k levels (a tie at exactly .5 could otherwise
reach 2^k); this is also what lets the export store ``q`` as unsigned integers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def clamp_between(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``clamp(x, low, high)`` with gradients to the bounds where they clip (tensor bounds, broadcast)."""
    return torch.minimum(torch.maximum(x, low), high)


def asym_quantize(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric ``bits``-bit fake quantization of ``x`` onto the grid of [low, high] (see module doc)."""
    levels = 2**bits - 1
    scale = levels / (high - low).clamp_min(1e-8)
    zero = round_ste(scale * low)
    q = round_ste(scale * clamp_between(x, low, high) - zero).clamp(0, levels)
    return (q + zero) / scale


def asym_codes(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes q in [0, 2^bits - 1] of :func:`asym_quantize` (export)."""
    levels = 2**bits - 1
    scale = levels / (high - low).clamp_min(1e-8)
    zero = torch.round(scale * low)
    return torch.round(scale * torch.minimum(torch.maximum(x, low), high) - zero).clamp(0, levels)


def asym_dequantize(codes: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2**bits - 1
    scale = levels / (high - low).clamp_min(1e-8)
    return (codes + torch.round(scale * low)) / scale


def sym_quantize(x: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric fake quantization on [-alpha, alpha] with 2^(bits-1) - 1 positive levels (PAMS)."""
    levels = 2 ** (bits - 1) - 1
    a = alpha.clamp_min(1e-8)
    return round_ste(clamp_between(x, -a, a) * (levels / a)) * (a / levels)


def percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile of all values (linear interpolation, like ``np.percentile``); on device.

    Tensors above torch.quantile's 16M-element limit are subsampled with a fixed stride."""
    flat = x.detach().flatten().float()
    limit = 1 << 24
    if flat.numel() > limit:
        flat = flat[:: -(-flat.numel() // limit)]
    return torch.quantile(flat, q / 100.0)


def minmax_quantize(x: torch.Tensor, bits: int, ste: bool) -> torch.Tensor:
    """The gate's 2-bit activation quantizer: min-max of the whole (batch) tensor. ``ste=False`` is the
    released code (input detached: nothing before it learns); ``ste=True`` passes gradients straight through."""
    src = x if ste else x.detach()
    lo, hi = src.detach().min(), src.detach().max()
    levels = 2**bits - 1
    step = (hi - lo).clamp_min(1e-8) / levels
    return round_ste((src - lo) / step) * step + lo


class SymWeightConv2d(nn.Conv2d):
    """A conv whose weights are quantized symmetrically by their max |w| (the gate's 2-bit convs: ternary)."""

    def __init__(self, *args, bits: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = sym_quantize(self.weight, self.weight.detach().abs().max(), self.bits)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class DynamicGate(nn.Module):
    """DDTB's dynamic gate controller: GAP(x.detach()) -> 2-bit -> 1x1 conv C->32 (2-bit sym, no bias) -> BN ->
    ReLU -> 2-bit -> 1x1 conv 32->2 (2-bit sym, no bias) -> logits; (beta_u, beta_l) = 2 sigmoid(logits).

    For C = 64: 64*32 + 2*32 (BN) + 32*2 = 2176 parameters."""

    def __init__(self, channels: int, hidden: int = 32, ste: bool = True):
        super().__init__()
        self.ste = ste
        self.fc1 = SymWeightConv2d(channels, hidden, 1, bias=False, bits=2)
        self.bn = nn.BatchNorm2d(hidden)
        self.fc2 = SymWeightConv2d(hidden, 2, 1, bias=False, bits=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate logits [N, 2] (upper, lower) of activations [N, C, H, W]."""
        ctx = x.detach().mean(dim=(2, 3), keepdim=True)
        h = self.fc1(minmax_quantize(ctx, 2, self.ste))
        h = minmax_quantize(F.relu(self.bn(h)), 2, self.ste)
        return self.fc2(h).flatten(1)


class DDTBActQuant(nn.Module):
    """Layer-wise asymmetric activation quantizer with trainable upper / lower bounds (``upper``, ``lower``),
    optionally dynamic (a gate rescales both bounds per image).

    Buffers (schedule state, checkpointed): ``is_dynamic`` (chosen at calibration), ``gate_on`` (0 during the
    gate warm-up: static bounds, the gate's logits only feed the warm-up loss), ``enabled`` (0: pass-through,
    the calibration pass). ``last_logits`` holds this forward's gate logits for the warm-up loss.
    """

    def __init__(self, bits: int, channels: int, init: float = 10.0, gate_ste: bool = True):
        super().__init__()
        self.bits = bits
        self.upper = nn.Parameter(torch.tensor(float(init)))
        self.lower = nn.Parameter(torch.tensor(-float(init)))
        self.gate = DynamicGate(channels, ste=gate_ste)
        self.register_buffer("is_dynamic", torch.zeros((), dtype=torch.bool))
        self.register_buffer("gate_on", torch.zeros((), dtype=torch.bool))
        self.register_buffer("enabled", torch.ones((), dtype=torch.bool))
        self.last_logits: torch.Tensor | None = None
        self.observer: list[tuple[float, float]] | None = None  # calibration: per-batch (max, min)
        self.pending_init: float | None = None  # calibration: set the bounds from this forward's input (M)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.append((float(x.detach().max()), float(x.detach().min())))
        if self.pending_init is not None:
            upper, lower = bound_init_percentiles(x, self.pending_init)
            with torch.no_grad():
                self.upper.fill_(upper)
                self.lower.fill_(min(lower, upper - 1e-3))
            self.pending_init = None
        self.last_logits = None
        if not bool(self.enabled):
            return x
        upper, lower = self.upper, self.lower
        if bool(self.is_dynamic):
            logits = self.gate(x)
            self.last_logits = logits
            if bool(self.gate_on):
                beta = 2.0 * torch.sigmoid(logits)
                upper = beta[:, 0].view(-1, 1, 1, 1) * upper
                lower = beta[:, 1].view(-1, 1, 1, 1) * lower
            elif self.training:
                # warm-up: static bounds; the logits feed only the warm-up loss. A zero-weighted term keeps them
                # reachable from the output, so DDP's unused-parameter search does not mark the gate unused and
                # then see its gradient arrive (values and gradients unchanged).
                return asym_quantize(x, lower, upper, self.bits) + 0.0 * logits.sum()
        return asym_quantize(x, lower, upper, self.bits)

    def gate_parameters(self) -> int:
        return sum(p.numel() for p in self.gate.parameters()) if bool(self.is_dynamic) else 0


class PAMSActQuant(nn.Module):
    """PAMS's activation quantizer: a trainable symmetric clip ``alpha`` and a uniform symmetric grid."""

    def __init__(self, bits: int, init: float = 10.0):
        super().__init__()
        self.bits = bits
        self.alpha = nn.Parameter(torch.tensor(float(init)))
        self.register_buffer("enabled", torch.ones((), dtype=torch.bool))
        self.observer: list[tuple[float, float]] | None = None
        self.pending_init: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.append((float(x.detach().max()), float(x.detach().min())))
        if self.pending_init is not None:
            with torch.no_grad():
                self.alpha.fill_(max(float(percentile(x.abs(), self.pending_init)), 1e-3))
            self.pending_init = None
        if not bool(self.enabled):
            return x
        return sym_quantize(x, self.alpha, self.bits)


class QuantConv2d(nn.Conv2d):
    """A conv with fake-quantized weights: ``asym99`` (DDTB: clamp to the [1st, 99th] percentile of the
    layer's weights, recomputed every forward, asymmetric grid) or ``sym`` (PAMS: max |w|, symmetric).

    Exported form: ``weight`` holds the integer codes (uint8 in the file), ``w_low`` / ``w_high`` the clip
    range and ``weight_is_codes`` = 1; the forward then de-quantizes them exactly as training computed them.
    """

    def __init__(self, *args, bits: int = 4, mode: str = "asym99", clip_percent: float = 99.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.bits, self.mode, self.clip_percent = bits, mode, clip_percent
        self.register_buffer("w_low", torch.zeros(()))
        self.register_buffer("w_high", torch.zeros(()))
        self.register_buffer("weight_is_codes", torch.zeros((), dtype=torch.bool))

    def weight_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight.detach()
        if self.mode == "asym99":
            return percentile(w, 100.0 - self.clip_percent), percentile(w, self.clip_percent)
        a = w.abs().max()
        return -a, a

    def quantized_weight(self) -> torch.Tensor:
        if bool(self.weight_is_codes):
            if self.mode == "asym99":
                return asym_dequantize(self.weight, self.w_low, self.w_high, self.bits)
            levels = 2 ** (self.bits - 1) - 1
            return (self.weight - levels) * (self.w_high.clamp_min(1e-8) / levels)
        low, high = self.weight_range()
        if self.mode == "asym99":
            return asym_quantize(self.weight, low, high, self.bits)
        return sym_quantize(self.weight, high, self.bits)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(uint8 codes, low, high) of the current weights: what the export stores."""
        low, high = self.weight_range()
        if self.mode == "asym99":
            q = asym_codes(self.weight.detach(), low, high, self.bits)
        else:
            levels = 2 ** (self.bits - 1) - 1
            a = high.clamp_min(1e-8)
            q = torch.round(torch.clamp(self.weight.detach(), -a, a) * (levels / a)) + levels
        return q.to(torch.uint8), low.float(), high.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.quantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


def bound_init_percentiles(x: torch.Tensor, m: float) -> tuple[float, float]:
    """DDTB's bound initialisation: (upper, lower) = (M-th, (100 - M)-th) percentile of an activation batch."""
    return float(percentile(x, m)), float(percentile(x, 100.0 - m))


def dynamic_intensity(observations: list[tuple[float, float]]) -> float:
    """var(per-batch max) + var(per-batch min) (population variance, as numpy's ``var``)."""
    if not observations:
        return 0.0
    t = torch.tensor(observations, dtype=torch.float64)
    return float(t[:, 0].var(unbiased=False) + t[:, 1].var(unbiased=False))


def top_dynamic(intensities: list[float], ratio: float) -> list[int]:
    """Indices of the ``int(N * ratio)`` quantizers with the highest dynamic intensity (stable order)."""
    count = int(len(intensities) * ratio + 1e-9) if ratio < 1 else len(intensities)
    order = sorted(range(len(intensities)), key=lambda i: -intensities[i])
    return sorted(order[:count])


def packed_bits(numel: int, bits: int) -> int:
    return int(math.ceil(numel * bits / 8))
