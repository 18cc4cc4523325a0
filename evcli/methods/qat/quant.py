"""Our own LSQ fake-quant layers (no ``torch.ao.quantization``): learned step sizes for weights and activations,
per-tensor or per-output-channel, signed or unsigned, 2 to 8 bits.

LSQ (Esser et al., ICLR 2020): ``q = clamp(round(x / s), Qn, Qp)``, ``x̂ = q·s``, rounding passed straight through,
the step size ``s`` learned with its gradient scaled by ``g = 1 / sqrt(N·Qp)`` (N: values per step size) and
initialised to ``2·mean|x| / sqrt(Qp)``. Signed b-bit levels are ``-2^(b-1) .. 2^(b-1)-1``, unsigned ``0 .. 2^b-1``.

:class:`QuantConv2d` / :class:`QuantLinear` subclass ``nn.Conv2d`` / ``nn.Linear`` so the layer keeps its
``weight`` / ``bias`` names; the quantizers, the kept sparsity mask and the LTS buffers are added under
documented names (``w_quant.step``, ``a_quant.step``, ``a_quant.signed``, ``sparse_mask``, ``lts_*``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

MIN_BITS, MAX_BITS = 2, 8


def level_range(bits: int, signed: bool) -> tuple[int, int]:
    """(Qn, Qp): the lowest and highest integer level of a ``bits``-bit quantizer."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``scale`` (LSQ's step-size gradient scale)."""
    scaled = x * scale
    return (x - scaled).detach() + scaled


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return (x.round() - x).detach() + x


def lsq_init_step(
    x: torch.Tensor, qp: int, channel_dim: int | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """LSQ's initial step size ``2·mean|x| / sqrt(Qp)`` (per channel along ``channel_dim`` when given); with a 0/1
    ``mask`` (a kept sparsity pattern) the mean is over the kept entries only."""
    a = x.detach().abs()
    w = torch.ones_like(a) if mask is None else mask.to(a.dtype)
    if channel_dim is None:
        m = (a * w).sum() / w.sum().clamp_min(1)
    else:
        rows = a.shape[channel_dim]
        a2 = (a * w).transpose(0, channel_dim).reshape(rows, -1)
        m = a2.sum(1) / w.transpose(0, channel_dim).reshape(rows, -1).sum(1).clamp_min(1)
    return (2.0 * m / math.sqrt(qp)).clamp_min(1e-8)


class LsqQuantizer(nn.Module):
    """A learned-step-size fake quantizer.

    Args:
        bits: 2..8.
        signed: signed levels (weights, signed activations) or unsigned (post-ReLU activations); a buffer, so
            that calibration can decide it from data and resume restores it.
        channels: number of output channels for a per-channel step (weights), None for one step per tensor.
        learn_step: the step size is a trained parameter (LSQ); False keeps it a fixed buffer-like parameter
            (LTS's fixed weight scale).
    """

    def __init__(
        self, bits: int, signed: bool, channels: int | None = None, learn_step: bool = True, weight: bool = False
    ):
        super().__init__()
        level_range(bits, signed)  # validates bits
        self.bits = bits
        self.weight = weight  # N of the gradient scale: values per step (weights) or features per sample
        self.channels = channels
        self.step = nn.Parameter(torch.ones(channels if channels else ()), requires_grad=learn_step)
        self.register_buffer("signed", torch.tensor(bool(signed)))
        self.register_buffer("initialized", torch.tensor(False))

    def extra_repr(self) -> str:
        kind = f"per-channel ({self.channels})" if self.channels else "per-tensor"
        return f"bits={self.bits}, signed={bool(self.signed)}, {kind}, learn_step={self.step.requires_grad}"

    @property
    def qn_qp(self) -> tuple[int, int]:
        return level_range(self.bits, bool(self.signed))

    def step_view(self, x: torch.Tensor) -> torch.Tensor:
        """The step size broadcastable against ``x`` (channel axis 0)."""
        s = self.step
        if self.channels:
            s = s.reshape(-1, *([1] * (x.dim() - 1)))
        return s

    def init_from(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """LSQ initialisation from a tensor (the weight, or calibration activations), over ``mask``'s entries."""
        qn, qp = self.qn_qp
        with torch.no_grad():
            self.step.copy_(lsq_init_step(x, qp, 0 if self.channels else None, mask).reshape(self.step.shape))
            self.initialized.fill_(True)

    def levels(self, x: torch.Tensor) -> torch.Tensor:
        """Integer levels of ``x`` (no gradient), as the integer export stores them."""
        qn, qp = self.qn_qp
        return torch.clamp(torch.round(x.detach() / self.step_view(x).detach()), qn, qp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qn, qp = self.qn_qp
        s = self.step_view(x)
        if self.step.requires_grad:
            n = x.numel() // (self.channels or 1) if self.weight else x[0].numel()
            s = grad_scale(s, 1.0 / math.sqrt(max(1, n) * qp)).abs().clamp_min(1e-8)
        return round_ste(torch.clamp(x / s, qn, qp)) * s


class _QuantMixin:
    """What the quantized Conv2d and Linear share: quantizers, kept sparsity mask, LTS state, weight-grad skip."""

    w_quant: LsqQuantizer
    a_quant: LsqQuantizer | None
    weight: nn.Parameter

    def setup_quant(
        self,
        weight_bits: int,
        act_bits: int | None,
        per_channel: bool,
        learn_weight_step: bool,
        act_signed: bool = False,
    ) -> None:
        out = self.weight.shape[0]
        self.w_quant = LsqQuantizer(weight_bits, True, out if per_channel else None, learn_weight_step, weight=True)
        self.a_quant = LsqQuantizer(act_bits, act_signed) if act_bits else None
        self.w_quant.init_from(self.weight)
        self.register_buffer("sparse_mask", None)  # set by keep_sparsity (a sparse source)
        self.lts: LtsState | None = None
        self.skip_frozen_grad = False
        self.calibrating = False  # calibration runs activations in full precision

    def keep_sparsity(self, mask: torch.Tensor) -> None:
        """Keep the zeros of a sparse run: the weight is multiplied by this 0/1 mask before quantizing."""
        self.register_buffer("sparse_mask", mask.to(self.weight.dtype))
        self.w_quant.init_from(self.weight, self.sparse_mask)  # the step of the kept weights, zeros left out

    def masked_weight(self) -> torch.Tensor:
        w = self.weight
        return w * self.sparse_mask if self.sparse_mask is not None else w

    def quant_weight(self) -> torch.Tensor:
        """The fake-quantized weight (dequantized integer levels times the step), as the forward uses it."""
        return self.w_quant(self.masked_weight())

    def int_weight(self) -> torch.Tensor:
        """The integer levels of the weight (what the export stores)."""
        return self.w_quant.levels(self.masked_weight())

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.a_quant(x) if self.a_quant is not None and not self.calibrating else x

    def _weight_for_forward(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(full fake-quant weight, active-channel index or None). With the weight-gradient skip on and a fixed
        weight step, frozen output channels are computed without a gradient: only the active rows carry one."""
        lts = self.lts
        if not (self.training and self.skip_frozen_grad and lts is not None and not self.w_quant.step.requires_grad):
            return self.quant_weight(), None
        active = lts.active_channels
        if active is None:  # no output channel is entirely frozen
            return self.quant_weight(), None
        if active.numel() == 0:  # the whole layer is frozen: no weight gradient at all
            with torch.no_grad():
                return self.quant_weight(), active
        with torch.no_grad():
            full = self.quant_weight()
        w = self.masked_weight()[active]
        s = self.w_quant.step_view(self.weight)
        s = s[active] if self.w_quant.channels else s
        qn, qp = self.w_quant.qn_qp
        part = round_ste(torch.clamp(w / s, qn, qp)) * s
        return full.index_copy(0, active, part), active


class LtsState(nn.Module):
    """Per-weight Lottery Ticket Scratcher state of one layer: training state, kept out of the model's weights.

    Buffers (non-persistent: the method's ``state_dict`` checkpoints them, so resume is exact, while the model's
    own state, its exports and evaluation loads stay free of them): ``distance`` (EMA D of |ŵ - q| in level
    units), ``prev_level`` (q of the last update), ``frozen_step`` (step at which the weight froze, 0 = not frozen;
    permanent), ``frozen_value`` (the latent weight at that step, restored after every optimizer step),
    ``started`` (the EMA has its first value).
    """

    NAMES = ("distance", "prev_level", "frozen_step", "frozen_value", "started")

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("distance", torch.zeros_like(weight.detach()), persistent=False)
        self.register_buffer("prev_level", torch.zeros(weight.shape, dtype=torch.int8), persistent=False)
        self.register_buffer("frozen_step", torch.zeros(weight.shape, dtype=torch.int32), persistent=False)
        self.register_buffer("frozen_value", torch.zeros_like(weight.detach()), persistent=False)
        self.register_buffer("started", torch.tensor(False), persistent=False)
        self.active_channels: torch.Tensor | None = None  # derived from frozen_step

    def state(self) -> dict[str, torch.Tensor]:
        """The buffers, for the method's checkpointed state."""
        return {n: getattr(self, n).detach().clone() for n in self.NAMES}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state` (shapes must match)."""
        for n in self.NAMES:
            buf = getattr(self, n)
            value = state[n]
            if tuple(value.shape) != tuple(buf.shape):
                raise ValueError(f"LTS {n}: shape {list(value.shape)} vs {list(buf.shape)}")
            buf.copy_(value.to(buf.device, buf.dtype))
        self.refresh_channels()

    @property
    def frozen(self) -> torch.Tensor:
        return self.frozen_step > 0

    def refresh_channels(self) -> None:
        """Recompute the output channels that still need a weight gradient (None: every channel)."""
        per_channel = self.frozen.reshape(self.frozen.shape[0], -1).all(1)
        if not bool(per_channel.any()):
            self.active_channels = None
        else:
            self.active_channels = torch.nonzero(~per_channel).flatten()


def _partial_conv_forward(layer: nn.Conv2d, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """A Conv2d (depthwise and grouped included) with LSQ fake-quant weights and input activations."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **quant: object) -> QuantConv2d:
        new = cls.__new__(cls)
        new.__dict__.update(conv.__dict__)  # same parameters, buffers and settings: no copy
        new.setup_quant(**quant)  # type: ignore[arg-type]
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant_input(x)
        w, active = self._weight_for_forward()
        if active is not None and 0 < active.numel() and self.groups == 1:
            return PartialWeightGradConv.apply(x, w, self.bias, active, self)
        return _partial_conv_forward(self, x, w)


class QuantLinear(_QuantMixin, nn.Linear):
    """A Linear with LSQ fake-quant weights and input activations."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, **quant: object) -> QuantLinear:
        new = cls.__new__(cls)
        new.__dict__.update(linear.__dict__)
        new.setup_quant(**quant)  # type: ignore[arg-type]
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant_input(x)
        w, active = self._weight_for_forward()
        if active is not None and 0 < active.numel():
            return PartialWeightGradLinear.apply(x, w, active, self.bias)
        return F.linear(x, w, self.bias)


class PartialWeightGradConv(torch.autograd.Function):
    """conv2d whose backward computes the weight gradient only for the ``active`` output channels (the others
    are frozen): ``convolution_backward`` runs once for the input gradient and once, on the active slice of the
    output gradient, for their weights. The returned weight gradient is zero on frozen rows (they are frozen, so
    it is never used) and the full weight tensor's autograd graph carries it to the active rows only."""

    @staticmethod
    def forward(ctx, x, w, bias, active, layer):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, w, active)
        ctx.layer = layer
        return F.conv2d(x, w, bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, w, active = ctx.saved_tensors
        layer = ctx.layer
        args = (layer.stride, layer.padding, layer.dilation, False, [0, 0], layer.groups)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad_out, x, w, None, *args, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            g = grad_out.index_select(1, active)
            gw = torch.ops.aten.convolution_backward(
                g, x, w.index_select(0, active), None, *args, [False, True, False]
            )[1]
            grad_w = torch.zeros_like(w).index_copy_(0, active, gw)
        grad_b = grad_out.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


class PartialWeightGradLinear(torch.autograd.Function):
    """linear whose backward computes the weight gradient only for the ``active`` output features."""

    @staticmethod
    def forward(ctx, x, w, active, bias):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, w, active)
        ctx.has_bias = bias is not None
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, w, active = ctx.saved_tensors
        grad_x = grad_out @ w if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            g2 = grad_out.reshape(-1, grad_out.shape[-1]).index_select(1, active)
            gw = g2.t() @ x.reshape(-1, x.shape[-1])
            grad_w = torch.zeros_like(w).index_copy_(0, active, gw)
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, grad_w, None, grad_b


def is_quant_layer(module: nn.Module) -> bool:
    return isinstance(module, _QuantMixin)
