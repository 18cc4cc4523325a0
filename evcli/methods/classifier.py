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

        from evcli.models.timm_models import HUB_PREFIX, hub_config

        if recipe.model.name.startswith(HUB_PREFIX):
            cfg = hub_config(recipe.model.name).get("pretrained_cfg", {})
            mean, std = tuple(cfg.get("mean", mean)), tuple(cfg.get("std", std))
        elif timm.is_model(recipe.model.name):
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
        return build_classification_data(
            r.data, r.data.img_size, self.norm_mean, self.norm_std, r.train.seed, eval_only=not ctx.training
        )

    @staticmethod
    def onnx_input_shape(recipe: Any) -> tuple[int, int, int]:
        """The input of one image (``export --format onnx``)."""
        return (3, recipe.data.img_size, recipe.data.img_size)

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
            warn_tag=not m.pretrained,
        )
        return {"model": model}

    def adapt_weights(self, state: dict[str, torch.Tensor], module: nn.Module) -> tuple[dict, list[str]]:
        """As timm loads pretrained weights: a classifier for another class count is left out (the model's own,
        freshly initialised head stays); the first conv of weights for another number of input channels
        (grayscale) is adapted; ViT position embeddings are resampled to the run's token grid and patch-embedding
        kernels to its patch size (timm's own helpers). Anything else must fit exactly."""
        from timm.layers import resample_abs_pos_embed, resample_patch_embed

        own, notes = module.state_dict(), []
        head = module.get_classifier() if hasattr(module, "get_classifier") else None
        head_keys = {f"{n}.{k}" for n, m in module.named_modules() if m is head for k in m.state_dict()}
        mismatched_head = [k for k in head_keys if k in state and state[k].shape != own[k].shape]
        if mismatched_head:
            classes = state[next(k for k in mismatched_head if k.endswith("weight"))].shape[0]
            for k in mismatched_head:
                state[k] = own[k]  # the model's own, freshly initialised head
            notes.append(
                f"classifier {', '.join(sorted(mismatched_head))} re-initialised ({classes} classes in the file, "
                f"{own[next(k for k in mismatched_head if k.endswith('weight'))].shape[0]} here)"
            )
        pos = state.get("pos_embed")
        if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
            prefix = 0 if getattr(module, "no_embed_class", False) else getattr(module, "num_prefix_tokens", 1)
            grid = list(module.patch_embed.grid_size)
            state["pos_embed"] = resample_abs_pos_embed(pos, new_size=grid, num_prefix_tokens=prefix)
            if state["pos_embed"].shape == own["pos_embed"].shape:
                notes.append(
                    f"pos_embed resampled {list(pos.shape)} -> {list(own['pos_embed'].shape)} (token grid {grid})"
                )
        first = (getattr(module, "pretrained_cfg", None) or {}).get("first_conv")
        first = first[0] if isinstance(first, (list, tuple)) else first
        key = f"{first}.weight" if first else None
        w = state.get(key) if key else None
        if w is not None and key in own and w.ndim == 4 and w.shape[1] != own[key].shape[1]:
            from timm.models._manipulate import adapt_input_conv

            state[key] = adapt_input_conv(own[key].shape[1], w, base_chans=w.shape[1])
            notes.append(f"{key} adapted from {w.shape[1]} to {own[key].shape[1]} input channels")
        key = "patch_embed.proj.weight"
        w = state.get(key)
        if w is not None and key in own and w.shape[:2] == own[key].shape[:2] and w.shape != own[key].shape:
            state[key] = resample_patch_embed(w, new_size=list(own[key].shape[-2:]))
            notes.append(f"{key} resampled to {list(own[key].shape[-2:])} px patches")
        return state, notes

    def training_step(self, modules: Any, batch: Any, ctx: Any) -> StepOutput:
        x, y = batch
        logits = modules.model(x)
        return StepOutput(nn.functional.cross_entropy(logits, y, label_smoothing=self.label_smoothing))

    def eval_step(self, modules: Any, batch: Any, ctx: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        return classification_sums(modules.model(x), y)

    def summarize(self, sums: dict[str, torch.Tensor], ctx: Any) -> dict[str, float]:
        return classification_summary(sums)
