"""Counting multiply-accumulates of a forward pass (conv and linear layers), for cost reports.

Counter: forward hooks on every ``nn.Conv2d`` (output elements x in-channels/groups x kernel area) and
``nn.Linear`` (batch rows x in x out), plus modules that apply a functional convolution and say its cost
through a ``macs(inputs, output)`` method (ECA's depthwise Laplacian). Attention matrix products,
poolings, interpolation and element-wise ops are not counted: the convention of the LAB-Net card's
"conv+linear" numbers. The count runs the plain forward (``layers.plain_forward``), whose convs the hooks
see; the fused CPU inference path computes the same convolutions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from evcli.methods.deshadow.layers import plain_forward


@torch.no_grad()
def count_macs(model: nn.Module, *inputs: Any) -> int:
    """Conv + linear MACs of ``model(*inputs)`` (batch included)."""
    total = [0]

    def conv_hook(m: nn.Conv2d, args: Any, out: torch.Tensor) -> None:
        k = m.kernel_size[0] * m.kernel_size[1]
        total[0] += out.numel() * (m.in_channels // m.groups) * k

    def linear_hook(m: nn.Linear, args: Any, out: torch.Tensor) -> None:
        total[0] += out.numel() * m.in_features

    def custom_hook(m: nn.Module, args: Any, out: torch.Tensor) -> None:
        total[0] += int(m.macs(args, out))

    handles = []
    for m in model.modules():
        if callable(getattr(m, "macs", None)):
            handles.append(m.register_forward_hook(custom_hook))
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        with plain_forward():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return total[0]
