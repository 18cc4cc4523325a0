"""Top-k accuracy and loss of a classifier as sums over batches (the engine adds them up over processes)."""

from __future__ import annotations

import torch
from torch import nn


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...]) -> list[torch.Tensor]:
    """Number of samples whose target is among the top-k logits, for each k (k capped at classes)."""
    kmax = min(max(ks), logits.shape[1])
    pred = logits.topk(kmax, dim=1).indices
    hit = pred.eq(target.view(-1, 1))
    return [hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]


def classification_sums(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Top-1 / top-5 hits, summed cross-entropy and the sample count of one batch."""
    logits = logits.float()
    c1, c5 = topk_correct(logits, target, (1, 5))
    return {
        "top1": c1,
        "top5": c5,
        "loss": nn.functional.cross_entropy(logits, target, reduction="sum"),
        "n": torch.tensor(float(len(target)), device=logits.device),
    }


def classification_summary(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """top1 / top5 in percent and the mean cross-entropy over the whole val set."""
    n = max(float(sums["n"]), 1.0)
    return {
        "top1": 100.0 * float(sums["top1"]) / n,
        "top5": 100.0 * float(sums["top5"]) / n,
        "loss": float(sums["loss"]) / n,
    }
