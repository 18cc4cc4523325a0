"""The Lottery Ticket Scratcher (LTS, arXiv 2211.08544): freeze a quantized weight for good once its latent value
has stayed close to its quantization level.

Per quantized layer and weight, once per optimizer step (before the step's forward, from the weights the step
starts from; an explicit call, never a side effect of ``forward``):

1. ŵ = w / s_W (level units, before clipping), q = clamp(round(ŵ), Qn, Qp); the level spacing Δ is 1 here.
2. d_t = |ŵ - q|; D_t = (1 - γ)·d_t + γ·D_{t-1} (the first step starts the EMA at d, not at 0).
3. A level flip since the last step (q_t ≠ q_{t-1}) resets D_t to Δ.
4. After ``t_w`` warm-up steps, every weight not yet frozen with D_t ≤ Δ·ρ_t freezes (``frozen_step`` = t+1)
   and its latent value is kept; freezing is permanent.

ρ_t: ``constant`` (the fixed rate, default 0.1), ``linear`` (t - t_w)/(T - t_w), ``sine`` sin(π/2·(t - t_w)/(T - t_w)).
Frozen weights never move: their gradient is zeroed before the optimizer steps (no momentum builds up) and
their value is restored right after it (weight decay cannot move them either).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SCHEDULES = ("constant", "linear", "sine")


def lts_rho(step: int, warmup: int, total: int, schedule: str, rate: float) -> float:
    """The threshold ratio ρ_t at optimizer step ``step`` (0 during warm-up)."""
    if step < warmup:
        return 0.0
    if schedule == "constant":
        return rate
    span = max(1, total - warmup)
    frac = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        return frac
    if schedule == "sine":
        return math.sin(math.pi / 2 * frac)
    raise ValueError(f"unknown LTS schedule {schedule!r} (known: {', '.join(SCHEDULES)})")


@torch.no_grad()
def lts_update(
    weight: torch.Tensor,
    step_size: torch.Tensor,
    qn: int,
    qp: int,
    state: Any,
    step: int,
    gamma: float,
    rho: float | None,
    keep: torch.Tensor | None = None,
) -> int:
    """One LTS update of a layer (steps 1-4 above); ``rho`` None during warm-up (no freezing). ``keep`` is the
    sparse mask of a kept sparsity pattern (pruned weights are never frozen: they are not trained at all).
    Returns the number of weights newly frozen."""
    w_hat = weight / step_size
    level = torch.clamp(torch.round(w_hat), qn, qp)
    d = (w_hat - level).abs()
    if not bool(state.started):
        state.distance.copy_(d)
        state.started.fill_(True)
    else:
        state.distance.mul_(gamma).add_(d, alpha=1.0 - gamma)
        flipped = level.to(torch.int8) != state.prev_level
        state.distance.masked_fill_(flipped, 1.0)  # Δ = 1 level
    state.prev_level.copy_(level.to(torch.int8))
    if rho is None:
        return 0
    new = (state.distance <= rho) & (state.frozen_step == 0)
    if keep is not None:
        new &= keep.bool()
    n = int(new.sum())
    if n:
        state.frozen_step.masked_fill_(new, step + 1)
        state.frozen_value.copy_(torch.where(new, weight, state.frozen_value))
        state.refresh_channels()
    return n


@torch.no_grad()
def restore_frozen(weight: torch.Tensor, state: Any) -> None:
    """Put every frozen weight back to its value at freezing (after an optimizer step)."""
    frozen = state.frozen_step > 0
    if bool(frozen.any()):
        weight.copy_(torch.where(frozen, state.frozen_value, weight))


def zero_frozen_grad(weight: nn.Parameter, state: Any) -> None:
    """No gradient on frozen weights (so that the optimizer's momentum does not move them either)."""
    if weight.grad is not None:
        weight.grad.masked_fill_(state.frozen_step > 0, 0.0)


def backward_flops_saved(layers: list[dict[str, Any]]) -> float:
    """Fraction of the quantized layers' backward FLOPs that skipping frozen weights' gradients saves, COUNTED:
    backward = dX + dW with equal MACs per layer, and dW of a weight costs that weight's share of the layer's MACs,
    so a layer with frozen fraction f saves f·MACs of its 2·MACs. ``layers``: rows with ``macs`` and ``frozen``."""
    total = sum(2.0 * r["macs"] for r in layers)
    saved = sum(r["frozen"] * r["macs"] for r in layers)
    return saved / total if total else 0.0
