"""What a method's hooks see of the run: the accelerator, the recipe, the schedule clock, the modules, and
the engine's optimizer helper for methods that step their own optimizers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from evcli.durations import resolve_duration

if TYPE_CHECKING:
    from evcli.engine.method import Modules
    from evcli.recipe import Recipe


@dataclass
class TrainContext:
    """The run as hooks see it."""

    accelerator: Any
    recipe: Recipe
    run_dir: Path | None
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_step: int = 0  # micro-batch within the current accumulation group
    steps_per_epoch: int = 1
    total_steps: int = 1
    base_lr: float = 0.0  # the recipe's lr (optim.lr as given, or optim.lr_base scaled to the global batch)
    modules: Modules | None = None
    training: bool = False  # a training run (False: evaluation, export, loading)
    classes: list[str] = field(default_factory=list)  # class names of the data (or of the loaded checkpoint)
    extras: dict[str, Any] = field(default_factory=dict)  # per-run objects a method wants to keep
    last_metrics: dict[str, float] = field(default_factory=dict)  # of the latest evaluation (all val sets)
    last_tables: dict[str, Any] = field(default_factory=dict)  # the method's tables of the latest evaluation
    engine: Any = None  # the Trainer (step_optimizer / lr delegate to it)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_last_micro_step(self) -> bool:
        return self.micro_step == self.recipe.train.grad_accum - 1

    def resolve(self, duration: str) -> int:
        """Steps of a duration (``"10%"``, ``"5ep"``, ``"200step"``) in this run."""
        return resolve_duration(duration, self.steps_per_epoch, self.total_steps)

    def step_optimizer(self, name: str, loss: torch.Tensor) -> None:
        """For methods that own their step: back-propagate ``loss`` (scaled for accumulation) and, on the last
        micro-batch of the step, clip, step optimizer ``name`` and zero its gradients.

        The loss is checked first (all processes agree): a NaN/inf loss stops the run before any update.
        Gradients of ``name``'s parameters are cleared before its first backward of a step, so gradients that
        another optimizer's loss left on them (a generator loss through the discriminator) never leak in.
        """
        self.engine.step_optimizer(name, loss)

    def lr(self, name: str = "main") -> float:
        """Current learning rate of optimizer ``name`` (its first parameter group)."""
        return self.engine.current_lr(name)
