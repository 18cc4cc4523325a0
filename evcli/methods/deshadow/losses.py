"""Losses of LAB-Net and SADC: the VGG16 perceptual loss, the Sobel gradient loss, and SADC's
intra-convolution distillation (KL between channel distributions of the heavy and light paths)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PERCEPTUAL_SLICES = ((0, 3), (3, 8), (8, 13), (13, 20), (20, 27))
PERCEPTUAL_DIVISORS = (1.0, 2.6, 4.8, 3.7, 5.6, 0.15)  # raw input level, then the five VGG slices


class PerceptualLoss(nn.Module):
    """Sum over six levels (the input itself and five frozen VGG16 slices) of L1 / divisor, applied to the
    tensors as given (LAB-Net: LAB in [0, 1]; SADC: RGB in [0, 1]; no ImageNet normalisation).

    The paper compares each slice's output as it leaves the slice (a conv's, before its ReLU). With
    ``post_relu`` the first four levels are compared after a ReLU instead: the release's behaviour, where
    torchvision's in-place ReLU at the start of the next slice rewrites the stored features before the loss
    is taken (the fifth slice has no successor, so it stays pre-ReLU there too).

    Without ``features`` (the recipe's ``perceptual: false``) only the first level remains, the plain L1
    of the tensors: the VGG levels go, but SADC keeps an absolute-colour term (its other terms, Sobel
    gradients and the distillation KL, are blind to a constant colour offset)."""

    def __init__(self, features: nn.Sequential | None, post_relu: bool = False) -> None:
        super().__init__()
        self.post_relu = post_relu
        self.slices = (
            nn.ModuleList(features[a:b] for a, b in PERCEPTUAL_SLICES) if features is not None else nn.ModuleList()
        )
        for p in self.parameters():
            p.requires_grad_(False)
        for m in self.slices.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False  # the stored slice outputs must stay as they left the slice (pre-ReLU)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.l1_loss(pred, target) / PERCEPTUAL_DIVISORS[0]
        x, y = pred, target
        last = len(self.slices) - 1
        for i, (sl, div) in enumerate(zip(self.slices, PERCEPTUAL_DIVISORS[1:])):
            x = sl(x)
            with torch.no_grad():
                y = sl(y)
            if self.post_relu and i < last:
                loss = loss + F.l1_loss(F.relu(x), F.relu(y)) / div
            else:
                loss = loss + F.l1_loss(x, y) / div
        return loss


SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def gradient_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``L1(Sobel_x(pred), Sobel_x(target)) + L1(Sobel_y(pred), Sobel_y(target))``: two mean absolute errors,
    added (not averaged), of depthwise 3x3 Sobel responses with zero padding of 1, as in both papers."""
    c = pred.shape[1]
    loss = pred.new_zeros(())
    for kernel in (SOBEL_X, SOBEL_X.t()):
        k = kernel.to(pred)[None, None].repeat(c, 1, 1, 1)  # [C, 1, 3, 3]
        loss = loss + F.l1_loss(F.conv2d(pred, k, padding=1, groups=c), F.conv2d(target, k, padding=1, groups=c))
    return loss


def distillation_kl(stats: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over layers of KL(softmax(light ring mean).detach() || softmax(heavy boundary mean)) over
    channels (``kl_div(log_softmax(heavy), softmax(light), reduction="batchmean")``)."""
    terms = [
        F.kl_div(F.log_softmax(heavy, dim=1), F.softmax(light.detach(), dim=1), reduction="batchmean")
        for heavy, light in stats
    ]
    return torch.stack(terms).mean()
