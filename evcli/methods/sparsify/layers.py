"""Layer targeting and the masked layers of the sparsify methods.

A targeted ``nn.Conv2d`` / ``nn.Linear`` keeps its own parameters and keys; its class is swapped for a
subclass whose forward uses ``site.masked_weight(weight)``. The *site* is a submodule of the layer,
``<layer>.evcli_site``, holding the method's tensors of that layer (LBC scores, OptG scores and mask,
magnitude mask): part of the model, so they move with it, are synchronised by its DDP wrapper and are saved
in its checkpoints; an export drops them (masks folded in). An EMA copy of the model shares the live sites (a
site is not copied by ``deepcopy``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evcli.errors import UsageError
from evcli.ops.nm import combination_table, from_groups, nm_mask, reduction_dim

# --------------------------------------------------------------------------------------------------
# Targeting


@dataclass
class LayerChoice:
    """Which layers a run sparsifies, and why each other Conv2d/Linear is left dense."""

    selected: list[tuple[str, nn.Module]]
    skipped: list[tuple[str, str]]  # (name, reason)


def pattern_matches(pattern: str, name: str, module: nn.Module) -> bool:
    """``re:<regex>`` (matched at the start of the name), ``type:<ClassName>`` (any base class), or a name
    (the layer itself or anything under it)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if pattern.startswith("type:"):
        wanted = pattern[5:].strip()
        return any(cls.__name__ == wanted for cls in type(module).__mro__)
    return name == pattern or name.startswith(pattern + ".")


def _classifier(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Module):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _supported(module: nn.Module) -> bool:
    """Only layers whose forward is the plain torch one can have the masked forward swapped in."""
    if isinstance(module, nn.Conv2d):
        return type(module).forward is nn.Conv2d.forward or hasattr(module, "evcli_site")
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward or hasattr(module, "evcli_site")
    return False


def select_layers(
    model: nn.Module, targets: list[str], ignore: list[str], m: int | None, input_channels: int = 3
) -> LayerChoice:
    """The Conv2d/Linear layers to sparsify.

    Default (no ``targets``): every Conv2d/Linear except the stem conv (the first conv reading the image)
    and the classifier. ``ignore`` removes layers; with N:M (``m`` set) layers whose input-channel count is
    not divisible by M are left dense and listed.

    Raises:
        UsageError: a pattern matches no Conv2d/Linear layer.
    """
    layers = [(n, mod) for n, mod in model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    for kind, patterns in (("targets", targets), ("ignore", ignore)):
        for p in patterns:
            if not any(pattern_matches(p, n, mod) for n, mod in layers):
                raise UsageError(
                    f"sparsify.{kind} pattern {p!r} matches no Conv2d/Linear layer of this model",
                    hint="patterns: a layer name (e.g. fc), re:<regex> (e.g. re:layer[1-4]\\..*conv), type:Conv2d",
                )
    stem = next((mod for _, mod in layers if isinstance(mod, nn.Conv2d) and mod.in_channels == input_channels), None)
    if stem is None:
        stem = next((mod for _, mod in layers if isinstance(mod, nn.Conv2d)), None)
    head = _classifier(model)
    selected: list[tuple[str, nn.Module]] = []
    skipped: list[tuple[str, str]] = []
    for name, mod in layers:
        if targets:
            if not any(pattern_matches(p, name, mod) for p in targets):
                skipped.append((name, "not in sparsify.targets"))
                continue
        elif mod is stem:
            skipped.append((name, "stem conv (dense by default)"))
            continue
        elif mod is head:
            skipped.append((name, "classifier (dense by default)"))
            continue
        if any(pattern_matches(p, name, mod) for p in ignore):
            skipped.append((name, "in sparsify.ignore"))
            continue
        if not _supported(mod):
            skipped.append((name, f"custom layer type {type(mod).__name__} (its forward is not torch's)"))
            continue
        if m is not None and reduction_dim(mod.weight) % m:
            skipped.append((name, f"input channels per group {reduction_dim(mod.weight)} not divisible by M={m}"))
            continue
        selected.append((name, mod))
    return LayerChoice(selected, skipped)


# --------------------------------------------------------------------------------------------------
# Masked forward (class swap)


def _conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return self._conv_forward(x, self.evcli_site.masked_weight(self.weight), self.bias)


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, self.evcli_site.masked_weight(self.weight), self.bias)


_SWAPPED: dict[type, type] = {}


def attach(module: nn.Module, site: Site) -> None:
    """Make ``module`` compute with ``site.masked_weight(weight)``; its parameters and keys are unchanged."""
    base = type(module)
    if hasattr(module, "evcli_site"):
        module.evcli_site = site
        return
    if base not in _SWAPPED:
        forward = _conv_forward if isinstance(module, nn.Conv2d) else _linear_forward
        _SWAPPED[base] = type(f"Sparse{base.__name__}", (base,), {"forward": forward, "_evcli_base": base})
    module.__class__ = _SWAPPED[base]
    module.evcli_site = site.to(module.weight.device)


def detach(module: nn.Module) -> None:
    """Undo :func:`attach`: the module computes densely again."""
    if hasattr(module, "evcli_site"):
        module.__class__ = module._evcli_base
        del module.evcli_site


def is_site_key(key: str) -> bool:
    """Whether a state-dict key belongs to a site (dropped from exports)."""
    return ".evcli_site." in f".{key}"


# --------------------------------------------------------------------------------------------------
# Sites: the per-layer tensors of each method


class _LBCMask(torch.autograd.Function):
    """LBC's training mask in one function: forward m = 1[(α ⊙ 1[α≠0]) Π ≠ 0], backward straight through the
    binarisation and the product, dL/dα = (dL/dm Πᵀ) ⊙ 1[α≠0] (removed combinations get no gradient).

    The same values and gradients as the composed ops, without materialising α ⊙ 1[α≠0] (equal to α) forward and
    its product backward: on resnet50 2:4 these passes over the 35M scores were a tenth of a step.
    """

    @staticmethod
    def forward(ctx: Any, alpha: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(alpha, table)
        return ((alpha @ table) != 0).to(alpha.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        alpha, table = ctx.saved_tensors
        return (grad @ table.t()).masked_fill_(alpha == 0, 0.0), None


class _SRSTEMasked(torch.autograd.Function):
    """Ŵ = W ⊙ m(W) forward; backward g + λ (1 - m) ⊙ W to every weight (SR-STE)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, n: int, m: int, decay: float) -> torch.Tensor:
        mask = nm_mask(weight, n, m)
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        weight, mask = ctx.saved_tensors
        return grad + ctx.decay * (1.0 - mask) * weight, None, None, None


class Site(nn.Module):
    """The sparsity state of one layer (subclasses per method): a submodule of the layer. Shared, never
    deep-copied."""

    kind = "base"

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.shape = torch.Size(shape)

    def __deepcopy__(self, memo: dict) -> Site:
        return self

    def masked_weight(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def final_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The 0/1 mask folded into the exported weight."""
        raise NotImplementedError


class LBCSite(Site):
    """LBC: scores α [G, C(M,N)] over the N-subsets of each group of M input-channel weights."""

    kind = "lbc"

    def __init__(self, shape: torch.Size, n: int, m: int):
        super().__init__(shape)
        self.n, self.m = n, m
        self.register_buffer("table", combination_table(n, m), persistent=False)  # Π [C, M]
        combos = self.table.shape[0]
        groups = int(torch.Size(shape).numel()) // m
        # each weight lies in C(M-1, N-1) subsets: α = 1/C(M-1,N-1) makes every weight's summed score 1
        per_weight = int(self.table[:, 0].sum())
        self.alpha = nn.Parameter(torch.full((groups, combos), 1.0 / per_weight))
        self._cache: torch.Tensor | None = None
        self._cache_key: tuple | None = None
        self._chosen: torch.Tensor | None = None  # the combinations the last removal zeroed, [G, C] bool
        self._chosen_k = 0

    @property
    def combos(self) -> int:
        return int(self.table.shape[0])

    def scores_per_weight(self) -> torch.Tensor:
        """s = (α ⊙ 1[α≠0]) Π, [G, M]."""
        a = self.alpha
        return (a * (a != 0).to(a.dtype)) @ self.table.to(a.dtype)

    def mask(self) -> torch.Tensor:
        """The [G, M] mask; straight-through to α while α trains, cached while α does not change."""
        a = self.alpha
        if a.requires_grad and torch.is_grad_enabled():
            return _LBCMask.apply(a, self.table.to(a.dtype))
        # evaluation, or α frozen after t_f: the mask only changes when α does (its version counter)
        key = (a._version, a.data_ptr())
        if self._cache_key != key:
            with torch.no_grad():
                self._cache = (self.scores_per_weight() != 0).to(a.dtype)
            self._cache_key = key
        return self._cache

    def masked_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * from_groups(self.mask(), weight.shape).to(weight.dtype)

    @torch.no_grad()
    def remove(self, k: int) -> None:
        """Zero the k smallest scores of every group; zeros are re-selected first (momentum can revive them).

        Between two removals with the same k only an optimizer step moves the scores, and in almost every group the
        k combinations zeroed last time are still strictly below all the others: then they are exactly the k
        smallest, and only the remaining groups need a top-k (on CPU, resnet50 2:4: about half the cost of a top-k
        over all groups). Ties at the boundary always go through the top-k, so the result is the full top-k's.
        """
        if k <= 0:
            return
        a = torch.where(self.alpha == 0, float("-inf"), self.alpha.detach())
        chosen = self._chosen if self._chosen_k == k and a.device.type == "cpu" else None  # (a GPU top-k is cheap)
        if chosen is None or chosen.shape != a.shape or chosen.device != a.device:
            idx = torch.topk(a, k, dim=1, largest=False).indices
            chosen = torch.zeros_like(a, dtype=torch.bool).scatter_(1, idx, True)
        else:
            below = a.masked_fill(~chosen, float("-inf")).amax(dim=1)
            above = a.masked_fill(chosen, float("inf")).amin(dim=1)
            rows = (below >= above).nonzero().squeeze(1)
            if rows.numel():
                idx = torch.topk(a[rows], k, dim=1, largest=False).indices
                chosen[rows] = torch.zeros(len(rows), a.shape[1], dtype=torch.bool, device=a.device).scatter_(
                    1, idx, True
                )
        self.alpha.masked_fill_(chosen, 0.0)  # in place on the parameter: bumps its version (mask cache)
        self._chosen, self._chosen_k = chosen, k

    @torch.no_grad()
    def final_mask(self, weight: torch.Tensor) -> torch.Tensor:
        # the best-scored surviving combination of each group (identical to the live mask once k = C-1)
        a = self.alpha.detach().clone()
        a[a == 0] = float("-inf")
        best = a.argmax(dim=1)
        groups = self.table.to(weight.device)[best]
        return from_groups(groups, weight.shape).to(weight.dtype)


class OptGSite(Site):
    """OptG: a score per weight (init 0) and the mask fixed for the current epoch."""

    kind = "optg"

    def __init__(self, shape: torch.Size):
        super().__init__(shape)
        self.scores = nn.Parameter(torch.zeros(shape))
        self.register_buffer("mask", torch.ones(shape))

    def masked_weight(self, weight: torch.Tensor) -> torch.Tensor:
        # value = mask; d/dscores = weight * grad (the straight-through supermask gradient, kept and pruned)
        s = self.scores.to(weight.dtype)
        return weight * (self.mask.to(weight.dtype) + (s - s.detach()))

    def final_mask(self, weight: torch.Tensor) -> torch.Tensor:
        return self.mask.to(weight.dtype)


class MaskSite(Site):
    """Magnitude pruning: a fixed 0/1 mask (set at t_i, or refreshed along the ramp); pruned weights get no gradient."""

    kind = "magnitude"

    def __init__(self, shape: torch.Size):
        super().__init__(shape)
        self.register_buffer("mask", torch.ones(shape))

    def masked_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)

    def final_mask(self, weight: torch.Tensor) -> torch.Tensor:
        return self.mask.to(weight.dtype)


class SRSTESite(Site):
    """SR-STE: top-N |W| mask recomputed every forward, dense straight-through gradient plus refined decay."""

    kind = "srste"

    def __init__(self, shape: torch.Size, n: int, m: int, decay: float):
        super().__init__(shape)
        self.n, self.m, self.decay = n, m, decay

    def masked_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return _SRSTEMasked.apply(weight, self.n, self.m, self.decay)

    def final_mask(self, weight: torch.Tensor) -> torch.Tensor:
        return nm_mask(weight, self.n, self.m)


def magnitude_layer_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """0/1 mask zeroing the round(sparsity * numel) smallest |w| of one layer."""
    k = int(round(sparsity * weight.numel()))
    mask = torch.ones_like(weight)
    if k > 0:
        idx = torch.sort(weight.detach().abs().reshape(-1), stable=True).indices[:k]
        mask.view(-1)[idx] = 0.0
    return mask


def global_threshold_masks(
    values: list[torch.Tensor], sparsity: float, tiebreak: list[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """OptG's set_model: global τ so that (1-p)·total values are >= τ, per-layer ratio r_l = frac(v_l < τ),
    then each layer prunes its own r_l·n_l lowest values (stable sort).

    Values tied at τ are kept, so the realized sparsity can undershoot (all-zero scores at the start, or
    weights that never get a gradient). With ``tiebreak`` (e.g. |W|) exactly round(p·total) values are
    pruned instead: the lowest by value, ties broken by the lowest tiebreak.
    """
    flat = torch.cat([v.detach().reshape(-1).float() for v in values])
    total = flat.numel()
    keep = total - int(round(sparsity * total))
    if keep >= total:
        return [torch.ones_like(v) for v in values]
    if tiebreak is not None:
        second = torch.cat([t.detach().reshape(-1).float() for t in tiebreak])
        by_second = torch.sort(second, stable=True).indices
        order = by_second[torch.sort(flat[by_second], stable=True).indices]
        pruned = torch.ones(total, device=flat.device)
        pruned[order[: total - keep]] = 0.0
        masks, start = [], 0
        for v in values:
            masks.append(pruned[start : start + v.numel()].view_as(v).to(v.dtype))
            start += v.numel()
        return masks
    tau = torch.topk(flat, max(keep, 1)).values[-1] if keep > 0 else float("inf")
    masks = []
    for v in values:
        prune = int((v.detach().float() < tau).sum())
        mask = torch.ones_like(v)
        if prune > 0:
            idx = torch.sort(v.detach().reshape(-1).float(), stable=True).indices[:prune]
            mask.view(-1)[idx] = 0.0
        masks.append(mask)
    return masks
