"""The contract between the engine and a method: what a method builds, and the fixed points it is called at.

A method is a small object; the engine owns everything else (processes, devices, precision, accumulation,
EMA, seeds, the schedule clock, learning rates, evaluation loop, checkpoints, logging). The phases, in order::

    build_data                      datasets (train, one or more named val sets), optional collate_fn
    build                           named modules, each with a role (see below); random init
    (user weights)                  --weights / --init-from load into ``weights_module`` (fresh runs)
    transform(modules)              module swaps: quantizers, masked layers, two-resolution embeddings,
                                    train-time wrappers. The module structure is fixed from here on:
                                    data-dependent choices are buffers, so a resume loads into it exactly
    (resume)                        a training checkpoint loads here (every module, optimizer, method state)
    calibrate(modules, loader)      fresh runs only: quantizer bounds / step sizes from a few batches
    optimizers(modules)             named optimizers, each over its parameters and with its own schedule
    (prepare)                       each trained module gets its own DDP wrapper; frozen ones do not
    per epoch: on_epoch_start
      per step: training_step (per micro-batch, under autocast)
                  default: the engine back-propagates ``loss``, calls after_backward, clips and steps every
                  optimizer; owns_step: the method calls ``ctx.step_optimizer(name, loss)`` itself
                -> after_optimizer_step
      on_epoch_end
    evaluation                      eval_step (sums per batch) over every val set; the engine loops, sums,
                                    all-reduces once, and calls summarize(sums) -> metrics; model_metrics
                                    (sparsity, bits...) once per evaluated set of modules
    export, artifacts, report_extras

Modules and roles. ``build`` returns ``{name: module}``; a module wrapped in :class:`Frozen` is a *frozen*
module (a teacher, a VGG/Inception feature net): moved to the device, in eval mode, with no gradients, never
in DDP, optimizers, checkpoints, exports or the parameter count; the report names where its weights came from.
Every other module is *trained*: prepared with its own DDP wrapper, optimized, EMA'd if asked, checkpointed and
counted. Hooks receive a :class:`Modules` view: ``modules["G"]`` (or ``modules.G``) is the module to call (the
DDP wrapper of a trained module, so that gradients are synchronised); ``modules.unwrap("G")`` is the module
itself. Under DDP, call each trained module through ``modules[...]`` once per backward pass (concatenate real
and fake batches rather than calling a discriminator twice).

All schedule state of a method (counters, masks, scores, running statistics) lives in module buffers or in
:meth:`Method.state_dict`, so that resume is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from evcli.engine.context import TrainContext
    from evcli.recipe import OptimConfig, Recipe, ScheduleConfig


@dataclass
class StepOutput:
    """What a training step returns: the loss (back-propagated by the engine unless the method owns its
    step; then it is only logged) and extra values to log."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Frozen:
    """A frozen module of ``build``: its parameters must already have ``requires_grad=False``.

    Args:
        module: the module (a teacher, a feature network).
        source: where its weights came from, shown in the log and the report.
    """

    module: nn.Module
    source: str


@dataclass
class OptimizerSpec:
    """One named optimizer of a method.

    Args:
        params: parameters, or parameter groups (dicts with ``params`` and optional ``weight_decay``,
            ``lr_scale`` (a multiple of the optimizer's lr) and ``lr_factor`` (a function of the step,
            multiplied into the schedule: a method-owned part of the schedule, e.g. OptG's mask lr)).
        lr: base learning rate, as given (default: the recipe's ``optim.lr``, or ``optim.lr_base`` scaled to the
            global batch).
        optim: optimizer settings (default: the recipe's ``optim``).
        schedule: learning-rate schedule (default: the recipe's ``schedule``). The recipe's
            ``optim.overrides.<name>`` is applied over both.
    """

    params: Any
    lr: float | None = None
    optim: OptimConfig | None = None
    schedule: ScheduleConfig | None = None


class Modules(Mapping[str, nn.Module]):
    """The named modules of a run as hooks see them (trained ones through their DDP wrapper, if any)."""

    def __init__(self, trained: dict[str, nn.Module], frozen: dict[str, nn.Module], unwrap: Callable | None = None):
        self.trained = trained
        self.frozen = frozen
        self._unwrap = unwrap or (lambda m: m)

    def __getitem__(self, name: str) -> nn.Module:
        if name in self.trained:
            return self.trained[name]
        return self.frozen[name]

    def __getattr__(self, name: str) -> nn.Module:
        if name.startswith("_") or name in ("trained", "frozen"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(f"no module named {name!r} (modules: {', '.join(self)})") from exc

    def __iter__(self) -> Iterator[str]:
        yield from self.trained
        yield from self.frozen

    def __len__(self) -> int:
        return len(self.trained) + len(self.frozen)

    def unwrap(self, name: str) -> nn.Module:
        """The module itself (without its DDP wrapper)."""
        return self._unwrap(self[name])

    def with_trained(self, replacement: dict[str, nn.Module]) -> Modules:
        """The same view with some trained modules replaced (the EMA copies, for evaluation and export)."""
        return Modules({**self.trained, **replacement}, self.frozen, self._unwrap)


class Method:
    """Base class of a method: the hooks the engine calls. Only ``build_data``, ``build`` and
    ``training_step`` have no default; a method that evaluates gives ``eval_step`` and ``summarize``."""

    owns_step: bool = False  # the method steps its optimizers itself (ctx.step_optimizer)
    ddp_find_unused_parameters: bool = False  # some trained parameters are unused on some steps
    weights_module: str = "model"  # the module --weights / --init-from / eval weights load into
    # the method's own export is the state of the *transformed* weights module (quantizer step sizes, extra
    # embeddings...): such a file (same command) loads after transform; other plain weights still load before it
    export_is_transformed: bool = False
    calibration_batches: int = 0  # training batches handed to calibrate() (0: calibrate is not called)

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.cfg = recipe.method

    # --- building -----------------------------------------------------------------------------

    def build_data(self, ctx: TrainContext) -> Any:
        """The run's data: an object with ``train`` and ``val`` (a dataset, or ``{name: dataset}`` for several
        evaluation sets) and a ``description``; optionally ``collate_fn`` and ``classes``.

        Datasets are indexed by ``(epoch, index)`` keys (see ``evcli.data.loading``)."""
        raise NotImplementedError

    def build(self, ctx: TrainContext) -> dict[str, nn.Module | Frozen]:
        """The named modules (random init; user weights load after, into ``weights_module``)."""
        raise NotImplementedError

    def transform(self, modules: dict[str, nn.Module], ctx: TrainContext) -> None:
        """Module swaps after user weights are loaded; may replace entries of ``modules`` (trained ones)."""

    def calibrate(self, modules: Modules, loader: Any, ctx: TrainContext) -> None:
        """Set data-dependent parameters from ``calibration_batches`` training batches (fresh runs only, on the
        device, before the optimizers are built)."""

    def optimizers(self, modules: Modules, ctx: TrainContext) -> dict[str, OptimizerSpec]:
        """The named optimizers. Default: one, ``main``, over the weights module with weight decay on weights
        only (not on biases, norms, 1-d parameters or the model's ``no_weight_decay()``)."""
        return {"main": OptimizerSpec(decay_groups(modules.unwrap(self.weights_module), ctx.recipe.optim.weight_decay))}

    def adapt_weights(
        self, state: dict[str, torch.Tensor], module: nn.Module
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """User weights (``--weights``, ``--init-from``) made to fit the weights module before they load: what a
        user of the method's model family expects to be adapted (a classifier head for another class count,
        position embeddings for another grid). Returns the state and one note per adaptation, logged. The
        default adapts nothing: every other mismatch is refused by name."""
        return state, []

    # --- training -----------------------------------------------------------------------------

    def training_step(self, modules: Modules, batch: Any, ctx: TrainContext) -> StepOutput:
        """Loss of one micro-batch (called under autocast)."""
        raise NotImplementedError

    def after_backward(self, modules: Modules, ctx: TrainContext) -> None:
        """Gradients of the whole (accumulated) step are ready, synchronised over processes; edit them here."""

    def after_optimizer_step(self, modules: Modules, ctx: TrainContext) -> None:
        """The weights were just updated; ``ctx.step`` is this step's index (it advances right after)."""

    def on_epoch_start(self, epoch: int, ctx: TrainContext) -> None:
        """Before the first step of ``epoch`` (not re-run when resuming mid-epoch)."""

    def on_epoch_end(self, epoch: int, ctx: TrainContext) -> None:
        """After the last step of ``epoch``, before the checkpoint of that step."""

    # --- evaluation ---------------------------------------------------------------------------

    def eval_step(self, modules: Modules, batch: Any, ctx: TrainContext) -> dict[str, torch.Tensor]:
        """Sums over one evaluation batch (counts, summed errors, a confusion matrix): the engine adds them up
        over batches and processes (in float64) and hands the totals to :meth:`summarize`."""
        raise NotImplementedError

    def summarize(self, sums: dict[str, torch.Tensor], ctx: TrainContext) -> dict[str, float]:
        """Metrics of one evaluation set from its summed tensors."""
        raise NotImplementedError

    def tables(self, sums: dict[str, torch.Tensor], ctx: TrainContext) -> dict[str, Any]:
        """JSON-able tables of one evaluation set from the same sums (a per-class table, a confusion matrix): not
        metrics (never logged or used for best), but put in the evaluation report (``tables``, prefixed ``<set>/``
        when there are several sets) and in ``ctx.last_tables``."""
        return {}

    def model_metrics(self, modules: Modules, ctx: TrainContext) -> dict[str, float]:
        """Metrics of the evaluated modules themselves, not of data (sparsity, bits, frozen fraction), computed
        once per evaluation and merged into every evaluation set's metrics."""
        return {}

    def best_eligible(self, metrics: dict[str, float], ctx: TrainContext) -> bool:
        """Whether an evaluation may become the run's "best" checkpoint (a sparse method: only once the model has
        its target pattern, so that "best" is never a dense model that an export would prune untrained)."""
        return True

    # --- the end ------------------------------------------------------------------------------

    def export(self, modules: Modules, ctx: TrainContext) -> dict[str, torch.Tensor]:
        """The weights to ship (train-only parts dropped, masks folded in...). Default: the weights module."""
        return dict(modules.unwrap(self.weights_module).state_dict())

    def artifacts(self, modules: Modules, out_dir: Any, ctx: TrainContext) -> dict[str, str]:
        """Pictures, charts and packed files written to ``out_dir`` at the end of a run (rank 0); returns
        ``{label: path}`` for the report's ``files``."""
        return {}

    def report_extras(self, ctx: TrainContext) -> dict[str, Any]:
        """Method-specific entries merged into report.json."""
        return {}

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Method schedule state (tensors and JSON-able values) saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def decay_groups(module: nn.Module, weight_decay: float, extra_no_decay: set[str] | None = None) -> list[dict]:
    """Parameter groups of ``module``: weight decay on weights; none on biases, norms, 1-d parameters and the
    names of the module's ``no_weight_decay()`` (timm's convention: position embeddings, class tokens)."""
    decay, no_decay = [], []
    skip = set(getattr(module, "no_weight_decay", lambda: set())()) | (extra_no_decay or set())
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    groups = ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]
