"""MACs and parameters of a generator, counted with forward hooks (the counter is named in every report).

Two conventions, both counted in one forward pass:

* ``torchprofile`` (the CRD / OMGD / GAN Compression papers' numbers, ``torchprofile.profile_macs``): every
  convolution, transposed ones included, costs ``output elements x weight.shape[1] x kh x kw`` where the
  weight's input side is ``in_channels / groups`` for a convolution and ``in_channels`` for a transposed
  convolution, i.e. a stride-2 transposed convolution is counted like a convolution producing its output
  (4x its true cost). As torchprofile 0.0.2 does, an instance norm and a LeakyReLU add their output size and a
  batch norm nothing (torchprofile 0.0.3 and later count an affine norm's output, a BatchNorm's, and nothing for
  the ResNet generators' non-affine instance norms). ReLU, Tanh, dropout, padding, concatenation and additions
  cost nothing (they are < 0.1 % of these generators).
* ``exact``: a convolution costs ``output elements x in/groups x kh x kw``; a transposed convolution costs
  ``input elements x out/groups x kh x kw`` (each input pixel scatters one kernel). Norms and activations not
  counted.

With both, the original CycleGAN ResNet-9 generator (ngf 64) at 256x256 is 56.8 G (torchprofile) / 49.6 G
(exact) and CRD's mobile student (ngf 16) 1.41 G / 0.955 G; the Pix2Pix unet_256 (ngf 64) 18.1 G / 6.05 G.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

COUNTER = (
    "evcli forward-hook counter (evcli.methods.distill_gan.cost), torchprofile convention: conv and transposed "
    "conv = output elements x weight in-channels x kh x kw, instance norm and leaky ReLU = output elements, "
    "batch norm = 0 (torchprofile 0.0.2)"
)


@torch.no_grad()
def count_cost(model: nn.Module, size: int = 256, channels: int = 3) -> dict[str, Any]:
    """MACs of one ``[1, channels, size, size]`` forward in both conventions, and the parameter count."""
    tp, exact = [0], [0]

    def conv(m: nn.Conv2d, args: Any, out: torch.Tensor) -> None:
        k = m.kernel_size[0] * m.kernel_size[1]
        n = out.numel() * (m.in_channels // m.groups) * k
        tp[0] += n
        exact[0] += n

    def tconv(m: nn.ConvTranspose2d, args: Any, out: torch.Tensor) -> None:
        k = m.kernel_size[0] * m.kernel_size[1]
        tp[0] += out.numel() * m.in_channels * k  # torchprofile: weight [in, out/g, kh, kw] read as [oc, ic, ...]
        exact[0] += args[0].numel() * (m.out_channels // m.groups) * k

    def elementwise(m: nn.Module, args: Any, out: torch.Tensor) -> None:
        tp[0] += out.numel()

    handles = []
    for m in model.modules():
        if isinstance(m, nn.ConvTranspose2d):
            handles.append(m.register_forward_hook(tconv))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv))
        elif isinstance(m, (nn.InstanceNorm2d, nn.LeakyReLU)):
            handles.append(m.register_forward_hook(elementwise))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, channels, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {
        "macs": tp[0],
        "macs_exact": exact[0],
        "params": sum(p.numel() for p in model.parameters()),
        "input": f"1x{channels}x{size}x{size}",
        "counter": COUNTER,
    }
