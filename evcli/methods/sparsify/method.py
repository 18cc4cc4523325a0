"""Engine hooks of ``evcli sparsify``: LBC (N:M), OptG (unstructured), magnitude and SR-STE baselines.

Every method masks the weights of the targeted Conv2d/Linear layers in their forward (see ``layers.py``)
and trains with label-smoothed cross-entropy. What differs is where the mask comes from:

* **LBC**: scores α over the C(M,N) combinations of every group of M input-channel weights; mask
  1[(α⊙1[α≠0])Π ≠ 0] with a straight-through gradient; at each epoch k(e) = C - remaining(e) lowest
  combinations are zeroed, re-zeroed every iteration; exact N:M from t_f, scores frozen then.
* **OptG**: a score per weight (init 0) trained by the supermask straight-through gradient W⊙∂L/∂Ŵ in
  its own parameter group (no weight decay, lr = lr·σ(β(e-E/2))); per epoch a global threshold at
  p_e = p·σ(β(e-E/2)) fixes the layer ratios and masks; inference masks at exactly p.
* **magnitude**: top-|W| masks, one-shot at t_i or ramped (cubic) from t_i to t_f; pruned weights get
  no gradient.
* **SR-STE**: top-N |W| mask every forward, dense straight-through gradient plus λ_W(1-m)⊙W.

The masked layers are swapped in by ``transform`` (after user weights load into the plain model); their
scores and masks are submodules of the model (checkpointed and synchronised with it). The schedule state (k,
frozen flag, p_e, magnitude level) is in :meth:`state_dict`. OptG's mask learning rate is a method-owned
factor of its parameter group's schedule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from evcli.console import log, warn
from evcli.engine.method import OptimizerSpec, StepOutput, decay_groups
from evcli.errors import RecipeError, UsageError
from evcli.methods.classifier import ClassifierMethod
from evcli.methods.sparsify.layers import (
    LBCSite,
    MaskSite,
    OptGSite,
    Site,
    SRSTESite,
    attach,
    global_threshold_masks,
    is_site_key,
    magnitude_layer_mask,
    select_layers,
)
from evcli.methods.sparsify.schedules import (
    cubic_sparsity,
    lbc_removed,
    optg_mask_lr_factor,
    optg_sparsity,
)
from evcli.ops.nm import nm_mask, nm_violations
from evcli.recipe import Recipe


class SparsifyMethod(ClassifierMethod):
    """Sparse training of a classifier with one of four mask rules (``sparsify.method``)."""

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        self.label_smoothing = self.cfg.label_smoothing
        self.kind: str = self.cfg.method
        # LBC freezes its scores after t_f: DDP must then accept parameters without gradients
        self.ddp_find_unused_parameters = self.kind == "lbc" and self.cfg.freeze_scores
        self.nm = self.cfg.pattern()
        self.sites: dict[str, Site] = {}
        self.layer_modules: dict[str, nn.Module] = {}  # the trained model's masked layers, by name
        self.skipped: list[tuple[str, str]] = []
        self.power = 3
        # schedule state (saved in state_dict)
        self.k = 0  # LBC: combinations removed per group
        self.frozen = False  # LBC: scores frozen (one combination left)
        self._rezeroed: tuple | None = None  # LBC: (k, α storages and versions) after the last re-zeroing
        self.p_realized = 0.0  # OptG: fraction of zeros in the current masks
        self.p_e = 0.0  # OptG: sparsity of the current masks
        self.mag_level = 0.0  # magnitude: fraction of the final pruning applied so far (0..1)
        self.layer_report: list[dict[str, Any]] = []
        self._step_started = -1

    # --- building -----------------------------------------------------------------------------

    def pattern_text(self) -> str:
        if self.kind == "dense":
            return "dense"
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{self.cfg.sparsity:g} unstructured"

    def transform(self, modules: dict[str, nn.Module], ctx: Any) -> None:
        self.attach_to(modules["model"])

    def attach_to(self, model: nn.Module) -> None:
        """Choose the layers of ``model`` and swap in the masked forward with this method's sites."""
        c = self.cfg
        if self.kind == "dense":
            log("sparsify: method dense, no layer is masked (the reference run for the sparse methods)")
            return
        m = self.nm[1] if self.nm else None
        choice = select_layers(model, c.targets, c.ignore, m)
        self.skipped = choice.skipped
        if not choice.selected:
            reasons = "; ".join(f"{n}: {r}" for n, r in choice.skipped[:4])
            raise UsageError(
                f"model '{self.recipe.model.name}' has no layer that can take {self.pattern_text()} sparsity"
                + (f" ({reasons}{' ...' if len(choice.skipped) > 4 else ''})" if reasons else ""),
                hint="N:M needs Conv2d/Linear layers whose input channels divide by M; check sparsify.targets/ignore",
            )
        for name, module in choice.selected:
            self.layer_modules[name] = module
            self.sites[name] = self._make_site(module)
            attach(module, self.sites[name])
        self.power = c.power or (3 if any(isinstance(mod, nn.Conv2d) for _, mod in choice.selected) else 4)
        sparse = sum(mod.weight.numel() for _, mod in choice.selected)
        log(
            f"sparsify: {self.kind} {self.pattern_text()} on {len(choice.selected)} layers "
            f"({sparse / 1e6:.2f}M weights); dense: "
            + (", ".join(n for n, _ in choice.skipped[:8]) + (" ..." if len(choice.skipped) > 8 else "") or "none")
        )
        for name, reason in choice.skipped:
            if "divisible" in reason or "custom layer" in reason:
                warn(f"layer {name} left dense: {reason}")

    def _make_site(self, module: nn.Module) -> Site:
        shape = module.weight.shape
        if self.kind == "lbc":
            return LBCSite(shape, *self.nm)
        if self.kind == "optg":
            return OptGSite(shape)
        if self.kind == "srste":
            return SRSTESite(shape, *self.nm, self.cfg.srste_decay)
        return MaskSite(shape)

    def _modules(self, model: nn.Module) -> list[tuple[str, nn.Module, Site]]:
        """(name, module, site) of the masked layers of ``model`` (the trained model or its EMA copy)."""
        out = []
        for name, mod in model.named_modules():
            site = getattr(mod, "evcli_site", None)
            if isinstance(site, Site) and mod is not site:
                out.append((name, mod, site))
        return out

    def optimizers(self, modules: Any, ctx: Any) -> dict[str, OptimizerSpec]:
        t_i, t_f = self._t(ctx, self.cfg.t_i), self._t(ctx, self.cfg.t_f)
        if self.kind == "lbc" or (self.kind == "magnitude" and self.cfg.magnitude_schedule == "gradual"):
            if not t_f > t_i:
                raise RecipeError(
                    f"sparsify.t_f ({self.cfg.t_f} = epoch {t_f:g}) must come after sparsify.t_i "
                    f"({self.cfg.t_i} = epoch {t_i:g}) in this run of {ctx.total_steps} steps"
                )
        self._ctx = ctx
        model = modules.unwrap("model")
        site_params = [p for site in self.sites.values() for p in site.parameters()]
        ids = {id(p) for p in site_params}
        groups = [
            {**g, "params": [p for p in g["params"] if id(p) not in ids]}
            for g in decay_groups(model, self.recipe.optim.weight_decay)
        ]
        groups = [g for g in groups if g["params"]]
        if site_params and self.kind == "optg":
            # the supermask optimizer: its own group, no weight decay, lr = the weights' lr x the OptG factor
            groups.append({"params": site_params, "weight_decay": 0.0, "lr_factor": self._optg_lr_factor})
        elif site_params:
            # LBC: α trained jointly with W by the same optimizer, with the weights' decay (the paper's code)
            groups.append({"params": site_params, "weight_decay": self.recipe.optim.weight_decay})
        return {"main": OptimizerSpec(groups)}

    def _optg_lr_factor(self, step: int) -> float:
        """OptG's mask lr over the weights' lr at ``step``: scale · σ(β(e - E/2))."""
        ctx = self._ctx
        e = step / ctx.steps_per_epoch if self.cfg.update_every == "step" else float(step // ctx.steps_per_epoch)
        return self.cfg.mask_lr_scale * optg_mask_lr_factor(e, self._optg_span(ctx), self.cfg.beta)

    # --- the schedule clock ---------------------------------------------------------------------

    def _t(self, ctx: Any, duration: str) -> float:
        """A recipe duration in (fractional) epochs of this run."""
        return ctx.resolve(duration) / ctx.steps_per_epoch

    def _epoch(self, ctx: Any) -> float:
        if self.cfg.update_every == "step":
            return ctx.step / ctx.steps_per_epoch
        return float(ctx.step // ctx.steps_per_epoch)

    def _total_epochs(self, ctx: Any) -> float:
        return ctx.total_steps / ctx.steps_per_epoch

    def _optg_span(self, ctx: Any) -> float:
        """E of OptG's sigmoid schedules: all epochs, less the fixed-mask tail (``optg_fixed_tail``)."""
        return max(self._total_epochs(ctx) - self._t(ctx, self.cfg.optg_fixed_tail), 1e-9)

    @torch.no_grad()
    def update_schedule(self, ctx: Any) -> None:
        """Apply the schedule of the current (fractional) epoch: LBC k, OptG masks, magnitude masks."""
        e = self._epoch(ctx)
        c = self.cfg
        if self.kind == "lbc":
            combos = next(iter(self.sites.values())).combos
            k = lbc_removed(e, combos, self._t(ctx, c.t_i), self._t(ctx, c.t_f), self.power)
            self.k = max(self.k, k)  # k only increases
            if self.k == combos - 1 and c.freeze_scores and not self.frozen:
                self.frozen = True
                self._freeze()
                log(f"lbc: exact {self.pattern_text()} from epoch {e:g}; scores frozen")
            self._rezero()
        elif self.kind == "optg":
            span = self._optg_span(ctx)
            if e < span:
                self._set_optg_masks(optg_sparsity(e, span, c.sparsity, c.beta))
            elif self.p_e != c.sparsity:
                # optg_fixed_tail: the masks at exactly p once, from the scores, then fixed (the card's
                # fixed-mask finish), so the weights retrain on one mask instead of a new one every epoch
                self._set_optg_masks(c.sparsity)
        elif self.kind == "magnitude":
            t_i, t_f = self._t(ctx, c.t_i), self._t(ctx, c.t_f)
            if c.magnitude_schedule == "oneshot":
                level = 1.0 if e >= t_i else 0.0
            else:
                level = cubic_sparsity(e, 1.0, t_i, t_f)
            self._set_magnitude_level(level)

    def _rezero(self) -> None:
        """LBC: zero the k lowest scores of every group again, unless neither k nor any α changed since the last
        re-zeroing (α's version counter: an optimizer step, a load or a removal bumps it). The card's per-iteration
        removal runs after each optimizer step, once; frozen scores never change, so they cost no mask work."""
        if self.kind != "lbc" or self.k <= 0:
            return
        sites = list(self.sites.values())
        state = (self.k, *((site.alpha.data_ptr(), site.alpha._version) for site in sites))
        if self._rezeroed == state:
            return
        for site in sites:
            site.remove(self.k)
        self._rezeroed = (self.k, *((site.alpha.data_ptr(), site.alpha._version) for site in sites))

    def _freeze(self) -> None:
        for site in self.sites.values():
            for p in site.parameters():
                p.requires_grad_(False)
                p.grad = None

    def _set_optg_masks(self, sparsity: float) -> None:
        sites = list(self.sites.values())
        scores = [s.scores for s in sites]
        if sparsity == self.cfg.sparsity or self.cfg.optg_ties == "weight":
            # exactly the target (always at the end: fixed tail, last step, export), ties at τ broken by |W|
            weights = [self.layer_modules[n].weight.abs() for n in self.sites]
            masks = global_threshold_masks(scores, sparsity, tiebreak=weights)
        else:
            masks = global_threshold_masks(scores, sparsity)  # the reference: ties at τ kept
        for site, mask in zip(sites, masks):
            site.mask = mask
        self.p_e = sparsity
        total = sum(m.numel() for m in masks)
        self.p_realized = sum(int((m == 0).sum()) for m in masks) / max(total, 1)

    def _magnitude_masks(self, weights: list[torch.Tensor], masks: list[torch.Tensor], level: float) -> list:
        """Masks at ``level`` (0 = dense, 1 = the target) ranking |W ⊙ current mask| (pruning never reverses)."""
        current = [w.detach() * mk.to(w.dtype) for w, mk in zip(weights, masks)]
        if self.nm:
            n, m = self.nm
            keep = m - int(round((m - n) * level))
            return [nm_mask(w, keep, m) for w in current]
        target = self.cfg.sparsity * level
        if self.cfg.magnitude_scope == "global":
            return global_threshold_masks([w.abs() for w in current], target)
        return [magnitude_layer_mask(w, target) for w in current]

    def _set_magnitude_level(self, level: float) -> None:
        if level == self.mag_level or level <= 0.0:
            return
        names = list(self.sites)
        weights = [self.layer_modules[n].weight for n in names]
        masks = self._magnitude_masks(weights, [self.sites[n].mask for n in names], level)
        for n, mask in zip(names, masks):
            self.sites[n].mask = mask
        self.mag_level = level

    # --- hooks --------------------------------------------------------------------------------

    def on_epoch_start(self, epoch: int, ctx: Any) -> None:
        if self.cfg.update_every == "epoch":
            self.update_schedule(ctx)

    def training_step(self, modules: Any, batch: Any, ctx: Any) -> StepOutput:
        if ctx.micro_step == 0:
            # steps done before this one; after_optimizer_step derives "this step was the last" from it,
            # whichever way the engine counts ctx.step at that hook
            self._step_started = ctx.step
            if self.cfg.update_every == "step":
                self.update_schedule(ctx)
            with torch.no_grad():
                self._rezero()  # LBC: before every forward, as momentum may have revived zeroed scores
        loss = super().training_step(modules, batch, ctx).loss
        logs: dict[str, torch.Tensor] = {}
        if self.kind == "lbc":
            logs["lbc_removed"] = torch.tensor(float(self.k))
        elif self.kind == "optg":
            logs["optg_sparsity_target"] = torch.tensor(self.p_e)
            logs["optg_sparsity"] = torch.tensor(self.p_realized)  # what the masks hold
        elif self.kind == "magnitude":
            logs["magnitude_level"] = torch.tensor(self.mag_level)
        return StepOutput(loss, logs)

    def after_optimizer_step(self, modules: Any, ctx: Any) -> None:
        with torch.no_grad():
            self._rezero()  # keep evaluation and checkpoints on the scored combinations only
        if self._step_started + 1 == ctx.total_steps:
            self._finish_schedule(ctx)

    @torch.no_grad()
    def _finish_schedule(self, ctx: Any) -> None:
        """At the last step: masks at exactly the target (OptG's evaluation path, magnitude's end level)."""
        if self.kind == "optg" and self.p_e != self.cfg.sparsity:  # (a fixed tail is already there)
            self._set_optg_masks(self.cfg.sparsity)
        elif self.kind == "magnitude":
            self._set_magnitude_level(1.0)
        elif self.kind == "lbc" and self.k < next(iter(self.sites.values())).combos - 1:
            warn(
                f"lbc: training ended before t_f ({self.k} of {next(iter(self.sites.values())).combos - 1} "
                "combinations removed): the export keeps each group's best-scored combination"
            )

    def model_metrics(self, modules: Any, ctx: Any) -> dict[str, float]:
        """Sparsity of the targeted layers as the evaluated model computes (and N:M exactness)."""
        metrics: dict[str, float] = {}
        zeros = total = bad = 0
        with torch.no_grad():
            for _, mod, site in self._modules(modules.unwrap("model")):
                w = site.masked_weight(mod.weight)
                zeros += int((w == 0).sum())
                total += w.numel()
                if self.nm:
                    bad += nm_violations(w, *self.nm)
        metrics["sparsity"] = zeros / max(1, total)
        if self.nm:
            metrics["nm_exact"] = float(bad == 0)
        return metrics

    def best_eligible(self, metrics: dict[str, float], ctx: Any) -> bool:
        """Only evaluations of the model at its target (exact N:M, or the target sparsity) may be "best": an
        earlier, denser model scores higher and its export would be pruned without training."""
        if self.kind == "dense":
            return True
        if self.nm:
            return metrics.get("nm_exact") == 1.0
        return metrics.get("sparsity", 0.0) >= self.cfg.sparsity - 0.005

    # --- export -------------------------------------------------------------------------------

    @torch.no_grad()
    def final_masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The 0/1 mask of every targeted layer folded into the export (exact target pattern)."""
        mods = self._modules(model)
        if self.kind == "optg":
            scores = [site.scores for _, _, site in mods]
            weights = [mod.weight.abs() for _, mod, _ in mods]
            masks = global_threshold_masks(scores, self.cfg.sparsity, tiebreak=weights)
            return {name: mk for (name, _, _), mk in zip(mods, masks)}
        if self.kind == "magnitude":
            weights = [mod.weight for _, mod, _ in mods]
            masks = self._magnitude_masks(weights, [site.mask for _, _, site in mods], 1.0)
            return {name: mk for (name, _, _), mk in zip(mods, masks)}
        return {name: site.final_mask(mod.weight) for name, mod, site in mods}

    def _folded(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        """The model's weights with the masks folded in (site tensors dropped), and one report row per layer."""
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if not is_site_key(k)}
        rows = []
        for name, mask in self.final_masks(model).items():
            key = f"{name}.weight"
            w = state[key] * mask.to(state[key].device, state[key].dtype)
            state[key] = w
            row = {"layer": name, "shape": list(w.shape), "weights": w.numel(), "nonzeros": int((w != 0).sum())}
            row["sparsity"] = 1.0 - row["nonzeros"] / max(1, row["weights"])
            if self.nm:
                row["nm_ok"] = nm_violations(w, *self.nm) == 0
            rows.append(row)
        return state, rows

    def export(self, modules: Any, ctx: Any) -> dict[str, torch.Tensor]:
        """Weights with the masks folded in; scores and masks are not part of the export."""
        return self._folded(modules.unwrap("model"))[0]

    def artifacts(self, modules: Any, out_dir: Any, ctx: Any) -> dict[str, str]:
        """sparsity.json and the per-layer chart sparsity.png of the final weights."""
        rows = self._folded(modules.unwrap("model"))[1]
        self.layer_report = rows
        if not rows:
            return {}
        from evcli.methods.sparsify.report import write_layer_report

        written = write_layer_report(out_dir, rows, title=f"{self.recipe.model.name} {self.kind} {self.pattern_text()}")
        return {"sparsity_chart": written["chart"], "sparsity_table": written["layers"]}

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "k": self.k,
            "frozen": self.frozen,
            "p_e": self.p_e,
            "p_realized": self.p_realized,
            "mag_level": self.mag_level,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("kind") != self.kind:
            raise RecipeError(f"checkpoint holds '{state.get('kind')}' sparsify state, the recipe is '{self.kind}'")
        self.k = int(state["k"])
        self.p_e = float(state["p_e"])
        self.p_realized = float(state.get("p_realized", self.p_e))
        self.mag_level = float(state["mag_level"])
        if state["frozen"] and not self.frozen:
            self.frozen = True
            self._freeze()
