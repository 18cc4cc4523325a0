"""Recipe schema of ``evcli coarse2fine`` (the ``coarse2fine:`` section). Torch-free: loaded by --help and recipes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from evcli.durations import Duration
from evcli.errors import RecipeError
from evcli.registry import register_command

# The thresholds of the engine-owned sweep: accuracy and FLOPs at each eta, from one evaluation pass.
DEFAULT_SWEEP = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99, 1.0]


@register_command(
    "coarse2fine",
    implementation="evcli.methods.coarse2fine.method:CoarseToFineMethod",
    help="Train a two-stage coarse-to-fine ViT (CF-ViT) and run it with a confidence threshold.",
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
class CoarseToFineConfig:
    """CF-ViT: the coarse and fine stages, informative-region selection, early exit, and the training mix."""

    method: Literal["cfvit", "dense"] = "cfvit"  # dense: the plain ViT of the same size (the baseline)
    coarse_grid: int | None = None  # c: coarse c x c tokens at c*patch px, fine 2c x 2c at the input size
    alpha: float = 0.5  # informative fraction: ceil(alpha * c^2) coarse patches re-split into 2x2 fine ones
    beta: float = 0.99  # EMA over blocks of the class attention (global class attention)
    attn_from_block: int = 3  # class attention accumulated over blocks >= this index (3..11 for 12 blocks)
    selection_start: Duration = Duration("67%")  # informative selection on from here (paper: epoch > 200 of 300)
    threshold: float = 1.0  # eta: exit after the coarse stage when max softmax >= eta (1: every image goes fine)
    sweep: list[float] = field(default_factory=lambda: list(DEFAULT_SWEEP))  # etas evaluated from the same pass
    kl_weight: float = 1.0  # weight of KL(fine.detach() || coarse) (paper: 1)
    # the DeiT training mix (timm Mixup / CutMix, one of them per batch), applied to the fine input
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1

    LIMITS: ClassVar[dict[str, str]] = {
        "coarse_grid": ">= 2, <= 4096",
        "alpha": "(0, 1]",
        "beta": "[0, 1)",
        "attn_from_block": ">= 0, <= 4096",
        "threshold": "[0, 1]",
        "sweep": "[0, 1]",
        "kl_weight": ">= 0",
        "mixup_alpha": ">= 0",
        "cutmix_alpha": ">= 0",
        "mix_prob": "[0, 1]",
        "switch_prob": "[0, 1]",
        "label_smoothing": "[0, 1)",
    }

    def validate(self, recipe: Any) -> None:
        """Cross-key checks of the coarse2fine section."""
        if not self.sweep:
            raise RecipeError("coarse2fine.sweep must list at least one threshold")
        if self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and recipe.data.batch_size % 2:
            raise RecipeError(
                f"Mixup / CutMix pair image i with image B-1-i and need an even batch size, "
                f"got data.batch_size={recipe.data.batch_size}",
                hint="use an even --batch-size, or --set coarse2fine.mix_prob=0",
            )
