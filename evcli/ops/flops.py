"""Multiply-accumulate counts of a forward pass, per module, with zero weights optionally skipped.

The counter (:data:`COUNTER`) is a ``TorchDispatchMode``: it sees every ATen operator a forward pass runs, after
PyTorch's own decompositions, and counts the MACs of the ones that do multiply-accumulates:

* ``convolution``: ``out_numel * (C_in / groups) * kh * kw`` (transposed: ``in_numel * C_out/groups * kh * kw``);
* ``mm`` / ``addmm`` (every ``nn.Linear`` and 2-d matmul): ``M * K * N``; ``bmm`` / ``baddbmm``: ``B * M * K * N``;
* fused attention (``scaled_dot_product_attention`` on every backend, incl. the CPU flash kernel that torch's
  own ``FlopCounterMode`` has no formula for): ``Q K^T`` plus ``A V``, ``B * H * L * S * (E + E_v)``.

Softmax, norms, activations, additions and the attention scale are not counted (the convention of the ViT
papers: DeiT-S is "4.6 GFLOPs" = 4.6 G multiply-accumulates at 224 px). Counts are per module (the innermost
module running when the operator ran), so a caller can name the layers; a Conv2d / Linear row carries its
weight density, giving the MACs an ideal zero-skipping kernel would do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

COUNTER = (
    "evcli.ops.flops MacCounter (ATen dispatch): conv, linear/mm/bmm and fused attention (QK^T + AV) "
    "multiply-accumulates; softmax, norms, activations not counted; batch 1"
)

aten = torch.ops.aten


@dataclass
class LayerMacs:
    """MACs of one module at batch 1 (``op``: the kind of operator counted under it)."""

    name: str
    macs: int
    density: float  # fraction of non-zero weights (1.0 for weight-free operators such as attention)
    op: str = ""

    @property
    def sparse_macs(self) -> float:
        return self.macs * self.density


def _numel(shape: Any) -> int:
    return int(math.prod(shape))


def _conv_macs(args: tuple, out: torch.Tensor) -> int:
    x, w = args[0], args[1]
    transposed = bool(args[6]) if len(args) > 6 else False
    if transposed:  # weight (C_in, C_out/groups, k...): every input element feeds C_out/groups * k outputs
        return _numel(x.shape) * _numel(w.shape[1:])
    return _numel(out.shape) * _numel(w.shape[1:])


def _sdpa_macs(args: tuple) -> int:
    q, k, v = args[0], args[1], args[2]
    *batch, length, e = q.shape
    s = k.shape[-2]
    return _numel(batch) * length * s * (e + v.shape[-1])


def _mm(args: tuple) -> int:
    a, b = args[0], args[1]
    return _numel(a.shape) * b.shape[-1]


def _addmm(args: tuple) -> int:
    return _mm(args[1:])


def _bmm(args: tuple) -> int:
    a, b = args[0], args[1]
    return _numel(a.shape) * b.shape[-1]


def _baddbmm(args: tuple) -> int:
    return _bmm(args[1:])


# operator -> (kind, MACs of one call)
_RULES: dict[Any, tuple[str, Callable[[tuple], int]]] = {
    aten.mm.default: ("matmul", _mm),
    aten.addmm.default: ("matmul", _addmm),
    aten.bmm.default: ("bmm", _bmm),
    aten.baddbmm.default: ("bmm", _baddbmm),
}
for _name in (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
):
    _op = getattr(aten, _name, None)
    if _op is not None:
        _RULES[_op.default] = ("attention", _sdpa_macs)


class MacCounter(TorchDispatchMode):
    """Counts MACs of everything run inside ``with MacCounter(model) as counter:``, per module of ``model``.

    ``counter.total`` is the sum; ``counter.rows()`` the per-module rows (in first-seen order).
    """

    def __init__(self, model: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.stack: list[str] = []
        self.counts: dict[tuple[str, str], int] = {}
        self._handles: list[Any] = []
        self._modules: dict[str, nn.Module] = {}

    # module tracking: the innermost running module names each count
    def _push(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any) -> None:
            self.stack.append(name)

        return hook

    def _pop(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.stack:
            self.stack.pop()

    def __enter__(self) -> MacCounter:
        if self.model is not None:
            for name, module in self.model.named_modules():
                self._modules[name] = module
                self._handles.append(module.register_forward_pre_hook(self._push(name)))
                self._handles.append(module.register_forward_hook(self._pop))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is aten.convolution.default:
            kind, macs = "conv", _conv_macs(args, out)
        elif func in _RULES:
            kind, rule = _RULES[func]
            macs = rule(args)
        else:
            return out
        key = (self.stack[-1] if self.stack else "", kind)
        self.counts[key] = self.counts.get(key, 0) + int(macs)
        return out

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_kind(self) -> dict[str, int]:
        """MACs per operator kind (conv, matmul, bmm, attention)."""
        out: dict[str, int] = {}
        for (_, kind), macs in self.counts.items():
            out[kind] = out.get(kind, 0) + macs
        return out

    def rows(self) -> list[LayerMacs]:
        """One row per (module, operator kind); Conv2d / Linear rows carry their weight density."""
        rows = []
        for (name, kind), macs in self.counts.items():
            module = self._modules.get(name)
            density = 1.0
            if isinstance(module, (nn.Conv2d, nn.Linear)) and kind in ("conv", "matmul"):
                w = module.weight
                density = float((w != 0).sum()) / max(1, w.numel())
            rows.append(LayerMacs(name, macs, density, kind))
        return rows


@contextmanager
def counting(model: nn.Module | None = None) -> Iterator[MacCounter]:
    """``with counting(model) as c: model(x)`` then ``c.total`` (no gradients are recorded)."""
    with torch.no_grad(), MacCounter(model) as counter:
        yield counter


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerMacs]:
    """Per-module MACs for one input of ``input_shape`` (C, H, W), eval mode (see :data:`COUNTER`)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with counting(model) as counter:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
    return counter.rows()


def total_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Total MACs of one forward pass at batch 1."""
    return sum(r.macs for r in count_macs(model, input_shape))
