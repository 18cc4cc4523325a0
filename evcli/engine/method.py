"""The small interface a method implements to plug into the engine.

The engine calls, in order::

    build_data -> build -> configure_optimizers -> (resume: load_state_dict)
    per epoch:  on_epoch_start
      per step: training_step (per micro-batch, under autocast) -> backward (engine)
                -> after_backward -> optimizer step (engine) -> after_optimizer_step
      on_epoch_end
    evaluate (at the eval cadence and at the end) -> export

A method with several optimizers (GAN distillation) sets ``owns_step = True``: its
``training_step`` then does its own backward passes and optimizer steps with ``ctx.accelerator`` and
``ctx.optimizers``; the engine still runs the schedule clock, LR schedules, NaN guard, checkpoints.

All schedule state of a method (counters, masks, scores, running statistics) must live in module
buffers or in :meth:`Method.state_dict`, so that resume is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from evcli.engine.trainer import TrainContext
    from evcli.recipe import Recipe


@dataclass
class StepOutput:
    """What a training step returns: the loss to back-propagate and extra values to log."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class Method:
    """Base class with classification defaults; override what a method changes."""

    owns_step: bool = False
    ddp_find_unused_parameters: bool = False  # some parameters are unused on some steps

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.cfg = recipe.method

    # --- building -----------------------------------------------------------------------------

    def build_data(self, ctx: TrainContext) -> Any:
        """Datasets of the run: an object with ``train``, ``val``, ``num_classes``, ``description``.

        Datasets are indexed by ``(epoch, index)`` keys (see ``evcli.data.classification``).
        """
        from evcli.data.classification import build_classification_data

        r = self.recipe
        return build_classification_data(r.data, r.data.img_size, ctx.norm_mean, ctx.norm_std, r.train.seed)

    def build(self, ctx: TrainContext) -> nn.Module:
        """The model to train (random init; the engine loads weights / init-from / resume after)."""
        from evcli.models.timm_models import create_model

        m = self.recipe.model
        return create_model(
            m.name,
            num_classes=m.num_classes or ctx.num_classes,
            img_size=self.recipe.data.img_size,
            patch_size=m.patch_size,
            drop_rate=m.drop_rate,
            drop_path=m.drop_path,
            kwargs=m.kwargs,
        )

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Parameter groups: weight decay on weights, none on biases, norms and 1-d parameters."""
        decay, no_decay = [], []
        skip = set(getattr(model, "no_weight_decay", lambda: set())())
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
        wd = self.recipe.optim.weight_decay
        return [
            g for g in ({"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]
        ]

    def configure_optimizers(self, model: nn.Module, ctx: TrainContext) -> list[torch.optim.Optimizer]:
        """The optimizers (one unless the method owns its step)."""
        from evcli.engine.optim import create_optimizer

        return [create_optimizer(self.param_groups(model), self.recipe.optim, ctx.base_lr)]

    # --- hooks --------------------------------------------------------------------------------

    def training_step(self, model: nn.Module, batch: Any, ctx: TrainContext) -> StepOutput:
        """Loss of one micro-batch (called under autocast)."""
        x, y = batch
        logits = model(x)
        return StepOutput(torch.nn.functional.cross_entropy(logits, y))

    def after_backward(self, model: nn.Module, ctx: TrainContext) -> None:
        """Gradients of the whole (accumulated) step are ready; edit them here."""

    def after_optimizer_step(self, model: nn.Module, ctx: TrainContext) -> None:
        """The weights were just updated; ``ctx.step`` is this step's index (it advances right after)."""

    def on_epoch_start(self, epoch: int, ctx: TrainContext) -> None:
        """Before the first step of ``epoch`` (not re-run when resuming mid-epoch)."""

    def on_epoch_end(self, epoch: int, ctx: TrainContext) -> None:
        """After the last step of ``epoch``, before the checkpoint of that step."""

    def evaluate(self, model: nn.Module, loader: Any, ctx: TrainContext) -> dict[str, float]:
        """Metrics on the val loader, reduced over processes. Default: top-1/top-5 accuracy and loss."""
        from evcli.metrics.classification import evaluate_classifier

        return evaluate_classifier(model, loader, ctx)

    def weights_target(self, model: nn.Module) -> nn.Module:
        """The module that ``--weights`` / ``--init-from`` / ``eval`` weights load into (default: the model)."""
        return model

    def export(self, model: nn.Module, ctx: TrainContext) -> dict[str, torch.Tensor]:
        """The weights to ship (train-only parts dropped, masks folded in...)."""
        return dict(model.state_dict())

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Method schedule state (tensors and JSON-able values) saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
