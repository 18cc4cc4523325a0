"""Engine hooks of ``evcli mix``: batch mixing (none / Mixup / CutMix) with soft-target cross-entropy.

Mixup and CutMix are timm's (``timm.data.Mixup``, batch mode, partner = flipped batch, label
smoothing folded into the targets, CutMix area-corrected lambda). Their random draws use NumPy's
global RNG, which the engine reseeds per step, so mixing is reproducible and resumable.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from evcli.engine.method import Method, StepOutput
from evcli.recipe import Recipe


class MixMethod(Method):
    """Classifier training with image mixing of each training batch."""

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        self.mixer: Any = None

    def build(self, ctx: Any) -> nn.Module:
        model = super().build(ctx)
        c = self.cfg
        if c.method in ("mixup", "cutmix"):
            from timm.data import Mixup

            self.mixer = Mixup(
                mixup_alpha=c.mixup_alpha if c.method == "mixup" else 0.0,
                cutmix_alpha=c.cutmix_alpha if c.method == "cutmix" else 0.0,
                prob=c.prob,
                switch_prob=0.0,
                mode="batch",
                label_smoothing=c.label_smoothing,
                num_classes=self.recipe.model.num_classes or ctx.num_classes,
            )
        return model

    def training_step(self, model: nn.Module, batch: Any, ctx: Any) -> StepOutput:
        x, y = batch
        if self.mixer is None:
            logits = model(x)
            return StepOutput(nn.functional.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing))
        x, soft = self.mixer(x, y)
        logits = model(x)
        loss = torch.sum(-soft * nn.functional.log_softmax(logits, dim=-1), dim=-1).mean()
        return StepOutput(loss)
