"""The image-classifier base of the classification methods (mix, sparsify, and those to come): timm model
by name, ImageFolder / built-in data, cross-entropy, top-1 / top-5 / loss evaluation summed by the engine."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from evcli.engine.method import Method, StepOutput
from evcli.metrics.classification import classification_summary, classification_sums


def norm_stats(recipe: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input normalisation: the recipe's, else the model's pretrained config, else ImageNet's."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    try:
        import timm

        if timm.is_model(recipe.model.name):
            cfg = timm.models.get_pretrained_cfg(recipe.model.name)
            if cfg is not None:
                mean, std = tuple(cfg.mean), tuple(cfg.std)
    except Exception:  # a name timm does not know is reported when the model is built
        pass
    return tuple(recipe.data.mean or mean), tuple(recipe.data.std or std)


class ClassifierMethod(Method):
    """A timm classifier trained with (label-smoothed) cross-entropy; subclasses change what they need."""

    label_smoothing: float = 0.0

    def __init__(self, recipe: Any):
        super().__init__(recipe)
        self.norm_mean, self.norm_std = norm_stats(recipe)

    def build_data(self, ctx: Any) -> Any:
        from evcli.data.classification import build_classification_data

        r = self.recipe
        return build_classification_data(r.data, r.data.img_size, self.norm_mean, self.norm_std, r.train.seed)

    def num_classes(self, ctx: Any) -> int:
        return self.recipe.model.num_classes or len(ctx.classes)

    def build(self, ctx: Any) -> dict[str, nn.Module]:
        from evcli.models.timm_models import create_model

        m = self.recipe.model
        model = create_model(
            m.name,
            num_classes=self.num_classes(ctx),
            img_size=self.recipe.data.img_size,
            patch_size=m.patch_size,
            drop_rate=m.drop_rate,
            drop_path=m.drop_path,
            kwargs=m.kwargs,
        )
        return {"model": model}

    def training_step(self, modules: Any, batch: Any, ctx: Any) -> StepOutput:
        x, y = batch
        logits = modules.model(x)
        return StepOutput(nn.functional.cross_entropy(logits, y, label_smoothing=self.label_smoothing))

    def eval_step(self, modules: Any, batch: Any, ctx: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        return classification_sums(modules.model(x), y)

    def summarize(self, sums: dict[str, torch.Tensor], ctx: Any) -> dict[str, float]:
        return classification_summary(sums)
