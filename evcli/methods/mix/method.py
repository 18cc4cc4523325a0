"""Engine hooks of ``evcli mix``: batch mixing (none / Mixup / CutMix / SMMix) of each training batch.

Mixup and CutMix are timm's (``timm.data.Mixup``, batch mode, partner = flipped batch, label
smoothing folded into the targets, CutMix area-corrected lambda); ``mixup-cutmix`` is the DeiT recipe's switch
(each batch CutMix with probability ``switch_prob``, else Mixup), the baseline SMMix is measured against. SMMix
(``smmix.py``) replaces the CutMix half of the DeiT recipe: each batch takes the SMMix branch with probability
``switch_prob``, else plain Mixup. SMMix's train-time token head is added in ``transform`` (after user weights load into
the plain backbone) and dropped at export. Random draws use NumPy's global RNG, which the engine reseeds
per step, so mixing is reproducible and resumable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evcli.console import log
from evcli.engine.method import StepOutput
from evcli.errors import UsageError
from evcli.methods.classifier import ClassifierMethod
from evcli.methods.mix import smmix as sm


class MixMethod(ClassifierMethod):
    """Classifier training with image mixing of each training batch."""

    def __init__(self, recipe: Any):
        super().__init__(recipe)
        self.mixer: Any = None
        self.smmix = recipe.method.method == "smmix"
        self.ddp_find_unused_parameters = self.smmix  # the token head is idle on Mixup steps
        self.label_smoothing = self.cfg.label_smoothing
        self.saved_mixed = False

    def build(self, ctx: Any) -> dict[str, nn.Module]:
        modules = super().build(ctx)
        c = self.cfg
        if c.method in ("mixup", "cutmix", "mixup-cutmix", "smmix"):
            from timm.data import Mixup

            self.mixer = Mixup(
                mixup_alpha=c.mixup_alpha if c.method in ("mixup", "mixup-cutmix", "smmix") else 0.0,
                cutmix_alpha=c.cutmix_alpha if c.method in ("cutmix", "mixup-cutmix") else 0.0,
                prob=c.prob,
                switch_prob=c.switch_prob if c.method == "mixup-cutmix" else 0.0,
                mode="batch",
                label_smoothing=c.label_smoothing,
                num_classes=self.num_classes(ctx),
            )
        return modules

    def transform(self, modules: dict[str, nn.Module], ctx: Any) -> None:
        if not self.smmix:
            return
        c, model = self.cfg, modules["model"]
        adapter = sm.TokenGridAdapter.for_model(model, self.recipe.model.name)
        img = self.recipe.data.img_size
        self.grid = adapter.grid_side(img)
        model_grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if adapter.kind != "pvt_v2" and model_grid is not None and tuple(model_grid) != (self.grid, self.grid):
            raise UsageError(
                f"--method smmix: the model's token grid {tuple(model_grid)} does not match "
                f"{img} px images with {adapter.stride} px patches"
            )
        self.sides = sm.side_range(self.grid, c.min_side_ratio, c.max_side_ratio)
        log(
            f"smmix: {adapter.kind} token grid {self.grid}x{self.grid} of {adapter.stride} px patches, "
            f"region sides {self.sides[0]}..{self.sides[-1]}, "
            f"SMMix on {c.switch_prob:.0%} of batches, Mixup on the rest"
        )
        modules["model"] = sm.SMMixModel(model, adapter, self.num_classes(ctx))

    @staticmethod
    def backbone(module: nn.Module) -> nn.Module:
        return module.backbone if isinstance(module, sm.SMMixModel) else module

    def export(self, modules: Any, ctx: Any) -> dict[str, torch.Tensor]:
        # the token head is a training-time device only: the exported model is the plain backbone
        return dict(self.backbone(modules.unwrap("model")).state_dict())

    def training_step(self, modules: Any, batch: Any, ctx: Any) -> StepOutput:
        x, y = batch
        model = modules.model
        if self.mixer is None:
            return super().training_step(modules, batch, ctx)
        if self.smmix and np.random.rand() < self.cfg.switch_prob:
            return self._smmix_step(modules, x, y, ctx)
        x, soft = self.mixer(x, y)
        loss = sm.soft_ce(model(x), soft)
        return StepOutput(loss, {"smmix": torch.tensor(0.0)} if self.smmix else {})

    def _smmix_step(self, modules: Any, x: torch.Tensor, y: torch.Tensor, ctx: Any) -> StepOutput:
        c = self.cfg
        net = modules.unwrap("model")
        adapter = net.adapter
        # 1. motivating pass: the model under training, eval mode, no grad, fp32 (outside autocast)
        was_training = net.training
        net.eval()
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False), adapter.capture() as maps:
            clean_logits = net(x.float())
        net.train(was_training)
        scores = adapter.patch_scores(maps[-1])
        # 2-5. one side per batch, max-min window search, patch-aligned paste, area lambda
        r = self.sides[np.random.randint(len(self.sides))]
        mixed = sm.smmix_images(x, scores, self.grid, r)
        n_cls = self.num_classes(ctx)
        own = sm.smooth_one_hot(y, n_cls, c.label_smoothing)
        target = mixed.lam * own + (1.0 - mixed.lam) * own.flip(0)
        # 6. class loss, fine-grained label assignment, feature consistency
        logits, z_target, z_source = modules.model(mixed.images, mixed.target_mask, mixed.source_mask)
        l_cls = sm.soft_ce(logits, target)
        l_fine = 0.5 * (sm.soft_ce(z_target, own) + sm.soft_ce(z_source, own.flip(0)))
        l_con = sm.consistency_kl(logits, clean_logits, mixed.lam)
        loss = l_cls + c.fine_weight * l_fine + c.consistency_weight * l_con
        if c.save_mixed and not self.saved_mixed and ctx.run_dir is not None and ctx.rank == 0:
            path = sm.save_mixed_grid(
                Path(ctx.run_dir) / "smmix_mixed.png",
                x.detach().float(),
                mixed,
                y,
                c.save_mixed,
                self.norm_mean,
                self.norm_std,
                ctx.classes,
            )
            log(f"smmix: {c.save_mixed} mixed images with their regions -> {path}")
            self.saved_mixed = True
        logs = {
            "smmix": torch.tensor(1.0),
            "loss_cls": l_cls.detach(),
            "loss_fine": l_fine.detach(),
            "loss_consistency": l_con.detach(),
        }
        return StepOutput(loss, logs)
