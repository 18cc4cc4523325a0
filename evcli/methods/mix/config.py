"""Recipe schema of ``evcli mix`` (the ``mix:`` section). Torch-free: loaded by --help and recipes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from evcli.errors import RecipeError
from evcli.registry import register_command


@register_command(
    "mix",
    implementation="evcli.methods.mix.method:MixMethod",
    help="Train an image classifier (any timm model) with image mixing: none, Mixup, CutMix, both (DeiT's "
    "switch) or SMMix.",
    defaults={
        "model.name": "deit_tiny_patch16_224",
        "optim.name": "adamw",
        "optim.lr": 5e-4,
        "optim.weight_decay": 0.05,
        "schedule.epochs": 10,
        "schedule.warmup": "5%",
    },
)
@dataclass
class MixConfig:
    """Image mixing of each training batch and the classification loss."""

    method: Literal["none", "mixup", "cutmix", "mixup-cutmix", "smmix"] = "cutmix"
    mixup_alpha: float = 0.8  # Beta(alpha, alpha) of the Mixup ratio (also SMMix's Mixup half)
    cutmix_alpha: float = 1.0  # Beta(alpha, alpha) of the CutMix area ratio
    prob: float = 1.0  # probability that a batch is mixed at all (mixup / cutmix / mixup-cutmix)
    label_smoothing: float = 0.1
    # probability that a batch takes the CutMix branch (mixup-cutmix, timm's switch_prob: DeiT's 0.5) or the SMMix
    # branch (smmix, which replaces CutMix in the DeiT recipe); the rest take Mixup
    switch_prob: float = 0.5
    # SMMix (arXiv 2212.12977); the paper's defaults
    min_side_ratio: float = 0.25  # region side r drawn from int(s*min) .. int(s*max) on an s x s grid
    max_side_ratio: float = 0.75
    fine_weight: float = 1.0  # weight of the fine-grained label assignment (token head) loss
    consistency_weight: float = 1.0  # weight of the feature consistency KL term
    save_mixed: int = 0  # write a PNG of this many SMMix-mixed images (with their regions) to the run folder

    # ranges of single keys, enforced by the recipe loader (evcli.recipe.check_limit)
    LIMITS: ClassVar[dict[str, str]] = {
        "mixup_alpha": "> 0",
        "cutmix_alpha": "> 0",
        "prob": "[0, 1]",
        "label_smoothing": "[0, 1)",
        "switch_prob": "[0, 1]",
        "min_side_ratio": "(0, 1)",
        "max_side_ratio": "(0, 1)",
        "fine_weight": ">= 0",
        "consistency_weight": ">= 0",
        "save_mixed": ">= 0",
    }

    def validate(self, recipe: Any) -> None:
        """Cross-key checks of the mix section."""
        if self.method != "none" and recipe.data.batch_size % 2:
            raise RecipeError(
                f"mix.method {self.method} pairs image i with image B-1-i and needs an even batch size, "
                f"got data.batch_size={recipe.data.batch_size}"
            )
        if self.min_side_ratio > self.max_side_ratio:
            raise RecipeError(
                f"recipe key 'mix.min_side_ratio' must be <= mix.max_side_ratio ({self.max_side_ratio}), "
                f"got {self.min_side_ratio}"
            )
        if self.save_mixed > recipe.data.batch_size:
            raise RecipeError(
                f"mix.save_mixed ({self.save_mixed}) must be between 0 and the batch size ({recipe.data.batch_size})"
            )
        if self.save_mixed and self.method != "smmix":
            raise RecipeError("mix.save_mixed pictures SMMix batches: use it with mix.method smmix")
