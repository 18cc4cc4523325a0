"""Top-k accuracy and loss of a classifier over a (possibly sharded) loader, exact over processes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...]) -> list[torch.Tensor]:
    """Number of samples whose target is among the top-k logits, for each k (k capped at classes)."""
    kmax = min(max(ks), logits.shape[1])
    pred = logits.topk(kmax, dim=1).indices
    hit = pred.eq(target.view(-1, 1))
    return [hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: Any, ctx: Any) -> dict[str, float]:
    """top1 / top5 (percent) and mean cross-entropy over the whole val set, summed over processes."""
    from accelerate.utils import send_to_device

    was_training = model.training
    model.eval()
    acc = ctx.accelerator
    totals = torch.zeros(4, dtype=torch.float64, device=acc.device)
    for x, y in loader:
        x, y = send_to_device((x, y), acc.device, non_blocking=True)
        with acc.autocast():
            logits = model(x)
        logits = logits.float()
        c1, c5 = topk_correct(logits, y, (1, 5))
        loss = nn.functional.cross_entropy(logits, y, reduction="sum")
        totals += torch.stack(
            [
                c1.double(),
                c5.double(),
                loss.double(),
                torch.tensor(float(len(y)), dtype=torch.float64, device=acc.device),
            ]
        )
    if acc.num_processes > 1:
        totals = acc.reduce(totals, "sum")
    model.train(was_training)
    c1, c5, loss, n = totals.tolist()
    n = max(n, 1.0)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n}
