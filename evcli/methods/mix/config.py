"""Recipe schema of ``evcli mix`` (the ``mix:`` section). Torch-free: loaded by --help and recipes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from evcli.errors import RecipeError
from evcli.registry import register_command


@register_command(
    "mix",
    implementation="evcli.methods.mix.method:MixMethod",
    help="Train an image classifier (any timm model) with image mixing: none, Mixup or CutMix.",
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

    method: Literal["none", "mixup", "cutmix"] = "cutmix"
    mixup_alpha: float = 0.8  # Beta(alpha, alpha) of the Mixup ratio
    cutmix_alpha: float = 1.0  # Beta(alpha, alpha) of the CutMix area ratio
    prob: float = 1.0  # probability that a batch is mixed at all
    label_smoothing: float = 0.1

    def validate(self, recipe: Any) -> None:
        """Cross-key checks of the mix section."""
        if self.method != "none" and recipe.data.batch_size % 2:
            raise RecipeError(
                f"mix.method {self.method} pairs image i with image B-1-i and needs an even batch size, "
                f"got data.batch_size={recipe.data.batch_size}"
            )
        if not 0.0 <= self.prob <= 1.0:
            raise RecipeError("recipe key 'mix.prob' must be in [0, 1]")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise RecipeError("recipe key 'mix.label_smoothing' must be in [0, 1)")
        if self.mixup_alpha <= 0 or self.cutmix_alpha <= 0:
            raise RecipeError("recipe keys 'mix.mixup_alpha' and 'mix.cutmix_alpha' must be > 0")
