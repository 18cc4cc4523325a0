"""The training loop every method runs in: Accelerate processes, precision, accumulation, EMA, step-keyed
seeding, named optimizers and their schedules, eval cadence, progress, metrics.jsonl and trackers, NaN
guard, checkpoints. The method contract it drives is in ``evcli/engine/method.py``.

Determinism: before every micro-batch the global torch / NumPy / Python RNGs are reseeded from
(seed, step, micro-batch, rank), and every sample's augmentation from (seed, epoch, index). The state
of a run at step k is therefore fully given by the checkpoint (modules, optimizers, EMA, method state,
step): resuming at k gives bit-identical weights to the uninterrupted run on CPU.

Checkpoint tensors: ``module.<name>.<key>`` for every trained module, ``ema.<name>.<key>`` for its EMA,
``state.<path>`` for optimizer and method state (see ``evcli/io/checkpoint.py``). Frozen modules are never
written.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from evcli import __version__
from evcli.console import err_console, log, warn
from evcli.data.loading import ShardedBatchSampler, make_loader, mix_seed
from evcli.engine.context import TrainContext
from evcli.engine.method import Frozen, Method, Modules, StepOutput
from evcli.engine.optim import NamedOptimizer, parameters_of, settings_for
from evcli.errors import (
    CheckpointError,
    DataError,
    HardwareError,
    Interrupted,
    MethodContractError,
    Preempted,
    RecipeError,
    TrainingDiverged,
    UsageError,
)
from evcli.io.checkpoint import (
    atomic_link_or_copy,
    atomic_write_text,
    decode_state,
    encode_state,
    load_model_weights,
    read_safetensors,
    save_safetensors,
    save_weights,
)
from evcli.recipe import Recipe, effective_lr, explain_provenance

# Accelerate tracker name -> the package it needs
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "trackio": "trackio",
    "swanlab": "swanlab",
}


def _reseed_globals(seed: int) -> None:
    # torch.manual_seed would also (lazily) seed every accelerator backend, at ~0.2 ms a call on CPU;
    # seed the CPU generator, and CUDA only once it is in use.
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


@contextmanager
def _eval_mode(modules: Modules) -> Iterator[None]:
    """The trained modules in eval mode inside the block, each back in its own mode after."""
    modes = {n: m.training for n, m in modules.trained.items()}
    for m in modules.trained.values():
        m.eval()
    try:
        yield
    finally:
        for n, m in modules.trained.items():
            m.train(modes[n])


def check_trackers(names: list[str]) -> list[str]:
    """The ``--log-with`` trackers, each known to Accelerate and installed; one clear error otherwise."""
    import importlib.util

    for name in names:
        if name not in TRACKER_PACKAGES:
            from evcli.recipe import did_you_mean

            raise UsageError(
                f"unknown tracker '{name}'{did_you_mean(name, TRACKER_PACKAGES)} (known: {', '.join(TRACKER_PACKAGES)})"
            )
        package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise UsageError(
                f"--log-with {name} needs the '{package}' package, which is not installed",
                hint=f"pip install {package} (metrics.jsonl is always written)",
            )
    return list(names)


def precision_of(recipe: Recipe) -> tuple[str, str]:
    """(mixed precision, where it came from): the recipe's when set, else ``accelerate launch`` /
    ``accelerate config`` (ACCELERATE_MIXED_PRECISION), else no."""
    mp = recipe.train.mixed_precision
    if mp is not None:
        return mp, recipe.provenance.get("train.mixed_precision", "recipe")
    env = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if env:
        if env not in ("no", "fp16", "bf16"):
            raise UsageError(f"ACCELERATE_MIXED_PRECISION={env} is not one of no, fp16, bf16")
        return env, "accelerate launch / accelerate config"
    return "no", "default"


def make_accelerator(recipe: Recipe, find_unused_parameters: bool = False, project_dir: Path | None = None) -> Any:
    """An Accelerator for the recipe's precision and trackers; refuses what the hardware cannot do.

    ``find_unused_parameters`` is passed to DDP for methods with parameters that some steps do not use
    (SMMix's token head on Mixup steps).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    trackers = check_trackers(recipe.train.log_with)
    cuda = torch.cuda.is_available() and not recipe.train.cpu
    mp, _ = precision_of(recipe)
    if mp == "fp16" and not cuda:
        raise HardwareError(
            "mixed_precision fp16 needs a CUDA device; none is available",
            hint="use --mixed-precision bf16 on CPU, or no",
        )
    # Accelerate keeps one process-wide state that refuses a second, different precision; a library user
    # may run several evcli jobs in one process (train fp32, then evaluate bf16). Reset it, keeping the
    # process group (PartialState) intact.
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != mp:
        AcceleratorState._reset_state(reset_partial_state=False)
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    return Accelerator(
        cpu=not cuda,
        mixed_precision=mp,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
        log_with=trackers or None,
        project_dir=str(project_dir) if project_dir is not None and trackers else None,
    )


def _has_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class Trainer:
    """Runs one method's training (or evaluation, or export) in a run folder.

    Args:
        recipe: the resolved recipe.
        method: the method object.
        run_dir: the run folder (written by rank 0); None for evaluation only.
        resume_from: a training checkpoint to continue from exactly.
        initial_weights: plain weights (state, source) loaded into the weights module of a fresh run before
            ``transform`` (``--init-from``, then ``--weights``; ``evcli.api`` reads them).
        explicit_dir: ``run_dir`` was named by the user (it must be new or empty); otherwise a taken default name
            gets a suffix.
        restart: start over in ``run_dir`` although an earlier run that never checkpointed left files there
            (``--resume auto``).
    """

    def __init__(
        self,
        recipe: Recipe,
        method: Method,
        run_dir: Path | None,
        resume_from: Path | None = None,
        initial_weights: list[tuple[dict[str, torch.Tensor], str]] | None = None,
        explicit_dir: bool = True,
        restart: bool = False,
    ):
        self.recipe = recipe
        self.method = method
        self.run_dir = run_dir
        self.resume_from = resume_from
        self.initial_weights = initial_weights or []
        self.explicit_dir, self.restart = explicit_dir, restart
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)
        self.claim: Any = None
        self._signal = ""
        self.accelerator = make_accelerator(
            recipe, find_unused_parameters=method.ddp_find_unused_parameters, project_dir=run_dir
        )
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.ctx = TrainContext(self.accelerator, recipe, run_dir, engine=self)
        self.best: dict[str, Any] = {}
        self._last_tables: dict[str, Any] = {}
        self.last_ckpt_step: int | None = None
        self._interrupt = False
        self.trained: dict[str, nn.Module] = {}  # prepared (DDP-wrapped where it trains)
        self.frozen: dict[str, nn.Module] = {}
        self.frozen_sources: dict[str, str] = {}
        self.named: dict[str, NamedOptimizer] = {}
        self.ema: dict[str, Any] = {}
        self.data: Any = None
        self.val_loaders: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------
    # building: data, modules with roles, user weights, transform

    def build_data(self) -> None:
        self.data = self.method.build_data(self.ctx)
        self.ctx.classes = list(getattr(self.data, "classes", None) or [])

    def val_sets(self) -> dict[str, Any]:
        val = self.data.val
        return dict(val) if isinstance(val, dict) else {"val": val}

    def build_modules(self) -> None:
        """``method.build``: trained modules kept on the side, frozen ones checked, moved, put in eval mode."""
        torch.manual_seed(self.recipe.train.seed)  # same initial weights for a seed, whatever the process
        built = self.method.build(self.ctx)
        if not isinstance(built, dict) or not built:
            raise MethodContractError(f"{type(self.method).__name__}.build must return a non-empty {{name: module}}")
        for name, item in built.items():
            if isinstance(item, Frozen):
                trainable = [n for n, p in item.module.named_parameters() if p.requires_grad]
                if trainable:
                    raise MethodContractError(
                        f"frozen module '{name}' has parameters that require gradients "
                        f"({', '.join(trainable[:3])}{' ...' if len(trainable) > 3 else ''})",
                        hint="call module.requires_grad_(False) before returning it as Frozen",
                    )
                self.frozen[name] = item.module.to(self.accelerator.device).eval()
                self.frozen_sources[name] = item.source
                log(f"frozen module {name}: {item.source}")
            elif isinstance(item, nn.Module):
                self.trained[name] = item
            else:
                raise MethodContractError(f"build returned {type(item).__name__} for '{name}', not a module")
        if self.method.weights_module not in self.trained and self.initial_weights:
            raise MethodContractError(f"the method has no trained module '{self.method.weights_module}' for weights")

    def load_user_weights(self, state: dict[str, torch.Tensor], source: str, strict: bool) -> None:
        """Plain weights (a ``--weights`` file, an export) into the weights module, before ``transform``."""
        target = self.trained[self.method.weights_module]
        if self.ctx.training:  # a training start adapts; evaluation and export load exactly what was saved
            state, notes = self.method.adapt_weights(dict(state), target)
            for note in notes:
                log(f"weights: {note}")
        report = load_model_weights(target, state, source, strict=strict)
        skipped = report["missing"] + report["unexpected"] + report["mismatched"]
        log(f"weights: loaded {source}" + (f" ({len(skipped)} keys did not fit and were skipped)" if skipped else ""))
        if skipped:
            warn("keys not loaded: " + ", ".join(skipped[:6]) + (" ..." if len(skipped) > 6 else ""))

    def transform(self) -> None:
        modules = dict(self.trained)
        self.method.transform(modules, self.ctx)
        for name, module in modules.items():
            if name in self.frozen:
                raise MethodContractError(f"transform returned a trained module under the frozen name '{name}'")
            if not isinstance(module, nn.Module):
                raise MethodContractError(f"transform left {type(module).__name__} under '{name}', not a module")
        self.trained = modules

    def raw_modules(self) -> Modules:
        return Modules(self.trained, self.frozen, self.accelerator.unwrap_model)

    def eval_modules(self, ema: bool = False) -> Modules:
        """Unwrapped modules (evaluation must not go through DDP: ranks may see different batch counts)."""
        trained = {n: self.accelerator.unwrap_model(m) for n, m in self.trained.items()}
        if ema:
            trained.update({n: e.module for n, e in self.ema.items()})
        return Modules(trained, self.frozen, self.accelerator.unwrap_model)

    # ------------------------------------------------------------------------------------------
    # set-up of a training run

    def _setup_training(self) -> None:
        r, ctx, acc = self.recipe, self.ctx, self.accelerator
        ctx.training = True
        self.build_data()
        self.train_sampler = ShardedBatchSampler(
            len(self.data.train), r.data.batch_size, acc.process_index, self.world, r.train.seed, train=True
        )
        batches = self.train_sampler.batches_per_epoch()
        if batches < r.train.grad_accum:
            raise DataError(
                f"the training set ({len(self.data.train)} samples) is too small for batch size "
                f"{r.data.batch_size} x {self.world} process(es) x grad_accum {r.train.grad_accum}",
                hint="lower --batch-size or train.grad_accum",
            )
        ctx.steps_per_epoch = batches // r.train.grad_accum
        full = ctx.steps_per_epoch * r.schedule.epochs
        ctx.total_steps = min(full, r.schedule.max_steps) if r.schedule.max_steps else full
        global_batch = r.data.batch_size * self.world * r.train.grad_accum
        self.global_batch = global_batch
        ctx.base_lr = effective_lr(r.optim, global_batch)
        self.build_modules()
        if self.resume_from is None:
            for state, source in self.initial_weights:
                self.load_user_weights(state, source, strict=r.model.weights_strict)
        self.transform()
        for module in self.trained.values():
            module.to(acc.device)
        collate = getattr(self.data, "collate_fn", None)
        workers, pin = r.data.workers, acc.device.type == "cuda"
        if self.resume_from is None and self.method.calibration_batches > 0:
            self._calibrate(collate)
        self._build_optimizers()
        ema_state = self._load_training_state(self.resume_from) if self.resume_from is not None else None
        self._prepare(ema_state)
        self.train_loader = make_loader(self.data.train, self.train_sampler, workers, pin, collate)
        self.val_loaders = self.make_val_loaders()

    def _calibrate(self, collate: Any) -> None:
        r, acc = self.recipe, self.accelerator
        sampler = ShardedBatchSampler(
            len(self.data.train), r.data.batch_size, acc.process_index, self.world, r.train.seed, train=True
        )
        loader = make_loader(self.data.train, sampler, r.data.workers, acc.device.type == "cuda", collate)
        n = min(self.method.calibration_batches, sampler.batches_per_epoch())

        def batches() -> Any:
            from accelerate.utils import send_to_device

            for i, batch in enumerate(loader):
                if i >= n:
                    break
                yield send_to_device(batch, acc.device)

        _reseed_globals(mix_seed(r.train.seed, 0xCA11B, acc.process_index))
        with torch.no_grad():
            self.method.calibrate(self.raw_modules(), batches(), self.ctx)
        log(f"calibrated on {n} batch(es) of training data")

    def _build_optimizers(self) -> None:
        r, ctx = self.recipe, self.ctx
        specs = self.method.optimizers(self.raw_modules(), ctx)
        unknown = sorted(set(r.optim.overrides) - set(specs))
        if unknown:
            from evcli.recipe import did_you_mean

            raise RecipeError(
                f"recipe key 'optim.overrides.{unknown[0]}': this method has no optimizer named "
                f"'{unknown[0]}'{did_you_mean(unknown[0], specs)}",
                hint=f"its optimizers: {', '.join(specs)}",
            )
        owner = {id(p): name for name, m in self.trained.items() for p in m.parameters()}
        for name, spec in specs.items():
            cfg, sched = settings_for(name, spec.optim or r.optim, spec.schedule or r.schedule, r.optim.overrides)
            over = r.optim.overrides.get(name) or {}
            # an override's lr / lr_base wins; else the method's own lr (as given); else the recipe's
            own = spec.lr is not None and "lr" not in over and "lr_base" not in over
            lr = spec.lr if own else effective_lr(cfg, self.global_batch)
            groups = parameters_of(spec.params)
            for g in groups:
                for p in g["params"]:
                    if id(p) not in owner:
                        raise MethodContractError(
                            f"optimizer '{name}' holds a parameter of shape {list(p.shape)} that belongs to no "
                            "trained module (it would not be checkpointed or synchronised)"
                        )
            self.named[name] = NamedOptimizer(name, groups, cfg, sched, lr, ctx.total_steps, ctx.steps_per_epoch)

    def _prepare(self, ema_state: dict[str, dict[str, torch.Tensor]] | None) -> None:
        acc = self.accelerator
        names = [n for n, m in self.trained.items() if _has_trainable(m)]
        opt_names = list(self.named)
        prepared = acc.prepare(*[self.trained[n] for n in names], *[self.named[n].optimizer for n in opt_names])
        for n, m in zip(names, prepared[: len(names)]):
            self.trained[n] = m
        for n, o in zip(opt_names, prepared[len(names) :]):
            self.named[n].optimizer = o
        self.ctx.modules = self.raw_modules()
        if self.recipe.train.ema:
            from timm.utils import ModelEmaV3

            for n in names:
                # built from the prepared module so that it lives on the same device
                self.ema[n] = ModelEmaV3(acc.unwrap_model(self.trained[n]), decay=self.recipe.train.ema_decay)
                if ema_state is not None:
                    load_model_weights(self.ema[n].module, ema_state[n], f"{self.resume_from} (EMA {n})", strict=True)

    def make_val_loaders(self) -> dict[str, Any]:
        r, acc = self.recipe, self.accelerator
        collate = getattr(self.data, "collate_fn", None)
        loaders = {}
        for name, dataset in self.val_sets().items():
            sampler = ShardedBatchSampler(
                len(dataset),
                r.data.eval_batch_size or 2 * r.data.batch_size,
                acc.process_index,
                acc.num_processes,
                r.train.seed,
                train=False,
            )
            loaders[name] = make_loader(dataset, sampler, r.data.workers, acc.device.type == "cuda", collate)
        return loaders

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def _state_tree(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        acc = self.accelerator
        tensors: dict[str, torch.Tensor] = {}
        for name, module in self.trained.items():
            tensors.update({f"module.{name}.{k}": v for k, v in acc.unwrap_model(module).state_dict().items()})
        for name, ema in self.ema.items():
            tensors.update({f"ema.{name}.{k}": v for k, v in ema.module.state_dict().items()})
        state = {
            "optimizers": {
                n: getattr(o.optimizer, "optimizer", o.optimizer).state_dict() for n, o in self.named.items()
            },
            "method": self.method.state_dict(),
        }
        skeleton = encode_state(state, "state", tensors)
        return tensors, skeleton

    def checkpoint_meta(self) -> dict[str, Any]:
        ctx = self.ctx
        return {
            "evcli_version": __version__,
            "torch_version": torch.__version__,
            "command": self.recipe.command,
            "model_name": self.recipe.model.name,
            "modules": list(self.trained),
            "num_classes": len(ctx.classes),
            "classes": ctx.classes,
            "step": ctx.step,
            "epoch": ctx.epoch,
            "steps_per_epoch": ctx.steps_per_epoch,
            "total_steps": ctx.total_steps,
            "recipe": self.recipe.to_dict(),
        }

    def _check_weights_finite(self) -> None:
        """Refuse to write a checkpoint holding a non-finite tensor ("last good checkpoint" must be good)."""
        bad = ""
        for name, module in self.trained.items():
            for key, t in self.accelerator.unwrap_model(module).state_dict().items():
                if t.is_floating_point() and not torch.isfinite(t).all():
                    bad = f"{name}.{key}"
                    break
            if bad:
                break
        flag = torch.tensor([float(bool(bad))], device=self.accelerator.device)
        if self.world > 1:
            flag = self.accelerator.reduce(flag, "sum")
        if flag.item():
            raise TrainingDiverged(
                f"weights became non-finite at step {self.ctx.step}"
                + (f" ({bad})" if bad else " (on another process)")
                + f"; no checkpoint was written. Last good checkpoint: {self._last_good()}",
                hint="lower the learning rate (--lr), enable optim.clip_grad, or check the data",
            )

    def _last_good(self) -> str:
        if self.last_ckpt_step is not None and self.run_dir:
            return f"{self.run_dir / 'checkpoints' / 'last.safetensors'} (step {self.last_ckpt_step})"
        return "none was written yet"

    def save_checkpoint(self, is_best: bool) -> None:
        """Write checkpoints/last.safetensors (and best) atomically on rank 0."""
        self._check_weights_finite()
        tensors, skeleton = self._state_tree()  # every rank: state_dict() may sync in some wrappers
        if self.is_main and self.run_dir is not None:
            meta = {
                **self.checkpoint_meta(),
                "kind": "training",
                "world_size": self.world,
                "best": self.best,
                "rng": {"scheme": "step-keyed", "seed": self.recipe.train.seed},
                "state": skeleton,
            }
            ckdir = self.run_dir / "checkpoints"
            last = save_safetensors(ckdir / "last.safetensors", tensors, meta)
            if is_best:
                atomic_link_or_copy(last, ckdir / "best.safetensors")
        self.last_ckpt_step = self.ctx.step
        self.accelerator.wait_for_everyone()

    def load_modules_from(self, tensors: dict[str, torch.Tensor], source: str, prefix: str = "module.") -> None:
        """Every trained module's weights from a training checkpoint (strict: same modules, same keys)."""
        acc = self.accelerator
        saved = {k.split(".", 2)[1] for k in tensors if k.startswith(prefix)}
        missing = [n for n in self.trained if n not in saved]
        if missing:
            raise CheckpointError(f"{source} has no weights for module(s) {', '.join(missing)} of this method")
        for name, module in self.trained.items():
            p = f"{prefix}{name}."
            state = {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}
            load_model_weights(acc.unwrap_model(module), state, f"{source} ({name})", strict=True)

    def _load_training_state(self, path: Path) -> dict[str, dict[str, torch.Tensor]] | None:
        """Restore modules, optimizers, method state and the clock; returns the EMA weights, if any."""
        tensors, meta = read_safetensors(path, "checkpoint")
        if meta.get("kind") != "training":
            raise CheckpointError(f"{path} is not an evcli training checkpoint")
        self.load_modules_from(tensors, str(path))
        ema_state = None
        if self.recipe.train.ema:
            ema_state = {}
            for name in self.trained:
                p = f"ema.{name}."
                ema_state[name] = {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}
                if _has_trainable(self.trained[name]) and not ema_state[name]:
                    raise CheckpointError(f"{path} has no EMA weights but the recipe has train.ema: true")
        state = decode_state(meta["state"], tensors)
        saved = state["optimizers"]
        if not isinstance(saved, dict) or set(saved) != set(self.named):
            raise CheckpointError(
                f"{path} holds optimizer states {sorted(saved) if isinstance(saved, dict) else len(saved)}, "
                f"this method has {sorted(self.named)}"
            )
        for name, sd in saved.items():
            self.named[name].optimizer.load_state_dict(sd)
        self.method.load_state_dict(state["method"])
        self.ctx.step = int(meta["step"])
        self.best = meta.get("best", {})
        self.last_ckpt_step = self.ctx.step
        if meta.get("world_size", 1) != self.world:
            warn(
                f"resuming a {meta.get('world_size')}-process run with {self.world} process(es): "
                "data order and results will differ from the uninterrupted run"
            )
        return ema_state

    # ------------------------------------------------------------------------------------------
    # the loop

    def _install_signals(self) -> dict[int, Any]:
        """Ctrl-C (SIGINT) and the preemption signals of schedulers (SIGTERM: SLURM, Kubernetes; SIGUSR1: SLURM's
        ``--signal``) all ask for a checkpoint at the next step boundary, agreed over processes; a second
        signal stops at once."""

        def handler(signum: int, frame: Any) -> None:
            if self._interrupt:  # the second signal: stop now
                raise KeyboardInterrupt
            self._interrupt = True
            self._signal = signal.Signals(signum).name
            warn(f"{self._signal} received: finishing this step and saving a checkpoint (again to stop now)")

        previous = {}
        for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not in the main thread
                break
        return previous

    def _diverged(self, loss: torch.Tensor, what: str = "loss") -> TrainingDiverged:
        value = loss.detach().float()
        kind = "nan" if bool(torch.isnan(value).any()) else "inf"
        return TrainingDiverged(
            f"{what} became {kind} at step {self.ctx.step + 1} (epoch {self.ctx.epoch}); the weights were not "
            f"updated. Last good checkpoint: {self._last_good()}",
            hint="lower the learning rate (--lr), enable optim.clip_grad, or check the data",
        )

    def _check_step(self, loss_sum: torch.Tensor) -> None:
        """NaN/inf guard and interrupt flag, agreed over all processes (one tiny reduce per step)."""
        flags = torch.stack(
            [
                (~torch.isfinite(loss_sum.detach().float())).float(),
                torch.tensor(float(self._interrupt), device=loss_sum.device),
            ]
        )
        if self.world > 1:
            flags = self.accelerator.reduce(flags, "sum")
        bad, interrupted = flags.tolist()
        if bad:
            raise self._diverged(loss_sum)
        self._interrupt = bool(interrupted)

    def step_optimizer(self, name: str, loss: torch.Tensor) -> None:
        """``ctx.step_optimizer``: see :meth:`evcli.engine.context.TrainContext.step_optimizer`."""
        if name not in self.named:
            raise MethodContractError(f"step_optimizer: no optimizer named '{name}' (have: {', '.join(self.named)})")
        opt = self.named[name]
        ctx, accum = self.ctx, self.recipe.train.grad_accum
        bad = (~torch.isfinite(loss.detach().float())).float().reshape(1)
        if self.world > 1:
            bad = self.accelerator.reduce(bad, "sum")
        if bad.item():
            raise self._diverged(loss, f"loss of optimizer '{name}'")
        if ctx.micro_step == 0:
            opt.optimizer.zero_grad(set_to_none=True)
        # only this optimizer's parameters receive gradients from this loss (a generator loss that runs through
        # the discriminator leaves nothing on it)
        self.accelerator.backward(loss / accum if accum > 1 else loss, inputs=opt.params)
        if ctx.is_last_micro_step:
            if opt.cfg.clip_grad:
                self.accelerator.clip_grad_norm_(opt.params, opt.cfg.clip_grad)
            opt.step()
            opt.optimizer.zero_grad(set_to_none=True)

    def current_lr(self, name: str) -> float:
        return self.named[name].lr

    def _no_sync(self) -> ExitStack:
        stack = ExitStack()
        for module in self.trained.values():
            stack.enter_context(self.accelerator.no_sync(module))
        return stack

    def _train_step(self, batches: Any) -> StepOutput:
        from accelerate.utils import send_to_device

        r, ctx, acc = self.recipe, self.ctx, self.accelerator
        for opt in self.named.values():
            opt.apply(ctx.step)
        accum = r.train.grad_accum
        total_loss = None
        out: StepOutput | None = None
        modules = ctx.modules
        for micro in range(accum):
            ctx.micro_step = micro
            _reseed_globals(mix_seed(r.train.seed, ctx.step, micro, acc.process_index, 0x7E))
            batch = send_to_device(next(batches), acc.device, non_blocking=True)
            sync = micro == accum - 1 or self.world == 1
            with ExitStack() if sync else self._no_sync():
                with acc.autocast():
                    out = self.method.training_step(modules, batch, ctx)
                if not self.method.owns_step:
                    acc.backward(out.loss / accum if accum > 1 else out.loss)
            loss = out.loss.detach()
            total_loss = loss if total_loss is None else total_loss + loss
        self._check_step(total_loss)
        if not self.method.owns_step:
            self.method.after_backward(modules, ctx)
            for opt in self.named.values():
                if opt.cfg.clip_grad:
                    acc.clip_grad_norm_(opt.params, opt.cfg.clip_grad)
                opt.step()
            for opt in self.named.values():
                opt.optimizer.zero_grad(set_to_none=True)
        ctx.micro_step = 0
        self.method.after_optimizer_step(modules, ctx)
        for name, ema in self.ema.items():
            ema.update(acc.unwrap_model(self.trained[name]), step=ctx.step)
        assert out is not None
        out.loss = total_loss / accum
        return out

    def _claim_run_dir(self) -> None:
        """Rank 0 claims the run folder (evcli.engine.run.RunClaim); every rank learns its path."""
        from evcli.engine.run import RunClaim, default_run_dir

        requested = self.run_dir if self.run_dir is not None else default_run_dir(self.recipe)
        message = ""
        if self.is_main:
            try:
                self.claim = RunClaim(
                    Path(requested), self.explicit_dir, resume=self.resume_from is not None, restart=self.restart
                )
                message = str(self.claim.path)
            except UsageError as exc:
                message = "\0" + json.dumps([exc.message, exc.hint])
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            message = broadcast_object_list([message])[0]
        if message.startswith("\0"):
            text, hint = json.loads(message[1:])
            raise UsageError(text, hint=hint)
        self.run_dir = self.ctx.run_dir = Path(message)
        self.recipe.out.dir = message
        if self.recipe.train.log_with:
            self.accelerator.project_configuration.set_directories(message)

    def fit(self, on_ready: Callable[[], None] | None = None) -> dict[str, Any]:
        """Train to the end of the schedule, evaluate, export; returns the report.

        Args:
            on_ready: called once everything is built, before the first step (writes the run files).
        """
        self._claim_run_dir()
        try:
            self._setup_training()
            if on_ready is not None:
                on_ready()
        except BaseException:
            if self.claim is not None:
                self.claim.release(failed_before_start=self.resume_from is None)
            raise
        try:
            return self._fit()
        finally:
            if self.claim is not None:
                self.claim.release()

    def _fit(self) -> dict[str, Any]:
        r, ctx, acc = self.recipe, self.ctx, self.accelerator
        log(f"run folder: {self.run_dir}")
        log(explain_provenance(r))
        if r.train.log_with:
            from evcli.recipe import _flatten

            acc.init_trackers(f"evcli-{r.command}", config=_flatten(r.to_dict()))
        if self.resume_from is not None:
            self._trim_metrics(ctx.step)
            log(f"resume: step {ctx.step}/{ctx.total_steps} from {self.resume_from}")
        mp, mp_source = precision_of(r)
        log(f"precision: {mp} (from {mp_source})")
        eval_every = ctx.resolve(r.train.eval_every)
        ckpt_every = ctx.resolve(r.train.ckpt_every) if r.train.ckpt_every else eval_every
        n_params = sum(p.numel() for m in self.trained.values() for p in acc.unwrap_model(m).parameters())
        log(f"data: {self.data.description}")
        opts = ", ".join(f"{n} {o.cfg.name} lr {o.base_lr:.3g}" for n, o in self.named.items())
        log(
            f"model: {r.model.name}, {n_params / 1e6:.2f}M trained parameters ({', '.join(self.trained)}); "
            f"{acc.num_processes} process(es) on {acc.device.type}; {ctx.total_steps} steps "
            f"({ctx.steps_per_epoch}/epoch), global batch {self.global_batch}; optimizers: {opts}"
        )
        previous_handlers = self._install_signals()
        progress = _Progress(ctx.total_steps, enabled=self.is_main)
        t_start, seen, window = time.perf_counter(), 0, []
        metrics: dict[str, float] = {}
        try:
            with progress:
                progress.advance_to(ctx.step)
                while ctx.step < ctx.total_steps:
                    ctx.epoch = ctx.step // ctx.steps_per_epoch
                    in_epoch = ctx.step % ctx.steps_per_epoch
                    if in_epoch == 0:
                        self.method.on_epoch_start(ctx.epoch, ctx)
                    self.train_sampler.set_epoch(ctx.epoch, start_batch=in_epoch * r.train.grad_accum)
                    batches = iter(self.train_loader)
                    steps_left = min(ctx.steps_per_epoch - in_epoch, ctx.total_steps - ctx.step)
                    for _ in range(steps_left):
                        out = self._train_step(batches)
                        seen += self.global_batch
                        window.append(out.loss.detach())
                        ctx.step += 1
                        if ctx.step % ctx.steps_per_epoch == 0:
                            self.method.on_epoch_end(ctx.epoch, ctx)
                        progress.advance_to(ctx.step, loss=out.loss)
                        if self._due(r.train.log_every) or ctx.step == ctx.total_steps:
                            loss = torch.stack(window).float().mean().item()
                            window = []
                            rec = {"step": ctx.step, "epoch": ctx.epoch, "split": "train", "loss": loss}
                            rec.update(
                                {f"lr/{n}" if len(self.named) > 1 else "lr": o.lr for n, o in self.named.items()}
                            )
                            rec["samples_per_s"] = seen / max(time.perf_counter() - t_start, 1e-9)
                            rec.update({k: float(v) for k, v in out.logs.items()})
                            self._write_metrics(rec)
                            progress.note(
                                f"step {ctx.step}/{ctx.total_steps} epoch {ctx.epoch} loss {loss:.4f} "
                                + " ".join(f"{k} {rec[k]:.3g}" for k in rec if k.startswith("lr"))
                                + f" {rec['samples_per_s']:.1f} samples/s"
                            )
                        evaluated = False
                        if self._due(eval_every) or ctx.step == ctx.total_steps:
                            metrics = self.evaluate()
                            self._write_metrics({"step": ctx.step, "epoch": ctx.epoch, "split": "val", **metrics})
                            progress.note(
                                f"eval step {ctx.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                            )
                            evaluated = True
                        is_best = evaluated and self._update_best(metrics)
                        if evaluated or self._due(ckpt_every) or self._interrupt:
                            self.save_checkpoint(is_best)
                        if self._interrupt:
                            if self._signal in ("SIGTERM", "SIGUSR1"):
                                raise Preempted(
                                    f"preempted ({self._signal}) at step {ctx.step}; checkpoint saved",
                                    hint=f"continue with: --resume {self.run_dir}",
                                )
                            raise Interrupted(
                                f"interrupted at step {ctx.step}; checkpoint saved",
                                hint=f"continue with: --resume {self.run_dir}",
                            )
        except KeyboardInterrupt as exc:
            raise Interrupted(
                f"interrupted at step {ctx.step}"
                + (f"; last checkpoint at step {self.last_ckpt_step}" if self.last_ckpt_step is not None else ""),
                hint=f"continue with: --resume {self.run_dir}" if self.last_ckpt_step is not None else None,
            ) from exc
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        if not metrics:  # resumed at the very end: evaluate once more for the report
            metrics = self.evaluate()
        if not self.best and r.train.best_metric in metrics:
            warn(
                "no evaluation of this run was eligible as best (e.g. a sparse model before its target pattern): "
                "checkpoints/best.safetensors was not written; exports use the last checkpoint"
            )
        report = self._finish(metrics, time.perf_counter() - t_start, seen)
        if r.train.log_with:
            acc.end_training()
        return report

    def _update_best(self, metrics: dict[str, float]) -> bool:
        key, mode = self.recipe.train.best_metric, self.recipe.train.best_mode
        if key not in metrics or not self.method.best_eligible(metrics, self.ctx):
            return False
        previous = self.best.get(key)
        if previous is None or (metrics[key] > previous if mode == "max" else metrics[key] < previous):
            self.best = {"step": self.ctx.step, **metrics}
            return True
        return False

    def _write_metrics(self, record: dict[str, Any]) -> None:
        record = {**record, "time": round(time.time(), 3)}
        if self.is_main and self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.recipe.train.log_with:
            split = record.get("split", "train")
            values = {
                f"{split}/{k}": v
                for k, v in record.items()
                if k not in ("step", "split", "time") and isinstance(v, (int, float))
            }
            self.accelerator.log(values, step=record["step"])

    def _trim_metrics(self, step: int) -> None:
        """On resume, drop metric records the killed run wrote after its last checkpoint."""
        path = self.run_dir / "metrics.jsonl" if self.run_dir else None
        if not self.is_main or path is None or not path.exists():
            return
        keep = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line half-written when the run was killed
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    def _due(self, every: int) -> bool:
        return every > 0 and self.ctx.step % every == 0

    # ------------------------------------------------------------------------------------------
    # evaluation (the engine loops, sums and reduces; the method sums one batch and summarizes)

    def evaluate(self) -> dict[str, float]:
        """Metrics of every val set (prefixed ``<set>/`` when there are several), EMA ones as ``ema_``."""
        metrics = self._evaluate_all(self.eval_modules())
        if self.ema:
            tables = self.ctx.last_tables
            ema_metrics = self._evaluate_all(self.eval_modules(ema=True))
            metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
            tables.update({f"ema_{k}": v for k, v in self.ctx.last_tables.items()})
            self.ctx.last_metrics, self.ctx.last_tables = dict(metrics), tables
        return metrics

    def _evaluate_all(self, modules: Modules) -> dict[str, float]:
        metrics: dict[str, float] = {}
        tables: dict[str, Any] = {}
        several = len(self.val_loaders) > 1
        for name, loader in self.val_loaders.items():
            values = self.evaluate_loader(modules, loader)
            metrics.update({(f"{name}/{k}" if several else k): v for k, v in values.items()})
            if self._last_tables:
                tables.update({(f"{name}/{k}" if several else k): v for k, v in self._last_tables.items()})
        metrics.update(self.method.model_metrics(modules, self.ctx))
        self.ctx.last_metrics, self.ctx.last_tables = dict(metrics), tables
        return metrics

    @torch.no_grad()
    def evaluate_loader(self, modules: Modules, loader: Any) -> dict[str, float]:
        from accelerate.utils import send_to_device

        acc = self.accelerator
        sums: dict[str, torch.Tensor] = {}
        with _eval_mode(modules):
            for batch in loader:
                batch = send_to_device(batch, acc.device, non_blocking=True)
                with acc.autocast():
                    part = self.method.eval_step(modules, batch, self.ctx)
                for k, v in part.items():
                    v = v.detach().to(torch.float64)
                    sums[k] = sums[k] + v if k in sums else v
        if self.world > 1:
            from accelerate.utils import gather_object

            # a rank may have seen no val batch (fewer batches than processes): it has no keys; every rank adds
            # zeros for the keys and shapes the others summed, so all reduce the same flat tensor
            layout: dict[str, tuple[int, ...]] = {}
            for part in gather_object([{k: tuple(v.shape) for k, v in sums.items()}]):
                layout.update(part)
            keys = sorted(layout)
            zeros = {k: torch.zeros(layout[k], dtype=torch.float64, device=acc.device) for k in keys if k not in sums}
            sums = {**zeros, **sums}
            flat = torch.cat([sums[k].reshape(-1) for k in keys]) if keys else torch.zeros(0, device=acc.device)
            flat = acc.reduce(flat, "sum")
            out, i = {}, 0
            for k in keys:
                n = sums[k].numel()
                out[k] = flat[i : i + n].reshape(sums[k].shape)
                i += n
            sums = out
        self._last_tables = self.method.tables(sums, self.ctx)
        return self.method.summarize(sums, self.ctx)

    # ------------------------------------------------------------------------------------------
    # the end

    def _finish(self, metrics: dict[str, float], seconds: float, seen: int) -> dict[str, Any]:
        ctx, r, acc = self.ctx, self.recipe, self.accelerator
        modules = self.eval_modules()
        exported = self.method.export(modules, ctx)
        ema_exported = self.method.export(self.eval_modules(ema=True), ctx) if self.ema else None
        files: dict[str, str] = {}
        report: dict[str, Any] = {}
        if self.is_main and self.run_dir is not None:
            meta = {**self.checkpoint_meta(), "metrics": metrics}
            files["weights"] = str(save_weights(self.run_dir / "final.safetensors", exported, meta))
            if ema_exported is not None:
                files["ema_weights"] = str(save_weights(self.run_dir / "final_ema.safetensors", ema_exported, meta))
            files["last_checkpoint"] = str(self.run_dir / "checkpoints" / "last.safetensors")
            if (self.run_dir / "checkpoints" / "best.safetensors").exists():
                files["best_checkpoint"] = str(self.run_dir / "checkpoints" / "best.safetensors")
            files["metrics"] = str(self.run_dir / "metrics.jsonl")
            with _eval_mode(modules), torch.no_grad():  # pictures must not touch BatchNorm statistics
                files.update(self.method.artifacts(modules, self.run_dir, ctx))
            report = {
                "command": r.command,
                "method": getattr(r.method, "method", r.command),
                "model": r.model.name,
                # floating tensors, and integer weight codes of a quantized export (``<layer>.weight``)
                "parameters": sum(
                    p.numel() for k, p in exported.items() if p.is_floating_point() or k.endswith(".weight")
                ),
                "trained_modules": {
                    n: sum(p.numel() for p in acc.unwrap_model(m).parameters()) for n, m in self.trained.items()
                },
                "frozen_modules": dict(self.frozen_sources),
                "optimizers": {n: {"name": o.cfg.name, "base_lr": o.base_lr} for n, o in self.named.items()},
                "data": self.data.description,
                "processes": acc.num_processes,
                "device": acc.device.type,
                "precision": precision_of(r)[0],
                "steps": ctx.step,
                "epochs": ctx.step / ctx.steps_per_epoch,
                "metrics": metrics,
                "best": self.best,
                "train_seconds_this_session": round(seconds, 3),
                "samples_per_s": round(seen / seconds, 2) if seconds > 0 else None,
                "run_dir": str(self.run_dir),
                "files": files,
            }
            if ctx.last_tables:
                report["tables"] = ctx.last_tables
            report.update(self.method.report_extras(ctx))
            atomic_write_text(self.run_dir / "report.json", json.dumps(report, indent=2) + "\n")
        acc.wait_for_everyone()
        return report


class _Progress:
    """A rich progress bar on rank 0 when stderr is a terminal; plain log lines otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty() and os.environ.get("EVCLI_NO_PROGRESS") != "1":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[loss]}"),
                TimeRemainingColumn(),
                console=err_console,
                transient=False,
            )
            self.task = self.bar.add_task("train", total=total, loss="")

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def advance_to(self, step: int, loss: torch.Tensor | None = None) -> None:
        if self.bar is not None:
            fields = {"loss": f"loss {loss.item():.4f}"} if loss is not None else {}
            self.bar.update(self.task, completed=step, **fields)

    def note(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(line, markup=False, highlight=False)
        else:
            log(line)
