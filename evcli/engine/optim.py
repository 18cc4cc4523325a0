"""Optimizers and the learning-rate schedule (a pure function of the step, so resume is exact)."""

from __future__ import annotations

import math
from typing import Any

import torch

from evcli.recipe import OptimConfig, ScheduleConfig, resolve_duration


def create_optimizer(groups: list[dict[str, Any]], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD over parameter groups (a group may carry its own ``lr``)."""
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


class LRSchedule:
    """Linear warm-up then cosine / step / constant, evaluated per optimizer step.

    Each parameter group follows the schedule scaled to its own base lr (``initial_lr``), so a group
    with a 10x lr keeps its ratio, min_lr and warmup_lr included. A group with
    ``lr_schedule: "method"`` is left alone: its method sets that group's lr itself (e.g. OptG's mask lr).
    """

    def __init__(self, cfg: ScheduleConfig, base_lr: float, total_steps: int, steps_per_epoch: int):
        self.cfg = cfg
        self.base_lr = base_lr
        self.total_steps = total_steps
        self.warmup = min(resolve_duration(cfg.warmup, steps_per_epoch, total_steps), total_steps)
        self.milestones = sorted(resolve_duration(m, steps_per_epoch, total_steps) for m in cfg.milestones)

    def factor(self, step: int) -> float:
        """lr(step) / base_lr."""
        c = self.cfg
        warm_start = c.warmup_lr / self.base_lr
        if step < self.warmup:
            return warm_start + (1.0 - warm_start) * step / self.warmup
        if c.sched == "constant":
            return 1.0
        if c.sched == "step":
            return c.gamma ** sum(1 for m in self.milestones if step >= m)
        floor = c.min_lr / self.base_lr
        t = (step - self.warmup) / max(1, self.total_steps - self.warmup)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr for ``step``; returns the first group's lr."""
        f = self.factor(step)
        for group in optimizer.param_groups:
            if group.get("lr_schedule") == "method":
                continue
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * f
        return optimizer.param_groups[0]["lr"]
