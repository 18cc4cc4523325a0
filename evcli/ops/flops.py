"""Multiply-accumulate counts of the Conv2d and Linear layers of a model, dense and with zero weights skipped.

The counter runs one forward pass with hooks: a conv costs ``out_numel * (I / groups) * kh * kw`` MACs, a linear
``out_numel * in_features``; the sparse count scales each by the layer's weight density (the MACs an ideal
zero-skipping kernel would do). Other layers (norms, activations, attention matmuls) are not counted; say so
next to every number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

COUNTER = "evcli forward hooks: Conv2d + Linear MACs only (batch 1)"


@dataclass
class LayerMacs:
    """MACs of one layer at batch 1."""

    name: str
    macs: int
    density: float  # fraction of non-zero weights

    @property
    def sparse_macs(self) -> float:
        return self.macs * self.density


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerMacs]:
    """Per-layer MACs of Conv2d/Linear for one input of ``input_shape`` (C, H, W)."""
    rows: list[LayerMacs] = []
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            w = module.weight
            if isinstance(module, nn.Conv2d):
                per_out = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
            else:
                per_out = module.in_features
            density = float((w != 0).sum()) / max(1, w.numel())
            rows.append(LayerMacs(name, int(output.numel() * per_out), density))

        return fn

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return rows
